"""Read a GGUF checkpoint of architecture `deepseek2` (llama.cpp's name for DeepSeek-V2/V3, R1 and
Kimi-K2), `qwen3moe`, `qwen2moe`, `glm4moe` or `llama` with experts (Mixtral), one file or split into
`NAME-00001-of-0000N.gguf` parts, through the `gguf` package's memory-mapped reader.

Contract:
- Opening validates what can be validated from the headers, before the `gguf` package parses them
  (it trusts every count and offset): each count and length fits the file, the tensor table is what
  llama.cpp accepts (known ggml types, whole blocks per row, data back to back in table order at
  general.alignment, inside the file: a truncated download is named as such), every split present
  and of the same model, one of the architectures above, no tensor name twice. Tensor data are not read.
  Each error names the file and the key or tensor.
- Metadata is read typed: a key holding the wrong type (2.5 or "7" for a count) or an impossible
  value (a NaN epsilon, top-k above the expert count) is a ConfigError naming the GGUF key.
- `args()` turns the metadata into ModelArgs through the same parser as config.json
  (`metadata_config()` builds the config.json-shaped dict and is the one list of keys read).
- raw(name) is the stored tensor as the memory map holds it (numpy, read-only, zero-copy): quantized
  types are uint8 (..., rows, row_bytes) in ggml's block layout. dequantize(name) is fp32 via
  `gguf.quants.dequantize`, the reference the issue names.

Shapes are numpy order (ggml's ne reversed): a weight (out, in), fused experts (E, out, in).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from ..config import ModelArgs
from ..errors import CheckpointError, ConfigError
from .gguf_header import read_header

ARCH = "deepseek2"
# The grouped-query architectures -> the config.json model_type their metadata becomes (gqa_config).
GQA_ARCHS = {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "llama": "mixtral", "glm4moe": "glm4_moe"}
ARCHS = (ARCH, *GQA_ARCHS)
FAMILIES = {"deepseek2": "DeepSeek", "qwen3moe": "Qwen3-MoE", "qwen2moe": "Qwen2-MoE", "llama": "Mixtral",
            "glm4moe": "GLM-4.5"}
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_PER_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_DENSE_GATE = re.compile(r"^blk\.(\d+)\.ffn_gate\.weight$")
# llama.cpp's expert gating function enum (LLAMA_EXPERT_GATING_FUNC_TYPE_*).
GATING_FUNCS = {1: "softmax", 2: "sigmoid"}

@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    file: Path
    type: str                   # ggml type name: "F32", "BF16", "Q4_K", ...
    shape: tuple[int, ...]      # numpy order, in elements
    offset: int                 # absolute byte offset of the data in the file
    nbytes: int


def _check_mixtral_experts(file: Path, names) -> None:
    """Two Mixtral layouts llama.cpp's converters have written that hetero_rt does not run, refused by name
    before anything is read: one tensor per expert (blk.N.ffn_gate.E.weight, conversions of early 2024),
    and the router stored as blk.N.ffn_gate.weight (gguf-py's tensor map of mid-2025, whose SmallThinker
    entry also maps block_sparse_moe.gate to ffn_gate; llama.cpp refuses these files too)."""
    for name in names:
        if m := _PER_EXPERT.match(name):
            raise CheckpointError(
                f"{file}: tensor '{name}' is one expert's weight (the Mixtral layout of early conversions, one tensor "
                f"per expert); hetero_rt reads each layer's experts stacked in blk.{m.group(1)}.ffn_{m.group(2)}_exps."
                f"weight, as llama.cpp's convert_hf_to_gguf.py writes them: convert the HF checkpoint again with a "
                f"current convert_hf_to_gguf.py, or use a newer conversion")
        if (m := _DENSE_GATE.match(name)) and f"blk.{m.group(1)}.ffn_gate_exps.weight" in names \
                and f"blk.{m.group(1)}.ffn_gate_inp.weight" not in names:
            raise CheckpointError(
                f"{file}: layer {m.group(1)} has routed experts and '{name}' but no router "
                f"'blk.{m.group(1)}.ffn_gate_inp.weight': the router was written under the dense gate's name, as "
                f"llama.cpp's gguf-py of mid-2025 converted Mixtral (its map sends block_sparse_moe.gate to ffn_gate); "
                f"llama.cpp refuses such files too: convert the HF checkpoint again with a newer convert_hf_to_gguf.py")


class GGUFCheckpoint:
    """All tensors and the metadata of one GGUF model (all its splits), memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = split_files(self.path)
        self._readers = [_open_reader(f) for f in self.files]
        self.meta: dict[str, Any] = _metadata(self._readers[0])
        _check_splits(self.files, self._readers)
        self._tensors: dict[str, tuple[int, Any]] = {}
        for i, (file, reader) in enumerate(zip(self.files, self._readers)):
            for t in reader.tensors:
                if t.name in self._tensors:
                    raise CheckpointError(f"{file}: tensor '{t.name}' also appears in "
                                          f"{self.files[self._tensors[t.name][0]]}")
                self._tensors[t.name] = (i, t)
        for reader in self._readers:   # parsed fields hold numpy views per array element (about 200 MB for a
            reader.fields = {}         # 100k-token vocabulary); their values are in self.meta now
        arch = self.meta.get("general.architecture")
        if arch not in ARCHS:
            raise CheckpointError(f"{self.files[0]}: general.architecture is {arch!r}; hetero_rt runs "
                                  f"'{ARCH}' GGUFs (DeepSeek-V2/V3/R1, Kimi-K2) and "
                                  f"{', '.join(repr(a) for a in GQA_ARCHS)} (Qwen3/Qwen2-MoE, Mixtral, GLM-4.5)")
        if arch == "llama" and "llama.expert_count" not in self.meta:
            raise CheckpointError(f"{self.files[0]}: general.architecture is 'llama' without llama.expert_count, a "
                                  f"dense model; hetero_rt runs llama GGUFs with experts (Mixtral) only")
        if arch == "llama":
            _check_mixtral_experts(self.files[0], self._tensors)
        self.arch = arch

    # -- lookup ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def info(self, name: str) -> GGUFTensorInfo:
        i, t = self._get(name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return GGUFTensorInfo(name, self.files[i], t.tensor_type.name, shape, int(t.data_offset), int(t.n_bytes))

    def raw(self, name: str) -> np.ndarray:
        """The stored data, zero-copy and read-only (uint8 block bytes for quantized types)."""
        return self._get(name)[1].data

    def dequantize(self, name: str) -> np.ndarray:
        """fp32 copy in numpy shape (the exact reference for quantized types)."""
        _, t = self._get(name)
        try:
            values = gguf_dequantize(t.data, t.tensor_type)
        except NotImplementedError:  # Q8_1, Q8_K, the integer types, F64: no converter writes weights in them
            raise CheckpointError(f"{self.info(name).file}: tensor '{name}' is of ggml type {t.tensor_type.name}, "
                                  f"which the gguf package cannot dequantize; no DeepSeek conversion stores weights "
                                  f"in it: the header is corrupt, or quantize the model to another type") from None
        out = np.asarray(values, dtype=np.float32).reshape(self.info(name).shape)
        return out if out.flags.writeable else out.copy()  # F32 comes back as the read-only map itself

    def total_bytes(self) -> int:
        return sum(int(t.n_bytes) for _, t in self._tensors.values())

    def _get(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor '{name}' in the GGUF") from None

    # -- metadata -------------------------------------------------------------------------------
    def args(self) -> ModelArgs:
        return ModelArgs.from_dict(self.config_dict(), source=f"{self.files[0]} (GGUF metadata)")

    def config_dict(self) -> dict[str, Any]:
        """The metadata as a config.json-shaped dict (see ModelArgs)."""
        return metadata_config(self.meta, self._tensors.keys(), str(self.files[0]),
                           self.info("token_embd.weight").shape[0] if "token_embd.weight" in self else None)

    def close(self) -> None:
        for r in self._readers:
            mm = getattr(r.data, "_mmap", None)
            if mm is not None:
                try:
                    mm.close()
                except (BufferError, ValueError):
                    pass  # a view is still alive; the map closes with it
        self._readers = []

    def __enter__(self) -> "GGUFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_gguf(path: str | Path) -> bool:
    return str(path).endswith(".gguf")


def split_files(path: Path) -> list[Path]:
    """All parts of a split GGUF given any one of them (or the single file)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; pass a .gguf file (for a split model, any of its "
                              f"-0000K-of-0000N.gguf parts)")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; pass the .gguf file itself")
    m = _SPLIT.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    files = [path.with_name(f"{m.group('stem')}-{k:05d}-of-{count:05d}.gguf") for k in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: split GGUF of {count} parts, but {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} missing from {path.parent}")
    return files


def _open_reader(file: Path):
    """The gguf package's reader over a header checked first (gguf_header.read_header)."""
    header = read_header(file)
    try:
        reader = GGUFReader(file)
    except (OSError, ValueError, LookupError, ArithmeticError, TypeError, MemoryError, RecursionError) as e:
        # what the package raises on a header it cannot parse (the checks above should leave none)
        raise CheckpointError(f"{file}: corrupt GGUF header ({type(e).__name__}: {e}); download it again") from None
    if int(reader.data_offset) != header.data_start or len(reader.tensors) != len(header.tensors):
        raise CheckpointError(f"{file}: the gguf package reads this header differently from hetero_rt's check "
                              f"(data at byte {reader.data_offset} vs {header.data_start}, {len(reader.tensors)} "
                              f"vs {len(header.tensors)} tensors); the header is corrupt: download it again")
    return reader


def _metadata(reader) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as e:  # a field the gguf package cannot decode: keep the rest usable
            meta[key] = CheckpointError(f"metadata key '{key}' cannot be decoded ({e})")
    return meta


def _check_splits(files: list[Path], readers) -> None:
    if len(files) == 1:
        return
    for k, (file, reader) in enumerate(zip(files, readers)):
        no, count = _split_count(file, reader, "split.no"), _split_count(file, reader, "split.count")
        if no is None or count is None:
            raise CheckpointError(f"{file}: named as part {k + 1} of a split GGUF but has no split.no/"
                                  f"split.count metadata")
        if no != k or count != len(files):
            raise CheckpointError(f"{file}: split.no={no} split.count={count}, but its "
                                  f"name says part {k + 1} of {len(files)} (0-based split.no {k})")
    expected = _split_count(files[0], readers[0], "split.tensors.count")
    if expected is not None:
        have = sum(len(r.tensors) for r in readers)
        if have != expected:
            raise CheckpointError(f"{files[0]}: split.tensors.count is {expected} but the "
                                  f"{len(files)} parts hold {have} tensors")


def _split_count(file: Path, reader, key: str) -> int | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        value = field.contents()
    except ValueError as e:  # a string that is not UTF-8
        value = e
    if not is_integer(value) or value < 0:
        raise CheckpointError(f"{file}: GGUF metadata key '{key}' holds {describe_value(value)}; expected an "
                              f"integer >= 0 (llama.cpp's gguf-split writes it): the header is corrupt")
    return int(value)


def metadata_config(meta: dict[str, Any], tensor_names, source: str, embd_rows: int | None = None) -> dict[str, Any]:
    """GGUF metadata -> the config.json keys ModelArgs reads. A missing required key, a key of the wrong
    type or an impossible value raises ConfigError naming the GGUF key (see _Keys)."""
    arch = meta.get("general.architecture", ARCH)
    if arch in GQA_ARCHS:
        return gqa_config(_Keys(meta, source, arch), meta, set(tensor_names), embd_rows)
    k = _Keys(meta, source)
    names = set(tensor_names)
    nextn = k.integer("nextn_predict_layers", 0)
    blocks = k.integer("block_count", lo=nextn + 1, why=f" (nextn_predict_layers is {nextn})")
    layers = blocks - nextn
    experts = k.integer("expert_count", lo=1)
    routing = _routing(k, names)
    cfg: dict[str, Any] = {
        "model_type": "deepseek_v3" if routing["topk_method"] == "noaux_tc" else "deepseek_v2",
        "vocab_size": _vocab_size(k, meta, embd_rows),
        "hidden_size": k.integer("embedding_length", lo=1),
        "intermediate_size": k.integer("feed_forward_length", lo=1),
        "moe_intermediate_size": k.integer("expert_feed_forward_length", lo=1),
        "num_hidden_layers": layers,
        "num_nextn_predict_layers": nextn,
        "num_attention_heads": k.integer("attention.head_count", lo=1),
        "q_lora_rank": k.integer("attention.q_lora_rank", 0) or None,
        **_attention_dims(k),
        "n_routed_experts": experts,
        "num_experts_per_tok": k.integer("expert_used_count", lo=1, hi=experts, why=" (expert_count)"),
        "n_shared_experts": k.integer("expert_shared_count", 0),
        "first_k_dense_replace": k.integer("leading_dense_block_count", 0, hi=layers, why=" (the layer count)"),
        "moe_layer_freq": 1,
        **routing,
        "norm_topk_prob": k.flag("expert_weights_norm", False),
        "routed_scaling_factor": k.real("expert_weights_scale", 1.0),
        "rms_norm_eps": k.real("attention.layer_norm_rms_epsilon"),
        "rope_theta": k.real("rope.freq_base", 10000.0),
        "rope_interleave": True,  # llama.cpp runs deepseek2 with ROPE_TYPE_NORM: adjacent pairs
        "tie_word_embeddings": "output.weight" not in names,
        "max_position_embeddings": k.integer("context_length", lo=1),
        "bos_token_id": _token_id(meta, "tokenizer.ggml.bos_token_id", source),
        "eos_token_id": _token_id(meta, "tokenizer.ggml.eos_token_id", source),
        "hidden_act": "silu",
    }
    scaling = _rope_scaling(k)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    return cfg


def gqa_config(k: _Keys, meta: dict[str, Any], names: set[str], embd_rows: int | None) -> dict[str, Any]:
    """qwen3moe / qwen2moe / llama (+ experts) / glm4moe metadata -> the family's config.json keys, as
    llama.cpp runs these architectures: what its code hard-codes (Qwen3 and Mixtral renormalise the
    top-k weights, Qwen2 does not; llama's converter permutes q/k rows for adjacent-pair RoPE) is
    written here, what a layer has (biases, q/k norms, a router) is read from its tensors."""
    arch, model_type = k.arch, GQA_ARCHS[k.arch]
    nextn = k.integer("nextn_predict_layers", 0)
    layers = k.integer("block_count", lo=nextn + 1, why=f" (nextn_predict_layers is {nextn})") - nextn
    heads, hidden = k.integer("attention.head_count", lo=1), k.integer("embedding_length", lo=1)
    head_dim = k.integer("attention.key_length", hidden // heads, lo=1)
    if k.integer("attention.value_length", head_dim) != head_dim:
        raise k.wrong("attention.value_length", k.stored("attention.value_length"), f"{head_dim} (key_length)")
    rotary = k.integer("rope.dimension_count", head_dim, lo=2, hi=head_dim, why=" (the head size)")
    experts = k.integer("expert_count", lo=1)
    has = lambda suffix: any(n.endswith(suffix) for n in names)  # noqa: E731
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": _vocab_size(k, meta, embd_rows),
        "hidden_size": hidden, "intermediate_size": k.integer("feed_forward_length", lo=1),
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": k.integer("attention.head_count_kv", heads, lo=1), "head_dim": head_dim,
        "partial_rotary_factor": rotary / head_dim,
        "num_experts_per_tok": k.integer("expert_used_count", lo=1, hi=experts, why=" (expert_count)"),
        "rms_norm_eps": k.real("attention.layer_norm_rms_epsilon"),
        "rope_theta": k.real("rope.freq_base", 10000.0),
        "rope_interleave": arch == "llama",   # converted with q/k rows permuted: llama.cpp's ROPE_TYPE_NORM
        "tie_word_embeddings": "output.weight" not in names,
        "max_position_embeddings": k.integer("context_length", lo=1),
        "bos_token_id": _token_id(meta, "tokenizer.ggml.bos_token_id", k.source),
        "eos_token_id": _token_id(meta, "tokenizer.ggml.eos_token_id", k.source),
        "hidden_act": "silu",
        **_GQA_FAMILY_CONFIG[arch](k, experts, has),
    }
    if int(head_dim * cfg["partial_rotary_factor"]) != rotary:   # ModelArgs takes int(head_dim * factor)
        raise k.wrong("rope.dimension_count", rotary, f"a rotary size that is a float fraction of {head_dim}")
    if arch in ("qwen3moe", "qwen2moe"):   # a Qwen layer without a router is one of mlp_only_layers
        cfg["mlp_only_layers"] = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in names]
    scaling = _rope_scaling(k)
    if scaling is not None:   # Qwen's YaRN has no magnitude keys: the config's defaults, not DeepSeek's mscale
        keep = k.has("rope.scaling.yarn_log_multiplier")
        cfg["rope_scaling"] = {key: v for key, v in scaling.items() if keep or not key.startswith("mscale")}
    return cfg


_GQA_FAMILY_CONFIG = {
    "qwen3moe": lambda k, experts, has: {
        "num_experts": experts, "moe_intermediate_size": k.integer("expert_feed_forward_length", lo=1),
        "norm_topk_prob": k.flag("expert_weights_norm", True), "attention_bias": has("attn_q.bias")},
    "qwen2moe": lambda k, experts, has: {
        "num_experts": experts, "moe_intermediate_size": k.integer("expert_feed_forward_length", lo=1),
        "shared_expert_intermediate_size": k.integer("expert_shared_feed_forward_length", lo=1),
        "norm_topk_prob": k.flag("expert_weights_norm", False), "qkv_bias": has("attn_q.bias")},
    "llama": lambda k, experts, has: {"num_local_experts": experts},
    "glm4moe": lambda k, experts, has: {
        "n_routed_experts": experts, "moe_intermediate_size": k.integer("expert_feed_forward_length", lo=1),
        "n_shared_experts": k.integer("expert_shared_count", 0),
        "first_k_dense_replace": k.integer("leading_dense_block_count", 0),
        "n_group": k.integer("expert_group_count", 1) or 1, "topk_group": k.integer("expert_group_used_count", 1) or 1,
        "norm_topk_prob": k.flag("expert_weights_norm", True),
        "routed_scaling_factor": k.real("expert_weights_scale", 1.0),
        "num_nextn_predict_layers": k.integer("nextn_predict_layers", 0),
        "use_qk_norm": has("attn_q_norm.weight"), "attention_bias": has("attn_q.bias")},
}


def _attention_dims(k: _Keys) -> dict[str, int]:
    rope = k.integer("rope.dimension_count", lo=1)
    kv_lora = k.integer("attention.kv_lora_rank", lo=1)
    why = f" (a key head is nope + rope dims, rope.dimension_count is {rope})"
    if k.has("attention.key_length_mla"):  # llama.cpp >= the MLA conversion: MQA over the latent
        key_len = k.integer("attention.key_length_mla", lo=rope + 1, why=why)
        value_len = k.integer("attention.value_length_mla", lo=1)
        if k.integer("attention.key_length", kv_lora + rope) != kv_lora + rope:
            raise ConfigError(f"{k.source}: {ARCH}.attention.key_length is {k.integer('attention.key_length')}, "
                              f"expected kv_lora_rank + rope dims = {kv_lora + rope} next to key_length_mla")
    else:  # older conversions (attn_kv_b): per-head key/value lengths
        key_len = k.integer("attention.key_length", lo=rope + 1, why=why)
        value_len = k.integer("attention.value_length", lo=1)
    return {"kv_lora_rank": kv_lora, "qk_rope_head_dim": rope, "qk_nope_head_dim": key_len - rope,
            "v_head_dim": value_len}


def _routing(k: _Keys, names: set[str]) -> dict[str, Any]:
    gating = k.integer("expert_gating_func", 1)
    if gating not in GATING_FUNCS:
        raise ConfigError(f"{k.source}: {ARCH}.expert_gating_func is {gating}; expected 1 (softmax) or 2 (sigmoid)")
    n_group = k.integer("expert_group_count", 1) or 1
    topk_group = k.integer("expert_group_used_count", n_group, hi=n_group, why=" (expert_group_count)") or n_group
    if any(n.endswith("exp_probs_b.bias") for n in names):
        method = "noaux_tc"
    elif n_group > 1:
        method = "group_limited_greedy"
    else:
        method = "greedy"
    return {"scoring_func": GATING_FUNCS[gating], "topk_method": method, "n_group": n_group, "topk_group": topk_group}


def _vocab_size(k: _Keys, meta: dict[str, Any], embd_rows: int | None) -> int | None:
    if k.has("vocab_size"):
        return k.integer("vocab_size", lo=1)
    tokens = meta.get("tokenizer.ggml.tokens")
    return len(tokens) if isinstance(tokens, list) else embd_rows


def _rope_scaling(k: _Keys) -> dict[str, Any] | None:
    scaling = k.text("rope.scaling.type", "none")
    if scaling == "yarn":
        # llama.cpp stores 0.1 * mscale_all_dim as yarn_log_multiplier; every released DeepSeek/Kimi
        # config has mscale == mscale_all_dim, which makes the rope magnitude factor 1 (see config.py).
        mscale_all = k.real("rope.scaling.yarn_log_multiplier", 0.0, strict=False) / 0.1
        return {
            "type": "yarn", "factor": k.real("rope.scaling.factor"),
            "original_max_position_embeddings": k.integer("rope.scaling.original_context_length", lo=1),
            "beta_fast": k.real("rope.scaling.yarn_beta_fast", 32.0),
            "beta_slow": k.real("rope.scaling.yarn_beta_slow", 1.0),
            "mscale": mscale_all, "mscale_all_dim": mscale_all,
        }
    if scaling == "none" or (scaling == "linear" and k.real("rope.scaling.factor", 1.0) == 1.0):
        return None
    raise ConfigError(f"{k.source}: {k.arch}.rope.scaling.type is {scaling!r}; {FAMILIES[k.arch]} models use "
                      f"'yarn' or none")


class _Keys:
    """Typed reads of the `deepseek2.*` metadata. A value of the wrong type is a ConfigError naming the
    GGUF key, what it holds and what was expected, never a conversion (2.5 is not an integer, "7" not
    a number, true not 1); so is a value outside the range the key can have."""

    def __init__(self, meta: dict[str, Any], source: str, arch: str = ARCH):
        self.meta, self.source, self.arch = meta, source, arch

    def has(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.meta

    def integer(self, key: str, default: Any = ..., lo: int = 0, hi: int | None = None, why: str = "") -> Any:
        if not self.has(key):
            return self.default(key, default)
        value = self.stored(key)
        if not is_integer(value):
            raise self.wrong(key, value, "an integer")
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"from {lo} to {hi}"
            raise self.wrong(key, value, f"an integer {bound}{why}")
        return int(value)

    def real(self, key: str, default: Any = ..., strict: bool = True) -> Any:
        """A finite number > 0 (>= 0 unless strict); GGUF integers are exact here and accepted."""
        if not self.has(key):
            return self.default(key, default)
        value = self.stored(key)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise self.wrong(key, value, "a number")
        if not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
            raise self.wrong(key, value, f"a finite number {'>' if strict else '>='} 0")
        return float(value)

    def flag(self, key: str, default: Any = ...) -> Any:
        if not self.has(key):
            return self.default(key, default)
        value = self.stored(key)
        if not isinstance(value, (bool, np.bool_)):
            raise self.wrong(key, value, "a bool")
        return bool(value)

    def text(self, key: str, default: Any = ...) -> Any:
        if not self.has(key):
            return self.default(key, default)
        value = self.stored(key)
        if not isinstance(value, str):
            raise self.wrong(key, value, "a string")
        return value

    def default(self, key: str, default: Any) -> Any:
        if default is ...:
            raise ConfigError(f"{self.source}: GGUF metadata key '{self.arch}.{key}' is missing; the file is not a "
                              f"complete {self.arch} GGUF (convert it again with llama.cpp's convert_hf_to_gguf.py)")
        return default

    def stored(self, key: str) -> Any:
        value = self.meta[f"{self.arch}.{key}"]
        if isinstance(value, Exception):  # undecodable in the file (see _metadata)
            raise ConfigError(f"{self.source}: {value}")
        return value

    def wrong(self, key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.source}: GGUF metadata key '{self.arch}.{key}' holds {describe_value(value)}; "
                           f"expected {expected}. The metadata is corrupt: download the file again (or convert it "
                           f"again with llama.cpp's convert_hf_to_gguf.py)")


def _token_id(meta: dict[str, Any], key: str, source: str) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, Exception):
        raise ConfigError(f"{source}: {value}")
    if not is_integer(value) or value < 0:
        raise ConfigError(f"{source}: GGUF metadata key '{key}' holds {describe_value(value)}; expected a token "
                          f"id (an integer >= 0): the metadata is corrupt")
    return int(value)


def is_integer(value: Any) -> bool:
    """An integer metadata value; bools are not."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def describe_value(value: Any) -> str:
    """A metadata value's type and (short) value for an error message: 'a float (2.5)'."""
    if isinstance(value, (bool, np.bool_)):
        return f"a bool ({bool(value)})"
    if is_integer(value):
        return f"an integer ({value})"
    if isinstance(value, (float, np.floating)):
        return f"a float ({float(value)!r})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r}{'...' if len(value) > 40 else ''})"
    if isinstance(value, (list, tuple)):
        return f"an array of {len(value)} values"
    return f"a {type(value).__name__}"

"""Read a GGUF checkpoint of architecture `deepseek2` (llama.cpp's name for DeepSeek-V2/V3, R1 and
Kimi-K2), one file or split into `NAME-00001-of-0000N.gguf` parts, through the `gguf` package's
memory-mapped reader.

Contract:
- Opening validates what can be validated from the headers: every split present and of the same
  model, tensor data inside the file (a truncated download is named as such), architecture
  `deepseek2`, no tensor name twice. Each error names the file and the key or tensor.
- `args()` turns the metadata into ModelArgs through the same parser as config.json
  (`metadata_config()` builds the config.json-shaped dict and is the one list of keys read).
- raw(name) is the stored tensor as the memory map holds it (numpy, read-only, zero-copy): quantized
  types are uint8 (..., rows, row_bytes) in ggml's block layout. dequantize(name) is fp32 via
  `gguf.quants.dequantize`, the reference the issue names.

Shapes are numpy order (ggml's ne reversed): a weight (out, in), fused experts (E, out, in).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from ..config import ModelArgs
from ..errors import CheckpointError, ConfigError

ARCH = "deepseek2"
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
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
        if arch != ARCH:
            raise CheckpointError(f"{self.files[0]}: general.architecture is {arch!r}; hetero_rt runs "
                                  f"'{ARCH}' GGUFs (DeepSeek-V2/V3/R1, Kimi-K2)")

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
        out = np.asarray(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(self.info(name).shape)
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
    size = file.stat().st_size
    try:
        reader = GGUFReader(file)
    except ValueError as e:
        if "magic" in str(e).lower():
            raise CheckpointError(f"{file}: not a GGUF file (bad magic number)") from None
        raise CheckpointError(f"{file}: cannot be read as GGUF ({e}); the file is probably truncated "
                              f"({size} bytes): download it again") from None
    except (IndexError, OverflowError, UnicodeDecodeError, KeyError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated GGUF header ({type(e).__name__}: {e}); "
                              f"download it again") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise CheckpointError(f"{file}: tensor '{t.name}' ends at byte {end} but the file has {size} "
                                  f"bytes: the file is truncated; download it again")
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
        meta = reader.fields
        no = meta.get("split.no")
        count = meta.get("split.count")
        if no is None or count is None:
            raise CheckpointError(f"{file}: named as part {k + 1} of a split GGUF but has no split.no/"
                                  f"split.count metadata")
        if int(no.contents()) != k or int(count.contents()) != len(files):
            raise CheckpointError(f"{file}: split.no={no.contents()} split.count={count.contents()}, but its "
                                  f"name says part {k + 1} of {len(files)} (0-based split.no {k})")
    expected = readers[0].fields.get("split.tensors.count")
    if expected is not None:
        have = sum(len(r.tensors) for r in readers)
        if have != int(expected.contents()):
            raise CheckpointError(f"{files[0]}: split.tensors.count is {expected.contents()} but the "
                                  f"{len(files)} parts hold {have} tensors")


def metadata_config(meta: dict[str, Any], tensor_names, source: str, embd_rows: int | None = None) -> dict[str, Any]:
    """GGUF deepseek2 metadata -> the config.json keys ModelArgs reads. Missing required keys raise
    ConfigError naming the GGUF key."""
    p = f"{ARCH}."

    def get(key: str, default: Any = ...) -> Any:
        full = p + key
        if full not in meta:
            if default is ...:
                raise ConfigError(f"{source}: GGUF metadata key '{full}' is missing; the file is not a complete "
                                  f"{ARCH} GGUF (convert it again with llama.cpp's convert_hf_to_gguf.py)")
            return default
        value = meta[full]
        if isinstance(value, Exception):
            raise ConfigError(f"{source}: {value}")
        return value

    names = set(tensor_names)
    rope = int(get("rope.dimension_count"))
    kv_lora = int(get("attention.kv_lora_rank"))
    if p + "attention.key_length_mla" in meta:  # llama.cpp >= the MLA conversion: MQA over the latent
        key_len, value_len = int(get("attention.key_length_mla")), int(get("attention.value_length_mla"))
        if int(get("attention.key_length", kv_lora + rope)) != kv_lora + rope:
            raise ConfigError(f"{source}: {p}attention.key_length is {get('attention.key_length')}, expected "
                              f"kv_lora_rank + rope dims = {kv_lora + rope} next to key_length_mla")
    else:  # older conversions (attn_kv_b): per-head key/value lengths
        key_len, value_len = int(get("attention.key_length")), int(get("attention.value_length"))
    gating = int(get("expert_gating_func", 1))
    if gating not in GATING_FUNCS:
        raise ConfigError(f"{source}: {p}expert_gating_func is {gating}; expected 1 (softmax) or 2 (sigmoid)")
    n_group = int(get("expert_group_count", 1)) or 1
    topk_group = int(get("expert_group_used_count", n_group)) or n_group
    if any(n.endswith("exp_probs_b.bias") for n in names):
        method = "noaux_tc"
    elif n_group > 1:
        method = "group_limited_greedy"
    else:
        method = "greedy"
    scoring = GATING_FUNCS[gating]
    vocab = get("vocab_size", None)
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if isinstance(tokens, list) else embd_rows
    nextn = int(get("nextn_predict_layers", 0))
    cfg: dict[str, Any] = {
        "model_type": "deepseek_v3" if method == "noaux_tc" else "deepseek_v2",
        "vocab_size": vocab,
        "hidden_size": int(get("embedding_length")),
        "intermediate_size": int(get("feed_forward_length")),
        "moe_intermediate_size": int(get("expert_feed_forward_length")),
        "num_hidden_layers": int(get("block_count")) - nextn,
        "num_nextn_predict_layers": nextn,
        "num_attention_heads": int(get("attention.head_count")),
        "q_lora_rank": int(get("attention.q_lora_rank", 0)) or None,
        "kv_lora_rank": kv_lora,
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": key_len - rope,
        "v_head_dim": value_len,
        "n_routed_experts": int(get("expert_count")),
        "num_experts_per_tok": int(get("expert_used_count")),
        "n_shared_experts": int(get("expert_shared_count", 0)),
        "first_k_dense_replace": int(get("leading_dense_block_count", 0)),
        "moe_layer_freq": 1,
        "scoring_func": scoring,
        "topk_method": method,
        "n_group": n_group,
        "topk_group": topk_group,
        "norm_topk_prob": bool(get("expert_weights_norm", False)),
        "routed_scaling_factor": float(get("expert_weights_scale", 1.0)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_interleave": True,  # llama.cpp runs deepseek2 with ROPE_TYPE_NORM: adjacent pairs
        "tie_word_embeddings": "output.weight" not in names,
        "max_position_embeddings": int(get("context_length")),
        "bos_token_id": _int_or_none(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _int_or_none(meta.get("tokenizer.ggml.eos_token_id")),
        "hidden_act": "silu",
    }
    scaling = get("rope.scaling.type", "none")
    if scaling == "yarn":
        # llama.cpp stores 0.1 * mscale_all_dim as yarn_log_multiplier; every released DeepSeek/Kimi
        # config has mscale == mscale_all_dim, which makes the rope magnitude factor 1 (see config.py).
        mscale_all = float(get("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1
        cfg["rope_scaling"] = {
            "type": "yarn", "factor": float(get("rope.scaling.factor")),
            "original_max_position_embeddings": int(get("rope.scaling.original_context_length")),
            "beta_fast": float(get("rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": float(get("rope.scaling.yarn_beta_slow", 1.0)),
            "mscale": mscale_all, "mscale_all_dim": mscale_all,
        }
    elif scaling not in ("none", "linear") or (scaling == "linear" and float(get("rope.scaling.factor", 1.0)) != 1.0):
        raise ConfigError(f"{source}: {p}rope.scaling.type is {scaling!r}; DeepSeek models use 'yarn' or none")
    return cfg


def _int_or_none(v: Any) -> int | None:
    return None if v is None or isinstance(v, Exception) else int(v)


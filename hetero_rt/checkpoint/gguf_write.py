"""Write a deepseek2 GGUF the way llama.cpp's convert_hf_to_gguf.py lays it out, from HF-named
tensors and a config.json dict: for tests (tiny transformers models in every quant type) and for
scripts/make_synthetic_gguf.py (real layer shapes). Not a replacement for llama.cpp's converter on
real checkpoints: use that one for downloads.

Layout written (the reader in gguf.py reads exactly this, and llama.cpp loads it):
- metadata `deepseek2.*` (the keys gguf.metadata_config reads) incl. the MLA key/value lengths, and the tokenizer
  of a HF tokenizer.json (byte-level BPE) as `tokenizer.ggml.*` with the chat template;
- kv_b_proj split per head into attn_k_b (H, C, N; transposed) and attn_v_b (H, V, C) (or kept
  whole as attn_kv_b with kv_b="whole", the older layout);
- routed experts stacked into ffn_{gate,up,down}_exps (E, rows, cols); the correction bias as
  exp_probs_b.bias; MTP layers dropped;
- each tensor in the type `types(gguf_name, shape)` returns (name of a GGMLQuantizationType);
  1-D tensors always F32, as llama.cpp does.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Mapping

import gguf
import numpy as np
import torch

from ..quant.ggml import GGML_TYPES
from ..quant.ggml import quantize as ggml_quantize
from .gguf_tokenizer import PRE_TOKENIZERS
from .names import EXPERT_NAMES, GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES, GLOBAL_NAMES, LAYER_NAMES

_HF_LAYER_TO_GGUF = {hf: next(g for g, o in GGUF_LAYER_NAMES.items() if o == ours)
                     for hf, ours in LAYER_NAMES.items()}
_HF_GLOBAL_TO_GGUF = {hf: g for g, ours in GGUF_GLOBAL_NAMES.items() for hf, o in GLOBAL_NAMES.items() if o == ours}
_HF_EXPERT_TO_GGUF = {proj: g.removesuffix(".weight") for g, ours in GGUF_LAYER_NAMES.items()
                      if ours.startswith("ffn.experts.")
                      for proj, w in EXPERT_NAMES.items() if ours.endswith("." + w)}   # gate_proj -> ffn_gate_exps
# block types our quantizers write (quant.ggml; they use gguf's own where it has one)
_OUR_QUANTS = {t: f for t, f in GGML_TYPES.items() if t not in ("F32", "F16", "BF16")}
# llama.cpp's token types
_NORMAL, _CONTROL, _UNUSED = 1, 3, 5

TypeRule = Callable[[str, tuple[int, ...]], str]


def uniform(qtype: str) -> TypeRule:
    """Every 2-D/3-D weight in qtype (falling back to Q8_0 where rows are not whole blocks)."""
    def rule(name: str, shape: tuple[int, ...]) -> str:
        block = 1 if qtype in ("F32", "F16", "BF16") else gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
        return qtype if shape[-1] % block == 0 else ("Q8_0" if shape[-1] % 32 == 0 else "F16")
    return rule


def q4_k_m(name: str, shape: tuple[int, ...]) -> str:
    """A mix in the spirit of llama.cpp's Q4_K_M: Q4_K, with Q6_K for the output, and for the down
    projections and attention values of every other layer; Q8_0/F16 where rows are not whole blocks."""
    m = re.match(r"^blk\.(\d+)\.", name)
    more = name == "output.weight" or (m is not None and int(m.group(1)) % 2 == 0 and
                                       any(k in name for k in ("ffn_down", "attn_v_b", "attn_kv_b")))
    return uniform("Q6_K" if more else "Q4_K")(name, shape)


MIXES: dict[str, TypeRule] = {"Q4_K_M": q4_k_m}


def write_gguf(out: str | Path, config: Mapping, tensors: Mapping[str, torch.Tensor], *,
               types: TypeRule | str = "F32", tokenizer_dir: str | Path | None = None,
               kv_b: str = "split", split_max_tensors: int = 0) -> list[Path]:
    """Write the model; returns the files written (several with split_max_tensors > 0)."""
    rule = (MIXES.get(types) or uniform(types)) if isinstance(types, str) else types
    if not config.get("rope_interleave", True):
        raise ValueError("llama.cpp's deepseek2 rotates adjacent pairs; a config with rope_interleave=false "
                         "would need its q/k rope rows permuted, which this writer does not do")
    out = Path(out)
    writer = gguf.GGUFWriter(out, "deepseek2", split_max_tensors=split_max_tensors)
    _metadata(writer, config)
    if tokenizer_dir is not None:
        _tokenizer(writer, Path(tokenizer_dir), config)
    # Two passes so that nothing but one tensor is in memory at a time: tensor infos first (the
    # header needs them), then each tensor computed, encoded and streamed to the file.
    specs = []
    for name, shape, make in _gguf_tensors(config, tensors, kv_b):
        qtype = "F32" if len(shape) == 1 else rule(name, shape)
        dtype, byte_shape, nbytes = _layout(shape, qtype)
        writer.add_tensor_info(name, byte_shape, dtype, nbytes, raw_dtype=gguf.GGMLQuantizationType[qtype])
        specs.append((make, qtype, dtype, byte_shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for make, qtype, dtype, byte_shape in specs:
        data = _encode(make(), qtype)
        writer.write_tensor_data(np.ascontiguousarray(data).view(dtype).reshape(byte_shape))
    writer.close()
    if split_max_tensors:
        return sorted(out.parent.glob(out.stem + "-*-of-*.gguf"))
    return [out]


def _metadata(w, c: Mapping) -> None:
    a = "deepseek2"
    u32 = lambda k, v: w.add_uint32(f"{a}.{k}", int(v))  # noqa: E731
    f32 = lambda k, v: w.add_float32(f"{a}.{k}", float(v))  # noqa: E731
    w.add_name(c.get("_name", "hetero_rt synthetic"))
    u32("block_count", c["num_hidden_layers"])
    u32("context_length", c["max_position_embeddings"])
    u32("embedding_length", c["hidden_size"])
    u32("feed_forward_length", c["intermediate_size"])
    u32("attention.head_count", c["num_attention_heads"])
    u32("attention.head_count_kv", 1)
    f32("rope.freq_base", c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    f32("attention.layer_norm_rms_epsilon", c.get("rms_norm_eps", 1e-6))
    u32("expert_used_count", c["num_experts_per_tok"])
    u32("leading_dense_block_count", c.get("first_k_dense_replace", 0))
    u32("vocab_size", c["vocab_size"])
    if c.get("q_lora_rank"):
        u32("attention.q_lora_rank", c["q_lora_rank"])
    kv, rope = c["kv_lora_rank"], c["qk_rope_head_dim"]
    u32("attention.kv_lora_rank", kv)
    u32("attention.key_length", kv + rope)
    u32("attention.value_length", kv)
    u32("attention.key_length_mla", c["qk_nope_head_dim"] + rope)
    u32("attention.value_length_mla", c["v_head_dim"])
    u32("expert_feed_forward_length", c["moe_intermediate_size"])
    u32("expert_count", c["n_routed_experts"])
    u32("expert_shared_count", c.get("n_shared_experts", 0))
    f32("expert_weights_scale", c.get("routed_scaling_factor", 1.0))
    w.add_bool(f"{a}.expert_weights_norm", bool(c.get("norm_topk_prob", False)))
    u32("expert_gating_func", 2 if c.get("scoring_func") == "sigmoid" else 1)
    if c.get("topk_method", "greedy") != "greedy" and c.get("n_group", 1) > 1:
        u32("expert_group_count", c["n_group"])
        u32("expert_group_used_count", c["topk_group"])
    u32("rope.dimension_count", rope)
    y = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if y.get("type", y.get("rope_type")) == "yarn":
        if y.get("mscale", 1.0) != y.get("mscale_all_dim", 0.0):
            raise ValueError("GGUF stores one YaRN magnitude (yarn_log_multiplier); mscale must equal "
                             "mscale_all_dim, as in every released DeepSeek/Kimi config")
        w.add_string(f"{a}.rope.scaling.type", "yarn")
        f32("rope.scaling.factor", y["factor"])
        u32("rope.scaling.original_context_length", y["original_max_position_embeddings"])
        f32("rope.scaling.yarn_log_multiplier", 0.1 * y.get("mscale_all_dim", 0.0))
        f32("rope.scaling.yarn_beta_fast", y.get("beta_fast", 32.0))
        f32("rope.scaling.yarn_beta_slow", y.get("beta_slow", 1.0))
    w.add_file_type(0)


def _tokenizer(w, directory: Path, config: Mapping) -> None:
    """tokenizer.json (byte-level BPE) -> tokenizer.ggml.* as llama.cpp's converter writes it."""
    tj = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    model = tj["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{directory}/tokenizer.json: only byte-level BPE vocabularies are converted")
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    vocab.update(special)
    n = config["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(n)]
    ttypes = [_UNUSED] * n
    for tok, i in vocab.items():
        if i < n:
            tokens[i] = tok
            ttypes[i] = _CONTROL if tok in special else _NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_name(tj))
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_token_merges(merges)
    for key, adder in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id)):
        tok = cfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok in vocab:
            adder(vocab[tok])
    w.add_add_bos_token(bool(cfg.get("add_bos_token", True)))
    w.add_add_eos_token(bool(cfg.get("add_eos_token", False)))
    if cfg.get("chat_template"):
        w.add_chat_template(cfg["chat_template"])


def _pre_name(tj: dict) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json's pre_tokenizer (see gguf_tokenizer.py)."""
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        regexes = [p["pattern"]["Regex"] for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
        for name, known in PRE_TOKENIZERS.items():
            if known == tuple(regexes):
                return name
    raise ValueError("tokenizer.json pre-tokenizer is not one llama.cpp names for DeepSeek/Kimi models")


class Lazy:
    """A tensor made on demand (synthetic checkpoints): shape now, data when written."""

    def __init__(self, shape: tuple[int, ...], make: Callable[[], np.ndarray]):
        self.shape, self.make = tuple(shape), make


def _gguf_tensors(c: Mapping, tensors: Mapping, kv_b: str):
    """(GGUF name, numpy shape, () -> fp32 numpy) in file order: globals, then per layer."""
    for hf, g in _HF_GLOBAL_TO_GGUF.items():
        if hf in tensors and not (hf == "lm_head.weight" and c.get("tie_word_embeddings")):
            yield g, tuple(tensors[hf].shape), _thunk(tensors[hf])
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for suffix, g in _HF_LAYER_TO_GGUF.items():
            t = tensors.get(p + suffix)
            if t is None:
                continue
            if suffix == "self_attn.kv_b_proj.weight" and kv_b == "split":
                h, n, v = c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"]
                cols = t.shape[-1]
                yield f"blk.{i}.attn_k_b.weight", (h, cols, n), lambda t=t: _split_kv_b(_np(t), h, n, v)[0]
                yield f"blk.{i}.attn_v_b.weight", (h, v, cols), lambda t=t: _split_kv_b(_np(t), h, n, v)[1]
                continue
            yield f"blk.{i}.{g}", tuple(t.shape), _thunk(t)
        if p + "mlp.experts.0.gate_proj.weight" in tensors:
            n_exp = c["n_routed_experts"]
            for proj, g in _HF_EXPERT_TO_GGUF.items():
                names = [f"{p}mlp.experts.{e}.{proj}.weight" for e in range(n_exp)]
                shape = (n_exp, *tensors[names[0]].shape)
                yield f"blk.{i}.{g}.weight", shape, lambda names=names: np.stack([_np(tensors[n]) for n in names])


def _split_kv_b(w: np.ndarray, h: int, n: int, v: int):
    kv = w.reshape(h, n + v, w.shape[-1])
    return (np.ascontiguousarray(kv[:, :n].transpose(0, 2, 1)),  # attn_k_b (H, C, N)
            np.ascontiguousarray(kv[:, n:]))                       # attn_v_b (H, V, C)


def _thunk(t):
    return lambda: _np(t)


def _layout(shape: tuple[int, ...], qtype: str):
    """(numpy dtype, shape, bytes) of the encoded tensor as written."""
    if qtype == "F32":
        return np.dtype(np.float32), shape, 4 * int(np.prod(shape))
    if qtype == "F16":
        return np.dtype(np.float16), shape, 2 * int(np.prod(shape))
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    row = shape[-1] // block * size
    return np.dtype(np.uint8), (*shape[:-1], row), int(np.prod(shape[:-1])) * row


def _np(t) -> np.ndarray:
    if isinstance(t, Lazy):
        return np.asarray(t.make(), np.float32)
    return t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)


def _encode(a: np.ndarray, qtype: str):
    raw = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return np.ascontiguousarray(a, np.float32)
    if qtype == "F16":
        return a.astype(np.float16)
    if qtype in _OUR_QUANTS:
        rows = a.reshape(-1, a.shape[-1])
        return ggml_quantize(rows, _OUR_QUANTS[qtype])
    return gguf.quants.quantize(a, raw)

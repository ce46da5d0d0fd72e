"""A DeepSeek-V2-Lite-shaped deepseek2 GGUF with random weights, quantized by llama.cpp
(scripts/make_synthetic_gguf.py; the file the llama.cpp comparison runs on).

Real V2-Lite layer shapes (hidden 2048, 16 heads, kv_lora_rank 512, no query compression, expert
width 1408, top-6 routing, 2 shared experts, one leading dense layer of width 10944, vocabulary 102400),
written in F16 by hetero_rt's GGUF writer, then quantized with llama_cpp.llama_model_quantize (Q4_K_M
by default; the F16 file is deleted afterwards unless keep_f16).

Two defaults differ from a real V2-Lite, on purpose:
- 27 layers: llama.cpp runs deepseek2 files without query compression only when they have 26 or 27
  layers (it detects "lite" models by layer count), so fewer layers would not load there;
- 16 routed experts per layer instead of 64, so that the file is ~3 GB and builds in a few minutes on
  a small machine. Decode reads the top-6 experts of each layer either way; 64 experts give the
  full-size model (~9 GB at Q4_K_M, ~31 GB of F16 on the way).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ..checkpoint.gguf_write import Lazy, write_gguf
from ..checkpoint.names import hf_tensor_shapes
from ..checkpoint.tokenizer_builder import build_tokenizer
from ..config import ModelArgs

FTYPES = {"Q4_K_M": 15, "Q4_K_S": 14, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7, "F16": 1, "Q2_K": 10, "Q3_K_M": 12,
          "IQ4_XS": 30}


def v2_lite_config(layers: int, experts: int) -> dict:
    return dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                moe_intermediate_size=1408, num_hidden_layers=layers, num_attention_heads=16, q_lora_rank=None,
                kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                n_routed_experts=experts, num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
                moe_layer_freq=1, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                norm_topk_prob=False, routed_scaling_factor=1.0, rms_norm_eps=1e-6, rope_theta=10000.0,
                max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def lazy_tensors(args: ModelArgs, seed: int) -> dict[str, Lazy]:
    """Random weights, made one tensor at a time: N(0, 1/fan_in) matrices, norms near 1."""
    out = {}
    for k, (name, (_, shape)) in enumerate(hf_tensor_shapes(args).items()):
        def make(shape=shape, k=k, name=name):
            rng = np.random.default_rng([seed, k])
            if len(shape) == 1:
                return (1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
            scale = 1.0 if "embed_tokens" in name else 1 / np.sqrt(shape[-1])
            return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
        out[name] = Lazy(shape, make)
    return out


def make(out: Path, layers: int = 27, experts: int = 16, qtype: str = "Q4_K_M", threads: int = 0, seed: int = 0,
         keep_f16: bool = False) -> int:
    """Writes `out`; returns the exit status (2 without llama-cpp-python, 1 when quantizing failed)."""
    try:
        import llama_cpp  # optional: the `llama` extra
    except ImportError:
        print("make_synthetic_gguf: needs llama-cpp-python (pip install '.[llama]')", file=sys.stderr)
        return 2
    cfg = v2_lite_config(layers, experts)
    args = ModelArgs.from_dict(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok_dir = out.parent / (out.stem + ".tokenizer")
    tok_dir.mkdir(exist_ok=True)
    build_tokenizer(tok_dir, 2048)
    f16 = out.with_suffix(".f16.gguf") if qtype != "F16" else out
    t0 = time.perf_counter()
    write_gguf(f16, {**cfg, "_name": "synthetic DeepSeek-V2-Lite-shaped"}, lazy_tensors(args, seed),
               types="F16", tokenizer_dir=tok_dir)
    print(f"wrote {f16} ({f16.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if qtype == "F16":
        return 0
    t0 = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params)
    if rc != 0:
        print(f"llama_model_quantize failed ({rc})", file=sys.stderr)
        return 1
    print(f"quantized to {qtype}: {out} ({out.stat().st_size / 2**30:.2f} GiB) in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if not keep_f16:
        f16.unlink()
    return 0

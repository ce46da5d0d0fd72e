"""Synthetic DeepSeek-V3-architecture checkpoints in the real Hugging Face format (config.json,
sharded safetensors with model.safetensors.index.json, tokenizer.json, tokenizer_config.json),
written without transformers, for the demo, benchmarks and tests.

Weights are random but well scaled (linear weights std 1/sqrt(fan_in), norms ~1, a non-zero
correction bias) so that activations stay O(1) and routing is far from uniform. Tensors are
generated in layer order and streamed into pre-planned shards: writing holds one tensor in RAM.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import NamedTuple

import torch

from ..config import ModelArgs
from .names import hf_tensor_shapes, is_fp8_weight
from .safetensors import DTYPES, INDEX_FILE, SCALE_SUFFIX, quantize_fp8_block
from .tokenizer_builder import build_tokenizer

DEMO_TAG = "demo-v3-3"  # bump when the demo's config, weights or tokenizer files change
_PRESETS = {
    # 263M parameters, 527 MB in bf16 (checkpoint_size): the real DeepSeek-V3 structure (MLA with
    # q_lora, YaRN, sigmoid noaux_tc routing in 8 groups, a dense first layer, 1 shared expert), scaled
    # down; 3 MoE layers of 64 experts hold 86% of the bytes, as the routed experts do in V3.
    "demo": dict(vocab_size=2048, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=384,
                 num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=16, n_routed_experts=64,
                 num_experts_per_tok=6, n_group=8, topk_group=4, n_shared_experts=1, q_lora_rank=384,
                 kv_lora_rank=256, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                 max_position_embeddings=4096,
                 rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                               "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=8,
                 num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, q_lora_rank=48,
                 kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                 max_position_embeddings=512, rope_scaling=None),
}
# The keys of DeepSeek-V3's own config.json that do not vary between the presets.
_COMMON = dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], num_key_value_heads=None,
               routed_scaling_factor=2.5, topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1,
               norm_topk_prob=True, hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False,
               rope_theta=10000.0, bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=0, ep_size=1,
               attention_bias=False, attention_dropout=0.0, initializer_range=0.02, use_cache=True,
               aux_loss_alpha=0.001, seq_aux=True,
               torch_dtype="bfloat16")
_FP8_BLOCK = 128  # weight_block_size [128, 128] of DeepSeek's fp8 release
_TORCH = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def synthetic_config(preset: str = "demo", **overrides) -> dict:
    """A DeepSeek-V3 config.json dict: the preset ("demo" 527 MB in bf16, "tiny" 0.8 MB for tests) with
    overrides applied; num_key_value_heads always follows num_attention_heads (MLA)."""
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(_PRESETS)}")
    cfg = {**_COMMON, **_PRESETS[preset], **overrides}
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    return cfg


def checkpoint_size(config: dict, dtype: str = "bfloat16") -> tuple[int, int]:
    """(parameters, bytes of safetensors data) of the checkpoint write_synthetic_checkpoint would write."""
    shapes = hf_tensor_shapes(ModelArgs.from_dict(config, source="synthetic config"))
    shapes = {n: v for n, v in shapes.items() if not n.endswith(SCALE_SUFFIX)}   # _stored adds the scales
    params = sum(math.prod(s) for _, s in shapes.values())
    return params, sum(_nbytes(t) for name, (_, shape) in shapes.items() for t in _stored(name, shape, dtype))


def write_synthetic_checkpoint(out_dir: str | Path, config: dict, *, seed: int = 0, dtype: str = "bfloat16",
                               shard_bytes: int | None = 256 << 20, tokenizer: bool = True) -> Path:
    """Write the checkpoint into out_dir (replaced if present) and return it. dtype: bfloat16 |
    float32 | fp8 (DeepSeek's e4m3 weights with 128x128 block scales; embeddings, norms, gate and
    lm_head stay bf16). Tensor data larger than shard_bytes: model-0000K-of-0000N.safetensors +
    model.safetensors.index.json, each shard at most shard_bytes unless one tensor is larger; else
    (or shard_bytes None) one model.safetensors. Tensors are generated layer by layer and streamed
    to disk one at a time, so any size can be written with little RAM. The same seed gives the same
    bytes. The directory appears only once complete (written under a per-process temporary name, then
    renamed over any existing out_dir)."""
    if dtype not in ("bfloat16", "float32", "fp8"):
        raise ValueError(f"dtype must be bfloat16, float32 or fp8, got {dtype!r}")
    out_dir = Path(out_dir)
    config = dict(config, torch_dtype="float32" if dtype == "float32" else "bfloat16")
    if dtype == "fp8":
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    args = ModelArgs.from_dict(config, source="synthetic config")
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _write_weights(tmp, args, seed, dtype, shard_bytes or math.inf)
        if tokenizer:
            build_tokenizer(tmp, args.vocab_size, model_max_length=args.max_position_embeddings)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def ensure_demo_checkpoint(cache_dir: Path | None = None) -> Path:
    """The demo checkpoint in the cache ($HETERO_RT_CACHE or ~/.cache/hetero_rt), built on first use."""
    root = Path(cache_dir or os.environ.get("HETERO_RT_CACHE") or Path.home() / ".cache" / "hetero_rt")
    path = root / DEMO_TAG
    if not (path / "config.json").is_file():  # the directory only ever appears complete
        try:
            write_synthetic_checkpoint(path, synthetic_config("demo"), seed=0, dtype="bfloat16")
        except OSError:
            if not (path / "config.json").is_file():  # else: another process finished it first
                raise
    return path


def _write_weights(out: Path, args: ModelArgs, seed: int, dtype: str, shard_bytes: float) -> None:
    """Plan the shards from the shapes, then generate the tensors in layer order and stream each into
    its shard as it is made: RAM holds one tensor, whatever the checkpoint's size."""
    shards = _plan_shards(args, dtype, shard_bytes)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    gen = torch.Generator().manual_seed(seed)
    for file, shard in zip(files, shards):
        _write_shard(out / file, shard, gen, dtype)
    if len(shards) > 1:
        weight_map = {t.name: file for file, shard in zip(files, shards) for _, _, stored in shard for t in stored}
        total = sum(_nbytes(t) for shard in shards for _, _, stored in shard for t in stored)
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=1))


class _Stored(NamedTuple):
    name: str
    dtype: str               # safetensors dtype string
    shape: tuple[int, ...]


# [(HF weight name, its shape, the tensors stored for it: the weight, and its scale_inv for fp8)] per shard
_Shard = list[tuple[str, tuple[int, ...], list[_Stored]]]


def _plan_shards(args: ModelArgs, dtype: str, shard_bytes: float) -> list[_Shard]:
    """Weights in layer order, a new shard whenever the next weight (with its scale) would overflow."""
    shards: list[_Shard] = [[]]
    size = 0
    for name, (_, shape) in hf_tensor_shapes(args).items():
        if name.endswith(SCALE_SUFFIX):
            continue   # _stored adds each weight's scale
        stored = _stored(name, shape, dtype)
        nbytes = sum(_nbytes(t) for t in stored)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, stored))
        size += nbytes
    return shards


def _stored(name: str, shape: tuple[int, ...], dtype: str) -> list[_Stored]:
    """What the checkpoint holds for one HF weight in this dtype."""
    if name.endswith("correction_bias"):
        return [_Stored(name, "F32", shape)]
    if dtype == "fp8" and is_fp8_weight(name, shape):
        scale = (math.ceil(shape[0] / _FP8_BLOCK), math.ceil(shape[1] / _FP8_BLOCK))
        return [_Stored(name, "F8_E4M3", shape), _Stored(name + SCALE_SUFFIX, "F32", scale)]
    return [_Stored(name, "F32" if dtype == "float32" else "BF16", shape)]


def _nbytes(t: _Stored) -> int:
    return math.prod(t.shape) * DTYPES[t.dtype].itemsize


def _write_shard(file: Path, shard: _Shard, gen: torch.Generator, dtype: str) -> None:
    """safetensors layout: u64 header length, JSON header (padded to 8 bytes), then the tensors' bytes
    back to back in header order; each tensor is generated, checked against the plan and written."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for _, _, stored in shard:
        for t in stored:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + _nbytes(t)]}
            offset += _nbytes(t)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, stored in shard:
            made = _make(name, shape, gen, dtype)
            for t in stored:
                tensor = made[t.name]
                if tensor.dtype != DTYPES[t.dtype] or tuple(tensor.shape) != t.shape:
                    raise AssertionError(f"{file}: tensor '{t.name}' made as {tensor.dtype} {list(tensor.shape)}, "
                                         f"planned {t.dtype} {list(t.shape)}")
                f.write(tensor.contiguous().view(torch.uint8).numpy().data)


def _make(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: str) -> dict[str, torch.Tensor]:
    if name.endswith("correction_bias"):
        return {name: 0.1 * torch.randn(shape, generator=gen)}
    if len(shape) == 1:  # norms
        t = 1 + 0.1 * torch.randn(shape, generator=gen)
    elif "embed_tokens" in name:
        t = torch.randn(shape, generator=gen)
    else:
        t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    if dtype == "fp8" and is_fp8_weight(name, shape):
        w, scale = quantize_fp8_block(t, _FP8_BLOCK)
        return {name: w, name + SCALE_SUFFIX: scale}
    return {name: t.to(torch.bfloat16 if dtype == "fp8" else _TORCH[dtype])}

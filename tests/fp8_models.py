"""Checkpoint copies for the loader tests, and DeepSeek's block-FP8 layout written independently of
hetero_rt (quant.fp8): quantize, dequantize, and a checkpoint pair (FP8 as released, and the same
weights dequantized to fp32) for the FP8 tests."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def copy_ckpt(src: Path, dst: Path, tensors: dict | None = None, config: dict | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else load_file(src / "model.safetensors"), dst / "model.safetensors")
    cfg = config if config is not None else json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def fp8_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's format, written independently of the library: per 128x128 block scale = amax/448,
    stored as weight_scale_inv; dequant = fp8 * scale_inv."""
    rows, cols = w.shape
    br, bc = math.ceil(rows / block), math.ceil(cols / block)
    scale = torch.empty(br, bc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(br):
        for j in range(bc):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    s = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:q.shape[0], :q.shape[1]]
    return q.float() * s


def fp8_checkpoints(src: Path, out: Path) -> tuple[Path, Path]:
    """The HF checkpoint at src laid out as the official block-FP8 releases (every 2-D weight but the
    embedding, lm_head and router as F8_E4M3 + weight_scale_inv, quantization_config set) in out/fp8,
    and the same weights dequantized back to fp32 in out/deq."""
    fp8, deq = {}, {}
    for name, t in load_file(src / "model.safetensors").items():
        if t.dim() == 2 and "embed" not in name and "lm_head" not in name and ".gate.weight" not in name:
            q, s = fp8_quantize(t)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            deq[name] = fp8_dequantize(q, s)
        else:
            fp8[name] = deq[name] = t
    cfg = json.loads((src / "config.json").read_text())
    deq_dir = copy_ckpt(src, out / "deq", deq, cfg)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    return copy_ckpt(src, out / "fp8", fp8, cfg), deq_dir

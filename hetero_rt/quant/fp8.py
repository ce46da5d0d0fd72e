"""DeepSeek's block-scaled FP8 weights: e4m3 values with one fp32 scale per 128x128 block
(`weight_scale_inv`; dequantized weight = fp8 * scale). Weights placed with `format: float8_e4m3`
stay in this form on their device and are expanded only while a matmul uses them.

Legend: O output rows, I input columns, R = ceil(O/128), C = ceil(I/128).
"""
from __future__ import annotations

import math

import numpy as np
import torch

FP8_MAX = 448.0
BLOCK = 128
ROW_CHUNK = 8 * BLOCK   # dequantize this many rows at a time: bounds the fp32 temporary


def quantize(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w (O, I) -> (fp8 (O, I), scale_inv (R, C) fp32), scale = amax/448 per block."""
    if w.dim() != 2:
        raise ValueError(f"fp8 block quantization expects a 2-D weight (O, I), got shape {tuple(w.shape)}")
    out_features, in_features = w.shape
    rb, cb = math.ceil(out_features / block), math.ceil(in_features / block)
    padded = torch.zeros(rb * block, cb * block, dtype=torch.float32, device=w.device)
    padded[:out_features, :in_features] = w.float()
    blocks = padded.view(rb, block, cb, block)                                   # (R, b, C, b)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)          # (R, C)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(rb * block, cb * block)[:out_features, :in_features]
    return q.to(torch.float8_e4m3fn).contiguous(), scale


def dequantize(w: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
               block: int = BLOCK) -> torch.Tensor:
    """fp8 (O, I) x scale_inv (R, C) -> (O, I) in dtype, on w's device, ROW_CHUNK rows at a time."""
    check_scale_shape(w, scale_inv, block)
    out_features, in_features = w.shape
    out = torch.empty((out_features, in_features), dtype=dtype, device=w.device)
    cols = scale_inv.to(w.device, torch.float32).repeat_interleave(block, dim=1)[:, :in_features]  # (R, I)
    for r0 in range(0, out_features, ROW_CHUNK):
        r1 = min(r0 + ROW_CHUNK, out_features)
        s = cols[r0 // block:(r1 + block - 1) // block].repeat_interleave(block, dim=0)[:r1 - r0]  # (rows, I)
        out[r0:r1] = (w[r0:r1].float() * s).to(dtype)
    return out


def check_scale_shape(w: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> None:
    if w.dim() != 2:
        raise ValueError(f"fp8 block dequantization expects a 2-D weight (O, I), got shape {tuple(w.shape)}")
    expected = (math.ceil(w.shape[0] / block), math.ceil(w.shape[1] / block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight shape {tuple(w.shape)}: "
                         f"expected {expected} for {block}x{block} blocks")


def materialize(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a dense matrix in dtype: FP8 parameters (carrying `.scale_inv`) are expanded."""
    if w.dtype == torch.float8_e4m3fn:
        return dequantize(w, w.scale_inv, dtype)
    stored = getattr(w, "stored", None)
    if stored is not None:  # a GGUF weight kept in its stored format (kernels.stored)
        return stored.dequantize().to(dtype)
    return w


# --- the CPU kernels' row layout (quant.ggml format "float8_e4m3") ------------------------------
# Each row a run of 132-byte blocks: the fp32 scale of the 128x128 block the 128 values lie in,
# then those 128 e4m3 bytes. The kernels read a row as one stream, as for the ggml formats; the
# scale is repeated for each of a block's 128 rows (3% over the stored bytes).
PACKED_BLOCK = 4 + BLOCK


def pack(w, scale_inv, out=None):
    """fp8 (O, I) (torch float8_e4m3fn, or its bytes as uint8) and scale_inv (R, C) -> uint8
    (O, I // 128 * 132), written into `out` (a numpy uint8 array of that shape) when given."""
    w = w.view(torch.uint8) if isinstance(w, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(w))
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"fp8 rows for the CPU kernels must be whole {BLOCK}-value blocks; got shape {tuple(w.shape)}")
    rows, cols = w.shape
    nb = cols // BLOCK
    check_scale_shape(w, scale_inv)
    if out is None:
        out = np.empty((rows, nb * PACKED_BLOCK), np.uint8)
    dst = out.reshape(rows, nb, PACKED_BLOCK)
    scales = scale_inv.to(torch.float32).contiguous().numpy()                 # (R, C)
    dst[:, :, :4] = np.repeat(scales, BLOCK, axis=0)[:rows].reshape(rows, nb, 1).view(np.uint8)
    dst[:, :, 4:] = w.numpy().reshape(rows, nb, BLOCK)
    return out


def unpack(raw) -> torch.Tensor:
    """pack's bytes (O, I // 128 * 132) -> the dequantized weight (O, I) in fp32."""
    raw = np.ascontiguousarray(raw).view(np.uint8)
    rows, nb = raw.shape[0], raw.shape[1] // PACKED_BLOCK
    blocks = raw.reshape(rows, nb, PACKED_BLOCK)
    scale = torch.from_numpy(np.ascontiguousarray(blocks[:, :, :4]).view(np.float32))        # (O, nb, 1)
    q = torch.from_numpy(np.ascontiguousarray(blocks[:, :, 4:])).view(torch.float8_e4m3fn).float()
    return (q * scale).reshape(rows, nb * BLOCK)

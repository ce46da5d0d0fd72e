"""Weight formats read in place by the numba expert kernels: fp32, bf16, fp16, the GGUF block
formats Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS with ggml's byte layouts, and
DeepSeek's block FP8 (quant.fp8) as rows of 128-value blocks.

Every format is stored as raw bytes: a weight (R, C) is a uint8 array (R, C // block * block_bytes),
each row a run of blocks (fp formats: block of 1 element). `gguf.quants.dequantize` is the reference
for the block formats; gguf's numpy quantizers cover Q8_0/Q4_0 but not the K-quants, so simple
reference quantizers for Q4_K/Q5_K/Q6_K live here (plain min/max fits, not llama.cpp's search).

Layouts (bytes per block; d, dmin fp16; q unsigned unless noted):
  Q8_0  32 elts, 34 B : d, int8 q[32]                            x = d * q
  Q4_0  32 elts, 18 B : d, nibbles qs[16] (lo: elts 0-15, hi: 16-31)   x = d * (q - 8)
  Q5_0  32 elts, 22 B : d, uint32 qh (bit j = 5th bit of elt j), nibbles qs[16] as Q4_0
                        x = d * (q - 16); llama.cpp's Q4_K_M uses it where rows are not 256-blocks
  Q4_1  32 elts, 20 B : d, m, nibbles qs[16] as Q4_0                  x = d * q + m
  Q5_1  32 elts, 24 B : d, m, uint32 qh, nibbles qs[16] as Q5_0        x = d * q + m
                        (llama.cpp's K-quant mixes use both for rows that are not 256-blocks)
  Q4_K 256 elts, 144 B: d, dmin, scales[12] (8 x 6-bit sc, m), qs[128]  x = d*sc_j*q - dmin*m_j
  Q5_K 256 elts, 176 B: d, dmin, scales[12], qh[32] (bit j = 5th bit of sub-block j), qs[128]
  Q6_K 256 elts, 210 B: ql[128], qh[64], int8 scales[16] (per 16 elts), d   x = d*sc*(q - 32)
  Q2_K 256 elts, 84 B : scales[16] (lo nibble sc, hi nibble m, per 16 elts), qs[64] (2-bit), d, dmin
                        elt 128h + 32s + l = bits 2s of qs[32h + l]; x = d*sc*q - dmin*m
  Q3_K 256 elts, 110 B: hmask[32], qs[64] (2-bit, as Q2_K), scales[12] (16 x 6-bit, minus 32), d
                        q = low 2 bits | bit (4h + s) of hmask[l] << 2, x = d*sc*(q - 4)
  IQ4_XS 256 elts, 136 B: d, uint16 scales_h, scales_l[4] (8 x 6-bit, minus 32, per 32 elts),
                        nibbles qs[128] (sub-block j: qs[16j..16j+15] as Q4_0), x = d*sc*KVALUES[q]
  float8_e4m3 128 elts, 132 B: fp32 scale (the 128x128 block's weight_scale_inv), e4m3 q[128]
                        x = scale * q; built from DeepSeek's (weight, weight_scale_inv) by quant.fp8.pack
Legend: R rows, C columns, NB blocks per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

QK_K = 256


@dataclass(frozen=True)
class Format:
    name: str
    code: int          # the kernels' switch value
    block: int         # elements per block
    block_bytes: int   # bytes per block

    def row_bytes(self, cols: int) -> int:
        self.check_cols(cols)
        return cols // self.block * self.block_bytes

    def cols(self, row_bytes: int) -> int:
        if row_bytes % self.block_bytes:
            raise ValueError(f"{self.name}: {row_bytes} bytes per row is not a whole number of "
                             f"{self.block_bytes}-byte blocks")
        return row_bytes // self.block_bytes * self.block

    def check_cols(self, cols: int) -> None:
        if cols % self.block:
            raise ValueError(f"{self.name}: rows of {cols} elements are not a multiple of the "
                             f"format's block of {self.block}")


# The kernels' switch values, one per format (kernels.dot and kernels.dequant import them).
FP32, BF16, FP16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, Q5_0, Q2_K, Q3_K, IQ4_XS, FP8, Q4_1, Q5_1 = range(15)
FORMATS = {f.name: f for f in [
    Format("fp32", FP32, 1, 4), Format("bf16", BF16, 1, 2), Format("fp16", FP16, 1, 2),
    Format("q8_0", Q8_0, 32, 34), Format("q4_0", Q4_0, 32, 18),
    Format("q4_k", Q4_K, QK_K, 144), Format("q5_k", Q5_K, QK_K, 176), Format("q6_k", Q6_K, QK_K, 210),
    Format("q5_0", Q5_0, 32, 22), Format("q2_k", Q2_K, QK_K, 84), Format("q3_k", Q3_K, QK_K, 110),
    Format("iq4_xs", IQ4_XS, QK_K, 136), Format("float8_e4m3", FP8, 128, 132), Format("q4_1", Q4_1, 32, 20),
    Format("q5_1", Q5_1, 32, 24)]}
QUANT_FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs",
                 "float8_e4m3")
# ggml type name -> our format, for every ggml type the kernels read in place (GGUF readers ask here).
GGML_TYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0",
              "Q5_1": "q5_1", "Q2_K": "q2_k", "Q3_K": "q3_k", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k", "IQ4_XS": "iq4_xs"}
# safetensors dtype -> our format, for the stored dtypes the kernels read as stored (F8_E4M3: with its
# `weight_scale_inv` beside it, repacked at load by quant.fp8.pack).
SAFETENSORS_TYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F8_E4M3": "float8_e4m3"}


def stored_format(dtype: str, shape: tuple[int, ...]) -> str | None:
    """The format the CPU kernels read a checkpoint tensor of this stored dtype (a ggml type name of a
    GGUF, or a safetensors dtype) and shape in, or None: not a kernel format, or rows that are not
    whole blocks of it."""
    name = GGML_TYPES.get(dtype) or SAFETENSORS_TYPES.get(dtype)
    if name is None or not shape or shape[-1] % FORMATS[name].block:
        return None
    return name


def stored_bytes(fmt: str, shape: tuple[int, ...]) -> int:
    """Bytes a weight of this shape takes in format fmt (rows of whole blocks)."""
    rows = 1
    for n in shape[:-1]:
        rows *= n
    return rows * get_format(fmt).row_bytes(shape[-1])


# IQ4_NL / IQ4_XS's 16 non-uniform levels (ggml's kvalues_iq4nl).
KVALUES_IQ4 = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


_DTYPE_FORMATS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def format_of_dtype(dtype: torch.dtype) -> str:
    """The format name of weights held as a torch tensor of this dtype."""
    try:
        return _DTYPE_FORMATS[dtype]
    except KeyError:
        raise ValueError(f"no weight format for torch dtype {dtype}; expected one of "
                         f"{', '.join(map(str, _DTYPE_FORMATS))}") from None


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown weight format {name!r}; expected one of {sorted(FORMATS)}") from None


# --- quantize: float (R, C) -> uint8 (R, row_bytes) -------------------------------------------

def quantize(w: np.ndarray, fmt: str) -> np.ndarray:
    f = get_format(fmt)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize expects a 2-D weight (R, C), got shape {w.shape}")
    f.check_cols(w.shape[1])
    if fmt == "fp32":
        return w.view(np.uint8)
    if fmt == "fp16":
        return w.astype(np.float16).view(np.uint8)
    if fmt in ("bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"):
        qt = getattr(gguf.GGMLQuantizationType, fmt.upper())
        return np.ascontiguousarray(gguf.quants.quantize(w, qt)).view(np.uint8)
    if fmt == "float8_e4m3":
        from . import fp8
        q, scale_inv = fp8.quantize(torch.from_numpy(w))
        return fp8.pack(q, scale_inv)
    blocks = w.reshape(-1, QK_K)
    out = {"q4_k": _quantize_q4_k, "q5_k": _quantize_q5_k, "q6_k": _quantize_q6_k, "q2_k": _quantize_q2_k,
           "q3_k": _quantize_q3_k, "iq4_xs": _quantize_iq4_xs}[fmt](blocks)
    return out.reshape(w.shape[0], -1)


def dequantize(raw: np.ndarray, fmt: str) -> np.ndarray:
    """uint8 (R, row_bytes) -> fp32 (R, C); gguf's numpy dequantizers for the block formats."""
    f = get_format(fmt)
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if fmt == "fp32":
        return raw.view(np.float32).copy()
    if fmt == "fp16":
        return raw.view(np.float16).astype(np.float32)
    if fmt == "bf16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if fmt == "float8_e4m3":
        from . import fp8
        return fp8.unpack(raw).numpy()
    qt = getattr(gguf.GGMLQuantizationType, fmt.upper())
    rows = raw.shape[0]
    return gguf.quants.dequantize(raw, qt).reshape(rows, f.cols(raw.shape[1])).astype(np.float32)


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _safe_inv(v: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(v == 0, 0.0, 1.0 / np.where(v == 0, 1.0, v)).astype(np.float32)


def _kquant_scales(blocks: np.ndarray, levels: int):
    """Asymmetric fit per 32-element sub-block: x ~ d*sc*q - dmin*m, sc, m 6-bit, q in [0, levels]."""
    nb = blocks.shape[0]
    sub = blocks.reshape(nb, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)                   # (NB, 8) <= 0
    hi = sub.max(axis=-1)
    scale = (hi - lo) / levels                               # per sub-block step
    mins = -lo                                               # subtracted offset >= 0
    d = (scale.max(axis=-1) / 63).astype(np.float16).astype(np.float32)     # (NB,)
    dmin = (mins.max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale * _safe_inv(d)[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(mins * _safe_inv(dmin)[:, None]), 0, 63).astype(np.uint8)
    step = d[:, None] * sc                                   # (NB, 8) effective scales
    off = dmin[:, None] * m
    q = np.clip(np.rint((sub + off[..., None]) * _safe_inv(step)[..., None]), 0, levels).astype(np.uint8)
    return d, dmin, sc, m, q                                 # q (NB, 8, 32)


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Inverse of gguf Q4_K.get_scale_min: 8 six-bit scales and mins -> 12 bytes."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return out


def _nibbles(q: np.ndarray) -> np.ndarray:
    """q (NB, 8, 32) in 0..15 -> (NB, 128): sub-block 2p in the low nibbles of bytes 32p..32p+31."""
    pairs = q.reshape(q.shape[0], 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _kquant_scales(blocks, 15)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scales(sc, m), _nibbles(q)], axis=1)


def _quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _kquant_scales(blocks, 31)
    high = (q >> 4) & 1                                      # (NB, 8, 32): bit j of qh[l] for sub-block j
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scales(sc, m), qh, _nibbles(q & 15)],
                          axis=1)


def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    sub = blocks.reshape(nb, 16, 16)
    amax = np.abs(sub).max(axis=-1)                          # (NB, 16)
    scale = amax / 31
    d = (scale.max(axis=-1) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale * _safe_inv(d)[:, None]), -128, 127).astype(np.int8)
    step = d[:, None] * sc
    q = (np.clip(np.rint(sub * _safe_inv(step)[..., None]), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(nb, 2, 4, 32)                              # (NB, half, k, l): element 128h + 32k + l
    ql = np.zeros((nb, 2, 64), dtype=np.uint8)
    ql[:, :, 0:32] = (q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4)
    ql[:, :, 32:64] = (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)
    qh = np.zeros((nb, 2, 32), dtype=np.uint8)
    for k in range(4):
        qh |= (q[:, :, k] >> 4) << (2 * k)
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), _fp16_bytes(d)], axis=1)


def _sub_blocks(blocks: np.ndarray, size: int) -> np.ndarray:
    return blocks.reshape(blocks.shape[0], QK_K // size, size)


def _pack_2bit(q: np.ndarray) -> np.ndarray:
    """q (NB, 256) in 0..3 -> qs (NB, 64): element 128h + 32s + l in bits 2s of byte 32h + l."""
    q = q.reshape(q.shape[0], 2, 4, 32)
    out = np.zeros((q.shape[0], 2, 32), np.uint8)
    for s in range(4):
        out |= q[:, :, s] << (2 * s)
    return out.reshape(q.shape[0], 64)


def _quantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    """Asymmetric fit per 16 elements: x ~ d*sc*q - dmin*m, sc, m 4-bit, q 2-bit."""
    sub = _sub_blocks(blocks, 16)
    lo = np.minimum(sub.min(axis=-1), 0.0)
    scale, mins = (sub.max(axis=-1) - lo) / 3, -lo
    d = (scale.max(axis=-1) / 15).astype(np.float16).astype(np.float32)
    dmin = (mins.max(axis=-1) / 15).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scale * _safe_inv(d)[:, None]), 0, 15).astype(np.uint8)
    m = np.clip(np.rint(mins * _safe_inv(dmin)[:, None]), 0, 15).astype(np.uint8)
    step, off = d[:, None] * sc, dmin[:, None] * m
    q = np.clip(np.rint((sub + off[..., None]) * _safe_inv(step)[..., None]), 0, 3).astype(np.uint8)
    return np.concatenate([sc | (m << 4), _pack_2bit(q.reshape(-1, QK_K)), _fp16_bytes(d), _fp16_bytes(dmin)],
                          axis=1)


def _signed_scales(sub: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """(d (NB,) fp16-rounded, sc (NB, S) 6-bit signed ints): per sub-block the step that maps its
    largest-magnitude element to `level` (the sign included, as llama.cpp's fits do, so scales of
    both signs occur), written as d * sc with one d per block."""
    idx = np.abs(sub).argmax(axis=-1)[..., None]
    step = np.take_along_axis(sub, idx, axis=-1)[..., 0] / level        # (NB, S)
    d = (np.abs(step).max(axis=-1) / 31).astype(np.float16).astype(np.float32)
    return d, np.clip(np.rint(step * _safe_inv(d)[:, None]), -32, 31)


def _quantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """Symmetric fit per 16 elements: x ~ d*sc*q, sc 6-bit signed, q in -4..3."""
    nb = blocks.shape[0]
    sub = _sub_blocks(blocks, 16)
    d, sc = _signed_scales(sub, -4.0)                           # (NB,), (NB, 16)
    sc = sc.astype(np.int8)
    q = np.clip(np.rint(sub * _safe_inv(d[:, None] * sc)[..., None]), -4, 3).astype(np.int8) + 4
    q = q.astype(np.uint8).reshape(nb, QK_K)
    high = (q >> 2).reshape(nb, 8, 32)                          # element 32i + l -> bit i of hmask[l]
    hmask = np.zeros((nb, 32), np.uint8)
    for i in range(8):
        hmask |= high[:, i] << i
    u = (sc.astype(np.int16) + 32).astype(np.uint8)              # (NB, 16) in 0..63
    scales = np.zeros((nb, 12), np.uint8)
    for j in range(16):
        scales[:, j % 8] |= (u[:, j] & 15) << (4 * (j // 8))
        scales[:, 8 + j % 4] |= (u[:, j] >> 4) << (2 * (j // 4))
    return np.concatenate([hmask, _pack_2bit(q & 3), scales, _fp16_bytes(d)], axis=1)


def _quantize_iq4_xs(blocks: np.ndarray) -> np.ndarray:
    """Per 32 elements a 6-bit signed scale, each element the nearest of the 16 KVALUES_IQ4 levels."""
    nb = blocks.shape[0]
    sub = _sub_blocks(blocks, 32)
    d, ls = _signed_scales(sub, -127.0)                         # (NB,), (NB, 8)
    ls = ls.astype(np.int16)
    dl = d[:, None] * ls                                         # (NB, 8)
    levels = dl[..., None, None] * KVALUES_IQ4.astype(np.float32)  # (NB, 8, 1, 16)
    q = np.abs(sub[..., None] - levels).argmin(axis=-1).astype(np.uint8)   # (NB, 8, 32)
    qs = (q[:, :, :16] | (q[:, :, 16:] << 4)).reshape(nb, 128)
    u = (ls + 32).astype(np.uint16)
    scales_h = np.zeros(nb, np.uint16)
    scales_l = np.zeros((nb, 4), np.uint8)
    for j in range(8):
        scales_h |= (u[:, j] >> 4) << (2 * j)
        scales_l[:, j // 2] |= (u[:, j] & 15).astype(np.uint8) << (4 * (j % 2))
    return np.concatenate([_fp16_bytes(d), scales_h.reshape(-1, 1).view(np.uint8), scales_l, qs], axis=1)

"""Row-chunk decoders: turn `n` weights of one row, starting at column c0, from their stored bytes
into fp32 in a small caller-owned buffer (L1-resident). The matmul kernels call these on one tile
at a time, so no dequantized copy of an expert ever exists in memory.

Format codes and byte layouts: hetero_rt.quant.ggml. c0 and n are multiples of the format's block
(the caller walks rows in CHUNK-column steps; CHUNK is a multiple of every block size).
Legend: RB bytes per row.
"""
from __future__ import annotations

import numpy as np
from numba import njit

CHUNK = 256
FP32, BF16, FP16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K = range(8)


@njit(inline="always", cache=True)
def _f16(row, i, lut):
    return lut[np.int64(row[i]) | (np.int64(row[i + 1]) << 8)]


@njit(inline="always", cache=True)
def _k_scale_min(row, base, j):
    """6-bit scale and min of sub-block j (0..7) from the 12 bytes at row[base:]."""
    if j < 4:
        return np.float32(row[base + j] & 63), np.float32(row[base + 4 + j] & 63)
    sc = (row[base + 4 + j] & 15) | ((row[base + j - 4] >> 6) << 4)
    mn = (row[base + 4 + j] >> 4) | ((row[base + j] >> 6) << 4)
    return np.float32(sc), np.float32(mn)


@njit(fastmath=True, cache=True)
def decode_chunk(fmt, row, c0, n, out, lut):
    """row (RB,) uint8 -> out[:n] fp32 = weights c0 .. c0+n-1 of the row."""
    if fmt == FP32:
        src = row.view(np.float32)
        for k in range(n):
            out[k] = src[c0 + k]
    elif fmt == BF16:
        src16 = row.view(np.uint16)
        outu = out.view(np.uint32)
        for k in range(n):
            outu[k] = np.uint32(src16[c0 + k]) << 16
    elif fmt == FP16:
        src16 = row.view(np.uint16)
        for k in range(n):
            out[k] = lut[src16[c0 + k]]
    elif fmt == Q8_0:
        for b in range(n // 32):
            base = (c0 // 32 + b) * 34
            d = _f16(row, base, lut)
            for k in range(32):
                out[b * 32 + k] = d * np.float32(np.int8(row[base + 2 + k]))
    elif fmt == Q4_0:
        for b in range(n // 32):
            base = (c0 // 32 + b) * 18
            d = _f16(row, base, lut)
            for k in range(16):
                q = row[base + 2 + k]
                out[b * 32 + k] = d * np.float32(np.int32(q & 15) - 8)
                out[b * 32 + 16 + k] = d * np.float32(np.int32(q >> 4) - 8)
    elif fmt == Q4_K or fmt == Q5_K:
        for b in range(n // 256):
            base = (c0 // 256 + b) * (144 if fmt == Q4_K else 176)
            d = _f16(row, base, lut)
            dmin = _f16(row, base + 2, lut)
            qs = base + 16 if fmt == Q4_K else base + 48
            for j in range(8):
                sc, mn = _k_scale_min(row, base + 4, j)
                dj = d * sc
                mj = dmin * mn
                shift = 4 * (j & 1)
                src = qs + 32 * (j >> 1)
                o = b * 256 + 32 * j
                if fmt == Q4_K:
                    for k in range(32):
                        out[o + k] = dj * np.float32((row[src + k] >> shift) & 15) - mj
                else:
                    for k in range(32):
                        q = ((row[src + k] >> shift) & 15) | (((row[base + 16 + k] >> j) & 1) << 4)
                        out[o + k] = dj * np.float32(q) - mj
    elif fmt == Q6_K:
        for b in range(n // 256):
            base = (c0 // 256 + b) * 210
            d = _f16(row, base + 208, lut)
            for h in range(2):
                for kk in range(4):
                    ql = base + h * 64 + (kk & 1) * 32
                    qh = base + 128 + h * 32
                    lshift = 4 * (kk >> 1)
                    o = b * 256 + h * 128 + kk * 32
                    for half in range(2):
                        s = d * np.float32(np.int8(row[base + 192 + (h * 128 + kk * 32 + half * 16) // 16]))
                        for k in range(half * 16, half * 16 + 16):
                            q = ((row[ql + k] >> lshift) & 15) | (((row[qh + k] >> (2 * kk)) & 3) << 4)
                            out[o + k] = s * np.float32(np.int32(q) - 32)

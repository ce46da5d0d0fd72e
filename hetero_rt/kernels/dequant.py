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
FP32, BF16, FP16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, Q5_0 = range(9)


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
    """row (RB,) uint8 -> out[:n] fp32 = weights c0 .. c0+n-1 of the row.
    Loops index slices from 0 (never c0 + k): numba then drops its negative-index wraparound and
    LLVM vectorizes them."""
    if fmt == FP32:
        src = row.view(np.float32)[c0:c0 + n]
        for k in range(n):
            out[k] = src[k]
    elif fmt == BF16:
        src16 = row.view(np.uint16)[c0:c0 + n]
        outu = out.view(np.uint32)
        for k in range(n):
            outu[k] = np.uint32(src16[k]) << 16
    elif fmt == FP16:
        src16 = row.view(np.uint16)[c0:c0 + n]
        for k in range(n):
            out[k] = lut[src16[k]]
    elif fmt == Q8_0:
        for b in range(n // 32):
            blk = row[(c0 // 32 + b) * 34:(c0 // 32 + b + 1) * 34]
            o = out[b * 32:b * 32 + 32]
            d = _f16(blk, 0, lut)
            q = blk[2:34].view(np.int8)
            for k in range(32):
                o[k] = d * np.float32(q[k])
    elif fmt == Q4_0:
        for b in range(n // 32):
            blk = row[(c0 // 32 + b) * 18:(c0 // 32 + b + 1) * 18]
            o = out[b * 32:b * 32 + 32]
            d = _f16(blk, 0, lut)
            qs = blk[2:18]
            for k in range(16):
                o[k] = d * np.float32(np.int32(qs[k] & 15) - 8)
                o[16 + k] = d * np.float32(np.int32(qs[k] >> 4) - 8)
    elif fmt == Q5_0:
        for b in range(n // 32):
            blk = row[(c0 // 32 + b) * 22:(c0 // 32 + b + 1) * 22]
            o = out[b * 32:b * 32 + 32]
            d = _f16(blk, 0, lut)
            qh = np.uint32(blk[2]) | (np.uint32(blk[3]) << 8) | (np.uint32(blk[4]) << 16) | (np.uint32(blk[5]) << 24)
            qs = blk[6:22]
            for k in range(16):
                lo = np.int32(qs[k] & 15) | np.int32(((qh >> np.uint32(k)) & np.uint32(1)) << np.uint32(4))
                hi = np.int32(qs[k] >> 4) | np.int32(((qh >> np.uint32(k + 16)) & np.uint32(1)) << np.uint32(4))
                o[k] = d * np.float32(lo - 16)
                o[16 + k] = d * np.float32(hi - 16)
    elif fmt == Q4_K or fmt == Q5_K:
        size = 144 if fmt == Q4_K else 176
        for b in range(n // 256):
            blk = row[(c0 // 256 + b) * size:(c0 // 256 + b + 1) * size]
            d = _f16(blk, 0, lut)
            dmin = _f16(blk, 2, lut)
            qh = blk[16:48]
            for j in range(8):
                sc, mn = _k_scale_min(blk, 4, j)
                dj = d * sc
                mj = dmin * mn
                shift = np.uint8(4 * (j & 1))
                start = (16 if fmt == Q4_K else 48) + 32 * (j >> 1)
                qs = blk[start:start + 32]
                o = out[b * 256 + 32 * j:b * 256 + 32 * j + 32]
                if fmt == Q4_K:
                    for k in range(32):
                        o[k] = dj * np.float32((qs[k] >> shift) & np.uint8(15)) - mj
                else:
                    hb = np.uint8(j)
                    for k in range(32):
                        q = ((qs[k] >> shift) & np.uint8(15)) | (((qh[k] >> hb) & np.uint8(1)) << np.uint8(4))
                        o[k] = dj * np.float32(q) - mj
    elif fmt == Q6_K:
        for b in range(n // 256):
            blk = row[(c0 // 256 + b) * 210:(c0 // 256 + b + 1) * 210]
            d = _f16(blk, 208, lut)
            scales = blk[192:208].view(np.int8)
            for h in range(2):
                qh = blk[128 + h * 32:160 + h * 32]
                for kk in range(4):
                    ql = blk[h * 64 + (kk & 1) * 32:h * 64 + (kk & 1) * 32 + 32]
                    lshift = np.uint8(4 * (kk >> 1))
                    hshift = np.uint8(2 * kk)
                    o = out[b * 256 + h * 128 + kk * 32:b * 256 + h * 128 + kk * 32 + 32]
                    s0 = d * np.float32(scales[h * 8 + kk * 2])
                    s1 = d * np.float32(scales[h * 8 + kk * 2 + 1])
                    for k in range(16):
                        q = ((ql[k] >> lshift) & np.uint8(15)) | (((qh[k] >> hshift) & np.uint8(3)) << np.uint8(4))
                        o[k] = s0 * np.float32(np.int32(q) - 32)
                    for k in range(16, 32):
                        q = ((ql[k] >> lshift) & np.uint8(15)) | (((qh[k] >> hshift) & np.uint8(3)) << np.uint8(4))
                        o[k] = s1 * np.float32(np.int32(q) - 32)

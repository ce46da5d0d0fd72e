"""Tile decoder: turn `n` weights of some rows, starting at column c0, from their stored bytes into
fp32 in a small caller-owned buffer (cache-resident). The matmul kernels call it on one tile at a
time, so no dequantized copy of an expert ever exists in memory.

Format codes and byte layouts: hetero_rt.quant.ggml. c0 and n are multiples of the format's block
(the caller walks rows in CHUNK-column steps; CHUNK is a multiple of every block size).
Legend: RB bytes per row.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..quant.ggml import (BF16, FP8, FP16, FP32, IQ4_XS, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1,  # noqa: F401
                          Q5_K, Q6_K, Q8_0)

from .dot import FP8_UNIT, KV_IQ4, _i8, f16_at, f32_at, iq4_xs_scale, k_scale_min, q3_k_scale
from .intrinsics import e4m3_to_f32, f16_to_f32, f32_from_bits, opaque, q3_to_f32, q5_to_f32, q6_to_f32, u8_to_f32

CHUNK = 256
U = np.uint64
F0 = np.float32(0.0)


@njit(fastmath=True, cache=True)
def decode_tile(fmt, w, r0, rows, c0, n, out):
    """out[r, :n] = weights c0 .. c0+n-1 of stored row r0 + r of w (2-D uint8, rows of RB bytes), as
    fp32, for r < rows; out any 2-D fp32 array of at least (rows, n).
    Written as the fused dots of kernels.dot are (see there): uint64 offsets into whole rows, no
    per-block views, sub-byte fields unpacked on 8-bit integers, so every inner loop vectorizes
    (per-block slices and views ran the decoders at 1-2 G weights/s per core)."""
    if fmt == FP32 or fmt == BF16 or fmt == FP16:
        for r in range(rows):
            o = out[r]
            row = w[r0 + r]
            if fmt == FP32:
                src = row.view(np.float32)
                for k in range(n):
                    o[U(k)] = src[U(c0 + k)]
            elif fmt == BF16:
                src16 = row.view(np.uint16)
                for k in range(n):
                    o[U(k)] = f32_from_bits(np.uint32(src16[U(c0 + k)]) << np.uint32(16))
            else:
                src16 = row.view(np.uint16)
                for k in range(n):
                    o[U(k)] = f16_to_f32(src16[U(c0 + k)])
        return
    for r in range(rows):
        row = w[r0 + r]
        o = out[r]
        if fmt == Q8_0:
            qi = row.view(np.int8)
            for b in range(n // 32):
                src, dst = U(34 * (c0 // 32 + b)), U(32 * b)
                d = f16_at(row, src)
                for k in range(opaque(32)):
                    o[dst + U(k)] = d * np.float32(qi[src + U(2 + k)])
        elif fmt == Q4_0:
            for b in range(n // 32):
                src, dst = U(18 * (c0 // 32 + b)), U(32 * b)
                d = f16_at(row, src)
                for k in range(opaque(16)):
                    q = row[src + U(2 + k)]
                    o[dst + U(k)] = d * (u8_to_f32(q, 0, 15) - np.float32(8.0))
                    o[dst + U(16 + k)] = d * (u8_to_f32(q, 4, 15) - np.float32(8.0))
        elif fmt == Q4_1:
            for b in range(n // 32):
                src, dst = U(20 * (c0 // 32 + b)), U(32 * b)
                d, m = f16_at(row, src), f16_at(row, src + U(2))
                for k in range(opaque(16)):
                    q = row[src + U(4 + k)]
                    o[dst + U(k)] = d * u8_to_f32(q, 0, 15) + m
                    o[dst + U(16 + k)] = d * u8_to_f32(q, 4, 15) + m
        elif fmt == Q5_0 or fmt == Q5_1:
            for b in range(n // 32):
                size, shift = (22, 0) if fmt == Q5_0 else (24, 2)   # Q5_1: d, m, then Q5_0's qh and qs
                blk = U(size * (c0 // 32 + b))
                d = f16_at(row, blk)
                off, m = (16, F0) if fmt == Q5_0 else (0, f16_at(row, blk + U(2)))
                src, dst = blk + U(shift), U(32 * b)
                qh = (np.uint32(row[src + U(2)]) | (np.uint32(row[src + U(3)]) << np.uint32(8))
                      | (np.uint32(row[src + U(4)]) << np.uint32(16)) | (np.uint32(row[src + U(5)]) << np.uint32(24)))
                for k in range(opaque(16)):
                    q = row[src + U(6 + k)]
                    lo = np.int32(q & 15) | np.int32(((qh >> np.uint32(k)) & np.uint32(1)) << np.uint32(4))
                    hi = np.int32(q >> 4) | np.int32(((qh >> np.uint32(k + 16)) & np.uint32(1)) << np.uint32(4))
                    o[dst + U(k)] = d * np.float32(lo - off) + m
                    o[dst + U(16 + k)] = d * np.float32(hi - off) + m
        elif fmt == Q4_K or fmt == Q5_K:
            size = 144 if fmt == Q4_K else 176
            for b in range(n // 256):
                src, dst = U(size * (c0 // 256 + b)), U(256 * b)
                d = f16_at(row, src)
                dmin = f16_at(row, src + U(2))
                hq = src + U(16)
                for j in range(8):
                    sc, mn = k_scale_min(row, src + U(4), j)
                    dj, mj = d * sc, dmin * mn
                    q = src + U((16 if fmt == Q4_K else 48) + 32 * (j >> 1))
                    oj = dst + U(32 * j)
                    if fmt == Q4_K:
                        for k in range(32):
                            o[oj + U(k)] = dj * u8_to_f32(row[q + U(k)], 4 * (j & 1), 15) - mj
                    else:
                        for k in range(32):
                            o[oj + U(k)] = dj * q5_to_f32(row[q + U(k)], row[hq + U(k)], 4 * (j & 1), j) - mj
        elif fmt == Q2_K or fmt == Q3_K:   # element 128h + 32s + l, as in kernels.dot._dot_q2_k / _dot_q3_k
            size = 84 if fmt == Q2_K else 110
            for b in range(n // 256):
                src, dst = U(size * (c0 // 256 + b)), U(256 * b)
                for h in range(2):
                    q = src + U((16 if fmt == Q2_K else 32) + 32 * h)
                    for s in range(4):
                        for half in range(2):
                            j = 8 * h + 2 * s + half
                            oo, qo = dst + U(128 * h + 32 * s + 16 * half), q + U(16 * half)
                            if fmt == Q2_K:
                                sm = row[src + U(j)]
                                dj = f16_at(row, src + U(80)) * u8_to_f32(sm, 0, 15)
                                mj = f16_at(row, src + U(82)) * u8_to_f32(sm, 4, 15)
                                for l in range(opaque(16)):
                                    o[oo + U(l)] = dj * u8_to_f32(row[qo + U(l)], 2 * s, 3) - mj
                            else:
                                dj = f16_at(row, src + U(108)) * q3_k_scale(row, src + U(96), j)
                                ho = src + U(16 * half)
                                for l in range(opaque(16)):
                                    o[oo + U(l)] = dj * q3_to_f32(row[qo + U(l)], row[ho + U(l)], 2 * s, 4 * h + s)
        elif fmt == IQ4_XS:
            for b in range(n // 256):
                src, dst = U(136 * (c0 // 256 + b)), U(256 * b)
                d = f16_at(row, src)
                for j in range(8):
                    dj = d * iq4_xs_scale(row, src, j)
                    q, oj = src + U(8 + 16 * j), dst + U(32 * j)
                    for k in range(opaque(16)):
                        v = row[q + U(k)]
                        o[oj + U(k)] = dj * KV_IQ4[v & 15]
                        o[oj + U(16 + k)] = dj * KV_IQ4[v >> 4]
        elif fmt == FP8:
            for b in range(n // 128):
                src, dst = U(132 * (c0 // 128 + b)), U(128 * b)
                d = f32_at(row, src) * FP8_UNIT
                for k in range(opaque(128)):
                    o[dst + U(k)] = d * e4m3_to_f32(row[src + U(4 + k)])
        else:  # Q6_K: element 128h + 32kk + l, as in kernels.dot._dot_q6_k
            for b in range(n // 256):
                src, dst = U(210 * (c0 // 256 + b)), U(256 * b)
                d = f16_at(row, src + U(208))
                for h in range(2):
                    lq, hq = src + U(64 * h), src + U(128 + 32 * h)
                    for kk in range(4):
                        q = lq + U(32 * (kk & 1))
                        s0 = d * _i8(row[src + U(192 + 8 * h + 2 * kk)])
                        s1 = d * _i8(row[src + U(192 + 8 * h + 2 * kk + 1)])
                        oo = dst + U(128 * h + 32 * kk)
                        for l in range(opaque(16)):
                            o[oo + U(l)] = s0 * q6_to_f32(row[q + U(l)], row[hq + U(l)], 4 * (kk >> 1), 2 * kk)
                        for l in range(16, 16 + opaque(16)):
                            o[oo + U(l)] = s1 * q6_to_f32(row[q + U(l)], row[hq + U(l)], 4 * (kk >> 1), 2 * kk)

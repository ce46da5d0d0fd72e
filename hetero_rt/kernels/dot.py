"""Fused row dots for decode: dot(stored row, x) computed straight from the row's bytes, every
format, fp32 activations. Nothing is written back: each block is decoded into registers and
multiplied with x (L1-resident; the same x serves every row of a matrix).

How they stay vectorized (rates per core: scripts/bench_experts.py --dot-rates):
  - indexes are uint64 offsets into the whole row (no per-block slices or views: building a numba
    array per 32 weights cost more than the block's FMAs; unsigned: no negative-index wraparound);
  - each inner loop is a plain reduction of <= 32 steps with several independent sums (two blocks
    of Q8_0/Q4_0 per step, the eight sub-blocks of a K-quant block together), so LLVM vectorizes it;
  - 4- to 6-bit weights are unpacked on 8-bit integers (hetero_rt.kernels.intrinsics);
  - block scales are applied once per block: for Q4_0/Q4_K/Q5_K,
    sum_k (d*sc*q_k - m) * x_k = d*sc * sum_k q_k x_k - m * xs, xs = sum_k x_k per 32 columns,
    computed once per activation row (block_sums).
Results equal dequantize-then-dot up to fp32 summation order.
Legend: C columns (elements per row), RB bytes per row, NB blocks per row.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..quant.ggml import (BF16, FP8, FP16, FP32, IQ4_XS, KVALUES_IQ4, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K,  # noqa: F401
                          Q5_0, Q5_1, Q5_K, Q6_K, Q8_0)

from .intrinsics import (e4m3_to_f32, f16_to_f32, f32_from_bits, iq4_xs_dot_i8, mac_i32, opaque, prefetch,
                         q2_k_dot_i8, q3_k_dot_i8, q3_to_f32, q4_0_dot_i8, q4_to_i32, q4_k_dot_i8, q5_0_dot_i8,
                         q5_k_dot_i8, q5_to_f32, q6_k_dot_i8, q6_to_f32, q8_0_dot_i8, u8_to_f32)

U = np.uint64
F0 = np.float32(0.0)
AHEAD = U(2048)   # software prefetch distance in bytes along the row stream


@njit(inline="always", cache=True)
def f16_at(row, i):
    """fp16 stored little-endian at row[i], i uint64."""
    return f16_to_f32(np.uint16(np.uint16(row[i]) | (np.uint16(row[i + U(1)]) << np.uint16(8))))


@njit(inline="always", cache=True)
def k_scale_min(row, base, j):
    """6-bit scale and min of K-quant sub-block j (0..7) from the 12 bytes at row[base:] (base uint64)."""
    if j < 4:
        return np.float32(row[base + U(j)] & 63), np.float32(row[base + U(4 + j)] & 63)
    sc = (row[base + U(4 + j)] & 15) | ((row[base + U(j - 4)] >> 6) << 4)
    mn = (row[base + U(4 + j)] >> 4) | ((row[base + U(j)] >> 6) << 4)
    return np.float32(sc), np.float32(mn)


@njit(nogil=True, fastmath=True, cache=True)
def block_sums(x, xs):
    """xs[b] = sum of x[32b:32b+32]; x (C,), xs (C // 32,)."""
    for b in range(xs.shape[0]):
        s = F0
        for k in range(32):
            s += x[U(32 * b + k)]
        xs[b] = s


@njit(inline="always", cache=True)
def _prefetch_ahead(row, o, nbytes):
    """Prefetch the lines of row[o + AHEAD : o + AHEAD + nbytes] (nbytes: what one step reads)."""
    for c in range(0, nbytes, 64):
        prefetch(row, o + AHEAD + U(c))


@njit(inline="always", cache=True)
def _fp_at(fmt, w32, w16, i):
    """Weight i of an fp32/bf16/fp16 row (views w32, w16 of its bytes), i uint64."""
    if fmt == FP32:
        return w32[i]
    if fmt == BF16:
        return f32_from_bits(np.uint32(w16[i]) << np.uint32(16))
    return f16_to_f32(w16[i])


@njit(nogil=True, fastmath=True, cache=True)
def _dot_fp(fmt, row, x):
    """fp32/bf16/fp16 in 128-column steps, each prefetching its lines AHEAD bytes in advance (more
    misses in flight than the hardware prefetcher alone keeps for one core); the step's trip count
    is opaque so LLVM vectorizes the inner loop instead of unrolling it."""
    s = F0
    n, size = x.shape[0], 4 if fmt == FP32 else 2
    w32 = row[:4 * n if fmt == FP32 else 0].view(np.float32)      # only the view of this format is used
    w16 = row[:0 if fmt == FP32 else 2 * n].view(np.uint16)
    step = opaque(128)
    for c in range(0, n - 127, 128):
        _prefetch_ahead(row, U(c * size), 128 * size)
        t = F0
        if fmt == FP32:                 # one loop per format: no branch inside the vector loop
            for k in range(step):
                t += w32[U(c + k)] * x[U(c + k)]
        elif fmt == BF16:
            for k in range(step):
                t += f32_from_bits(np.uint32(w16[U(c + k)]) << np.uint32(16)) * x[U(c + k)]
        else:
            for k in range(step):
                t += f16_to_f32(w16[U(c + k)]) * x[U(c + k)]
        s += t
    for k in range(n - n % 128, n):
        s += _fp_at(fmt, w32, w16, U(k)) * x[k]
    return s


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q8_0(row, x):
    qi = row.view(np.int8)
    nb = x.shape[0] // 32
    s0 = s1 = F0
    for b in range(0, nb - 1, 2):            # two blocks per step: two independent sums
        o, xo = U(34 * b), U(32 * b)
        _prefetch_ahead(row, o, 68)
        t0 = t1 = F0
        for k in range(32):
            t0 += np.float32(qi[o + U(2 + k)]) * x[xo + U(k)]
            t1 += np.float32(qi[o + U(36 + k)]) * x[xo + U(32 + k)]
        s0 += f16_at(row, o) * t0
        s1 += f16_at(row, o + U(34)) * t1
    if nb % 2:
        o, xo = U(34 * (nb - 1)), U(32 * (nb - 1))
        t0 = F0
        for k in range(32):
            t0 += np.float32(qi[o + U(2 + k)]) * x[xo + U(k)]
        s0 += f16_at(row, o) * t0
    return s0 + s1


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q4_0(row, x, xs):
    """Q4_0 weight = d * (q - 8): d * (sum q x - 8 * xs)."""
    nb = x.shape[0] // 32
    s0 = s1 = F0
    for b in range(0, nb - 1, 2):
        o, xo = U(18 * b + 2), U(32 * b)
        _prefetch_ahead(row, o, 36)
        t0 = t1 = F0
        for k in range(16):
            q0, q1 = row[o + U(k)], row[o + U(18 + k)]
            t0 += u8_to_f32(q0, 0, 15) * x[xo + U(k)] + u8_to_f32(q0, 4, 15) * x[xo + U(16 + k)]
            t1 += u8_to_f32(q1, 0, 15) * x[xo + U(32 + k)] + u8_to_f32(q1, 4, 15) * x[xo + U(48 + k)]
        s0 += f16_at(row, o - U(2)) * (t0 - np.float32(8.0) * xs[b])
        s1 += f16_at(row, o + U(16)) * (t1 - np.float32(8.0) * xs[b + 1])
    if nb % 2:
        b = nb - 1
        o, xo = U(18 * b + 2), U(32 * b)
        t0 = F0
        for k in range(16):
            q0 = row[o + U(k)]
            t0 += u8_to_f32(q0, 0, 15) * x[xo + U(k)] + u8_to_f32(q0, 4, 15) * x[xo + U(16 + k)]
        s0 += f16_at(row, o - U(2)) * (t0 - np.float32(8.0) * xs[b])
    return s0 + s1


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q4_1(row, x, xs):
    """Q4_1 weight = d * q + m (d at 0, m at 2, nibbles at 4): d * sum q x + m * xs."""
    s = F0
    for b in range(x.shape[0] // 32):
        o, xo = U(20 * b), U(32 * b)
        _prefetch_ahead(row, o, 20)
        t = F0
        for k in range(16):
            q = row[o + U(4 + k)]
            t += u8_to_f32(q, 0, 15) * x[xo + U(k)] + u8_to_f32(q, 4, 15) * x[xo + U(16 + k)]
        s += f16_at(row, o) * t + f16_at(row, o + U(2)) * xs[b]
    return s


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q5_1(row, x, xs):
    """Q5_1 weight = d * q + m, q as Q5_0's with the block shifted by 2 bytes (d, m, qh at 4, qs at 8)."""
    s = F0
    for b in range(x.shape[0] // 32):
        o, xo = U(24 * b), U(32 * b)
        _prefetch_ahead(row, o, 24)
        s += f16_at(row, o) * _q5_0_block(row, o + U(2), x, xo) + f16_at(row, o + U(2)) * xs[b]
    return s


@njit(inline="always", cache=True)
def _q5_0_qh(row, o):
    """The 32 fifth bits of the Q5_0 block at row[o:] (bytes 2..5, little-endian) as uint32."""
    return (np.uint32(row[o + U(2)]) | (np.uint32(row[o + U(3)]) << np.uint32(8))
            | (np.uint32(row[o + U(4)]) << np.uint32(16)) | (np.uint32(row[o + U(5)]) << np.uint32(24)))


@njit(inline="always", cache=True)
def _bit16(qh, m):
    """16.0 where qh has any bit of mask m set, else 0: the fifth bit of a Q5_0 weight as a value.
    With m = 1 << k over a loop on k, LLVM vectorizes it as an AND with a constant vector and a
    select, where extracting bit k by a shift of k was scalar."""
    return np.float32(16.0) if qh & m else F0


@njit(inline="always", cache=True)
def _q5_0_block(row, o, x, xo):
    """sum over the 32 weights of the Q5_0 block at row[o:] of q * x (q = 0..31, unscaled)."""
    qh = _q5_0_qh(row, o)
    t = F0
    for k in range(16):          # fully unrolled on purpose: LLVM then vectorizes the bit selects
        q = row[o + U(6 + k)]
        m = np.uint32(1) << np.uint32(k)
        t += ((u8_to_f32(q, 0, 15) + _bit16(qh, m)) * x[xo + U(k)]
              + (u8_to_f32(q, 4, 15) + _bit16(qh, m << np.uint32(16))) * x[xo + U(16 + k)])
    return t


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q5_0(row, x, xs):
    """Q5_0 weight = d * (q - 16), q = nibble + 16 * (bit k or k + 16 of the block's uint32 qh):
    d * (sum q x - 16 * xs); two blocks per step (two independent sums)."""
    nb = x.shape[0] // 32
    s0 = s1 = F0
    for b in range(0, nb - 1, 2):
        o, xo = U(22 * b), U(32 * b)
        _prefetch_ahead(row, o, 44)
        s0 += f16_at(row, o) * (_q5_0_block(row, o, x, xo) - np.float32(16.0) * xs[b])
        s1 += f16_at(row, o + U(22)) * (_q5_0_block(row, o + U(22), x, xo + U(32)) - np.float32(16.0) * xs[b + 1])
    if nb % 2:
        o, xo = U(22 * (nb - 1)), U(32 * (nb - 1))
        s0 += f16_at(row, o) * (_q5_0_block(row, o, x, xo) - np.float32(16.0) * xs[nb - 1])
    return s0 + s1


@njit(inline="always", cache=True)
def _k_combine(row, o, xs, xb, t0, t1, t2, t3, t4, t5, t6, t7):
    """d * sum_j sc_j t_j - dmin * sum_j m_j xs_j for one Q4_K/Q5_K block at row[o:]."""
    so = o + U(4)
    sc, m = k_scale_min(row, so, 0)
    acc, mm = sc * t0, m * xs[xb]
    sc, m = k_scale_min(row, so, 1)
    acc += sc * t1
    mm += m * xs[xb + 1]
    sc, m = k_scale_min(row, so, 2)
    acc += sc * t2
    mm += m * xs[xb + 2]
    sc, m = k_scale_min(row, so, 3)
    acc += sc * t3
    mm += m * xs[xb + 3]
    sc, m = k_scale_min(row, so, 4)
    acc += sc * t4
    mm += m * xs[xb + 4]
    sc, m = k_scale_min(row, so, 5)
    acc += sc * t5
    mm += m * xs[xb + 5]
    sc, m = k_scale_min(row, so, 6)
    acc += sc * t6
    mm += m * xs[xb + 6]
    sc, m = k_scale_min(row, so, 7)
    acc += sc * t7
    mm += m * xs[xb + 7]
    return f16_at(row, o) * acc - f16_at(row, o + U(2)) * mm


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q4_k(row, x, xs):
    """Sub-block j of a 256 block: nibbles (j & 1) of bytes 16 + 32 (j >> 1) + k."""
    s = F0
    for b in range(x.shape[0] // 256):
        o, xo = U(144 * b), U(256 * b)
        _prefetch_ahead(row, o, 144)
        q = o + U(16)
        t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = F0
        for k in range(32):
            a, c, e, g = row[q + U(k)], row[q + U(32 + k)], row[q + U(64 + k)], row[q + U(96 + k)]
            t0 += u8_to_f32(a, 0, 15) * x[xo + U(k)]
            t1 += u8_to_f32(a, 4, 15) * x[xo + U(32 + k)]
            t2 += u8_to_f32(c, 0, 15) * x[xo + U(64 + k)]
            t3 += u8_to_f32(c, 4, 15) * x[xo + U(96 + k)]
            t4 += u8_to_f32(e, 0, 15) * x[xo + U(128 + k)]
            t5 += u8_to_f32(e, 4, 15) * x[xo + U(160 + k)]
            t6 += u8_to_f32(g, 0, 15) * x[xo + U(192 + k)]
            t7 += u8_to_f32(g, 4, 15) * x[xo + U(224 + k)]
        s += _k_combine(row, o, xs, 8 * b, t0, t1, t2, t3, t4, t5, t6, t7)
    return s


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q5_k(row, x, xs):
    """As Q4_K plus a fifth bit: bit j of qh[k] (bytes 16..47) for sub-block j; nibbles at 48."""
    s = F0
    for b in range(x.shape[0] // 256):
        o, xo = U(176 * b), U(256 * b)
        _prefetch_ahead(row, o, 176)
        hq, q = o + U(16), o + U(48)
        t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = F0
        for k in range(32):
            h = row[hq + U(k)]
            a, c, e, g = row[q + U(k)], row[q + U(32 + k)], row[q + U(64 + k)], row[q + U(96 + k)]
            t0 += q5_to_f32(a, h, 0, 0) * x[xo + U(k)]
            t1 += q5_to_f32(a, h, 4, 1) * x[xo + U(32 + k)]
            t2 += q5_to_f32(c, h, 0, 2) * x[xo + U(64 + k)]
            t3 += q5_to_f32(c, h, 4, 3) * x[xo + U(96 + k)]
            t4 += q5_to_f32(e, h, 0, 4) * x[xo + U(128 + k)]
            t5 += q5_to_f32(e, h, 4, 5) * x[xo + U(160 + k)]
            t6 += q5_to_f32(g, h, 0, 6) * x[xo + U(192 + k)]
            t7 += q5_to_f32(g, h, 4, 7) * x[xo + U(224 + k)]
        s += _k_combine(row, o, xs, 8 * b, t0, t1, t2, t3, t4, t5, t6, t7)
    return s


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q6_k(row, x):
    """Element 128h + 32kk + l: low nibble (kk >> 1) of ql[64h + 32(kk & 1) + l], bits 2kk of
    qh[128 + 32h + l], int8 scale (192 + 8h + 2kk + l // 16), d at 208; weight d * sc * (q - 32)."""
    s = F0
    for b in range(x.shape[0] // 256):
        o = U(210 * b)
        _prefetch_ahead(row, o, 210)
        d = f16_at(row, o + U(208))
        sc = o + U(192)
        for h in range(2):
            lq, hq, xo = o + U(64 * h), o + U(128 + 32 * h), U(256 * b + 128 * h)
            t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = F0
            for l in range(16):
                a, c = row[lq + U(l)], row[lq + U(32 + l)]
                a2, c2 = row[lq + U(16 + l)], row[lq + U(48 + l)]
                hb, hb2 = row[hq + U(l)], row[hq + U(16 + l)]
                t0 += q6_to_f32(a, hb, 0, 0) * x[xo + U(l)]
                t1 += q6_to_f32(a2, hb2, 0, 0) * x[xo + U(16 + l)]
                t2 += q6_to_f32(c, hb, 0, 2) * x[xo + U(32 + l)]
                t3 += q6_to_f32(c2, hb2, 0, 2) * x[xo + U(48 + l)]
                t4 += q6_to_f32(a, hb, 4, 4) * x[xo + U(64 + l)]
                t5 += q6_to_f32(a2, hb2, 4, 4) * x[xo + U(80 + l)]
                t6 += q6_to_f32(c, hb, 4, 6) * x[xo + U(96 + l)]
                t7 += q6_to_f32(c2, hb2, 4, 6) * x[xo + U(112 + l)]
            si = sc + U(8 * h)
            acc = (_i8(row[si]) * t0 + _i8(row[si + U(1)]) * t1 + _i8(row[si + U(2)]) * t2
                   + _i8(row[si + U(3)]) * t3 + _i8(row[si + U(4)]) * t4 + _i8(row[si + U(5)]) * t5
                   + _i8(row[si + U(6)]) * t6 + _i8(row[si + U(7)]) * t7)
            s += d * acc
    return s


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q2_k(row, x):
    """Element 128h + 32s + l: bits 2s of qs[32h + l] (qs at 16), sub-block 8h + 2s + l // 16 with
    scale (lo nibble) and min (hi nibble) byte at 8h + 2s + l // 16, d at 80, dmin at 82:
    d * sum_j sc_j sum q x - dmin * sum_j m_j sum x (the x sums per 16 taken in the same loop)."""
    s = F0
    n16 = opaque(16)
    for b in range(x.shape[0] // 256):
        o = U(84 * b)
        _prefetch_ahead(row, o, 84)
        acc = mm = F0
        for h in range(2):
            q, xo = o + U(16 + 32 * h), U(256 * b + 128 * h)
            t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = F0
            u0 = u1 = u2 = u3 = u4 = u5 = u6 = u7 = F0
            for l in range(n16):
                a, c = row[q + U(l)], row[q + U(16 + l)]
                x0, x1 = x[xo + U(l)], x[xo + U(16 + l)]
                x2, x3 = x[xo + U(32 + l)], x[xo + U(48 + l)]
                x4, x5 = x[xo + U(64 + l)], x[xo + U(80 + l)]
                x6, x7 = x[xo + U(96 + l)], x[xo + U(112 + l)]
                t0 += u8_to_f32(a, 0, 3) * x0
                t1 += u8_to_f32(c, 0, 3) * x1
                t2 += u8_to_f32(a, 2, 3) * x2
                t3 += u8_to_f32(c, 2, 3) * x3
                t4 += u8_to_f32(a, 4, 3) * x4
                t5 += u8_to_f32(c, 4, 3) * x5
                t6 += u8_to_f32(a, 6, 3) * x6
                t7 += u8_to_f32(c, 6, 3) * x7
                u0 += x0
                u1 += x1
                u2 += x2
                u3 += x3
                u4 += x4
                u5 += x5
                u6 += x6
                u7 += x7
            si = o + U(8 * h)
            acc += (u8_to_f32(row[si], 0, 15) * t0 + u8_to_f32(row[si + U(1)], 0, 15) * t1
                    + u8_to_f32(row[si + U(2)], 0, 15) * t2 + u8_to_f32(row[si + U(3)], 0, 15) * t3
                    + u8_to_f32(row[si + U(4)], 0, 15) * t4 + u8_to_f32(row[si + U(5)], 0, 15) * t5
                    + u8_to_f32(row[si + U(6)], 0, 15) * t6 + u8_to_f32(row[si + U(7)], 0, 15) * t7)
            mm += (u8_to_f32(row[si], 4, 15) * u0 + u8_to_f32(row[si + U(1)], 4, 15) * u1
                   + u8_to_f32(row[si + U(2)], 4, 15) * u2 + u8_to_f32(row[si + U(3)], 4, 15) * u3
                   + u8_to_f32(row[si + U(4)], 4, 15) * u4 + u8_to_f32(row[si + U(5)], 4, 15) * u5
                   + u8_to_f32(row[si + U(6)], 4, 15) * u6 + u8_to_f32(row[si + U(7)], 4, 15) * u7)
        s += f16_at(row, o + U(80)) * acc - f16_at(row, o + U(82)) * mm
    return s


@njit(inline="always", cache=True)
def q3_k_scale(row, base, j):
    """Signed 6-bit scale of Q3_K sub-block j (0..15) from the 12 bytes at row[base:], as fp32."""
    lo = (row[base + U(j % 8)] >> U(4 * (j // 8))) & 15
    hi = (row[base + U(8 + j % 4)] >> U(2 * (j // 4))) & 3
    return np.float32(np.int32(lo | (hi << 4)) - 32)


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q3_k(row, x):
    """Element 128h + 32s + l: bits 2s of qs[32h + l] (qs at 32) and bit 4h + s of hmask[l] (at 0)
    as the third bit, minus 4; sub-block 8h + 2s + l // 16 (scales at 96); d at 108."""
    s = F0
    n16 = opaque(16)
    for b in range(x.shape[0] // 256):
        o = U(110 * b)
        _prefetch_ahead(row, o, 110)
        acc = F0
        for h in range(2):
            q, xo = o + U(32 + 32 * h), U(256 * b + 128 * h)
            hs = 4 * h
            t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = F0
            for l in range(n16):
                a, c = row[q + U(l)], row[q + U(16 + l)]
                ha, hc = row[o + U(l)], row[o + U(16 + l)]
                t0 += q3_to_f32(a, ha, 0, hs) * x[xo + U(l)]
                t1 += q3_to_f32(c, hc, 0, hs) * x[xo + U(16 + l)]
                t2 += q3_to_f32(a, ha, 2, hs + 1) * x[xo + U(32 + l)]
                t3 += q3_to_f32(c, hc, 2, hs + 1) * x[xo + U(48 + l)]
                t4 += q3_to_f32(a, ha, 4, hs + 2) * x[xo + U(64 + l)]
                t5 += q3_to_f32(c, hc, 4, hs + 2) * x[xo + U(80 + l)]
                t6 += q3_to_f32(a, ha, 6, hs + 3) * x[xo + U(96 + l)]
                t7 += q3_to_f32(c, hc, 6, hs + 3) * x[xo + U(112 + l)]
            sb, j = o + U(96), 8 * h
            acc += (q3_k_scale(row, sb, j) * t0 + q3_k_scale(row, sb, j + 1) * t1
                    + q3_k_scale(row, sb, j + 2) * t2 + q3_k_scale(row, sb, j + 3) * t3
                    + q3_k_scale(row, sb, j + 4) * t4 + q3_k_scale(row, sb, j + 5) * t5
                    + q3_k_scale(row, sb, j + 6) * t6 + q3_k_scale(row, sb, j + 7) * t7)
        s += f16_at(row, o + U(108)) * acc
    return s


KV_IQ4 = KVALUES_IQ4.astype(np.float32)


@njit(inline="always", cache=True)
def iq4_xs_scale(row, o, j):
    """Signed 6-bit scale of IQ4_XS sub-block j (0..7) of the block at row[o:], as fp32."""
    sh = np.uint32(row[o + U(2)]) | (np.uint32(row[o + U(3)]) << np.uint32(8))
    lo = np.uint32((row[o + U(4 + j // 2)] >> U(4 * (j % 2))) & 15)
    hi = (sh >> np.uint32(2 * j)) & np.uint32(3)
    return np.float32(np.int32(lo | (hi << np.uint32(4))) - 32)


@njit(nogil=True, fastmath=True, cache=True)
def _dot_iq4_xs(row, x):
    """Sub-block j: nibbles of qs[16j + k] (qs at 8; lo: element 32j + k, hi: 32j + 16 + k) as
    indexes into KV_IQ4, scaled by d * (6-bit scale - 32)."""
    s = F0
    kv = KV_IQ4
    n16 = opaque(16)
    for b in range(x.shape[0] // 256):
        o = U(136 * b)
        _prefetch_ahead(row, o, 136)
        q, xo = o + U(8), U(256 * b)
        t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = F0
        for k in range(n16):
            q0, q1, q2, q3 = row[q + U(k)], row[q + U(16 + k)], row[q + U(32 + k)], row[q + U(48 + k)]
            q4, q5, q6, q7 = row[q + U(64 + k)], row[q + U(80 + k)], row[q + U(96 + k)], row[q + U(112 + k)]
            t0 += kv[q0 & 15] * x[xo + U(k)] + kv[q0 >> 4] * x[xo + U(16 + k)]
            t1 += kv[q1 & 15] * x[xo + U(32 + k)] + kv[q1 >> 4] * x[xo + U(48 + k)]
            t2 += kv[q2 & 15] * x[xo + U(64 + k)] + kv[q2 >> 4] * x[xo + U(80 + k)]
            t3 += kv[q3 & 15] * x[xo + U(96 + k)] + kv[q3 >> 4] * x[xo + U(112 + k)]
            t4 += kv[q4 & 15] * x[xo + U(128 + k)] + kv[q4 >> 4] * x[xo + U(144 + k)]
            t5 += kv[q5 & 15] * x[xo + U(160 + k)] + kv[q5 >> 4] * x[xo + U(176 + k)]
            t6 += kv[q6 & 15] * x[xo + U(192 + k)] + kv[q6 >> 4] * x[xo + U(208 + k)]
            t7 += kv[q7 & 15] * x[xo + U(224 + k)] + kv[q7 >> 4] * x[xo + U(240 + k)]
        acc = (iq4_xs_scale(row, o, 0) * t0 + iq4_xs_scale(row, o, 1) * t1 + iq4_xs_scale(row, o, 2) * t2
               + iq4_xs_scale(row, o, 3) * t3 + iq4_xs_scale(row, o, 4) * t4 + iq4_xs_scale(row, o, 5) * t5
               + iq4_xs_scale(row, o, 6) * t6 + iq4_xs_scale(row, o, 7) * t7)
        s += f16_at(row, o) * acc
    return s


@njit(inline="always", cache=True)
def f32_at(row, i):
    """fp32 stored little-endian at row[i], i uint64."""
    return f32_from_bits(np.uint32(row[i]) | (np.uint32(row[i + U(1)]) << np.uint32(8))
                         | (np.uint32(row[i + U(2)]) << np.uint32(16)) | (np.uint32(row[i + U(3)]) << np.uint32(24)))


FP8_UNIT = np.float32(256.0)   # e4m3_to_f32 returns value / 256


@njit(nogil=True, fastmath=True, cache=True)
def _dot_fp8(row, x):
    """float8_e4m3 rows (quant.fp8.pack): per 128 values, scale * 256 * sum e4m3_to_f32(q) x."""
    s0 = s1 = F0
    n64 = opaque(64)
    for b in range(x.shape[0] // 128):
        o, xo = U(132 * b), U(128 * b)
        _prefetch_ahead(row, o, 132)
        t0 = t1 = F0
        for k in range(n64):
            t0 += e4m3_to_f32(row[o + U(4 + k)]) * x[xo + U(k)]
            t1 += e4m3_to_f32(row[o + U(68 + k)]) * x[xo + U(64 + k)]
        d = f32_at(row, o) * FP8_UNIT
        s0 += d * t0
        s1 += d * t1
    return s0 + s1


@njit(inline="always", cache=True)
def _i8(v):
    """uint8 byte read as int8, as fp32."""
    return np.float32(np.int32(v) - (np.int32(v & 128) << 1))


@njit(nogil=True, fastmath=True, cache=True)
def dot_row(fmt, row, x, xs):
    """dot(weights of the stored row, x): row (RB,) uint8, x (C,) fp32, xs (C // 32,) = block_sums(x)
    (read by Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K only)."""
    if fmt <= FP16:
        return _dot_fp(fmt, row, x)
    if fmt == Q8_0:
        return _dot_q8_0(row, x)
    if fmt == Q4_0:
        return _dot_q4_0(row, x, xs)
    if fmt == Q4_K:
        return _dot_q4_k(row, x, xs)
    if fmt == Q5_K:
        return _dot_q5_k(row, x, xs)
    if fmt == Q5_0:
        return _dot_q5_0(row, x, xs)
    if fmt == Q4_1:
        return _dot_q4_1(row, x, xs)
    if fmt == Q5_1:
        return _dot_q5_1(row, x, xs)
    if fmt == Q2_K:
        return _dot_q2_k(row, x)
    if fmt == Q3_K:
        return _dot_q3_k(row, x)
    if fmt == IQ4_XS:
        return _dot_iq4_xs(row, x)
    if fmt == FP8:
        return _dot_fp8(row, x)
    return _dot_q6_k(row, x)


# --- int8 activations ---------------------------------------------------------------------------
# x is quantized per 32 columns like Q8_0 (xq int8, xd = max|x| / 127 per block), so every product
# of a block is an integer: int32 sums of (small int weight) x (int8 activation), the block scales
# applied once per 32 (Q6_K: 16) products. xs (act_sums_size(C)) holds the quantized rows' block
# sums, xd times the sum of the xq: per 32 first (xs[:C // 32], in place of block_sums(x)), then per
# 16 (xs[C // 32:]); they carry the share of a weight format's offset or min, which does not depend
# on the row, so the row dots need no second integer dot for it.


@njit(cache=True)
def act_sums_size(cols):
    """Length of the int8 activations' sums array xs for rows of cols values: cols // 32 + cols // 16."""
    return cols // 32 + cols // 16


@njit(nogil=True, fastmath=True, cache=True)
def act_sums(xq, xd, xs):
    """xs = the block sums of the int8 activations xq (C,) with scales xd (C // 32,): xs[b] = xd[b] *
    sum of xq[32 b : 32 b + 32], then xs[C // 32 + i] = xd[i // 2] * sum of xq[16 i : 16 i + 16]."""
    n32 = xd.shape[0]
    for b in range(n32):
        o = 32 * b
        lo = 0
        hi = 0
        for k in range(16):
            lo += np.int32(xq[o + k])
            hi += np.int32(xq[o + 16 + k])
        xs[b] = xd[b] * np.float32(lo + hi)
        xs[n32 + 2 * b] = xd[b] * np.float32(lo)
        xs[n32 + 2 * b + 1] = xd[b] * np.float32(hi)


@njit(nogil=True, fastmath=True, cache=True)
def quantize_act(x, xq, xd, xs):
    """x (C,) fp32 -> xq (C,) int8, xd (C // 32,) scales, xs (act_sums_size(C),) their block sums."""
    for b in range(xd.shape[0]):
        o = U(32 * b)
        amax = F0
        for k in range(32):
            amax = max(amax, abs(x[o + U(k)]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d > 0 else F0
        for k in range(32):
            xq[o + U(k)] = np.int32(np.rint(x[o + U(k)] * inv))
        xd[b] = d
    act_sums(xq, xd, xs)


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q8_0_i8(row, xq, xd, xs):
    """The whole row in vector registers: intrinsics.q8_0_dot_i8 (vpdpbusd with VNNI)."""
    return q8_0_dot_i8(row, xq, xd, xs, xq.shape[0] // 32)


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q4_0_i8(row, xq, xd, xs):
    """The whole row in vector registers: intrinsics.q4_0_dot_i8."""
    return q4_0_dot_i8(row, xq, xd, xs, xq.shape[0] // 32)


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q4_k_i8(row, xq, xd, xs):
    """The whole row in vector registers, scales and mins included: intrinsics.q4_k_dot_i8."""
    return q4_k_dot_i8(row, xq, xd, xs, xq.shape[0] // 256)


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q5_k_i8(row, xq, xd, xs):
    """The whole row in vector registers, scales, mins and high bits included: intrinsics.q5_k_dot_i8."""
    return q5_k_dot_i8(row, xq, xd, xs, xq.shape[0] // 256)


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q6_k_i8(row, xq, xd, xs):
    """The whole row in vector registers, the 16 sub-block scales included: intrinsics.q6_k_dot_i8."""
    return q6_k_dot_i8(row, xq, xd, xs, xq.shape[0] // 256)


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q4_1_i8(row, xq, xd, xs):
    """Q4_1 weight = d * q + m: d * xd * sum q xq + m * xs per block."""
    n16 = opaque(16)   # see intrinsics.opaque
    s = F0
    for b in range(xq.shape[0] // 32):
        o, xo = U(20 * b), U(32 * b)
        _prefetch_ahead(row, o, 20)
        t = np.int32(0)
        for k in range(n16):
            q = row[o + U(4 + k)]
            t = mac_i32(mac_i32(t, q4_to_i32(q, 0), xq[xo + U(k)]), q4_to_i32(q, 4), xq[xo + U(16 + k)])
        s += f16_at(row, o) * xd[b] * np.float32(t) + f16_at(row, o + U(2)) * xs[b]
    return s


@njit(inline="always", cache=True)
def _bit16_i(qh, m):
    """16 where qh has any bit of mask m set, else 0 (as _bit16, in int32)."""
    return np.int32(16) if qh & m else np.int32(0)


@njit(inline="always", cache=True)
def _q5_0_block_i8(row, o, xq, xo):
    """sum over the 32 weights of the Q5_0-style block at row[o:] (qh at o + 2, qs at o + 6) of q * xq
    (q = 0..31, unscaled), in int32."""
    qh = _q5_0_qh(row, o)
    t = np.int32(0)
    for k in range(16):
        q = row[o + U(6 + k)]
        m = np.uint32(1) << np.uint32(k)
        t = mac_i32(t, np.int32(q4_to_i32(q, 0) | _bit16_i(qh, m)), xq[xo + U(k)])
        t = mac_i32(t, np.int32(q4_to_i32(q, 4) | _bit16_i(qh, m << np.uint32(16))), xq[xo + U(16 + k)])
    return t


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q5_0_i8(row, xq, xd, xs):
    """The whole row in vector registers: intrinsics.q5_0_dot_i8."""
    return q5_0_dot_i8(row, xq, xd, xs, xq.shape[0] // 32)


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q5_1_i8(row, xq, xd, xs):
    """Q5_1 weight = d * q + m: d * xd * sum q xq + m * xs per block."""
    s = F0
    for b in range(xq.shape[0] // 32):
        o, xo = U(24 * b), U(32 * b)
        _prefetch_ahead(row, o, 24)
        s += (f16_at(row, o) * xd[b] * np.float32(_q5_0_block_i8(row, o + U(2), xq, xo))
              + f16_at(row, o + U(2)) * xs[b])
    return s


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q2_k_i8(row, xq, xd, xs):
    """The whole row in vector registers, scales and mins included: intrinsics.q2_k_dot_i8."""
    return q2_k_dot_i8(row, xq, xd, xs, xq.shape[0] // 256)


@njit(nogil=True, fastmath=True, cache=True)
def _dot_q3_k_i8(row, xq, xd, xs):
    """The whole row in vector registers, the 16 6-bit scales included: intrinsics.q3_k_dot_i8."""
    return q3_k_dot_i8(row, xq, xd, xs, xq.shape[0] // 256)


@njit(nogil=True, fastmath=True, cache=True)
def _dot_iq4_xs_i8(row, xq, xd, xs):
    """The whole row in vector registers, levels looked up by vpshufb: intrinsics.iq4_xs_dot_i8."""
    return iq4_xs_dot_i8(row, xq, xd, xs, xq.shape[0] // 256)


@njit(inline="always", cache=True)
def has_int8_dot(fmt):
    """Whether dot_row_i8 reads this format: every ggml block format (not fp32/bf16/fp16 or block
    FP8, whose rows keep fp32 activations when int8 is asked for)."""
    return fmt > FP16 and fmt != FP8


@njit(nogil=True, fastmath=True, cache=True)
def dot_row_i8(fmt, row, xq, xd, xs):
    """dot(weights of the stored row, x) for the formats of has_int8_dot, with x given as
    quantize_act(x)."""
    if fmt == Q8_0:
        return _dot_q8_0_i8(row, xq, xd, xs)
    if fmt == Q4_0:
        return _dot_q4_0_i8(row, xq, xd, xs)
    if fmt == Q4_K:
        return _dot_q4_k_i8(row, xq, xd, xs)
    if fmt == Q5_K:
        return _dot_q5_k_i8(row, xq, xd, xs)
    if fmt == Q6_K:
        return _dot_q6_k_i8(row, xq, xd, xs)
    if fmt == Q5_0:
        return _dot_q5_0_i8(row, xq, xd, xs)
    if fmt == Q4_1:
        return _dot_q4_1_i8(row, xq, xd, xs)
    if fmt == Q5_1:
        return _dot_q5_1_i8(row, xq, xd, xs)
    if fmt == Q2_K:
        return _dot_q2_k_i8(row, xq, xd, xs)
    if fmt == Q3_K:
        return _dot_q3_k_i8(row, xq, xd, xs)
    if fmt == IQ4_XS:
        return _dot_iq4_xs_i8(row, xq, xd, xs)
    raise ValueError("dot_row_i8: no int8 dot for this format")

"""Routed-experts SwiGLU kernels: y[t] = sum_k w[t,k] * W2_e (silu(W1_e x[t]) * W3_e x[t]), e = ids[t,k].

  1. route: slots (t, k) sorted by expert, so each active expert sees its tokens as one group;
  2. gate+up, parallel over (active expert, tile of I rows); h = silu(g) * u;
  3. down, parallel over tiles of D rows (each task owns its rows of y: no races), looping over
     the active experts: W2 rows times the group's h rows, scaled by w.
Two kernels per step, chosen per expert from its number of tokens (moe_forward):
  - decode (experts with <= DECODE_MAX_TOKENS tokens): each weight row is dotted straight from
    its bytes with the fused per-format dots of hetero_rt.kernels.dot, one sequential stream per
    row, tasks of equal size (rows) split evenly over the threads; nothing is allocated per task;
  - tiled (more tokens): each tile of rows is decoded CHUNK columns at a time into an L1 buffer
    and multiplied with every token of the group, so a weight is read from memory once per call
    however many tokens use it, and each decoded chunk is reused from cache many times.
    (The fused dots re-decode a row per token, from L1; the tiled kernels pay a buffer round trip
    per weight once: an estimate from the per-core rates puts the break-even near 8 tokens.)

All kernels are @njit(nogil=True, cache=True); the parallel ones use prange.
Legend: T tokens, K experts per token, S = T*K slots, U active experts, D hidden, I expert inter,
E experts, RT rows per tile, RB bytes per stored row, n tokens of one expert.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .dequant import CHUNK, decode_chunk
from .dot import Q8_0, block_sums, dot_row, dot_row_i8, quantize_act

DECODE_MAX_TOKENS = 8   # experts with at most this many tokens take the decode kernels
DECODE_ROWS = 32        # weight rows per parallel decode task


@njit(nogil=True, cache=True)
def route(ids, weights, n_experts):
    """ids, weights (T, K) -> slots sorted by expert (stable):
    active (U,) expert ids, offsets (U+1,), slot_token (S,) int64, slot_weight (S,) fp32."""
    t_count, k_count = ids.shape
    counts = np.zeros(n_experts, np.int64)
    for t in range(t_count):
        for k in range(k_count):
            counts[ids[t, k]] += 1
    start = np.zeros(n_experts + 1, np.int64)
    for e in range(n_experts):
        start[e + 1] = start[e] + counts[e]
    fill = start[:-1].copy()
    slot_token = np.empty(t_count * k_count, np.int64)
    slot_weight = np.empty(t_count * k_count, np.float32)
    for t in range(t_count):
        for k in range(k_count):
            e = ids[t, k]
            slot_token[fill[e]] = t
            slot_weight[fill[e]] = weights[t, k]
            fill[e] += 1
    n_active = 0
    for e in range(n_experts):
        n_active += counts[e] > 0
    active = np.empty(n_active, np.int64)
    offsets = np.zeros(n_active + 1, np.int64)
    u = 0
    for e in range(n_experts):
        if counts[e] > 0:
            active[u] = e
            offsets[u + 1] = start[e + 1]
            u += 1
    return active, offsets, slot_token, slot_weight


@njit(nogil=True, fastmath=True, cache=True)
def tile_matmul(fmt, w, r0, rows, x, x_rows, cols, acc, buf, lut):
    """acc[r, j] = dot(w[r0 + r, :cols], x[x_rows[j], :cols]) for r < rows, j < len(x_rows).
    w (R, RB) uint8 stored rows; x (N, cols) fp32; acc (>= rows, n); buf (RT, CHUNK) fp32 scratch."""
    n = x_rows.shape[0]
    acc[:rows, :n] = 0.0
    # decode a (rows x CHUNK) tile once, reuse it for every token
    for c0 in range(0, cols, CHUNK):
        nc = min(CHUNK, cols - c0)
        for r in range(rows):
            decode_chunk(fmt, w[r0 + r], c0, nc, buf[r], lut)
        j = 0
        while j + 2 <= n:  # 4 rows x 2 tokens per pass: 6 loads feed 8 FMAs
            xa = x[x_rows[j], c0:c0 + nc]
            xb = x[x_rows[j + 1], c0:c0 + nc]
            r = 0
            while r + 4 <= rows:
                b0, b1, b2, b3 = buf[r], buf[r + 1], buf[r + 2], buf[r + 3]
                a0 = a1 = a2 = a3 = np.float32(0.0)
                c0_ = c1 = c2 = c3 = np.float32(0.0)
                for k in range(nc):
                    va = xa[k]
                    vb = xb[k]
                    a0 += b0[k] * va
                    a1 += b1[k] * va
                    a2 += b2[k] * va
                    a3 += b3[k] * va
                    c0_ += b0[k] * vb
                    c1 += b1[k] * vb
                    c2 += b2[k] * vb
                    c3 += b3[k] * vb
                acc[r, j] += a0
                acc[r + 1, j] += a1
                acc[r + 2, j] += a2
                acc[r + 3, j] += a3
                acc[r, j + 1] += c0_
                acc[r + 1, j + 1] += c1
                acc[r + 2, j + 1] += c2
                acc[r + 3, j + 1] += c3
                r += 4
            while r < rows:
                b0 = buf[r]
                a0 = c0_ = np.float32(0.0)
                for k in range(nc):
                    a0 += b0[k] * xa[k]
                    c0_ += b0[k] * xb[k]
                acc[r, j] += a0
                acc[r, j + 1] += c0_
                r += 1
            j += 2
        if j < n:  # odd token out
            xr = x[x_rows[j], c0:c0 + nc]
            for r in range(rows):
                b0 = buf[r]
                s0 = np.float32(0.0)
                for k in range(nc):
                    s0 += b0[k] * xr[k]
                acc[r, j] += s0


@njit(nogil=True, parallel=True, fastmath=True, cache=True)
def gate_up(fmt, w1, w3, x, active, starts, ends, slot_token, h, rt, lut):
    """h[s] = silu(W1_e x[t]) * W3_e x[t] for every slot s = (t, e); x (T, D), h (S, I)."""
    inter = w1.shape[1]
    dim = x.shape[1]
    tiles = (inter + rt - 1) // rt
    for task in prange(active.shape[0] * tiles):
        u, tile = task // tiles, task % tiles
        e = active[u]
        r0 = tile * rt
        rows = min(rt, inter - r0)
        toks = slot_token[starts[u]:ends[u]]
        n = toks.shape[0]
        buf = np.empty((rt, CHUNK), np.float32)
        g = np.empty((rt, n), np.float32)
        up = np.empty((rt, n), np.float32)
        tile_matmul(fmt, w1[e], r0, rows, x, toks, dim, g, buf, lut)
        tile_matmul(fmt, w3[e], r0, rows, x, toks, dim, up, buf, lut)
        for j in range(n):
            s = starts[u] + j
            for r in range(rows):
                gv = g[r, j]
                h[s, r0 + r] = gv / (np.float32(1.0) + np.exp(-gv)) * up[r, j]


@njit(nogil=True, parallel=True, fastmath=True, cache=True)
def down(fmt, w2, h, active, starts, ends, slot_token, slot_weight, y, rt, lut):
    """y[t] += w * W2_e h[s] for every slot s = (t, e) with weight w; h (S, I), y (T, D) zeroed."""
    dim = w2.shape[1]
    inter = h.shape[1]
    tiles = (dim + rt - 1) // rt
    max_n = 0
    for u in range(active.shape[0]):
        max_n = max(max_n, ends[u] - starts[u])
    for tile in prange(tiles):
        r0 = tile * rt
        rows = min(rt, dim - r0)
        buf = np.empty((rt, CHUNK), np.float32)
        acc = np.empty((rt, max_n), np.float32)
        for u in range(active.shape[0]):
            slots = np.arange(starts[u], ends[u])
            tile_matmul(fmt, w2[active[u]], r0, rows, h, slots, inter, acc, buf, lut)
            for j in range(slots.shape[0]):
                s = slots[j]
                t = slot_token[s]
                wt = slot_weight[s]
                for r in range(rows):
                    y[t, r0 + r] += wt * acc[r, j]


@njit(inline="always", cache=True)
def _dot(fmt, row, act, t):
    """dot of a stored row with activation row t; act = activations(...)."""
    x, xs, xq, xd, int8 = act
    if int8:
        return dot_row_i8(fmt, row, xq[t], xd[t], xs[t])
    return dot_row(fmt, row, x[t], xs[t])


@njit(nogil=True, parallel=True, fastmath=True, cache=True)
def gate_up_decode(fmt, w1, w3, act, active, starts, ends, slot_token, h, rt):
    """As gate_up, each row dotted from its bytes; act = activations(x, int8)."""
    inter = w1.shape[1]
    tiles = (inter + rt - 1) // rt
    for task in prange(active.shape[0] * tiles):
        u, tile = task // tiles, task % tiles
        e = active[u]
        for r in range(tile * rt, min(inter, tile * rt + rt)):
            for s in range(starts[u], ends[u]):
                t = slot_token[s]
                g = _dot(fmt, w1[e, r], act, t)
                v = _dot(fmt, w3[e, r], act, t)
                h[s, r] = g / (np.float32(1.0) + np.exp(-g)) * v


@njit(nogil=True, parallel=True, fastmath=True, cache=True)
def down_decode(fmt, w2, act, active, starts, ends, slot_token, slot_weight, y, rt):
    """As down, each row dotted from its bytes; act = activations(h, int8)."""
    dim = w2.shape[1]
    tiles = (dim + rt - 1) // rt
    for tile in prange(tiles):
        for u in range(active.shape[0]):      # expert outer: each expert's rows are one stream
            e = active[u]
            for r in range(tile * rt, min(dim, tile * rt + rt)):
                for s in range(starts[u], ends[u]):
                    y[slot_token[s], r] += slot_weight[s] * _dot(fmt, w2[e, r], act, s)


@njit(nogil=True, cache=True)
def activations(a, int8):
    """(N, C) fp32 rows -> (a, xs, xq, xd, int8): xs (N, C // 32) block sums of a; with int8 also a
    quantized per 32 columns (xq (N, C) int8, scales xd (N, C // 32)), xs then of the quantized rows."""
    n, c = a.shape
    xs = np.empty((n, c // 32), np.float32)
    xq = np.empty((n, c if int8 else 0), np.int8)
    xd = np.empty((n, c // 32 if int8 else 0), np.float32)
    for i in range(n):
        if int8:
            quantize_act(a[i], xq[i], xd[i], xs[i])
        else:
            block_sums(a[i], xs[i])
    return a, xs, xq, xd, int8


@njit(nogil=True, cache=True)
def moe_forward(x, ids, weights, w1, w3, w2, fmt13, fmt2, rt_up, rt_down, lut, int8):
    """x (T, D) fp32, ids (T, K) int64, weights (T, K) fp32, w1/w3 (E, I, RB13) and w2 (E, D, RB2)
    uint8 -> y (T, D) fp32. Inputs are validated by the wrapper (hetero_rt.experts.numba_backend).
    Experts with <= DECODE_MAX_TOKENS tokens take the decode kernels, the others the tiled ones.
    rt_up, rt_down: row-tile heights of the tiled kernels. int8: the decode kernels quantize the
    activations of block-format weights to int8 per 32 columns (integer dots); the tiled stay fp32."""
    active, offsets, slot_token, slot_weight = route(ids, weights, w1.shape[0])
    starts, ends = offsets[:-1], offsets[1:]
    small = ends - starts <= DECODE_MAX_TOKENS                           # (U,)
    large = ~small
    h = np.empty((slot_token.shape[0], w1.shape[1]), np.float32)        # (S, I)
    y = np.zeros(x.shape, np.float32)                                    # (T, D)
    if small.any():
        gate_up_decode(fmt13, w1, w3, activations(x, int8 and fmt13 >= Q8_0), active[small], starts[small],
                       ends[small], slot_token, h, DECODE_ROWS)
    if large.any():
        gate_up(fmt13, w1, w3, x, active[large], starts[large], ends[large], slot_token, h, rt_up, lut)
    if small.any():
        down_decode(fmt2, w2, activations(h, int8 and fmt2 >= Q8_0), active[small], starts[small], ends[small],
                    slot_token, slot_weight, y, DECODE_ROWS)
    if large.any():
        down(fmt2, w2, h, active[large], starts[large], ends[large], slot_token, slot_weight, y, rt_down, lut)
    return y

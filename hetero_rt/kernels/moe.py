"""Routed-experts SwiGLU kernels: y[t] = sum_k w[t,k] * W2_e (silu(W1_e x[t]) * W3_e x[t]), e = ids[t,k].

  1. route: slots (t, k) sorted by expert, so each active expert sees its tokens as one group;
  2. gate+up, parallel over (active expert, tile of I rows); h = silu(g) * u;
  3. down, parallel over tiles of D rows (each task owns its rows of y: no races), looping over
     the active experts: W2 rows times the group's h rows, scaled by w.
Two kernels per step, chosen per expert from its number of tokens (moe_forward):
  - decode (experts with <= DECODE_MAX_TOKENS tokens, 4 for block formats): each weight row is
    dotted straight from its bytes with the fused per-format dots of hetero_rt.kernels.dot, one
    sequential stream per row, tasks of equal size (rows) split evenly over the threads; nothing
    is allocated per task;
  - tiled (more tokens): each tile of rows is decoded CHUNK columns at a time into a
    cache-resident fp32 buffer (dequant.decode_tile) and multiplied with every token of the group
    by the register-blocked kernel of kernels.gemm, so a weight is read from memory once per call
    however many tokens use it. The tokens' activations are packed transposed for that kernel
    (gemm.pack_chunk); gate_up writes h already in that layout, one band of columns per expert
    (ht), so down multiplies by it directly. While a chunk is multiplied, the next chunk's weight
    bytes are prefetched (next_chunk_bytes).
    (The fused dots re-decode a row per token, from L1; the tiled kernels pay a buffer round trip
    per weight once.)

All kernels are @njit(nogil=True, cache=True); the parallel ones use prange.
Legend: T tokens, K experts per token, S = T*K slots, U active experts, D hidden, I expert inter,
E experts, RT rows per tile, RB bytes per stored row, n tokens of one expert.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..quant.ggml import Q8_0
from .dequant import CHUNK, decode_tile
from .dot import act_sums_size, block_sums, dot_row, dot_row_i8, has_int8_dot, quantize_act
from .gemm import block_matmul, pack_chunk, padded_tokens

# Experts with at most this many tokens in a call take the decode kernels, the others the tiled ones:
# the break-even measured per format family (one V3-shaped expert, 2 threads, Zen 4): fp32/bf16/fp16
# ~8 tokens, block formats ~4 (their per-token re-decode in the fused dots costs more).
DECODE_MAX_TOKENS = 8
DECODE_MAX_TOKENS_BLOCK = 4
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


@njit(inline="always", cache=True)
def next_chunk_bytes(w, c0, nc, cols):
    """Byte range (lo, hi) of columns c0+nc .. c0+nc+CHUNK-1 in a stored row of `cols` weights; the
    tiled kernels prefetch it while they multiply columns c0 .. c0+nc-1 (a tile is many short row
    streams, which the hardware prefetchers do not follow; without this a V2-Lite prefill spent a
    quarter of its time waiting for weights)."""
    row_bytes = w.shape[1]
    if c0 + nc >= cols:
        return 0, 0
    return (c0 + nc) * row_bytes // cols, min(c0 + nc + CHUNK, cols) * row_bytes // cols


@njit(nogil=True, parallel=True, fastmath=True, cache=True)
def gate_up(fmt, w1, w3, x, active, starts, ends, slot_token, col, ht, rt):
    """ht[i, col[u] + j] = silu(W1_e x[t]) * W3_e x[t] at row i for the j-th slot (t, e) of active
    expert u: the experts' h, transposed, one band of padded_tokens(n_u) columns each (the packed
    layout the down kernel multiplies by, so it packs nothing). x (T, D), ht (I, sum of bands)."""
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
        n_pad = padded_tokens(n)
        buf = np.empty((rt, CHUNK), np.float32)
        xp = np.zeros((CHUNK, n_pad), np.float32)
        g = np.zeros((rt, n_pad), np.float32)
        up = np.zeros((rt, n_pad), np.float32)
        for c0 in range(0, dim, CHUNK):       # x packed once per chunk for both W1 and W3
            nc = min(CHUNK, dim - c0)
            lo, hi = next_chunk_bytes(w1[e], c0, nc, dim)
            pack_chunk(x, toks, c0, nc, xp)
            decode_tile(fmt, w1[e], r0, rows, c0, nc, buf)
            block_matmul(buf, rows, xp, 0, 0, nc, g, 0, n_pad, w1[e], r0, lo, hi)
            decode_tile(fmt, w3[e], r0, rows, c0, nc, buf)
            block_matmul(buf, rows, xp, 0, 0, nc, up, 0, n_pad, w3[e], r0, lo, hi)
        for r in range(rows):
            out = ht[r0 + r, col[u]:col[u] + n]
            for j in range(n):
                gv = g[r, j]
                out[j] = gv / (np.float32(1.0) + np.exp(-gv)) * up[r, j]


@njit(nogil=True, parallel=True, fastmath=True, cache=True)
def down(fmt, w2, ht, active, starts, ends, col, slot_token, slot_weight, y, rt):
    """y[t] += w * W2_e h[s] for every slot s = (t, e) with weight w; ht as gate_up leaves it
    (I, sum of bands), y (T, D) zeroed."""
    dim = w2.shape[1]
    inter = ht.shape[0]
    tiles = (dim + rt - 1) // rt
    max_n = 0
    for u in range(active.shape[0]):
        max_n = max(max_n, ends[u] - starts[u])
    for tile in prange(tiles):
        r0 = tile * rt
        rows = min(rt, dim - r0)
        buf = np.empty((rt, CHUNK), np.float32)
        acc = np.empty((rt, padded_tokens(max_n)), np.float32)
        for u in range(active.shape[0]):
            e = active[u]
            n = ends[u] - starts[u]
            n_pad = padded_tokens(n)
            acc[:rows, :n_pad] = 0.0
            for c0 in range(0, inter, CHUNK):
                nc = min(CHUNK, inter - c0)
                lo, hi = next_chunk_bytes(w2[e], c0, nc, inter)
                decode_tile(fmt, w2[e], r0, rows, c0, nc, buf)
                block_matmul(buf, rows, ht, c0, col[u], nc, acc, 0, n_pad, w2[e], r0, lo, hi)
            for j in range(n):
                s = starts[u] + j
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
    quantized per 32 columns (xq (N, C) int8, scales xd (N, C // 32)), xs then the quantized rows' sums
    (kernels.dot.act_sums: per 32, then per 16)."""
    n, c = a.shape
    xs = np.empty((n, act_sums_size(c) if int8 else c // 32), np.float32)
    xq = np.empty((n, c if int8 else 0), np.int8)
    xd = np.empty((n, c // 32 if int8 else 0), np.float32)
    for i in range(n):
        if int8:
            quantize_act(a[i], xq[i], xd[i], xs[i])
        else:
            block_sums(a[i], xs[i])
    return a, xs, xq, xd, int8


@njit(nogil=True, cache=True)
def moe_forward(x, ids, weights, w1, w3, w2, fmt13, fmt2, rt_up, rt_down, int8):
    """x (T, D) fp32, ids (T, K) int64, weights (T, K) fp32, w1/w3 (E, I, RB13) and w2 (E, D, RB2)
    uint8 -> y (T, D) fp32. Inputs are validated by the wrapper (hetero_rt.experts.numba_backend).
    Experts with <= DECODE_MAX_TOKENS (block formats: DECODE_MAX_TOKENS_BLOCK) tokens take the decode
    kernels, the others the tiled ones.
    rt_up, rt_down: row-tile heights of the tiled kernels. int8: the decode kernels quantize the
    activations of block-format weights to int8 per 32 columns (integer dots); the tiled stay fp32."""
    active, offsets, slot_token, slot_weight = route(ids, weights, w1.shape[0])
    starts, ends = offsets[:-1], offsets[1:]
    small = ends - starts <= (DECODE_MAX_TOKENS if fmt13 < Q8_0 else DECODE_MAX_TOKENS_BLOCK)   # (U,)
    large = ~small
    inter = w1.shape[1]
    h = np.empty((slot_token.shape[0] if small.any() else 0, inter), np.float32)   # (S, I)
    y = np.zeros(x.shape, np.float32)                                    # (T, D)
    if small.any():
        gate_up_decode(fmt13, w1, w3, activations(x, int8 and has_int8_dot(fmt13)), active[small], starts[small],
                       ends[small], slot_token, h, DECODE_ROWS)
    if large.any():                  # (not on the decode path: one token per expert stays small)
        col = np.zeros(large.sum() + 1, np.int64)                        # tiled experts' bands in ht
        for v, u in enumerate(np.nonzero(large)[0]):
            col[v + 1] = col[v] + padded_tokens(ends[u] - starts[u])
        ht = np.zeros((inter, col[-1]), np.float32)                      # (I, sum of bands)
        gate_up(fmt13, w1, w3, x, active[large], starts[large], ends[large], slot_token, col, ht, rt_up)
    if small.any():
        down_decode(fmt2, w2, activations(h, int8 and has_int8_dot(fmt2)), active[small], starts[small], ends[small],
                    slot_token, slot_weight, y, DECODE_ROWS)
    if large.any():
        down(fmt2, w2, ht, active[large], starts[large], ends[large], col, slot_token, slot_weight, y, rt_down)
    return y

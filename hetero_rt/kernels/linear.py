"""y = x @ W.T for one weight W (R, C) kept in its stored format (fp32/bf16/fp16 or a ggml block
format), read in place: the dense projections of a GGUF model placed on the CPU with
`format: stored` (attention, shared experts, dense FFN, lm_head).

Two regimes, as for the experts:
- few tokens (decode): rows split over the threads, each row dotted straight from its bytes
  (kernels.dot) against every token: the weight is read once;
- many tokens (prefill): rows decoded a block at a time into fp32 (decode_rows) and multiplied by
  the caller with torch's GEMM, so the matmul runs at BLAS speed and no full fp32 copy ever exists.
Legend: T tokens, R rows (out features), C columns (in features), RB bytes per row.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .dequant import decode_tile
from .dot import act_sums_size, block_sums, dot_row, dot_row_i8, quantize_act

ROWS_PER_TASK = 16


@njit(nogil=True, parallel=True, fastmath=True, cache=True)
def gemv(fmt, w, x, y, int8, groups):
    """y (T, R) = x (T, C) @ W.T for W as stored bytes w (R, RB); with groups G > 1, x is (T * G, C)
    and the rows fall into G equal groups, group g multiplied by x[t * G + g] (per-head matrices
    stacked: MLA's k_b and v_b). int8: each activation row is quantized once to int8 per 32 columns
    (kernels.dot.quantize_act) and every row dotted by the integer dots (fmt must have one:
    kernels.dot.has_int8_dot); else the fp32 dots with x's block sums."""
    rows = w.shape[0]
    n = x.shape[0] // groups
    cols = x.shape[1]
    per = rows // groups
    xs = np.empty((x.shape[0], act_sums_size(cols) if int8 else cols // 32), np.float32)
    xq = np.empty((x.shape[0], cols if int8 else 0), np.int8)
    xd = np.empty((x.shape[0], cols // 32 if int8 else 0), np.float32)
    for j in range(x.shape[0]):
        if int8:
            quantize_act(x[j], xq[j], xd[j], xs[j])
        else:
            block_sums(x[j], xs[j])
    n_tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(n_tasks):
        r1 = min(rows, (task + 1) * ROWS_PER_TASK)
        for r in range(task * ROWS_PER_TASK, r1):
            wr = w[r]
            g = r // per
            for j in range(n):
                a = j * groups + g
                y[j, r] = dot_row_i8(fmt, wr, xq[a], xd[a], xs[a]) if int8 else dot_row(fmt, wr, x[a], xs[a])


@njit(nogil=True, parallel=True, fastmath=True, cache=True)
def gather_rows(fmt, w, ids, out):
    """out (T, C) fp32 = rows ids[0], ids[1], ... of W decoded from its stored bytes w (R, RB)."""
    cols = out.shape[1]
    for t in prange(ids.shape[0]):
        decode_tile(fmt, w, ids[t], 1, 0, cols, out[t:t + 1])


@njit(nogil=True, parallel=True, fastmath=True, cache=True)
def decode_rows(fmt, w, r0, out):
    """out (n, C) fp32 = rows r0 .. r0+n-1 of W decoded from its stored bytes w (R, RB)."""
    n = out.shape[0]
    cols = out.shape[1]
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        i = task * ROWS_PER_TASK
        rows = min(ROWS_PER_TASK, n - i)
        decode_tile(fmt, w, r0 + i, rows, 0, cols, out[i:i + rows])

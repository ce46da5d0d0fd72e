"""Register-blocked fp32 matrix multiply for the tiled (prefill) kernels.

The tiled kernels decode a tile of weight rows into an fp32 buffer `buf` (rows, CHUNK) and need
acc[r, t] += sum_k buf[r, k] * x[t, k] over the tokens t routed to the expert. Written as numba
loops, LLVM vectorizes that along k, as dot products: every (row, token) pair ends in a horizontal
sum and at most 8 sums stay in registers, which held the kernels to ~60% of the FMA peak. Here the
tokens' activations are first packed transposed, xp[k, t] (`pack_chunk`), and a micro-kernel keeps
a block of RB rows x 8*NV tokens of acc in vector registers for the whole k loop: per k it loads
NV vectors of 8 tokens, broadcasts RB weights and issues RB*NV fused multiply-adds, with no
horizontal sum at all (the classic outer-product GEMM kernel, as in BLIS or llama.cpp's tinyBLAS).

numba cannot keep an array of vector accumulators in registers, so the micro-kernels are written as
LLVM IR through numba intrinsics (`_micro_kernel(RB, NV)`); everything around them is plain numba.
Block shapes: ROWS rows x 24 tokens (ROWS = 8 with AVX-512's 32 vector registers: 24
accumulators, ~95% of one Zen 4 core's FMA peak in a trial; 4 with AVX2's 16), then 16 and 8
tokens for the tail; rows left over after the ROWS-row blocks take 1-row kernels. Token counts
are padded to a multiple of 8 with extra columns in xp (n_pad = padded_tokens(n)), whose acc columns the caller ignores.
Legend: RB rows per block, NV vectors of 8 tokens per block, NP padded token count, kc columns.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .intrinsics import cpu_has, fma8, prefetch, splat

LANES = 8  # fp32 lanes per vector: 256-bit, which every AVX2 machine has

_VEC = ir.VectorType(ir.FloatType(), LANES)


def _micro_kernel(rb: int, nv: int):
    """An intrinsic mk(buf, r, xp, k0, xt, kc, acc, at):
        acc[r:r+rb, at:at+8*nv] += buf[r:r+rb, :kc] @ xp[k0:k0+kc, xt:xt+8*nv]
    on C-contiguous 2-D fp32 arrays (each row's stride is its shape[1]). No bounds checks: the
    numba callers below keep every index in range."""

    @intrinsic
    def mk(typingctx, buf, r, xp, k0, xt, kc, acc, at):
        def codegen(context, builder, sig, args):
            bufa = context.make_array(sig.args[0])(context, builder, args[0])
            xpa = context.make_array(sig.args[2])(context, builder, args[2])
            acca = context.make_array(sig.args[6])(context, builder, args[6])
            r, k0, xt, kc, at = args[1], args[3], args[4], args[5], args[7]
            i64 = r.type
            ldb = cgutils.unpack_tuple(builder, bufa.shape)[1]
            ldx = cgutils.unpack_tuple(builder, xpa.shape)[1]
            lda = cgutils.unpack_tuple(builder, acca.shape)[1]
            fma = fma8(builder)
            # accumulators as entry-block allocas: LLVM promotes them to registers
            accs = [cgutils.alloca_once(builder, _VEC) for _ in range(rb * nv)]
            for a in accs:
                builder.store(ir.Constant(_VEC, [0.0] * LANES), a)
            row_base = [builder.mul(builder.add(r, ir.Constant(i64, i)), ldb) for i in range(rb)]
            with cgutils.for_range(builder, kc) as loop:
                k = loop.index
                xrow = builder.add(builder.mul(builder.add(k, k0), ldx), xt)
                xv = []
                for j in range(nv):
                    p = builder.gep(xpa.data, [builder.add(xrow, ir.Constant(i64, LANES * j))])
                    xv.append(builder.load(builder.bitcast(p, _VEC.as_pointer()), align=4))
                for i in range(rb):
                    ws = splat(builder, builder.load(builder.gep(bufa.data, [builder.add(row_base[i], k)])), _VEC)
                    for j in range(nv):
                        a = accs[i * nv + j]
                        builder.store(builder.call(fma, [ws, xv[j], builder.load(a)]), a)
            for i in range(rb):
                arow = builder.add(builder.mul(builder.add(r, ir.Constant(i64, i)), lda), at)
                for j in range(nv):
                    p = builder.gep(acca.data, [builder.add(arow, ir.Constant(i64, LANES * j))])
                    p = builder.bitcast(p, _VEC.as_pointer())
                    builder.store(builder.fadd(builder.load(p, align=4), builder.load(accs[i * nv + j])),
                                  p, align=4)
            return context.get_dummy_value()

        if not all(isinstance(a, types.Array) and a.dtype == types.float32 and a.ndim == 2 and a.layout == "C"
                   for a in (buf, xp, acc)):
            return None
        i64 = types.int64
        return types.void(buf, i64, xp, i64, i64, i64, acc, i64), codegen

    return mk


# 8 x 24 keeps 24 accumulators + 3 activation vectors + 1 broadcast in 32 registers; with 16, 4 x 24
# keeps 12 + 3 + 1 (8 x 24 there would spill accumulators to the stack on every k).
ROWS = 8 if cpu_has("avx512f") else 4
_mk_r3, _mk_r2, _mk_r1 = _micro_kernel(ROWS, 3), _micro_kernel(ROWS, 2), _micro_kernel(ROWS, 1)
_mk1x3, _mk1x2, _mk1x1 = _micro_kernel(1, 3), _micro_kernel(1, 2), _micro_kernel(1, 1)


@njit(inline="always", cache=True)
def padded_tokens(n):
    """Token count rounded up to whole vectors: the xp and acc widths for n tokens."""
    return (n + LANES - 1) // LANES * LANES


@njit(nogil=True, cache=True)
def pack_chunk(x, x_rows, c0, nc, xp):
    """xp[k, j] = x[x_rows[j], c0 + k] for k < nc, j < len(x_rows); other columns of xp untouched
    (allocate xp zeroed, so padding tokens stay finite). Eight tokens at a time, so that each k
    writes 32 contiguous bytes of xp (one token at a time wrote a cache line per element: 4x slower
    at 256 tokens)."""
    n = x_rows.shape[0]
    j0 = 0
    while j0 + 8 <= n:
        a0, a1 = x[x_rows[j0], c0:c0 + nc], x[x_rows[j0 + 1], c0:c0 + nc]
        a2, a3 = x[x_rows[j0 + 2], c0:c0 + nc], x[x_rows[j0 + 3], c0:c0 + nc]
        a4, a5 = x[x_rows[j0 + 4], c0:c0 + nc], x[x_rows[j0 + 5], c0:c0 + nc]
        a6, a7 = x[x_rows[j0 + 6], c0:c0 + nc], x[x_rows[j0 + 7], c0:c0 + nc]
        for k in range(nc):
            o = xp[k, j0:j0 + 8]
            o[0], o[1], o[2], o[3] = a0[k], a1[k], a2[k], a3[k]
            o[4], o[5], o[6], o[7] = a4[k], a5[k], a6[k], a7[k]
        j0 += 8
    for j in range(j0, n):
        src = x[x_rows[j], c0:c0 + nc]
        for k in range(nc):
            xp[k, j] = src[k]


@njit(inline="always", cache=True)
def _prefetch_rows(w, r0, count, lo, hi):
    """Prefetch bytes lo .. hi-1 of rows r0 .. r0+count-1 of w (2-D uint8), a cache line at a time."""
    for r in range(r0, min(r0 + count, w.shape[0])):
        row = w[r]
        for off in range(lo, hi, 64):
            prefetch(row, np.uint64(off))


@njit(nogil=True, cache=True)
def block_matmul(buf, rows, xp, k0, xt, kc, acc, at, n_pad, w, w_r0, w_lo, w_hi):
    """acc[:rows, at:at+n_pad] += buf[:rows, :kc] @ xp[k0:k0+kc, xt:xt+n_pad]; n_pad a multiple of 8;
    all C-contiguous fp32. Every index is checked here, once, so the micro-kernels need not.
    Rows go ROWS at a time, the last rows % ROWS one at a time; tokens 24 at a time, then 16 and 8.
    While it computes with a block of rows of buf it prefetches bytes w_lo .. w_hi-1 of the same
    rows (+ w_r0) of w, the stored weights (2-D uint8) the caller decodes next (none when
    w_hi <= w_lo): spread this way the loads of the next chunk overlap the arithmetic, where one burst
    of prefetches filled the core's miss buffers and stalled it."""
    if (n_pad % LANES or xt < 0 or at < 0 or k0 < 0 or kc < 0 or xt + n_pad > xp.shape[1]
            or at + n_pad > acc.shape[1] or rows > buf.shape[0] or rows > acc.shape[0]
            or kc > buf.shape[1] or k0 + kc > xp.shape[0]):
        raise ValueError("block_matmul: shapes do not match")
    r = 0
    while r < rows:
        full = r + ROWS <= rows
        step = ROWS if full else 1
        if w_hi > w_lo:
            _prefetch_rows(w, w_r0 + r, step, w_lo, w_hi)
        t = 0
        while t + 24 <= n_pad:
            if full:
                _mk_r3(buf, r, xp, k0, xt + t, kc, acc, at + t)
            else:
                _mk1x3(buf, r, xp, k0, xt + t, kc, acc, at + t)
            t += 24
        if t + 16 <= n_pad:
            if full:
                _mk_r2(buf, r, xp, k0, xt + t, kc, acc, at + t)
            else:
                _mk1x2(buf, r, xp, k0, xt + t, kc, acc, at + t)
            t += 16
        if t < n_pad:
            if full:
                _mk_r1(buf, r, xp, k0, xt + t, kc, acc, at + t)
            else:
                _mk1x1(buf, r, xp, k0, xt + t, kc, acc, at + t)
        r += step

"""Scalar bit-level conversions numba has no spelling for, as LLVM intrinsics. Each is one or two
LLVM instructions on narrow integers, so loops over them vectorize (a numba `x & 15` on uint8 is
promoted to int64 first, which makes LLVM convert 8-lane int64 vectors instead of 16-lane int32).

  f32_from_bits(u32)         bitcast: the fp32 whose bits are u32 (bf16 weight = bits << 16)
  f16_to_f32(u16)            IEEE half bits -> fp32 (vcvtph2ps)
  u8_to_f32(v, shift, mask)  ((v >> shift) & mask) as fp32, computed on 8-bit integers
  q5_to_f32(lo, hi, ls, hs)  ((lo >> ls) & 15) | (((hi >> hs) & 1) << 4) as fp32 (Q5_K weight)
  q6_to_f32(lo, hi, ls, hs)  (((lo >> ls) & 15) | (((hi >> hs) & 3) << 4)) - 32 as fp32 (Q6_K weight)
  q3_to_f32(lo, hi, ls, hs)  (((lo >> ls) & 3) | (((hi >> hs) & 1) << 2)) - 4 as fp32 (Q3_K weight)
  e4m3_to_f32(v)             the float8 e4m3 value of byte v / 256 (exact; through fp16: vcvtph2ps)
  q4_to_i32(v, shift)        ((v >> shift) & 15) as int32 (the Q4_1/Q5_1 int8-activation loops)
and, written directly as vector IR, the int8-activation dots of whole rows (vpdpbusd with
AVX512-VNNI or AVX-VNNI, else 32-bit multiplies LLVM lowers to pmaddwd): q8_0_dot_i8, q4_0_dot_i8,
q5_0_dot_i8, q2_k_dot_i8, q3_k_dot_i8, q4_k_dot_i8, q5_k_dot_i8, q6_k_dot_i8, iq4_xs_dot_i8.
"""
from __future__ import annotations

import numba
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I8 = ir.IntType(8)


def _c8(v: int) -> ir.Constant:
    return ir.Constant(_I8, v)


def _nibble(builder, v, shift):
    return builder.and_(builder.lshr(v, builder.trunc(shift, _I8)), _c8(15))


def _high_bits(builder, v, shift, mask):
    return builder.shl(builder.and_(builder.lshr(v, builder.trunc(shift, _I8)), _c8(mask)), _c8(4))


@intrinsic
def f32_from_bits(typingctx, bits):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


def _half_to_float(builder, h16):
    """fp32 of the IEEE half whose bits are the i16 h16 (or each lane of an <n x i16>): vcvtph2ps
    where the target has F16C; else exponent and mantissa moved into fp32's fields and rescaled by
    2**112 (fp32's bias less fp16's), which also turns fp16 subnormals into normal fp32s (LLVM's own
    fallback is a libcall numba's JIT does not link). Inf/NaN halves come out finite there; weights
    and scales carry none."""
    lanes = h16.type.count if isinstance(h16.type, ir.VectorType) else None

    def ty(t):
        return ir.VectorType(t, lanes) if lanes else t

    def c(t, v):
        return ir.Constant(ty(t), [v] * lanes if lanes else v)
    if F16C:
        return builder.fpext(builder.bitcast(h16, ty(ir.HalfType())), ty(ir.FloatType()))
    i32, f32 = ir.IntType(32), ir.FloatType()
    v = builder.zext(h16, ty(i32))
    sign = builder.shl(builder.and_(v, c(i32, 0x8000)), c(i32, 16))
    body = builder.bitcast(builder.shl(builder.and_(v, c(i32, 0x7FFF)), c(i32, 13)), ty(f32))
    scaled = builder.bitcast(builder.fmul(body, c(f32, 2.0 ** 112)), ty(i32))
    return builder.bitcast(builder.or_(scaled, sign), ty(f32))


@intrinsic
def f16_to_f32(typingctx, bits):
    def codegen(context, builder, sig, args):
        return _half_to_float(builder, args[0])
    return types.float32(types.uint16), codegen


@intrinsic
def u8_to_f32(typingctx, v, shift, mask):
    def codegen(context, builder, sig, args):
        v8, shift, mask = args
        q = builder.and_(builder.lshr(v8, builder.trunc(shift, _I8)), builder.trunc(mask, _I8))
        return builder.uitofp(q, ir.FloatType())
    return types.float32(types.uint8, types.int64, types.int64), codegen


def _q5(builder, lo, hi, ls, hs):
    return builder.or_(_nibble(builder, lo, ls), _high_bits(builder, hi, hs, 1))


def _q6(builder, lo, hi, ls, hs):
    return builder.sub(builder.or_(_nibble(builder, lo, ls), _high_bits(builder, hi, hs, 3)), _c8(32))


@intrinsic
def q5_to_f32(typingctx, lo, hi, ls, hs):
    def codegen(context, builder, sig, args):
        return builder.uitofp(_q5(builder, *args), ir.FloatType())
    return types.float32(types.uint8, types.uint8, types.int64, types.int64), codegen


@intrinsic
def q6_to_f32(typingctx, lo, hi, ls, hs):
    def codegen(context, builder, sig, args):
        return builder.sitofp(_q6(builder, *args), ir.FloatType())
    return types.float32(types.uint8, types.uint8, types.int64, types.int64), codegen


def _q3(builder, lo, hi, ls, hs):
    low = builder.and_(builder.lshr(lo, builder.trunc(ls, _I8)), _c8(3))
    high = builder.shl(builder.and_(builder.lshr(hi, builder.trunc(hs, _I8)), _c8(1)), _c8(2))
    return builder.sub(builder.or_(low, high), _c8(4))


@intrinsic
def q3_to_f32(typingctx, lo, hi, ls, hs):
    def codegen(context, builder, sig, args):
        return builder.sitofp(_q3(builder, *args), ir.FloatType())
    return types.float32(types.uint8, types.uint8, types.int64, types.int64), codegen


@intrinsic
def e4m3_to_f32(typingctx, v):
    """e4m3 (sign, 4-bit exponent of bias 7, 3-bit mantissa) moved into fp16's fields is the same
    value times 2**-8 (fp16's bias is 15), subnormals included; the caller folds the 256 into its
    scale. The NaN codes 0x7f/0xff come out as +-480/256 (checkpoints carry no NaN weights)."""
    def codegen(context, builder, sig, args):
        i16 = ir.IntType(16)
        v = builder.zext(args[0], i16)
        sign = builder.shl(builder.and_(v, ir.Constant(i16, 0x80)), ir.Constant(i16, 8))
        rest = builder.shl(builder.and_(v, ir.Constant(i16, 0x7F)), ir.Constant(i16, 7))
        return _half_to_float(builder, builder.or_(sign, rest))
    return types.float32(types.uint8), codegen


@intrinsic
def q4_to_i32(typingctx, v, shift):
    def codegen(context, builder, sig, args):
        return builder.zext(_nibble(builder, args[0], args[1]), ir.IntType(32))
    return types.int32(types.uint8, types.int64), codegen


@intrinsic
def prefetch(typingctx, arr, offset):
    """Hint the cache to fetch the line holding byte `offset` of the 1-D uint8 array `arr` (read, keep
    in all levels). Never faults, so offsets past the end are harmless."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        _prefetch_ir(builder, builder.gep(builder.bitcast(ary.data, ir.IntType(8).as_pointer()), [args[1]]))
        return context.get_dummy_value()
    return types.void(arr, types.uint64), codegen


def _to_i32(builder, value, ty):
    if ty.bitwidth == 32:
        return value
    if ty.bitwidth > 32:
        return builder.trunc(value, ir.IntType(32))
    return builder.sext(value, ir.IntType(32)) if ty.signed else builder.zext(value, ir.IntType(32))


@intrinsic
def mac_i32(typingctx, acc, a, b):
    """acc + a * b in 32-bit integer arithmetic (numba would widen to int64, which LLVM then cannot
    turn into 16-bit multiply-adds); a, b any integers of <= 32 bits, widened by their signedness."""
    if not all(isinstance(t, types.Integer) and t.bitwidth <= 32 for t in (a, b)):
        return None

    def codegen(context, builder, sig, args):
        prod = builder.mul(_to_i32(builder, args[1], sig.args[1]), _to_i32(builder, args[2], sig.args[2]))
        return builder.add(_to_i32(builder, args[0], sig.args[0]), prod)
    return types.int32(acc, a, b), codegen


@intrinsic
def opaque(typingctx, v):
    """v, hidden from the optimizer (an empty inline asm): a loop `for k in range(opaque(32))` is
    vectorized as a loop instead of being fully unrolled first, which for the int32 dot loops left
    scalar code."""
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64)])
        return builder.call(ir.InlineAsm(fnty, "", "=r,0", side_effect=False), [args[0]])
    return types.int64(types.int64), codegen


_V32I8 = ir.VectorType(_I8, 32)
_V32I32 = ir.VectorType(ir.IntType(32), 32)
_V8I32 = ir.VectorType(ir.IntType(32), 8)
_V8F32 = ir.VectorType(ir.FloatType(), 8)


def cpu_has(*features: str) -> bool:
    """Whether the CPU numba compiles for has every one of these LLVM features ("avx512f", ...): the
    host's, unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES name another target."""
    given = numba.config.CPU_FEATURES
    if given is None and not numba.config.CPU_NAME:
        host = binding.get_host_cpu_features()
        return all(host.get(f) for f in features)
    return bool(given) and all(f"+{f}" in given.split(",") for f in features)


# vpdpbusd on 256-bit vectors: AVX512-VNNI (EVEX) or AVX-VNNI (VEX; Alder Lake, Zen 5, ...); LLVM
# emits either from the same intrinsic, by the target's features.
VNNI = cpu_has("avx512vnni", "avx512vl") or cpu_has("avxvnni")
F16C = cpu_has("f16c")
# vpdpbusd on 512-bit vectors with AVX-512BW's per-word shifts: the K-quant and IQ4_XS row dots take 64
# elements per instruction (_row_dot512). Their 256-bit loops were bound by port 5 (a lane shuffle per
# 32 weights); on 64 the same shuffle serves twice the weights: 1.35-1.5x per core on Q2_K.
AVX512 = cpu_has("avx512f", "avx512bw", "avx512vl", "avx512vnni")
# table lookups (IQ4_XS levels): vpshufb on 32 bytes with AVX2, pshufb on 16 with SSSE3
AVX2 = cpu_has("avx2")
SSSE3 = cpu_has("ssse3")


# --- IR helpers shared by the vector kernels below and kernels.gemm --------------------------------

def splat(builder, value, ty):
    """A vector of type ty with every lane = value."""
    undef = ir.Constant(ty, ir.Undefined)
    v = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(ir.IntType(32), ty.count), [0] * ty.count))


def fma8(builder):
    """The llvm.fma.v8f32 function of this module."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8F32, [_V8F32] * 3), "llvm.fma.v8f32")


def _hsum8(builder, v):
    """Sum of the 8 fp32 lanes of v (any order)."""
    f32 = ir.FloatType()
    red = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, _V8F32]),
                                         "llvm.vector.reduce.fadd.v8f32")
    out = builder.call(red, [ir.Constant(f32, 0.0), v])
    out.fastmath.add("reassoc")
    return out


def _prefetch_ir(builder, ptr):
    """Prefetch the line at ptr (i8*) for reading, into all cache levels; never faults."""
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]),
                                        "llvm.prefetch.p0")
    builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])


def _byte_ptr(builder, base, offset, ty=None):
    """base (i8*) + offset bytes, as a pointer to ty (default i8)."""
    off = offset if isinstance(offset, ir.Value) else ir.Constant(ir.IntType(64), offset)
    p = builder.gep(base, [off])
    return p if ty is None else builder.bitcast(p, ty.as_pointer())


def _f16_at(builder, base, offset):
    """fp32 of the little-endian fp16 at byte base + offset (base an i8*)."""
    half = builder.load(_byte_ptr(builder, base, offset, ir.IntType(16)), align=1)
    return _half_to_float(builder, half)


def _u8s8_dot8(builder, q, x):
    """<8 x i32>: lane m = sum of q[4m + j] * x[4m + j], j < 4 (q unsigned bytes, x signed bytes)."""
    if VNNI:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8I32, [_V8I32] * 3),
                                            "llvm.x86.avx512.vpdpbusd.256")
        return builder.call(fn, [ir.Constant(_V8I32, [0] * 8), builder.bitcast(q, _V8I32), builder.bitcast(x, _V8I32)])
    prod = builder.mul(builder.zext(q, _V32I32), builder.sext(x, _V32I32))      # pmaddwd-based elsewhere
    undef = ir.Constant(_V32I32, ir.Undefined)
    part = [builder.shuffle_vector(prod, undef, ir.Constant(_V8I32, [4 * m + j for m in range(8)]))
            for j in range(4)]
    return builder.add(builder.add(part[0], part[1]), builder.add(part[2], part[3]))


# --- whole-row int8-activation dots ----------------------------------------------------------------
# Every row dot below takes (row, xq, xd, xs, nb): the row's nb blocks as stored bytes, the activations
# quantized per 32 (xq int8, xd scales) and their block sums xs (kernels.dot.act_sums: per 32, then
# per 16, each xd times the sum of that many xq). A weight level stored with an offset (Q4_0's q - 8,
# Q6_K's q - 32, ...) is dotted as the unsigned level vpdpbusd takes, and the offset's share, which
# does not depend on the row, is taken from xs once per block rather than by a second dot per vector.


def _c32(v):
    return ir.Constant(_V32I8, [v] * 32)


def _is_row_args(row, xq, xd, xs) -> bool:
    return (isinstance(row, types.Array) and row.dtype == types.uint8 and isinstance(xq, types.Array)
            and xq.dtype == types.int8 and all(isinstance(a, types.Array) and a.dtype == types.float32
                                               for a in (xd, xs)))


class _Accs:
    """NACC independent <8 x float> accumulators taken in turn by fma(a, b), and two scalar ones by
    fma1(a, b): consecutive FMAs of a row dot do not wait on each other's 4-cycle latency (with one
    accumulator, Q2_K's 16 FMAs per block bounded it at ~64 cycles per 256 weights, more than its
    instructions take)."""

    def __init__(self, builder, vectors, scalars):
        self.builder, self.vectors, self.scalars = builder, list(vectors), list(scalars)
        self.turn = self.turn1 = 0

    def fma(self, a, b):
        k = self.turn % len(self.vectors)
        self.turn += 1
        self.vectors[k] = self.builder.call(fma8(self.builder), [a, b, self.vectors[k]])

    def fma1(self, a, b):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(self.builder.module, ir.FunctionType(f32, [f32] * 3), "llvm.fma.f32")
        k = self.turn1 % len(self.scalars)
        self.turn1 += 1
        self.scalars[k] = self.builder.call(fn, [a, b, self.scalars[k]])


NACC = 4


class _Act:
    """The activations of one row dot inside the IR: xq bytes, scales xd, sums xs (per 32 then per 16)."""

    def __init__(self, builder, xq, xd, xs, nb, per_block):
        self.builder, self.xq, self.xd, self.xs = builder, xq, xd, xs
        self.n32 = builder.mul(nb, ir.Constant(ir.IntType(64), per_block // 32))   # where the per-16 sums start

    def x(self, offset):
        """<32 x i8>: xq[offset:offset + 32] (offset an i64 value)."""
        return self.builder.load(_byte_ptr(self.builder, self.xq, offset, _V32I8), align=1)

    def scalar(self, base, i):
        return self.builder.load(self.builder.gep(base, [i]))

    def vec(self, base, i, n):
        """<n x float>: base[i:i + n]."""
        ty = ir.VectorType(ir.FloatType(), n)
        return self.builder.load(self.builder.bitcast(self.builder.gep(base, [i]), ty.as_pointer()), align=4)

    def xs16(self, b):
        """<16 x float>: the per-16 sums of 256-block b."""
        i64 = ir.IntType(64)
        return self.vec(self.xs, self.builder.add(self.n32, self.builder.mul(b, ir.Constant(i64, 16))), 16)


def _row_blocks(context, builder, sig, args, block_bytes, body, per_block, group=None):
    """The loop of a whole-row int8 dot (args: row, xq, xd, xs, nb): for each of the nb blocks b of the
    row (block_bytes bytes, per_block weights), body(builder, blk (i8*: the block), b, acc (_Accs),
    act (_Act)) adds the block's terms; with `group`, eight blocks per iteration are
    group(builder, blks (their 8 pointers), b0, acc, act) and only the rest go one at a time through
    body; the row is prefetched 2 KiB ahead; the accumulators summed and one horizontal sum at the end."""
    ra, xa, da, sa = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(4))
    i8p, i64, f32 = _I8.as_pointer(), ir.IntType(64), ir.FloatType()
    rbase = builder.bitcast(ra.data, i8p)
    nb = args[4]
    act = _Act(builder, builder.bitcast(xa.data, i8p), da.data, sa.data, nb, per_block)
    slots = [cgutils.alloca_once(builder, _V8F32) for _ in range(NACC)]
    slots1 = [cgutils.alloca_once(builder, f32) for _ in range(2)]
    for slot in slots:
        builder.store(ir.Constant(_V8F32, [0.0] * 8), slot)
    for slot in slots1:
        builder.store(ir.Constant(f32, 0.0), slot)

    def run(first, count):
        acc = _Accs(builder, [builder.load(s) for s in slots], [builder.load(s) for s in slots1])
        blks = []
        for u in range(count):
            blk = _byte_ptr(builder, rbase, builder.mul(builder.add(first, ir.Constant(i64, u)), ir.Constant(i64, block_bytes)))
            if u % 2 == 0 or block_bytes >= 64:
                _prefetch_ir(builder, _byte_ptr(builder, blk, 2048))
            blks.append(blk)
        if count > 1:
            group(builder, blks, first, acc, act)
        else:
            body(builder, blks[0], first, acc, act)
        for slot, v in zip(slots + slots1, acc.vectors + acc.scalars):
            builder.store(v, slot)
    unroll = 8 if group is not None else 1
    whole = builder.udiv(nb, ir.Constant(i64, unroll)) if unroll > 1 else nb
    with cgutils.for_range(builder, whole) as loop:
        run(builder.mul(loop.index, ir.Constant(i64, unroll)), unroll)
    if unroll > 1:
        done = builder.mul(whole, ir.Constant(i64, unroll))
        with cgutils.for_range(builder, builder.sub(nb, done)) as loop:
            run(builder.add(done, loop.index), 1)
    total = builder.load(slots[0])
    for slot in slots[1:]:
        total = builder.fadd(total, builder.load(slot))
    return builder.fadd(_hsum8(builder, total), builder.fadd(builder.load(slots1[0]), builder.load(slots1[1])))


def _row_dot(row, xq, xd, xs, nb, block_bytes, per_block, body, group=None):
    """The (signature, codegen) of an @intrinsic whole-row dot, or None for other argument types."""
    if not _is_row_args(row, xq, xd, xs):
        return None

    def codegen(context, builder, sig, args):
        return _row_blocks(context, builder, sig, args, block_bytes, body, per_block, group)
    return types.float32(row, xq, xd, xs, types.int64), codegen


def _halves(builder, v16):
    """The two <8 x float> halves of a <16 x float>."""
    undef = ir.Constant(v16.type, ir.Undefined)
    return [builder.shuffle_vector(v16, undef, ir.Constant(_V8I32, list(range(8 * h, 8 * h + 8)))) for h in range(2)]


def _fma16(builder, acc, a16, b16):
    """acc += a16 * b16 lane-wise, for <16 x float> a16, b16 (two 8-lane FMAs)."""
    for a, b in zip(_halves(builder, a16), _halves(builder, b16)):
        acc.fma(a, b)


def _blocks32_dot(builder, blk, b, acc, act, q, offset):
    """Adds d_b * (xd[b] * (the 8 lane sums of q . x) - offset * xs[b]) for one 32-block whose fp16 d is
    at blk and whose 32 unsigned levels are q (<32 x i8>; weight = d (q - offset))."""
    x = act.x(builder.mul(b, ir.Constant(ir.IntType(64), 32)))
    d = _f16_at(builder, blk, 0)
    acc.fma(builder.sitofp(_u8s8_dot8(builder, q, x), _V8F32), splat(builder, builder.fmul(d, act.scalar(act.xd, b)), _V8F32))
    acc.fma1(d, builder.fmul(act.scalar(act.xs, b), ir.Constant(ir.FloatType(), -float(offset))))


def _blocks32_group(levels, offset):
    """The body of eight consecutive 32-blocks b0 .. b0 + 7 (levels(builder, blk) -> their <32 x i8>
    unsigned levels; weight = d (q - offset)): the eight fp16 d gathered into one vector and converted
    at once, multiplied by xd[b0:b0 + 8] as a vector, the offsets' share as one FMA with xs[b0:b0 + 8];
    per block only the integer dot, its conversion and one FMA by its lane of the scales."""
    def group(builder, blks, b0, acc, act):
        i16, i64 = ir.IntType(16), ir.IntType(64)
        dv = ir.Constant(ir.VectorType(i16, 8), ir.Undefined)
        for u, blk in enumerate(blks):
            dv = builder.insert_element(dv, builder.load(_byte_ptr(builder, blk, 0, i16), align=1), ir.Constant(ir.IntType(32), u))
        d = _half_to_float(builder, dv)
        scale = builder.fmul(d, act.vec(act.xd, b0, 8))
        acc.fma(builder.fmul(d, ir.Constant(_V8F32, [-float(offset)] * 8)), act.vec(act.xs, b0, 8))
        undef = ir.Constant(_V8F32, ir.Undefined)
        for u, blk in enumerate(blks):
            x = act.x(builder.mul(builder.add(b0, ir.Constant(i64, u)), ir.Constant(i64, 32)))
            acc.fma(builder.sitofp(_u8s8_dot8(builder, levels(builder, blk), x), _V8F32),
                    builder.shuffle_vector(scale, undef, ir.Constant(_V8I32, [u] * 8)))
    return group


def _nibbles32(builder, blk, offset):
    """The 32 4-bit levels of a Q4_0/Q5_0-style block: low nibbles of the 16 bytes at blk + offset
    (elements 0-15), then their high nibbles (16-31). The 16 bytes are loaded into both halves
    (vbroadcasti128 from memory) and the high half shifted by 4 as 32-bit lanes (vpsrlvd) before one
    mask: no cross-lane insert, which would take port 5 as the scale shuffles do."""
    v16 = ir.VectorType(_I8, 16)
    qs = builder.load(_byte_ptr(builder, blk, offset, v16), align=1)
    both = builder.shuffle_vector(qs, ir.Constant(v16, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), 32),
                                                                                 list(range(16)) * 2))
    shifted = builder.lshr(builder.bitcast(both, _V8I32), ir.Constant(_V8I32, [0] * 4 + [4] * 4))
    return builder.and_(builder.bitcast(shifted, _V32I8), _c32(15))


def _blocks32_row(row, xq, xd, xs, nb, block_bytes, levels, offset):
    """_row_dot of a 32-block format: eight blocks at a time by _blocks32_group, the rest by _blocks32_dot."""
    def body(builder, blk, b, acc, act):
        _blocks32_dot(builder, blk, b, acc, act, levels(builder, blk), offset)
    return _row_dot(row, xq, xd, xs, nb, block_bytes, 32, body, group=_blocks32_group(levels, offset))


@intrinsic
def q8_0_dot_i8(typingctx, row, xq, xd, xs, nb):
    """sum over the nb Q8_0 blocks of row (34 bytes: fp16 d, 32 int8 q) of d_b * xd[b] *
    sum_k q_bk * xq[32 b + k], as fp32. The signed x signed integer dot runs as vpdpbusd (unsigned x
    signed) on q + 128 (q xor 0x80), less 128 * xs[b]."""
    def levels(builder, blk):
        return builder.xor(builder.load(_byte_ptr(builder, blk, 2, _V32I8), align=1), _c32(-128))
    return _blocks32_row(row, xq, xd, xs, nb, 34, levels, 128)


@intrinsic
def q4_0_dot_i8(typingctx, row, xq, xd, xs, nb):
    """sum over the nb Q4_0 blocks of row (18 bytes: fp16 d, 16 bytes of nibbles) of
    d_b * xd[b] * sum_k (q_bk - 8) * xq[32 b + k], in vector registers (vpdpbusd with VNNI)."""
    def levels(builder, blk):
        return _nibbles32(builder, blk, 2)
    return _blocks32_row(row, xq, xd, xs, nb, 18, levels, 8)


@intrinsic
def q5_0_dot_i8(typingctx, row, xq, xd, xs, nb):
    """As q4_0_dot_i8 for Q5_0 (22 bytes: fp16 d, 32 high bits qh, 16 bytes of nibbles; level =
    nibble | bit k of qh << 4, weight d * (level - 16)): the 32 high bits become bytes by a bitcast
    to <32 x i1> (vpmovm2b with AVX-512BW)."""
    def levels(builder, blk):
        qh = builder.load(_byte_ptr(builder, blk, 2, ir.IntType(32)), align=1)
        bits = builder.zext(builder.bitcast(qh, ir.VectorType(ir.IntType(1), 32)), _V32I8)
        return builder.or_(_nibbles32(builder, blk, 6), builder.shl(bits, ir.Constant(_V32I8, [4] * 32)))
    return _blocks32_row(row, xq, xd, xs, nb, 22, levels, 16)



# --- 512-bit row dots (AVX512 above) ----------------------------------------------------------------
# The same sums as the 256-bit dots, 64 elements per vector: vector u of a 256-block holds elements
# 64u .. 64u + 63, and vpdpbusd's lane k (elements 64u + 4k .. + 3) belongs to sub-block
# (64u + 4k) // 16 (16-element sub-blocks: 4u + k // 4) or // 32 (2u + k // 8).

_V64I8 = ir.VectorType(_I8, 64)
_V16I32 = ir.VectorType(ir.IntType(32), 16)
_V16F = ir.VectorType(ir.FloatType(), 16)
_V32I16 = ir.VectorType(ir.IntType(16), 32)


def _c64(v):
    return ir.Constant(_V64I8, [v] * 64)


def _u8s8_dot16(builder, q, x):
    """<16 x i32>: lane m = sum of q[4m + j] * x[4m + j], j < 4 (q unsigned, x signed bytes; vpdpbusd zmm)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16I32, [_V16I32] * 3),
                                        "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [ir.Constant(_V16I32, [0] * 16), builder.bitcast(q, _V16I32), builder.bitcast(x, _V16I32)])


def _bcast32(builder, blk, offset):
    """<64 x i8>: the 32 bytes at blk + offset, in both halves (one vbroadcasti64x4 from memory)."""
    v = builder.load(_byte_ptr(builder, blk, offset, _V32I8), align=1)
    return builder.shuffle_vector(v, ir.Constant(_V32I8, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), 64),
                                                                                   list(range(32)) * 2))


def _shr_words(builder, v, shifts):
    """v (<64 x i8>) as 32 16-bit words, word w shifted right by shifts[w] (vpsrlvw): after a mask of
    the low bits, byte k holds bits shifts[k // 2] .. of byte k (for masks that stay within a byte)."""
    w = builder.lshr(builder.bitcast(v, _V32I16), ir.Constant(_V32I16, shifts))
    return builder.bitcast(w, _V64I8)


def _halves_shr(builder, v, lo, hi):
    """_shr_words with the low 32 bytes shifted by lo and the high 32 by hi."""
    return _shr_words(builder, v, [lo] * 16 + [hi] * 16)


class _Accs512:
    """NACC <16 x float> accumulators taken in turn by fma, two <8 x float> by fma8 (as _Accs)."""

    def __init__(self, builder, vectors, vectors8):
        self.builder, self.vectors, self.vectors8 = builder, list(vectors), list(vectors8)
        self.turn = self.turn8 = 0

    def fma(self, a, b):
        fn = cgutils.get_or_insert_function(self.builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
        k = self.turn % len(self.vectors)
        self.turn += 1
        self.vectors[k] = self.builder.call(fn, [a, b, self.vectors[k]])

    def fma8(self, a, b):
        k = self.turn8 % len(self.vectors8)
        self.turn8 += 1
        self.vectors8[k] = self.builder.call(fma8(self.builder), [a, b, self.vectors8[k]])


def _x64(act, b, u):
    """<64 x i8>: the activations of elements 64u .. 64u + 63 of 256-block b."""
    i64 = ir.IntType(64)
    off = act.builder.add(act.builder.mul(b, ir.Constant(i64, 256)), ir.Constant(i64, 64 * u))
    return act.builder.load(_byte_ptr(act.builder, act.xq, off, _V64I8), align=1)


def _dot64(builder, acc, act, b, u, q, scale, per):
    """acc += (levels q . x of vector u, per lane) times the scale of each lane's sub-block: scale holds
    one value per sub-block of `per` elements (16: <16 x float>; 32: <8 x float>)."""
    lanes = [(64 * u + 4 * k) // per for k in range(16)]
    sv = builder.shuffle_vector(scale, ir.Constant(scale.type, ir.Undefined), ir.Constant(_V16I32, lanes))
    acc.fma(builder.sitofp(_u8s8_dot16(builder, q, _x64(act, b, u)), _V16F), sv)


def _row_dot512(row, xq, xd, xs, nb, block_bytes, body):
    """The (signature, codegen) of a whole-row int8 dot on 512-bit vectors: for each of the nb 256-blocks
    b, body(builder, blk, b, acc (_Accs512), act (_Act)); the row prefetched 2 KiB ahead."""
    if not _is_row_args(row, xq, xd, xs):
        return None

    def codegen(context, builder, sig, args):
        ra, xa, da, sa = (context.make_array(sig.args[i])(context, builder, args[i]) for i in range(4))
        i8p, i64, f32 = _I8.as_pointer(), ir.IntType(64), ir.FloatType()
        rbase = builder.bitcast(ra.data, i8p)
        act = _Act(builder, builder.bitcast(xa.data, i8p), da.data, sa.data, args[4], 256)
        kinds = [(_V16F, NACC), (_V8F32, 2)]
        slots = [[cgutils.alloca_once(builder, ty) for _ in range(n)] for ty, n in kinds]
        for (ty, _), group in zip(kinds, slots):
            for slot in group:
                builder.store(ir.Constant(ty, [0.0] * ty.count), slot)
        with cgutils.for_range(builder, args[4]) as loop:
            blk = _byte_ptr(builder, rbase, builder.mul(loop.index, ir.Constant(i64, block_bytes)))
            _prefetch_ir(builder, _byte_ptr(builder, blk, 2048))
            if block_bytes > 64:
                _prefetch_ir(builder, _byte_ptr(builder, blk, 2048 + 64))
            acc = _Accs512(builder, [builder.load(s) for s in slots[0]], [builder.load(s) for s in slots[1]])
            body(builder, blk, loop.index, acc, act)
            for slot, v in zip(slots[0] + slots[1], acc.vectors + acc.vectors8):
                builder.store(v, slot)
        total = builder.load(slots[0][0])
        for slot in slots[0][1:]:
            total = builder.fadd(total, builder.load(slot))
        red = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, _V16F]),
                                             "llvm.vector.reduce.fadd.v16f32")
        out = builder.call(red, [ir.Constant(f32, 0.0), total])
        out.fastmath.add("reassoc")
        return builder.fadd(out, _hsum8(builder, builder.fadd(builder.load(slots[1][0]), builder.load(slots[1][1]))))
    return types.float32(row, xq, xd, xs, types.int64), codegen


def _xd16(act, b):
    """<16 x float>: xd[8b + j // 2] for j < 16 (the activation scale of each 16-sub-block of block b)."""
    builder = act.builder
    xdv = act.vec(act.xd, builder.mul(b, ir.Constant(ir.IntType(64), 8)), 8)
    return builder.shuffle_vector(xdv, ir.Constant(_V8F32, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), 16), [j // 2 for j in range(16)]))


def _pair_lanes(builder, v16, v):
    """<8 x float> from a <16 x float> of per-16-sub-block values: lanes 0-3 = v16[2v], 4-7 = v16[2v+1]
    (the sub-blocks whose sums vpdpbusd's lanes hold for the 32 elements 32v .. 32v+31)."""
    return builder.shuffle_vector(v16, ir.Constant(v16.type, ir.Undefined),
                                  ir.Constant(_V8I32, [2 * v] * 4 + [2 * v + 1] * 4))


def _x256(act, b, v):
    """<32 x i8>: the activations of elements 32v .. 32v + 31 of 256-block b."""
    i64 = ir.IntType(64)
    return act.x(act.builder.add(act.builder.mul(b, ir.Constant(i64, 256)), ir.Constant(i64, 32 * v)))


def _dot16_terms(builder, acc, act, b, levels, scale16):
    """For the eight 32-vectors of levels of 256-block b (<32 x i8> each, unsigned), adds
    sum over lanes of (levels . x) times scale16's value for the vector's two 16-sub-blocks."""
    for v, q in enumerate(levels):
        acc.fma(builder.sitofp(_u8s8_dot8(builder, q, _x256(act, b, v)), _V8F32), _pair_lanes(builder, scale16, v))


@intrinsic
def q6_k_dot_i8(typingctx, row, xq, xd, xs, nb):
    """sum over the nb Q6_K blocks of row (210 bytes: 128 bytes ql, 64 bytes qh, 16 int8 scales,
    fp16 d) of d * sum_j sc_j * (xd[j // 2] * sum_k q_jk xq_jk - 32 xs16_j), j over the 16 sub-blocks
    of 16. Per half h of 128: ql bytes A = ql[64h:64h+32], C = ql[64h+32:64h+64], high bits
    H = qh[32h:32h+32] give the four 32-vectors of levels A & 15 | (H & 3) << 4, C & 15 | (H & 12) << 2,
    A >> 4 | H & 48, C >> 4 | (H & 192) >> 2 (elements 128h + 32i + l); each is one vpdpbusd, whose
    lanes 0-3 hold sub-block 2(4h + i) and 4-7 the next, so the 16 scales times d times xd are
    applied as one <8 x float> per vector."""
    v16i8, v16f = ir.VectorType(_I8, 16), ir.VectorType(ir.FloatType(), 16)

    def scales(builder, blk):
        """<16 x float> d sc_j."""
        d = splat(builder, _f16_at(builder, blk, 208), v16f)
        return builder.fmul(builder.sitofp(builder.load(_byte_ptr(builder, blk, 192, v16i8), align=1), v16f), d)

    def body(builder, blk, b, acc, act):
        sc = scales(builder, blk)
        levels = []
        for h in range(2):
            a = builder.load(_byte_ptr(builder, blk, 64 * h, _V32I8), align=1)
            cc = builder.load(_byte_ptr(builder, blk, 64 * h + 32, _V32I8), align=1)
            hb = builder.load(_byte_ptr(builder, blk, 128 + 32 * h, _V32I8), align=1)
            levels += [builder.or_(builder.and_(a, _c32(15)), builder.shl(builder.and_(hb, _c32(3)), _c32(4))),
                       builder.or_(builder.and_(cc, _c32(15)), builder.shl(builder.and_(hb, _c32(12)), _c32(2))),
                       builder.or_(builder.lshr(a, _c32(4)), builder.and_(hb, _c32(48))),
                       builder.or_(builder.lshr(cc, _c32(4)), builder.lshr(builder.and_(hb, _c32(192)), _c32(2)))]
        _dot16_terms(builder, acc, act, b, levels, builder.fmul(sc, _xd16(act, b)))
        _fma16(builder, acc, builder.fmul(sc, ir.Constant(v16f, [-32.0] * 16)), act.xs16(b))

    def body512(builder, blk, b, acc, act):
        # vector u: elements 128h + 64o .. + 63 (h = u // 2, o = u % 2): ql bytes [A | C] (64 at 64h),
        # their low nibbles (o = 0) or high (o = 1), high bits H >> 4o (low half), >> 4o + 2 (high)
        sc = scales(builder, blk)
        scale = builder.fmul(sc, _xd16(act, b))
        for u in range(4):
            h, o = u // 2, u % 2
            ac = builder.load(_byte_ptr(builder, blk, 64 * h, _V64I8), align=1)
            low = builder.and_(_halves_shr(builder, ac, 4, 4) if o else ac, _c64(15))
            hb = _halves_shr(builder, _bcast32(builder, blk, 128 + 32 * h), 4 * o, 4 * o + 2)
            _dot64(builder, acc, act, b, u, builder.or_(low, builder.shl(builder.and_(hb, _c64(3)), _c64(4))), scale, 16)
        acc.fma(builder.fmul(sc, ir.Constant(v16f, [-32.0] * 16)), act.xs16(b))
    if AVX512:
        return _row_dot512(row, xq, xd, xs, nb, 210, body512)
    return _row_dot(row, xq, xd, xs, nb, 210, 256, body)


@intrinsic
def q2_k_dot_i8(typingctx, row, xq, xd, xs, nb):
    """sum over the nb Q2_K blocks of row (84 bytes: 16 bytes of 4-bit scale | 4-bit min << 4, 64 bytes
    of 2-bit levels, fp16 d, fp16 dmin) of sum_j (d sc_j xd[j // 2] sum_k q_jk xq_jk - dmin m_j xs16_j).
    Levels of element 128h + 32i + l: bits 2i of qs[32h + l], one vpdpbusd per 32-vector (lanes 0-3:
    sub-block 2(4h + i), 4-7: the next)."""
    v16i8, v16f = ir.VectorType(_I8, 16), ir.VectorType(ir.FloatType(), 16)

    def scales(builder, blk, b, act):
        """<16 x float> d sc_j xd[j // 2] and -dmin m_j."""
        sc = builder.load(_byte_ptr(builder, blk, 0, v16i8), align=1)
        scale = builder.fmul(builder.fmul(builder.uitofp(builder.and_(sc, ir.Constant(v16i8, [15] * 16)), v16f),
                                          _xd16(act, b)), splat(builder, _f16_at(builder, blk, 80), v16f))
        mins = builder.fmul(builder.uitofp(builder.lshr(sc, ir.Constant(v16i8, [4] * 16)), v16f),
                            splat(builder, builder.fneg(_f16_at(builder, blk, 82)), v16f))
        return scale, mins

    def body512(builder, blk, b, acc, act):
        # vector u: elements 128h + 64o .. + 63 (h = u // 2, o = u % 2): bits 4o of qs[32h:32h+32]
        # (low half), bits 4o + 2 (high half)
        scale, mins = scales(builder, blk, b, act)
        acc.fma(mins, act.xs16(b))
        for u in range(4):
            h, o = u // 2, u % 2
            q = builder.and_(_halves_shr(builder, _bcast32(builder, blk, 16 + 32 * h), 4 * o, 4 * o + 2), _c64(3))
            _dot64(builder, acc, act, b, u, q, scale, 16)
    if AVX512:
        return _row_dot512(row, xq, xd, xs, nb, 84, body512)

    def body(builder, blk, b, acc, act):
        scale, mins = scales(builder, blk, b, act)
        levels = []
        for h in range(2):
            qs = builder.load(_byte_ptr(builder, blk, 16 + 32 * h, _V32I8), align=1)
            levels += [builder.and_(builder.lshr(qs, _c32(2 * i)), _c32(3)) for i in range(4)]
        _dot16_terms(builder, acc, act, b, levels, scale)
        _fma16(builder, acc, mins, act.xs16(b))
    return _row_dot(row, xq, xd, xs, nb, 84, 256, body)


@intrinsic
def q3_k_dot_i8(typingctx, row, xq, xd, xs, nb):
    """sum over the nb Q3_K blocks of row (110 bytes: 32 bytes hmask, 64 bytes of 2-bit levels, 12 bytes
    of 6-bit scales, fp16 d) of d * sum_j (sc_j - 32) (xd[j // 2] sum_k q_jk xq_jk - 4 xs16_j), q the
    unsigned level 0..7 (weight level q - 4). Element 128h + 32i + l: bits 2i of qs[32h + l] | bit
    4h + i of hmask[l] << 2; the 16 scales unpacked as one <16 x i8> (low 4 bits: byte j % 8 >> 4 (j // 8),
    high 2: byte 8 + j % 4 >> 2 (j // 4))."""
    i32 = ir.IntType(32)
    v16i8, v16f, v12i8 = ir.VectorType(_I8, 16), ir.VectorType(ir.FloatType(), 16), ir.VectorType(_I8, 12)

    def scales(builder, blk):
        raw = builder.load(_byte_ptr(builder, blk, 96, v12i8), align=1)
        undef = ir.Constant(v12i8, ir.Undefined)
        lo = builder.shuffle_vector(raw, undef, ir.Constant(ir.VectorType(i32, 16), [j % 8 for j in range(16)]))
        lo = builder.and_(builder.lshr(lo, ir.Constant(v16i8, [4 * (j // 8) for j in range(16)])),
                          ir.Constant(v16i8, [15] * 16))
        hi = builder.shuffle_vector(raw, undef, ir.Constant(ir.VectorType(i32, 16), [8 + j % 4 for j in range(16)]))
        hi = builder.and_(builder.lshr(hi, ir.Constant(v16i8, [2 * (j // 4) for j in range(16)])),
                          ir.Constant(v16i8, [3] * 16))
        sc = builder.sub(builder.or_(lo, builder.shl(hi, ir.Constant(v16i8, [4] * 16))), ir.Constant(v16i8, [32] * 16))
        return builder.fmul(builder.sitofp(sc, v16f), splat(builder, _f16_at(builder, blk, 108), v16f))

    def body512(builder, blk, b, acc, act):
        # vector u: elements 128h + 64o .. + 63 (h = u // 2, o = u % 2): low bits as Q2_K's, high bit
        # 4h + 2o of hmask (low half), 4h + 2o + 1 (high half)
        sc = scales(builder, blk)
        hm = _bcast32(builder, blk, 0)
        for u in range(4):
            h, o = u // 2, u % 2
            low = builder.and_(_halves_shr(builder, _bcast32(builder, blk, 32 + 32 * h), 4 * o, 4 * o + 2), _c64(3))
            high = builder.and_(_halves_shr(builder, hm, 4 * h + 2 * o, 4 * h + 2 * o + 1), _c64(1))
            _dot64(builder, acc, act, b, u, builder.or_(low, builder.shl(high, _c64(2))), builder.fmul(sc, _xd16(act, b)), 16)
        acc.fma(builder.fmul(sc, ir.Constant(v16f, [-4.0] * 16)), act.xs16(b))
    if AVX512:
        return _row_dot512(row, xq, xd, xs, nb, 110, body512)

    def body(builder, blk, b, acc, act):
        sc = scales(builder, blk)
        hm = builder.load(_byte_ptr(builder, blk, 0, _V32I8), align=1)
        levels = []
        for h in range(2):
            qs = builder.load(_byte_ptr(builder, blk, 32 + 32 * h, _V32I8), align=1)
            for i in range(4):
                low = builder.and_(builder.lshr(qs, _c32(2 * i)), _c32(3))
                levels.append(builder.or_(low, builder.shl(builder.and_(builder.lshr(hm, _c32(4 * h + i)), _c32(1)), _c32(2))))
        _dot16_terms(builder, acc, act, b, levels, builder.fmul(sc, _xd16(act, b)))
        _fma16(builder, acc, builder.fmul(sc, ir.Constant(v16f, [-4.0] * 16)), act.xs16(b))
    return _row_dot(row, xq, xd, xs, nb, 110, 256, body)


def _q4k_scales_mins(builder, blk):
    """The eight 6-bit scales and mins of the Q4_K/Q5_K block at blk, as two <8 x i8> (shuffles,
    masks, shifts: sc_j = b[j] & 63 and m_j = b[j+4] & 63 for j < 4; for j >= 4,
    sc_j = (b[j+4] & 15) | (b[j-4] >> 6) << 4 and m_j = (b[j+4] >> 4) | (b[j] >> 6) << 4, b the 12 bytes
    at blk + 4)."""
    i32 = ir.IntType(32)
    v8i8, v12i8 = ir.VectorType(_I8, 8), ir.VectorType(_I8, 12)
    b = builder.load(_byte_ptr(builder, blk, 4, v12i8), align=1)

    def pick(idx):
        return builder.shuffle_vector(b, ir.Constant(v12i8, ir.Undefined), ir.Constant(ir.VectorType(i32, 8), idx))

    def c8(vals):
        return ir.Constant(v8i8, vals)
    lo4 = ir.Constant(ir.VectorType(ir.IntType(1), 8), [True] * 4 + [False] * 4)
    a = pick([0, 1, 2, 3, 8, 9, 10, 11])           # b[j] (j < 4) / b[j+4] (j >= 4)
    hi2 = builder.shl(builder.lshr(pick([0, 1, 2, 3, 0, 1, 2, 3]), c8([6] * 8)), c8([4] * 8))   # (b[j-4] >> 6) << 4
    sc = builder.select(lo4, builder.and_(a, c8([63] * 8)), builder.or_(builder.and_(a, c8([15] * 8)), hi2))
    mm = pick([4, 5, 6, 7, 8, 9, 10, 11])          # b[j+4]
    mh = builder.shl(builder.lshr(pick([4, 5, 6, 7, 4, 5, 6, 7]), c8([6] * 8)), c8([4] * 8))   # (b[j] >> 6) << 4
    m = builder.select(lo4, builder.and_(mm, c8([63] * 8)), builder.or_(builder.lshr(mm, c8([4] * 8)), mh))
    return sc, m


def _k_row_dot(row, xq, xd, xs, nb, block_bytes, levels, levels512):
    """_row_dot of Q4_K / Q5_K: sum over blocks of sum_j (d sc_j xd_j sum_k q_jk xq_jk - dmin m_j xs_j),
    j over the eight 32-sub-blocks, scales and mins unpacked as vectors (_q4k_scales_mins), one
    vpdpbusd per sub-block; levels(builder, blk) -> the eight <32 x i8> level vectors; with AVX512,
    levels512(builder, blk) -> the four <64 x i8> (sub-blocks 2u, 2u + 1 in vector u)."""
    def scales(builder, blk, b, act):
        """<8 x float> d sc_j xd_j, -dmin m_j and xs_j for the eight sub-blocks of block b."""
        sc, m = _q4k_scales_mins(builder, blk)
        b8 = builder.mul(b, ir.Constant(ir.IntType(64), 8))
        scale = builder.fmul(builder.fmul(builder.uitofp(sc, _V8F32), splat(builder, _f16_at(builder, blk, 0), _V8F32)),
                             act.vec(act.xd, b8, 8))
        mins = builder.fmul(builder.uitofp(m, _V8F32), splat(builder, builder.fneg(_f16_at(builder, blk, 2)), _V8F32))
        return scale, mins, act.vec(act.xs, b8, 8)

    def body512(builder, blk, b, acc, act):
        scale, mins, xs8 = scales(builder, blk, b, act)
        acc.fma8(mins, xs8)
        for u, q in enumerate(levels512(builder, blk)):
            _dot64(builder, acc, act, b, u, q, scale, 32)
    if AVX512:
        return _row_dot512(row, xq, xd, xs, nb, block_bytes, body512)

    def body(builder, blk, b, acc, act):
        scale, mins, xs8 = scales(builder, blk, b, act)
        acc.fma(mins, xs8)
        undef = ir.Constant(_V8F32, ir.Undefined)
        for j, q in enumerate(levels(builder, blk)):
            acc.fma(builder.sitofp(_u8s8_dot8(builder, q, _x256(act, b, j)), _V8F32),
                    builder.shuffle_vector(scale, undef, ir.Constant(_V8I32, [j] * 8)))
    return _row_dot(row, xq, xd, xs, nb, block_bytes, 256, body)


@intrinsic
def q4_k_dot_i8(typingctx, row, xq, xd, xs, nb):
    """sum over the nb Q4_K blocks of row (144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and
    mins, 128 nibble bytes) of sum_j (d sc_j xd_j sum_k q_jk xq_jk - dmin m_j xs_j): sub-block j = 2i + h
    is nibble 4h of bytes 16 + 32i .. 16 + 32i + 31 (_k_row_dot)."""
    def levels(builder, blk):
        out = []
        for i in range(4):
            qv = builder.load(_byte_ptr(builder, blk, 16 + 32 * i, _V32I8), align=1)
            out += [builder.and_(builder.lshr(qv, _c32(4 * h)), _c32(15)) for h in range(2)]
        return out

    def levels512(builder, blk):
        return [builder.and_(_halves_shr(builder, _bcast32(builder, blk, 16 + 32 * u), 0, 4), _c64(15)) for u in range(4)]
    return _k_row_dot(row, xq, xd, xs, nb, 144, levels, levels512)


@intrinsic
def q5_k_dot_i8(typingctx, row, xq, xd, xs, nb):
    """As q4_k_dot_i8 for Q5_K (176 bytes: fp16 d, fp16 dmin, 12 bytes of scales and mins, 32 bytes qh,
    128 nibble bytes): the level of element k of sub-block j = 2i + h is nibble 4h of byte 48 + 32i + k
    | bit j of qh[k] << 4 (0..31)."""
    def levels(builder, blk):
        qh = builder.load(_byte_ptr(builder, blk, 16, _V32I8), align=1)
        out = []
        for i in range(4):
            qv = builder.load(_byte_ptr(builder, blk, 48 + 32 * i, _V32I8), align=1)
            for h in range(2):
                high = builder.shl(builder.and_(builder.lshr(qh, _c32(2 * i + h)), _c32(1)), _c32(4))
                out.append(builder.or_(builder.and_(builder.lshr(qv, _c32(4 * h)), _c32(15)), high))
        return out

    def levels512(builder, blk):
        qh = _bcast32(builder, blk, 16)
        out = []
        for u in range(4):
            low = builder.and_(_halves_shr(builder, _bcast32(builder, blk, 48 + 32 * u), 0, 4), _c64(15))
            high = builder.shl(builder.and_(_halves_shr(builder, qh, 2 * u, 2 * u + 1), _c64(1)), _c64(4))
            out.append(builder.or_(low, high))
        return out
    return _k_row_dot(row, xq, xd, xs, nb, 176, levels, levels512)


def _lookup16(builder, table, idx):
    """<32 x i8>: table[idx[k]] for 4-bit indexes idx (<32 x i8>, values < 16) and a 16-entry byte
    table (a list of ints): vpshufb with AVX2, pshufb per half with SSSE3, else 16 compare-selects."""
    v16 = ir.VectorType(_I8, 16)
    if AVX2:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V32I8, [_V32I8, _V32I8]),
                                            "llvm.x86.avx2.pshuf.b")
        return builder.call(fn, [ir.Constant(_V32I8, [t & 255 for t in table] * 2), idx])
    if SSSE3:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, v16]), "llvm.x86.ssse3.pshuf.b.128")
        tab = ir.Constant(v16, [t & 255 for t in table])
        undef = ir.Constant(_V32I8, ir.Undefined)
        halves = [builder.call(fn, [tab, builder.shuffle_vector(idx, undef, ir.Constant(ir.VectorType(ir.IntType(32), 16),
                                                                                       list(range(16 * p, 16 * p + 16))))])
                  for p in range(2)]
        return builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))
    out = ir.Constant(_V32I8, [0] * 32)
    for t, val in enumerate(table):
        out = builder.select(builder.icmp_unsigned("==", idx, _c32(t)), _c32(val & 255), out)
    return out


@intrinsic
def iq4_xs_dot_i8(typingctx, row, xq, xd, xs, nb):
    """sum over the nb IQ4_XS blocks of row (136 bytes: fp16 d, 16 bits of high scale bits, 4 bytes of
    low scale nibbles, 128 bytes of 4-bit indexes) of d * sum_j (ls_j - 32) (xd[j] sum_k kv[idx_jk] xq_jk)
    (kv: quant.ggml.KVALUES_IQ4). Sub-block j: the nibbles of qs[16j:16j+16] (low: elements 0-15,
    high: 16-31) looked up in kv + 128 (unsigned, so vpdpbusd applies; 128 xs_j subtracted)."""
    from ..quant.ggml import KVALUES_IQ4
    table = [int(v) + 128 for v in KVALUES_IQ4]
    i16, i64 = ir.IntType(16), ir.IntType(64)
    v8i8, v8i16, v4i8 = ir.VectorType(_I8, 8), ir.VectorType(i16, 8), ir.VectorType(_I8, 4)

    def scales(builder, blk):
        """<8 x float>: d (ls_j - 32) for the 8 sub-blocks."""
        sl = builder.load(_byte_ptr(builder, blk, 4, v4i8), align=1)
        lo = builder.shuffle_vector(sl, ir.Constant(v4i8, ir.Undefined), ir.Constant(_V8I32, [j // 2 for j in range(8)]))
        lo = builder.and_(builder.lshr(lo, ir.Constant(v8i8, [4 * (j % 2) for j in range(8)])), ir.Constant(v8i8, [15] * 8))
        sh = splat(builder, builder.load(_byte_ptr(builder, blk, 2, i16), align=1), v8i16)
        hi = builder.trunc(builder.and_(builder.lshr(sh, ir.Constant(v8i16, [2 * j for j in range(8)])),
                                        ir.Constant(v8i16, [3] * 8)), v8i8)
        ls = builder.sub(builder.or_(lo, builder.shl(hi, ir.Constant(v8i8, [4] * 8))), ir.Constant(v8i8, [32] * 8))
        return builder.fmul(builder.sitofp(ls, _V8F32), splat(builder, _f16_at(builder, blk, 0), _V8F32))

    def body512(builder, blk, b, acc, act):
        # vector u: sub-blocks 2u, 2u + 1 = the 32 bytes at 8 + 32u, each 16 as [low nibbles, high]
        ls = scales(builder, blk)
        b8 = builder.mul(b, ir.Constant(i64, 8))
        acc.fma8(builder.fmul(ls, ir.Constant(_V8F32, [-128.0] * 8)), act.vec(act.xs, b8, 8))
        scale = builder.fmul(ls, act.vec(act.xd, b8, 8))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V64I8, [_V64I8, _V64I8]),
                                            "llvm.x86.avx512.pshuf.b.512")
        tab = ir.Constant(_V64I8, [t & 255 for t in table] * 4)
        spread = ir.Constant(ir.VectorType(ir.IntType(32), 64), list(range(16)) * 2 + list(range(16, 32)) * 2)
        for u in range(4):
            v = builder.load(_byte_ptr(builder, blk, 8 + 32 * u, _V32I8), align=1)
            idx = builder.shuffle_vector(v, ir.Constant(_V32I8, ir.Undefined), spread)
            idx = builder.and_(_shr_words(builder, idx, ([0] * 8 + [4] * 8) * 2), _c64(15))
            _dot64(builder, acc, act, b, u, builder.call(fn, [tab, idx]), scale, 32)
    if AVX512:
        return _row_dot512(row, xq, xd, xs, nb, 136, body512)

    def body(builder, blk, b, acc, act):
        ls = scales(builder, blk)
        b8 = builder.mul(b, ir.Constant(i64, 8))
        scale = builder.fmul(ls, act.vec(act.xd, b8, 8))
        acc.fma(builder.fmul(ls, ir.Constant(_V8F32, [-128.0] * 8)), act.vec(act.xs, b8, 8))
        undef = ir.Constant(_V8F32, ir.Undefined)
        for j in range(8):
            q = _lookup16(builder, table, _nibbles32(builder, blk, 8 + 16 * j))
            acc.fma(builder.sitofp(_u8s8_dot8(builder, q, _x256(act, b, j)), _V8F32),
                    builder.shuffle_vector(scale, undef, ir.Constant(_V8I32, [j] * 8)))
    return _row_dot(row, xq, xd, xs, nb, 136, 256, body)

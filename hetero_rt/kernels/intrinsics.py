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
  q4_to_i32 / q5_to_i32 / q3_to_i32: the same values as int32 (the int8-activation dots)
  u8_to_i32(v, shift, mask)  ((v >> shift) & mask) as int32, computed on 8-bit integers
and, written directly as vector IR, the int8-activation dots of whole rows or blocks (vpdpbusd with
AVX512-VNNI or AVX-VNNI, else 32-bit multiplies LLVM lowers to pmaddwd): q8_0_dot_i8, q4_0_dot_i8,
q5_0_dot_i8, q2_k_dot_i8, q3_k_dot_i8, q6_k_dot_i8, iq4_xs_dot_i8 (rows) and q4k_block_i8 (one
256-block).
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
    """fp32 of the IEEE half whose bits are the i16 h16: vcvtph2ps where the target has F16C; else
    exponent and mantissa moved into fp32's fields and rescaled by 2**112 (fp32's bias less fp16's),
    which also turns fp16 subnormals into normal fp32s (LLVM's own fallback is a libcall numba's JIT
    does not link). Inf/NaN halves come out finite there; weights and scales carry none."""
    if F16C:
        return builder.fpext(builder.bitcast(h16, ir.HalfType()), ir.FloatType())
    i32 = ir.IntType(32)
    v = builder.zext(h16, i32)
    sign = builder.shl(builder.and_(v, ir.Constant(i32, 0x8000)), ir.Constant(i32, 16))
    body = builder.bitcast(builder.shl(builder.and_(v, ir.Constant(i32, 0x7FFF)), ir.Constant(i32, 13)),
                           ir.FloatType())
    scaled = builder.bitcast(builder.fmul(body, ir.Constant(ir.FloatType(), 2.0 ** 112)), i32)
    return builder.bitcast(builder.or_(scaled, sign), ir.FloatType())


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
def q3_to_i32(typingctx, lo, hi, ls, hs):
    def codegen(context, builder, sig, args):
        return builder.sext(_q3(builder, *args), ir.IntType(32))
    return types.int32(types.uint8, types.uint8, types.int64, types.int64), codegen


@intrinsic
def u8_to_i32(typingctx, v, shift, mask):
    def codegen(context, builder, sig, args):
        v8, shift, mask = args
        q = builder.and_(builder.lshr(v8, builder.trunc(shift, _I8)), builder.trunc(mask, _I8))
        return builder.zext(q, ir.IntType(32))
    return types.int32(types.uint8, types.int64, types.int64), codegen


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
def q5_to_i32(typingctx, lo, hi, ls, hs):
    def codegen(context, builder, sig, args):
        return builder.zext(_q5(builder, *args), ir.IntType(32))
    return types.int32(types.uint8, types.uint8, types.int64, types.int64), codegen


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


@intrinsic
def q4k_block_i8(typingctx, row, o, xq, xo, xd, xs, xb):
    """One whole Q4_K block at row[o:] (144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and
    mins, 128 nibble bytes) dotted with int8 activations xq[xo:xo+256] (scales xd[xb:xb+8], block
    sums xs[xb:xb+8] = xd * sum of each 32 of xq), all in vector registers:
        sum_j d sc_j xd_j sum_k q_jk xq_jk  -  dmin sum_j m_j xs_j.
    The eight 6-bit scales and mins are unpacked together as <8 x i8> (shuffles, masks, shifts:
    sc_j = b[j] & 63 and m_j = b[j+4] & 63 for j < 4; for j >= 4, sc_j = (b[j+4] & 15) | (b[j-4] >> 6) << 4
    and m_j = (b[j+4] >> 4) | (b[j] >> 6) << 4), the integer dots are vpdpbusd with AVX512-VNNI (see
    _u8s8_dot8), and one horizontal sum ends the block."""
    if not (isinstance(row, types.Array) and row.dtype == types.uint8 and isinstance(xq, types.Array)
            and xq.dtype == types.int8 and isinstance(xd, types.Array) and xd.dtype == types.float32
            and isinstance(xs, types.Array) and xs.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        ra, xa = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 2))
        da, sa = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (4, 5))
        i8, i32 = _I8, ir.IntType(32)
        v8i8, v12i8 = ir.VectorType(i8, 8), ir.VectorType(i8, 12)
        blk = _byte_ptr(builder, builder.bitcast(ra.data, i8.as_pointer()), args[1])
        xb = _byte_ptr(builder, builder.bitcast(xa.data, i8.as_pointer()), args[3])
        d, dmin = _f16_at(builder, blk, 0), _f16_at(builder, blk, 2)
        b = builder.load(_byte_ptr(builder, blk, 4, v12i8), align=1)

        def pick(idx):
            return builder.shuffle_vector(b, ir.Constant(v12i8, ir.Undefined), ir.Constant(ir.VectorType(i32, 8), idx))

        def c8(vals):
            return ir.Constant(v8i8, vals)
        lo4 = [True] * 4 + [False] * 4
        a = pick([0, 1, 2, 3, 8, 9, 10, 11])           # b[j] (j < 4) / b[j+4] (j >= 4)
        hi2 = builder.shl(builder.lshr(pick([0, 1, 2, 3, 0, 1, 2, 3]), c8([6] * 8)), c8([4] * 8))   # (b[j-4] >> 6) << 4
        sc = builder.select(ir.Constant(ir.VectorType(ir.IntType(1), 8), lo4), builder.and_(a, c8([63] * 8)),
                            builder.or_(builder.and_(a, c8([15] * 8)), hi2))
        mm = pick([4, 5, 6, 7, 8, 9, 10, 11])          # b[j+4]
        mh = builder.shl(builder.lshr(pick([4, 5, 6, 7, 4, 5, 6, 7]), c8([6] * 8)), c8([4] * 8))   # (b[j] >> 6) << 4
        m = builder.select(ir.Constant(ir.VectorType(ir.IntType(1), 8), lo4), builder.and_(mm, c8([63] * 8)),
                           builder.or_(builder.lshr(mm, c8([4] * 8)), mh))
        xdp = builder.bitcast(builder.gep(da.data, [args[6]]), _V8F32.as_pointer())
        xsp = builder.bitcast(builder.gep(sa.data, [args[6]]), _V8F32.as_pointer())
        scale = builder.fmul(builder.fmul(builder.uitofp(sc, _V8F32), splat(builder, d, _V8F32)),
                             builder.load(xdp, align=4))
        mins = builder.fmul(builder.fmul(builder.uitofp(m, _V8F32), splat(builder, dmin, _V8F32)),
                            builder.load(xsp, align=4))
        fma = fma8(builder)
        acc = builder.fsub(ir.Constant(_V8F32, [0.0] * 8), mins)
        undef = ir.Constant(_V8F32, ir.Undefined)
        for i in range(4):
            qv = builder.load(_byte_ptr(builder, blk, 16 + 32 * i, _V32I8), align=1)
            for h in range(2):
                j = 2 * i + h
                q = builder.and_(builder.lshr(qv, ir.Constant(_V32I8, [4 * h] * 32)), ir.Constant(_V32I8, [15] * 32))
                xv = builder.load(_byte_ptr(builder, xb, 32 * j, _V32I8), align=1)
                sj = builder.shuffle_vector(scale, undef, ir.Constant(_V8I32, [j] * 8))
                acc = builder.call(fma, [builder.sitofp(_u8s8_dot8(builder, q, xv), _V8F32), sj, acc])
        return _hsum8(builder, acc)
    u64 = types.uint64
    return types.float32(row, u64, xq, u64, xd, xs, types.int64), codegen


def _c32(v):
    return ir.Constant(_V32I8, [v] * 32)


def _is_row_args(row, xq, xd) -> bool:
    return (isinstance(row, types.Array) and row.dtype == types.uint8 and isinstance(xq, types.Array)
            and xq.dtype == types.int8 and isinstance(xd, types.Array) and xd.dtype == types.float32)


def _offset_dot8(builder, q, x, shift):
    """<8 x i32>: lane m = sum over j < 4 of (q[4m + j] - 2**shift) * x[4m + j], q unsigned bytes below
    256, x signed: vpdpbusd of q less 2**shift times the vpdpbusd of 1s against x."""
    return builder.sub(_u8s8_dot8(builder, q, x),
                       builder.shl(_u8s8_dot8(builder, _c32(1), x), ir.Constant(_V8I32, [shift] * 8)))


def _row_blocks(context, builder, sig, args, block_bytes, body):
    """The loop of a whole-row int8 dot (args: row, xq, xd, nb): for each of the nb blocks b of the
    row (block_bytes each), acc = body(builder, blk (i8*: the block), xbase (i8*: xq), b, xd (float*),
    acc) on an <8 x float> accumulator; the row is prefetched 2 KiB ahead; one horizontal sum at
    the end."""
    ra = context.make_array(sig.args[0])(context, builder, args[0])
    xa = context.make_array(sig.args[1])(context, builder, args[1])
    da = context.make_array(sig.args[2])(context, builder, args[2])
    i8p, i64 = _I8.as_pointer(), ir.IntType(64)
    rbase, xbase = builder.bitcast(ra.data, i8p), builder.bitcast(xa.data, i8p)
    acc = cgutils.alloca_once(builder, _V8F32)
    builder.store(ir.Constant(_V8F32, [0.0] * 8), acc)
    with cgutils.for_range(builder, args[3]) as loop:
        b = loop.index
        blk = _byte_ptr(builder, rbase, builder.mul(b, ir.Constant(i64, block_bytes)))
        _prefetch_ir(builder, _byte_ptr(builder, blk, 2048))
        builder.store(body(builder, blk, xbase, b, da.data, builder.load(acc)), acc)
    return _hsum8(builder, builder.load(acc))


def _blocks32_dot(builder, blk, xbase, b, xd, acc, q, shift):
    """acc + d_b * xd[b] * (the 8 lane sums of (q - 2**shift) * x) for one 32-block whose fp16 d is
    at blk and whose 32 unsigned levels are q (<32 x i8>)."""
    x = builder.load(_byte_ptr(builder, xbase, builder.mul(b, ir.Constant(ir.IntType(64), 32)), _V32I8), align=1)
    scale = builder.fmul(_f16_at(builder, blk, 0), builder.load(builder.gep(xd, [b])))
    return builder.call(fma8(builder), [builder.sitofp(_offset_dot8(builder, q, x, shift), _V8F32),
                                        splat(builder, scale, _V8F32), acc])


def _nibbles32(builder, blk, offset):
    """The 32 4-bit levels of a Q4_0/Q5_0-style block: low nibbles of the 16 bytes at blk + offset
    (elements 0-15), then their high nibbles (16-31)."""
    v16 = ir.VectorType(_I8, 16)
    qs = builder.load(_byte_ptr(builder, blk, offset, v16), align=1)
    lo = builder.and_(qs, ir.Constant(v16, [15] * 16))
    hi = builder.lshr(qs, ir.Constant(v16, [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(ir.IntType(32), 32), list(range(32))))


@intrinsic
def q8_0_dot_i8(typingctx, row, xq, xd, nb):
    """sum over the nb Q8_0 blocks of row (34 bytes: fp16 d, 32 int8 q) of d_b * xd[b] *
    sum_k q_bk * xq[32 b + k], int8 activations xq with scales xd per 32, as fp32. The signed x signed
    integer dot runs as vpdpbusd (unsigned x signed) on q + 128 (q xor 0x80), less 128 * sum_k
    xq[32 b + k] (_offset_dot8); the row loop is _row_blocks'."""
    if not _is_row_args(row, xq, xd):
        return None

    def codegen(context, builder, sig, args):
        def body(builder, blk, xbase, b, xd, acc):
            q = builder.xor(builder.load(_byte_ptr(builder, blk, 2, _V32I8), align=1), _c32(-128))
            return _blocks32_dot(builder, blk, xbase, b, xd, acc, q, 7)
        return _row_blocks(context, builder, sig, args, 34, body)
    return types.float32(row, xq, xd, types.int64), codegen


@intrinsic
def q4_0_dot_i8(typingctx, row, xq, xd, nb):
    """sum over the nb Q4_0 blocks of row (18 bytes: fp16 d, 16 bytes of nibbles) of
    d_b * xd[b] * sum_k (q_bk - 8) * xq[32 b + k], in vector registers (vpdpbusd with VNNI)."""
    if not _is_row_args(row, xq, xd):
        return None

    def codegen(context, builder, sig, args):
        def body(builder, blk, xbase, b, xd, acc):
            return _blocks32_dot(builder, blk, xbase, b, xd, acc, _nibbles32(builder, blk, 2), 3)
        return _row_blocks(context, builder, sig, args, 18, body)
    return types.float32(row, xq, xd, types.int64), codegen


@intrinsic
def q5_0_dot_i8(typingctx, row, xq, xd, nb):
    """As q4_0_dot_i8 for Q5_0 (22 bytes: fp16 d, 32 high bits qh, 16 bytes of nibbles; level =
    nibble | bit k of qh << 4, weight d * (level - 16)): the 32 high bits become bytes by a bitcast
    to <32 x i1> (vpmovm2b with AVX-512BW)."""
    if not _is_row_args(row, xq, xd):
        return None

    def codegen(context, builder, sig, args):
        def body(builder, blk, xbase, b, xd, acc):
            qh = builder.load(_byte_ptr(builder, blk, 2, ir.IntType(32)), align=1)
            bits = builder.zext(builder.bitcast(qh, ir.VectorType(ir.IntType(1), 32)), _V32I8)
            q = builder.or_(_nibbles32(builder, blk, 6), builder.shl(bits, ir.Constant(_V32I8, [4] * 32)))
            return _blocks32_dot(builder, blk, xbase, b, xd, acc, q, 4)
        return _row_blocks(context, builder, sig, args, 22, body)
    return types.float32(row, xq, xd, types.int64), codegen


@intrinsic
def q6_k_dot_i8(typingctx, row, xq, xd, nb):
    """sum over the nb Q6_K blocks of row (210 bytes: 128 bytes ql, 64 bytes qh, 16 int8 scales,
    fp16 d) of d * sum_j sc_j * xd[j // 2] * sum_k (q_jk - 32) xq_jk, j over the 16 sub-blocks of 16.
    Per half h of 128: ql bytes A = ql[64h:64h+32], C = ql[64h+32:64h+64], high bits H = qh[32h:32h+32]
    give the four 32-vectors of levels A & 15 | (H & 3) << 4, C & 15 | (H & 12) << 2, A >> 4 | H & 48,
    C >> 4 | (H & 192) >> 2 (elements 128h + 32i + l); each is one vpdpbusd, whose lanes 0-3 hold
    sub-block 2(4h + i) and 4-7 the next, so the 16 scales times d times xd are applied as one
    <8 x float> per vector."""
    if not _is_row_args(row, xq, xd):
        return None

    def codegen(context, builder, sig, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v16i8, v16f = ir.VectorType(_I8, 16), ir.VectorType(ir.FloatType(), 16)

        def body(builder, blk, xbase, b, xd, acc):
            xb = _byte_ptr(builder, xbase, builder.mul(b, ir.Constant(i64, 256)))
            xdv = builder.load(builder.bitcast(builder.gep(xd, [builder.mul(b, ir.Constant(i64, 8))]),
                                               _V8F32.as_pointer()), align=4)
            xd16 = builder.shuffle_vector(xdv, ir.Constant(_V8F32, ir.Undefined),
                                          ir.Constant(ir.VectorType(i32, 16), [j // 2 for j in range(16)]))
            sc = builder.sitofp(builder.load(_byte_ptr(builder, blk, 192, v16i8), align=1), v16f)
            full = builder.fmul(builder.fmul(sc, xd16), splat(builder, _f16_at(builder, blk, 208), v16f))
            undef = ir.Constant(v16f, ir.Undefined)
            fma = fma8(builder)
            for h in range(2):
                a = builder.load(_byte_ptr(builder, blk, 64 * h, _V32I8), align=1)
                cc = builder.load(_byte_ptr(builder, blk, 64 * h + 32, _V32I8), align=1)
                hb = builder.load(_byte_ptr(builder, blk, 128 + 32 * h, _V32I8), align=1)
                levels = [builder.or_(builder.and_(a, _c32(15)), builder.shl(builder.and_(hb, _c32(3)), _c32(4))),
                          builder.or_(builder.and_(cc, _c32(15)), builder.shl(builder.and_(hb, _c32(12)), _c32(2))),
                          builder.or_(builder.lshr(a, _c32(4)), builder.and_(hb, _c32(48))),
                          builder.or_(builder.lshr(cc, _c32(4)), builder.lshr(builder.and_(hb, _c32(192)), _c32(2)))]
                for i, q in enumerate(levels):
                    v = 4 * h + i
                    x = builder.load(_byte_ptr(builder, xb, 32 * v, _V32I8), align=1)
                    s = builder.shuffle_vector(full, undef, ir.Constant(_V8I32, [2 * v] * 4 + [2 * v + 1] * 4))
                    acc = builder.call(fma, [builder.sitofp(_offset_dot8(builder, q, x, 5), _V8F32), s, acc])
            return acc
        return _row_blocks(context, builder, sig, args, 210, body)
    return types.float32(row, xq, xd, types.int64), codegen


def _xd16(builder, xd, b):
    """<16 x float>: xd[8b + j // 2] for j < 16 (the activation scale of each 16-sub-block of block b)."""
    i64 = ir.IntType(64)
    xdv = builder.load(builder.bitcast(builder.gep(xd, [builder.mul(b, ir.Constant(i64, 8))]), _V8F32.as_pointer()),
                       align=4)
    return builder.shuffle_vector(xdv, ir.Constant(_V8F32, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), 16), [j // 2 for j in range(16)]))


def _pair_lanes(builder, v16, v):
    """<8 x float> from a <16 x float> of per-16-sub-block values: lanes 0-3 = v16[2v], 4-7 = v16[2v+1]
    (the sub-blocks whose sums vpdpbusd's lanes hold for the 32 elements 32v .. 32v+31)."""
    return builder.shuffle_vector(v16, ir.Constant(v16.type, ir.Undefined),
                                  ir.Constant(_V8I32, [2 * v] * 4 + [2 * v + 1] * 4))


@intrinsic
def q2_k_dot_i8(typingctx, row, xq, xd, nb):
    """sum over the nb Q2_K blocks of row (84 bytes: 16 bytes of 4-bit scale | 4-bit min << 4, 64 bytes
    of 2-bit levels, fp16 d, fp16 dmin) of sum_j xd[j // 2] (d sc_j sum_k q_jk xq_jk - dmin m_j
    sum_k xq_jk). Levels of element 128h + 32i + l: bits 2i of qs[32h + l], one vpdpbusd per
    32-vector (lanes 0-3: sub-block 2(4h + i), 4-7: the next), a vpdpbusd of 1s for the min term."""
    if not _is_row_args(row, xq, xd):
        return None

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        v16i8, v16f = ir.VectorType(_I8, 16), ir.VectorType(ir.FloatType(), 16)
        ones = _c32(1)

        def body(builder, blk, xbase, b, xd, acc):
            xb = _byte_ptr(builder, xbase, builder.mul(b, ir.Constant(i64, 256)))
            xd16 = _xd16(builder, xd, b)
            sc = builder.load(_byte_ptr(builder, blk, 0, v16i8), align=1)
            scale = builder.fmul(builder.fmul(builder.uitofp(builder.and_(sc, ir.Constant(v16i8, [15] * 16)), v16f),
                                              xd16), splat(builder, _f16_at(builder, blk, 80), v16f))
            mins = builder.fmul(builder.fmul(builder.uitofp(builder.lshr(sc, ir.Constant(v16i8, [4] * 16)), v16f),
                                             xd16), splat(builder, _f16_at(builder, blk, 82), v16f))
            mins = builder.fsub(ir.Constant(v16f, [0.0] * 16), mins)
            fma = fma8(builder)
            for h in range(2):
                qs = builder.load(_byte_ptr(builder, blk, 16 + 32 * h, _V32I8), align=1)
                for i in range(4):
                    v = 4 * h + i
                    q = builder.and_(builder.lshr(qs, _c32(2 * i)), _c32(3))
                    x = builder.load(_byte_ptr(builder, xb, 32 * v, _V32I8), align=1)
                    acc = builder.call(fma, [builder.sitofp(_u8s8_dot8(builder, q, x), _V8F32),
                                             _pair_lanes(builder, scale, v), acc])
                    acc = builder.call(fma, [builder.sitofp(_u8s8_dot8(builder, ones, x), _V8F32),
                                             _pair_lanes(builder, mins, v), acc])
            return acc
        return _row_blocks(context, builder, sig, args, 84, body)
    return types.float32(row, xq, xd, types.int64), codegen


@intrinsic
def q3_k_dot_i8(typingctx, row, xq, xd, nb):
    """sum over the nb Q3_K blocks of row (110 bytes: 32 bytes hmask, 64 bytes of 2-bit levels, 12 bytes
    of 6-bit scales, fp16 d) of d * sum_j (sc_j - 32) xd[j // 2] sum_k (q_jk - 4) xq_jk. Element
    128h + 32i + l: bits 2i of qs[32h + l] | bit 4h + i of hmask[l] << 2; the 16 scales unpacked as one
    <16 x i8> (low 4 bits: byte j % 8 >> 4 (j // 8), high 2: byte 8 + j % 4 >> 2 (j // 4))."""
    if not _is_row_args(row, xq, xd):
        return None

    def codegen(context, builder, sig, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v16i8, v16f, v12i8 = ir.VectorType(_I8, 16), ir.VectorType(ir.FloatType(), 16), ir.VectorType(_I8, 12)

        def body(builder, blk, xbase, b, xd, acc):
            xb = _byte_ptr(builder, xbase, builder.mul(b, ir.Constant(i64, 256)))
            raw = builder.load(_byte_ptr(builder, blk, 96, v12i8), align=1)
            undef = ir.Constant(v12i8, ir.Undefined)
            lo = builder.shuffle_vector(raw, undef, ir.Constant(ir.VectorType(i32, 16), [j % 8 for j in range(16)]))
            lo = builder.and_(builder.lshr(lo, ir.Constant(v16i8, [4 * (j // 8) for j in range(16)])),
                              ir.Constant(v16i8, [15] * 16))
            hi = builder.shuffle_vector(raw, undef, ir.Constant(ir.VectorType(i32, 16), [8 + j % 4 for j in range(16)]))
            hi = builder.and_(builder.lshr(hi, ir.Constant(v16i8, [2 * (j // 4) for j in range(16)])),
                              ir.Constant(v16i8, [3] * 16))
            sc = builder.sub(builder.or_(lo, builder.shl(hi, ir.Constant(v16i8, [4] * 16))), ir.Constant(v16i8, [32] * 16))
            scale = builder.fmul(builder.fmul(builder.sitofp(sc, v16f), _xd16(builder, xd, b)),
                                 splat(builder, _f16_at(builder, blk, 108), v16f))
            hm = builder.load(_byte_ptr(builder, blk, 0, _V32I8), align=1)
            fma = fma8(builder)
            for h in range(2):
                qs = builder.load(_byte_ptr(builder, blk, 32 + 32 * h, _V32I8), align=1)
                for i in range(4):
                    v = 4 * h + i
                    low = builder.and_(builder.lshr(qs, _c32(2 * i)), _c32(3))
                    high = builder.shl(builder.and_(builder.lshr(hm, _c32(v)), _c32(1)), _c32(2))
                    x = builder.load(_byte_ptr(builder, xb, 32 * v, _V32I8), align=1)
                    acc = builder.call(fma, [builder.sitofp(_offset_dot8(builder, builder.or_(low, high), x, 2), _V8F32),
                                             _pair_lanes(builder, scale, v), acc])
            return acc
        return _row_blocks(context, builder, sig, args, 110, body)
    return types.float32(row, xq, xd, types.int64), codegen


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
def iq4_xs_dot_i8(typingctx, row, xq, xd, nb):
    """sum over the nb IQ4_XS blocks of row (136 bytes: fp16 d, 16 bits of high scale bits, 4 bytes of
    low scale nibbles, 128 bytes of 4-bit indexes) of d * sum_j (ls_j - 32) xd[j] sum_k kv[idx_jk] xq_jk
    (kv: quant.ggml.KVALUES_IQ4). Sub-block j: the nibbles of qs[16j:16j+16] (low: elements 0-15,
    high: 16-31) looked up in kv + 128 (unsigned, so vpdpbusd applies; 128 * sum xq subtracted)."""
    if not _is_row_args(row, xq, xd):
        return None
    from ..quant.ggml import KVALUES_IQ4
    table = [int(v) + 128 for v in KVALUES_IQ4]

    def codegen(context, builder, sig, args):
        i16, i64 = ir.IntType(16), ir.IntType(64)
        v8i8, v8i16, v4i8 = ir.VectorType(_I8, 8), ir.VectorType(i16, 8), ir.VectorType(_I8, 4)

        def body(builder, blk, xbase, b, xd, acc):
            xb = _byte_ptr(builder, xbase, builder.mul(b, ir.Constant(i64, 256)))
            sl = builder.load(_byte_ptr(builder, blk, 4, v4i8), align=1)
            lo = builder.shuffle_vector(sl, ir.Constant(v4i8, ir.Undefined), ir.Constant(_V8I32, [j // 2 for j in range(8)]))
            lo = builder.and_(builder.lshr(lo, ir.Constant(v8i8, [4 * (j % 2) for j in range(8)])), ir.Constant(v8i8, [15] * 8))
            sh = splat(builder, builder.load(_byte_ptr(builder, blk, 2, i16), align=1), v8i16)
            hi = builder.trunc(builder.and_(builder.lshr(sh, ir.Constant(v8i16, [2 * j for j in range(8)])),
                                            ir.Constant(v8i16, [3] * 8)), v8i8)
            ls = builder.sub(builder.or_(lo, builder.shl(hi, ir.Constant(v8i8, [4] * 8))), ir.Constant(v8i8, [32] * 8))
            xdv = builder.load(builder.bitcast(builder.gep(xd, [builder.mul(b, ir.Constant(i64, 8))]),
                                               _V8F32.as_pointer()), align=4)
            scale = builder.fmul(builder.fmul(builder.sitofp(ls, _V8F32), xdv), splat(builder, _f16_at(builder, blk, 0), _V8F32))
            undef = ir.Constant(_V8F32, ir.Undefined)
            fma = fma8(builder)
            for j in range(8):
                q = _lookup16(builder, table, _nibbles32(builder, blk, 8 + 16 * j))
                x = builder.load(_byte_ptr(builder, xb, 32 * j, _V32I8), align=1)
                acc = builder.call(fma, [builder.sitofp(_offset_dot8(builder, q, x, 7), _V8F32),
                                         builder.shuffle_vector(scale, undef, ir.Constant(_V8I32, [j] * 8)), acc])
            return acc
        return _row_blocks(context, builder, sig, args, 136, body)
    return types.float32(row, xq, xd, types.int64), codegen

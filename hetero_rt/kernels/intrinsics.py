"""Scalar bit-level conversions numba has no spelling for, as LLVM intrinsics. Each is one or two
LLVM instructions on narrow integers, so loops over them vectorize (a numba `x & 15` on uint8 is
promoted to int64 first, which makes LLVM convert 8-lane int64 vectors instead of 16-lane int32).

  f32_from_bits(u32)         bitcast: the fp32 whose bits are u32 (bf16 weight = bits << 16)
  f16_to_f32(u16)            IEEE half bits -> fp32 (vcvtph2ps)
  u8_to_f32(v, shift, mask)  ((v >> shift) & mask) as fp32, computed on 8-bit integers
  q5_to_f32(lo, hi, ls, hs)  ((lo >> ls) & 15) | (((hi >> hs) & 1) << 4) as fp32 (Q5_K weight)
  q6_to_f32(lo, hi, ls, hs)  (((lo >> ls) & 15) | (((hi >> hs) & 3) << 4)) - 32 as fp32 (Q6_K weight)
  q4_to_i32 / q5_to_i32 / q6_to_i32: the same values as int32 (the int8-activation dots)
"""
from __future__ import annotations

from llvmlite import ir
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


@intrinsic
def f16_to_f32(typingctx, bits):
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
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
def q6_to_i32(typingctx, lo, hi, ls, hs):
    def codegen(context, builder, sig, args):
        return builder.sext(_q6(builder, *args), ir.IntType(32))
    return types.int32(types.uint8, types.uint8, types.int64, types.int64), codegen


@intrinsic
def prefetch(typingctx, arr, offset):
    """Hint the cache to fetch the line holding byte `offset` of the 1-D uint8 array `arr` (read, keep
    in all levels). Never faults, so offsets past the end are harmless."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(builder.bitcast(ary.data, ir.IntType(8).as_pointer()), [args[1]])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
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


@intrinsic
def dot_u4s8_32(typingctx, row, qoff, shift, xq, xoff):
    """sum over k < 32 of ((row[qoff + k] >> shift) & 15) * xq[xoff + k]: 32 4-bit weights (one
    nibble of 32 consecutive bytes of the uint8 array row) times 32 int8 activations (int8 array xq),
    as int32. Written as one vector load each, a zext x sext multiply and an add-reduction, which
    LLVM compiles to a single `vpdpbusd` on CPUs with AVX512-VNNI / AVX-VNNI (pmaddubsw + pmaddwd
    otherwise). No bounds checks: the caller keeps qoff + 32 and xoff + 32 within the arrays."""
    if not (isinstance(row, types.Array) and row.dtype == types.uint8 and isinstance(xq, types.Array)
            and xq.dtype == types.int8):
        return None

    def codegen(context, builder, sig, args):
        ra = context.make_array(sig.args[0])(context, builder, args[0])
        xa = context.make_array(sig.args[3])(context, builder, args[3])
        i8p = _I8.as_pointer()
        qp = builder.bitcast(builder.gep(builder.bitcast(ra.data, i8p), [args[1]]), _V32I8.as_pointer())
        xp = builder.bitcast(builder.gep(builder.bitcast(xa.data, i8p), [args[4]]), _V32I8.as_pointer())
        undef = ir.Constant(_V32I8, ir.Undefined)
        sh = builder.insert_element(undef, builder.trunc(args[2], _I8), ir.Constant(ir.IntType(32), 0))
        sh = builder.shuffle_vector(sh, undef, ir.Constant(ir.VectorType(ir.IntType(32), 32), [0] * 32))
        q = builder.and_(builder.lshr(builder.load(qp, align=1), sh), ir.Constant(_V32I8, [15] * 32))
        prod = builder.mul(builder.zext(q, _V32I32), builder.sext(builder.load(xp, align=1), _V32I32))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), [_V32I32]),
                                            "llvm.vector.reduce.add.v32i32")
        return builder.call(fn, [prod])
    return types.int32(row, types.uint64, types.int64, xq, types.uint64), codegen

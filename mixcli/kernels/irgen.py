"""LLVM IR building blocks for the kernels written as ``numba.extending.intrinsic`` generators.

numba cannot type float16 arrays, and its integer rules widen every ``uint8 & 15`` to int64,
which defeats vectorisation; so the inner loops are small IR generators over explicit vector
types, and float16 arrays cross into numba viewed as uint16 and widen with ``half_to_f32``.
Nothing here is specific to an instruction set: LLVM legalizes these vectors for the host.
"""

from __future__ import annotations

import functools

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_JIT = dict(cache=True, fastmath=True, nogil=True)
_PJIT = dict(cache=True, fastmath=True, nogil=True, parallel=True)

_i8, _i16, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_FAST = ("fast",)


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat(t, n, v):
    return ir.Constant(_vec(t, n), [v] * n)


@functools.lru_cache(maxsize=1)
def native_half() -> bool:
    """Whether the compile target converts float16 itself. x86 needs F16C: without it (CPUs before
    2012, Atom-class Pentiums and Celerons, or ``NUMBA_CPU_NAME=generic``, a portable cache) LLVM
    turns ``fpext``/``fptrunc half`` into calls to compiler-rt's __extendhfsf2/__truncsfhf2, which
    numba's JIT cannot link: the process aborts. Other architectures convert natively."""
    if not llvm.get_process_triple().startswith(("x86_64", "i386", "i686")):
        return True
    if numba.config.CPU_NAME not in (None, "host"):
        return "+f16c" in (numba.config.CPU_FEATURES or "")
    return bool(llvm.get_host_cpu_features().get("f16c", False))


# numba's fastmath pass gives "fast" to every float op without flags; these two must round as
# IEEE says (the result's bits are the answer), and "contract" (fuse into fma) has nothing to fuse
_EXACT = ("contract",)


def _like(ty, elem):
    """elem, or a vector of elem as wide as ty."""
    return ir.VectorType(elem, ty.count) if isinstance(ty, ir.VectorType) else elem


def _k(ty, v):
    return ir.Constant(ty, [v] * ty.count) if isinstance(ty, ir.VectorType) else ir.Constant(ty, v)


def _soft(soft: bool | None) -> bool:
    """Integer steps instead of the conversion instruction: as asked, else where there is none."""
    return not native_half() if soft is None else soft


def half_to_f32(builder, bits, soft: bool | None = None):
    """i16 or <n x i16> float16 bits -> f32 or <n x f32>: ``fpext`` (one ``vcvtph2ps``) where the
    target has it (``native_half``), else integer steps that give the same value for every half,
    subnormals, infinities and NaN payloads included (numpy's widening)."""
    if not _soft(soft):
        return builder.fpext(builder.bitcast(bits, _like(bits.type, ir.HalfType())), _like(bits.type, _f32))
    ti, tf = _like(bits.type, _i32), _like(bits.type, _f32)
    u = builder.zext(bits, ti)
    o = builder.shl(builder.and_(u, _k(ti, 0x7FFF)), _k(ti, 13))  # exponent and mantissa, in place
    e = builder.and_(o, _k(ti, 0x0F800000))
    o = builder.add(o, _k(ti, 0x38000000))  # exponent bias 15 -> 127
    o = builder.select(builder.icmp_unsigned("==", e, _k(ti, 0x0F800000)), builder.add(o, _k(ti, 0x38000000)), o)
    # zero and subnormals: 2^-14 * (1 + m / 1024) - 2^-14, exact in f32
    sub = builder.fsub(builder.bitcast(builder.add(o, _k(ti, 0x00800000)), tf), _k(tf, 2.0**-14), flags=_EXACT)
    o = builder.select(builder.icmp_unsigned("==", e, _k(ti, 0)), builder.bitcast(sub, ti), o)
    o = builder.or_(o, builder.shl(builder.and_(u, _k(ti, 0x8000)), _k(ti, 16)))
    return builder.bitcast(o, tf)


def f32_to_half(builder, x, soft: bool | None = None):
    """f32 or <n x f32> -> i16 or <n x i16> float16 bits, rounded to nearest even as numpy's
    ``astype(float16)``: ``fptrunc`` where the target has it, else integer steps (overflow to
    infinity, subnormals rounded, NaN kept a NaN)."""
    if not _soft(soft):
        return builder.bitcast(builder.fptrunc(x, _like(x.type, ir.HalfType())), _like(x.type, _i16))
    ti, tf = _like(x.type, _i32), _like(x.type, _f32)
    u = builder.bitcast(x, ti)
    sign = builder.lshr(builder.and_(u, _k(ti, 0x80000000)), _k(ti, 16))
    a = builder.and_(u, _k(ti, 0x7FFFFFFF))
    # NaN: quiet, payload's top bits kept; inf and anything >= 65520 (rounds past 65504): inf
    nan = builder.or_(_k(ti, 0x7E00), builder.and_(builder.lshr(a, _k(ti, 13)), _k(ti, 0x3FF)))
    big = builder.select(builder.icmp_unsigned(">", a, _k(ti, 0x7F800000)), nan, _k(ti, 0x7C00))
    # below 2^-14: adding 0.5 aligns the half's subnormal steps to f32's last bit; the FPU rounds
    magic = _k(ti, (127 - 15 + 23 - 10 + 1) << 23)
    small = builder.fadd(builder.bitcast(a, tf), builder.bitcast(magic, tf), flags=_EXACT)
    small = builder.sub(builder.bitcast(small, ti), magic)
    # normal: rebias, round to nearest even on the 13 bits dropped
    odd = builder.and_(builder.lshr(a, _k(ti, 13)), _k(ti, 1))
    normal = builder.lshr(builder.add(builder.add(a, _k(ti, ((15 - 127) << 23) + 0xFFF)), odd), _k(ti, 13))
    o = builder.select(builder.icmp_unsigned("<", a, _k(ti, 113 << 23)), small, normal)
    o = builder.select(builder.icmp_unsigned(">=", a, _k(ti, 0x477FF000)), big, o)
    return builder.trunc(builder.or_(o, sign), _like(x.type, _i16))


@intrinsic
def h2f(typingctx, u):
    """float16 bits (uint16) -> float32, one ``vcvtph2ps`` lane (``half_to_f32``)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return half_to_f32(builder, args[0])

    return sig, codegen


@intrinsic
def f2h(typingctx, x):
    """float32 -> float16 bits (uint16), rounded to nearest even as numpy's ``astype(float16)``."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return f32_to_half(builder, args[0])

    return sig, codegen


@intrinsic
def i2f(typingctx, u):
    """int32 bits -> the float32 with those bits (a register move; vectorizes)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _f32)

    return sig, codegen


def _arr(context, builder, ty, val):
    """(byte pointer to data, [strides in bytes], [shape]) of a numba array value."""
    a = context.make_array(ty)(context, builder, val)
    strides = cgutils.unpack_tuple(builder, a.strides, ty.ndim)
    shape = cgutils.unpack_tuple(builder, a.shape, ty.ndim)
    return builder.bitcast(a.data, _i8.as_pointer()), strides, shape


def _load(builder, base, off, ty):
    ptr = builder.gep(base, [off])
    return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=1)


def _c64(v):
    return ir.Constant(_i64, v)


def _clamp(builder, v, hi):
    """min(v, hi) for int64 values."""
    return builder.select(builder.icmp_signed("<", v, hi), v, hi)


def _splat16(builder, v, ty):
    """A scalar -> <16 x ty> with it in every lane (a broadcast load when v is a load)."""
    u = builder.insert_element(ir.Constant(ty, ir.Undefined), v, ir.Constant(_i32, 0))
    return builder.shuffle_vector(u, u, ir.Constant(_vec(_i32, 16), [0] * 16))


def _bcast_pairs(builder, vec, nblk):
    """<nblk x T> -> <8*nblk x T>: each element repeated over its block's 8 lanes."""
    idx = [b for b in range(nblk) for _ in range(8)]
    return builder.shuffle_vector(vec, vec, ir.Constant(_vec(_i32, 8 * nblk), idx))


def _prefetch(builder, base, off, locality: int = 3):
    """A software prefetch (read) of the cache line at base + off."""
    pf = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32]), "llvm.prefetch.p0"
    )
    builder.call(
        pf, [builder.gep(base, [off]), ir.Constant(_i32, 0), ir.Constant(_i32, locality), ir.Constant(_i32, 1)]
    )


FP16_AS_U16 = True  # every public kernel also takes float16 arrays as their uint16 bits (Linear binds them so)


def _u16(a: np.ndarray) -> np.ndarray:
    """float16 arrays cross into numba as their uint16 bits (numba has no CPU float16)."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


@njit(**_JIT)
def _dot(w, x):
    s = np.float32(0.0)
    for k in range(x.shape[0]):
        s += w[k] * x[k]
    return s

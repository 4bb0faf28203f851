"""LLVM IR building blocks for the kernels written as ``numba.extending.intrinsic`` generators.

numba cannot type float16 arrays, and its integer rules widen every ``uint8 & 15`` to int64,
which defeats vectorisation; so the inner loops are small IR generators over explicit vector
types, and float16 arrays cross into numba viewed as uint16 and widen with ``fpext half``.
Nothing here is specific to an instruction set: LLVM legalizes these vectors for the host.
"""

from __future__ import annotations

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


@intrinsic
def h2f(typingctx, u):
    """float16 bits (uint16) -> float32, one ``vcvtph2ps`` lane."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _f32)

    return sig, codegen


@intrinsic
def f2h(typingctx, x):
    """float32 -> float16 bits (uint16), rounded to nearest even as numpy's ``astype(float16)``."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _i16)

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

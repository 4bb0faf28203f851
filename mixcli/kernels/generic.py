"""The generic tier: the byte dot as plain LLVM vector IR, no x86 intrinsics.

It runs wherever numba runs (aarch64 included), correct everywhere and tested on every host;
LLVM lowers the widening multiplies and the adds of four neighbours as well as the target allows
(it is not tuned for any: on x86 the AVX2 tier is faster). Q8_0 keeps the + 128 offset, since
nothing saturates in 32-bit arithmetic.
"""

from __future__ import annotations

from llvmlite import ir

from .irgen import _i32, _vec
from .tier import Tier, as_bytes


class Generic(Tier):
    name = "generic"

    def dot(self, builder, acc, terms, umax, chains=1):
        n = acc.type.count
        wide = _vec(_i32, 4 * n)
        for u, s in terms:
            p = builder.mul(builder.zext(as_bytes(builder, u), wide), builder.sext(as_bytes(builder, s), wide))
            quads = [
                builder.shuffle_vector(p, p, ir.Constant(_vec(_i32, n), [4 * i + j for i in range(n)]))
                for j in range(4)
            ]
            acc = builder.add(acc, builder.add(builder.add(quads[0], quads[1]), builder.add(quads[2], quads[3])))
        return acc

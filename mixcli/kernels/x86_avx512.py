"""The AVX-512 VNNI tier: one 512-bit ``vpdpbusd`` per 64 bytes, 32 vector registers.

Needs avx512vnni, avx512bw and avx512vl (Ice Lake and later Xeons, Zen 4/5). Where the host also
has GFNI, a high-nibble extraction is one ``gf2p8affineqb`` instead of a shift and a mask.

Row-tiled prefill and batched decode run the decode tile over 4 tokens at a time, as the 256-bit
tiers do, not the lane-per-token packed tile: on Zen 4 the packed tile cost 2.2x the 4-token tile
per token at every prompt length, and 8x at the 3-8 tokens of a batched decode step, where it
fills 16 lanes whatever the batch (benchmarks/RESULTS.md, 2026-12-04). On Sapphire Rapids, where
the packed tile was first chosen, the 4-token tile is 3-4x faster at 4-8 tokens and equal to 1.2x
faster at 64-256 (same file, same date). q4_k keeps the packed tile.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils

from .irgen import _i8, _i32, _i64, _vec
from .tier import Tier, chained


def _vpdpbusd(builder, n):
    ty = _vec(_i32, n)
    return cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ty, [ty] * 3), f"llvm.x86.avx512.vpdpbusd.{32 * n}"
    )


class Avx512Vnni(Tier):
    name = "avx512vnni"
    registers = 32
    rows, wide = 8, True
    mm, mm2 = (4, 4), (4, 2)
    p_rows, p_groups = 4, 2
    packed_prefill = False
    few_tokens = 4

    def __init__(self, gfni: bool = False):
        self.gfni = gfni

    def dot(self, builder, acc, terms, umax, chains=1):
        fn = _vpdpbusd(builder, acc.type.count)
        return chained(builder, acc, terms, chains, lambda b, a, u, s: b.call(fn, [a, u, s]))

    def high_nibbles(self, builder, w):
        if not (self.gfni and w.type.count == 16):
            return super().high_nibbles(builder, w)
        v64b = _vec(_i8, 64)
        gf = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v64b, [v64b, v64b, _i8]), "llvm.x86.vgf2p8affineqb.512"
        )
        hi = builder.bitcast(ir.Constant(_vec(_i64, 8), [0x1020408000000000] * 8), v64b)
        return builder.bitcast(builder.call(gf, [builder.bitcast(w, v64b), hi, ir.Constant(_i8, 0)]), w.type)

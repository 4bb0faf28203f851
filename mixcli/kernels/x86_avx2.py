"""The 256-bit x86 tiers: AVX-VNNI (``vpdpbusd`` on ymm, VEX-encoded) and plain AVX2.

AVX2 has no byte dot with 32-bit accumulation in one instruction. As llama.cpp's AVX2 path does,
``vpmaddubsw`` multiplies unsigned by signed bytes and adds adjacent pairs into saturating int16,
and ``vpmaddwd`` against ones adds the int16 pairs into int32. Saturation decides the rest:

- Nibble weights (0..15) times activations (|x| <= 127) make pairs of at most 3810, so up to 8
  ``vpmaddubsw`` results are summed in int16 before one ``vpmaddwd``: a q4 block of one activation
  level costs 8 + 7 + 1 instructions per ymm instead of 8 x 3.
- Q8_0 weights made unsigned by + 128 would overflow int16 (2 x 255 x 127). They stay signed and
  the sign moves to the activation (``vpsignb``): |w| x sign(w) x, pairs of at most 2 x 128 x 127 =
  32512, one ``vpmaddwd`` each; no + 128 offset to take back out.

AVX-VNNI (Alder Lake and later cores, Sapphire Rapids) keeps the AVX-512 VNNI arithmetic on ymm.
Both tiers have 16 ymm registers, so their tiles hold fewer accumulators than the AVX-512 tier's.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils

from .irgen import _i8, _i16, _i32, _vec
from .tier import X_MAX, Tier, as_bytes, chained, join_halves, split_halves


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _ymm_pieces(builder, v):
    """<8 or 16 x i32> -> its <8 x i32> pieces."""
    return [v] if v.type.count == 8 else list(split_halves(builder, v))


def _join(builder, pieces):
    return pieces[0] if len(pieces) == 1 else join_halves(builder, *pieces)


class _Ymm(Tier):
    """What the two 256-bit tiers share: row-tiled prefill runs the decode tile over 4 tokens at a
    time (each block's weights unpacked once for the 4), which beat the lane-per-token tile at
    every prompt length measured on AVX2, and on AVX-VNNI by 3-4x at 4-8 tokens and 1.5-2x at
    64-256 (Sapphire Rapids; benchmarks/RESULTS.md, 2026-12-04)."""

    packed_prefill = False
    few_tokens = 4


class AvxVnni(_Ymm):
    name = "avxvnni"

    def dot(self, builder, acc, terms, umax, chains=1):
        v8 = _vec(_i32, 8)
        fn = _fn(builder, "llvm.x86.avx512.vpdpbusd.256", v8, [v8] * 3)

        def step(b, a, u, s):
            return _join(b, [b.call(fn, list(p)) for p in zip(_ymm_pieces(b, a), _ymm_pieces(b, u), _ymm_pieces(b, s))])

        return chained(builder, acc, terms, chains, step)


class Avx2(_Ymm):
    name = "avx2"
    q8_offset = 0.0

    def dot(self, builder, acc, terms, umax, chains=1):
        b32, h16, v8 = _vec(_i8, 32), _vec(_i16, 16), _vec(_i32, 8)
        maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", h16, [b32, b32])
        maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", v8, [h16, h16])
        ones = ir.Constant(h16, [1] * 16)
        per = max(1, 32767 // (2 * umax * X_MAX))  # int16 partial sums that cannot saturate
        out = _ymm_pieces(builder, acc)
        for c in range(0, len(terms), per):
            chunk = terms[c : c + per]
            for p in range(len(out)):
                prods = [
                    builder.call(
                        maddubs,
                        [as_bytes(builder, _ymm_pieces(builder, u)[p]), as_bytes(builder, _ymm_pieces(builder, s)[p])],
                    )
                    for u, s in chunk
                ]
                while len(prods) > 1:  # a tree of int16 adds keeps the dependency chains short
                    prods = [
                        builder.add(prods[i], prods[i + 1]) if i + 1 < len(prods) else prods[i]
                        for i in range(0, len(prods), 2)
                    ]
                out[p] = builder.add(out[p], builder.call(maddwd, [prods[0], ones]))
        return _join(builder, out)

    def q8_weights(self, builder, w):
        b = _vec(_i8, 4 * w.type.count)
        wb = builder.bitcast(w, b)
        neg = builder.icmp_signed("<", wb, ir.Constant(b, [0] * b.count))
        absw = builder.select(neg, builder.sub(ir.Constant(b, [0] * b.count), wb), wb)  # vpabsb; -128 -> 0x80
        return builder.bitcast(absw, w.type), 128

    def q8_act(self, builder, x, w):
        """x with the sign of w applied per byte (``vpsignb``: 0 where w is 0)."""
        b = _vec(_i8, 4 * w.type.count)
        if b.count == 32:
            sign = _fn(builder, "llvm.x86.avx2.psign.b", b, [b, b])
            return builder.bitcast(builder.call(sign, [as_bytes(builder, x), as_bytes(builder, w)]), w.type)
        lo = self.q8_act(builder, *[split_halves(builder, v)[0] for v in (x, w)])
        hi = self.q8_act(builder, *[split_halves(builder, v)[1] for v in (x, w)])
        return join_halves(builder, lo, hi)

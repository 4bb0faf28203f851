"""What an instruction-set tier gives the int8 kernels: a byte dot product, and tile sizes.

The tile generators (``tiles.py``) are written once over 16-lane (512-bit) vectors; LLVM splits
them into two ymm halves on 256-bit hosts. What differs between instruction sets is the one
operation LLVM cannot find by itself, the unsigned-by-signed byte dot with 32-bit accumulation
(``vpdpbusd`` on AVX-512 VNNI and AVX-VNNI; ``vpmaddubsw`` + ``vpmaddwd`` on AVX2; widening
multiplies elsewhere), how Q8_0's signed weights meet it, and how many accumulators fit the
register file. Each family module (``x86_avx512``, ``x86_avx2``, ``generic``) defines its tiers
as subclasses of ``Tier``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from llvmlite import ir

from .irgen import _i8, _i32, _vec

# Largest |activation byte|: llama.cpp's Q8 rounding, q = round(x / (amax / 127)).
X_MAX = 127


class Tier(ABC):
    """One instruction-set tier. Vectors below are <n x i32> holding 4 bytes per lane."""

    name = "?"
    registers = 16  # vector registers of the widest width the tier uses
    # row-major tiles (``tiles.make_tile2``): decode rows, 16-lane steps, prefill rows x tokens
    rows, wide = 8, False
    mm, mm2 = (4, 2), (2, 2)  # (rows, tokens) per prefill tile, one / two activation levels
    p_rows, p_groups = 4, 1  # lane-per-token prefill tile (``tiles.make_ptile``)
    # row-tiled prefill: the lane-per-token tile from act.PACK_MIN virtual tokens on (else the
    # decode tile over ``few_tokens`` tokens at a time, as below PACK_MIN on every tier)
    packed_prefill = True
    few_tokens = 2
    q8_offset = 128.0  # Q8_0 weights made unsigned by + 128 (0: they stay signed, see q8_weights)

    @abstractmethod
    def dot(self, builder, acc, terms, umax: int, chains: int = 1):
        """acc + the per-lane dot products of (u, s) for each term: u's 4 bytes read unsigned, s's
        signed, every unsigned byte <= umax, every |signed byte| <= X_MAX. ``chains``: independent
        accumulation chains the tier may use (short dependency chains for one-instruction dots)."""

    def q8_weights(self, builder, w):
        """Q8_0 weight bytes (signed) -> (unsigned operand, umax) for ``dot``: + 128 by default,
        taken back out by the caller as ``q8_offset``."""
        return builder.xor(w, ir.Constant(w.type, [-0x7F7F7F80] * w.type.count)), 255

    def q8_act(self, builder, x, w):
        """The activation operand that goes with Q8_0 weights w: x itself by default."""
        return x

    def high_nibbles(self, builder, w):
        """Each byte's high nibble (byte >> 4) of <n x i32> packed bytes."""
        n = w.type.count
        return builder.and_(
            builder.lshr(w, ir.Constant(_vec(_i32, n), [4] * n)), ir.Constant(_vec(_i32, n), [0x0F0F0F0F] * n)
        )

    def __repr__(self):
        return f"<tier {self.name}>"


def split_halves(builder, v):
    """<2n x T> -> (<n x T> low, <n x T> high)."""
    n = v.type.count // 2
    lo = builder.shuffle_vector(v, v, ir.Constant(_vec(_i32, n), list(range(n))))
    hi = builder.shuffle_vector(v, v, ir.Constant(_vec(_i32, n), list(range(n, 2 * n))))
    return lo, hi


def join_halves(builder, lo, hi):
    n = lo.type.count
    return builder.shuffle_vector(lo, hi, ir.Constant(_vec(_i32, 2 * n), list(range(2 * n))))


def as_bytes(builder, v):
    """<n x i32> -> <4n x i8>."""
    return builder.bitcast(v, _vec(_i8, 4 * v.type.count))


def chained(builder, acc, terms, chains, step):
    """acc + the terms accumulated by ``step(builder, acc, u, s)`` round-robin in ``chains`` chains."""
    zero = ir.Constant(acc.type, [0] * acc.type.count)
    accs = [acc] + [zero] * (min(chains, len(terms)) - 1)
    for i, (u, s) in enumerate(terms):
        accs[i % len(accs)] = step(builder, accs[i % len(accs)], u, s)
    out = accs[0]
    for a in accs[1:]:
        out = builder.add(out, a)
    return out

"""The int8-activation drivers: one set per (instruction-set tier, storage type, levels).

A driver rounds x (``act.quantize_act_levels``) and runs a tile (``tiles.py``) over the rows in
parallel (``prange``). Drivers are made by factories that close over their tile, so each
(tier, kind, levels) is its own compiled function and compiles only when a model first uses it.
numba's on-disk cache cannot tell closures of one factory apart (it keys them by name, line and
a pickle of their cells, and an intrinsic pickles differently in every process), so each driver
gets a cache of its own, keyed by that triple and by a hash of the kernel sources.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
from numba import njit, prange
from numba.core.caching import FunctionCache, IndexDataCacheFile

import quant.formats

from . import tiles
from .act import pack_act, quantize_act_levels
from .irgen import _PJIT


def _sources_hash() -> str:
    """A change to any kernel source (or the format facts) must not load stale machine code."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(here.glob("*.py")) + [Path(quant.formats.__file__)]:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


SOURCES = _sources_hash()


class _TierCache(FunctionCache):
    """numba's FunctionCache with one index file and key per (tier, kind, levels) tag."""

    def __init__(self, py_func, tag: str):
        super().__init__(py_func)
        self._tag = f"{tag}-{SOURCES}"
        self._cache_file = IndexDataCacheFile(
            cache_path=self._cache_path,
            filename_base=f"{self._impl.filename_base}-{tag}",
            source_stamp=self._impl.locator.get_source_stamp(),
        )

    def _index_key(self, sig, codegen):
        return (sig, codegen.magic_tuple(), (hashlib.sha256(self._py_func.__code__.co_code).hexdigest(), self._tag))


def _jit(tag: str):
    """``njit(parallel)`` with a per-tag disk cache (see the module docstring)."""
    opts = {k: v for k, v in _PJIT.items() if k != "cache"}

    def wrap(fn):
        disp = njit(**opts)(fn)
        disp._cache = _TierCache(fn, tag)
        return disp

    return wrap


def _coef(tier, kind: str) -> np.float32:
    """The packed offset coefficient of ``tiles.make_ptile``: -offset, or 1 for a min term."""
    return np.float32({"q4_0": -8.0, "q4_1": 1.0, "q4_k": 1.0, "q8_0": -tier.q8_offset}[kind])


def _mv_rowmajor(tier, kind, L, tag):
    tile, ROWS = tiles.make_tile2(tier, kind, tier.rows, 1, L, wide=tier.wide, prefetch=256), tier.rows

    @_jit(tag)
    def mv(qs, d, m, x, xq, xdx, xsq, xsum, xsqt, out):
        # x [K]; scratch [L, K] / [L, NB]; out [N]
        quantize_act_levels(x.reshape(1, x.shape[0]), L, xq, xdx, xsq, xsum, xsqt)
        n = out.shape[0]
        for g in prange((n + ROWS - 1) // ROWS):
            r = g * ROWS
            res = tile(qs, d, m, r, n, xq, xdx, xsqt, 0, 1)
            for i in range(ROWS):
                if r + i < n:
                    out[r + i] = res[i]

    return mv


def _mm_rowmajor(tier, kind, L, tag):
    (MR, MT) = tier.mm if L == 1 else tier.mm2
    tile = tiles.make_tile2(tier, kind, MR, MT, L, wide=tier.wide)
    PR, PG = tier.p_rows, tier.p_groups
    ptile = tiles.make_ptile(tier, kind, PR, PG, L)
    coef = _coef(tier, kind)

    @_jit(tag)
    def mm(qs, d, m, X, xq, xdx, xsq, xsum, xsqt, xq32, xp, xp32, dxp, cp, out):
        # X [T, K]; scratch [T*L, K] / [T*L, NB], xsqt [T, NB]; packed scratch [NG, ...] with NG = 0
        # below act.PACK_MIN virtual tokens; out [T, N]. Row groups outer (parallel), token tiles
        # inner: a group's weights stay in L1 while every token passes over them.
        quantize_act_levels(X, L, xq, xdx, xsq, xsum, xsqt)
        T, n = out.shape
        ng = xp.shape[0]
        if ng > 0:
            pack_act(xq32, xdx, xsq, coef, xp32, dxp, cp)
            for g in prange((n + PR - 1) // PR):
                for g0 in range(0, ng, PG):
                    ptile(qs, d, m, g * PR, n, xp, dxp, cp, g0, ng, out)
        else:
            for g in prange((n + MR - 1) // MR):
                r = g * MR
                for t0 in range(0, T, MT):
                    res = tile(qs, d, m, r, n, xq, xdx, xsqt, t0, T)
                    for j in range(MT):
                        if t0 + j < T:
                            for i in range(MR):
                                if r + i < n:
                                    out[t0 + j, r + i] = res[j * MR + i]

    return mm


def _mv_r16(tier, kind, L, tag):
    itile = tiles.make_itile(tier, kind, L)

    @_jit(tag)
    def mv(qs, d, m, x, xq, xdx, xsq, xsum, xsqt, out):
        # x [K]; scratch [L, K] / [L, NB]; out [N]; one tile of 16 rows per iteration
        quantize_act_levels(x.reshape(1, x.shape[0]), L, xq, xdx, xsq, xsum, xsqt)
        for g in prange(qs.shape[0]):
            itile(qs, d, m, g, xq, xdx, xsqt, out)

    return mv


def _mm_r16(tier, kind, L, tag):
    itile = tiles.make_itile(tier, kind, L)
    NT, NT2 = tier.few_tokens, max(1, tier.few_tokens // 2)  # tokens per multi-token decode tile
    itile_nt = tiles.make_itile(tier, kind, L, tokens=NT)
    itile_nt2 = tiles.make_itile(tier, kind, L, tokens=NT2)
    PACK = tier.packed_prefill
    PR, PG = tier.p_rows, tier.p_groups
    ptile = tiles.make_ptile(tier, kind, PR, PG, L, tiled=True)
    coef = _coef(tier, kind)

    @_jit(tag)
    def mm(qs, d, m, X, xq, xdx, xsq, xsum, xsqt, xq32, xp, xp32, dxp, cp, out):
        # X [T, K]; scratch as _mm_rowmajor; out [T, N]. Where the tier packs (``packed_prefill``),
        # from act.PACK_MIN virtual tokens on the lane-per-token tile; otherwise the decode tile NT
        # tokens at a time, each block's weights unpacked once for all of them, a tile's 16 rows
        # staying in cache while every token passes over them (then NT/2 tokens, then 1).
        quantize_act_levels(X, L, xq, xdx, xsq, xsum, xsqt)
        T, n = out.shape
        ng = xp.shape[0]
        if PACK and ng > 0:
            pack_act(xq32, xdx, xsq, coef, xp32, dxp, cp)
            for g in prange((n + PR - 1) // PR):
                for g0 in range(0, ng, PG):
                    ptile(qs, d, m, g * PR, n, xp, dxp, cp, g0, ng, out)
        else:
            tn = T - T % NT
            tn2 = tn + (T - tn) // NT2 * NT2
            for g in prange(qs.shape[0]):
                for t in range(0, tn, NT):
                    itile_nt(
                        qs,
                        d,
                        m,
                        g,
                        xq[t * L : (t + NT) * L],
                        xdx[t * L : (t + NT) * L],
                        xsqt[t : t + NT],
                        out[t : t + NT],
                    )
                for t in range(tn, tn2, NT2):
                    itile_nt2(
                        qs,
                        d,
                        m,
                        g,
                        xq[t * L : (t + NT2) * L],
                        xdx[t * L : (t + NT2) * L],
                        xsqt[t : t + NT2],
                        out[t : t + NT2],
                    )
                for t in range(tn2, T):
                    itile(qs, d, m, g, xq[t * L : t * L + L], xdx[t * L : t * L + L], xsqt[t : t + 1], out[t])

    return mm


def _mv_q4kr16(tier, kind, L, tag):
    itile = tiles.make_itile_q4k(tier, L)

    @_jit(tag)
    def mv(qs, s, d, m, x, xq, xdx, xsq, xsum, xsqt, out):
        quantize_act_levels(x.reshape(1, x.shape[0]), L, xq, xdx, xsq, xsum, xsqt)
        for g in prange(qs.shape[0]):
            itile(qs, s, d, m, g, xq, xdx, xsqt, out)

    return mv


def _mm_q4kr16(tier, kind, L, tag):
    itile = tiles.make_itile_q4k(tier, L)
    PR, PG = tier.p_rows, tier.p_groups
    ptile = tiles.make_ptile(tier, "q4_k", PR, PG, L, tiled=True)

    @_jit(tag)
    def mm(qs, s, d, m, X, xq, xdx, xsq, xsum, xsqt, xq32, xp, xp32, dxp, cp, out):
        quantize_act_levels(X, L, xq, xdx, xsq, xsum, xsqt)
        T, n = out.shape
        ng = xp.shape[0]
        if ng > 0:
            pack_act(xq32, xdx, xsq, np.float32(1.0), xp32, dxp, cp)
            for g in prange((n + PR - 1) // PR):
                for g0 in range(0, ng, PG):
                    ptile(qs, s, d, m, g * PR, n, xp, dxp, cp, g0, ng, out)
        else:
            for g in prange(qs.shape[0]):
                for t in range(T):
                    itile(qs, s, d, m, g, xq[t * L : t * L + L], xdx[t * L : t * L + L], xsqt[t : t + 1], out[t])

    return mm


# storage type -> (base kind, decode driver factory, prefill driver factory)
_FACTORIES = {
    "q4_0": ("q4_0", _mv_rowmajor, _mm_rowmajor),
    "q4_1": ("q4_1", _mv_rowmajor, _mm_rowmajor),
    "q8_0": ("q8_0", _mv_rowmajor, _mm_rowmajor),
    "q4_0r16": ("q4_0", _mv_r16, _mm_r16),
    "q4_1r16": ("q4_1", _mv_r16, _mm_r16),
    "q8_0r16": ("q8_0", _mv_r16, _mm_r16),
    "q4_kr16": ("q4_k", _mv_q4kr16, _mm_q4kr16),
}
QTYPES = tuple(_FACTORIES)


@functools.cache
def driver(tier, qtype: str, op: str, levels: int):
    """The compiled-on-first-call driver for ``op`` ("mv" or "mm") of a storage type."""
    kind, mv, mm = _FACTORIES[qtype]
    return (mv if op == "mv" else mm)(tier, kind, levels, f"{tier.name}-{qtype}-{op}-L{levels}")

"""Activation rounding for the int8 kernels, and the thread-local scratch it writes into.

x is rounded to int8 blocks of 32 by llama.cpp's Q8 rule (d = amax / 127, q = round(x / d)). One
level moves a small model's logits enough to change its greedy answers; the default second level
rounds what the first left over, keeping x to 1/(2 * 127 * 254) of its block's largest |x|.
Every public kernel writes into a preallocated ``out`` and allocates nothing per call once warm:
the scratch lives in thread-local buffers kept by size, so concurrent callers do not share one.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from numba import njit, prange

from quant.formats import QK

from .irgen import _JIT, _PJIT

# prefill from PACK_MIN virtual tokens (tokens x levels) on packs activations one token per lane
# (``tiles.make_ptile``); below it the decode tiles run once per token
PACK_MIN = 6


@njit(**_JIT)
def quantize_act_levels(x, levels, xq, xdx, xsq, xsum, xsqt):
    """x [T, K] f32 -> ``levels`` int8 blocks per token, as virtual tokens v = t * levels + l:
    level 0 rounds x by llama.cpp's Q8 rule, level 1 rounds what level 0 left over. xq [T*L, K]
    int8; xdx, xsq, xsum [T*L, NB] (xsum: sum(x) on level 0, 0 after); xsqt [T, NB] = sum over
    levels of xsq = xdx * sum(xq) (the per-block offset terms are linear in x_hat)."""
    T, K = x.shape
    for t in range(T):
        v0 = t * levels
        for b in range(K // QK):
            o = b * QK
            amax = np.float32(0.0)
            s = np.float32(0.0)
            for j in range(QK):
                v = x[t, o + j]
                amax = max(amax, abs(v))
                s += v
            dx = amax / np.float32(127.0)
            inv = np.float32(1.0) / dx if amax > 0 else np.float32(0.0)
            qsum = 0
            for j in range(QK):
                q = np.int32(np.rint(x[t, o + j] * inv))
                xq[v0, o + j] = q
                qsum += q
            xdx[v0, b] = dx
            xsq[v0, b] = dx * np.float32(qsum)
            xsum[v0, b] = s
            tot = dx * np.float32(qsum)
            if levels == 2:
                v1 = v0 + 1
                rmax = np.float32(0.0)
                for j in range(QK):
                    rmax = max(rmax, abs(x[t, o + j] - dx * np.float32(xq[v0, o + j])))
                dr = rmax / np.float32(127.0)
                rinv = np.float32(1.0) / dr if rmax > 0 else np.float32(0.0)
                rsum = 0
                for j in range(QK):
                    q = np.int32(np.rint((x[t, o + j] - dx * np.float32(xq[v0, o + j])) * rinv))
                    xq[v1, o + j] = q
                    rsum += q
                xdx[v1, b] = dr
                xsq[v1, b] = dr * np.float32(rsum)
                xsum[v1, b] = np.float32(0.0)
                tot += dr * np.float32(rsum)
            xsqt[t, b] = tot


@njit(**_PJIT)
def pack_act(xq32, xdx, xsq, coef, xp32, dxp, cp):
    """Virtual tokens [V, ...] -> groups of 16 lanes (zero past V) for ``tiles.make_ptile``: xq32
    [V, K/4] int32 (xq viewed 4 bytes at a time) -> xp32 [NG, K/4, 16]; xdx, xsq [V, NB] -> dxp,
    cp [NG, NB, 16], cp = coef * xsq."""
    V = xq32.shape[0]
    for g in prange(xp32.shape[0]):
        for lane in range(16):
            v = g * 16 + lane
            if v < V:
                for q in range(xq32.shape[1]):
                    xp32[g, q, lane] = xq32[v, q]
                for b in range(xdx.shape[1]):
                    dxp[g, b, lane] = xdx[v, b]
                    cp[g, b, lane] = coef * xsq[v, b]
            else:
                for q in range(xq32.shape[1]):
                    xp32[g, q, lane] = 0
                for b in range(xdx.shape[1]):
                    dxp[g, b, lane] = 0.0
                    cp[g, b, lane] = 0.0


_tls = threading.local()


def scratch(name: str, shape: tuple, dtype) -> np.ndarray:
    """A thread-local buffer of at least ``shape`` (leading axis grows), viewed to ``shape``."""
    store = getattr(_tls, "bufs", None)
    if store is None:
        store = _tls.bufs = {}
    key = (name, shape[1:], np.dtype(dtype).str)
    buf = store.get(key)
    if buf is None or buf.shape[0] < shape[0]:
        buf = store[key] = np.empty((max(shape[0], 1),) + shape[1:], dtype)
    return buf[: shape[0]] if buf.shape[0] != shape[0] else buf


SMALL_T = 16  # scratch tuples of up to this many tokens are kept whole, per (T, K, L)


def act(t: int, k: int, levels: int):
    """(xq [T*L, K] int8, xdx, xsq, xsum [T*L, NB] f32, xsqt [T, NB] f32) thread-local scratch.
    Tuples for a few tokens (decode, several sequences decoded together) are kept per (T, K, L):
    a step makes several matrix calls per layer, and the buffer lookups each were a noticeable
    share of a small model's token time."""
    if t > SMALL_T:
        return _act_new(t, k, levels, scratch)
    return _kept("act", (t, k, levels), lambda: _act_new(t, k, levels, _own))


def _kept(kind: str, key: tuple, make):
    kept = getattr(_tls, kind, None)
    if kept is None:
        kept = {}
        setattr(_tls, kind, kept)
    hit = kept.get(key)
    if hit is None:
        hit = kept[key] = make()
    return hit


def _own(name: str, shape: tuple, dtype) -> np.ndarray:
    """A buffer of its own (a kept tuple must not hold a view of a shared buffer that grows)."""
    return np.empty(shape, dtype)


def _act_new(t: int, k: int, lv: int, alloc):
    nb = k // QK
    return (
        alloc("xq", (t * lv, k), np.int8),
        alloc("xdx", (t * lv, nb), np.float32),
        alloc("xsq", (t * lv, nb), np.float32),
        alloc("xsum", (t * lv, nb), np.float32),
        alloc("xsqt", (t, nb), np.float32),
    )


def pact(t: int, k: int, levels: int):
    """``act`` scratch plus its packed form for ``tiles.make_ptile``: (..., xq32, xp, xp32, dxp,
    cp), with no groups (NG = 0) below PACK_MIN virtual tokens."""
    if t > SMALL_T:
        return _pact_new(t, k, levels, scratch)
    return _kept("pact", (t, k, levels), lambda: _pact_new(t, k, levels, _own))


def _pact_new(t: int, k: int, levels: int, alloc):
    a = _act_new(t, k, levels, alloc)
    v, nb = t * levels, k // QK
    ng = (v + 15) // 16 if v >= PACK_MIN else 0
    xp = alloc("xp", (ng, k * 16), np.int8)
    return a + (
        a[0].view(np.int32),
        xp,
        xp.view(np.int32).reshape(ng, k // 4, 16),
        alloc("dxp", (ng, nb, 16), np.float32),
        alloc("cp", (ng, nb, 16), np.float32),
    )


def rowbuf(k: int) -> np.ndarray:
    """[threads, K] f32: one dequantized row per worker thread (the f32-activation kernels)."""
    return scratch("row", (numba.config.NUMBA_NUM_THREADS, k), np.float32)

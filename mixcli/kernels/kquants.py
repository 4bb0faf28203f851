"""GGUF's K-quants q6_k and q5_k (``quant.formats``): decode, prefill and embedding-row kernels.

One kernel set serves every instruction-set tier: plain numba loops that LLVM vectorises for the
host, not IR tiles over a ``Tier`` (``tiles.py``), so the tables of all tiers hold the same
functions. Each row is dequantized once into a thread's f32 buffer (the bit fields cut with float
floor, which vectorises where numba's integer rules would widen every byte to int64) and dotted
with every token:

- int8 modes: x is rounded exactly as for every int8 kernel (``act.quantize_act_levels``, one or
  two levels) and the levels are summed once per token into x_hat (f32), so the product is the one
  the int8 kernels compute, W x_hat, and a second level costs nothing per row. In f32 lanes there
  is no integer dot to gain from (llama.cpp's ggml_vec_dot_q6_K_q8_K accumulates integers because
  its SIMD multiplies bytes), and one long f32 dot per row avoids a horizontal sum per block;
- f32 mode: the same with x itself;
- rows go four at a time, so that a prefill reads each token's x_hat once per four rows;
- ``dequant_row_*``: ggml's dequantize_row_q6_K / q5_K in its float32 operations, compiled
  without fastmath (numba would contract and reassociate them) and sharing no helper with the
  fastmath kernels (a callee compiled inside a fastmath caller keeps the caller's flags), so a
  row equals ``gguf.quants.dequantize`` bit for bit.

Shapes: N rows, K columns (a multiple of 256), NS = K / 256 super-blocks, NB = K / 32 blocks,
T tokens, L levels. q6_k parts ql [N, NS*128], qh [N, NS*64], sc [N, NS*16] i1, d [N, NS];
q5_k parts qs [N, NS*128], qh [N, NS*32], s [N, NS*12], d, m [N, NS]; fp16 parts as float16 or
as their uint16 bits.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import get_thread_id, njit, prange

from quant.formats import QK

from .act import act, quantize_act_levels, scratch
from .irgen import _JIT, _PJIT, _u16, h2f

QTYPES = ("q6_k", "q5_k")
R4 = 4  # rows unpacked together (_mm_k)
_EXACT = dict(cache=True, nogil=True)  # no fastmath: the float operations as written (dequant_row)


# ---- one row dequantized into w [K] f32 (fastmath: within float rounding of dequant_row) --------
@njit(**_JIT)
def _unpack_q6k(ql, qh, sc, d, r, w):
    # per 128 weights (half h of a super-block): 64 bytes of low nibbles, 32 bytes of 2-bit pairs;
    # weight 32j + l takes nibble (j >> 1) of ql[l + 32 (j & 1)] and bits 2j of qh[l], scale sc[2j + l/16]
    for s in range(d.shape[1]):
        dv = h2f(d[r, s])
        for h in range(2):
            lo = s * 128 + h * 64
            hb = s * 64 + h * 32
            o = s * 256 + h * 128
            for half in range(2):
                i = s * 16 + h * 8 + half
                f0 = dv * np.float32(sc[r, i])
                f1 = dv * np.float32(sc[r, i + 2])
                f2 = dv * np.float32(sc[r, i + 4])
                f3 = dv * np.float32(sc[r, i + 6])
                for l in range(half * 16, half * 16 + 16):
                    a = np.float32(ql[r, lo + l])
                    b = np.float32(ql[r, lo + 32 + l])
                    q = np.float32(qh[r, hb + l])
                    a4 = np.floor(a * np.float32(0.0625))
                    b4 = np.floor(b * np.float32(0.0625))
                    t1 = np.floor(q * np.float32(0.25))
                    t2 = np.floor(t1 * np.float32(0.25))
                    t3 = np.floor(t2 * np.float32(0.25))
                    w[o + l] = f0 * (
                        a - np.float32(16.0) * a4 + np.float32(16.0) * (q - np.float32(4.0) * t1) - np.float32(32.0)
                    )
                    w[o + 32 + l] = f1 * (
                        b - np.float32(16.0) * b4 + np.float32(16.0) * (t1 - np.float32(4.0) * t2) - np.float32(32.0)
                    )
                    w[o + 64 + l] = f2 * (a4 + np.float32(16.0) * (t2 - np.float32(4.0) * t3) - np.float32(32.0))
                    w[o + 96 + l] = f3 * (b4 + np.float32(16.0) * t3 - np.float32(32.0))


@njit(**_JIT)
def _scale_min_k4(s, r, base, j):
    # llama.cpp get_scale_min_k4: sub-block j's 6-bit scale and min codes from 12 packed bytes
    if j < 4:
        return np.int64(s[r, base + j]) & 63, np.int64(s[r, base + j + 4]) & 63
    hi = np.int64(s[r, base + j + 4])
    return (hi & 15) | ((np.int64(s[r, base + j - 4]) >> 6) << 4), (hi >> 4) | ((np.int64(s[r, base + j]) >> 6) << 4)


@njit(**_JIT)
def _unpack_q5k(qs, qh, s, d, m, r, w):
    # per 64 weights (pair p): 32 bytes of nibbles, weight l low / 32 + l high; the 5th bit of
    # sub-block j is bit j of qh[l]
    for sb in range(d.shape[1]):
        dv = h2f(d[r, sb])
        mv = h2f(m[r, sb])
        hb = sb * 32
        for p in range(4):
            sc0, mn0 = _scale_min_k4(s, r, sb * 12, 2 * p)
            sc1, mn1 = _scale_min_k4(s, r, sb * 12, 2 * p + 1)
            f0 = dv * np.float32(sc0)
            f1 = dv * np.float32(sc1)
            m0 = mv * np.float32(mn0)
            m1 = mv * np.float32(mn1)
            shift = np.float32(1.0) / np.float32(1 << (2 * p))  # qh >> 2p, as a float scale (exact)
            lo = sb * 128 + p * 32
            o = sb * 256 + p * 64
            for l in range(32):
                a = np.float32(qs[r, lo + l])
                a4 = np.floor(a * np.float32(0.0625))
                hs = np.floor(np.float32(qh[r, hb + l]) * shift)
                t = np.floor(hs * np.float32(0.5))
                w[o + l] = f0 * (a - np.float32(16.0) * a4 + np.float32(16.0) * (hs - np.float32(2.0) * t)) - m0
                w[o + 32 + l] = (
                    f1 * (a4 + np.float32(16.0) * (t - np.float32(2.0) * np.floor(t * np.float32(0.5)))) - m1
                )


@njit(**_JIT)
def _levels_summed(X, L, xq, xdx, xh):
    """xh [T, K] f32: X itself (L = 0) or the int8 levels summed, x_hat = sum_l xq_l * dx_l."""
    T, K = X.shape
    for t in range(T):
        if L == 0:
            for k in range(K):
                xh[t, k] = X[t, k]
            continue
        for b in range(K // QK):
            for j in range(b * QK, b * QK + QK):
                xh[t, j] = np.float32(xq[t * L, j]) * xdx[t * L, b]
            for lv in range(1, L):
                for j in range(b * QK, b * QK + QK):
                    xh[t, j] += np.float32(xq[t * L + lv, j]) * xdx[t * L + lv, b]


@njit(**_JIT)
def _dot4(w, x):
    """The dots of rows w [4, K] with x [K]: each x element loaded once for four rows."""
    s0 = np.float32(0.0)
    s1 = np.float32(0.0)
    s2 = np.float32(0.0)
    s3 = np.float32(0.0)
    for k in range(x.shape[0]):
        s0 += w[0, k] * x[k]
        s1 += w[1, k] * x[k]
        s2 += w[2, k] * x[k]
        s3 += w[3, k] * x[k]
    return s0, s1, s2, s3


# ---- the driver: X [T, K] -> out [T, N]; L = 0 keeps x in f32 -----------------------------------
@njit(**_PJIT)
def _mm_k(kind, p0, p1, p2, d, m, X, L, xq, xdx, xsq, xsum, xsqt, xh, wbuf, out):
    # kind 6: q6_k (ql, qh, sc, d; m unused), 5: q5_k (qs, qh, s, d, m). Rows in groups of R4 = 4
    # (the last group repeats row n - 1): each token's x_hat is read once per group, not per row.
    T, n = out.shape
    if L > 0:
        quantize_act_levels(X, L, xq, xdx, xsq, xsum, xsqt)
    _levels_summed(X, L, xq, xdx, xh)
    for g in prange((n + R4 - 1) // R4):
        w = wbuf[get_thread_id()]
        for i in range(R4):
            r = min(np.int64(g) * R4 + i, n - 1)
            if kind == 6:
                _unpack_q6k(p0, p1, p2, d, r, w[i])
            else:
                _unpack_q5k(p0, p1, p2, d, m, r, w[i])
        for t in range(T):
            s = _dot4(w, xh[t])
            for i in range(R4):
                if g * R4 + i < n:
                    out[t, g * R4 + i] = s[i]


def _bufs(t: int, k: int, levels: int):
    """act() scratch for ``levels`` (one level's, unused, in f32 mode), x_hat [T, K] and R4
    dequantized rows [R4, K] per worker thread."""
    return (
        *act(t, k, max(levels, 1)),
        scratch("kq_xh", (t, k), np.float32),
        scratch("kq_w4", (numba.config.NUMBA_NUM_THREADS, R4, k), np.float32),
    )


def _pairs(levels: int):
    """{(qtype, "matvec" | "matmul"): kernel} for ``levels`` int8 levels (0: x kept in f32)."""

    def mm_q6_k(ql, qh, sc, d, X, out):
        d = _u16(d)
        _mm_k(6, ql, qh, sc, d, d, X, levels, *_bufs(X.shape[0], X.shape[1], levels), out)

    def mv_q6_k(ql, qh, sc, d, x, out):
        d = _u16(d)
        _mm_k(6, ql, qh, sc, d, d, x.reshape(1, -1), levels, *_bufs(1, x.shape[0], levels), out.reshape(1, -1))

    def mm_q5_k(qs, qh, s, d, m, X, out):
        _mm_k(5, qs, qh, s, _u16(d), _u16(m), X, levels, *_bufs(X.shape[0], X.shape[1], levels), out)

    def mv_q5_k(qs, qh, s, d, m, x, out):
        _mm_k(
            5, qs, qh, s, _u16(d), _u16(m), x.reshape(1, -1), levels, *_bufs(1, x.shape[0], levels), out.reshape(1, -1)
        )

    return {
        ("q6_k", "matvec"): mv_q6_k,
        ("q6_k", "matmul"): mm_q6_k,
        ("q5_k", "matvec"): mv_q5_k,
        ("q5_k", "matmul"): mm_q5_k,
    }


_PAIRS: dict[int, dict] = {}


def kernels(qtype: str, levels: int) -> dict:
    """{"matvec": ..., "matmul": ..., "dequant_row": ...} of a K-quant storage type for a table
    with ``levels`` int8 activation levels (0: the f32 mode)."""
    if levels not in _PAIRS:
        _PAIRS[levels] = _pairs(levels)
    pairs = _PAIRS[levels]
    return {
        "matvec": pairs[(qtype, "matvec")],
        "matmul": pairs[(qtype, "matmul")],
        "dequant_row": {"q6_k": dequant_row_q6_k, "q5_k": dequant_row_q5_k}[qtype],
    }


# ---- embedding rows, bit for bit as gguf decodes them ---------------------------------------------
@njit(**_EXACT)
def _row_q6k(ql, qh, sc, d, r, out):
    for s in range(d.shape[1]):
        dv = h2f(d[r, s])
        for h in range(2):
            lo, hb, o = s * 128 + h * 64, s * 64 + h * 32, s * 256 + h * 128
            for l in range(32):
                a = np.int64(ql[r, lo + l])
                b = np.int64(ql[r, lo + 32 + l])
                q = np.int64(qh[r, hb + l])
                i = s * 16 + h * 8 + l // 16
                out[o + l] = (dv * np.float32(sc[r, i])) * np.float32(((a & 15) | ((q & 3) << 4)) - 32)
                out[o + 32 + l] = (dv * np.float32(sc[r, i + 2])) * np.float32(((b & 15) | (((q >> 2) & 3) << 4)) - 32)
                out[o + 64 + l] = (dv * np.float32(sc[r, i + 4])) * np.float32(((a >> 4) | (((q >> 4) & 3) << 4)) - 32)
                out[o + 96 + l] = (dv * np.float32(sc[r, i + 6])) * np.float32(((b >> 4) | (((q >> 6) & 3) << 4)) - 32)


@njit(**_EXACT)
def _row_q5k(qs, qh, s, d, m, r, out):
    for sb in range(d.shape[1]):
        dv = h2f(d[r, sb])
        mv = h2f(m[r, sb])
        for j in range(8):
            sc, mn = _scale_min_k4(s, r, sb * 12, j)  # integers only: no float flags to inherit
            d1 = dv * np.float32(sc)
            m1 = mv * np.float32(mn)
            for l in range(32):
                nib = np.int64(qs[r, sb * 128 + (j // 2) * 32 + l])
                nib = (nib >> 4) if j % 2 else (nib & 15)
                q = nib + (16 if (np.int64(qh[r, sb * 32 + l]) >> j) & 1 else 0)
                out[sb * 256 + j * 32 + l] = d1 * np.float32(q) - m1


def dequant_row_q6_k(ql, qh, sc, d, row, out):
    """Row ``row`` of a q6_k matrix into out [K] f32 (the embedding lookup), as gguf decodes it."""
    _row_q6k(ql, qh, sc, _u16(d), row, out)


def dequant_row_q5_k(qs, qh, s, d, m, row, out):
    _row_q5k(qs, qh, s, _u16(d), _u16(m), row, out)

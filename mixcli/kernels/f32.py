"""The f32-activation kernels: x stays in f32, weights are dequantized a row at a time.

They run on any host and in every tier (``--act f32``, and a row-major q4_k matrix in every mode),
exact to float rounding, and they give the embedding rows (``dequant_row_*``). Slower than the
int8 kernels: a row is gathered into a thread's buffer and dotted in f32.

Shapes: N rows, K columns, NB = K / 32; row-major parts qs [N, K/2] (q8_0: [N, K]), d and m
[N, NB]; row-tiled parts [N/16, ...] (``quant.formats.interleave_rows``); T tokens.
"""

from __future__ import annotations

import numpy as np
from numba import get_thread_id, njit, prange

from quant.formats import ROW_TILE, SUPER

from .act import rowbuf
from .irgen import _JIT, _PJIT, _dot, _u16, h2f

R = ROW_TILE


@njit(**_JIT)
def _dequant_q4_0_into(qs, d, r, out):
    for b in range(d.shape[1]):
        s = h2f(d[r, b])
        for j in range(16):
            q = np.float32(qs[r, b * 16 + j])
            hi = np.floor(q * np.float32(0.0625))
            out[b * 32 + j] = (q - np.float32(16.0) * hi - np.float32(8.0)) * s
            out[b * 32 + 16 + j] = (hi - np.float32(8.0)) * s


@njit(**_JIT)
def _dequant_q4_1_into(qs, d, m, r, out):
    for b in range(d.shape[1]):
        s = h2f(d[r, b])
        mn = h2f(m[r, b])
        for j in range(16):
            q = np.float32(qs[r, b * 16 + j])
            hi = np.floor(q * np.float32(0.0625))
            out[b * 32 + j] = (q - np.float32(16.0) * hi) * s + mn
            out[b * 32 + 16 + j] = hi * s + mn


@njit(**_JIT)
def _dequant_q8_0_into(qs, d, r, out):
    for b in range(d.shape[1]):
        s = h2f(d[r, b])
        for j in range(32):
            out[b * 32 + j] = np.float32(qs[r, b * 32 + j]) * s


@njit(**_PJIT)
def _mv_q4_0_f32(qs, d, x, out):
    # 4 rows per step, nibbles widened through f32 (floor(q/16) is the high nibble), the -8 folded
    # out: sum(w x) = d * (sum(q x) - 8 sum(x)) per block.
    n = out.shape[0]
    nb = d.shape[1]
    for g in prange((n + 3) // 4):
        r0 = min(g * 4, n - 1)
        r1 = min(g * 4 + 1, n - 1)
        r2 = min(g * 4 + 2, n - 1)
        r3 = min(g * 4 + 3, n - 1)
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for b in range(nb):
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            xs = np.float32(0.0)
            o = b * 16
            for j in range(16):
                xl = x[b * 32 + j]
                xh = x[b * 32 + 16 + j]
                xs += xl + xh
                f = np.float32(qs[r0, o + j])
                h = np.floor(f * np.float32(0.0625))
                s0 += (f - np.float32(16.0) * h) * xl + h * xh
                f = np.float32(qs[r1, o + j])
                h = np.floor(f * np.float32(0.0625))
                s1 += (f - np.float32(16.0) * h) * xl + h * xh
                f = np.float32(qs[r2, o + j])
                h = np.floor(f * np.float32(0.0625))
                s2 += (f - np.float32(16.0) * h) * xl + h * xh
                f = np.float32(qs[r3, o + j])
                h = np.floor(f * np.float32(0.0625))
                s3 += (f - np.float32(16.0) * h) * xl + h * xh
            xs *= np.float32(8.0)
            a0 += h2f(d[r0, b]) * (s0 - xs)
            a1 += h2f(d[r1, b]) * (s1 - xs)
            a2 += h2f(d[r2, b]) * (s2 - xs)
            a3 += h2f(d[r3, b]) * (s3 - xs)
        out[r0] = a0
        out[r1] = a1
        out[r2] = a2
        out[r3] = a3


@njit(**_PJIT)
def _mm_quant_f32(kind, qs, d, m, X, rowbuf, out):
    # X [T, K]; rowbuf [threads, K] f32; out [T, N]. Each row dequantized once into the thread's
    # buffer, then dotted with every token.
    T, n = out.shape
    for r in prange(n):
        w = rowbuf[get_thread_id()]
        if kind == 0:
            _dequant_q4_0_into(qs, d, r, w)
        elif kind == 1:
            _dequant_q4_1_into(qs, d, m, r, w)
        else:
            _dequant_q8_0_into(qs, d, r, w)
        for t in range(T):
            out[t, r] = _dot(w, X[t])


@njit(**_JIT)
def _dequant_r16_into(kind, qs, d, m, r, out):
    # kind 0 q4_0, 1 q4_1, 2 q8_0; row r -> out [K] f32
    g = r // 16
    lane = r % 16
    nb = d.shape[1] // 16
    for b in range(nb):
        s = h2f(d[g, b * 16 + lane])
        if kind == 2:
            for c in range(8):
                o = b * 512 + c * 64 + lane * 4
                for j in range(4):
                    out[b * 32 + 4 * c + j] = np.float32(qs[g, o + j]) * s
        else:
            mn = h2f(m[g, b * 16 + lane])
            for c in range(4):
                o = b * 256 + c * 64 + lane * 4
                for j in range(4):
                    q = np.int32(qs[g, o + j])
                    if kind == 0:
                        out[b * 32 + 4 * c + j] = np.float32((q & 15) - 8) * s
                        out[b * 32 + 16 + 4 * c + j] = np.float32((q >> 4) - 8) * s
                    else:
                        out[b * 32 + 4 * c + j] = np.float32(q & 15) * s + mn
                        out[b * 32 + 16 + 4 * c + j] = np.float32(q >> 4) * s + mn


@njit(**_PJIT)
def _mm_r16_f32(kind, qs, d, m, X, rowbuf, out):
    # X [T, K]; rowbuf [threads, K] f32; out [T, N]
    T, n = out.shape
    for r in prange(n):
        w = rowbuf[get_thread_id()]
        _dequant_r16_into(kind, qs, d, m, r, w)
        for t in range(T):
            out[t, r] = _dot(w, X[t])


@njit(**_JIT)
def _row_r16(kind, qs, d, m, row, out):
    _dequant_r16_into(kind, qs, d, m, row, out)


@njit(**_JIT)
def _dequant_q4k_into(tiled, qs, s, d, m, r, out):
    # row r of a q4_kr16 (tiled) or q4_k (row-major) matrix -> out [K] f32:
    # w = (D/64 * sc) * q - (Dm/64 * mn), each product exact in f32 (quant.q4.dequantize's order)
    r = np.int64(r)  # (a prange index may arrive unsigned)
    if tiled:
        g, lane = r // R, r % R
        nb = qs.shape[1] // (16 * R)
    else:
        g, lane = r, np.int64(0)
        nb = qs.shape[1] // 16
    for b in range(nb):
        sb = b // SUPER
        if tiled:
            sc = np.float32(s[g, b * 2 * R + lane])
            mn = np.float32(s[g, b * 2 * R + R + lane])
            dsup = h2f(d[g, sb * R + lane])
            msup = h2f(m[g, sb * R + lane])
        else:
            sc = np.float32(s[g, 2 * b])
            mn = np.float32(s[g, 2 * b + 1])
            dsup = h2f(d[g, sb])
            msup = h2f(m[g, sb])
        dw = dsup * np.float32(1.0 / 64.0) * sc
        mw = msup * np.float32(1.0 / 64.0) * mn
        for c in range(4):
            for j in range(4):
                if tiled:
                    q = np.int32(qs[g, b * 256 + c * 64 + lane * 4 + j])
                else:
                    q = np.int32(qs[g, b * 16 + c * 4 + j])
                out[b * 32 + 4 * c + j] = np.float32(q & 15) * dw - mw
                out[b * 32 + 16 + 4 * c + j] = np.float32(q >> 4) * dw - mw


@njit(**_PJIT)
def _mm_q4k_f32(tiled, qs, s, d, m, X, rowbuf, out):
    # X [T, K]; rowbuf [threads, K] f32; out [T, N]
    T, n = out.shape
    for r in prange(n):
        w = rowbuf[get_thread_id()]
        _dequant_q4k_into(tiled, qs, s, d, m, r, w)
        for t in range(T):
            out[t, r] = _dot(w, X[t])


@njit(**_JIT)
def _row_q4k(tiled, qs, s, d, m, row, out):
    _dequant_q4k_into(tiled, qs, s, d, m, row, out)


# ---------------------------------------------------------------------------------------------
# public API: (parts..., x or X, out), fp16 parts as float16 or as their uint16 bits
def matvec_q4_0(qs, d, x, out):
    """x [K] f32 -> out [N] = W x, W from q4_0 parts qs [N, K/2], d [N, NB]; x kept in f32."""
    _mv_q4_0_f32(qs, _u16(d), x, out)


def matmul_q4_0(qs, d, X, out):
    d = _u16(d)
    _mm_quant_f32(0, qs, d, d, X, rowbuf(X.shape[1]), out)


def matmul_q4_1(qs, d, m, X, out):
    _mm_quant_f32(1, qs, _u16(d), _u16(m), X, rowbuf(X.shape[1]), out)


def matmul_q8_0(qs, d, X, out):
    d = _u16(d)
    _mm_quant_f32(2, qs, d, d, X, rowbuf(X.shape[1]), out)


def matmul_q4_0r16(qs, d, X, out):
    d = _u16(d)
    _mm_r16_f32(0, qs, d, d, X, rowbuf(X.shape[1]), out)


def matmul_q4_1r16(qs, d, m, X, out):
    _mm_r16_f32(1, qs, _u16(d), _u16(m), X, rowbuf(X.shape[1]), out)


def matmul_q8_0r16(qs, d, X, out):
    d = _u16(d)
    _mm_r16_f32(2, qs, d, d, X, rowbuf(X.shape[1]), out)


def matmul_q4_kr16(qs, s, d, m, X, out):
    _mm_q4k_f32(True, qs, s, _u16(d), _u16(m), X, rowbuf(X.shape[1]), out)


def matmul_q4_k(qs, s, d, m, X, out):
    _mm_q4k_f32(False, qs, s, _u16(d), _u16(m), X, rowbuf(X.shape[1]), out)


def _one_token(mm):
    """The decode form of a prefill kernel: x [K] -> out [N] as one token."""

    def mv(*args):
        *parts, x, out = args
        mm(*parts, x.reshape(1, -1), out.reshape(1, -1))

    mv.__name__ = mm.__name__.replace("matmul", "matvec")
    return mv


matvec_q4_1, matvec_q8_0 = _one_token(matmul_q4_1), _one_token(matmul_q8_0)
matvec_q4_0r16, matvec_q4_1r16, matvec_q8_0r16 = (
    _one_token(f) for f in (matmul_q4_0r16, matmul_q4_1r16, matmul_q8_0r16)
)
matvec_q4_kr16, matvec_q4_k = _one_token(matmul_q4_kr16), _one_token(matmul_q4_k)


# ---------------------------------------------------------------------------------------------
# embedding rows
@njit(**_JIT)
def _row_q4_0(qs, d, row, out):
    _dequant_q4_0_into(qs, d, row, out)


@njit(**_JIT)
def _row_q4_1(qs, d, m, row, out):
    _dequant_q4_1_into(qs, d, m, row, out)


@njit(**_JIT)
def _row_q8_0(qs, d, row, out):
    _dequant_q8_0_into(qs, d, row, out)


@njit(**_JIT)
def _row_f16(w, row, out):
    for k in range(out.shape[0]):
        out[k] = h2f(w[row, k])


def dequant_row_q4_0(qs, d, row, out):
    """Row ``row`` of a q4_0 matrix into out [K] f32 (the embedding lookup)."""
    _row_q4_0(qs, _u16(d), row, out)


def dequant_row_q4_1(qs, d, m, row, out):
    _row_q4_1(qs, _u16(d), _u16(m), row, out)


def dequant_row_q8_0(qs, d, row, out):
    _row_q8_0(qs, _u16(d), row, out)


def dequant_row_q4_0r16(qs, d, row, out):
    d = _u16(d)
    _row_r16(0, qs, d, d, row, out)


def dequant_row_q4_1r16(qs, d, m, row, out):
    _row_r16(1, qs, _u16(d), _u16(m), row, out)


def dequant_row_q8_0r16(qs, d, row, out):
    d = _u16(d)
    _row_r16(2, qs, d, d, row, out)


def dequant_row_q4_kr16(qs, s, d, m, row, out):
    _row_q4k(True, qs, s, _u16(d), _u16(m), row, out)


def dequant_row_q4_k(qs, s, d, m, row, out):
    _row_q4k(False, qs, s, _u16(d), _u16(m), row, out)


def dequant_row_f16(w, row, out):
    _row_f16(_u16(w), row, out)


def dequant_row_f32(w, row, out):
    out[:] = w[row]

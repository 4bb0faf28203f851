"""Kernels over q4_k weights: the row-tiled "q4_kr16" storage type, and row-major "q4_k".

q4_k (``quant.formats``): 4-bit codes q per weight, per block of 32 a byte scale code sc and a
byte offset code mn, per super-block of 8 blocks fp16 D and Dm: w = (D/64) sc q - (Dm/64) mn.
Per block this is Q4_1's arithmetic with the scale d_w = sc D / 64 and the min m_w = -mn Dm / 64,
so the kernels are those of ``kernels_r16`` (Q4_1, row-tiled) with the scales built from codes:

- **Decode, one lane per row** (``_make_itile_q4k``): the 16 rows of a tile sit in the 16 lanes,
  4 bytes of each row per 64-byte line, 4 broadcast activation bytes per ``vpdpbusd`` (see
  ``kernels_r16``). Per block the tile's 16 sc bytes and 16 mn bytes (``interleave_rows`` lays
  them side by side: 32 bytes per block) are zero-extended to i32 and converted to f32, and the
  block adds f * sc and xsqt * mn into two super-block accumulators; once per super-block these
  are scaled by the 16 rows' D and Dm (one 32-byte fp16 load each) into the result, and 1/64 is
  applied once at the end. So the codes cost 2 loads and 2 converts per block, as Q4_1's two fp16
  scale loads do, and the tile reads 4.625 bits per weight against q4_0's 4.5. Measured
  (``benchmarks/matvec.py``, [14336, 4096], one thread, same run): 15.4 GB/s against q4_0r16's
  16.2 and q4_1r16's 14.4 (26.7 / 28.8 / 23.0 G weights/s).
- **Prefill** runs ``kernels._make_ptile(kind="q4_k", tiled=True)`` (one lane per token; d_w and
  m_w built per block for the tile's 4 adjacent rows with one small vector op each), below
  ``PACK_MIN`` virtual tokens the decode tile once per token. T = 128, one thread: 56 G MAC/s
  against q4_0r16's 68 (building d_w, m_w per block was the cost to cut: done per row with scalar
  ops it ran at 49-59; what is left is not profiled).
- **f32 activations** (``ACT_MODE = "f32"``, hosts without VNNI), and every mode for a row-major
  q4_k matrix (N not a multiple of 16, rare: see ``quant.formats``): a row is dequantized into a
  buffer and dotted in f32, exact.

The public functions are re-exported by ``mixcli.kernels`` (bound per activation mode there); the
numpy twins are in ``kernels_ref``. Shapes: N rows, K columns, NB = K / 32, NS = ceil(NB / 8),
NT = N / 16 tiles. q4_kr16: qs [NT, NB * 256] u8, s [NT, NB * 32] u8 (per block 16 sc then 16
mn), d, m [NT, NS * 16] fp16 (uint16 bits inside numba). q4_k: qs [N, K/2], s [N, 2 * NB]
(sc_b, mn_b), d, m [N, NS]. T tokens, L activation levels.
"""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import get_thread_id, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from quant.formats import ROW_TILE, SUPER

from .kernels import (
    _FAST,
    _JIT,
    _PJIT,
    P_GROUPS,
    P_ROWS,
    _act,
    _arr,
    _c64,
    _dot,
    _f32,
    _i8,
    _i16,
    _i32,
    _load,
    _make_ptile,
    _pack_act,
    _pact,
    _rowbuf,
    _splat16,
    _u16,
    _vec,
    h2f,
    quantize_act_levels,
)
from .kernels_r16 import IT_PREFETCH, _prefetch_block, _tile_block_dots  # the shared decode-tile pieces

R = ROW_TILE


def _make_itile_q4k(levels: int, prefetch: tuple[int, int] | None = None):
    """An intrinsic ``itile(qs, s, d, m, g, xq, xdx, xsqt, out)``: writes out[16*g : 16*g+16],
    the dot products of tile g's 16 q4_k rows with the ``levels``-level int8 activations of one
    token (xq [L, K] int8, xdx [L, NB] f32, xsqt [1+, NB] f32: row 0 holds the sum over levels of
    xdx * sum(xq)). Per block f = sum_l dot_l * dx_l; per super-block acc += D * sum(f * sc) -
    Dm * sum(xsqt * mn); out = acc / 64."""
    L = levels
    prefetch = IT_PREFETCH[levels] if prefetch is None else prefetch

    @intrinsic
    def itile(typingctx, qs, s, d, m, g, xq, xdx, xsqt, out):
        sig = types.void(qs, s, d, m, g, xq, xdx, xsqt, out)

        def codegen(context, builder, signature, args):
            qs_v, s_v, d_v, m_v, g_v, xq_v, xdx_v, xs_v, out_v = args
            at = signature.args
            qs_p, qs_st, qs_sh = _arr(context, builder, at[0], qs_v)
            s_p, s_st, _ = _arr(context, builder, at[1], s_v)
            d_p, d_st, d_sh = _arr(context, builder, at[2], d_v)
            m_p, m_st, _ = _arr(context, builder, at[3], m_v)
            xq_p, xq_st, _ = _arr(context, builder, at[5], xq_v)
            xdx_p, xdx_st, _ = _arr(context, builder, at[6], xdx_v)
            xs_p, _, _ = _arr(context, builder, at[7], xs_v)
            out_p, _, _ = _arr(context, builder, at[8], out_v)
            nb = builder.sdiv(qs_sh[1], _c64(16 * R))  # blocks per row
            ns = builder.sdiv(d_sh[1], _c64(R))  # super-blocks per row
            v16i, v16f = _vec(_i32, 16), _vec(_f32, 16)
            fzero = ir.Constant(v16f, [0.0] * 16)
            acc = cgutils.alloca_once_value(builder, fzero)
            acc_d = cgutils.alloca_once_value(builder, fzero)  # this super-block's sum of f * sc
            acc_m = cgutils.alloca_once_value(builder, fzero)  # ... and of xsqt * mn
            gq = builder.mul(g_v, qs_st[0])
            gs = builder.mul(g_v, s_st[0])
            gd = builder.mul(g_v, d_st[0])
            gm = builder.mul(g_v, m_st[0])
            splat = functools.partial(_splat16, builder)

            def halves(p, off):  # 16 fp16 at p + off -> <16 x float>
                h = _load(builder, p, off, _vec(_i16, 16))
                return builder.fpext(builder.bitcast(h, _vec(ir.HalfType(), 16)), v16f)

            def codes(off):  # 16 uint8 codes at s + off -> <16 x float>
                return builder.uitofp(builder.zext(_load(builder, s_p, off, _vec(_i8, 16)), v16i), v16f)

            with cgutils.for_range(builder, ns) as sloop:
                sb = sloop.index
                b0 = builder.mul(sb, _c64(SUPER))
                left = builder.sub(nb, b0)
                cnt = builder.select(builder.icmp_signed("<", left, _c64(SUPER)), left, _c64(SUPER))
                builder.store(fzero, acc_d)
                builder.store(fzero, acc_m)
                with cgutils.for_range(builder, cnt) as loop:
                    b = builder.add(b0, loop.index)
                    qb = builder.add(gq, builder.mul(b, _c64(256)))
                    _prefetch_block(builder, qs_p, qb, prefetch, 4)
                    f = _tile_block_dots(builder, "q4_k", L, qs_p, qb, xq_p, xq_st, xdx_p, xdx_st, b)
                    cs = splat(_load(builder, xs_p, builder.mul(b, _c64(4)), _f32), v16f)
                    so = builder.add(gs, builder.mul(b, _c64(2 * R)))
                    ad = builder.fadd(builder.load(acc_d), builder.fmul(f, codes(so), flags=_FAST), flags=_FAST)
                    am = builder.fadd(builder.load(acc_m), builder.fmul(cs, codes(builder.add(so, _c64(R))), flags=_FAST),
                                      flags=_FAST)
                    builder.store(ad, acc_d)
                    builder.store(am, acc_m)
                dw = halves(d_p, builder.add(gd, builder.mul(sb, _c64(2 * R))))
                mw = halves(m_p, builder.add(gm, builder.mul(sb, _c64(2 * R))))
                a = builder.fadd(builder.load(acc), builder.fmul(builder.load(acc_d), dw, flags=_FAST), flags=_FAST)
                a = builder.fsub(a, builder.fmul(builder.load(acc_m), mw, flags=_FAST), flags=_FAST)
                builder.store(a, acc)
            res = builder.fmul(builder.load(acc), ir.Constant(v16f, [1 / 64] * 16), flags=_FAST)
            optr = builder.bitcast(builder.gep(out_p, [builder.mul(g_v, _c64(4 * R))]), v16f.as_pointer())
            builder.store(res, optr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return itile


_it_q4_k, _it2_q4_k = _make_itile_q4k(1), _make_itile_q4k(2)
_pt_q4_k, _pt2_q4_k = (_make_ptile("q4_k", P_ROWS, P_GROUPS, lv, tiled=True) for lv in (1, 2))


@njit(**_PJIT)
def _mv_q4_kr16(qs, s, d, m, x, levels, xq, xdx, xsq, xsum, xsqt, out):
    # x [K]; scratch [L, K] / [L, NB]; out [N]
    quantize_act_levels(x.reshape(1, x.shape[0]), levels, xq, xdx, xsq, xsum, xsqt)
    for g in prange(qs.shape[0]):
        if levels == 1:
            _it_q4_k(qs, s, d, m, g, xq, xdx, xsqt, out)
        else:
            _it2_q4_k(qs, s, d, m, g, xq, xdx, xsqt, out)


@njit(**_PJIT)
def _mm_q4_kr16(qs, s, d, m, X, levels, xq, xdx, xsq, xsum, xsqt, xq32, xp, xp32, dxp, cp, out):
    # X [T, K]; scratch as kernels._mm_q4_1; out [T, N]. Tiles outer (parallel); a few tokens run
    # the decode tile per token, from PACK_MIN virtual tokens on the lane-per-token tile.
    quantize_act_levels(X, levels, xq, xdx, xsq, xsum, xsqt)
    T, n = out.shape
    ng = xp.shape[0]
    L = levels
    if ng > 0:
        _pack_act(xq32, xdx, xsq, np.float32(1.0), xp32, dxp, cp)
        for g in prange((n + P_ROWS - 1) // P_ROWS):
            for g0 in range(0, ng, P_GROUPS):
                if L == 1:
                    _pt_q4_k(qs, s, d, m, g * P_ROWS, n, xp, dxp, cp, g0, ng, out)
                else:
                    _pt2_q4_k(qs, s, d, m, g * P_ROWS, n, xp, dxp, cp, g0, ng, out)
    else:
        for g in prange(qs.shape[0]):
            for t in range(T):
                if L == 1:
                    _it_q4_k(qs, s, d, m, g, xq[t * L : t * L + L], xdx[t * L : t * L + L], xsqt[t : t + 1], out[t])
                else:
                    _it2_q4_k(qs, s, d, m, g, xq[t * L : t * L + L], xdx[t * L : t * L + L], xsqt[t : t + 1], out[t])


# ---------------------------------------------------------------------------------------------
# f32 activations (any host; every mode for row-major q4_k) and embedding rows
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
# public API (re-exported and bound per activation mode by mixcli.kernels)
def _matvec_q4_kr16_q8act(qs, s, d, m, x, out):
    """x [K] f32 -> out [N] = W x for row-tiled q4_k parts qs, s, d, m."""
    _mv_q4_kr16(qs, s, _u16(d), _u16(m), x, *_act(1, x.shape[0]), out)


def _matmul_q4_kr16_q8act(qs, s, d, m, X, out):
    """X [T, K] f32 -> out [T, N] = X W^T for row-tiled q4_k parts."""
    _mm_q4_kr16(qs, s, _u16(d), _u16(m), X, *_pact(*X.shape), out)


def matmul_q4_kr16_f32act(qs, s, d, m, X, out):
    _mm_q4k_f32(True, qs, s, _u16(d), _u16(m), X, _rowbuf(X.shape[1]), out)


def matvec_q4_kr16_f32act(qs, s, d, m, x, out):
    matmul_q4_kr16_f32act(qs, s, d, m, x.reshape(1, -1), out.reshape(1, -1))


def dequant_row_q4_kr16(qs, s, d, m, row, out):
    """Row ``row`` of a row-tiled q4_k matrix into out [K] f32 (the embedding lookup)."""
    _row_q4k(True, qs, s, _u16(d), _u16(m), row, out)


# row-major q4_k: the f32-activation kernels in every mode (see the module docstring)
def matmul_q4_k_f32act(qs, s, d, m, X, out):
    _mm_q4k_f32(False, qs, s, _u16(d), _u16(m), X, _rowbuf(X.shape[1]), out)


def matvec_q4_k_f32act(qs, s, d, m, x, out):
    matmul_q4_k_f32act(qs, s, d, m, x.reshape(1, -1), out.reshape(1, -1))


matvec_q4_k, matmul_q4_k = matvec_q4_k_f32act, matmul_q4_k_f32act


def dequant_row_q4_k(qs, s, d, m, row, out):
    """Row ``row`` of a row-major q4_k matrix into out [K] f32."""
    _row_q4k(False, qs, s, _u16(d), _u16(m), row, out)

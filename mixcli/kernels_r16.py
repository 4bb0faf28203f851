"""Kernels over row-tiled weights: the "q4_0r16", "q4_1r16", "q8_0r16" storage types.

The converter stores a block-quantized matrix with 16 rows side by side
(``quant.formats.interleave_rows``): per tile of 16 rows and per block of 32 columns, 64-byte lines
each holding 4 bytes of every row. Why a layout of our own, when GGUF's row-major blocks import by
copying bytes: decode reads every weight once per token, and with row-major blocks each row is
its own stream that needs shuffles to meet the activations and a horizontal sum at the end (~12
instructions per 64 weights of a row; measured at half of llama.cpp's decode speed). Here:

- **Decode, one lane per row** (``_make_itile``): a 64-byte line is 4 bytes (8 nibbles) of each
  of 16 rows; the low nibbles take columns 4c..4c+3 and the high nibbles 16+4c..16+4c+3 of the
  block, so the 4 matching activation bytes are *broadcast* to all lanes and one ``vpdpbusd``
  adds 4 columns of 16 rows into 16 row sums. Per tile and block of 32 columns: 4 loads, 4 ands,
  4 shifts (one ``gf2p8affineqb`` with GFNI), 8 ``vpdpbusd`` per activation level, then one
  convert, one 16-scale load and two fma for all 16 rows, and the tile's 16 results leave as one
  store. ~0.06 instructions per weight against ~0.19 row-major; a thread reads one sequential
  stream per part. Measured on one core (``benchmarks/matvec.py``): 2.3x the row-major kernel.
- **Prefill** keeps the lane-per-token tile of ``kernels._make_ptile`` (``tiled=True`` changes
  only its addresses); below ``PACK_MIN`` virtual tokens it runs the decode tile once per token
  while the tile's weights are in cache.
- **f32 activations** (hosts without VNNI): a row is gathered out of its tile into a buffer and
  dotted in f32, exact like ``kernels``' f32 path.

The public functions are re-exported by ``mixcli.kernels`` (bound per activation mode there), and
``kernels_ref`` has their twins. Shapes: N rows (a multiple of 16), K columns, NB = K / 32,
NT = N / 16 tiles; qs [NT, NB * 16 * B] (B = 16 bytes per block for 4-bit, 32 for q8_0), d and
m [NT, NB * 16] fp16 (as uint16 inside numba); T tokens, L activation levels.
"""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import get_thread_id, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from quant.formats import ROW_TILE

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
    _high_nibbles16,
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

R = ROW_TILE
# Software prefetch in a decode tile's qs stream, per activation levels: (bytes ahead, LLVM
# locality: 3 = into L1, 2 = into L2). Two levels spend ~35% more instructions per weight, and
# with the loads issued only a couple of blocks ahead a core then keeps too few cache misses in
# flight to stream at full speed: 8 KiB ahead into L2 took the q4_0r16 [14336, 4096] decode from
# 27.7 to 37.0 G weights/s on 1 thread and from 36.8 to 43.5 on 2 (same run, alternating; L1 at
# that distance did not help). One level already streams at the bandwidth on 2 threads and lost
# ~6% on 1 thread with the far prefetch, so it keeps 512 bytes into L1.
IT_PREFETCH = {1: (512, 3), 2: (8192, 2)}


def _prefetch_block(builder, qs_p, qb, prefetch: tuple[int, int], nline: int) -> None:
    """Software prefetch of the nline 64-byte lines ``prefetch[0]`` bytes past qs_p + qb (read,
    locality ``prefetch[1]``)."""
    ahead, locality = prefetch
    if not ahead:
        return
    pf = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32]), "llvm.prefetch.p0")
    for line in range(nline):
        builder.call(pf, [builder.gep(qs_p, [builder.add(qb, _c64(ahead + 64 * line))]),
                          ir.Constant(_i32, 0), ir.Constant(_i32, locality), ir.Constant(_i32, 1)])


def _tile_block_dots(builder, kind, L, qs_p, qb, xq_p, xq_st, xdx_p, xdx_st, b):
    """The heart of a decode tile, shared by every row-tiled type: block b's 16 rows (qs bytes at
    qs_p + qb, 64-byte lines of 4 bytes per row) against the L activation levels, as
    <16 x float> f = sum_l dot_l * dx_l (offset terms not included). Two integer chains per level
    (low / high nibbles) keep the vpdpbusd dependency chains short."""
    v16i, v16f = _vec(_i32, 16), _vec(_f32, 16)
    q4 = kind != "q8_0"
    vnni = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i, [v16i] * 3), "llvm.x86.avx512.vpdpbusd.512")
    zero = ir.Constant(v16i, [0] * 16)
    m0f = ir.Constant(v16i, [0x0F0F0F0F] * 16)
    xb = builder.mul(b, _c64(32))
    ia = [[zero, zero] for _ in range(L)]
    for c in range(4 if q4 else 8):
        w = _load(builder, qs_p, builder.add(qb, _c64(64 * c)), v16i)
        if q4:
            halves_cols = [(builder.and_(w, m0f), 4 * c, 0), (_high_nibbles16(builder, w), 16 + 4 * c, 1)]
        else:  # signed bytes + 128 -> unsigned; the caller takes the +128 back out as an offset
            halves_cols = [(builder.xor(w, ir.Constant(v16i, [-0x7F7F7F80] * 16)), 4 * c, c % 2)]
        for wv, col, h in halves_cols:
            for lv in range(L):
                xo = builder.add(builder.add(builder.mul(_c64(lv), xq_st[0]), xb), _c64(col))
                ia[lv][h] = builder.call(vnni, [ia[lv][h], wv, _splat16(builder, _load(builder, xq_p, xo, _i32), v16i)])
    f = None
    for lv in range(L):
        s = builder.add(ia[lv][0], ia[lv][1])
        dxo = builder.add(builder.mul(_c64(lv), xdx_st[0]), builder.mul(b, _c64(4)))
        p = builder.fmul(builder.sitofp(s, v16f), _splat16(builder, _load(builder, xdx_p, dxo, _f32), v16f), flags=_FAST)
        f = p if f is None else builder.fadd(f, p, flags=_FAST)
    return f


def _make_itile(kind: str, levels: int, prefetch: tuple[int, int] | None = None):
    """An intrinsic ``itile(qs, d, m, g, xq, xdx, xsqt, out)``: writes out[16*g : 16*g+16], the
    complete dot products (offset terms included) of tile g's 16 rows with the ``levels``-level
    int8 activations of one token: xq [L, K] int8, xdx [L, NB] f32, xsqt [1+, NB] f32 (row 0:
    sum over levels of xdx * sum(xq), the offset term's factor). Per block:
    f = sum_l dot_l * dx_l - offset * xsqt, acc += d_w * f (Q4_1: + m_w * xsqt), 16 rows per
    vector."""
    q4 = kind in ("q4_0", "q4_1")
    offset = {"q4_0": 8.0, "q8_0": 128.0, "q4_1": 0.0}[kind]
    L = levels
    nline = 4 if q4 else 8  # 64-byte lines per (tile, block)
    prefetch = IT_PREFETCH[levels] if prefetch is None else prefetch

    @intrinsic
    def itile(typingctx, qs, d, m, g, xq, xdx, xsqt, out):
        sig = types.void(qs, d, m, g, xq, xdx, xsqt, out)

        def codegen(context, builder, signature, args):
            qs_v, d_v, m_v, g_v, xq_v, xdx_v, xs_v, out_v = args
            at = signature.args
            qs_p, qs_st, _ = _arr(context, builder, at[0], qs_v)
            d_p, d_st, d_sh = _arr(context, builder, at[1], d_v)
            m_p, m_st, _ = _arr(context, builder, at[2], m_v)
            xq_p, xq_st, _ = _arr(context, builder, at[4], xq_v)
            xdx_p, xdx_st, _ = _arr(context, builder, at[5], xdx_v)
            xs_p, _, _ = _arr(context, builder, at[6], xs_v)
            out_p, _, _ = _arr(context, builder, at[7], out_v)
            nb = builder.sdiv(d_sh[1], _c64(R))
            v16f = _vec(_f32, 16)
            acc = cgutils.alloca_once_value(builder, ir.Constant(v16f, [0.0] * 16))
            gq = builder.mul(g_v, qs_st[0])
            gd = builder.mul(g_v, d_st[0])
            gm = builder.mul(g_v, m_st[0])
            splat = functools.partial(_splat16, builder)

            def halves(p, off):  # 16 fp16 at p + off -> <16 x float>
                h = _load(builder, p, off, _vec(_i16, 16))
                return builder.fpext(builder.bitcast(h, _vec(ir.HalfType(), 16)), v16f)

            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                qb = builder.add(gq, builder.mul(b, _c64(64 * nline)))
                _prefetch_block(builder, qs_p, qb, prefetch, nline)
                f = _tile_block_dots(builder, kind, L, qs_p, qb, xq_p, xq_st, xdx_p, xdx_st, b)
                cs = splat(_load(builder, xs_p, builder.mul(b, _c64(4)), _f32), v16f)
                if offset:
                    f = builder.fadd(f, builder.fmul(cs, ir.Constant(v16f, [-offset] * 16), flags=_FAST), flags=_FAST)
                dw = halves(d_p, builder.add(gd, builder.mul(b, _c64(2 * R))))
                a = builder.fadd(builder.load(acc), builder.fmul(f, dw, flags=_FAST), flags=_FAST)
                if kind == "q4_1":
                    mw = halves(m_p, builder.add(gm, builder.mul(b, _c64(2 * R))))
                    a = builder.fadd(a, builder.fmul(mw, cs, flags=_FAST), flags=_FAST)
                builder.store(a, acc)
            optr = builder.bitcast(builder.gep(out_p, [builder.mul(g_v, _c64(4 * R))]), v16f.as_pointer())
            builder.store(builder.load(acc), optr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return itile


_KINDS = ("q4_0", "q4_1", "q8_0")
_it = {(kd, lv): _make_itile(kd, lv) for kd in _KINDS for lv in (1, 2)}
_pt = {(kd, lv): _make_ptile(kd, P_ROWS, P_GROUPS, lv, tiled=True) for kd in _KINDS for lv in (1, 2)}
_it_q4_0, _it2_q4_0, _pt_q4_0, _pt2_q4_0 = _it["q4_0", 1], _it["q4_0", 2], _pt["q4_0", 1], _pt["q4_0", 2]
_it_q4_1, _it2_q4_1, _pt_q4_1, _pt2_q4_1 = _it["q4_1", 1], _it["q4_1", 2], _pt["q4_1", 1], _pt["q4_1", 2]
_it_q8_0, _it2_q8_0, _pt_q8_0, _pt2_q8_0 = _it["q8_0", 1], _it["q8_0", 2], _pt["q8_0", 1], _pt["q8_0", 2]


# One driver per type, written out (numba's cache keys a function by its name and line).
@njit(**_PJIT)
def _mv_q4_0r16(qs, d, m, x, levels, xq, xdx, xsq, xsum, xsqt, out):
    # x [K]; scratch [L, K] / [L, NB]; out [N]
    quantize_act_levels(x.reshape(1, x.shape[0]), levels, xq, xdx, xsq, xsum, xsqt)
    for g in prange(qs.shape[0]):
        if levels == 1:
            _it_q4_0(qs, d, m, g, xq, xdx, xsqt, out)
        else:
            _it2_q4_0(qs, d, m, g, xq, xdx, xsqt, out)


@njit(**_PJIT)
def _mv_q4_1r16(qs, d, m, x, levels, xq, xdx, xsq, xsum, xsqt, out):
    quantize_act_levels(x.reshape(1, x.shape[0]), levels, xq, xdx, xsq, xsum, xsqt)
    for g in prange(qs.shape[0]):
        if levels == 1:
            _it_q4_1(qs, d, m, g, xq, xdx, xsqt, out)
        else:
            _it2_q4_1(qs, d, m, g, xq, xdx, xsqt, out)


@njit(**_PJIT)
def _mv_q8_0r16(qs, d, m, x, levels, xq, xdx, xsq, xsum, xsqt, out):
    quantize_act_levels(x.reshape(1, x.shape[0]), levels, xq, xdx, xsq, xsum, xsqt)
    for g in prange(qs.shape[0]):
        if levels == 1:
            _it_q8_0(qs, d, m, g, xq, xdx, xsqt, out)
        else:
            _it2_q8_0(qs, d, m, g, xq, xdx, xsqt, out)


# Prefill: tiles outer (parallel); a few tokens run the decode tile per token (the tile's weights
# stay in cache), from PACK_MIN virtual tokens on the lane-per-token tile over packed activations.
@njit(**_PJIT)
def _mm_q4_0r16(qs, d, m, X, levels, xq, xdx, xsq, xsum, xsqt, xq32, xp, xp32, dxp, cp, out):
    # X [T, K]; scratch as kernels._mm_q4_0; out [T, N]
    quantize_act_levels(X, levels, xq, xdx, xsq, xsum, xsqt)
    T, n = out.shape
    ng = xp.shape[0]
    L = levels
    if ng > 0:
        _pack_act(xq32, xdx, xsq, np.float32(-8.0), xp32, dxp, cp)
        for g in prange((n + P_ROWS - 1) // P_ROWS):
            for g0 in range(0, ng, P_GROUPS):
                if L == 1:
                    _pt_q4_0(qs, d, m, g * P_ROWS, n, xp, dxp, cp, g0, ng, out)
                else:
                    _pt2_q4_0(qs, d, m, g * P_ROWS, n, xp, dxp, cp, g0, ng, out)
    else:
        for g in prange(qs.shape[0]):
            for t in range(T):
                if L == 1:
                    _it_q4_0(qs, d, m, g, xq[t * L : t * L + L], xdx[t * L : t * L + L], xsqt[t : t + 1], out[t])
                else:
                    _it2_q4_0(qs, d, m, g, xq[t * L : t * L + L], xdx[t * L : t * L + L], xsqt[t : t + 1], out[t])


@njit(**_PJIT)
def _mm_q4_1r16(qs, d, m, X, levels, xq, xdx, xsq, xsum, xsqt, xq32, xp, xp32, dxp, cp, out):
    quantize_act_levels(X, levels, xq, xdx, xsq, xsum, xsqt)
    T, n = out.shape
    ng = xp.shape[0]
    L = levels
    if ng > 0:
        _pack_act(xq32, xdx, xsq, np.float32(1.0), xp32, dxp, cp)
        for g in prange((n + P_ROWS - 1) // P_ROWS):
            for g0 in range(0, ng, P_GROUPS):
                if L == 1:
                    _pt_q4_1(qs, d, m, g * P_ROWS, n, xp, dxp, cp, g0, ng, out)
                else:
                    _pt2_q4_1(qs, d, m, g * P_ROWS, n, xp, dxp, cp, g0, ng, out)
    else:
        for g in prange(qs.shape[0]):
            for t in range(T):
                if L == 1:
                    _it_q4_1(qs, d, m, g, xq[t * L : t * L + L], xdx[t * L : t * L + L], xsqt[t : t + 1], out[t])
                else:
                    _it2_q4_1(qs, d, m, g, xq[t * L : t * L + L], xdx[t * L : t * L + L], xsqt[t : t + 1], out[t])


@njit(**_PJIT)
def _mm_q8_0r16(qs, d, m, X, levels, xq, xdx, xsq, xsum, xsqt, xq32, xp, xp32, dxp, cp, out):
    quantize_act_levels(X, levels, xq, xdx, xsq, xsum, xsqt)
    T, n = out.shape
    ng = xp.shape[0]
    L = levels
    if ng > 0:
        _pack_act(xq32, xdx, xsq, np.float32(-128.0), xp32, dxp, cp)
        for g in prange((n + P_ROWS - 1) // P_ROWS):
            for g0 in range(0, ng, P_GROUPS):
                if L == 1:
                    _pt_q8_0(qs, d, m, g * P_ROWS, n, xp, dxp, cp, g0, ng, out)
                else:
                    _pt2_q8_0(qs, d, m, g * P_ROWS, n, xp, dxp, cp, g0, ng, out)
    else:
        for g in prange(qs.shape[0]):
            for t in range(T):
                if L == 1:
                    _it_q8_0(qs, d, m, g, xq[t * L : t * L + L], xdx[t * L : t * L + L], xsqt[t : t + 1], out[t])
                else:
                    _it2_q8_0(qs, d, m, g, xq[t * L : t * L + L], xdx[t * L : t * L + L], xsqt[t : t + 1], out[t])


# ---------------------------------------------------------------------------------------------
# f32 activations (any host) and embedding rows: a row gathered out of its tile
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


# ---------------------------------------------------------------------------------------------
# public API (re-exported and bound per activation mode by mixcli.kernels)
def _matvec_q4_0r16_q8act(qs, d, x, out):
    """x [K] f32 -> out [N] = W x for row-tiled q4_0 parts qs, d."""
    d = _u16(d)
    _mv_q4_0r16(qs, d, d, x, *_act(1, x.shape[0]), out)


def _matvec_q4_1r16_q8act(qs, d, m, x, out):
    _mv_q4_1r16(qs, _u16(d), _u16(m), x, *_act(1, x.shape[0]), out)


def _matvec_q8_0r16_q8act(qs, d, x, out):
    d = _u16(d)
    _mv_q8_0r16(qs, d, d, x, *_act(1, x.shape[0]), out)


def _matmul_q4_0r16_q8act(qs, d, X, out):
    """X [T, K] f32 -> out [T, N] = X W^T for row-tiled q4_0 parts."""
    d = _u16(d)
    _mm_q4_0r16(qs, d, d, X, *_pact(*X.shape), out)


def _matmul_q4_1r16_q8act(qs, d, m, X, out):
    _mm_q4_1r16(qs, _u16(d), _u16(m), X, *_pact(*X.shape), out)


def _matmul_q8_0r16_q8act(qs, d, X, out):
    d = _u16(d)
    _mm_q8_0r16(qs, d, d, X, *_pact(*X.shape), out)


def matmul_q4_0r16_f32act(qs, d, X, out):
    d = _u16(d)
    _mm_r16_f32(0, qs, d, d, X, _rowbuf(X.shape[1]), out)


def matmul_q4_1r16_f32act(qs, d, m, X, out):
    _mm_r16_f32(1, qs, _u16(d), _u16(m), X, _rowbuf(X.shape[1]), out)


def matmul_q8_0r16_f32act(qs, d, X, out):
    d = _u16(d)
    _mm_r16_f32(2, qs, d, d, X, _rowbuf(X.shape[1]), out)


def matvec_q4_0r16_f32act(qs, d, x, out):
    matmul_q4_0r16_f32act(qs, d, x.reshape(1, -1), out.reshape(1, -1))


def matvec_q4_1r16_f32act(qs, d, m, x, out):
    matmul_q4_1r16_f32act(qs, d, m, x.reshape(1, -1), out.reshape(1, -1))


def matvec_q8_0r16_f32act(qs, d, x, out):
    matmul_q8_0r16_f32act(qs, d, x.reshape(1, -1), out.reshape(1, -1))


def dequant_row_q4_0r16(qs, d, row, out):
    """Row ``row`` of a row-tiled q4_0 matrix into out [K] f32 (the embedding lookup)."""
    d = _u16(d)
    _row_r16(0, qs, d, d, row, out)


def dequant_row_q4_1r16(qs, d, m, row, out):
    _row_r16(1, qs, _u16(d), _u16(m), row, out)


def dequant_row_q8_0r16(qs, d, row, out):
    d = _u16(d)
    _row_r16(2, qs, d, d, row, out)

"""The int8-activation tiles: LLVM IR generators for the inner loops of the quantized kernels.

Each factory takes a ``Tier`` (``tier.py``) that supplies the byte dot product and the tile sizes,
so one generator serves every instruction set. What makes the tiles fast (measurements in
benchmarks/RESULTS.md):

- **int8 activations, integer dot.** As llama.cpp does for Q4_0/Q4_1/Q8_0, x is rounded once per
  call to int8 blocks of 32 with one f32 scale each (``act.quantize_act_levels``); per block an
  unsigned-by-signed byte dot accumulates into int32 lanes, converted and scaled once. Nibbles
  stay unsigned 0..15, and Q4_0's ``-8`` (Q8_0's ``+128`` where the tier adds it) is folded out:
  ``offset * d_w * d_x * sum(xq)`` per block, with ``d_x * sum(xq)`` precomputed (``xsqt``).
- **Row-tiled decode, one lane per row** (``make_itile``): a 64-byte line holds 4 bytes of each of
  16 rows, so 4 activation bytes are broadcast to all lanes and one byte dot adds 4 columns of 16
  rows into 16 row sums; no horizontal reduction, and one sequential stream per thread.
- **Prefill, one lane per virtual token** (``make_ptile``): activations packed in groups of 16
  virtual tokens (tokens x levels) by ``act.pack_act``; 4 weights of a row are broadcast to all
  lanes and one byte dot adds them to 16 token dot products. The x86 tiers run the row-tiled
  types' prefill through the decode tile over 4 tokens instead (``Tier.packed_prefill``), which
  measured faster on AVX2 and Zen 4; the generic tier and q4_k keep this tile.
- **Row-major weights** (GGUF shapes that are not a multiple of 16 rows) use ``make_tile2``:
  several rows share each activation load, reduced horizontally once per row.

Shapes: N output rows, K input columns, NB = K / 32 blocks, T tokens, L activation levels,
NG groups of 16 virtual tokens; row-tiled parts [N/16, ...] (``quant.formats.interleave_rows``).
"""

from __future__ import annotations

import functools

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from quant.formats import ROW_TILE, SUPER

from .irgen import (
    _FAST,
    _arr,
    _bcast_pairs,
    _c64,
    _clamp,
    _f32,
    _i8,
    _i16,
    _i32,
    _load,
    _prefetch,
    _splat,
    _splat16,
    _vec,
    half_to_f32,
)

R = ROW_TILE
# Software prefetch in a decode tile's qs stream, per activation levels: (bytes ahead, LLVM
# locality: 3 = into L1, 2 = into L2). Two levels spend more instructions per weight, and with the
# loads issued only a couple of blocks ahead a core keeps too few cache misses in flight; 8 KiB
# ahead into L2 pays there, while one level streams at full speed with 512 bytes into L1.
IT_PREFETCH = {1: (512, 3), 2: (8192, 2)}
_M0F = 0x0F0F0F0F


def _offset(tier, kind: str) -> float:
    """The constant folded out of a block's integer dot: Q4_0's 8, Q8_0's 128 where the tier adds it."""
    return {"q4_0": 8.0, "q4_1": 0.0, "q4_k": 0.0, "q8_0": tier.q8_offset}[kind]


def make_tile2(tier, kind: str, nrows: int, ntoks: int, levels: int, wide: bool = True, prefetch: int = 0):
    """An intrinsic ``tile(qs, d, m, r, n, xq, xdx, xsqt, t0, t)`` -> UniTuple(f32, ntoks*nrows):
    the complete dot products (offset terms included) of row-major weight rows min(r+i, n-1) with
    the ``levels``-level int8 activations of real tokens min(t0+j, t-1), element [j * nrows + i].

    ``wide``: two blocks per step in 16-lane vectors; an odd last block runs the same code at 8
    lanes. Per block pair the scales are vectors [s_b x8, s_b+1 x8]: f = sum_l dot_l * dx_l + c,
    acc += f * d_w, c = -offset * xsqt / 8 per lane (a block's 8 lanes sum to the whole term);
    Q4_1's min term is acc += m_w * xsqt / 8. xq [T*L, K] int8; xdx [T*L, NB] f32; xsqt [T, NB].
    """
    q4 = kind in ("q4_0", "q4_1")
    offset = _offset(tier, kind)
    L = levels

    @intrinsic
    def tile(typingctx, qs, d, m, r, n, xq, xdx, xsqt, t0, t):
        sig = types.UniTuple(types.float32, ntoks * nrows)(qs, d, m, r, n, xq, xdx, xsqt, t0, t)

        def codegen(context, builder, signature, args):
            qs_v, d_v, m_v, r_v, n_v, xq_v, xdx_v, xsqt_v, t0_v, t_v = args
            at = signature.args
            qs_p, qs_st, _ = _arr(context, builder, at[0], qs_v)
            d_p, d_st, d_sh = _arr(context, builder, at[1], d_v)
            m_p, m_st, _ = _arr(context, builder, at[2], m_v)
            xq_p, xq_st, _ = _arr(context, builder, at[5], xq_v)
            xdx_p, xdx_st, _ = _arr(context, builder, at[6], xdx_v)
            xs_p, xs_st, _ = _arr(context, builder, at[7], xsqt_v)
            nb = d_sh[1]
            red = {
                w: cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(_f32, [_f32, _vec(_f32, w)]), f"llvm.vector.reduce.fadd.v{w}f32"
                )
                for w in (8, 16)
            }
            W = 16 if wide else 8
            nacc = ntoks * nrows
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_vec(_f32, W), [0.0] * W)) for _ in range(nacc)]
            nm1 = builder.sub(n_v, _c64(1))
            tm1 = builder.sub(t_v, _c64(1))
            rows = [_clamp(builder, builder.add(r_v, _c64(i)), nm1) for i in range(nrows)]
            toks = [_clamp(builder, builder.add(t0_v, _c64(j)), tm1) for j in range(ntoks)]
            row_q = [builder.mul(ri, qs_st[0]) for ri in rows]
            row_d = [builder.mul(ri, d_st[0]) for ri in rows]
            row_m = [builder.mul(ri, m_st[0]) for ri in rows]
            vt = [builder.mul(tj, _c64(L)) for tj in toks]
            lv_x = [[builder.mul(builder.add(vt[j], _c64(l)), xq_st[0]) for l in range(L)] for j in range(ntoks)]
            lv_dx = [[builder.mul(builder.add(vt[j], _c64(l)), xdx_st[0]) for l in range(L)] for j in range(ntoks)]
            tok_s = [builder.mul(tj, xs_st[0]) for tj in toks]
            cfac = (-offset if offset else 1.0) / 8.0

            def step(b, nblk):
                """Blocks b .. b+nblk-1 (nblk = 1 or 2) into the accumulators."""
                w = 8 * nblk
                vf = _vec(_f32, w)
                b4 = builder.mul(b, _c64(4))
                b2 = builder.mul(b, _c64(2))
                xv, dx, cs = [], [], []
                for j in range(ntoks):
                    xv.append(
                        [
                            builder.bitcast(
                                _load(
                                    builder,
                                    xq_p,
                                    builder.add(lv_x[j][l], builder.mul(b, _c64(32))),
                                    _vec(_i8, 32 * nblk),
                                ),
                                _vec(_i32, w),
                            )
                            for l in range(L)
                        ]
                    )
                    dx.append(
                        [
                            _bcast_pairs(
                                builder, _load(builder, xdx_p, builder.add(lv_dx[j][l], b4), _vec(_f32, nblk)), nblk
                            )
                            for l in range(L)
                        ]
                    )
                    c = _load(builder, xs_p, builder.add(tok_s[j], b4), _vec(_f32, nblk))
                    c = builder.fmul(c, ir.Constant(_vec(_f32, nblk), [cfac] * nblk), flags=_FAST)
                    cs.append(_bcast_pairs(builder, c, nblk))
                zero = ir.Constant(_vec(_i32, w), [0] * w)
                for i in range(nrows):
                    if q4:
                        qoff = builder.add(row_q[i], builder.mul(b, _c64(16)))
                        qv = _load(builder, qs_p, qoff, _vec(_i8, 16 * nblk))
                        idx = [blk * 16 + e for blk in range(nblk) for _ in range(2) for e in range(16)]
                        dup = builder.shuffle_vector(qv, qv, ir.Constant(_vec(_i32, 32 * nblk), idx))
                        sh = builder.lshr(
                            builder.bitcast(dup, _vec(_i16, 16 * nblk)),
                            ir.Constant(_vec(_i16, 16 * nblk), ([0] * 8 + [4] * 8) * nblk),
                        )
                        qu = builder.bitcast(
                            builder.and_(builder.bitcast(sh, _vec(_i8, 32 * nblk)), _splat(_i8, 32 * nblk, 15)),
                            _vec(_i32, w),
                        )
                        umax, qs_signed = 15, None
                    else:
                        qoff = builder.add(row_q[i], builder.mul(b, _c64(32)))
                        qs_signed = builder.bitcast(_load(builder, qs_p, qoff, _vec(_i8, 32 * nblk)), _vec(_i32, w))
                        qu, umax = tier.q8_weights(builder, qs_signed)
                    if prefetch:
                        _prefetch(builder, qs_p, builder.add(qoff, _c64(prefetch)))
                    dh = _load(builder, d_p, builder.add(row_d[i], b2), _vec(_i16, nblk))
                    dw = half_to_f32(builder, _bcast_pairs(builder, dh, nblk))
                    if kind == "q4_1":
                        mh = _load(builder, m_p, builder.add(row_m[i], b2), _vec(_i16, nblk))
                        mw = half_to_f32(builder, _bcast_pairs(builder, mh, nblk))
                    for j in range(ntoks):
                        k = j * nrows + i
                        f = None
                        for l in range(L):
                            xs = xv[j][l] if q4 else tier.q8_act(builder, xv[j][l], qs_signed)
                            dot = builder.sitofp(tier.dot(builder, zero, [(qu, xs)], umax), vf)
                            p = builder.fmul(dot, dx[j][l], flags=_FAST)
                            f = p if f is None else builder.fadd(f, p, flags=_FAST)
                        if offset:
                            f = builder.fadd(f, cs[j], flags=_FAST)
                        part = builder.fmul(f, dw, flags=_FAST)
                        if kind == "q4_1":
                            part = builder.fadd(part, builder.fmul(mw, cs[j], flags=_FAST), flags=_FAST)
                        if w != W:  # the 8-lane tail of a 16-lane accumulator: add into its low half
                            part = builder.shuffle_vector(
                                part, ir.Constant(vf, [0.0] * w), ir.Constant(_vec(_i32, W), list(range(W)))
                            )
                        builder.store(builder.fadd(builder.load(accs[k]), part, flags=_FAST), accs[k])

            if wide:
                with cgutils.for_range(builder, builder.sdiv(nb, _c64(2))) as loop:
                    step(builder.mul(loop.index, _c64(2)), 2)
                with builder.if_then(builder.icmp_signed("!=", builder.srem(nb, _c64(2)), _c64(0))):
                    step(builder.sub(nb, _c64(1)), 1)
            else:
                with cgutils.for_range(builder, nb) as loop:
                    step(loop.index, 1)
            outs = [
                builder.call(red[W], [ir.Constant(_f32, 0.0), builder.load(accs[k])], fastmath=_FAST)
                for k in range(nacc)
            ]
            return context.make_tuple(builder, signature.return_type, outs)

        return sig, codegen

    return tile


def make_ptile(tier, kind: str, nrows: int, ngroups: int, levels: int, tiled: bool = False):
    """An intrinsic ``ptile(qs, d, m, r, n, xp, dxp, cp, g0, ng, out)`` for prefill over packed
    activations, one lane per virtual token: writes out[t, min(r+i, n-1)] for the real tokens t
    of virtual-token groups min(g0+j, ng-1), j < ngroups, i < nrows (all offset terms included).

    xp [NG, K*16] int8 holds, for each 4 columns k..k+3, the 4 bytes of each of the 16 tokens (64
    bytes); dxp [NG, NB, 16] f32 the block scales, cp [NG, NB, 16] f32 the per-block offset terms
    (coef * xdx * sum(xq), coef = -offset, or 1 for the min of Q4_1 / q4_k). A row's 4 weights
    k..k+3 are broadcast to all 16 lanes, so one byte dot adds 4 columns of one row to 16 token
    dot products; per (row, group, block) one convert and two fma: acc += d_w * (dot * dx + c).

    ``tiled``: row-tiled weights (qs [N/16, ...], d and m [N/16, NB*16]); only addresses change.
    ``kind="q4_k"`` (row-tiled only) takes one more argument, the byte codes: ``ptile(qs, s, d, m,
    ...)`` with d, m the super-block scales D, Dm; d_w = sc * D / 64, m_w = -mn * Dm / 64.
    """
    q4 = kind in ("q4_0", "q4_1", "q4_k")
    L = levels
    if kind == "q4_k" and not (tiled and R % nrows == 0):
        raise ValueError("the q4_k prefill tile reads row-tiled weights, nrows dividing 16")
    bq = (16 if q4 else 32) * (R if tiled else 1)  # qs bytes per block of a row (of a tile)
    bd = 2 * (R if tiled else 1)  # scale bytes per block (q4_k: per super-block)
    ce = 4 * R if tiled else 4  # distance between 4-byte column groups of a row

    def codegen(context, builder, signature, args):
        at = signature.args
        if kind == "q4_k":  # the codes, then the arguments every kind has
            s_p, s_st, _ = _arr(context, builder, at[1], args[1])
            args, at = (args[0],) + tuple(args[2:]), (at[0],) + tuple(at[2:])
        qs_v, d_v, m_v, r_v, n_v, xp_v, dxp_v, cp_v, g0_v, ng_v, out_v = args
        qs_p, qs_st, qs_sh = _arr(context, builder, at[0], qs_v)
        d_p, d_st, d_sh = _arr(context, builder, at[1], d_v)
        m_p, m_st, _ = _arr(context, builder, at[2], m_v)
        xp_p, xp_st, _ = _arr(context, builder, at[5], xp_v)
        dxp_p, dxp_st, _ = _arr(context, builder, at[6], dxp_v)
        cp_p, cp_st, _ = _arr(context, builder, at[7], cp_v)
        out_p, out_st, out_sh = _arr(context, builder, at[10], out_v)
        if kind == "q4_k":  # 16 qs bytes per block and row
            nb = builder.sdiv(qs_sh[1], _c64(bq))
        else:
            nb = builder.sdiv(d_sh[1], _c64(R)) if tiled else d_sh[1]
        v16i, v16f = _vec(_i32, 16), _vec(_f32, 16)
        facc = [
            [cgutils.alloca_once_value(builder, ir.Constant(v16f, [0.0] * 16)) for _ in range(ngroups)]
            for _ in range(nrows)
        ]
        nm1 = builder.sub(n_v, _c64(1))
        gm1 = builder.sub(ng_v, _c64(1))
        rows = [_clamp(builder, builder.add(r_v, _c64(i)), nm1) for i in range(nrows)]
        grps = [_clamp(builder, builder.add(g0_v, _c64(j)), gm1) for j in range(ngroups)]

        def base(ri, st, lane_bytes):  # the start of row ri's bytes in a part
            if not tiled:
                return builder.mul(ri, st)
            tile, lane = builder.sdiv(ri, _c64(R)), builder.srem(ri, _c64(R))
            return builder.add(builder.mul(tile, st), builder.mul(lane, _c64(lane_bytes)))

        row_q = [base(ri, qs_st[0], 4) for ri in rows]
        row_d = [base(ri, d_st[0], 2) for ri in rows]
        row_m = [base(ri, m_st[0], 2) for ri in rows]
        if kind == "q4_k":
            row_s = [base(ri, s_st[0], 1) for ri in rows]
        g_x = [builder.mul(gj, xp_st[0]) for gj in grps]
        g_dx = [builder.mul(gj, dxp_st[0]) for gj in grps]
        g_c = [builder.mul(gj, cp_st[0]) for gj in grps]
        zero = ir.Constant(v16i, [0] * 16)
        m0f = ir.Constant(v16i, [_M0F] * 16)
        splat = functools.partial(_splat16, builder)

        def half16(p, off):
            return splat(half_to_f32(builder, _load(builder, p, off, _i16)), v16f)

        def coded16(b, which, sup, row_sup, scale):
            """q4_k: per row i, splat(code * super-scale * scale) of block b (which 0: sc, 1: mn);
            the tile's rows are adjacent lanes: one small vector load of codes and of scales."""
            vf = _vec(_f32, nrows)
            off = builder.add(row_s[0], builder.add(builder.mul(b, _c64(2 * R)), _c64(which * R)))
            code = builder.uitofp(builder.zext(_load(builder, s_p, off, _vec(_i8, nrows)), _vec(_i32, nrows)), vf)
            sb = builder.mul(builder.lshr(b, _c64(3)), _c64(bd))  # SUPER = 8 blocks
            h = _load(builder, sup, builder.add(row_sup[0], sb), _vec(_i16, nrows))
            v = builder.fmul(code, half_to_f32(builder, h), flags=_FAST)
            v = builder.fmul(v, ir.Constant(vf, [scale] * nrows), flags=_FAST)
            return [splat(builder.extract_element(v, ir.Constant(_i32, i)), v16f) for i in range(nrows)]

        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            b64 = builder.mul(b, _c64(64))  # 16 lanes x 4 bytes of f32 per block
            dx = [_load(builder, dxp_p, builder.add(g_dx[j], b64), v16f) for j in range(ngroups)]
            cs = [_load(builder, cp_p, builder.add(g_c[j], b64), v16f) for j in range(ngroups)]
            xoff = [builder.add(g_x[j], builder.mul(b, _c64(32 * 16))) for j in range(ngroups)]
            if kind == "q4_k":
                dw = coded16(b, 0, d_p, row_d, 1 / 64)
                mw = coded16(b, 1, m_p, row_m, -1 / 64)
            else:
                dw = [half16(d_p, builder.add(row_d[i], builder.mul(b, _c64(bd)))) for i in range(nrows)]
            if kind == "q4_1":
                mw = [half16(m_p, builder.add(row_m[i], builder.mul(b, _c64(bd)))) for i in range(nrows)]
            terms = [[[] for _ in range(ngroups)] for _ in range(nrows)]
            umax = 15
            for e in range(8):  # 4 columns at a time: one broadcast weight vector per row
                xv = [_load(builder, xp_p, builder.add(xoff[j], _c64(64 * e)), v16i) for j in range(ngroups)]
                for i in range(nrows):
                    if q4:
                        off = builder.add(row_q[i], builder.add(builder.mul(b, _c64(bq)), _c64(ce * (e % 4))))
                        w = splat(_load(builder, qs_p, off, _i32), v16i)
                        w = builder.and_(w, m0f) if e < 4 else tier.high_nibbles(builder, w)
                        for j in range(ngroups):
                            terms[i][j].append((w, xv[j]))
                    else:
                        off = builder.add(row_q[i], builder.add(builder.mul(b, _c64(bq)), _c64(ce * e)))
                        w1 = _load(builder, qs_p, off, _i32)
                        ws = splat(w1, v16i)
                        # the unsigned operand from the scalar, then broadcast: the same bytes in
                        # every lane, and LLVM's backend never finishes (llvmlite 0.50, any x86
                        # target) when the transform is applied to the broadcast vector instead
                        wu1, umax = tier.q8_weights(builder, builder.bitcast(w1, _vec(_i32, 1)))
                        wu = splat(builder.extract_element(wu1, ir.Constant(_i32, 0)), v16i)
                        for j in range(ngroups):
                            terms[i][j].append((wu, tier.q8_act(builder, xv[j], ws)))
            for i in range(nrows):
                for j in range(ngroups):
                    f = builder.fmul(
                        builder.sitofp(tier.dot(builder, zero, terms[i][j], umax), v16f), dx[j], flags=_FAST
                    )
                    if kind not in ("q4_1", "q4_k"):
                        f = builder.fadd(f, cs[j], flags=_FAST)
                    a = builder.fadd(builder.load(facc[i][j]), builder.fmul(f, dw[i], flags=_FAST), flags=_FAST)
                    if kind in ("q4_1", "q4_k"):
                        a = builder.fadd(a, builder.fmul(mw[i], cs[j], flags=_FAST), flags=_FAST)
                    builder.store(a, facc[i][j])
        # scatter: lane v of group g is virtual token g*16+v = real token (g*16+v) // L
        ntok = out_sh[0]
        per = 16 // L
        for j in range(ngroups):
            for i in range(nrows):
                a = builder.load(facc[i][j])
                if L == 2:
                    ev = builder.shuffle_vector(a, a, ir.Constant(_vec(_i32, 8), list(range(0, 16, 2))))
                    od = builder.shuffle_vector(a, a, ir.Constant(_vec(_i32, 8), list(range(1, 16, 2))))
                    a = builder.fadd(ev, od, flags=_FAST)
                col = builder.mul(rows[i], out_st[1])
                for lane in range(per):
                    tk = builder.add(builder.mul(grps[j], _c64(per)), _c64(lane))
                    with builder.if_then(builder.icmp_signed("<", tk, ntok)):
                        off = builder.add(builder.mul(tk, out_st[0]), col)
                        ptr = builder.bitcast(builder.gep(out_p, [off]), _f32.as_pointer())
                        builder.store(builder.extract_element(a, ir.Constant(_i32, lane)), ptr)
        return context.get_dummy_value()

    if kind == "q4_k":

        @intrinsic
        def ptile_k(typingctx, qs, s, d, m, r, n, xp, dxp, cp, g0, ng, out):
            return types.void(qs, s, d, m, r, n, xp, dxp, cp, g0, ng, out), codegen

        return ptile_k

    @intrinsic
    def ptile(typingctx, qs, d, m, r, n, xp, dxp, cp, g0, ng, out):
        return types.void(qs, d, m, r, n, xp, dxp, cp, g0, ng, out), codegen

    return ptile


def _prefetch_block(builder, qs_p, qb, prefetch: tuple[int, int], nline: int) -> None:
    """Software prefetch of the nline 64-byte lines ``prefetch[0]`` bytes past qs_p + qb."""
    ahead, locality = prefetch
    for line in range(nline if ahead else 0):
        _prefetch(builder, qs_p, builder.add(qb, _c64(ahead + 64 * line)), locality)


def _tile_block_dots(tier, builder, kind, L, qs_p, qb, xq_p, xq_st, xdx_p, xdx_st, b):
    """The heart of a row-tiled decode tile: block b's 16 rows (qs bytes at qs_p + qb, 64-byte lines
    of 4 bytes per row) against the L activation levels, as <16 x float> f = sum_l dot_l * dx_l
    (offset terms not included)."""
    v16i, v16f = _vec(_i32, 16), _vec(_f32, 16)
    q4 = kind != "q8_0"
    zero = ir.Constant(v16i, [0] * 16)
    m0f = ir.Constant(v16i, [_M0F] * 16)
    xb = builder.mul(b, _c64(32))

    def xbytes(lv, col):  # 4 activation bytes of level lv at column col, in every lane
        xo = builder.add(builder.add(builder.mul(_c64(lv), xq_st[0]), xb), _c64(col))
        return _splat16(builder, _load(builder, xq_p, xo, _i32), v16i)

    terms = [[] for _ in range(L)]
    umax = 15
    for c in range(4 if q4 else 8):
        w = _load(builder, qs_p, builder.add(qb, _c64(64 * c)), v16i)
        for lv in range(L):
            if q4:
                terms[lv].append((builder.and_(w, m0f), xbytes(lv, 4 * c)))
                terms[lv].append((tier.high_nibbles(builder, w), xbytes(lv, 16 + 4 * c)))
            else:
                wu, umax = tier.q8_weights(builder, w)
                terms[lv].append((wu, tier.q8_act(builder, xbytes(lv, 4 * c), w)))
    f = None
    for lv in range(L):
        s = tier.dot(builder, zero, terms[lv], umax, chains=2)
        dxo = builder.add(builder.mul(_c64(lv), xdx_st[0]), builder.mul(b, _c64(4)))
        p = builder.fmul(
            builder.sitofp(s, v16f), _splat16(builder, _load(builder, xdx_p, dxo, _f32), v16f), flags=_FAST
        )
        f = p if f is None else builder.fadd(f, p, flags=_FAST)
    return f


def make_itile(tier, kind: str, levels: int, prefetch: tuple[int, int] | None = None, tokens: int = 1):
    """An intrinsic ``itile(qs, d, m, g, xq, xdx, xsqt, out)``: writes out[16*g : 16*g+16], the
    complete dot products (offset terms included) of tile g's 16 rows with the ``levels``-level
    int8 activations of one token: xq [L, K] int8, xdx [L, NB] f32, xsqt [1+, NB] f32 (row 0:
    sum over levels of xdx * sum(xq)). Per block: f = sum_l dot_l * dx_l - offset * xsqt,
    acc += d_w * f (Q4_1: + m_w * xsqt), 16 rows per vector.

    ``tokens`` = NT > 1: the same for NT tokens at once, each block's weights loaded and unpacked
    once for all of them (a few sequences decoded together): xq [NT*L, K] (token j's levels in
    rows j*L..j*L+L-1), xdx [NT*L, NB], xsqt [NT, NB], out [NT, N] f32 (rows may be strided)."""
    offset = _offset(tier, kind)
    L, NT = levels, tokens
    nline = 4 if kind != "q8_0" else 8  # 64-byte lines per (tile, block)
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
            xs_p, xs_st, _ = _arr(context, builder, at[6], xs_v)
            out_p, out_st, _ = _arr(context, builder, at[7], out_v)
            nb = builder.sdiv(d_sh[1], _c64(R))
            v16f = _vec(_f32, 16)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(v16f, [0.0] * 16)) for _ in range(NT)]
            gq = builder.mul(g_v, qs_st[0])
            gd = builder.mul(g_v, d_st[0])
            gm = builder.mul(g_v, m_st[0])
            # token j's activation rows and sums (NT == 1: the arrays as given)
            xq_t = [builder.gep(xq_p, [builder.mul(_c64(j * L), xq_st[0])]) for j in range(NT)]
            xdx_t = [builder.gep(xdx_p, [builder.mul(_c64(j * L), xdx_st[0])]) for j in range(NT)]
            xs_t = [builder.gep(xs_p, [builder.mul(_c64(j), xs_st[0])]) for j in range(NT)] if NT > 1 else [xs_p]

            def halves(p, off):  # 16 fp16 at p + off -> <16 x float>
                h = _load(builder, p, off, _vec(_i16, 16))
                return half_to_f32(builder, h)

            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                qb = builder.add(gq, builder.mul(b, _c64(64 * nline)))
                _prefetch_block(builder, qs_p, qb, prefetch, nline)
                dw = halves(d_p, builder.add(gd, builder.mul(b, _c64(2 * R))))
                mw = halves(m_p, builder.add(gm, builder.mul(b, _c64(2 * R)))) if kind == "q4_1" else None
                for j in range(NT):  # the weight loads repeat per token; LLVM keeps one copy of each
                    f = _tile_block_dots(tier, builder, kind, L, qs_p, qb, xq_t[j], xq_st, xdx_t[j], xdx_st, b)
                    cs = _splat16(builder, _load(builder, xs_t[j], builder.mul(b, _c64(4)), _f32), v16f)
                    if offset:
                        f = builder.fadd(
                            f, builder.fmul(cs, ir.Constant(v16f, [-offset] * 16), flags=_FAST), flags=_FAST
                        )
                    a = builder.fadd(builder.load(accs[j]), builder.fmul(f, dw, flags=_FAST), flags=_FAST)
                    if mw is not None:
                        a = builder.fadd(a, builder.fmul(mw, cs, flags=_FAST), flags=_FAST)
                    builder.store(a, accs[j])
            for j in range(NT):
                row = builder.mul(_c64(j), out_st[0]) if NT > 1 else _c64(0)
                optr = builder.bitcast(
                    builder.gep(out_p, [builder.add(row, builder.mul(g_v, _c64(4 * R)))]), v16f.as_pointer()
                )
                builder.store(builder.load(accs[j]), optr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return itile


def make_itile_q4k(tier, levels: int, prefetch: tuple[int, int] | None = None):
    """An intrinsic ``itile(qs, s, d, m, g, xq, xdx, xsqt, out)``: writes out[16*g : 16*g+16], the
    dot products of tile g's 16 q4_k rows with one token's ``levels``-level int8 activations
    (as ``make_itile``). Per block f = sum_l dot_l * dx_l; per super-block acc += D * sum(f * sc)
    - Dm * sum(xsqt * mn); out = acc / 64. The codes cost 2 loads and 2 converts per block."""
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

            def halves(p, off):  # 16 fp16 at p + off -> <16 x float>
                h = _load(builder, p, off, _vec(_i16, 16))
                return half_to_f32(builder, h)

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
                    f = _tile_block_dots(tier, builder, "q4_k", L, qs_p, qb, xq_p, xq_st, xdx_p, xdx_st, b)
                    cs = _splat16(builder, _load(builder, xs_p, builder.mul(b, _c64(4)), _f32), v16f)
                    so = builder.add(gs, builder.mul(b, _c64(2 * R)))
                    ad = builder.fadd(builder.load(acc_d), builder.fmul(f, codes(so), flags=_FAST), flags=_FAST)
                    am = builder.fadd(
                        builder.load(acc_m), builder.fmul(cs, codes(builder.add(so, _c64(R))), flags=_FAST), flags=_FAST
                    )
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

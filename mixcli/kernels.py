"""The numba kernels of the forward pass; ``kernels_ref`` holds a plain numpy twin of each.

Decode is memory-bandwidth bound: every weight byte is read once per token, so the matvec kernels
exist to keep the vector units ahead of memory. What makes them fast (measured, see
benchmarks/matvec.py):

- **int8 activations, integer dot.** As llama.cpp does for Q4_0/Q4_1/Q8_0, x is quantized once
  per call to int8 with one f32 scale per block of 32 (``quantize_act_levels``), and each block is
  an unsigned-by-signed byte dot (``vpdpbusd``, AVX-512 VNNI) into eight int32 lanes, converted to
  f32 and scaled once per block. The nibbles stay unsigned 0..15 and the ``-8`` of Q4_0 (the
  ``+128`` that makes Q8_0 bytes unsigned) is folded out of the integer dot: ``8 * d_w * d_x *
  sum(xq)`` is subtracted per block, with ``d_x * sum(xq)`` precomputed per block (as a vector
  added before the weight scale, so it costs no extra instruction).
- **Two activation levels by default.** One int8 level rounds x to 1/254 of its block's largest
  |x|. That is llama.cpp's arithmetic, and it is not harmless: over SmolLM2-135M's 30 layers it
  moves logits by ~3.6% of their range, and greedy answers change (llama.cpp and one-level mixcli
  both answer "What is the capital of France?" with French nonsense). The default
  ``ACT_MODE = "int8x2"`` adds a second int8 level that rounds the first level's residual, so x
  is kept to 1/254^2 of the block maximum (logits within ~1e-4 of the f32 product) at the cost of
  a second byte dot per weight block; the weights are still read once, so decode, which is bound
  by memory, slows less than prefill. ``MIXCLI_ACT=int8`` (or ``set_activation_mode``) selects
  the one-level llama.cpp arithmetic. Decode (``matvec``) and prefill (``matmul``) quantize x the
  same way, so a cached incremental run equals a full forward pass to float rounding.
- **Decode: several output rows per step, two blocks per instruction** (``_make_tile2``): one
  512-bit ``vpdpbusd`` covers a block pair of one row, the block scales become vectors
  [s_b x8, s_b+1 x8], a token's levels are combined before the weight scale (acc += d_w *
  (dot_0 * dx_0 + dot_1 * dx_1 + c)) and the offset term rides in c, so nothing is scalar per
  block. ROWS rows share each activation load, accumulators are reduced once per row, and a
  software prefetch runs a few cache lines ahead in each row stream. ``prange`` over row groups.
- **Prefill: one virtual token per lane** (``_make_ptile``). From PACK_MIN virtual tokens
  (tokens x levels) on, the int8 activations are repacked (``_pack_act``) in groups of 16 so that
  4 columns of 16 tokens fill one zmm; 4 weights of a row are broadcast to all lanes and one
  ``vpdpbusd`` adds them to 16 token dot products: 8 per block and no horizontal reduction, then
  one convert and two fma per (row, 16 tokens, block). ~1.6 instructions per (row, virtual token,
  block) against ~8 for the dot-per-(row, token) tile; the levels of a token are adjacent lanes,
  summed once when the tile writes ``out``.
- numba cannot type float16 arrays, and numba's integer rules widen every ``uint8 & 15`` to
  int64, which defeats vectorisation. So the inner loops are small LLVM IR generators
  (``numba.extending.intrinsic``) over explicit vector types, and float16 arrays cross into numba
  viewed as uint16 and widen with ``fpext half`` (``vcvtph2ps``).

Hosts without AVX-512 VNNI (or with ``NUMBA_CPU_NAME`` set, as for portable caches) get the
``*_f32act`` kernels (``ACT_MODE = "f32"``), which keep x in f32: same API, exact, slower.

Every public function writes into a preallocated ``out`` and allocates nothing per call once
warm: the activation scratch (int8 x and its per-block scales and sums) lives in thread-local
buffers kept by size, so concurrent callers on different threads do not share one.

Shapes use the dimension letters: N output rows, K input columns, G = 32 weights per quant block,
NB = K / 32 blocks per row, T tokens, D hidden, H / KVH heads, HD head dim, S cache positions,
E experts, F FFN width.
"""
from __future__ import annotations

import functools
import os
import threading

import llvmlite.binding as _llvm
import numba
import numpy as np
from llvmlite import ir
from numba import get_thread_id, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from quant.formats import QK

_JIT = dict(cache=True, fastmath=True, nogil=True)
_PJIT = dict(cache=True, fastmath=True, nogil=True, parallel=True)


def _host_has_vnni() -> bool:
    if numba.config.CPU_NAME not in (None, "host"):
        return False  # a portable cache target: only the generic paths
    feats = _llvm.get_host_cpu_features()
    return bool(feats.get("avx512vnni") and feats.get("avx512vl") and feats.get("avx512bw"))


HAS_VNNI = _host_has_vnni()
_GFNI = HAS_VNNI and bool(_llvm.get_host_cpu_features().get("gfni"))

_i8, _i16, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_FAST = ("fast",)
ROWS = 8  # output rows per matvec step (shares one activation block load among 8 rows)
PREFETCH = 256  # bytes ahead in each weight row stream
# A decode step's small ops (one row of D values, a router's 8 rows) run on the calling thread: a
# parallel region costs ~10 us to open and close on 2 threads, 5-10x the op itself (rmsnorm of
# 4096 values: 13.7 us in parallel, 1.1 us serial), and far more when another process holds a
# core, since the region waits for every thread.
SERIAL_MAX = 1 << 16  # values below which rmsnorm, rope and the f32 matvec run serially
MM_ROWS, MM_TOKS = 4, 4  # prefill tile, one activation level: 4 rows x 4 tokens = 16 zmm accumulators
MM2_ROWS, MM2_TOKS = 4, 2  # two levels: 4 rows x 2 tokens (x 2 levels: 16 activation streams)
# prefill from PACK_MIN virtual tokens (tokens x levels) on: activations packed one token per
# lane (``_make_ptile``), tiles of P_ROWS rows x P_GROUPS groups of 16 virtual tokens
PACK_MIN, P_ROWS, P_GROUPS = 6, 4, 2


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat(t, n, v):
    return ir.Constant(_vec(t, n), [v] * n)


# ---------------------------------------------------------------------------------------------
# LLVM IR building blocks
@intrinsic
def h2f(typingctx, u):
    """float16 bits (uint16) -> float32, one ``vcvtph2ps`` lane."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _f32)

    return sig, codegen


@intrinsic
def i2f(typingctx, u):
    """int32 bits -> the float32 with those bits (a register move; vectorizes)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _f32)

    return sig, codegen


def _arr(context, builder, ty, val):
    """(byte pointer to data, [strides in bytes], [shape]) of a numba array value."""
    a = context.make_array(ty)(context, builder, val)
    strides = cgutils.unpack_tuple(builder, a.strides, ty.ndim)
    shape = cgutils.unpack_tuple(builder, a.shape, ty.ndim)
    return builder.bitcast(a.data, _i8.as_pointer()), strides, shape


def _load(builder, base, off, ty):
    ptr = builder.gep(base, [off])
    return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=1)


def _c64(v):
    return ir.Constant(_i64, v)


def _clamp(builder, v, hi):
    """min(v, hi) for int64 values."""
    return builder.select(builder.icmp_signed("<", v, hi), v, hi)


def _splat16(builder, v, ty):
    """A scalar -> <16 x ty> with it in every lane (a broadcast load when v is a load)."""
    u = builder.insert_element(ir.Constant(ty, ir.Undefined), v, ir.Constant(_i32, 0))
    return builder.shuffle_vector(u, u, ir.Constant(_vec(_i32, 16), [0] * 16))


def _high_nibbles16(builder, w):
    """<16 x i32> of packed bytes -> each byte's high nibble (byte >> 4): one ``gf2p8affineqb``
    (an affine bit-matrix op) with GFNI, else a shift and a mask."""
    v16i, v64b = _vec(_i32, 16), _vec(_i8, 64)
    if _GFNI:
        gf = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v64b, [v64b, v64b, _i8]), "llvm.x86.vgf2p8affineqb.512")
        hi = builder.bitcast(ir.Constant(_vec(_i64, 8), [0x1020408000000000] * 8), v64b)
        return builder.bitcast(builder.call(gf, [builder.bitcast(w, v64b), hi, ir.Constant(_i8, 0)]), v16i)
    return builder.and_(builder.lshr(w, ir.Constant(v16i, [4] * 16)), ir.Constant(v16i, [0x0F0F0F0F] * 16))


def _bcast_pairs(builder, vec, nblk):
    """<nblk x T> -> <8*nblk x T>: each element repeated over its block's 8 lanes."""
    idx = [b for b in range(nblk) for _ in range(8)]
    return builder.shuffle_vector(vec, vec, ir.Constant(_vec(_i32, 8 * nblk), idx))


def _make_tile2(kind: str, nrows: int, ntoks: int, levels: int, wide: bool = True, prefetch: int = 0):
    """An intrinsic ``tile(qs, d, m, r, n, xq, xdx, xsqt, t0, t)`` -> UniTuple(f32, ntoks*nrows):
    the complete dot products (offset terms included) of weight rows min(r+i, n-1) with the
    ``levels``-level int8 activations of real tokens min(t0+j, t-1), element [j * nrows + i].

    ``wide``: two blocks per step in 16-lane (512-bit) vectors, one ``vpdpbusd`` zmm per
    (row, level) over 64 weights; an odd last block runs the same code at 8 lanes. Per block
    pair the scales are vectors [s_b x8, s_b+1 x8]: the levels of a token are combined before
    the weight scale, f = dot_0 * dx_0 + dot_1 * dx_1 + c, acc += f * d_w, where c carries
    the offset term (Q4_0's -8, Q8_0's +128) as c = -offset * xsqt / 8 per lane (the 8 lanes of
    a block sum to the whole term); Q4_1's min term is a separate acc += m_w * xsqt / 8.
    xq [T*L, K] int8; xdx [T*L, NB] f32; xsqt [T, NB] f32 = sum over levels of xdx * sum(xq).
    """
    q4 = kind in ("q4_0", "q4_1")
    offset = {"q4_0": 8.0, "q8_0": 128.0, "q4_1": 0.0}[kind]
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
            mod = builder.module
            vnni = {
                w: cgutils.get_or_insert_function(
                    mod, ir.FunctionType(_vec(_i32, w), [_vec(_i32, w)] * 3), f"llvm.x86.avx512.vpdpbusd.{32 * w}")
                for w in (8, 16)
            }
            pf = cgutils.get_or_insert_function(
                mod, ir.FunctionType(ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32]), "llvm.prefetch.p0")
            red = {
                w: cgutils.get_or_insert_function(
                    mod, ir.FunctionType(_f32, [_f32, _vec(_f32, w)]), f"llvm.vector.reduce.fadd.v{w}f32")
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
            cfac = ir.Constant(_f32, (-offset if offset else 1.0) / 8.0)

            def step(b, nblk):
                """Blocks b .. b+nblk-1 (nblk = 1 or 2) into the accumulators."""
                w = 8 * nblk
                vf = _vec(_f32, w)
                b4 = builder.mul(b, _c64(4))
                b2 = builder.mul(b, _c64(2))
                xv, dx, cs = [], [], []
                for j in range(ntoks):
                    xv.append([builder.bitcast(
                        _load(builder, xq_p, builder.add(lv_x[j][l], builder.mul(b, _c64(32))), _vec(_i8, 32 * nblk)),
                        _vec(_i32, w)) for l in range(L)])
                    dx.append([_bcast_pairs(builder, _load(builder, xdx_p, builder.add(lv_dx[j][l], b4), _vec(_f32, nblk)), nblk)
                               for l in range(L)])
                    c = _load(builder, xs_p, builder.add(tok_s[j], b4), _vec(_f32, nblk))
                    c = builder.fmul(c, ir.Constant(_vec(_f32, nblk), [cfac.constant] * nblk), flags=_FAST)
                    cs.append(_bcast_pairs(builder, c, nblk))
                zero = ir.Constant(_vec(_i32, w), [0] * w)
                for i in range(nrows):
                    if q4:
                        qoff = builder.add(row_q[i], builder.mul(b, _c64(16)))
                        qv = _load(builder, qs_p, qoff, _vec(_i8, 16 * nblk))
                        idx = [blk * 16 + e for blk in range(nblk) for _ in range(2) for e in range(16)]
                        dup = builder.shuffle_vector(qv, qv, ir.Constant(_vec(_i32, 32 * nblk), idx))
                        sh = builder.lshr(builder.bitcast(dup, _vec(_i16, 16 * nblk)),
                                          ir.Constant(_vec(_i16, 16 * nblk), ([0] * 8 + [4] * 8) * nblk))
                        qu = builder.and_(builder.bitcast(sh, _vec(_i8, 32 * nblk)), _splat(_i8, 32 * nblk, 15))
                    else:  # signed bytes + 128 -> unsigned, the +128 comes back out as `offset`
                        qoff = builder.add(row_q[i], builder.mul(b, _c64(32)))
                        qv = _load(builder, qs_p, qoff, _vec(_i8, 32 * nblk))
                        qu = builder.xor(qv, _splat(_i8, 32 * nblk, -128))
                    if prefetch:
                        builder.call(pf, [builder.gep(qs_p, [builder.add(qoff, _c64(prefetch))]),
                                          ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])
                    qu = builder.bitcast(qu, _vec(_i32, w))
                    dh = _load(builder, d_p, builder.add(row_d[i], b2), _vec(_i16, nblk))
                    dw = builder.fpext(builder.bitcast(_bcast_pairs(builder, dh, nblk), _vec(ir.HalfType(), w)), vf)
                    if kind == "q4_1":
                        mh = _load(builder, m_p, builder.add(row_m[i], b2), _vec(_i16, nblk))
                        mw = builder.fpext(builder.bitcast(_bcast_pairs(builder, mh, nblk), _vec(ir.HalfType(), w)), vf)
                    for j in range(ntoks):
                        k = j * nrows + i
                        f = None
                        for l in range(L):
                            dot = builder.sitofp(builder.call(vnni[w], [zero, qu, xv[j][l]]), vf)
                            p = builder.fmul(dot, dx[j][l], flags=_FAST)
                            f = p if f is None else builder.fadd(f, p, flags=_FAST)
                        if offset:
                            f = builder.fadd(f, cs[j], flags=_FAST)
                        acc = builder.load(accs[k]) if w == W else None
                        if w == W:
                            acc = builder.fadd(acc, builder.fmul(f, dw, flags=_FAST), flags=_FAST)
                            if kind == "q4_1":
                                acc = builder.fadd(acc, builder.fmul(mw, cs[j], flags=_FAST), flags=_FAST)
                            builder.store(acc, accs[k])
                        else:  # the 8-lane tail of a 16-lane accumulator: add into its low half
                            part = builder.fmul(f, dw, flags=_FAST)
                            if kind == "q4_1":
                                part = builder.fadd(part, builder.fmul(mw, cs[j], flags=_FAST), flags=_FAST)
                            wide_part = builder.shuffle_vector(
                                part, ir.Constant(vf, [0.0] * w), ir.Constant(_vec(_i32, W), list(range(W))))
                            acc = builder.load(accs[k])
                            builder.store(builder.fadd(acc, wide_part, flags=_FAST), accs[k])

            if wide:
                with cgutils.for_range(builder, builder.sdiv(nb, _c64(2))) as loop:
                    step(builder.mul(loop.index, _c64(2)), 2)
                odd = builder.icmp_signed("!=", builder.srem(nb, _c64(2)), _c64(0))
                with builder.if_then(odd):
                    step(builder.sub(nb, _c64(1)), 1)
            else:
                with cgutils.for_range(builder, nb) as loop:
                    step(loop.index, 1)
            outs = [builder.call(red[W], [ir.Constant(_f32, 0.0), builder.load(accs[k])], fastmath=_FAST)
                    for k in range(nacc)]
            return context.make_tuple(builder, signature.return_type, outs)

        return sig, codegen

    return tile


def _make_ptile(kind: str, nrows: int, ngroups: int, levels: int, tiled: bool = False):
    """An intrinsic ``ptile(qs, d, m, r, n, xp, dxp, cp, g0, ng, out)`` for prefill over packed
    activations, one lane per virtual token: writes out[t, min(r+i, n-1)] for the real tokens t
    of virtual-token groups min(g0+j, ng-1), j < ngroups, i < nrows (all offset terms included).

    The activations are packed by ``_pack_act`` in groups of 16 virtual tokens: xp [NG, K*16]
    int8 holds, for each 4 columns k..k+3, the 4 bytes of each of the 16 tokens (64 bytes, one
    zmm); dxp [NG, NB, 16] f32 the block scales, cp [NG, NB, 16] f32 the per-block offset terms
    (coef * xdx * sum(xq); coef -8 for Q4_0, -128 for Q8_0, 1 for Q4_1's mins). A row's 4
    weights k..k+3 are broadcast to all 16 lanes, so one ``vpdpbusd`` zmm adds 4 columns of one
    row to 16 token dot products: 8 per block, no horizontal reduction, then per (row, group,
    block) one convert and two fma: acc += d_w * (dot * dx + c).

    ``tiled``: the weights are in the row-tiled layout (``quant.formats.interleave_rows``; qs
    [N/16, ...], d and m [N/16, NB*16]); only the addresses of a row's bytes and scales change.

    ``kind="q4_k"`` (row-tiled only) takes one more argument, q4_k's byte codes: ``ptile(qs, s,
    d, m, ...)``, d and m being the super-block scales D, Dm; per (row, block) d_w = sc * D / 64
    and the min term m_w = -mn * Dm / 64 (with cp's coefficient 1, as for Q4_1).
    """
    q4 = kind in ("q4_0", "q4_1", "q4_k")
    L = levels
    RT = 16  # quant.formats.ROW_TILE
    if kind == "q4_k" and not (tiled and RT % nrows == 0):
        raise ValueError("the q4_k prefill tile reads row-tiled weights, nrows dividing 16")
    bq = (16 if q4 else 32) * (RT if tiled else 1)  # qs bytes per block of a row (of a tile)
    bd = 2 * (RT if tiled else 1)  # scale bytes per block (q4_k: per super-block)
    ce = 4 * RT if tiled else 4  # distance between 4-byte column groups of a row

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
            nb = builder.sdiv(d_sh[1], _c64(RT)) if tiled else d_sh[1]
        mod = builder.module
        v16i, v16f = _vec(_i32, 16), _vec(_f32, 16)
        vnni = cgutils.get_or_insert_function(mod, ir.FunctionType(v16i, [v16i] * 3), "llvm.x86.avx512.vpdpbusd.512")
        facc = [[cgutils.alloca_once_value(builder, ir.Constant(v16f, [0.0] * 16)) for _ in range(ngroups)]
                for _ in range(nrows)]
        nm1 = builder.sub(n_v, _c64(1))
        gm1 = builder.sub(ng_v, _c64(1))
        rows = [_clamp(builder, builder.add(r_v, _c64(i)), nm1) for i in range(nrows)]
        grps = [_clamp(builder, builder.add(g0_v, _c64(j)), gm1) for j in range(ngroups)]

        def base(ri, st, lane_bytes):  # the start of row ri's bytes in a part
            if not tiled:
                return builder.mul(ri, st)
            tile, lane = builder.sdiv(ri, _c64(RT)), builder.srem(ri, _c64(RT))
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
        m0f = ir.Constant(v16i, [0x0F0F0F0F] * 16)
        splat = functools.partial(_splat16, builder)

        def half(p, off):
            return builder.fpext(builder.bitcast(_load(builder, p, off, _i16), ir.HalfType()), _f32)

        def half16(p, off):
            return splat(half(p, off), v16f)

        def coded16(b, which, sup, row_sup, scale):
            """q4_k: per row i, splat(code * super-scale * scale) of block b (which 0: sc, 1: mn).
            The tile's rows r..r+nrows-1 are adjacent lanes: one small vector load each of the
            codes and of the super-scales, one multiply, then a broadcast per row."""
            vf = _vec(_f32, nrows)
            off = builder.add(row_s[0], builder.add(builder.mul(b, _c64(2 * RT)), _c64(which * RT)))
            code = builder.uitofp(builder.zext(_load(builder, s_p, off, _vec(_i8, nrows)), _vec(_i32, nrows)), vf)
            sb = builder.mul(builder.lshr(b, _c64(3)), _c64(bd))  # quant.formats.SUPER = 8 blocks
            h = _load(builder, sup, builder.add(row_sup[0], sb), _vec(_i16, nrows))
            v = builder.fmul(code, builder.fpext(builder.bitcast(h, _vec(ir.HalfType(), nrows)), vf), flags=_FAST)
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
            iacc = [[zero] * ngroups for _ in range(nrows)]
            for e in range(8):  # 4 columns at a time: one broadcast weight vector per row
                wq = []
                for i in range(nrows):
                    if q4:
                        off = builder.add(row_q[i], builder.add(builder.mul(b, _c64(bq)), _c64(ce * (e % 4))))
                        w = splat(_load(builder, qs_p, off, _i32), v16i)
                        w = builder.and_(w, m0f) if e < 4 else _high_nibbles16(builder, w)
                    else:
                        off = builder.add(row_q[i], builder.add(builder.mul(b, _c64(bq)), _c64(ce * e)))
                        # + 128 per byte (0x80808080) on the scalar, then broadcast
                        w = splat(builder.xor(_load(builder, qs_p, off, _i32), ir.Constant(_i32, -0x7F7F7F80)), v16i)
                    wq.append(w)
                for j in range(ngroups):
                    xv = _load(builder, xp_p, builder.add(xoff[j], _c64(64 * e)), v16i)
                    for i in range(nrows):
                        iacc[i][j] = builder.call(vnni, [iacc[i][j], wq[i], xv])
            for i in range(nrows):
                for j in range(ngroups):
                    f = builder.fmul(builder.sitofp(iacc[i][j], v16f), dx[j], flags=_FAST)
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


@njit(**_PJIT)
def _pack_act(xq32, xdx, xsq, coef, xp32, dxp, cp):
    """Virtual tokens [V, ...] -> groups of 16 lanes (zero past V) for ``_make_ptile``: xq32 [V, K/4]
    int32 (xq viewed 4 bytes at a time) -> xp32 [NG, K/4, 16]; xdx, xsq [V, NB] -> dxp, cp
    [NG, NB, 16], cp = coef * xsq."""
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


_KINDS = ("q4_0", "q4_1", "q8_0")
_mv_tile = {kd: _make_tile2(kd, ROWS, 1, 1, prefetch=PREFETCH) for kd in _KINDS}
_mv2_tile = {kd: _make_tile2(kd, ROWS, 1, 2, prefetch=PREFETCH) for kd in _KINDS}
_mm_tile = {kd: _make_tile2(kd, MM_ROWS, MM_TOKS, 1) for kd in _KINDS}
_mm2_tile = {kd: _make_tile2(kd, MM2_ROWS, MM2_TOKS, 2) for kd in _KINDS}
_mv_q4_0_tile, _mv_q4_1_tile, _mv_q8_0_tile = _mv_tile["q4_0"], _mv_tile["q4_1"], _mv_tile["q8_0"]
_mv2_q4_0_tile, _mv2_q4_1_tile, _mv2_q8_0_tile = _mv2_tile["q4_0"], _mv2_tile["q4_1"], _mv2_tile["q8_0"]
_mm_q4_0_tile, _mm_q4_1_tile, _mm_q8_0_tile = _mm_tile["q4_0"], _mm_tile["q4_1"], _mm_tile["q8_0"]
_mm2_q4_0_tile, _mm2_q4_1_tile, _mm2_q8_0_tile = _mm2_tile["q4_0"], _mm2_tile["q4_1"], _mm2_tile["q8_0"]
_mmp_tile = {kd: _make_ptile(kd, P_ROWS, P_GROUPS, 1) for kd in _KINDS}
_mmp2_tile = {kd: _make_ptile(kd, P_ROWS, P_GROUPS, 2) for kd in _KINDS}
_mmp_q4_0_tile, _mmp_q4_1_tile, _mmp_q8_0_tile = _mmp_tile["q4_0"], _mmp_tile["q4_1"], _mmp_tile["q8_0"]
_mmp2_q4_0_tile, _mmp2_q4_1_tile, _mmp2_q8_0_tile = _mmp2_tile["q4_0"], _mmp2_tile["q4_1"], _mmp2_tile["q8_0"]


# ---------------------------------------------------------------------------------------------
# activation quantization (llama.cpp's Q8_0 rounding: d = amax / 127, q = round(x / d))
@njit(**_JIT)
def quantize_act_levels(x, levels, xq, xdx, xsq, xsum, xsqt):
    """x [T, K] f32 -> ``levels`` int8 blocks per token, as virtual tokens v = t * levels + l:
    level 0 rounds x by llama.cpp's Q8 rule (d = amax / 127, q = round(x / d)), level 1 rounds what level 0 left over, so
    x = sum_l xdx[v] * xq[v] to within 1/(2 * 127 * 254) of the block's largest |x| instead of
    1/254. xq [T*L, K] int8; xdx, xsq, xsum [T*L, NB] (xsum: sum(x) on level 0, 0 after);
    xsqt [T, NB] = sum over levels of xsq (the per-block offset terms are linear in x_hat)."""
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


# One driver per type, written out: numba's cache keys a function by its name and line, so
# drivers made by a factory would share cache entries.
@njit(**_PJIT)
def _mv_q4_0(qs, d, m, x, levels, xq, xdx, xsq, xsum, xsqt, out):
    # x [K]; scratch [L, K] / [L, NB]; out [N]
    quantize_act_levels(x.reshape(1, x.shape[0]), levels, xq, xdx, xsq, xsum, xsqt)
    n = out.shape[0]
    for g in prange((n + ROWS - 1) // ROWS):
        r = g * ROWS
        if levels == 1:
            res = _mv_q4_0_tile(qs, d, m, r, n, xq, xdx, xsqt, 0, 1)
        else:
            res = _mv2_q4_0_tile(qs, d, m, r, n, xq, xdx, xsqt, 0, 1)
        for i in range(ROWS):
            if r + i < n:
                out[r + i] = res[i]


@njit(**_PJIT)
def _mv_q4_1(qs, d, m, x, levels, xq, xdx, xsq, xsum, xsqt, out):
    # x [K]; scratch [L, K] / [L, NB]; out [N]
    quantize_act_levels(x.reshape(1, x.shape[0]), levels, xq, xdx, xsq, xsum, xsqt)
    n = out.shape[0]
    for g in prange((n + ROWS - 1) // ROWS):
        r = g * ROWS
        if levels == 1:
            res = _mv_q4_1_tile(qs, d, m, r, n, xq, xdx, xsqt, 0, 1)
        else:
            res = _mv2_q4_1_tile(qs, d, m, r, n, xq, xdx, xsqt, 0, 1)
        for i in range(ROWS):
            if r + i < n:
                out[r + i] = res[i]


@njit(**_PJIT)
def _mv_q8_0(qs, d, m, x, levels, xq, xdx, xsq, xsum, xsqt, out):
    # x [K]; scratch [L, K] / [L, NB]; out [N]
    quantize_act_levels(x.reshape(1, x.shape[0]), levels, xq, xdx, xsq, xsum, xsqt)
    n = out.shape[0]
    for g in prange((n + ROWS - 1) // ROWS):
        r = g * ROWS
        if levels == 1:
            res = _mv_q8_0_tile(qs, d, m, r, n, xq, xdx, xsqt, 0, 1)
        else:
            res = _mv2_q8_0_tile(qs, d, m, r, n, xq, xdx, xsqt, 0, 1)
        for i in range(ROWS):
            if r + i < n:
                out[r + i] = res[i]


# Prefill: row groups outer (parallel), token tiles inner, so a group's weight bytes stay in L1
# while every token passes over them and each block pair is unpacked once per tile of tokens.
@njit(**_PJIT)
def _mm_q4_0(qs, d, m, X, levels, xq, xdx, xsq, xsum, xsqt, xq32, xp, xp32, dxp, cp, out):
    # X [T, K]; scratch [T*L, K] / [T*L, NB], xsqt [T, NB]; packed scratch (``_pack_act``) [NG, ...]
    # with NG = 0 below PACK_MIN virtual tokens; out [T, N]
    quantize_act_levels(X, levels, xq, xdx, xsq, xsum, xsqt)
    T, n = out.shape
    ng = xp.shape[0]
    if ng > 0:
        _pack_act(xq32, xdx, xsq, np.float32(-8.0), xp32, dxp, cp)
        if levels == 1:
            for g in prange((n + P_ROWS - 1) // P_ROWS):
                for g0 in range(0, ng, P_GROUPS):
                    _mmp_q4_0_tile(qs, d, m, g * P_ROWS, n, xp, dxp, cp, g0, ng, out)
        else:
            for g in prange((n + P_ROWS - 1) // P_ROWS):
                for g0 in range(0, ng, P_GROUPS):
                    _mmp2_q4_0_tile(qs, d, m, g * P_ROWS, n, xp, dxp, cp, g0, ng, out)
    elif levels == 1:
        for g in prange((n + MM_ROWS - 1) // MM_ROWS):
            r = g * MM_ROWS
            for t0 in range(0, T, MM_TOKS):
                res = _mm_q4_0_tile(qs, d, m, r, n, xq, xdx, xsqt, t0, T)
                for j in range(MM_TOKS):
                    if t0 + j < T:
                        for i in range(MM_ROWS):
                            if r + i < n:
                                out[t0 + j, r + i] = res[j * MM_ROWS + i]
    else:
        for g in prange((n + MM2_ROWS - 1) // MM2_ROWS):
            r = g * MM2_ROWS
            for t0 in range(0, T, MM2_TOKS):
                res2 = _mm2_q4_0_tile(qs, d, m, r, n, xq, xdx, xsqt, t0, T)
                for j in range(MM2_TOKS):
                    if t0 + j < T:
                        for i in range(MM2_ROWS):
                            if r + i < n:
                                out[t0 + j, r + i] = res2[j * MM2_ROWS + i]


@njit(**_PJIT)
def _mm_q4_1(qs, d, m, X, levels, xq, xdx, xsq, xsum, xsqt, xq32, xp, xp32, dxp, cp, out):
    # X [T, K]; scratch [T*L, K] / [T*L, NB], xsqt [T, NB]; packed scratch (``_pack_act``) [NG, ...]
    # with NG = 0 below PACK_MIN virtual tokens; out [T, N]
    quantize_act_levels(X, levels, xq, xdx, xsq, xsum, xsqt)
    T, n = out.shape
    ng = xp.shape[0]
    if ng > 0:
        _pack_act(xq32, xdx, xsq, np.float32(1.0), xp32, dxp, cp)
        if levels == 1:
            for g in prange((n + P_ROWS - 1) // P_ROWS):
                for g0 in range(0, ng, P_GROUPS):
                    _mmp_q4_1_tile(qs, d, m, g * P_ROWS, n, xp, dxp, cp, g0, ng, out)
        else:
            for g in prange((n + P_ROWS - 1) // P_ROWS):
                for g0 in range(0, ng, P_GROUPS):
                    _mmp2_q4_1_tile(qs, d, m, g * P_ROWS, n, xp, dxp, cp, g0, ng, out)
    elif levels == 1:
        for g in prange((n + MM_ROWS - 1) // MM_ROWS):
            r = g * MM_ROWS
            for t0 in range(0, T, MM_TOKS):
                res = _mm_q4_1_tile(qs, d, m, r, n, xq, xdx, xsqt, t0, T)
                for j in range(MM_TOKS):
                    if t0 + j < T:
                        for i in range(MM_ROWS):
                            if r + i < n:
                                out[t0 + j, r + i] = res[j * MM_ROWS + i]
    else:
        for g in prange((n + MM2_ROWS - 1) // MM2_ROWS):
            r = g * MM2_ROWS
            for t0 in range(0, T, MM2_TOKS):
                res2 = _mm2_q4_1_tile(qs, d, m, r, n, xq, xdx, xsqt, t0, T)
                for j in range(MM2_TOKS):
                    if t0 + j < T:
                        for i in range(MM2_ROWS):
                            if r + i < n:
                                out[t0 + j, r + i] = res2[j * MM2_ROWS + i]


@njit(**_PJIT)
def _mm_q8_0(qs, d, m, X, levels, xq, xdx, xsq, xsum, xsqt, xq32, xp, xp32, dxp, cp, out):
    # X [T, K]; scratch [T*L, K] / [T*L, NB], xsqt [T, NB]; packed scratch (``_pack_act``) [NG, ...]
    # with NG = 0 below PACK_MIN virtual tokens; out [T, N]
    quantize_act_levels(X, levels, xq, xdx, xsq, xsum, xsqt)
    T, n = out.shape
    ng = xp.shape[0]
    if ng > 0:
        _pack_act(xq32, xdx, xsq, np.float32(-128.0), xp32, dxp, cp)
        if levels == 1:
            for g in prange((n + P_ROWS - 1) // P_ROWS):
                for g0 in range(0, ng, P_GROUPS):
                    _mmp_q8_0_tile(qs, d, m, g * P_ROWS, n, xp, dxp, cp, g0, ng, out)
        else:
            for g in prange((n + P_ROWS - 1) // P_ROWS):
                for g0 in range(0, ng, P_GROUPS):
                    _mmp2_q8_0_tile(qs, d, m, g * P_ROWS, n, xp, dxp, cp, g0, ng, out)
    elif levels == 1:
        for g in prange((n + MM_ROWS - 1) // MM_ROWS):
            r = g * MM_ROWS
            for t0 in range(0, T, MM_TOKS):
                res = _mm_q8_0_tile(qs, d, m, r, n, xq, xdx, xsqt, t0, T)
                for j in range(MM_TOKS):
                    if t0 + j < T:
                        for i in range(MM_ROWS):
                            if r + i < n:
                                out[t0 + j, r + i] = res[j * MM_ROWS + i]
    else:
        for g in prange((n + MM2_ROWS - 1) // MM2_ROWS):
            r = g * MM2_ROWS
            for t0 in range(0, T, MM2_TOKS):
                res2 = _mm2_q8_0_tile(qs, d, m, r, n, xq, xdx, xsqt, t0, T)
                for j in range(MM2_TOKS):
                    if t0 + j < T:
                        for i in range(MM2_ROWS):
                            if r + i < n:
                                out[t0 + j, r + i] = res2[j * MM2_ROWS + i]


# ---------------------------------------------------------------------------------------------
# f32-activation paths: any host, exact to float rounding
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


@njit(**_JIT)
def _dot(w, x):
    s = np.float32(0.0)
    for k in range(x.shape[0]):
        s += w[k] * x[k]
    return s


@njit(**_JIT)
def _dot_h(w, x):
    s = np.float32(0.0)
    for k in range(x.shape[0]):
        s += h2f(w[k]) * x[k]
    return s


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


@njit(**_PJIT)
def _mv_f16(w, x, out):
    for r in prange(out.shape[0]):
        out[r] = _dot_h(w[r], x)


@njit(**_PJIT)
def _mv_f32(w, x, out):
    for r in prange(out.shape[0]):
        out[r] = _dot(w[r], x)


@njit(**_JIT)
def _mv_f32_seq(w, x, out):  # a router's few rows: see SERIAL_MAX
    for r in range(out.shape[0]):
        out[r] = _dot(w[r], x)


@njit(**_PJIT)
def _mm_f16(w, X, rowbuf, out):
    T, n = out.shape
    for r in prange(n):
        buf = rowbuf[get_thread_id()]
        for k in range(w.shape[1]):
            buf[k] = h2f(w[r, k])
        for t in range(T):
            out[t, r] = _dot(buf, X[t])


@njit(**_PJIT)
def _mm_f32(w, X, out):
    T, n = out.shape
    for r in prange(n):
        for t in range(T):
            out[t, r] = _dot(w[r], X[t])


# ---------------------------------------------------------------------------------------------
# scratch and the public matrix API
_tls = threading.local()


def _scratch(name: str, shape: tuple, dtype) -> np.ndarray:
    """A thread-local buffer of at least ``shape`` (leading axis grows), viewed to ``shape``."""
    store = getattr(_tls, "bufs", None)
    if store is None:
        store = _tls.bufs = {}
    key = (name, shape[1:], np.dtype(dtype).str)
    buf = store.get(key)
    if buf is None or buf.shape[0] < shape[0]:
        buf = store[key] = np.empty((max(shape[0], 1),) + shape[1:], dtype)
    return buf[: shape[0]] if buf.shape[0] != shape[0] else buf


def _act(t: int, k: int):
    """(levels, xq [T*L, K] int8, xdx, xsq, xsum [T*L, NB] f32, xsqt [T, NB] f32) thread-local
    scratch for the current ``ACT_LEVELS``. Decode's (T = 1) tuples are kept per K: a decode step
    makes ~7 matvec calls per layer, and five buffer lookups each were ~15% of a small model's
    token time."""
    if t == 1:
        one = getattr(_tls, "act1", None)
        if one is None:
            one = _tls.act1 = {}
        hit = one.get((k, ACT_LEVELS))
        if hit is None:
            hit = one[(k, ACT_LEVELS)] = _act_new(1, k)
        return hit
    return _act_new(t, k)


def _act_new(t: int, k: int):
    nb, lv = k // QK, ACT_LEVELS
    return (
        lv,
        _scratch("xq", (t * lv, k), np.int8),
        _scratch("xdx", (t * lv, nb), np.float32),
        _scratch("xsq", (t * lv, nb), np.float32),
        _scratch("xsum", (t * lv, nb), np.float32),
        _scratch("xsqt", (t, nb), np.float32),
    )


def _rowbuf(k: int) -> np.ndarray:
    return _scratch("row", (numba.config.NUMBA_NUM_THREADS, k), np.float32)


FP16_AS_U16 = True  # every public kernel also takes float16 arrays as their uint16 bits (Linear binds them so)


def _u16(a: np.ndarray) -> np.ndarray:
    """float16 arrays cross into numba as their uint16 bits (numba has no CPU float16)."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


def matvec_q4_0_f32act(qs, d, x, out):
    """x [K] f32 -> out [N] = W x, W from q4_0 parts qs [N, K/2], d [N, NB]; x kept in f32."""
    _mv_q4_0_f32(qs, _u16(d), x, out)


def matvec_q4_1_f32act(qs, d, m, x, out):
    matmul_q4_1_f32act(qs, d, m, x.reshape(1, -1), out.reshape(1, -1))


def matvec_q8_0_f32act(qs, d, x, out):
    matmul_q8_0_f32act(qs, d, x.reshape(1, -1), out.reshape(1, -1))


def matmul_q4_0_f32act(qs, d, X, out):
    d = _u16(d)
    _mm_quant_f32(0, qs, d, d, X, _rowbuf(X.shape[1]), out)


def matmul_q4_1_f32act(qs, d, m, X, out):
    _mm_quant_f32(1, qs, _u16(d), _u16(m), X, _rowbuf(X.shape[1]), out)


def matmul_q8_0_f32act(qs, d, X, out):
    d = _u16(d)
    _mm_quant_f32(2, qs, d, d, X, _rowbuf(X.shape[1]), out)


def _matvec_q4_0_q8act(qs, d, x, out):
    d = _u16(d)
    _mv_q4_0(qs, d, d, x, *_act(1, x.shape[0]), out)


def _matvec_q4_1_q8act(qs, d, m, x, out):
    _mv_q4_1(qs, _u16(d), _u16(m), x, *_act(1, x.shape[0]), out)


def _matvec_q8_0_q8act(qs, d, x, out):
    d = _u16(d)
    _mv_q8_0(qs, d, d, x, *_act(1, x.shape[0]), out)


def _pact(t: int, k: int):
    """``_act`` scratch plus its packed form for ``_make_ptile``: (..., xq32, xp, xp32, dxp, cp),
    with no groups (NG = 0) below PACK_MIN virtual tokens."""
    a = _act(t, k)
    v, nb = t * a[0], k // QK
    ng = (v + 15) // 16 if v >= PACK_MIN else 0
    xp = _scratch("xp", (ng, k * 16), np.int8)
    return a + (a[1].view(np.int32), xp, xp.view(np.int32).reshape(ng, k // 4, 16),
                _scratch("dxp", (ng, nb, 16), np.float32), _scratch("cp", (ng, nb, 16), np.float32))


def _matmul_q4_0_q8act(qs, d, X, out):
    d = _u16(d)
    _mm_q4_0(qs, d, d, X, *_pact(*X.shape), out)


def _matmul_q4_1_q8act(qs, d, m, X, out):
    _mm_q4_1(qs, _u16(d), _u16(m), X, *_pact(*X.shape), out)


def _matmul_q8_0_q8act(qs, d, X, out):
    d = _u16(d)
    _mm_q8_0(qs, d, d, X, *_pact(*X.shape), out)


# The public quantized kernels, chosen by activation mode (``set_activation_mode``):
#   "int8x2" (default with VNNI): two int8 levels per block, x kept to ~1/64516 of its block
#            maximum; exact enough that greedy decoding follows transformers token for token.
#   "int8":  one level, llama.cpp's Q8 activation rounding: fastest, but on small models the
#            0.4% rounding compounds over layers (SmolLM2-135M's greedy answers change).
#   "f32":   x in f32 (hosts without VNNI): exact, slower.
ACT_MODES = ("int8x2", "int8", "f32")
_QNAMES = ("matvec_q4_0", "matvec_q4_1", "matvec_q8_0", "matmul_q4_0", "matmul_q4_1", "matmul_q8_0")

# The row-tiled storage types ("q4_0r16" ...) have their kernels in kernels_r16, q4_k's (row-tiled
# and row-major) in kernels_q4k, built from the pieces above; they are bound here with the rest so
# callers see one module. Row-major q4_k has f32-activation kernels only (bound once, every mode).
from . import kernels_q4k as _q4k  # noqa: E402
from . import kernels_r16 as _r16  # noqa: E402

for _mod, _tag in ((_r16, "r16"), (_q4k, "q4_k")):
    for _name in dir(_mod):
        if _tag in _name and _name.lstrip("_").startswith(("matvec_", "matmul_", "dequant_row_")):
            globals()[_name] = getattr(_mod, _name)
_QNAMES += tuple(f"{op}_{kd}r16" for op in ("matvec", "matmul") for kd in _KINDS + ("q4_k",))


def set_activation_mode(mode: str | None = None) -> str:
    """Rebind the public quantized kernels for ``mode`` (None: $MIXCLI_ACT, else the default).
    Takes effect for models loaded afterwards (a ``Linear`` binds its kernel when built)."""
    global ACT_MODE, ACT_LEVELS, ACT_INT8
    mode = mode or os.environ.get("MIXCLI_ACT") or ("int8x2" if HAS_VNNI else "f32")
    if mode not in ACT_MODES:
        raise ValueError(f"activation mode {mode!r} is not one of {', '.join(ACT_MODES)}")
    if mode != "f32" and not HAS_VNNI:
        mode = "f32"  # the int8 paths need AVX-512 VNNI
    ACT_MODE, ACT_LEVELS, ACT_INT8 = mode, (2 if mode == "int8x2" else 1), mode != "f32"
    g = globals()
    for name in _QNAMES:
        g[name] = g[f"_{name}_q8act"] if ACT_INT8 else g[f"{name}_f32act"]
    return mode


ACT_MODE, ACT_LEVELS, ACT_INT8 = "f32", 1, False
try:
    set_activation_mode()
except ValueError:  # a misspelt $MIXCLI_ACT: runtime.select_activation_mode reports it as a usage error
    set_activation_mode("int8x2")


def matvec_f16(w, x, out):
    """w [N, K] float16, x [K] f32 -> out [N] f32."""
    _mv_f16(_u16(w), x, out)


def matvec_f32(w, x, out):
    """w [N, K] f32, x [K] f32 -> out [N] f32."""
    (_mv_f32_seq if w.size < SERIAL_MAX else _mv_f32)(w, x, out)


def matmul_f16(w, X, out):
    """w [N, K] float16, X [T, K] f32 -> out [T, N] f32."""
    _mm_f16(_u16(w), X, _rowbuf(X.shape[1]), out)


def matmul_f32(w, X, out):
    """w [N, K] f32, X [T, K] f32 -> out [T, N] f32."""
    _mm_f32(w, X, out)


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


def dequant_row_f16(w, row, out):
    _row_f16(_u16(w), row, out)


def dequant_row_f32(w, row, out):
    out[:] = w[row]


# ---------------------------------------------------------------------------------------------
# the rest of the layer (small ops run serially below SERIAL_MAX values, see there)


@njit(**_JIT)
def _rmsnorm_row(x, w, eps, out):
    # x, out [D]; w [D]
    D = x.shape[0]
    ss = np.float32(0.0)
    for i in range(D):
        ss += x[i] * x[i]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(D) + np.float32(eps))
    for i in range(D):
        out[i] = (x[i] * inv) * w[i]


@njit(**_PJIT)
def _rmsnorm_par(x, w, eps, out):
    for t in prange(x.shape[0]):
        _rmsnorm_row(x[t], w, eps, out[t])


@njit(**_JIT)
def _rmsnorm_seq(x, w, eps, out):
    for t in range(x.shape[0]):
        _rmsnorm_row(x[t], w, eps, out[t])


def rmsnorm(x, w, eps, out):
    """x [T, D], w [D] f32 -> out [T, D] = x * rsqrt(mean(x^2) + eps) * w (HF order, in f32)."""
    (_rmsnorm_seq if x.size < SERIAL_MAX else _rmsnorm_par)(x, w, eps, out)


@njit(**_JIT)
def _rope_token(x, p, inv_freq):
    # x [NH, HD] of one token at position p
    NH, HD = x.shape
    half = HD // 2
    for i in range(half):
        a = p * inv_freq[i]
        c = np.cos(a)
        s = np.sin(a)
        for h in range(NH):
            x0 = x[h, i]
            x1 = x[h, i + half]
            x[h, i] = x0 * c - x1 * s
            x[h, i + half] = x1 * c + x0 * s


@njit(**_PJIT)
def _rope_par(x, pos, inv_freq):
    for t in prange(x.shape[0]):
        _rope_token(x[t], np.float32(pos[t]), inv_freq)


@njit(**_JIT)
def _rope_seq(x, pos, inv_freq):
    for t in range(x.shape[0]):
        _rope_token(x[t], np.float32(pos[t]), inv_freq)


def rope_inplace(x, pos, inv_freq):
    """x [T, NH, HD] f32 rotated in place at positions pos [T] int64, HF's rotate_half pairing:
    dim i with i + HD/2, angle = f32(pos) * inv_freq[i] in f32."""
    (_rope_seq if x.size < SERIAL_MAX else _rope_par)(x, pos, inv_freq)


@njit(error_model="numpy", **_JIT)
def exp_f32(x):
    """exp(x) in float32, written so that loops calling it vectorize (numba's np.exp is a scalar
    libm call, 46 us for 14336 values in silu_mul against 8 now): x = k ln2 + r with
    |r| <= ln2/2, exp(r) by its Taylor series to r^7 (relative error < 1e-8), 2^k from its
    exponent bits, with k = floor(y + 0.5) by truncating y + 128.5 >= 0 (a conversion that
    vectorizes; rint is a libm call); x clamped to [-87, 88] keeps 2^k normal and finite (a
    probability of e^-87 instead of 0, or silu's v or 0, either way). error_model="numpy" drops
    numba's division checks in the callers. Used by silu_mul and by kernels_attn's softmax."""
    x = x if x > np.float32(-87.0) else np.float32(-87.0)
    x = x if x < np.float32(88.0) else np.float32(88.0)
    ki = np.int32(x * np.float32(1.4426950408889634) + np.float32(128.5)) - np.int32(128)
    k = np.float32(ki)
    r = (x - k * np.float32(0.693145751953125)) - k * np.float32(1.428606765330187e-06)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * i2f((ki + np.int32(127)) << np.int32(23))


@njit(error_model="numpy", **_JIT)
def _silu(v):
    """silu(v) = v / (1 + exp(-v)) in float32, vectorizable (see exp_f32; 1 + e >= 1, so no
    division check). Measured against torch's silu over [-100, 100]: relative error <= 3.5e-7."""
    return v / (np.float32(1.0) + exp_f32(-v))


@njit(error_model="numpy", **_JIT)
def _silu_mul(a, b, out):
    for i in range(a.shape[0]):
        out[i] = _silu(a[i]) * b[i]


@njit(error_model="numpy", **_JIT)
def _silu_mul_inplace(a, b):
    # its own loop: with out aliasing a, _silu_mul's runtime overlap check fails and it runs scalar
    for i in range(a.shape[0]):
        a[i] = _silu(a[i]) * b[i]


def silu_mul(a, b, out):
    """out = silu(a) * b elementwise, for a, b, out [T, F] or [F] (C-contiguous; out may be a)."""
    if out is a:  # the model's call; any other overlap is still correct below, only not vectorized
        _silu_mul_inplace(a.reshape(-1), b.reshape(-1))
    else:
        _silu_mul(a.reshape(-1), b.reshape(-1), out.reshape(-1))


@njit(**_JIT)
def route_topk(logits, k, weights_out, idx_out):
    """logits [T, E] f32 -> idx_out [T, K] int32 (largest softmax probability first; equal values
    keep the lower expert first) and weights_out [T, K] f32: softmax over all E in f32, the top
    K renormalised to sum 1 (Mixtral's router)."""
    T, E = logits.shape
    for t in range(T):
        mx = logits[t, 0]
        for e in range(1, E):
            mx = max(mx, logits[t, e])
        tot = np.float32(0.0)
        for e in range(E):
            tot += np.exp(logits[t, e] - mx)
        for j in range(k):
            best = -1
            bv = np.float32(0.0)
            for e in range(E):
                taken = False
                for i in range(j):
                    if idx_out[t, i] == e:
                        taken = True
                if taken:
                    continue
                v = np.exp(logits[t, e] - mx) / tot
                if best < 0 or v > bv:
                    best = e
                    bv = v
            idx_out[t, j] = best
            weights_out[t, j] = bv
        s = np.float32(0.0)
        for j in range(k):
            s += weights_out[t, j]
        for j in range(k):
            weights_out[t, j] /= s


@njit(**_JIT)
def _add_scaled(out, x, w):
    for i in range(out.shape[0]):
        out[i] += w * x[i]


def add_scaled(out, x, w):
    """out += w * x for out, x [D] or [T, D] (C-contiguous), w a scalar."""
    _add_scaled(out.reshape(-1), x.reshape(-1), np.float32(w))


# decode and prefill attention live in kernels_attn (it builds on the helpers above)
from .kernels_attn import attention  # noqa: E402,F401

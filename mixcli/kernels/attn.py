"""Causal GQA attention over the KV cache: decode over fp16 one kv head's query group at a time.

Decode attention reads every cached K and V row once per token, like a matvec reads its weights,
but each fp16 element feeds one multiply-add per query head of its group (4 with H = 4 * KVH), so
with 2 threads it is bound by the vector units about as much as by memory. The old kernel
(one (token, head) pair at a time) re-read and re-converted every K and V
row for each of the group's heads and called libm's exp per score. Here (measured, see
benchmarks/attention.py):

- **One pass over K and one over V per kv head and token**, for all its query heads. Both are
  LLVM IR generators (``numba.extending.intrinsic``) over 16-lane vectors, as in ``tiles.py``:
  numba has no stack arrays, so a plain loop keeps its accumulators in memory (a load and a store
  per multiply-add), and it cannot reduce several dot products at once.
- **Scores** (``_make_scores``): a block of R heads x KB keys (R * KB = 16) is 16 vector
  accumulators over HD; each K row is loaded and widened (``vcvtph2ps``) once for the R heads,
  and the 16 dot products are reduced together by a transposing shuffle tree (15 shuffle pairs and
  adds for all 16, instead of ~8 instructions for each one), scaled, and stored as R rows of KB.
- **Weighted V sum** (``_make_wsum``): R heads x C vectors of 16 columns in registers for the whole
  key loop; each V row chunk is widened once and each probability broadcast once. 4 heads take
  64-column strips (16 accumulators); 1 or 2 heads take 128-column rows whole, so their V reads
  stay one sequential stream (~15% faster without GQA than 64-column strips).
- **Softmax** in f32 with max subtraction; ``ops.exp_f32`` is a polynomial that vectorizes (silu_mul
  uses it too) and ``_rowmax`` a vector max.
- **Software prefetch** PF_KEYS rows ahead in the K and V streams, into L2 (into L1 was slower):
  the hardware prefetcher alone ran ~20% slower at n >= 2048 from DRAM, 1 or 2 threads.
- **V in blocks of V_BLOCK keys**, each block's column strips in turn, so the second strip finds
  the rows in cache: ~20% at n = 4096, where a kv head's V no longer fits in L2.

Parallel over kv heads (decode: KVH-way; 8 for the usual H = 32, KVH = 8), or over (token, kv head)
pairs when the scratch has a row per (token, head), in an order that gives every thread's
contiguous share of the range about the same number of keys. With more threads than kv heads,
decode leaves some idle (8 of 16 at KVH = 8): splitting the positions too, with a merge of the
partial softmax sums, would use them, but it cannot help at 2 threads and is not done. Head dims
that are not a multiple of 16 run the same code with masked loads in their last chunk.

Two more paths at the end of the module (``mixcli.kv_cache`` picks among them):

- **q8_0 cache** (``attention_q8_0``): llama.cpp's blocks of 32 int8 and one fp16 scale, read as
  stored; per key, each block's dot product is scaled once. Plain numba loops (fastmath
  vectorizes the 32-element inner loops); kv heads in parallel.
- **Tiled prefill** (``attention_prefill``, ``attention_prefill_q8_0``): with many query tokens the
  decode kernel reads each kv head's whole K/V prefix once per query token and needs a score row
  [T*H, n] per (token, head) (1 GiB for a 256-token chunk at 32k positions). Flash attention's
  order instead: a tile of query tokens (all heads of a kv group: Q_TILE * grp rows) against tiles
  of KV_TILE keys, scores and weighted sums as f32 matrix products (numpy's BLAS, its own threads),
  the softmax carried across key tiles by a running max and sum. Memory is a few tiles.

Shapes use the dimension letters of DESIGN.md: T tokens, H query heads, KVH kv heads,
HD head dim, S cache positions, n positions attended, R heads and KB keys in a tile, C vectors
of 16 columns.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .irgen import _FAST, _JIT, _PJIT, _arr, _c64, _f32, _i16, _i32, _i64, _load, _u16, _vec, f2h, h2f, half_to_f32
from .ops import exp_f32

_V = 16  # lanes per vector: one zmm of f32 (a ymm of fp16 bits)
PF_KEYS = 32  # software prefetch distance in K and V rows (8 KiB at HD = 128), into L2
_bool = ir.IntType(1)


def _masked_load(builder, ptr, ety, mask, fill=0):
    """<16 x ety> at ptr with the lanes outside mask read as fill (nothing past them is touched)."""
    vty = _vec(ety, _V)
    fn = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(vty, [vty.as_pointer(), _i32, _vec(_bool, _V), vty]),
        f"llvm.masked.load.v{_V}{'i16' if ety == _i16 else 'f32'}.p0",
    )
    return builder.call(
        fn, [builder.bitcast(ptr, vty.as_pointer()), ir.Constant(_i32, 1), mask, ir.Constant(vty, [fill] * _V)]
    )


def _masked_store(builder, val, ptr, mask):
    vty = val.type
    fn = cgutils.get_or_insert_function(
        builder.module,
        ir.FunctionType(ir.VoidType(), [vty, vty.as_pointer(), _i32, _vec(_bool, _V)]),
        f"llvm.masked.store.v{_V}f32.p0",
    )
    builder.call(fn, [val, builder.bitcast(ptr, vty.as_pointer()), ir.Constant(_i32, 1), mask])


def _lane_mask(builder, count):
    """<16 x i1>: lanes below count (an i64, may be <= 0 or >= 16)."""
    splat = builder.insert_element(ir.Constant(_vec(_i64, _V), ir.Undefined), count, ir.Constant(_i32, 0))
    splat = builder.shuffle_vector(splat, splat, ir.Constant(_vec(_i32, _V), [0] * _V))
    return builder.icmp_signed("<", ir.Constant(_vec(_i64, _V), list(range(_V))), splat)


def _prefetch_run(builder, base, start, nbytes):
    """Software prefetch of the cache lines of base[start : start + nbytes] (bytes; a hint, so
    addresses past the array are harmless)."""
    pf = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [base.type, _i32, _i32, _i32]), "llvm.prefetch.p0"
    )
    with cgutils.for_range_slice(builder, _c64(0), nbytes, _c64(64)) as (off, _):
        builder.call(
            pf,
            [
                builder.gep(base, [builder.add(start, off)]),
                ir.Constant(_i32, 0),
                ir.Constant(_i32, 2),
                ir.Constant(_i32, 1),
            ],
        )


def _widen(builder, bits):
    """<16 x i16> fp16 bits -> <16 x float>."""
    return half_to_f32(builder, bits)


def _reduce16(builder, vs):
    """16 vectors -> one vector whose lane i is the sum of vs[i]'s lanes: each level pairs the
    vectors and adds their halves (lanes [a.lo, b.lo] + [a.hi, b.hi]), 15 times 2 shuffles + 1 add
    in all."""
    seg = _V
    while len(vs) > 1:
        seg //= 2  # lanes each item keeps after this level
        items = _V // (2 * seg)  # items per input vector
        lo = [it * 2 * seg + e for it in range(items) for e in range(seg)]
        hi = [i + seg for i in lo]
        lo_idx = ir.Constant(_vec(_i32, _V), lo + [i + _V for i in lo])
        hi_idx = ir.Constant(_vec(_i32, _V), hi + [i + _V for i in hi])
        vs = [
            builder.fadd(builder.shuffle_vector(a, b, lo_idx), builder.shuffle_vector(a, b, hi_idx), flags=_FAST)
            for a, b in zip(vs[0::2], vs[1::2])
        ]
    return vs[0]


def _make_scores(R: int, KB: int):
    """An intrinsic ``scores(q, kc, sc, h0, nblk, scale)``: sc[h0+r, j] = scale * q[h0+r] . kc[j]
    for r < R and keys j < nblk * KB; q [H, HD] f32, kc [S, HD] fp16 bits (uint16), sc [>= h0+R,
    >= nblk*KB] f32; rows unit-stride."""
    assert R * KB == _V

    @intrinsic
    def scores(typingctx, q, kc, sc, h0, nblk, scale):
        sig = types.void(q, kc, sc, h0, nblk, scale)

        def codegen(context, builder, signature, args):
            q_v, kc_v, sc_v, h0_v, nblk_v, scale_v = args
            at = signature.args
            q_p, q_st, q_sh = _arr(context, builder, at[0], q_v)
            k_p, k_st, _ = _arr(context, builder, at[1], kc_v)
            s_p, s_st, _ = _arr(context, builder, at[2], sc_v)
            vf, vh = _vec(_f32, _V), _vec(_i16, _V)
            hd = q_sh[1]
            nfull = builder.sdiv(hd, _c64(_V))
            rem = builder.sub(hd, builder.mul(nfull, _c64(_V)))
            qrow = [builder.mul(builder.add(h0_v, _c64(r)), q_st[0]) for r in range(R)]
            srow = [builder.mul(builder.add(h0_v, _c64(r)), s_st[0]) for r in range(R)]
            tail = _lane_mask(builder, rem)
            sv = builder.insert_element(ir.Constant(vf, ir.Undefined), scale_v, ir.Constant(_i32, 0))
            sv = builder.shuffle_vector(sv, sv, ir.Constant(_vec(_i32, _V), [0] * _V))
            accs = [cgutils.alloca_once(builder, vf) for _ in range(_V)]  # [R * KB], r-major

            def chunk(krow, c, mask):
                koff = builder.mul(c, _c64(2 * _V))
                qoff = builder.mul(c, _c64(4 * _V))
                if mask is None:
                    kv = [_widen(builder, _load(builder, k_p, builder.add(kr, koff), vh)) for kr in krow]
                else:
                    kv = [
                        _widen(builder, _masked_load(builder, builder.gep(k_p, [builder.add(kr, koff)]), _i16, mask))
                        for kr in krow
                    ]
                for r in range(R):
                    if mask is None:
                        qv = _load(builder, q_p, builder.add(qrow[r], qoff), vf)
                    else:
                        qv = _masked_load(builder, builder.gep(q_p, [builder.add(qrow[r], qoff)]), _f32, mask)
                    for kk in range(KB):
                        a = accs[r * KB + kk]
                        builder.store(
                            builder.fadd(builder.load(a), builder.fmul(qv, kv[kk], flags=_FAST), flags=_FAST), a
                        )

            with cgutils.for_range(builder, nblk_v) as blk:
                j0 = builder.mul(blk.index, _c64(KB))
                krow = [builder.mul(builder.add(j0, _c64(kk)), k_st[0]) for kk in range(KB)]
                if PF_KEYS:  # the block PF_KEYS keys ahead, in flight while this one computes
                    _prefetch_run(
                        builder,
                        k_p,
                        builder.mul(builder.add(j0, _c64(PF_KEYS)), k_st[0]),
                        builder.mul(_c64(KB), k_st[0]),
                    )
                for a in accs:
                    builder.store(ir.Constant(vf, [0.0] * _V), a)
                with cgutils.for_range(builder, nfull) as c:
                    chunk(krow, c.index, None)
                with builder.if_then(builder.icmp_signed(">", rem, _c64(0)), likely=False):
                    chunk(krow, nfull, tail)
                res = builder.fmul(_reduce16(builder, [builder.load(a) for a in accs]), sv, flags=_FAST)
                j0b = builder.mul(j0, _c64(4))
                for r in range(R):
                    part = builder.shuffle_vector(
                        res, res, ir.Constant(_vec(_i32, KB), list(range(r * KB, (r + 1) * KB)))
                    )
                    ptr = builder.bitcast(builder.gep(s_p, [builder.add(srow[r], j0b)]), _vec(_f32, KB).as_pointer())
                    builder.store(part, ptr, align=1)
            return context.get_dummy_value()

        return sig, codegen

    return scores


def _make_wsum(R: int, C: int):
    """An intrinsic ``wsum(p, vc, out, h0, j0, j1, c0)``: out[h0+r, c0:c0+16C] += sum over keys
    j0 <= j < j1 of p[h0+r, j] * vc[j, c0:c0+16C] for r < R, columns past HD left alone;
    p [>= h0+R, >= j1] f32, vc [S, HD] fp16 bits (uint16), out [H, HD] f32; rows unit-stride.
    The R x C accumulators stay in registers over the key loop."""

    @intrinsic
    def wsum(typingctx, p, vc, out, h0, j0, j1, c0):
        sig = types.void(p, vc, out, h0, j0, j1, c0)

        def codegen(context, builder, signature, args):
            p_v, vc_v, o_v, h0_v, j0_v, j1_v, c0_v = args
            at = signature.args
            p_p, p_st, _ = _arr(context, builder, at[0], p_v)
            v_p, v_st, _ = _arr(context, builder, at[1], vc_v)
            o_p, o_st, o_sh = _arr(context, builder, at[2], o_v)
            vf, vh = _vec(_f32, _V), _vec(_i16, _V)
            left = builder.sub(o_sh[1], c0_v)  # columns from c0 to HD
            prow = [builder.mul(builder.add(h0_v, _c64(r)), p_st[0]) for r in range(R)]
            orow = [
                builder.add(builder.mul(builder.add(h0_v, _c64(r)), o_st[0]), builder.mul(c0_v, _c64(4)))
                for r in range(R)
            ]
            vcol = builder.mul(c0_v, _c64(2))
            masks = [_lane_mask(builder, builder.sub(left, _c64(m * _V))) for m in range(C)]
            accs = [cgutils.alloca_once(builder, vf) for _ in range(R * C)]  # [R * C], r-major

            def run(masked):
                for r in range(R):
                    for m in range(C):
                        ptr = builder.gep(o_p, [builder.add(orow[r], _c64(4 * _V * m))])
                        if masked:
                            val = _masked_load(builder, ptr, _f32, masks[m])
                        else:
                            val = builder.load(builder.bitcast(ptr, vf.as_pointer()), align=1)
                        builder.store(val, accs[r * C + m])
                with cgutils.for_range_slice(builder, j0_v, j1_v, _c64(1)) as (j, _):
                    if PF_KEYS:  # the first strip fetches whole rows ahead; the others find them cached
                        with builder.if_then(builder.icmp_signed("==", c0_v, _c64(0))):
                            _prefetch_run(builder, v_p, builder.mul(builder.add(j, _c64(PF_KEYS)), v_st[0]), v_st[0])
                    ps = []
                    for r in range(R):
                        pj = _load(builder, p_p, builder.add(prow[r], builder.mul(j, _c64(4))), _f32)
                        u = builder.insert_element(ir.Constant(vf, ir.Undefined), pj, ir.Constant(_i32, 0))
                        ps.append(builder.shuffle_vector(u, u, ir.Constant(_vec(_i32, _V), [0] * _V)))
                    vrow = builder.add(builder.mul(j, v_st[0]), vcol)
                    for m in range(C):
                        off = builder.add(vrow, _c64(2 * _V * m))
                        if masked:
                            bits = _masked_load(builder, builder.gep(v_p, [off]), _i16, masks[m])
                        else:
                            bits = _load(builder, v_p, off, vh)
                        v = _widen(builder, bits)
                        for r in range(R):
                            a = accs[r * C + m]
                            builder.store(
                                builder.fadd(builder.load(a), builder.fmul(ps[r], v, flags=_FAST), flags=_FAST), a
                            )
                for r in range(R):
                    for m in range(C):
                        ptr = builder.gep(o_p, [builder.add(orow[r], _c64(4 * _V * m))])
                        val = builder.load(accs[r * C + m])
                        if masked:
                            _masked_store(builder, val, ptr, masks[m])
                        else:
                            builder.store(val, builder.bitcast(ptr, vf.as_pointer()), align=1)

            full = builder.icmp_signed(">=", left, _c64(_V * C))
            with builder.if_else(full, likely=True) as (then, otherwise):
                with then:
                    run(False)
                with otherwise:
                    run(True)
            return context.get_dummy_value()

        return sig, codegen

    return wsum


@intrinsic
def _rowmax(typingctx, s, n):
    """max(s[:n]) of a 1-D f32 array with unit stride, n >= 1, 16 lanes at a time: numba's max loop
    (``max(mx, s[j])`` or a compare and select) stays scalar, one ``vmaxss`` per score, ~1.1 us
    per 2048 scores, which was a fifth of a kv head's whole decode step."""
    sig = types.float32(s, n)

    def codegen(context, builder, signature, args):
        s_v, n_v = args
        s_p, _, _ = _arr(context, builder, signature.args[0], s_v)
        vf = _vec(_f32, _V)
        vmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vf]), f"llvm.maxnum.v{_V}f32")
        red = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_f32, [vf]), f"llvm.vector.reduce.fmax.v{_V}f32"
        )
        ninf = float("-inf")
        acc = cgutils.alloca_once_value(builder, ir.Constant(vf, [ninf] * _V))
        nfull = builder.sdiv(n_v, _c64(_V))
        with cgutils.for_range(builder, nfull) as loop:
            v = _load(builder, s_p, builder.mul(loop.index, _c64(4 * _V)), vf)
            builder.store(builder.call(vmax, [builder.load(acc), v]), acc)
        rem = builder.sub(n_v, builder.mul(nfull, _c64(_V)))
        tail = _masked_load(
            builder, builder.gep(s_p, [builder.mul(nfull, _c64(4 * _V))]), _f32, _lane_mask(builder, rem), ninf
        )
        return builder.call(red, [builder.call(vmax, [builder.load(acc), tail])])

    return sig, codegen


_scores4, _scores2, _scores1 = _make_scores(4, 4), _make_scores(2, 8), _make_scores(1, 16)
# weighted-sum tiles: 4 heads x 4 vectors (64 columns) = 16 accumulators; fewer heads take whole
# 128-column rows (8 vectors), which keeps their V reads one sequential stream
_wsum4, _wsum2, _wsum1 = _make_wsum(4, 4), _make_wsum(2, 4), _make_wsum(1, 4)
_wsum2w, _wsum1w = _make_wsum(2, 8), _make_wsum(1, 8)
V_BLOCK = 128  # keys per weighted-sum block: its V rows (32 KiB at HD = 128) stay cached for the next strip


@njit(error_model="numpy", **_JIT)
def _softmax_row(s, n):
    """s[:n] <- softmax(s[:n]) in place, in f32 with max subtraction."""
    mx = _rowmax(s, n)
    tot = np.float32(0.0)
    for j in range(n):
        e = exp_f32(s[j] - mx)
        s[j] = e
        tot += e
    inv = np.float32(1.0) / tot
    for j in range(n):
        s[j] *= inv


@njit(error_model="numpy", **_JIT)
def _score_tail(q, kc, sc, h0, R, j0, n, scale):
    """Keys j0..n-1 (fewer than a tile's KB) of heads h0..h0+R-1, one dot product each."""
    HD = q.shape[1]
    for j in range(j0, n):
        for h in range(h0, h0 + R):
            s = np.float32(0.0)
            for i in range(HD):
                s += q[h, i] * h2f(kc[j, i])
            sc[h, j] = s * scale


@intrinsic
def _f32_at(typingctx, addr):
    """A uint64 address -> float32* (arrays cross into the cfunc below as addresses)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], _f32.as_pointer())

    return types.CPointer(types.float32)(types.uint64), codegen


@intrinsic
def _u16_at(typingctx, addr):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], _i16.as_pointer())

    return types.CPointer(types.uint16)(types.uint64), codegen


# _attend_group is a C function called through its address. numba links a callee's code into each
# caller and optimizes and compiles it again there: as a plain call, the tiles of the group routine
# were compiled once for it, again for each parallel loop body and again for _attention (45 s of
# CPU on a first run). A C function is compiled once and called opaquely.
_u64, _i64t = types.uint64, types.int64
_GROUP_SIG = types.void(_u64, _u64, _u64, _u64, _u64, _i64t, _i64t, _i64t, _i64t, _i64t, _i64t, _i64t, types.float32)


def _attend_group(q_at, kc_at, vc_at, out_at, sc_at, H, HD, S, sc_cols, h0, grp, n, scale):
    """Query heads h0..h0+grp-1 of one token (they share kv head kc, vc) against keys 0..n-1:
    q, out [H, HD] f32; kc, vc [S, HD] fp16 bits; sc [H, sc_cols] f32 holds the scores of row h
    (each array given by the address of its C-contiguous data). Heads go in tiles of 4, then 2,
    then 1, so each tile reads K once and V once from memory: V in blocks of V_BLOCK keys, each
    block's column strips in turn while its rows are still in cache."""
    q, out = carray(_f32_at(q_at), (H, HD)), carray(_f32_at(out_at), (H, HD))
    kc, vc = carray(_u16_at(kc_at), (S, HD)), carray(_u16_at(vc_at), (S, HD))
    sc = carray(_f32_at(sc_at), (H, sc_cols))
    r = 0
    while r < grp:
        h = h0 + r
        R = 4 if grp - r >= 4 else (2 if grp - r >= 2 else 1)
        KB = 16 // R
        nblk = n // KB
        if R == 4:
            _scores4(q, kc, sc, h, nblk, scale)
        elif R == 2:
            _scores2(q, kc, sc, h, nblk, scale)
        else:
            _scores1(q, kc, sc, h, nblk, scale)
        _score_tail(q, kc, sc, h, R, nblk * KB, n, scale)
        for hh in range(h, h + R):
            _softmax_row(sc[hh], n)
        for hh in range(h, h + R):
            out[hh, :] = 0.0
        wide = R < 4 and HD > 64
        for j0 in range(0, n, V_BLOCK):
            j1 = min(j0 + V_BLOCK, n)
            for c0 in range(0, HD, 128 if wide else 64):
                if R == 4:
                    _wsum4(sc, vc, out, h, j0, j1, c0)
                elif R == 2:
                    if wide:
                        _wsum2w(sc, vc, out, h, j0, j1, c0)
                    else:
                        _wsum2(sc, vc, out, h, j0, j1, c0)
                elif wide:
                    _wsum1w(sc, vc, out, h, j0, j1, c0)
                else:
                    _wsum1(sc, vc, out, h, j0, j1, c0)
        r += R


@functools.lru_cache(maxsize=1)
def _group_fn():
    """_attend_group compiled as a C function, on first use (a cfunc compiles when it is made)."""
    return cfunc(_GROUP_SIG, error_model="numpy", **_JIT)(_attend_group)


@functools.lru_cache(maxsize=1)
def _group_addr() -> np.uint64:
    """The C function's address: what ``_attention`` takes. Passing the cfunc object itself made
    numba type it on every call (~0.1 ms, a third of a small model's attention time)."""
    return np.uint64(_group_fn().address)


@intrinsic
def _call_group(typingctx, fn, q_at, kc_at, vc_at, out_at, sc_at, H, HD, S, sc_cols, h0, grp, n, scale):
    """Call the C function at address ``fn`` with _GROUP_SIG's arguments."""
    sig = types.void(fn, q_at, kc_at, vc_at, out_at, sc_at, H, HD, S, sc_cols, h0, grp, n, scale)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [_i64] * 12 + [_f32])
        target = builder.inttoptr(args[0], fnty.as_pointer())
        vals = [context.cast(builder, v, t, types.int64) for v, t in zip(args[1:13], signature.args[1:13])]
        vals.append(context.cast(builder, args[13], signature.args[13], types.float32))
        builder.call(target, vals)
        return context.get_dummy_value()

    return sig, codegen


@njit(error_model="numpy", **_PJIT)
def _attention(q, kc, vc, pos0, scale, out, scratch, group):
    # q, out [T, H, HD] f32; kc, vc [KVH, S, HD] uint16 (fp16 bits); scratch [>= H or >= T*H, >= pos0+T]
    # (all C-contiguous); group: _attend_group's address, passed in so this function stays cacheable
    T, H, HD = q.shape
    KVH, S = kc.shape[0], kc.shape[1]
    grp = H // KVH
    sc = np.float32(scale)
    pairs = scratch.shape[0] >= T * H and T > 1  # every (token, kv head) pair in parallel
    # else one scratch row per head: kv heads in parallel, tokens in turn
    n_items = KVH * (T if pairs else 1)
    for i in prange(n_items):
        # pair i -> token order 0, T-1, 1, T-2, ...: each thread's contiguous share of the range
        # then holds short and long rows alike (query t attends pos0 + t + 1 keys)
        u = i // KVH
        g = i - u * KVH
        tp = u // 2 if u % 2 == 0 else T - 1 - u // 2
        t0 = tp if pairs else 0
        t1 = tp + 1 if pairs else T
        for t in range(t0, t1):
            row = t * H if pairs else 0
            _call_group(
                group,
                q[t].ctypes.data,
                kc[g].ctypes.data,
                vc[g].ctypes.data,
                out[t].ctypes.data,
                scratch[row].ctypes.data,
                H,
                HD,
                S,
                scratch.shape[1],
                g * grp,
                grp,
                pos0 + t + 1,
                sc,
            )


def attention(q, k_cache, v_cache, pos0, scale, out, scratch):
    """Causal GQA attention over a float16 KV cache (the contract of ``kernels.attention``).

    q [T, H, HD] f32 (roped), k_cache / v_cache [KVH, S, HD] float16 with positions
    0..pos0+T-1 filled; query t sits at pos0+t and sees keys 0..pos0+t; head h reads kv head
    h // (H // KVH); out [T, H, HD] f32. scratch f32 holds scores: [T*H, >= pos0+T] runs every
    (token, kv head) pair in parallel; [H, >= pos0+T] (the decode buffer, e.g. [H, S]) runs kv
    heads in parallel and tokens in turn. Softmax in f32 with max subtraction.
    """
    T, H = q.shape[0], q.shape[1]
    if scratch.shape[0] < H or scratch.shape[1] < pos0 + T:
        raise ValueError(f"attention scratch {scratch.shape} is smaller than [{H}, {pos0 + T}]")
    kc, vc = _u16(k_cache), _u16(v_cache)
    # the group routine takes C-contiguous arrays by address; any other layout goes through copies
    if all(a.flags.c_contiguous for a in (q, kc, vc, out, scratch)):
        _attention(q, kc, vc, pos0, scale, out, scratch, _group_addr())
    else:
        res = np.empty(out.shape, np.float32)
        _attention(
            np.ascontiguousarray(q),
            np.ascontiguousarray(kc),
            np.ascontiguousarray(vc),
            pos0,
            scale,
            res,
            np.ascontiguousarray(scratch),
            _group_addr(),
        )
        out[...] = res


@njit(error_model="numpy", **_PJIT)
def _attention_slots(q, k_new, v_new, k_at, v_at, n_keys, KVH, S, scale, out, scratch, group):
    # q, out [B, H, HD] f32: one query token per slot; k_at, v_at [B] uint64: the address of slot
    # b's [KVH, S, HD] fp16 keys and values of this layer (C-contiguous); n_keys [B]: the keys slot
    # b's query sees; scratch [B*H, >= max n_keys] f32 (C-contiguous). Every (slot, kv head) pair in
    # parallel: one fork/join for the whole batch instead of one per slot. k_new, v_new [B, KVH, HD]
    # f32 (or [0, ...]: nothing to store): the new token's key and value, written to position
    # n_keys[b] - 1 as fp16 by the pair that reads that head next.
    B, H, HD = q.shape
    grp = H // KVH
    sc = np.float32(scale)
    head_bytes = S * HD * 2
    store = k_new.shape[0] > 0
    for i in prange(B * KVH):
        b = i // KVH
        g = i - b * KVH
        if store:
            p = n_keys[b] - 1
            kc = carray(_u16_at(k_at[b] + np.uint64(g * head_bytes)), (S, HD))
            vc = carray(_u16_at(v_at[b] + np.uint64(g * head_bytes)), (S, HD))
            for j in range(HD):
                kc[p, j] = f2h(k_new[b, g, j])
                vc[p, j] = f2h(v_new[b, g, j])
        _call_group(
            group,
            q[b].ctypes.data,
            k_at[b] + np.uint64(g * head_bytes),
            v_at[b] + np.uint64(g * head_bytes),
            out[b].ctypes.data,
            scratch[b * H].ctypes.data,
            H,
            HD,
            S,
            scratch.shape[1],
            g * grp,
            grp,
            n_keys[b],
            sc,
        )


def attention_slots(q, k_caches, v_caches, n_keys, scale, out, scratch):
    """One decode token per sequence, each over its own float16 KV cache, in one call: what a
    batched server step needs (``attention`` per slot forks and joins the threads once per slot
    and layer, which cost a third of a 4-slot step on the default model).

    q, out [B, H, HD] f32; k_caches, v_caches: B arrays [KVH, S, HD] float16 (one layer of each
    slot's cache, same shape); n_keys [B] int: slot b's query sees keys 0..n_keys[b]-1 (it sits at
    n_keys[b]-1); scratch f32 [B*H, >= max(n_keys)]. Everything is checked here, before the kernel
    reads memory by address.
    """
    B, H, HD = q.shape
    if len(k_caches) != B or len(v_caches) != B or np.shape(n_keys) != (B,):
        raise ValueError(f"{len(k_caches)} / {len(v_caches)} caches and {np.shape(n_keys)} key counts for {B} queries")
    KVH, S, _ = k_caches[0].shape
    for c in (*k_caches, *v_caches):
        if c.shape != (KVH, S, HD) or c.dtype != np.float16 or not c.flags.c_contiguous:
            raise ValueError(f"a KV cache {c.shape} {c.dtype} is not a C-contiguous float16 [{KVH}, {S}, {HD}]")
    if KVH == 0 or H % KVH:
        raise ValueError(f"{KVH} KV heads do not divide {H} heads")
    n = np.asarray(n_keys, np.int64)
    if B and (n.min() < 1 or n.max() > S):
        raise IndexError(f"key counts {n.min()}..{n.max()} outside 1..{S}")
    if out.shape != q.shape or scratch.shape[0] < B * H or (B and scratch.shape[1] < n.max()):
        raise ValueError(f"out {out.shape} / scratch {scratch.shape} for q {q.shape} and {n.max() if B else 0} keys")
    if not all(a.flags.c_contiguous for a in (q, out, scratch)) or out.dtype != np.float32:
        raise ValueError("q, out and scratch must be C-contiguous float32")
    k_at = np.array([c.ctypes.data for c in k_caches], np.uint64)
    v_at = np.array([c.ctypes.data for c in v_caches], np.uint64)
    none = np.empty((0, KVH, HD), np.float32)
    _attention_slots(q, none, none, k_at, v_at, n, KVH, S, scale, out, scratch, _group_addr())


class SlotCaches(NamedTuple):
    """A batched decode step's slot caches, checked once for the step by ``slot_caches``; each
    layer's ``store_attend_slots`` then writes and reads them by address. Holds the arrays so
    their memory outlives the addresses."""

    k_all: tuple  # B arrays [L, KVH, S, HD] float16, C-contiguous, one shape
    v_all: tuple
    k_at: np.ndarray  # [B] uint64 their addresses
    v_at: np.ndarray
    n_keys: np.ndarray  # [B] int64 keys slot b's query sees, its new token's included
    scratch: np.ndarray  # [B*H, max n_keys] f32 scores
    shape: tuple  # (L, KVH, S, HD, H)


def slot_caches(k_all, v_all, n_keys, n_heads: int) -> SlotCaches:
    """Check B slots' whole float16 caches k_all, v_all (each [L, KVH, S, HD]) and their key
    counts once per step, for every layer's ``store_attend_slots``: the per-layer call then costs
    a few comparisons instead of a walk over 2B arrays (a third of a 4-slot step of the default
    model went to checking, views and per-slot stores)."""
    B = len(k_all)
    if len(v_all) != B or np.shape(n_keys) != (B,) or B == 0:
        raise ValueError(f"{len(k_all)} / {len(v_all)} caches and {np.shape(n_keys)} key counts")
    L, KVH, S, HD = k_all[0].shape
    for c in (*k_all, *v_all):
        if c.shape != (L, KVH, S, HD) or c.dtype != np.float16 or not c.flags.c_contiguous:
            raise ValueError(f"a KV cache {c.shape} {c.dtype} is not a C-contiguous float16 [{L}, {KVH}, {S}, {HD}]")
    if KVH == 0 or n_heads % KVH:
        raise ValueError(f"{KVH} KV heads do not divide {n_heads} heads")
    n = np.array(n_keys, np.int64)
    if n.min() < 1 or n.max() > S:
        raise IndexError(f"key counts {n.min()}..{n.max()} outside 1..{S}")
    return SlotCaches(
        tuple(k_all),
        tuple(v_all),
        np.array([c.ctypes.data for c in k_all], np.uint64),
        np.array([c.ctypes.data for c in v_all], np.uint64),
        n,
        np.empty((B * n_heads, int(n.max())), np.float32),
        (L, KVH, S, HD, n_heads),
    )


def store_attend_slots(q, k_new, v_new, slots: SlotCaches, layer: int, scale, out):
    """One decode token per slot at layer ``layer``: store each slot's new key and value k_new,
    v_new [B, KVH, HD] f32 (as fp16, at position n_keys[b] - 1), then out [B, H, HD] = attention of
    q [B, H, HD] over the slot's keys 0..n_keys[b] - 1. ``slots`` from ``slot_caches``."""
    L, KVH, S, HD, H = slots.shape
    B = len(slots.k_all)
    if not 0 <= layer < L:
        raise IndexError(f"layer {layer} outside 0..{L - 1}")
    for a, shape in ((q, (B, H, HD)), (out, (B, H, HD)), (k_new, (B, KVH, HD)), (v_new, (B, KVH, HD))):
        if a.shape != shape or a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"{a.shape} {a.dtype} is not a C-contiguous float32 {list(shape)}")
    at = np.uint64(layer * KVH * S * HD * 2)
    _attention_slots(
        q,
        k_new,
        v_new,
        slots.k_at + at,
        slots.v_at + at,
        slots.n_keys,
        KVH,
        S,
        scale,
        out,
        slots.scratch,
        _group_addr(),
    )


# ---- q8_0 KV cache (llama.cpp's block: 32 int8 values and one fp16 scale) -----------------------
@njit(error_model="numpy", **_PJIT)
def _attention_q8_0(q, kq, kd, vq, vd, pos0, scale, out, scratch):
    # q, out [T, H, HD] f32; kq, vq [KVH, S, HD] int8; kd, vd [KVH, S, HD/32] uint16 (fp16 bits);
    # scratch [H, >= pos0+T] f32: one score row per head, kv heads in parallel, tokens in turn
    T, H, HD = q.shape
    KVH = kq.shape[0]
    grp = H // KVH
    NB = HD // 32
    sc = np.float32(scale)
    for g in prange(KVH):
        for t in range(T):
            n = pos0 + t + 1
            for h in range(g * grp, (g + 1) * grp):
                for j in range(n):
                    s = np.float32(0.0)
                    for b in range(NB):
                        acc = np.float32(0.0)
                        for i in range(b * 32, b * 32 + 32):
                            acc += q[t, h, i] * np.float32(kq[g, j, i])
                        s += acc * h2f(kd[g, j, b])
                    scratch[h, j] = s * sc
                _softmax_row(scratch[h], n)
                for i in range(HD):
                    out[t, h, i] = 0.0
                for j in range(n):
                    p = scratch[h, j]
                    for b in range(NB):
                        w = p * h2f(vd[g, j, b])
                        for i in range(b * 32, b * 32 + 32):
                            out[t, h, i] += w * np.float32(vq[g, j, i])


def attention_q8_0(q, k_qs, k_d, v_qs, v_d, pos0, scale, out, scratch):
    """Causal GQA attention over a q8_0 KV cache: k_qs / v_qs [KVH, S, HD] int8, k_d / v_d
    [KVH, S, HD/32] float16 (one scale per block of 32), positions 0..pos0+T-1 filled; q, out
    [T, H, HD] f32 as in ``attention``; scratch [H, >= pos0+T] f32 holds one head's scores at a
    time. Blocks are read as stored (no dequantized copy); kv heads run in parallel."""
    T, H = q.shape[0], q.shape[1]
    if scratch.shape[0] < H or scratch.shape[1] < pos0 + T:
        raise ValueError(f"attention scratch {scratch.shape} is smaller than [{H}, {pos0 + T}]")
    if k_qs.shape[2] % 32 or k_d.shape[2] * 32 != k_qs.shape[2]:
        raise ValueError(f"q8_0 cache of head dim {k_qs.shape[2]} with {k_d.shape[2]} scales per row")
    c = np.ascontiguousarray
    if out.flags.c_contiguous:
        _attention_q8_0(c(q), c(k_qs), c(_u16(k_d)), c(v_qs), c(_u16(v_d)), pos0, scale, out, scratch)
    else:
        res = np.empty(out.shape, np.float32)
        _attention_q8_0(c(q), c(k_qs), c(_u16(k_d)), c(v_qs), c(_u16(v_d)), pos0, scale, res, scratch)
        out[...] = res


# ---- tiled prefill (flash-style): query blocks against K/V blocks, online softmax -------------
Q_TILE = 256  # query tokens per tile (times the group's heads: the rows of one matrix product)
KV_TILE = 512  # keys per tile: K and V converted to f32 once per query tile


def _rows_f16(kc, vc):
    def rows(g, j0, j1):  # -> K, V [j1-j0, HD] f32
        return kc[g, j0:j1].astype(np.float32), vc[g, j0:j1].astype(np.float32)

    return rows


def _rows_q8_0(kq, kd, vq, vd):
    HD = kq.shape[2]

    def deq(qs, d, g, j0, j1):
        x = qs[g, j0:j1].reshape(j1 - j0, HD // 32, 32).astype(np.float32)
        x *= d[g, j0:j1, :, None].astype(np.float32)
        return x.reshape(j1 - j0, HD)

    def rows(g, j0, j1):
        return deq(kq, kd, g, j0, j1), deq(vq, vd, g, j0, j1)

    return rows


def _tiled(q, n_kv, rows, pos0, scale, out):
    """out [T, H, HD] = causal attention of q [T, H, HD] over keys 0..pos0+T-1 given by ``rows(g,
    j0, j1)`` -> (K, V [j1-j0, HD] f32) of kv head g. Per kv head and tile of Q_TILE tokens, the
    group's query rows [Tq * grp, HD] meet K/V in tiles of KV_TILE keys: scores and the weighted
    V sum are matrix products (BLAS), the softmax is carried across key tiles by its running max
    m and sum l (rescaling the partial output when m grows), so no [T, n] score matrix exists and
    each K/V row is read once per query tile instead of once per query token."""
    T, H, HD = q.shape
    grp = H // n_kv
    sc = np.float32(scale)
    for t0 in range(0, T, Q_TILE):
        t1 = min(T, t0 + Q_TILE)
        tq = t1 - t0
        qpos = pos0 + t0 + np.repeat(np.arange(tq), grp)  # [tq*grp] position of each query row
        n = pos0 + t1  # keys the tile's last query sees
        for g in range(n_kv):
            Q = q[t0:t1, g * grp : (g + 1) * grp].reshape(tq * grp, HD) * sc  # [tq*grp, HD], rows (t, h)
            m = np.full(tq * grp, -np.inf, np.float32)  # running max
            l = np.zeros(tq * grp, np.float32)  # running sum of exp
            o = np.zeros((tq * grp, HD), np.float32)  # running numerator
            for j0 in range(0, n, KV_TILE):
                j1 = min(n, j0 + KV_TILE)
                K, V = rows(g, j0, j1)
                s = Q @ K.T  # [tq*grp, j1-j0]
                if j1 - 1 > pos0 + t0:  # a key past the first query's position: mask the future
                    s[np.arange(j0, j1)[None, :] > qpos[:, None]] = -np.inf
                m_new = np.maximum(m, s.max(axis=1))
                alpha = np.exp(m - m_new)  # 0 on the first tile (m = -inf)
                s -= m_new[:, None]
                np.exp(s, out=s)
                l = l * alpha + s.sum(axis=1)
                o *= alpha[:, None]
                o += s @ V
                m = m_new
            o /= l[:, None]
            out[t0:t1, g * grp : (g + 1) * grp] = o.reshape(tq, grp, HD)


def attention_prefill(q, k_cache, v_cache, pos0, scale, out):
    """``attention`` for a prompt chunk, tiled (see ``_tiled``): q [T, H, HD] f32, k_cache /
    v_cache [KVH, S, HD] float16, out [T, H, HD] f32; no score buffer."""
    _tiled(q, k_cache.shape[0], _rows_f16(k_cache, v_cache), pos0, scale, out)


def attention_prefill_q8_0(q, k_qs, k_d, v_qs, v_d, pos0, scale, out):
    """``attention_q8_0`` for a prompt chunk, tiled: each K/V tile is dequantized to f32 once."""
    _tiled(q, k_qs.shape[0], _rows_q8_0(k_qs, k_d, v_qs, v_d), pos0, scale, out)

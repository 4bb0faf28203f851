"""Numba twins of quant.q4's quantizers for the converter's hot path (q4_0, q8_0 and q4_k).

Why: the numpy reference is more than ten times slower, minutes of quantizing alone for a
46.7B-parameter Mixtral (benchmarks/RESULTS.md, "The converter"). Here one kernel call quantizes a
whole row chunk, a row at a time so the row stays in L1/L2: one pass over the stored bits (bf16 decoding, the largest
magnitude per block as integer reductions, NaN/inf count), the fp16 scales, then the packing pass
(nibbles and the round-trip error). Results are bit-for-bit those of ``quant.q4.quantize``
(tested), which stays the reference. Numba has no float16 on the CPU, so the fp16 rounding of the
scales is numpy's own integer routine (``npy_floatbits_to_halfbits``) transcribed; a test checks it
against numpy for every sign and exponent with the rounding bits exhaustive, and across the
subnormal range.

What makes it fast: the search for the signed value of largest magnitude is two branch-free
reductions (one over positive, one over negative values), not a scalar loop with an early exit in
every block, and the scales are computed inside the kernel rather than between kernels in numpy.
q4_k keeps its division per weight, (x + m') / d', because the reference divides and the bits
must agree.

``tile`` writes the parts straight in the row-tiled layout of the "r16" storage types
(``quant.formats.interleave_rows``: 16 rows' 4-byte column groups side by side): re-laying them in
numpy afterwards cost as much as quantizing.

The kernels are single-threaded and release the GIL, so the converter's own threads decide the
parallelism (``quant.writer.QUANT_THREADS``: with 4+ cores two threads quantize a chunk's row
halves). On the 2-core target one quantizing thread is fastest: the converter's reader (its copy
out of the page cache is the critical path) and writer/hasher threads need the other core's spare
time; a numba ``parallel=True`` region and a second quantizing thread both measured slower there.

Shapes: raw [N, K] row chunk, NB = K // 32 blocks per row, G = 32; W bytes of qs per row (K/2 for
q4_0, K for q8_0); R rows per tile (1: row-major).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .formats import QK, SUPER

FAST_TYPES = ("q4_0", "q8_0", "q4_k")
U32 = np.uint32


@njit(nogil=True, cache=True)
def _bf16_bits_to_f32_bits(src, out):  # src [N, K] uint16 -> out [N, K] uint32 (f32 bits)
    n, k = src.shape
    for i in range(n):
        for j in range(k):
            out[i, j] = np.uint32(src[i, j]) << np.uint32(16)


@njit(nogil=True, cache=True, inline="always")
def _f32_to_f16(f):
    """fp32 bits -> fp16 bits, rounded to nearest even: numpy's ``npy_floatbits_to_halfbits``
    (overflow to inf, subnormals, NaN payloads), so the scales equal numpy's ``astype('<f2')``."""
    h_sgn = (f & U32(0x80000000)) >> U32(16)
    f_exp = f & U32(0x7F800000)
    if f_exp >= U32(0x47800000):  # NaN, inf, or too large: inf
        if f_exp == U32(0x7F800000):
            f_sig = f & U32(0x007FFFFF)
            if f_sig != U32(0):
                ret = U32(0x7C00) + (f_sig >> U32(13))
                if ret == U32(0x7C00):
                    ret += U32(1)  # keep it a NaN
                return h_sgn + ret
        return h_sgn + U32(0x7C00)
    if f_exp <= U32(0x38000000):  # a subnormal half or zero
        if f_exp < U32(0x33000000):
            return h_sgn
        f_sig = (U32(0x00800000) + (f & U32(0x007FFFFF))) >> (U32(113) - (f_exp >> U32(23)))
        if (f_sig & U32(0x3FFF)) != U32(0x1000) or (f & U32(0x7FF)) != U32(0):
            f_sig += U32(0x1000)
        return h_sgn + (f_sig >> U32(13))
    f_sig = f & U32(0x007FFFFF)
    if (f_sig & U32(0x3FFF)) != U32(0x1000):
        f_sig += U32(0x1000)
    # a carry out of the significand bumps the exponent, to inf at the top: both correct
    return h_sgn + (f_sig >> U32(13)) + ((f_exp - U32(0x38000000)) >> U32(13))


@njit(nogil=True, cache=True, inline="always")
def _f16_to_f32(h):
    """fp16 bits -> fp32 bits (exact)."""
    sgn = (h & U32(0x8000)) << U32(16)
    e = h & U32(0x7C00)
    s = h & U32(0x3FF)
    if e == U32(0):
        if s == U32(0):
            return sgn
        e32 = U32(113)  # a subnormal s * 2^-24: normalize the significand
        while (s & U32(0x400)) == U32(0):
            s <<= U32(1)
            e32 -= U32(1)
        return sgn | (e32 << U32(23)) | ((s & U32(0x3FF)) << U32(13))
    if e == U32(0x7C00):
        return sgn | U32(0x7F800000) | (s << U32(13))
    return sgn | ((e + U32(0x1C000)) << U32(13)) | (s << U32(13))


@njit(nogil=True, cache=True)
def f32_bits_to_f16_bits(src, out):  # src [M] uint32 -> out [M] uint16 (tests: against numpy)
    for i in range(src.size):
        out[i] = np.uint16(_f32_to_f16(src[i]))


@njit(nogil=True, cache=True)
def f16_bits_to_f32_bits(src, out):  # src [M] uint16 -> out [M] uint32
    for i in range(src.size):
        out[i] = _f16_to_f32(U32(src[i]))


@njit(nogil=True, cache=True, error_model="numpy")
def _quantize_rows(src, shift, q4, tile, qs, d16, err):
    """Quantize a row chunk; returns the number of blocks holding NaN/inf (then the parts are
    meaningless).

    src [N, K] uint16 bf16 bits (shift 16) or uint32 f32 bits (shift 0); q4: q4_0, else q8_0;
    out: qs [N/R, R*W/4] uint32 (the qs bytes, 4 to a word), d16 [N/R, R*NB] uint16 (fp16 bits),
    err [N] max |dequant - x| per row. Row r's word g goes to qs[r // R, g*R + r % R] and its
    block b's scale to d16[r // R, b*R + r % R]: row-major for R = 1, the r16 layout for R = 16."""
    n, k = src.shape
    nb = k // QK
    half = QK // 2
    w = k // 2 if q4 else k
    xb = np.empty(k, np.uint32)  # [K] this row as f32 bits
    x = xb.view(np.float32)
    first = np.empty(nb, np.uint32)  # [NB] bits of the value that sets the scale
    fv = first.view(np.float32)
    dbits = np.empty(nb, np.uint32)  # [NB] exact scale
    d = dbits.view(np.float32)
    drbits = np.empty(nb, np.uint32)  # [NB] the stored fp16 scale, as f32
    dr = drbits.view(np.float32)
    qs8 = qs.view(np.uint8)  # [N/R, R*W]
    qrow = np.empty(w, np.uint8)  # [W] a row's qs bytes when tiled (then scattered)
    qwords = qrow.view(np.uint32)  # [W/4]
    nbad = 0
    for i in range(n):
        # pass 1: decode, and per block the largest |x|. |x| orders as the unsigned integer
        # bits & 0x7fffffff for every non-NaN float, so the max is an integer reduction; kept
        # separately (+1, so 0 means "none") over positive and negative values, the sign of the
        # largest magnitude is known without a search unless both signs have it.
        for b in range(nb):
            o = b * QK
            pm = U32(0)
            nm = U32(0)
            for j in range(QK):
                bits = U32(src[i, o + j]) << U32(shift)
                xb[o + j] = bits
                c = (bits & U32(0x7FFFFFFF)) + U32(1)
                neg = bits >> U32(31)
                pm = max(pm, c * (U32(1) - neg))
                nm = max(nm, c * neg)
            m = max(pm, nm) - U32(1)
            nbad += m >= U32(0x7F800000)
            if not q4 or pm > nm:
                first[b] = m
            elif nm > pm:
                first[b] = m | U32(0x80000000)
            else:  # both signs: the first one, as numpy's argmax(abs(x)) picks (ties, zeros)
                for j in range(QK):
                    if xb[o + j] & U32(0x7FFFFFFF) == m:
                        first[b] = xb[o + j]
                        break
        # scales: q4_0 maps the signed value of largest magnitude to -8, q8_0 the largest |x| to 127
        for b in range(nb):
            d[b] = fv[b] / np.float32(-8.0) if q4 else fv[b] / np.float32(127.0)
        t, ri = i // tile, i % tile
        for b in range(nb):
            h = _f32_to_f16(dbits[b])
            d16[t, b * tile + ri] = np.uint16(h)
            drbits[b] = _f16_to_f32(h)
        # pass 2: codes and the round-trip error (per-lane maxima: no serial reduction), straight
        # into the output when row-major (a computed scatter index would stop vectorization)
        out = qs8[i] if tile == 1 else qrow  # [W]
        if q4:
            lanes = np.zeros(half, dtype=np.float32)
            for b in range(nb):
                db = d[b]
                inv = np.float32(1.0) / db if db != 0 else np.float32(0.0)
                drb = dr[b]
                o = b * QK
                for j in range(half):
                    v0 = x[o + j]
                    v1 = x[o + j + half]
                    # x*inv lies in [-8, 8], so +8.5 is >= 0 and int truncation is numpy's trunc
                    q0 = min(np.int32(v0 * inv + np.float32(8.5)), 15)
                    q1 = min(np.int32(v1 * inv + np.float32(8.5)), 15)
                    out[b * half + j] = np.uint8(q0 | (q1 << 4))
                    e0 = abs(np.float32(q0 - 8) * drb - v0)
                    e1 = abs(np.float32(q1 - 8) * drb - v1)
                    lanes[j] = max(lanes[j], max(e0, e1))
        else:
            lanes = np.zeros(QK, dtype=np.float32)
            oi8 = out.view(np.int8)
            for b in range(nb):
                db = d[b]
                inv = np.float32(1.0) / db if db != 0 else np.float32(0.0)
                drb = dr[b]
                o = b * QK
                for j in range(QK):
                    v = x[o + j]
                    q = np.rint(v * inv)
                    oi8[o + j] = np.int8(q)
                    lanes[j] = max(lanes[j], abs(q * drb - v))
        err[i] = lanes.max()
        if tile > 1:
            for g in range(w // 4):
                qs[t, g * tile + ri] = qwords[g]
    return nbad


@njit(nogil=True, cache=True, error_model="numpy")
def _quantize_rows_q4k(src, shift, tile, qs, sc8, d16, m16, err):
    """q4_k (the rule in ``quant.formats``, operation for operation as ``quant.q4.quantize`` so
    the bits agree); returns the number of blocks holding NaN/inf. src as ``_quantize_rows``;
    out: qs [N/R, R*K/8] uint32 (the nibble bytes, 4 to a word), sc8 [N/R, R*2*NB] uint8 (sc_b,
    mn_b), d16, m16 [N/R, R*NS] uint16 (fp16 bits of D, Dm); err [N]. Byte / word / scale j of
    row r goes to [r // R, j*R + r % R] (row-major for R = 1, the r16 layout for R = 16)."""
    n, k = src.shape
    nb = k // QK
    ns = (nb + SUPER - 1) // SUPER
    half = QK // 2
    xb = np.empty(k, np.uint32)  # [K] this row as f32 bits
    x = xb.view(np.float32)
    db = np.empty(nb, np.float32)  # [NB] d_b, then the stored d'
    mb = np.empty(nb, np.float32)  # [NB] m_b, then the stored m'
    codes = np.empty(2 * nb, np.uint8)  # [2*NB] sc_b, mn_b
    qrow = np.empty(k // 2, np.uint8)  # [K/2] this row's nibble bytes
    qwords = qrow.view(np.uint32)
    onebits = np.empty(1, np.uint32)  # a scalar's f32 bits (for the fp16 rounding)
    onef = onebits.view(np.float32)
    nbad = 0
    for i in range(n):
        ovf = False
        for b in range(nb):  # decode; per block the range, and whether it holds NaN/inf
            o = b * QK
            lo = np.float32(0.0)
            hi = np.float32(-np.inf)
            bad = False
            for j in range(QK):
                bits = U32(src[i, o + j]) << U32(shift)
                xb[o + j] = bits
                bad |= (bits & U32(0x7F800000)) == U32(0x7F800000)
                v = x[o + j]
                lo = min(lo, v)
                hi = max(hi, v)
            nbad += bad
            db[b] = (hi - lo) / np.float32(15.0)
            mb[b] = -lo
        t, ri = i // tile, i % tile
        for sb in range(ns):  # super-scales, then the block codes and the stored block scales
            b1 = min(nb, (sb + 1) * SUPER)
            for which in range(2):
                v = db if which == 0 else mb
                top = np.float32(0.0)
                for b in range(sb * SUPER, b1):
                    top = max(top, v[b])
                onef[0] = top * np.float32(64.0) / np.float32(255.0)
                h = _f32_to_f16(onebits[0])
                if h & U32(0x8000) or h > U32(0x7C00):
                    h = U32(0)  # -0.0 (and NaN) -> +0, as the reference's where(sup > 0)
                ovf |= h == U32(0x7C00)  # past fp16: the reference's dequantization is NaN
                onebits[0] = _f16_to_f32(h)
                sf = onef[0]
                if which == 0:
                    d16[t, sb * tile + ri] = np.uint16(h)
                else:
                    m16[t, sb * tile + ri] = np.uint16(h)
                for b in range(sb * SUPER, b1):
                    c = np.float32(0.0)
                    if sf > 0:
                        c = min(max(np.rint(v[b] * np.float32(64.0) / sf), np.float32(0.0)), np.float32(255.0))
                    codes[2 * b + which] = np.uint8(c)
                    v[b] = sf * c / np.float32(64.0)
        lanes = np.zeros(half, dtype=np.float32)
        for b in range(nb):  # the nibbles and the round-trip error (per-lane maxima)
            dq = db[b]
            mq = mb[b]
            o = b * QK
            for j in range(half):
                v0 = x[o + j]
                v1 = x[o + j + half]
                q0 = np.float32(0.0)
                q1 = np.float32(0.0)
                if dq > 0:
                    q0 = min(max(np.rint((v0 + mq) / dq), np.float32(0.0)), np.float32(15.0))
                    q1 = min(max(np.rint((v1 + mq) / dq), np.float32(0.0)), np.float32(15.0))
                qrow[b * half + j] = np.uint8(np.int32(q0) | (np.int32(q1) << 4))
                lanes[j] = max(lanes[j], max(abs(q0 * dq - mq - v0), abs(q1 * dq - mq - v1)))
        err[i] = np.inf if ovf else lanes.max()
        for g in range(k // 8):
            qs[t, g * tile + ri] = qwords[g]
        for j in range(2 * nb):
            sc8[t, j * tile + ri] = codes[j]
    return nbad


def decode(rows: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """A stored row chunk -> X [N, K] float32; uint16 input is bf16 bits (numpy has no bf16).
    ``scratch``, a flat uint32 buffer of at least N*K, is reused for the result (fresh memory
    costs a page fault per 4 KiB, as much as the decoding itself)."""
    if rows.dtype == np.uint16:
        if scratch is not None and scratch.size >= rows.size:
            out = scratch[: rows.size].reshape(rows.shape)
        else:
            out = np.empty(rows.shape, dtype=np.uint32)
        _bf16_bits_to_f32_bits(rows, out)
        return out.view(np.float32)
    if rows.dtype == np.float32:
        return rows
    return rows.astype(np.float32)


def quantize_chunk(
    raw: np.ndarray, qtype: str, scratch: np.ndarray | None = None, *, tile: int = 1, keep_x: bool = True
) -> tuple[dict[str, np.ndarray], float, int, np.ndarray | None]:
    """Stored rows [N, K] (float32, float16, or uint16 bf16 bits) -> (parts exactly as
    quant.q4.quantize gives them, max |dequant - x|, number of blocks holding NaN/inf, X [N, K]
    float32 or None). When the count is non-zero the parts are meaningless.

    ``tile`` R > 1 (N a multiple of R) lays the parts out as ``formats.interleave_rows`` does:
    qs [N/R, R*W], d [N/R, R*NB]. X is decoded only with ``keep_x`` (the writer needs it only to
    name a NaN); ``scratch`` (flat uint32, >= N*K) may hold it. The parts never alias it."""
    n, k = raw.shape
    nb = k // QK
    if n % tile:
        raise ValueError(f"{n} rows do not fill tiles of {tile}")
    q4 = qtype == "q4_0"
    if qtype not in FAST_TYPES:
        raise ValueError(f"no fast quantizer for {qtype}")
    if raw.dtype == np.float16:
        raw = raw.astype(np.float32)
    if raw.dtype == np.uint16:
        src, shift = raw, 16
    else:
        src, shift = np.ascontiguousarray(raw, dtype=np.float32).view(np.uint32), 0
    err = np.empty(n, dtype=np.float32)
    if qtype == "q4_k":
        ns = -(-nb // SUPER)
        qs = np.empty((n // tile, tile * k // 2), dtype=np.uint8)
        codes = np.empty((n // tile, tile * 2 * nb), dtype=np.uint8)
        d16, m16 = (np.empty((n // tile, tile * ns), dtype=np.uint16) for _ in range(2))
        nbad = _quantize_rows_q4k(src, shift, tile, qs.view(np.uint32), codes, d16, m16, err)
        x = decode(raw, scratch) if keep_x else None
        parts = {"qs": qs, "s": codes, "d": d16.view("<f2"), "m": m16.view("<f2")}
        return parts, float(err.max()) if n else 0.0, int(nbad), x
    w = k // 2 if q4 else k  # qs bytes per row
    qs = np.empty((n // tile, tile * w), dtype=np.uint8 if q4 else np.int8)
    d16 = np.empty((n // tile, tile * nb), dtype=np.uint16)
    nbad = _quantize_rows(src, shift, q4, tile, qs.view(np.uint32), d16, err)
    x = decode(raw, scratch) if keep_x else None
    return {"qs": qs, "d": d16.view("<f2")}, float(err.max()) if n else 0.0, int(nbad), x

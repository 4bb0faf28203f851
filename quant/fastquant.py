"""Numba twins of quant.q4's quantizers for the converter's hot path (q4_0 and q8_0).

Why: the numpy reference runs at ~75 M weights/s for q4_0, so a 46.7B-parameter Mixtral would
take over ten minutes of quantizing alone. Here one pass over the stored bits (bf16 decoding,
NaN/inf count, largest magnitude per block as an integer reduction) and one packing pass (nibbles
and the round-trip error) run over a row chunk that stays in cache. Results are bit-for-bit those
of ``quant.q4.quantize`` (tested), which stays the reference. Numba has no float16 on the CPU, so
the scales are computed and rounded to fp16 by numpy between the passes (1/32 of the data).

The kernels are single-threaded on purpose: the converter runs a reader thread and a
writer/hasher thread beside them, and on the 2-core target machine a 2-thread numba region that
competes with those ran the bf16 decode 3x slower than one thread does (measured: 1.9 s vs
0.64 s over a Mixtral layer).

Shapes: X [N, K] float32 row chunk, NB = K // 32 blocks per row, G = 32.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .formats import QK

FAST_TYPES = ("q4_0", "q8_0")
_KIND = {"q4_0": 0, "q8_0": 1}


@njit(nogil=True, cache=True)
def _bf16_bits_to_f32_bits(src, out):  # src [N, K] uint16 -> out [N, K] uint32 (f32 bits)
    n, k = src.shape
    for i in range(n):
        for j in range(k):
            out[i, j] = np.uint32(src[i, j]) << np.uint32(16)


@njit(nogil=True, cache=True)
def _scan(src, shift, out, amax, signed):
    """One pass over stored bits: src [N, K] uint16 (bf16, shift 16) or uint32 (f32 bits,
    shift 0) -> out [N, K] f32 bits (skipped when ``out`` is None), and per block [N, NB] the
    largest |x| as bits (amax) and the bits of the first value that has it (signed); returns
    the number of blocks holding NaN/inf.

    |x| compares as the unsigned integer (bits & 0x7fffffff) for every non-NaN float, so the
    max is an integer reduction that vectorizes without fastmath, and the first value of largest
    magnitude is exactly what numpy's argmax(abs(x)) picks (zeros and ties included)."""
    n, k = src.shape
    nb = k // QK
    nbad = 0
    for i in range(n):
        for b in range(nb):
            o = b * QK
            m = np.uint32(0)
            if out is None:
                for j in range(QK):
                    m = max(m, (np.uint32(src[i, o + j]) << np.uint32(shift)) & np.uint32(0x7FFFFFFF))
            else:
                for j in range(QK):
                    bits = np.uint32(src[i, o + j]) << np.uint32(shift)
                    out[i, o + j] = bits
                    m = max(m, bits & np.uint32(0x7FFFFFFF))
            nbad += m >= np.uint32(0x7F800000)
            first = np.uint32(0)
            for j in range(QK):
                bits = np.uint32(src[i, o + j]) << np.uint32(shift)
                if bits & np.uint32(0x7FFFFFFF) == m:
                    first = bits
                    break
            amax[i, b] = m
            signed[i, b] = first
    return nbad


@njit(nogil=True, cache=True)
def _pack_q4_0(x, d, dr, qs, err):  # x [N, K], d/dr [N, NB] (exact / fp16-rounded) -> qs [N, K/2] u8, err [N]
    n, k = x.shape
    nb = k // QK
    half = QK // 2
    for i in range(n):
        lanes = np.zeros(half, dtype=np.float32)  # running max error per lane: no serial reduction
        for b in range(nb):
            db = d[i, b]
            inv = np.float32(1.0) / db if db != 0 else np.float32(0.0)
            drb = dr[i, b]
            o = b * QK
            for j in range(half):
                v0 = x[i, o + j]
                v1 = x[i, o + j + half]
                # x*inv lies in [-8, 8], so +8.5 is >= 0 and int truncation is numpy's trunc
                q0 = min(np.int32(v0 * inv + np.float32(8.5)), 15)
                q1 = min(np.int32(v1 * inv + np.float32(8.5)), 15)
                qs[i, b * half + j] = np.uint8(q0 | (q1 << 4))
                e0 = abs(np.float32(q0 - 8) * drb - v0)
                e1 = abs(np.float32(q1 - 8) * drb - v1)
                lanes[j] = max(lanes[j], max(e0, e1))
        err[i] = lanes.max()


@njit(nogil=True, cache=True)
def _pack_q8_0(x, d, dr, qs, err):  # x [N, K] -> qs [N, K] int8, err [N]
    n, k = x.shape
    nb = k // QK
    for i in range(n):
        lanes = np.zeros(QK, dtype=np.float32)
        for b in range(nb):
            db = d[i, b]
            inv = np.float32(1.0) / db if db != 0 else np.float32(0.0)
            drb = dr[i, b]
            o = b * QK
            for j in range(QK):
                v = x[i, o + j]
                q = np.rint(v * inv)
                qs[i, o + j] = np.int8(q)
                lanes[j] = max(lanes[j], abs(q * drb - v))
        err[i] = lanes.max()


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


def quantize_chunk(raw: np.ndarray, qtype: str, scratch: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], float, int, np.ndarray]:
    """Stored rows [N, K] (float32, float16, or uint16 bf16 bits) -> (parts exactly as
    quant.q4.quantize gives them, max |dequant - x|, number of blocks holding NaN/inf, X [N, K]
    float32). When the count is non-zero the parts are meaningless. ``scratch`` (flat uint32,
    >= N*K) may hold X; the parts never alias it."""
    n, k = raw.shape
    nb = k // QK
    if raw.dtype == np.float16:
        raw = raw.astype(np.float32)
    amax = np.empty((n, nb), dtype=np.uint32)  # [N, NB] bits of the largest |x|
    signed = np.empty((n, nb), dtype=np.uint32)  # [N, NB] bits of the first value that large
    if raw.dtype == np.uint16:
        out = scratch[: raw.size].reshape(n, k) if scratch is not None and scratch.size >= raw.size else np.empty((n, k), np.uint32)
        nbad = _scan(raw, 16, out, amax, signed)
        x = out.view(np.float32)
    else:
        x = np.ascontiguousarray(raw, dtype=np.float32)
        nbad = _scan(x.view(np.uint32), 0, None, amax, signed)
    if qtype == "q4_0":
        d = signed.view(np.float32) / np.float32(-8.0)  # [N, NB]
    else:
        d = amax.view(np.float32) / np.float32(127.0)
    d16 = d.astype("<f2")  # the stored scales
    err = np.empty(n, dtype=np.float32)
    if qtype == "q4_0":
        qs = np.empty((n, k // 2), dtype=np.uint8)
        _pack_q4_0(x, d, d16.astype(np.float32), qs, err)
    else:
        qs = np.empty((n, k), dtype=np.int8)
        _pack_q8_0(x, d, d16.astype(np.float32), qs, err)
    return {"qs": qs, "d": d16}, float(err.max()) if n else 0.0, int(nbad), x

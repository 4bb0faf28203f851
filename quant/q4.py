"""Numpy quantize / dequantize pairs: the reference the numba kernels are tested against.

The rounding rules are GGUF's (llama.cpp ``quantize_row_q4_0_ref`` and friends), so a tensor
quantized here is bit-for-bit what ``gguf.quants.quantize`` produces, after the byte order of
``qs`` (which is the same: low nibble weight j, high nibble weight j+16 of each block of 32).

Shapes: W [N, K] float32 in, parts out; ``NB = K // 32`` blocks per row.
Everything is vectorised over whole row chunks; no Python loop touches a block.
"""
from __future__ import annotations

import numpy as np

from .formats import QK, QUANT_TYPES, base_type, deinterleave_rows, interleave_rows


def _blocks(w: np.ndarray) -> np.ndarray:
    n, k = w.shape
    return w.reshape(n, k // QK, QK)  # [N, NB, G]


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q [N, NB, 32] uint8 in 0..15 -> qs [N, NB*16]: byte j = q[j] | q[j+16] << 4."""
    n, nb, _ = q.shape
    return (q[:, :, :16] | (q[:, :, 16:] << 4)).reshape(n, nb * 16)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """qs [N, NB*16] uint8 -> q [N, NB, 32] uint8 in 0..15."""
    n = qs.shape[0]
    b = qs.reshape(n, -1, 16)
    return np.concatenate([b & 0x0F, b >> 4], axis=2)


def quantize(w: np.ndarray, qtype: str) -> dict[str, np.ndarray]:
    """W [N, K] (any float dtype) -> parts of ``qtype`` (see formats.QuantType.part_shapes)."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim == 1:
        return {name: part[0] for name, part in quantize(w[None, :], qtype).items()}
    if base_type(qtype) != qtype:  # a row-tiled type: the base type's blocks, re-laid
        return interleave_rows(quantize(w, base_type(qtype)), base_type(qtype))
    if qtype == "f32":
        return {"w": np.ascontiguousarray(w, dtype="<f4")}
    if qtype == "f16":
        return {"w": w.astype("<f2")}
    x = _blocks(w)  # [N, NB, G]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if qtype == "q8_0":
            amax = np.abs(x).max(axis=2)  # [N, NB]
            d = amax / 127.0
            inv = np.where(d != 0, 1.0 / d, 0.0).astype(np.float32)
            q = np.round(x * inv[:, :, None]).astype(np.int8)
            return {"qs": q.reshape(w.shape), "d": d.astype("<f2")}
        if qtype == "q4_0":
            # the value of largest magnitude, with its sign, maps to -8
            idx = np.abs(x).argmax(axis=2)
            mx = np.take_along_axis(x, idx[:, :, None], axis=2)[:, :, 0]  # [N, NB]
            d = mx / -8.0
            inv = np.where(d != 0, 1.0 / d, 0.0).astype(np.float32)
            q = np.clip(np.trunc(x * inv[:, :, None] + 8.5), 0, 15).astype(np.uint8)
            return {"qs": _pack_nibbles(q), "d": d.astype("<f2")}
        if qtype == "q4_1":
            lo = x.min(axis=2)
            hi = x.max(axis=2)
            d = (hi - lo) / 15.0
            inv = np.where(d != 0, 1.0 / d, 0.0).astype(np.float32)
            q = np.clip(np.trunc((x - lo[:, :, None]) * inv[:, :, None] + 0.5), 0, 15).astype(np.uint8)
            return {"qs": _pack_nibbles(q), "d": d.astype("<f2"), "m": lo.astype("<f2")}
    raise KeyError(f"unknown quant type {qtype!r}")


def dequantize(parts: dict[str, np.ndarray], qtype: str) -> np.ndarray:
    """Parts of ``qtype`` -> W [N, K] float32 (or [K] for a vector)."""
    first = parts["w"] if "w" in parts else parts["qs"]
    if first.ndim == 1:
        return dequantize({k: v[None] for k, v in parts.items()}, qtype)[0]
    if base_type(qtype) != qtype:
        return dequantize(deinterleave_rows(parts, base_type(qtype)), base_type(qtype))
    if qtype in ("f32", "f16"):
        return np.asarray(parts["w"], dtype=np.float32)
    d = np.asarray(parts["d"], dtype=np.float32)[:, :, None]  # [N, NB, 1]
    if qtype == "q8_0":
        q = np.asarray(parts["qs"], dtype=np.float32)
        n, k = q.shape
        return (q.reshape(n, k // QK, QK) * d).reshape(n, k)
    q = _unpack_nibbles(np.asarray(parts["qs"])).astype(np.float32)  # [N, NB, G]
    n = q.shape[0]
    if qtype == "q4_0":
        return ((q - 8.0) * d).reshape(n, -1)
    if qtype == "q4_1":
        m = np.asarray(parts["m"], dtype=np.float32)[:, :, None]
        return (q * d + m).reshape(n, -1)
    raise KeyError(f"unknown quant type {qtype!r}")


def error_bound(w: np.ndarray, qtype: str) -> np.ndarray:
    """Per-element bound on |dequantize(quantize(w)) - w| for W [N, K]: half a step, plus fp16
    rounding of the scale (relative 2**-11 of the largest value in the block), plus the absolute
    error of a scale or min that goes subnormal in fp16 (below 6.1e-5; flushed to zero below
    2**-25): up to 2**-25 times the largest code."""
    w = np.asarray(w, dtype=np.float32)
    qtype = base_type(qtype)
    if qtype == "f32":
        return np.zeros_like(w)
    if qtype == "f16":
        return np.abs(w) * 2.0**-11 + 6e-8
    x = _blocks(w)
    amax = np.abs(x).max(axis=2, keepdims=True)
    if qtype == "q8_0":
        step = amax / 127.0
    elif qtype == "q4_0":
        step = amax / 8.0 * 2.0  # the far side of the grid ends at +7/8 of amax: up to one step off
    else:
        step = (x.max(axis=2, keepdims=True) - x.min(axis=2, keepdims=True)) / 15.0
    bound = step * 0.5 + amax * 2.0**-10 + 6e-8
    if qtype == "q4_0":
        bound = np.maximum(bound, amax / 8.0 + amax * 2.0**-10)
    bound = bound + {"q8_0": 127, "q4_0": 8, "q4_1": 16}[qtype] * 2.0**-25
    return np.broadcast_to(bound, x.shape).reshape(w.shape)


def nbytes(qtype: str, n: int, k: int) -> int:
    return sum(int(np.prod(s)) * np.dtype(dt).itemsize for s, dt in QUANT_TYPES[qtype].part_shapes(n, k).values())

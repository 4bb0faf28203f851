"""Numpy quantize / dequantize pairs: the reference the numba kernels are tested against.

The rounding rules are GGUF's (llama.cpp ``quantize_row_q4_0_ref`` and friends), so a tensor
quantized here is bit-for-bit what ``gguf.quants.quantize`` produces, after the byte order of
``qs`` (which is the same: low nibble weight j, high nibble weight j+16 of each block of 32).
q4_k is ours (its rule is in ``quant.formats``); its dequantizer equals gguf's Q4_K dequantizer
bit for bit on imported blocks.

Shapes: W [N, K] float32 in, parts out; ``NB = K // 32`` blocks per row.
Everything is vectorised over whole row chunks; no Python loop touches a block.
"""

from __future__ import annotations

import numpy as np

from .formats import K_TYPES, QK, QUANT_TYPES, SUPER, base_type, deinterleave_rows, interleave_rows


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


def _per_block(v: np.ndarray, nb: int) -> np.ndarray:
    """q4_k super-block values [N, NS] -> float32 per block [N, NB] (each repeated 8 times)."""
    return np.repeat(np.asarray(v, dtype=np.float32), SUPER, axis=1)[:, :nb]


def _super_max(v: np.ndarray) -> np.ndarray:
    """[N, NB] >= 0 -> the largest value of each super-block of 8 blocks [N, NS]."""
    n, nb = v.shape
    pad = np.zeros((n, -nb % SUPER), np.float32)
    return np.concatenate([v, pad], axis=1).reshape(n, -1, SUPER).max(axis=2)


def q4_k_scales(d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, ...]:
    """q4_k's two scale levels from the per-block step d_b and offset m_b [N, NB] (f32, >= 0):
    (D, Dm [N, NS] fp16, sc, mn [N, NB] uint8, d', m' [N, NB] f32, the stored block scales).
    A super-scale past fp16 (|w| beyond ~2.6e5) is inf and the dequantized block NaN, which the
    writer reports as a tensor q4_k cannot hold."""
    nb = d.shape[1]
    out = []
    for v in (d, m):
        top = _super_max(v) * np.float32(64.0) / np.float32(255.0)  # [N, NS] f32
        sup = top.astype("<f2")
        sup = np.where(sup > 0, sup, np.float16(0)).astype("<f2")  # -0.0 and NaN -> +0
        sf = _per_block(sup, nb)  # [N, NB]
        code = np.where(sf > 0, np.clip(np.rint(v * np.float32(64.0) / sf), 0, 255), 0).astype(np.uint8)
        out.append((sup, code, sf * code.astype(np.float32) / np.float32(64.0)))
    (sd, sc, dq), (sm, mn, mq) = out
    return sd, sm, sc, mn, dq, mq


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
        if qtype == "q4_k":  # the rule is in quant/formats.py's docstring
            lo = np.minimum(x.min(axis=2), np.float32(0.0))  # [N, NB]
            d = (x.max(axis=2) - lo) / np.float32(15.0)
            sd, sm, sc, mn, dq, mq = q4_k_scales(d, -lo)
            inv_ok = dq[:, :, None] > 0
            q = np.where(inv_ok, np.clip(np.rint((x + mq[:, :, None]) / dq[:, :, None]), 0, 15), 0).astype(np.uint8)
            s = np.stack([sc, mn], axis=2).reshape(sc.shape[0], -1)  # [N, 2*NB]: sc_b, mn_b
            return {"qs": _pack_nibbles(q), "s": s, "d": sd, "m": sm}
    raise KeyError(f"unknown quant type {qtype!r}")


def dequantize(parts: dict[str, np.ndarray], qtype: str) -> np.ndarray:
    """Parts of ``qtype`` -> W [N, K] float32 (or [K] for a vector)."""
    if qtype in K_TYPES:
        return _dequantize_k(parts, qtype)
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
    if qtype == "q4_k":  # (D/64 * sc) * q - (Dm/64 * mn): every product exact in f32, one rounding
        dw, mw = q4_k_block_scales(parts)
        return (q * dw[:, :, None] - mw[:, :, None]).reshape(n, -1)
    raise KeyError(f"unknown quant type {qtype!r}")


def unpack_k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGUF Q4_K / Q5_K's 12 bytes of packed 6-bit codes [..., 12] u1 -> (sc, mn) [..., 8] u1
    (llama.cpp ``get_scale_min_k4``): bytes 0-3 hold sc 0-3 in their low 6 bits, bytes 4-7 mn
    0-3; bytes 8-11 the low 4 bits of sc 4-7 (low nibble) and mn 4-7 (high nibble), whose top 2
    bits sit in the top 2 bits of bytes 0-3 (sc) and 4-7 (mn)."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc, mn


def _dequantize_k(parts: dict[str, np.ndarray], qtype: str) -> np.ndarray:
    """q6_k / q5_k parts (GGUF's super-block fields, quant.formats) -> W [N, K] f32 (or [K]), in
    the same float32 operations as ggml's reference, so bit for bit equal to gguf's."""
    d = np.asarray(parts["d"])
    if d.ndim == 1:
        return _dequantize_k({k: np.asarray(v)[None] for k, v in parts.items()}, qtype)[0]
    n, ns = d.shape
    nsb = n * ns  # super-blocks of 256
    d = d.reshape(nsb, 1).astype(np.float32)
    if qtype == "q6_k":
        scale = (d * np.asarray(parts["sc"]).reshape(nsb, 16).astype(np.float32)).reshape(nsb, 16, 1)
        ql = np.asarray(parts["ql"]).reshape(nsb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        ql = (ql & np.uint8(0x0F)).reshape(nsb, 8, 32)
        qh = np.asarray(parts["qh"]).reshape(nsb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        qh = (qh & np.uint8(0x03)).reshape(nsb, 8, 32)
        q = ((ql | (qh << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(nsb, 16, 16).astype(np.float32)
        return (scale * q).reshape(n, ns * 256)
    if qtype == "q5_k":
        sc, mn = unpack_k_scales(np.asarray(parts["s"]).reshape(nsb, 12))
        scale = (d * sc.astype(np.float32)).reshape(nsb, 8, 1)
        dmin = (np.asarray(parts["m"]).reshape(nsb, 1).astype(np.float32) * mn.astype(np.float32)).reshape(nsb, 8, 1)
        ql = np.asarray(parts["qs"]).reshape(nsb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        ql = (ql & np.uint8(0x0F)).reshape(nsb, 8, 32)
        qh = np.asarray(parts["qh"]).reshape(nsb, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
        qh = (qh & np.uint8(0x01)).reshape(nsb, 8, 32)
        q = (ql | (qh << np.uint8(4))).astype(np.float32)
        return (scale * q - dmin).reshape(n, ns * 256)
    raise KeyError(f"unknown quant type {qtype!r}")


def q4_k_block_scales(parts: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Row-major q4_k parts -> the block scale d_w = D/64 * sc and offset m_w = Dm/64 * mn, both
    [N, NB] f32 and exact (fp16 times a power of two times a byte)."""
    s = np.asarray(parts["s"])
    n, nb = s.shape[0], s.shape[1] // 2
    s = s.reshape(n, nb, 2).astype(np.float32)
    with np.errstate(invalid="ignore"):  # an inf super-scale times a 0 code: NaN, reported by the writer
        dw = _per_block(parts["d"], nb) * np.float32(1 / 64) * s[:, :, 0]
        mw = _per_block(parts["m"], nb) * np.float32(1 / 64) * s[:, :, 1]
    return dw, mw


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
    if qtype == "q4_k":
        return _q4_k_bound(x, amax).reshape(w.shape)
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


def _q4_k_bound(x: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """q4_k's bound for blocks x [N, NB, G]. With ed, em bounding |d' - d_b| and |m' - m_b|
    (half a code step, D / 128 <= max d_b / 510, the fp16 rounding of D, relative 2**-11 and
    absolute 2**-25 when subnormal, and the shortfall of a code clipped at 255): inside the grid
    the error is at most d' / 2 <= d_b / 2 + ed / 2, past either end at most em + 15 ed; plus
    float32 rounding of the arithmetic."""
    nb = x.shape[1]
    lo = np.minimum(x.min(axis=2), 0.0)
    d = (x.max(axis=2) - lo) / 15.0  # [N, NB]
    e = []
    for v in (d, -lo):
        top = _per_block(_super_max(v), nb)
        e.append(top / 510.0 * (1 + 2.0**-11) + top * 2.0**-11 + 2.0**-23)
    ed, em = e
    bound = d / 2 + 16 * ed + em + (amax[:, :, 0] + (-lo)) * 2.0**-18
    return np.broadcast_to(bound[:, :, None], x.shape)


def nbytes(qtype: str, n: int, k: int) -> int:
    return sum(int(np.prod(s)) * np.dtype(dt).itemsize for s, dt in QUANT_TYPES[qtype].part_shapes(n, k).values())

"""Plain numpy twins of ``mixcli.kernels``: same names, same signatures, written for clarity.

They are the reference the numba kernels are tested against and, with MIXCLI_KERNELS=ref, a
whole-model reference. Weights are dequantized with ``quant.q4`` (itself bit-exact with the gguf
package) and multiplied in f32 with x kept in f32, so the twins carry no activation rounding;
``quantize_act`` and ``quantize_act_levels`` are the twins of the int8 activation rounding the
fast kernels apply (``KernelTable.act``), for tests that want to isolate it.

Shapes use the dimension letters: N output rows, K input columns, NB = K / 32 blocks, T tokens,
H / KVH heads, HD head dim, S cache positions, E experts.

Each twin checks the bounds its numba counterpart assumes (row < N, pos0 + T <= S, KVH divides H,
k <= E, matching lengths) and raises ``IndexError``/``ValueError`` where numpy would wrap a negative
index, truncate a slice or broadcast silently: a test that drives a kernel out of range through
its twin fails instead of reading past an array.
"""

from __future__ import annotations

import numpy as np

from quant import q4
from quant.formats import QK

ACT_INT8 = False


def _require(ok: bool, what: str, exc: type[Exception] = ValueError) -> None:
    """Raise (not assert: ``python -O`` must not drop it) when a kernel's bound does not hold."""
    if not ok:
        raise exc(f"kernel argument out of range: {what}")


def _row(n: int, row) -> int:
    row = int(row)
    _require(0 <= row < n, f"row {row} of {n}", IndexError)
    return row


def _w(qtype: str, **parts) -> np.ndarray:
    return q4.dequantize(parts, qtype)  # [N, K] f32


def _mv(w: np.ndarray, x, out) -> None:
    """out [N] = w [N, K] @ x [K], lengths checked."""
    _require(np.shape(x) == (w.shape[1],), f"x {np.shape(x)} for K = {w.shape[1]}")
    _require(np.shape(out) == (w.shape[0],), f"out {np.shape(out)} for N = {w.shape[0]}")
    out[:] = w @ x


def _mm(w: np.ndarray, X, out) -> None:
    """out [T, N] = X [T, K] @ w [N, K].T, shapes checked."""
    _require(np.ndim(X) == 2 and np.shape(X)[1] == w.shape[1], f"X {np.shape(X)} for K = {w.shape[1]}")
    _require(
        np.shape(out) == (np.shape(X)[0], w.shape[0]),
        f"out {np.shape(out)} for [T, N] = [{np.shape(X)[0]}, {w.shape[0]}]",
    )
    out[:] = X @ w.T


# ---- matrix-vector (decode) and matrix-matrix (prefill) ----------------------------------------
def matvec_q4_0(qs, d, x, out):
    _mv(_w("q4_0", qs=qs, d=d), x, out)


def matvec_q4_1(qs, d, m, x, out):
    _mv(_w("q4_1", qs=qs, d=d, m=m), x, out)


def matvec_q8_0(qs, d, x, out):
    _mv(_w("q8_0", qs=qs, d=d), x, out)


def matvec_f16(w, x, out):
    _mv(np.asarray(w, np.float32), x, out)


def matvec_f32(w, x, out):
    _mv(w, x, out)


def matmul_q4_0(qs, d, X, out):
    _mm(_w("q4_0", qs=qs, d=d), X, out)


def matmul_q4_1(qs, d, m, X, out):
    _mm(_w("q4_1", qs=qs, d=d, m=m), X, out)


def matmul_q8_0(qs, d, X, out):
    _mm(_w("q8_0", qs=qs, d=d), X, out)


def matmul_f16(w, X, out):
    _mm(np.asarray(w, np.float32), X, out)


def matmul_f32(w, X, out):
    _mm(w, X, out)


# the f32-activation kernels of the fast module have the same twins
matvec_q4_0_f32act, matvec_q4_1_f32act, matvec_q8_0_f32act = matvec_q4_0, matvec_q4_1, matvec_q8_0
matmul_q4_0_f32act, matmul_q4_1_f32act, matmul_q8_0_f32act = matmul_q4_0, matmul_q4_1, matmul_q8_0


# row-tiled storage (quant.formats.interleave_rows): the same products, weights re-laid by numpy
def matvec_q4_0r16(qs, d, x, out):
    _mv(_w("q4_0r16", qs=qs, d=d), x, out)


def matvec_q4_1r16(qs, d, m, x, out):
    _mv(_w("q4_1r16", qs=qs, d=d, m=m), x, out)


def matvec_q8_0r16(qs, d, x, out):
    _mv(_w("q8_0r16", qs=qs, d=d), x, out)


def matmul_q4_0r16(qs, d, X, out):
    _mm(_w("q4_0r16", qs=qs, d=d), X, out)


def matmul_q4_1r16(qs, d, m, X, out):
    _mm(_w("q4_1r16", qs=qs, d=d, m=m), X, out)


def matmul_q8_0r16(qs, d, X, out):
    _mm(_w("q8_0r16", qs=qs, d=d), X, out)


matvec_q4_0r16_f32act, matvec_q4_1r16_f32act, matvec_q8_0r16_f32act = matvec_q4_0r16, matvec_q4_1r16, matvec_q8_0r16
matmul_q4_0r16_f32act, matmul_q4_1r16_f32act, matmul_q8_0r16_f32act = matmul_q4_0r16, matmul_q4_1r16, matmul_q8_0r16


# q4_k (quant.formats): parts qs, s, d, m, row-major or row-tiled
def matvec_q4_k(qs, s, d, m, x, out):
    _mv(_w("q4_k", qs=qs, s=s, d=d, m=m), x, out)


def matmul_q4_k(qs, s, d, m, X, out):
    _mm(_w("q4_k", qs=qs, s=s, d=d, m=m), X, out)


def matvec_q4_kr16(qs, s, d, m, x, out):
    _mv(_w("q4_kr16", qs=qs, s=s, d=d, m=m), x, out)


def matmul_q4_kr16(qs, s, d, m, X, out):
    _mm(_w("q4_kr16", qs=qs, s=s, d=d, m=m), X, out)


matvec_q4_k_f32act, matmul_q4_k_f32act = matvec_q4_k, matmul_q4_k
matvec_q4_kr16_f32act, matmul_q4_kr16_f32act = matvec_q4_kr16, matmul_q4_kr16


def quantize_act(x, xq, xdx, xsq, xsum):
    """x [T, K] f32 -> xq [T, K] int8 = rint(x / dx), dx = amax / 127 per block of 32 (f32);
    xdx [T, NB] = dx, xsq [T, NB] = dx * sum(xq), xsum [T, NB] = sum(x)."""
    T, K = x.shape
    xb = x.reshape(T, K // QK, QK)  # [T, NB, G]
    dx = (np.abs(xb).max(axis=2) / np.float32(127.0)).astype(np.float32)  # [T, NB]
    with np.errstate(divide="ignore"):
        inv = np.where(dx > 0, np.float32(1.0) / dx, np.float32(0.0)).astype(np.float32)
    q = np.rint(xb * inv[:, :, None]).astype(np.int8)
    xq[:] = q.reshape(T, K)
    xdx[:] = dx
    xsq[:] = dx * q.sum(axis=2, dtype=np.int32).astype(np.float32)
    xsum[:] = xb.sum(axis=2)


def quantize_act_levels(x, levels, xq, xdx, xsq, xsum, xsqt):
    """x [T, K] -> virtual tokens v = t * levels + l: level 0 is ``quantize_act`` of x, level 1
    ``quantize_act`` of the f32 residual x - xdx * xq; xsqt [T, NB] sums xsq over the levels."""
    T, K = x.shape
    NB = K // QK
    r = np.asarray(x, np.float32).copy()
    xsum_all = np.asarray(x, np.float32).reshape(T, NB, QK).sum(axis=2)
    for level in range(levels):
        q, dx, sq, _ = (np.empty((T, K), np.int8),) + tuple(np.empty((T, NB), np.float32) for _ in range(3))
        quantize_act(r, q, dx, sq, _)
        xq[level::levels] = q
        xdx[level::levels] = dx
        xsq[level::levels] = sq
        xsum[level::levels] = xsum_all if level == 0 else 0.0
        r = (r.reshape(T, NB, QK) - dx[:, :, None] * q.reshape(T, NB, QK).astype(np.float32)).reshape(T, K)
    xsqt[:] = xsq.reshape(T, levels, NB).sum(axis=1)


def act_hat(x, levels):
    """x [T, K] as the int8 kernels see it: sum over levels of xq * xdx per block."""
    T, K = x.shape
    NB = K // QK
    xq = np.empty((T * levels, K), np.int8)
    xdx, xsq, xsum = (np.empty((T * levels, NB), np.float32) for _ in range(3))
    quantize_act_levels(x, levels, xq, xdx, xsq, xsum, np.empty((T, NB), np.float32))
    hat = xq.reshape(T * levels, NB, QK).astype(np.float32) * xdx[:, :, None]
    return hat.reshape(T, levels, K).sum(axis=1)


# ---- embedding rows -----------------------------------------------------------------------------
def dequant_row_q4_0(qs, d, row, out):
    row = _row(len(qs), row)
    out[:] = q4.dequantize({"qs": qs[row], "d": d[row]}, "q4_0")


def dequant_row_q4_1(qs, d, m, row, out):
    row = _row(len(qs), row)
    out[:] = q4.dequantize({"qs": qs[row], "d": d[row], "m": m[row]}, "q4_1")


def dequant_row_q8_0(qs, d, row, out):
    row = _row(len(qs), row)
    out[:] = q4.dequantize({"qs": qs[row], "d": d[row]}, "q8_0")


def _tile_row(qtype: str, row: int, **parts) -> np.ndarray:
    g, i = divmod(_row(16 * len(next(iter(parts.values()))), row), 16)  # the row's tile, its place in it
    return _w(qtype, **{k: v[g : g + 1] for k, v in parts.items()})[i]


def dequant_row_q4_0r16(qs, d, row, out):
    out[:] = _tile_row("q4_0r16", row, qs=qs, d=d)


def dequant_row_q4_1r16(qs, d, m, row, out):
    out[:] = _tile_row("q4_1r16", row, qs=qs, d=d, m=m)


def dequant_row_q8_0r16(qs, d, row, out):
    out[:] = _tile_row("q8_0r16", row, qs=qs, d=d)


def dequant_row_q4_k(qs, s, d, m, row, out):
    row = _row(len(qs), row)
    out[:] = q4.dequantize({"qs": qs[row], "s": s[row], "d": d[row], "m": m[row]}, "q4_k")


def dequant_row_q4_kr16(qs, s, d, m, row, out):
    out[:] = _tile_row("q4_kr16", row, qs=qs, s=s, d=d, m=m)


def dequant_row_f16(w, row, out):
    out[:] = w[_row(len(w), row)]


def dequant_row_f32(w, row, out):
    out[:] = w[_row(len(w), row)]


# ---- the rest of the layer ----------------------------------------------------------------------
def rmsnorm(x, w, eps, out):
    """x [T, D] -> x * rsqrt(mean(x^2) + eps) * w, in f32 (HF's LlamaRMSNorm order)."""
    _require(np.shape(w) == (np.shape(x)[-1],), f"norm weight {np.shape(w)} for D = {np.shape(x)[-1]}")
    _require(np.shape(out) == np.shape(x), f"out {np.shape(out)} for x {np.shape(x)}")
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    out[:] = (x / np.sqrt(var + np.float32(eps))) * w


def rope_inplace(x, pos, inv_freq):
    """x [T, NH, HD] rotated in place; HF's rotate_half pairing (i with i + HD/2)."""
    _require(x.ndim == 3 and x.shape[2] % 2 == 0, f"x {x.shape}: HD must be even")
    _require(np.shape(inv_freq) == (x.shape[2] // 2,), f"inv_freq {np.shape(inv_freq)} for HD/2 = {x.shape[2] // 2}")
    _require(np.shape(pos) == (x.shape[0],), f"pos {np.shape(pos)} for T = {x.shape[0]}")
    ang = pos.astype(np.float32)[:, None] * inv_freq[None, :]  # [T, HD/2] f32
    cos = np.cos(ang)[:, None, :]
    sin = np.sin(ang)[:, None, :]
    half = x.shape[2] // 2
    x0 = x[:, :, :half].copy()
    x1 = x[:, :, half:].copy()
    x[:, :, :half] = x0 * cos - x1 * sin
    x[:, :, half:] = x1 * cos + x0 * sin


def attention(q, k_cache, v_cache, pos0, scale, out, scratch):
    """Causal GQA attention; q [T, H, HD], caches [KVH, S, HD] float16, out [T, H, HD]."""
    T, H, HD = q.shape
    KVH, S, _ = k_cache.shape
    _require(
        v_cache.shape == k_cache.shape and k_cache.shape[2] == HD,
        f"caches {k_cache.shape} / {v_cache.shape} for HD = {HD}",
    )
    _require(KVH > 0 and H % KVH == 0, f"{KVH} KV heads do not divide {H} heads")
    _require(0 <= pos0 and pos0 + T <= S, f"positions {pos0}..{pos0 + T} past the cache's {S}", IndexError)
    _require(np.shape(out) == q.shape, f"out {np.shape(out)} for q {q.shape}")
    grp = H // KVH
    n = pos0 + T
    k = np.asarray(k_cache[:, :n], np.float32)  # [KVH, n, HD]
    v = np.asarray(v_cache[:, :n], np.float32)
    for h in range(H):
        s = (q[:, h] @ k[h // grp].T) * np.float32(scale)  # [T, n]
        s[np.arange(n)[None, :] > (pos0 + np.arange(T))[:, None]] = -np.inf
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ v[h // grp]


def attention_slots(q, k_caches, v_caches, n_keys, scale, out, scratch):
    """One decode token per slot, q [B, H, HD], slot b over its own caches [KVH, S, HD] float16
    with n_keys[b] keys; out [B, H, HD]."""
    _require(len(k_caches) == len(v_caches) == len(n_keys) == q.shape[0], "one cache pair and key count per query")
    for b in range(q.shape[0]):
        _require(1 <= n_keys[b], f"slot {b}: {n_keys[b]} keys", IndexError)
        attention(q[b : b + 1], k_caches[b], v_caches[b], int(n_keys[b]) - 1, scale, out[b : b + 1], None)


def store_attend_slots(q, k_new, v_new, k_all, v_all, n_keys, layer, scale, out):
    """The twin of ``attn.slot_caches`` + ``attn.store_attend_slots``: slot b's new key and value
    k_new[b], v_new[b] [KVH, HD] go into its caches k_all[b], v_all[b] [L, KVH, S, HD] float16 at
    (layer, position n_keys[b] - 1), then ``attention_slots`` over that layer."""
    for b in range(q.shape[0]):
        _require(1 <= n_keys[b] <= k_all[b].shape[2], f"slot {b}: {n_keys[b]} keys", IndexError)
        k_all[b][layer, :, n_keys[b] - 1] = k_new[b].astype(np.float16)
        v_all[b][layer, :, n_keys[b] - 1] = v_new[b].astype(np.float16)
    attention_slots(q, [k[layer] for k in k_all], [v[layer] for v in v_all], n_keys, scale, out, None)


def silu_mul(a, b, out):
    _require(
        np.shape(a) == np.shape(b) == np.shape(out), f"silu_mul shapes {np.shape(a)}, {np.shape(b)}, {np.shape(out)}"
    )
    out[...] = a / (np.float32(1.0) + np.exp(-a)) * b


def route_topk(logits, k, weights_out, idx_out):
    """Softmax over E in f32, the k largest (lower expert first among equals), renormalised."""
    _require(0 < k <= logits.shape[1], f"top-{k} of {logits.shape[1]} experts")
    _require(
        np.shape(idx_out) == (logits.shape[0], k) == np.shape(weights_out),
        f"outputs {np.shape(idx_out)} / {np.shape(weights_out)} for [T, k] = [{logits.shape[0]}, {k}]",
    )
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)  # [T, E]
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]  # [T, K]
    w = np.take_along_axis(p, idx, axis=1)
    idx_out[:] = idx
    weights_out[:] = w / w.sum(axis=1, keepdims=True)


def add_scaled(out, x, w):
    _require(np.shape(out) == np.shape(x), f"add_scaled shapes {np.shape(out)}, {np.shape(x)}")
    out += np.float32(w) * x


# ---- GGUF's K-quants (quant.formats q6_k, q5_k; kernels in kquants.py) -------------------------
def matvec_q6_k(ql, qh, sc, d, x, out):
    out[:] = _w("q6_k", ql=ql, qh=qh, sc=sc, d=d) @ x


def matmul_q6_k(ql, qh, sc, d, X, out):
    out[:] = X @ _w("q6_k", ql=ql, qh=qh, sc=sc, d=d).T


def dequant_row_q6_k(ql, qh, sc, d, row, out):
    out[:] = q4.dequantize({"ql": ql[row], "qh": qh[row], "sc": sc[row], "d": d[row]}, "q6_k")


def matvec_q5_k(qs, qh, s, d, m, x, out):
    out[:] = _w("q5_k", qs=qs, qh=qh, s=s, d=d, m=m) @ x


def matmul_q5_k(qs, qh, s, d, m, X, out):
    out[:] = X @ _w("q5_k", qs=qs, qh=qh, s=s, d=d, m=m).T


def dequant_row_q5_k(qs, qh, s, d, m, row, out):
    out[:] = q4.dequantize({"qs": qs[row], "qh": qh[row], "s": s[row], "d": d[row], "m": m[row]}, "q5_k")


# ---- attention over a q8_0 KV cache and the tiled prefill (mixcli.kv_cache) -------------------------
def _dequant_kv_q8_0(qs, d):
    """qs [KVH, S, HD] int8, d [KVH, S, HD/32] float16 -> [KVH, S, HD] f32 (llama.cpp's Q8_0)."""
    KVH, S, HD = qs.shape
    x = np.asarray(qs, np.float32).reshape(KVH, S, HD // QK, QK) * np.asarray(d, np.float32)[..., None]
    return x.reshape(KVH, S, HD)


def attention_q8_0(q, k_qs, k_d, v_qs, v_d, pos0, scale, out, scratch):
    attention(q, _dequant_kv_q8_0(k_qs, k_d), _dequant_kv_q8_0(v_qs, v_d), pos0, scale, out, scratch)


def attention_prefill(q, k_cache, v_cache, pos0, scale, out):
    attention(q, k_cache, v_cache, pos0, scale, out, None)


def attention_prefill_q8_0(q, k_qs, k_d, v_qs, v_d, pos0, scale, out):
    attention_q8_0(q, k_qs, k_d, v_qs, v_d, pos0, scale, out, None)

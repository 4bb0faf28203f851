"""The rest of the layer: float matrices (router, f16/f32 weights), norms, RoPE, SiLU, top-k.

These are plain numba loops that LLVM vectorizes for the host, the same in every instruction-set
tier. A decode step's small ops (one row of D values, a router's 8 rows) run on the calling thread:
a parallel region costs ~10 us to open and close on 2 threads, several times the op itself, and far
more when another process holds a core, since the region waits for every thread.

Shapes: N rows, K columns, T tokens, D hidden, NH heads, HD head dim, E experts, F FFN width.
"""

from __future__ import annotations

import numpy as np
from numba import get_thread_id, njit, prange

from .act import rowbuf
from .irgen import _JIT, _PJIT, _dot, _u16, h2f, i2f

SERIAL_MAX = 1 << 16  # values below which rmsnorm, rope and the f32 matvec run serially


@njit(**_JIT)
def _dot_h(w, x):
    s = np.float32(0.0)
    for k in range(x.shape[0]):
        s += h2f(w[k]) * x[k]
    return s


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


def matvec_f16(w, x, out):
    """w [N, K] float16, x [K] f32 -> out [N] f32."""
    _mv_f16(_u16(w), x, out)


def matvec_f32(w, x, out):
    """w [N, K] f32, x [K] f32 -> out [N] f32."""
    (_mv_f32_seq if w.size < SERIAL_MAX else _mv_f32)(w, x, out)


def matmul_f16(w, X, out):
    """w [N, K] float16, X [T, K] f32 -> out [T, N] f32."""
    _mm_f16(_u16(w), X, rowbuf(X.shape[1]), out)


def matmul_f32(w, X, out):
    """w [N, K] f32, X [T, K] f32 -> out [T, N] f32."""
    _mm_f32(w, X, out)


# ---------------------------------------------------------------------------------------------
# norms, rope, activation, routing (small ops run serially below SERIAL_MAX values)


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
    numba's division checks in the callers. Used by silu_mul and by attn's softmax."""
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

"""The numpy twins refuse the arguments that would drive their numba kernels out of range.

numpy itself would wrap a negative row, truncate a slice past the KV cache's end, take fewer than
k experts or broadcast a wrong-length norm weight without a word; the twins raise instead, so a
kernel test that feeds a bad shape fails loudly rather than agreeing with a wrong reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from mixcli.kernels import ref
from quant import q4

rng = np.random.default_rng(7)
N, K, T = 32, 64, 3


@pytest.fixture(scope="module")
def parts():
    return {qt: q4.quantize(rng.standard_normal((N, K)).astype(np.float32), qt) for qt in ("q4_0", "q4_1", "q4_0r16")}


def test_in_range_calls_pass(parts):
    p = parts["q4_0"]
    out = np.empty(N, np.float32)
    ref.matvec_q4_0(p["qs"], p["d"], np.ones(K, np.float32), out)
    assert np.allclose(out, q4.dequantize(p, "q4_0").sum(axis=1), atol=1e-4)
    row = np.empty(K, np.float32)
    ref.dequant_row_q4_0(p["qs"], p["d"], N - 1, row)
    assert np.array_equal(row, q4.dequantize(p, "q4_0")[N - 1])


@pytest.mark.parametrize("row", [-1, N, N + 100])
def test_dequant_row_outside_the_matrix(parts, row):
    out = np.empty(K, np.float32)
    p = parts["q4_1"]
    with pytest.raises(IndexError, match=f"row {row} of {N}"):
        ref.dequant_row_q4_1(p["qs"], p["d"], p["m"], row, out)
    t = parts["q4_0r16"]
    with pytest.raises(IndexError, match=f"row {row} of {N}"):
        ref.dequant_row_q4_0r16(t["qs"], t["d"], row, out)
    with pytest.raises(IndexError):
        ref.dequant_row_f32(np.zeros((N, K), np.float32), row, out)


def test_matvec_and_matmul_lengths(parts):
    p = parts["q4_0"]
    with pytest.raises(ValueError, match="x"):
        ref.matvec_q4_0(p["qs"], p["d"], np.ones(K - 32, np.float32), np.empty(N, np.float32))
    with pytest.raises(ValueError, match="out"):
        ref.matvec_q4_0(p["qs"], p["d"], np.ones(K, np.float32), np.empty(N + 1, np.float32))
    with pytest.raises(ValueError, match="X"):
        ref.matmul_f32(np.zeros((N, K), np.float32), np.ones((T, K + 1), np.float32), np.empty((T, N), np.float32))
    with pytest.raises(ValueError, match="out"):
        ref.matmul_q4_0(p["qs"], p["d"], np.ones((T, K), np.float32), np.empty((T + 1, N), np.float32))


def _attn_args(H=4, KVH=2, S=8, HD=16):
    q = rng.standard_normal((T, H, HD)).astype(np.float32)
    kc = rng.standard_normal((KVH, S, HD)).astype(np.float16)
    return q, kc, kc.copy(), np.empty_like(q)


def test_attention_bounds():
    q, kc, vc, out = _attn_args()
    ref.attention(q, kc, vc, 5, 0.25, out, None)  # positions 5..7 of 8: fits
    assert np.isfinite(out).all()
    with pytest.raises(IndexError, match="past the cache"):
        ref.attention(q, kc, vc, 6, 0.25, out, None)  # numpy would silently attend to 8 of 9
    q3, kc3, vc3, out3 = _attn_args(H=4, KVH=3)
    with pytest.raises(ValueError, match="do not divide"):
        ref.attention(q3, kc3, vc3, 0, 0.25, out3, None)


def test_rope_norm_topk_elementwise():
    x = rng.standard_normal((T, 2, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="inv_freq"):
        ref.rope_inplace(x, np.arange(T), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="norm weight"):
        ref.rmsnorm(np.ones((T, 8), np.float32), np.ones(1, np.float32), 1e-5, np.empty((T, 8), np.float32))
    logits = rng.standard_normal((T, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="top-5 of 4"):
        ref.route_topk(logits, 5, np.empty((T, 5), np.float32), np.empty((T, 5), np.int64))
    w, i = np.empty((T, 2), np.float32), np.empty((T, 2), np.int64)
    ref.route_topk(logits, 2, w, i)
    assert np.allclose(w.sum(axis=1), 1) and (i[:, 0] == logits.argmax(axis=1)).all()
    with pytest.raises(ValueError, match="silu_mul"):
        ref.silu_mul(np.ones(4, np.float32), np.ones(5, np.float32), np.empty(4, np.float32))
    with pytest.raises(ValueError, match="add_scaled"):
        ref.add_scaled(np.ones(4, np.float32), np.ones(3, np.float32), 0.5)

"""Every numba kernel against its numpy twin (mixcli.kernels.ref) on odd shapes, and the twins'
own semantics against independent references: torch for routing, direct transcriptions of
Hugging Face's rotate_half RoPE and of causal softmax attention with GQA.

The fast quantized kernels round activations to int8 blocks (two levels by default, one as
llama.cpp does) and exist once per instruction-set tier. Every tier this host can execute is
checked (``kernels.host_tiers()``: an AVX-512 host also runs the AVX-VNNI, AVX2 and generic
kernels): the best tier in both int8 modes, the lower ones in the default mode, plus the f32
mode. Each is checked two ways: against the twin fed the same int8 activations (tight, float
rounding only) and against the exact f32 product within the rigorous bound that rounding implies.
GGUF's K-quants (q6_k, q5_k: one plain-numba kernel set in every tier's table) are checked the
same way, on random GGUF super-blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixcli import kernels
from mixcli.kernels import act, ops
from mixcli.kernels import ref as R
from quant import q4
from quant.formats import QUANT_TYPES
from quant.sources.gguf import split_blocks
from test_kquant_import import random_k_blocks

RTOL = 1e-4
QTYPES = ("q4_0", "q4_1", "q8_0", "q4_k")
TILED = ("q4_0r16", "q4_1r16", "q8_0r16", "q4_kr16")  # row-tiled storage (quant.formats.interleave_rows)
KTYPES = ("q6_k", "q5_k")  # GGUF's K-quants: random GGUF super-blocks (every code pattern), K a multiple of 256
F32_ONLY = ("q4_k",)  # kernels that keep x in f32 in every activation mode (row-major q4_k)


def _close(got, want, rtol=RTOL):
    """Max error within rtol of the largest reference magnitude (fastmath reorders sums)."""
    scale = max(float(np.abs(want).max()), 1e-30)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


def _matrix(qtype, n, k, seed):
    rng = np.random.default_rng(seed)
    if qtype in KTYPES:  # nothing quantizes floats into them: GGUF's bytes, split as the importer does
        parts = split_blocks(random_k_blocks(rng, qtype.upper(), n, k), qtype.upper(), k)
        return [parts[p] for p in QUANT_TYPES[qtype].parts]
    w = rng.standard_normal((n, k)).astype(np.float32)
    parts = q4.quantize(w, qtype)
    return [parts[p] for p in QUANT_TYPES[qtype].parts]  # the kernels' argument order


def _dense(qtype, args):
    return q4.dequantize(dict(zip(QUANT_TYPES[qtype].parts, args)), qtype)  # [N, K] f32


def _act_bound(w, X, levels):
    """|W x - W x_hat| <= sum_k |w_k| |x_k - x_hat_k|, per [T, N]."""
    return np.abs(X - R.act_hat(X, levels)) @ np.abs(w).T


QSHAPES = [(1, 32), (5, 96), (13, 160), (9, 4096)]
TSHAPES = [(16, 32), (32, 96), (48, 160), (16, 4096)]  # tiled: N a multiple of 16
# q4_k also at K = 576 (18 blocks: two super-blocks of 8 and a partial one of 2; K = 96 and 160
# are one partial super-block)
QCASES = (
    [(q, n, k) for q in QTYPES for n, k in QSHAPES]
    + [(q, n, k) for q in TILED for n, k in TSHAPES]
    + [("q4_k", 5, 576), ("q4_kr16", 32, 576)]
    + [(q, n, k) for q in KTYPES for n, k in [(1, 256), (5, 512), (19, 768)]]
)


TIERS = kernels.host_tiers()  # best first, always ending with "generic"
TABLES = [(TIERS[0], "int8"), (TIERS[0], "int8x2")] + [(t, "int8x2") for t in TIERS[1:]] + [(TIERS[0], "f32")]
K = kernels.select(TIERS[0])  # the table a model gets here by default, for the non-quantized kernels
F32 = kernels.select(TIERS[0], "f32")  # x kept in f32 (f32.* for the block types, kquants for K-quants)


def test_every_tier_the_host_runs_is_covered():
    assert TIERS[-1] == "generic" and set(TIERS) <= set(kernels.TIERS)
    assert {t for t, _ in TABLES} == set(TIERS)
    assert kernels.select().isa == TIERS[0]  # the best tier is the default


@pytest.fixture(params=TABLES, ids=lambda p: "-".join(p))
def table(request):
    return kernels.select(*request.param)


@pytest.mark.parametrize("qtype,n,k", QCASES)
@pytest.mark.parametrize("t", [1, 3, 6, 21])
def test_quantized_matmul_and_matvec(qtype, n, k, t, table):
    args = _matrix(qtype, n, k, seed=n * 1000 + k)
    X = np.random.default_rng(t).standard_normal((t, k)).astype(np.float32)
    w = _dense(qtype, args)
    want = np.empty((t, n), np.float32)
    getattr(R, f"matmul_{qtype}")(*args, X, want)
    np.testing.assert_allclose(want, X @ w.T, rtol=1e-5, atol=1e-5 * np.abs(want).max())

    got = np.full((t, n), np.nan, np.float32)
    getattr(table, f"matmul_{qtype}")(*args, X, got)
    one = np.full(n, np.nan, np.float32)
    getattr(table, f"matvec_{qtype}")(*args, X[-1], one)
    if table.levels and qtype not in F32_ONLY:
        hat = R.act_hat(X, table.levels) @ w.T  # the same int8 activations, exact product
        _close(got, hat)
        _close(one, hat[-1])
        assert np.all(np.abs(got - want) <= _act_bound(w, X, table.levels) * 1.001 + 1e-4 * np.abs(want).max())
    else:
        _close(got, want)
        _close(one, want[-1])
    # decode and prefill agree: an incremental run equals a full forward
    _close(one, got[-1], rtol=2e-5)

    exact = np.full((t, n), np.nan, np.float32)
    getattr(F32, f"matmul_{qtype}")(*args, X, exact)
    _close(exact, want)
    getattr(F32, f"matvec_{qtype}")(*args, X[0], one)
    _close(one, want[0])


@pytest.mark.parametrize("qtype", ["f16", "f32"])
@pytest.mark.parametrize("n,k", [(1, 37), (5, 32), (13, 97), (7, 160)])
def test_float_matmul_and_matvec(qtype, n, k):
    args = _matrix(qtype, n, k, seed=n + k)
    X = np.random.default_rng(k).standard_normal((3, k)).astype(np.float32)
    want = np.empty((3, n), np.float32)
    getattr(R, f"matmul_{qtype}")(*args, X, want)
    got = np.empty((3, n), np.float32)
    getattr(K, f"matmul_{qtype}")(*args, X, got)
    _close(got, want)
    one = np.empty(n, np.float32)
    getattr(K, f"matvec_{qtype}")(*args, X[1], one)
    _close(one, want[1])


@pytest.mark.parametrize("levels", [1, 2])
def test_quantize_act_levels_matches_twin(levels):
    X = np.random.default_rng(levels).standard_normal((3, 96)).astype(np.float32) * 5
    X[1, :32] = 0.0  # an all-zero block
    X[2, 40] = 300.0  # an outlier that coarsens its block's first level
    bufs = [
        (np.empty((3 * levels, 96), np.int8),)
        + tuple(np.empty((3 * levels, 3), np.float32) for _ in range(3))
        + (np.empty((3, 3), np.float32),)
        for _ in range(2)
    ]
    act.quantize_act_levels(X, levels, *bufs[0])
    R.quantize_act_levels(X, levels, *bufs[1])
    np.testing.assert_array_equal(bufs[0][0], bufs[1][0])
    for a, b in zip(bufs[0][1:], bufs[1][1:]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # the rounding bound each level count promises: amax/254 for one level, amax/254^2 for two
    amax = np.abs(X.reshape(3, 3, 32)).max(axis=2, keepdims=True)
    err = np.abs((X - R.act_hat(X, levels)).reshape(3, 3, 32))
    assert np.all(err <= amax / 254.0**levels * 1.01 + 1e-6)


@pytest.mark.parametrize("qtype", QTYPES + TILED + KTYPES + ("f16", "f32"))
def test_dequant_row(qtype):
    k = 96 if qtype in QTYPES + TILED else 512 if qtype in KTYPES else 37
    n = 32 if qtype in TILED else 5
    args = _matrix(qtype, n, k, seed=7)
    dense = _dense(qtype, args)
    for row in (0, 4, 17 % n, n - 1):
        got = np.empty(k, np.float32)
        getattr(K, f"dequant_row_{qtype}")(*args, row, got)
        want = np.empty(k, np.float32)
        getattr(R, f"dequant_row_{qtype}")(*args, row, want)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, dense[row])


@pytest.mark.parametrize("T,D", [(1, 37), (3, 37), (40, 2048)])  # the last runs in parallel (>= SERIAL_MAX)
def test_rmsnorm_matches_torch_formula(T, D):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, D)).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    got, ref = np.empty_like(x), np.empty_like(x)
    K.rmsnorm(x, w, 1e-5, got)
    R.rmsnorm(x, w, 1e-5, ref)
    tx = torch.from_numpy(x)  # LlamaRMSNorm.forward, transcribed
    want = (torch.from_numpy(w) * (tx * torch.rsqrt(tx.pow(2).mean(-1, keepdim=True) + 1e-5))).numpy()
    _close(got, want, 1e-6)
    _close(ref, want, 1e-6)


@pytest.mark.parametrize("rows,cols", [(8, 64), (300, 512)])  # a router (serial) and a matrix past SERIAL_MAX
def test_matvec_f32_matches_numpy(rows, cols):
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal(cols).astype(np.float32)
    assert (w.size < ops.SERIAL_MAX) == (rows == 8)
    got = np.empty(rows, np.float32)
    K.matvec_f32(w, x, got)
    _close(got, (w.astype(np.float64) @ x.astype(np.float64)).astype(np.float32), 1e-5)


def _hf_rope(x, pos, inv_freq):
    """transformers' rotary embedding + apply_rotary_pos_emb (rotate_half), in torch f32."""
    t = torch.from_numpy(x).transpose(0, 1)  # [NH, T, HD]
    freqs = (torch.from_numpy(inv_freq)[:, None].float() @ torch.from_numpy(pos)[None, :].float()).T  # [T, HD/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    half = t.shape[-1] // 2
    rot = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
    return (t * cos + rot * sin).transpose(0, 1).numpy()


@pytest.mark.parametrize("T,pos0,NH", [(1, 0, 3), (1, 57, 3), (3, 1000, 3), (300, 5, 16)])  # the last in parallel
def test_rope(T, pos0, NH):
    rng = np.random.default_rng(T + pos0)
    HD = 16
    x = rng.standard_normal((T, NH, HD)).astype(np.float32)
    pos = np.arange(pos0, pos0 + T, dtype=np.int64)
    inv_freq = (1.0 / (10000.0 ** (np.arange(0, HD, 2, dtype=np.int64).astype(np.float32) / HD))).astype(np.float32)
    want = _hf_rope(x, pos, inv_freq)
    got = x.copy()
    K.rope_inplace(got, pos, inv_freq)
    ref = x.copy()
    R.rope_inplace(ref, pos, inv_freq)
    _close(got, want, 2e-5)  # cos/sin of large f32 angles differ in the last bits between libms
    _close(ref, want, 2e-5)


def _naive_attention(q, kc, vc, pos0, scale):
    T, H, HD = q.shape
    KVH = kc.shape[0]
    out = np.zeros((T, H, HD), np.float64)
    for t in range(T):
        for h in range(H):
            kv = h // (H // KVH)
            keys = kc[kv, : pos0 + t + 1].astype(np.float64)
            s = keys @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ vc[kv, : pos0 + t + 1].astype(np.float64)
    return out


@pytest.mark.parametrize("T,pos0,scratch_rows", [(1, 9, "H"), (5, 0, "TH"), (4, 6, "TH"), (4, 6, "H")])
def test_attention(T, pos0, scratch_rows):
    rng = np.random.default_rng(T * 10 + pos0)
    H, KVH, HD, S = 6, 2, 8, 16
    q = rng.standard_normal((T, H, HD)).astype(np.float32)
    kc = np.zeros((KVH, S, HD), np.float16)
    vc = np.zeros((KVH, S, HD), np.float16)
    kc[:, : pos0 + T] = rng.standard_normal((KVH, pos0 + T, HD))
    vc[:, : pos0 + T] = rng.standard_normal((KVH, pos0 + T, HD))
    scale = HD**-0.5
    want = _naive_attention(q, kc, vc, pos0, scale)
    scratch = np.empty((T * H if scratch_rows == "TH" else H, S), np.float32)
    got = np.empty((T, H, HD), np.float32)
    K.attention(q, kc, vc, pos0, scale, got, scratch)
    ref = np.empty_like(got)
    R.attention(q, kc, vc, pos0, scale, ref, None)
    _close(got, want, 1e-5)
    _close(ref, want, 1e-5)


def test_silu_mul_and_add_scaled():
    rng = np.random.default_rng(3)
    for shape in [(37,), (3, 37)]:
        a, b = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
        a0 = a.copy()
        want = (torch.nn.functional.silu(torch.from_numpy(a)) * torch.from_numpy(b)).numpy()
        got = np.empty_like(a)
        K.silu_mul(a, b, got)
        _close(got, want, 1e-6)
        K.silu_mul(a, b, a)  # in place, as the model calls it
        _close(a, want, 1e-6)
        ref = np.empty_like(b)
        R.silu_mul(a0, b, ref)
        _close(ref, want, 1e-6)
        out = rng.standard_normal(shape).astype(np.float32)
        out2 = out.copy()
        K.add_scaled(out, b, 0.3)
        R.add_scaled(out2, b, 0.3)
        _close(out, out2, 1e-6)


def test_silu_mul_written_out_exp_matches_torch_everywhere():
    """silu's exp is our own polynomial (so the loop vectorizes): against torch over [-100, 100]
    (both clamps, the tiny-output tail, exact zeros), relative error within 1e-6, never NaN; and
    the in-place path (the model's call) gives exactly the out-of-place result."""
    x = np.concatenate([np.linspace(-100, 100, 100_001), [0.0, -0.0, 1e-30, -1e-30, 87.5, -88.5]]).astype(np.float32)
    b = np.random.default_rng(4).standard_normal(x.size).astype(np.float32)
    got = np.empty_like(x)
    K.silu_mul(x, b, got)
    want = (torch.nn.functional.silu(torch.from_numpy(x)) * torch.from_numpy(b)).numpy()
    assert not np.isnan(got).any()
    big = np.abs(want) > 1e-30
    assert np.all(np.abs(got - want)[big] <= 1e-6 * np.abs(want[big]))
    assert np.all(np.abs(got[~big]) <= 1e-30)
    inplace = x.copy()
    K.silu_mul(inplace, b, inplace)
    np.testing.assert_array_equal(inplace, got)


def _torch_route(logits, k):
    p = torch.softmax(torch.from_numpy(logits), dim=-1, dtype=torch.float32)
    w, idx = torch.topk(p, k, dim=-1)
    return (w / w.sum(-1, keepdim=True)).numpy(), idx.numpy()


@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (5, 8, 2), (4, 3, 1), (3, 16, 4)])
def test_route_topk_matches_torch(T, E, k):
    logits = np.random.default_rng(E * k + T).standard_normal((T, E)).astype(np.float32)
    want_w, want_i = _torch_route(logits, k)
    for mod in (K, R):
        w, i = np.empty((T, k), np.float32), np.empty((T, k), np.int32)
        mod.route_topk(logits, k, w, i)
        np.testing.assert_array_equal(i, want_i)
        _close(w, want_w, 1e-6)


def test_route_topk_ties():
    """torch.topk's order among equal values is unspecified on CPU (it partitions with
    nth_element); ours is lower expert first. Same weights either way."""
    logits = np.array([[1.0, 3.0, 3.0, 2.0, 3.0, 0.5], [0.0] * 6], np.float32)
    want_w, _ = _torch_route(logits, 2)
    for mod in (K, R):
        w, i = np.empty((2, 2), np.float32), np.empty((2, 2), np.int32)
        mod.route_topk(logits, 2, w, i)
        np.testing.assert_array_equal(i, [[1, 2], [0, 1]])
        _close(w, want_w, 1e-6)

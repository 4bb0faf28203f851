"""The KV cache (``mixcli.kv_cache``) and the attention kernels that read it: q8_0 blocks against
gguf's own Q8_0 quantizer, the q8_0 and tiled prefill kernels against their numpy twins (and the
twins against torch's SDPA in float64), and a model's logits with a q8_0 cache against the same
model with the fp16 cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from babymodels import make_hf_checkpoint
from mixcli.errors import UsageError
from mixcli.kernels import attn as A
from mixcli.kernels import ref as R
from mixcli.kv_cache import KVCache, kv_cache_bytes
from mixcli.model import Model
from mixcli.store import open_model_dir
from quant.convert import convert_checkpoint

RTOL = 2e-5  # kernel vs twin: fastmath and the tiles' order of summation, relative to max |out|


def _close(got, want, rtol=RTOL):
    scale = max(float(np.abs(want).max()), 1e-30)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


def _torch(q, k, v, pos0, scale):
    """torch SDPA in float64 over f32 caches k, v [KVH, >= n, HD] (kv heads repeated to H)."""
    T, H, _ = q.shape
    n = pos0 + T
    grp = H // k.shape[0]
    kt = torch.from_numpy(k[:, :n].astype(np.float64)).repeat_interleave(grp, dim=0)[None]
    vt = torch.from_numpy(v[:, :n].astype(np.float64)).repeat_interleave(grp, dim=0)[None]
    qt = torch.from_numpy(q.astype(np.float64)).transpose(0, 1)[None]
    mask = torch.arange(n)[None, :] <= (pos0 + torch.arange(T))[:, None]
    o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return o[0].transpose(0, 1).numpy()


def _filled(KVH, HD, T, pos0, kv_type, seed, spare=5):
    """A one-layer cache with positions 0..pos0+T-1 stored from random rows; q [T, H, HD]."""
    rng = np.random.default_rng(seed)
    n = pos0 + T
    cache = KVCache(1, KVH, HD, n + spare, kv_type)
    k = rng.standard_normal((n, KVH, HD)).astype(np.float32)
    v = rng.standard_normal((n, KVH, HD)).astype(np.float32)
    cache.store(0, 0, k, v)
    return cache


def test_q8_0_rows_are_ggufs_blocks():
    import gguf

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 3, 64)) * rng.uniform(0.01, 30, (5, 3, 1))).astype(np.float32)  # [T, KVH, HD]
    x[1, 2, :32] = 0.0  # an all-zero block: scale 0
    c = KVCache(2, 3, 64, 9, "q8_0")
    c.store(1, 4, x, -x)
    blocks = gguf.quants.quantize(x.reshape(-1, 64), gguf.GGMLQuantizationType.Q8_0).reshape(15, 2, 34)
    want_d = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].reshape(5, 3, 2)  # [T, KVH, NB]
    want_qs = blocks[:, :, 2:].copy().view(np.int8).reshape(5, 3, 64)
    np.testing.assert_array_equal(c.k[1, :, 4:9].transpose(1, 0, 2), want_qs)
    np.testing.assert_array_equal(c.k_d[1, :, 4:9].transpose(1, 0, 2), want_d)
    np.testing.assert_array_equal(c.v[1, :, 4:9].transpose(1, 0, 2), -want_qs)
    assert not c.k[0].any() and not c.k[1, :, :4].any()  # nothing else written


def test_sizes():
    class Cfg:
        num_hidden_layers, num_key_value_heads, head_dim = 32, 8, 128

    f16 = kv_cache_bytes(Cfg, 32768, "f16")
    assert f16 == 4 << 30  # Mixtral at 32k: 4 GiB
    assert kv_cache_bytes(Cfg, 32768, "q8_0") * 64 == f16 * 34
    small = type("C", (), {"num_hidden_layers": 3, "num_key_value_heads": 2, "head_dim": 64})
    assert KVCache(3, 2, 64, 10, "q8_0").nbytes == kv_cache_bytes(small, 10, "q8_0")
    with pytest.raises(UsageError, match="kv-type"):
        KVCache(1, 1, 64, 4, "q4_0")
    with pytest.raises(UsageError, match="multiple of 32"):
        KVCache(1, 1, 48, 4, "q8_0")


SHAPES = [(4, 4, 64), (8, 2, 128), (6, 2, 32), (8, 1, 64)]  # (H, KVH, HD): no GQA, 4, 3 and 8 per group


@pytest.mark.parametrize("H,KVH,HD", SHAPES)
@pytest.mark.parametrize("T,pos0", [(1, 0), (1, 300), (3, 5), (17, 40)])
def test_q8_0_kernel_matches_twin_and_torch(H, KVH, HD, T, pos0):
    c = _filled(KVH, HD, T, pos0, "q8_0", seed=H + HD + T + pos0)
    q = np.random.default_rng(T).standard_normal((T, H, HD)).astype(np.float32)
    scale = HD**-0.5
    args = (c.k[0], c.k_d[0], c.v[0], c.v_d[0])
    ref = np.empty_like(q)
    R.attention_q8_0(q, *args, pos0, scale, ref, None)
    kf, vf = R._dequant_kv_q8_0(c.k[0], c.k_d[0]), R._dequant_kv_q8_0(c.v[0], c.v_d[0])
    _close(ref, _torch(q, kf, vf, pos0, scale), 1e-5)
    got = np.full_like(q, np.nan)
    A.attention_q8_0(q, *args, pos0, scale, got, np.full((H, pos0 + T + 2), np.nan, np.float32))
    _close(got, ref)
    tiled = np.full_like(q, np.nan)
    A.attention_prefill_q8_0(q, *args, pos0, scale, tiled)
    _close(tiled, ref)


@pytest.mark.parametrize("H,KVH,HD", SHAPES)
@pytest.mark.parametrize(
    "T,pos0,q_tile,kv_tile", [(2, 0, 256, 512), (17, 40, 4, 16), (40, 3, 16, 7), (33, 200, 32, 64)]
)
def test_tiled_prefill_matches_twin(H, KVH, HD, T, pos0, q_tile, kv_tile, monkeypatch):
    """Several query and key tiles (small tile sizes), the diagonal tile partly masked, key tiles
    that do not divide the window."""
    monkeypatch.setattr(A, "Q_TILE", q_tile)
    monkeypatch.setattr(A, "KV_TILE", kv_tile)
    c = _filled(KVH, HD, T, pos0, "f16", seed=7 * H + T)
    q = np.random.default_rng(pos0).standard_normal((T, H, HD)).astype(np.float32)
    scale = HD**-0.5
    ref = np.empty_like(q)
    R.attention_prefill(q, c.k[0], c.v[0], pos0, scale, ref)
    _close(ref, _torch(q, c.k[0].astype(np.float32), c.v[0].astype(np.float32), pos0, scale), 1e-5)
    got = np.full_like(q, np.nan)
    A.attention_prefill(q, c.k[0], c.v[0], pos0, scale, got)
    _close(got, ref)
    # the same window through the decode kernel, one token after another, agrees too
    one = np.empty_like(q)
    for t in range(T):
        A.attention(q[t : t + 1], c.k[0], c.v[0], pos0 + t, scale, one[t : t + 1], np.empty((H, pos0 + T), np.float32))
    _close(got, one)


@pytest.fixture(scope="module")
def baby(tmp_path_factory):
    base = tmp_path_factory.mktemp("kv")
    src = make_hf_checkpoint(base / "hf", "mixtral", dtype="f32", seed=9, head_dim=32, num_hidden_layers=2)
    out = base / "q4"
    convert_checkpoint(src, out, quant="q4_0")
    return out


PROMPT = [1, 5, 17, 42, 8, 99, 23, 64, 31, 77, 12, 3, 50, 60, 70, 80, 90, 11, 22, 33]
Q8_TOL = 0.02  # max |logit difference| q8_0 vs f16 cache, relative to max |logit| (measured 0.005)


def test_q8_0_cache_logits_close_to_f16(baby):
    store = open_model_dir(baby)
    f16 = Model(store, ctx=64, threads=1, batch=8).logits(PROMPT)
    m8 = Model(store, ctx=64, threads=1, batch=8, kv_type="q8_0")
    q8 = m8.logits(PROMPT)
    err = float(np.abs(q8 - f16).max()) / float(np.abs(f16).max())
    assert 0 < err < Q8_TOL, err  # rounded, so not identical; close
    assert (q8.argmax(axis=1) == f16.argmax(axis=1)).mean() >= 0.9
    # prefill (tiled) then decode (one token at a time) over the same q8_0 cache = one full prefill
    m8.reset()
    m8.prefill(PROMPT[:7])
    steps = [m8.decode(t).copy() for t in PROMPT[7:]]
    _close(np.stack(steps), q8[7:], 1e-4)


def test_server_batch_uses_the_models_kv_type(baby):
    """BatchDecoder's slots hold the model's kind of cache: two sequences decoded together give
    what each gives alone through Model with a q8_0 cache."""
    from mixcli.batch import BatchDecoder

    store = open_model_dir(baby)
    m8 = Model(store, ctx=64, threads=1, batch=8, kv_type="q8_0")
    want = [m8.logits(p)[-1].copy() for p in (PROMPT[:9], PROMPT[3:14])]
    dec = BatchDecoder(m8, parallel=2)
    assert all(c.kv_type == "q8_0" for c in dec.caches)
    dec.step([(0, PROMPT[:4]), (1, PROMPT[3:9])])  # prompt chunks: the tiled kernel (10 = max_tokens)
    dec.step([(0, PROMPT[4:8]), (1, PROMPT[9:13])])
    got = dec.step([(0, PROMPT[8:9]), (1, PROMPT[13:14])])  # one decode token each
    assert len(got) == 2 and dec.max_tokens == 10
    # rows batched differently round differently (test_batch allows 2e-4 with fp16), and a K/V
    # value that moves by an ulp can cross a q8_0 rounding boundary: one step is 1/127 of its block
    _close(got[0], want[0], 1e-3)
    _close(got[1], want[1], 1e-3)


def test_tiled_prefill_in_the_model(baby, monkeypatch):
    """fp16 prompt chunks with a small window run the decode kernel over a score buffer; forced
    onto the tiled kernel (SCORE_BUFFER_MAX 0) the model's logits stay the same."""
    from mixcli import kv_cache

    store = open_model_dir(baby)
    buffered = Model(store, ctx=64, threads=1, batch=8).logits(PROMPT)
    monkeypatch.setattr(kv_cache, "SCORE_BUFFER_MAX", 0)
    tiled = Model(store, ctx=64, threads=1, batch=8).logits(PROMPT)
    _close(tiled, buffered, 1e-4)


def test_q8_0_needs_a_head_dim_of_32s(tmp_path):
    src = make_hf_checkpoint(tmp_path / "hf", "mixtral", dtype="f32", seed=1)  # head_dim 16
    convert_checkpoint(src, tmp_path / "q4", quant="q4_0")
    with pytest.raises(UsageError, match="multiple of 32"):
        Model(open_model_dir(tmp_path / "q4"), ctx=16, kv_type="q8_0")


def test_cli_kv_type(baby, capsys):
    from mixcli.cli import main

    argv = ["bench", str(baby), "--pp", "8", "--tg", "2", "--reps", "1", "-t", "1", "--json"]
    assert main(argv + ["--kv-type", "q8_0"]) == 0
    capsys.readouterr()
    assert main(argv + ["--kv-type", "q4_0"]) == 2
    err = capsys.readouterr().err
    assert "--kv-type must be one of f16, q8_0, got 'q4_0'" in err and "Traceback" not in err

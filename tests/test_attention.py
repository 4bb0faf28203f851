"""``kernels.attn.attention`` (a kv head's query group at a time) against its numpy twin
``kernels.ref.attention`` and against torch's scaled_dot_product_attention (in float64, the GQA
kv heads repeated, a causal mask offset by pos0), on decode and prefill shapes: no GQA, groups of
2, 3 and 4, and head dims that are not a multiple of the kernel's 16 lanes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixcli import kernels
from mixcli.kernels import attn as A
from mixcli.kernels import ref as R

K = kernels.select()  # the table a model gets

RTOL = 1e-5
# (H, KVH, HD): no GQA (1-head tiles, 64-column strips and whole 128-column rows), H = 4 * KVH,
# groups of 2 (whole rows; a 16-lane tail), 3 (tiles 2 + 1) and 8 (4 + 4), a 256 head dim
SHAPES = [(4, 4, 64), (2, 2, 128), (8, 2, 128), (4, 2, 72), (6, 2, 40), (8, 1, 64), (4, 2, 256)]


def _close(got, want, rtol=RTOL):
    """Max error within rtol of the largest reference magnitude (fastmath reorders sums)."""
    scale = max(float(np.abs(want).max()), 1e-30)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


def _case(H, KVH, HD, T, pos0, seed, spare=3):
    """q [T, H, HD] f32; caches [KVH, S, HD] float16 with positions past pos0+T left as NaN (never read)."""
    rng = np.random.default_rng(seed)
    S = pos0 + T + spare
    q = rng.standard_normal((T, H, HD)).astype(np.float32)
    kc = np.full((KVH, S, HD), np.nan, np.float16)
    vc = np.full((KVH, S, HD), np.nan, np.float16)
    kc[:, : pos0 + T] = rng.standard_normal((KVH, pos0 + T, HD))
    vc[:, : pos0 + T] = rng.standard_normal((KVH, pos0 + T, HD))
    return q, kc, vc


def _torch(q, kc, vc, pos0, scale):
    """torch SDPA in float64: kv heads repeated to H, query t masked to keys 0..pos0+t."""
    T, H, HD = q.shape
    n = pos0 + T
    grp = H // kc.shape[0]
    k = torch.from_numpy(kc[:, :n].astype(np.float64)).repeat_interleave(grp, dim=0)[None]  # [1, H, n, HD]
    v = torch.from_numpy(vc[:, :n].astype(np.float64)).repeat_interleave(grp, dim=0)[None]
    qt = torch.from_numpy(q.astype(np.float64)).transpose(0, 1)[None]  # [1, H, T, HD]
    mask = torch.arange(n)[None, :] <= (pos0 + torch.arange(T))[:, None]  # [T, n], True = attend
    o = torch.nn.functional.scaled_dot_product_attention(qt, k, v, attn_mask=mask, scale=scale)
    return o[0].transpose(0, 1).numpy()  # [T, H, HD]


def _run(q, kc, vc, pos0, scale, rows):
    T, H, HD = q.shape
    scratch = np.full((rows, pos0 + T), np.nan, np.float32)
    out = np.full((T, H, HD), np.nan, np.float32)
    A.attention(q, kc, vc, pos0, scale, out, scratch)
    return out


@pytest.mark.parametrize("H,KVH,HD", SHAPES)
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("pos0", [0, 5, 300])
def test_attention_matches_torch_and_twin(H, KVH, HD, T, pos0):
    q, kc, vc = _case(H, KVH, HD, T, pos0, seed=H * 1000 + HD * 10 + T + pos0)
    scale = HD**-0.5
    want = _torch(q, kc, vc, pos0, scale)
    ref = np.empty_like(q)
    R.attention(q, kc, vc, pos0, scale, ref, None)
    _close(ref, want)
    for rows in {T * H, H}:  # (token, kv head) pairs in parallel; kv heads in parallel, tokens in turn
        got = _run(q, kc, vc, pos0, scale, rows)
        _close(got, want)
        _close(got, ref)


def test_decode_scratch_wider_than_window():
    """The model's decode buffer: scratch [H, S] with columns past pos0 + 1 unused."""
    H, KVH, HD, pos0 = 8, 2, 128, 37
    q, kc, vc = _case(H, KVH, HD, 1, pos0, seed=7, spare=60)
    scratch = np.full((H, kc.shape[1]), np.nan, np.float32)
    got = np.full((1, H, HD), np.nan, np.float32)
    A.attention(q, kc, vc, pos0, HD**-0.5, got, scratch)
    _close(got, _torch(q, kc, vc, pos0, HD**-0.5))


def test_heads_of_a_group_keep_their_own_max():
    """Within one kv group, heads whose scores differ by far more than exp's range (a sharp
    head next to a flat one) must each subtract their own maximum."""
    H, KVH, HD, T, pos0 = 8, 2, 64, 3, 40
    q, kc, vc = _case(H, KVH, HD, T, pos0, seed=11)
    q[:, 0] *= 60.0
    q[:, 5] *= 0.01
    q[:, 6] -= 30.0
    want = _torch(q, kc, vc, pos0, HD**-0.5)
    for rows in (T * H, H):
        _close(_run(q, kc, vc, pos0, HD**-0.5, rows), want)


def test_strided_arguments():
    """Views whose rows are not unit-stride (they go through copies) give the same result."""
    H, KVH, HD, T, pos0 = 8, 2, 64, 3, 9
    q, kc, vc = _case(H, KVH, HD, T, pos0, seed=5)
    k2 = np.repeat(kc, 2, axis=2)[:, :, ::2]  # same values, element stride 4 bytes
    q2 = np.repeat(q, 2, axis=2)[:, :, ::2]
    out_base = np.full((T, H, 2 * HD), np.nan, np.float32)
    out = out_base[:, :, ::2]
    A.attention(q2, k2, vc, pos0, HD**-0.5, out, np.empty((T * H, pos0 + T), np.float32))
    _close(out, _torch(q, kc, vc, pos0, HD**-0.5))
    assert np.isnan(out_base[:, :, 1::2]).all()


@pytest.mark.parametrize("shape", [(7, 12), (8, 11)])
def test_scratch_too_small(shape):
    H, KVH, HD, T, pos0 = 8, 2, 16, 3, 9  # needs [8, 12]
    q, kc, vc = _case(H, KVH, HD, T, pos0, seed=1)
    out = np.empty((T, H, HD), np.float32)
    msgs = []
    for fn in (K.attention, A.attention):
        with pytest.raises(ValueError) as err:
            fn(q, kc, vc, pos0, 0.25, out, np.empty(shape, np.float32))
        msgs.append(str(err.value))
    assert msgs[0] == msgs[1] == f"attention scratch {shape} is smaller than [8, 12]"


# ---- one decode token per slot, each slot over its own cache (a batched server step) -------------
def _slots_case(H, KVH, HD, n_keys, seed, S=40):
    """B queries [B, H, HD] and B caches [KVH, S, HD] float16, slot b filled to n_keys[b] (NaN past it)."""
    rng = np.random.default_rng(seed)
    B = len(n_keys)
    q = rng.standard_normal((B, H, HD)).astype(np.float32)
    kcs, vcs = [], []
    for n in n_keys:
        kc = np.full((KVH, S, HD), np.nan, np.float16)
        vc = np.full((KVH, S, HD), np.nan, np.float16)
        kc[:, :n] = rng.standard_normal((KVH, n, HD))
        vc[:, :n] = rng.standard_normal((KVH, n, HD))
        kcs.append(kc)
        vcs.append(vc)
    return q, kcs, vcs, np.array(n_keys, np.int64)


@pytest.mark.parametrize("H,KVH,HD", SHAPES)
def test_attention_slots_equals_each_slot_alone(H, KVH, HD):
    """Every slot's row equals torch's attention of that query over its own cache, and the numpy
    twin's; slots of different lengths (1 key, a partial tile, a long row) share one call."""
    q, kcs, vcs, n_keys = _slots_case(H, KVH, HD, [1, 17, 33, 6], seed=H + HD)
    B = len(n_keys)
    got = np.full((B, H, HD), np.nan, np.float32)
    A.attention_slots(q, kcs, vcs, n_keys, HD**-0.5, got, np.full((B * H, 33), np.nan, np.float32))
    twin = np.full((B, H, HD), np.nan, np.float32)
    R.attention_slots(q, kcs, vcs, n_keys, HD**-0.5, twin, None)
    for b in range(B):
        want = _torch(q[b : b + 1], kcs[b], vcs[b], int(n_keys[b]) - 1, HD**-0.5)
        _close(got[b : b + 1], want)
        _close(twin[b : b + 1], want)


@pytest.mark.parametrize(
    "change, err, msg",
    [
        (lambda a: a.update(n_keys=np.array([3, 41], np.int64)), IndexError, "key counts 3..41 outside 1..40"),
        (lambda a: a.update(n_keys=np.array([0, 5], np.int64)), IndexError, "key counts 0..5 outside 1..40"),
        (lambda a: a.update(k=[a["k"][0], a["k"][1][:, :20]]), ValueError, "is not a C-contiguous float16"),
        (lambda a: a.update(v=[a["v"][0], a["v"][1].astype(np.float32)]), ValueError, "is not a C-contiguous float16"),
        (lambda a: a.update(k=a["k"][:1]), ValueError, "caches and (2,) key counts for 2 queries"),
        (lambda a: a.update(scratch=np.empty((2 * 4 - 1, 40), np.float32)), ValueError, "scratch"),
    ],
)
def test_attention_slots_refuses_what_would_read_out_of_bounds(change, err, msg):
    """The kernel reads caches by address: every shape, type and count is checked before it runs."""
    q, kcs, vcs, n_keys = _slots_case(4, 2, 16, [3, 5], seed=0)
    a = {"k": kcs, "v": vcs, "n_keys": n_keys, "scratch": np.empty((8, 40), np.float32)}
    change(a)
    with pytest.raises(err, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        A.attention_slots(q, a["k"], a["v"], a["n_keys"], 0.25, np.empty((2, 4, 16), np.float32), a["scratch"])


# ---- the same, with each slot's new key and value stored by the kernel (checked once per step) ----
def _store_case(H, KVH, HD, n_keys, seed, L=3, S=40):
    """B queries, B whole caches [L, KVH, S, HD] float16 filled below each slot's new position,
    and the new tokens' keys and values [B, KVH, HD] f32 (a few at fp16's half-way points and its
    largest value, where rounding shows)."""
    rng = np.random.default_rng(seed)
    B = len(n_keys)
    q = rng.standard_normal((B, H, HD)).astype(np.float32)
    k_all = [(rng.standard_normal((L, KVH, S, HD))).astype(np.float16) for _ in range(B)]
    v_all = [(rng.standard_normal((L, KVH, S, HD))).astype(np.float16) for _ in range(B)]
    k_new = rng.standard_normal((B, KVH, HD)).astype(np.float32) * 3
    v_new = rng.standard_normal((B, KVH, HD)).astype(np.float32)
    k_new[0, 0, :3] = [1 + 2**-11, 65519.0, 2**-25]  # ties that round to even (down), the largest fp16
    return q, k_all, v_all, k_new, v_new, np.array(n_keys, np.int64)


@pytest.mark.parametrize("H,KVH,HD", SHAPES)
def test_store_attend_slots_equals_the_twin_and_stores_numpy_fp16(H, KVH, HD):
    """The kernel writes each slot's new key and value at (layer, n_keys - 1) with the bits of
    numpy's float16 rounding and nowhere else, and its output equals the twin's and torch's."""
    q, k_all, v_all, k_new, v_new, n_keys = _store_case(H, KVH, HD, [1, 17, 33, 6], seed=H + HD)
    B, layer = len(n_keys), 1
    tk, tv = [k.copy() for k in k_all], [v.copy() for v in v_all]
    got = np.full((B, H, HD), np.nan, np.float32)
    slots = K.slot_caches(k_all, v_all, n_keys, H)
    K.store_attend_slots(q, k_new, v_new, slots, layer, HD**-0.5, got)
    twin = np.full((B, H, HD), np.nan, np.float32)
    R.store_attend_slots(q, k_new, v_new, tk, tv, n_keys, layer, HD**-0.5, twin)
    for b in range(B):
        np.testing.assert_array_equal(k_all[b].view(np.uint16), tk[b].view(np.uint16))
        np.testing.assert_array_equal(v_all[b].view(np.uint16), tv[b].view(np.uint16))
        want = _torch(q[b : b + 1], tk[b][layer], tv[b][layer], int(n_keys[b]) - 1, HD**-0.5)
        _close(twin[b : b + 1], want)
        _close(got[b : b + 1], want)
    assert list(k_all[0][layer, 0, 0, :3]) == [1.0, 65504.0, 0.0]


@pytest.mark.parametrize(
    "change, err, msg",
    [
        (lambda a: a.update(layer=3), IndexError, "layer 3 outside 0..2"),
        (lambda a: a.update(layer=-1), IndexError, "layer -1 outside 0..2"),
        (lambda a: a.update(n_keys=np.array([3, 41], np.int64)), IndexError, "key counts 3..41 outside 1..40"),
        (lambda a: a.update(k=[a["k"][0], a["k"][1][:, :, :20]]), ValueError, "is not a C-contiguous float16"),
        (lambda a: a.update(v=[a["v"][0], a["v"][1].astype(np.float32)]), ValueError, "is not a C-contiguous float16"),
        (lambda a: a.update(k=a["k"][:1]), ValueError, "caches and (2,) key counts"),
        (lambda a: a.update(k_new=a["k_new"][:1]), ValueError, "is not a C-contiguous float32 [2, 2, 16]"),
        (lambda a: a.update(v_new=a["v_new"].astype(np.float64)), ValueError, "is not a C-contiguous float32"),
        (lambda a: a.update(H=3), ValueError, "2 KV heads do not divide 3 heads"),
    ],
)
def test_store_attend_slots_refuses_what_would_write_out_of_bounds(change, err, msg):
    """The kernel writes and reads caches by address: layer, shapes, types and counts are checked
    first, and a refused call leaves every cache as it was."""
    q, k_all, v_all, k_new, v_new, n_keys = _store_case(4, 2, 16, [3, 5], seed=0)
    a = {"k": k_all, "v": v_all, "n_keys": n_keys, "k_new": k_new, "v_new": v_new, "layer": 0, "H": 4}
    change(a)
    before = [c.copy() for c in (*k_all, *v_all)]
    with pytest.raises(err, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.").replace("[", r"\[")):
        slots = A.slot_caches(a["k"], a["v"], a["n_keys"], a["H"])
        A.store_attend_slots(q, a["k_new"], a["v_new"], slots, a["layer"], 0.25, np.empty((2, 4, 16), np.float32))
    for c, b in zip((*k_all, *v_all), before):
        np.testing.assert_array_equal(c.view(np.uint16), b.view(np.uint16))

"""Property tests of the block quantizers (quant.q4, the numpy reference, and quant.fastquant,
the converter's numba twins), against gguf-py's quantizers, a reference we did not write.

Weights are drawn from several regimes: ordinary (std 0.02), unit, huge (1e4..6e4, near the top of
fp16), tiny (1e-6, where fp16 scales go subnormal), constant blocks, all-zero blocks (including
-0.0), and blocks whose largest magnitude appears with both signs (the tie numpy's argmax breaks).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import quants
from gguf.constants import GGMLQuantizationType as GT
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import fastquant, q4
from quant.formats import QK

GGUF = {"q4_0": GT.Q4_0, "q4_1": GT.Q4_1, "q8_0": GT.Q8_0}
SCALES = [0.02, 1.0, 1e4, 6e4 / 4.5, 1e-6]  # std; 6e4/4.5 keeps |w| below fp16's 65504
PATTERNS = ["normal", "constant", "zero", "negzero", "tie", "uniform"]


@st.composite
def weights(draw):
    """W [N, K] float32 with K a multiple of 32, blocks in mixed regimes."""
    n = draw(st.integers(1, 8))
    k = QK * draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from(SCALES))
    w = (rng.standard_normal((n, k)) * scale).astype(np.float32)
    blocks = w.reshape(n, k // QK, QK)  # [N, NB, G]
    for _ in range(draw(st.integers(0, 3))):
        r, b = rng.integers(n), rng.integers(k // QK)
        kind = draw(st.sampled_from(PATTERNS))
        if kind == "constant":
            blocks[r, b] = np.float32(rng.standard_normal() * scale)
        elif kind == "zero":
            blocks[r, b] = 0.0
        elif kind == "negzero":
            blocks[r, b] = -0.0
        elif kind == "tie":
            a = np.float32(abs(rng.standard_normal()) * scale * 4 + scale)
            i, j = rng.choice(QK, 2, replace=False)
            blocks[r, b, i], blocks[r, b, j] = (a, -a) if rng.integers(2) else (-a, a)
        elif kind == "uniform":
            blocks[r, b] = rng.uniform(-scale, scale, QK).astype(np.float32)
    return np.clip(w, -6e4, 6e4)  # "huge" stays inside fp16's range (65504)


def gguf_parts(w: np.ndarray, qtype: str) -> dict[str, np.ndarray]:
    """gguf.quants.quantize's raw blocks [N, NB * block_bytes] split into our parts."""
    n, k = w.shape
    raw = quants.quantize(w, GGUF[qtype]).reshape(n, k // QK, -1)  # [N, NB, bytes]
    d = raw[:, :, 0:2].copy().view("<f2")[:, :, 0]  # [N, NB]
    if qtype == "q4_1":
        return {"d": d, "m": raw[:, :, 2:4].copy().view("<f2")[:, :, 0], "qs": raw[:, :, 4:].reshape(n, k // 2)}
    if qtype == "q4_0":
        return {"d": d, "qs": raw[:, :, 2:].reshape(n, k // 2)}
    return {"d": d, "qs": raw[:, :, 2:].copy().view(np.int8).reshape(n, k)}


def bound(w: np.ndarray, qtype: str) -> np.ndarray:
    return q4.error_bound(w, qtype)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@settings(max_examples=150, deadline=None)
@given(weights(), st.sampled_from(["q4_0", "q4_1", "q8_0"]))
def test_reference_quantizer_is_bit_exact_with_gguf_and_within_bound(w, qtype):
    parts = q4.quantize(w, qtype)
    ref = gguf_parts(w, qtype)
    for name in ref:
        assert same_bits(parts[name], ref[name]), name
    deq = q4.dequantize(parts, qtype)  # [N, K]
    assert deq.shape == w.shape and deq.dtype == np.float32
    assert np.isfinite(deq).all()
    assert (np.abs(deq - w) <= bound(w, qtype)).all()


@settings(max_examples=150, deadline=None)
@given(weights(), st.sampled_from(list(fastquant.FAST_TYPES)))
def test_fast_quantizer_equals_reference(w, qtype):
    parts, err, nbad, x = fastquant.quantize_chunk(w, qtype)
    ref = q4.quantize(w, qtype)
    assert same_bits(x, w)
    assert set(parts) == set(ref)
    for name in ref:
        assert same_bits(parts[name], ref[name]), name
    assert nbad == 0
    assert err == float(np.abs(q4.dequantize(ref, qtype) - w).max())


@settings(max_examples=100, deadline=None)
@given(weights(), st.sampled_from(list(fastquant.FAST_TYPES)), st.sampled_from(["bf16", "f16"]))
def test_fast_quantizer_from_stored_bits_equals_reference(w, qtype, dtype):
    """Straight from bf16 bits or f16 values, through a reused scratch buffer."""
    if dtype == "bf16":
        stored = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)  # [N, K]
        values = torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16).float().numpy()
    else:
        stored = w.astype(np.float16)
        values = stored.astype(np.float32)
    scratch = np.full(w.size + 5, 0xFFFFFFFF, dtype=np.uint32)
    parts, err, nbad, x = fastquant.quantize_chunk(stored, qtype, scratch)
    ref = q4.quantize(values, qtype)
    assert nbad == 0 and same_bits(x, values)
    assert all(same_bits(parts[p], ref[p]) for p in ref)
    assert err == float(np.abs(q4.dequantize(ref, qtype) - values).max())


def q4_k_literal(w: np.ndarray) -> dict[str, np.ndarray]:
    """quant.formats' q4_k rule transcribed block by block in float32 scalars (the vectorised
    reference must agree bit for bit)."""
    f = np.float32
    n, k = w.shape
    nb = k // QK
    ns = -(-nb // 8)
    q = np.zeros((n, nb, QK), np.uint8)
    codes = np.zeros((n, nb, 2), np.uint8)
    sup = {"d": np.zeros((n, ns), "<f2"), "m": np.zeros((n, ns), "<f2")}
    for r in range(n):
        x = w[r].reshape(nb, QK)
        lo = [min(f(x[b].min()), f(0.0)) for b in range(nb)]
        per = {"d": [(f(x[b].max()) - lo[b]) / f(15.0) for b in range(nb)], "m": [-lo[b] for b in range(nb)]}
        for sb in range(ns):
            blocks = range(8 * sb, min(nb, 8 * sb + 8))
            for col, part in enumerate(("d", "m")):
                top = np.float16(max(per[part][b] for b in blocks) * f(64.0) / f(255.0))
                top = top if top > 0 else np.float16(0.0)
                sup[part][r, sb] = top
                for b in blocks:
                    c = np.clip(np.rint(per[part][b] * f(64.0) / f(top)), 0, 255) if top > 0 else 0
                    codes[r, b, col] = c
        for b in range(nb):
            dq = f(sup["d"][r, b // 8]) * f(codes[r, b, 0]) / f(64.0)
            mq = f(sup["m"][r, b // 8]) * f(codes[r, b, 1]) / f(64.0)
            if dq > 0:
                q[r, b] = [np.clip(np.rint((v + mq) / dq), 0, 15) for v in x[b]]
    qs = (q[:, :, :16] | (q[:, :, 16:] << 4)).reshape(n, k // 2)
    return {"qs": qs, "s": codes.reshape(n, 2 * nb), "d": sup["d"], "m": sup["m"]}


@settings(max_examples=100, deadline=None)
@given(weights())
def test_q4_k_reference_follows_the_rule_and_its_bound(w):
    """q4_k: the vectorised quantizer is the documented rule, never NaN (zero, constant, huge,
    tiny blocks), within ``q4.error_bound``, and reads back the same from its row-tiled form."""
    parts = q4.quantize(w, "q4_k")
    want = q4_k_literal(w)
    for name in want:
        assert same_bits(parts[name], want[name]), name
    d, m = parts["d"].astype(np.float32), parts["m"].astype(np.float32)
    assert np.isfinite(d).all() and np.isfinite(m).all() and (d >= 0).all() and (m >= 0).all()
    assert not np.signbit(d).any() and not np.signbit(m).any()  # +0 for an all-zero super-block
    deq = q4.dequantize(parts, "q4_k")
    assert deq.dtype == np.float32 and np.isfinite(deq).all()
    assert (np.abs(deq - w) <= bound(w, "q4_k")).all()
    rows = -(-w.shape[0] // 16) * 16  # whole tiles of 16 rows
    wt = np.resize(w, (rows, w.shape[1]))
    np.testing.assert_array_equal(
        q4.dequantize(q4.quantize(wt, "q4_kr16"), "q4_kr16"), q4.dequantize(q4.quantize(wt, "q4_k"), "q4_k")
    )


def test_q4_k_past_fp16_scales_is_reported_not_hidden():
    """|w| ~ 3e5 puts Dm past fp16: the reference dequantizes to NaN and the fast quantizer reports
    an infinite error (the writer turns either into a clear error), never a silent 0."""
    w = np.full((16, 64), 1.0, np.float32)
    w[3, 5] = -3e5
    assert not np.isfinite(q4.dequantize(q4.quantize(w, "q4_k"), "q4_k")).all()
    for tile in (1, 16):
        _, err, nbad, _ = fastquant.quantize_chunk(w, "q4_k", tile=tile)
        assert err == np.inf and nbad == 0


def test_q4_k_is_finer_than_q4_0_and_exact_on_its_grid():
    """On Gaussian weights q4_k's error is below q4_0's (1/8 more bits); weights already on a q4_k
    grid (a dequantized q4_k matrix) come back within fp16 rounding of the scales."""
    w = (np.random.default_rng(0).standard_normal((64, 576)) * 0.02).astype(np.float32)
    rms = {t: float(np.sqrt(((q4.dequantize(q4.quantize(w, t), t) - w) ** 2).mean())) for t in ("q4_0", "q4_k")}
    assert rms["q4_k"] < rms["q4_0"]
    grid = q4.dequantize(q4.quantize(w, "q4_k"), "q4_k")
    again = q4.dequantize(q4.quantize(grid, "q4_k"), "q4_k")
    assert np.abs(again - grid).max() <= np.abs(grid).max() * 2.0**-9


@settings(max_examples=60, deadline=None)
@given(weights())
def test_bf16_decode_matches_torch(w):
    bits = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)  # [N, K]
    ours = fastquant.decode(bits)
    assert same_bits(ours, torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy())


@settings(max_examples=60, deadline=None)
@given(weights())
def test_f16_round_trip_is_within_fp16_rounding(w):
    parts = q4.quantize(w, "f16")
    assert same_bits(parts["w"], w.astype(np.float16))
    assert (np.abs(q4.dequantize(parts, "f16") - w) <= q4.error_bound(w, "f16")).all()


@settings(max_examples=40, deadline=None)
@given(weights(), st.sampled_from(list(fastquant.FAST_TYPES)), st.sampled_from([np.nan, np.inf, -np.inf]))
def test_fast_quantizer_counts_blocks_with_non_finite_values(w, qtype, bad):
    rng = np.random.default_rng(w.size)
    idx = rng.choice(w.size, size=min(3, w.size), replace=False)
    w = w.copy()
    w.reshape(-1)[idx] = bad
    _, _, nbad, _ = fastquant.quantize_chunk(w, qtype)
    assert nbad == int((~np.isfinite(w.reshape(-1, QK))).any(axis=1).sum())


@st.composite
def tiled_weights(draw):
    """W [16*T, K]: whole tiles of 16 rows for the row-tiled ("r16") layout, rows from weights()."""
    w = draw(weights())
    rows = 16 * draw(st.integers(1, 2))
    return np.resize(w, (rows, w.shape[1])) * np.linspace(1, 2, rows, dtype=np.float32)[:, None]


@settings(max_examples=60, deadline=None)
@given(tiled_weights(), st.sampled_from(list(fastquant.FAST_TYPES)), st.sampled_from(["f32", "bf16"]))
def test_fast_quantizer_writes_the_row_tiled_layout(w, qtype, dtype):
    """tile=16 gives formats.interleave_rows of the reference's parts, straight from the kernel."""
    from quant.formats import interleave_rows

    if dtype == "bf16":
        stored = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        w = torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16).float().numpy()
    else:
        stored = w
    parts, err, nbad, x = fastquant.quantize_chunk(stored, qtype, tile=16, keep_x=False)
    ref = q4.quantize(w, qtype)
    want = interleave_rows(ref, qtype)
    assert x is None and nbad == 0
    assert all(same_bits(parts[p], want[p]) for p in want)
    assert err == float(np.abs(q4.dequantize(ref, qtype) - w).max())


def test_fast_fp16_rounding_is_numpys():
    """The kernels' fp32 -> fp16 rounding (numba has no float16) against numpy's astype: every
    sign and exponent with the 14 low mantissa bits (the rounding and even bits) exhaustive and
    random high bits, plus random patterns around the subnormal range where every bit counts; and
    fp16 -> fp32 for all 65536 halves."""
    rng = np.random.default_rng(0)
    low = np.arange(1 << 14, dtype=np.uint32)
    exps = np.arange(512, dtype=np.uint32) << np.uint32(23)  # sign and exponent
    high = rng.integers(0, 1 << 9, size=(512, 1), dtype=np.uint32) << np.uint32(14)
    patterns = [(exps[:, None] | high | low[None, :]).ravel()]
    sub = rng.integers(0x32800000, 0x38800000, size=1 << 22, dtype=np.uint32)
    patterns += [sub, sub | np.uint32(0x80000000)]
    bits = np.concatenate(patterns)  # [M] uint32
    got = np.empty(bits.size, np.uint16)
    fastquant.f32_bits_to_f16_bits(bits, got)
    with np.errstate(over="ignore", invalid="ignore"):
        want = bits.view(np.float32).astype("<f2").view(np.uint16)
    finite = ~np.isnan(bits.view(np.float32))  # NaN payloads: any NaN will do (such blocks are refused)
    assert np.array_equal(got[finite], want[finite])
    assert np.isnan(got[~finite].view("<f2")).all()
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    back = np.empty(halves.size, np.uint32)
    fastquant.f16_bits_to_f32_bits(halves, back)
    ok = ~np.isnan(halves.view("<f2"))
    assert np.array_equal(back[ok], halves.view("<f2").astype(np.float32).view(np.uint32)[ok])
    assert np.isnan(back[~ok].view(np.float32)).all()

"""float16 <-> float32 inside the kernels on CPUs without F16C.

There LLVM would call compiler-rt's __extendhfsf2 / __truncsfhf2, which numba's JIT cannot link,
and the process aborts; ``irgen.half_to_f32`` / ``f32_to_half`` then use integer steps instead.
Checked against numpy's conversions: every half, and float32 values at every rounding edge, in
scalar and vector form; the native path on this host against the same references; and whole
kernels compiled for a CPU without F16C (``NUMBA_CPU_NAME=generic``) against their numpy twins.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from mixcli.kernels import irgen

ROOT = Path(__file__).resolve().parents[1]
W = 8  # lanes of the vector form


def _lanes8(convert, elem, ret):
    """An intrinsic: a tuple of 8 scalars -> ``convert(builder, <8 x elem>)`` -> a tuple of 8 ret."""

    @intrinsic
    def lanes(typingctx, t):
        sig = types.UniTuple(ret, W)(t)

        def codegen(context, builder, signature, args):
            v = ir.Constant(ir.VectorType(elem, W), ir.Undefined)
            for i, x in enumerate(cgutils.unpack_tuple(builder, args[0], W)):
                v = builder.insert_element(v, x, ir.Constant(ir.IntType(32), i))
            out = convert(builder, v)
            got = [builder.extract_element(out, ir.Constant(ir.IntType(32), i)) for i in range(W)]
            return context.make_tuple(builder, signature.return_type, got)

        return sig, codegen

    return lanes


def _over_arrays(vec8, one):
    """njit (a [N], out_vec [N], out_one [N]), N % 8 == 0: a converted 8 lanes at a time, and one
    scalar at a time; compiled with fastmath, as the kernels are."""

    @njit(fastmath=True)
    def run(a, out_vec, out_one):
        for i in range(0, a.shape[0], W):
            r = vec8((a[i], a[i + 1], a[i + 2], a[i + 3], a[i + 4], a[i + 5], a[i + 6], a[i + 7]))
            for j in range(W):
                out_vec[i + j] = r[j]
        for i in range(a.shape[0]):
            out_one[i] = one(a[i])

    return run


def _kernels(soft: bool):
    """(widen, narrow) over whole arrays, through the integer steps (soft) or the native path."""

    def widen(builder, v):
        return irgen.half_to_f32(builder, v, soft=soft)

    def narrow(builder, v):
        return irgen.f32_to_half(builder, v, soft=soft)

    @intrinsic
    def widen1(typingctx, u):
        return types.float32(types.uint16), lambda c, b, s, a: widen(b, a[0])

    @intrinsic
    def narrow1(typingctx, x):
        return types.uint16(types.float32), lambda c, b, s, a: narrow(b, a[0])

    return (
        _over_arrays(_lanes8(widen, ir.IntType(16), types.float32), widen1),
        _over_arrays(_lanes8(narrow, ir.FloatType(), types.uint16), narrow1),
    )


def _edges() -> np.ndarray:
    """float32 values at every rounding edge of float16, plus random bit patterns."""
    h = np.arange(1 << 16, dtype=np.uint32)
    finite = h[(h & 0x7C00) != 0x7C00].astype(np.uint16)
    exact = finite.view(np.float16).astype(np.float32)
    nxt = (finite.astype(np.uint32) + 1).astype(np.uint16).view(np.float16).astype(np.float32)
    ok = np.isfinite(nxt) & (np.abs(nxt) > np.abs(exact))
    mids = ((exact[ok].astype(np.float64) + nxt[ok]) / 2).astype(np.float32)  # ties: even wins
    up, down = np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))
    big = [65504, 65519.996, 65520, 65536, 3.4e38]  # the largest half, the last value below the tie, ...
    tiny = [2.0**-14, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1e-30]  # smallest normal, subnormal, ties to 0 / 2^-23
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, *big, *tiny], np.float32)
    rand = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    out = np.concatenate([exact, mids, up, down, special, -special, rand]).astype(np.float32)
    return np.concatenate([out, np.zeros(-len(out) % W, np.float32)])


def _same_bits(got: np.ndarray, want: np.ndarray, nan_of) -> None:
    """Bitwise equal, except that a NaN need only stay a NaN (payloads differ between hardware
    and numpy)."""
    nan = nan_of(want)
    assert np.array_equal(nan_of(got), nan)
    bad = np.flatnonzero((got != want) & ~nan)
    assert bad.size == 0, f"{bad.size} differ, first at {bad[:5]}: {got[bad[:5]]} vs {want[bad[:5]]}"


@pytest.mark.parametrize("soft", [True, False], ids=["integer-steps", "native"])
def test_every_half_widens_as_numpy_does(soft):
    widen, _ = _kernels(soft)
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = h.view(np.float16).astype(np.float32).view(np.uint32)
    vec, one = np.empty(h.size, np.float32), np.empty(h.size, np.float32)
    widen(h, vec, one)
    for got in (vec, one):
        _same_bits(got.view(np.uint32), want, lambda b: np.isnan(b.view(np.float32)))


@pytest.mark.parametrize("soft", [True, False], ids=["integer-steps", "native"])
def test_float32_narrows_to_numpys_nearest_even_half(soft):
    _, narrow = _kernels(soft)
    x = _edges()
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    vec, one = np.empty(x.size, np.uint16), np.empty(x.size, np.uint16)
    narrow(x, vec, one)
    for got in (vec, one):
        _same_bits(got, want, lambda b: np.isnan(b.view(np.float16)))


def test_kernels_compiled_for_a_cpu_without_f16c_match_their_twins(tmp_path):
    """The generic tier compiled for LLVM's baseline x86-64 (no F16C, as on pre-2012 CPUs and
    Atom-class Pentiums): quantized products, dequantized rows, and attention that stores its new
    keys and values as fp16, each against its numpy twin, in a fresh numba cache."""
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("MIXCLI_ISA", None)
    probe = subprocess.run(
        [sys.executable, "-c", "from mixcli.kernels import irgen, isa; print(irgen.native_half(), isa.host_tiers())"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert probe.stdout.split() == ["False", "('generic',)"], probe.stdout + probe.stderr
    r = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "tests/test_kernels.py", "tests/test_attention.py",
            "-k", "quantized_matmul and q8_0 or dequant_row or store_attend_slots or test_attention",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]

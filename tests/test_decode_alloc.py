"""Decode allocates nothing of size D or larger (llama2.c's rule, mixcli's DESIGN): the run state,
the KV cache and the output head's row are preallocated. Measured with tracemalloc, to which
numpy reports every array it allocates; the peak of one decode step over what was held before."""

from __future__ import annotations

import tracemalloc

import pytest

import mixcli
from babymodels import make_hf_checkpoint
from quant.convert import convert_checkpoint

D = 1024  # wide enough that one [D] f32 row (4 KiB) stands out from Python's own small objects


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    base = tmp_path_factory.mktemp("alloc")
    src = make_hf_checkpoint(base / "hf", "mixtral", dtype="f32", seed=4, hidden_size=D)
    out = base / "q4"
    convert_checkpoint(src, out, quant="q4_0")
    return out


def test_a_decode_step_allocates_no_array_of_size_d(wide):
    model = mixcli.load(wide, ctx=64)
    model.prefill([1, 2, 3])
    model.decode(4)  # the decode state exists, the kernels are compiled
    tracemalloc.start()
    try:
        for tok in (5, 6, 7, 8):
            held = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            model.decode(tok)
            peak = tracemalloc.get_traced_memory()[1] - held
            assert peak < D * 4, f"a decode step allocated {peak} bytes at its peak"
    finally:
        tracemalloc.stop()

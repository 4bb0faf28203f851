"""GGUF Q6_K / Q5_K blocks held bit for bit (quant.formats.PENDING_TYPES): imported by
``quant.sources.gguf.split_blocks`` and decoded by ``quant.q4.dequantize`` exactly as the
reference we did not write, ``gguf.quants.dequantize`` (llama.cpp's own Python package), does.

The blocks are random bytes with finite fp16 scales: every bit pattern of the codes occurs, and
the check is equality of float32 bits, not closeness.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from quant import q4
from quant.formats import PENDING_TYPES
from quant.sources.gguf import PENDING_EXACT_TYPES, split_blocks

Q = gguf.GGMLQuantizationType
BLOCK_BYTES = {"Q6_K": 210, "Q5_K": 176}
SCALE_OFFSETS = {"Q6_K": (208,), "Q5_K": (0, 2)}  # fp16 fields: d (and dmin)


def random_k_blocks(rng: np.random.Generator, ggml_type: str, n: int, k: int) -> np.ndarray:
    """[N, K/256 * block bytes] uint8 of ``ggml_type`` with random codes and finite fp16 scales."""
    nb = BLOCK_BYTES[ggml_type]
    blocks = rng.integers(0, 256, size=(n, k // 256, nb), dtype=np.uint8)
    for off in SCALE_OFFSETS[ggml_type]:
        scale = (rng.standard_normal((n, k // 256)) * 0.01).astype("<f2")
        blocks[:, :, off:off + 2] = scale[..., None].view(np.uint8).reshape(n, k // 256, 2)
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("ggml_type", ["Q6_K", "Q5_K"])
@pytest.mark.parametrize("n,k", [(3, 256), (16, 1024), (5, 2816)])
def test_k_blocks_import_and_decode_bit_for_bit(ggml_type, n, k):
    rng = np.random.default_rng(n * k)
    data = random_k_blocks(rng, ggml_type, n, k)
    ours = PENDING_EXACT_TYPES[ggml_type]
    parts = split_blocks(data, ggml_type, k)
    want_shapes = PENDING_TYPES[ours].part_shapes(n, k)
    assert {p: (a.shape, a.dtype.str.replace("|", "")) for p, a in parts.items()} == \
        {p: (s, np.dtype(dt).str.replace("|", "")) for p, (s, dt) in want_shapes.items()}
    # no bit changed: the parts, laid back field by field per super-block, are the GGUF bytes
    ns = k // 256
    fields = [parts[p].view(np.uint8).reshape(n, ns, -1) for p in PENDING_TYPES[ours].parts]
    np.testing.assert_array_equal(np.concatenate(fields, axis=2).reshape(n, -1), data)
    ref = gguf.quants.dequantize(data, Q[ggml_type])  # [N, K] float32
    got = q4.dequantize(parts, ours)
    assert got.dtype == np.float32 and got.shape == (n, k)
    np.testing.assert_array_equal(got.view(np.uint32), ref.astype(np.float32).view(np.uint32))
    # a vector ([K]) decodes like a one-row matrix
    np.testing.assert_array_equal(q4.dequantize({p: a[0] for p, a in parts.items()}, ours), ref[0])


def test_pending_types_are_not_storage_types_yet():
    """Until their kernels exist, no manifest may name them (the store refuses unknown types)."""
    from quant.formats import QUANT_TYPES

    assert not set(PENDING_TYPES) & set(QUANT_TYPES)
    assert PENDING_TYPES["q6_k"].bits_per_weight == 210 * 8 / 256
    assert PENDING_TYPES["q5_k"].bits_per_weight == 176 * 8 / 256

"""The row-tiled storage types ("q4_0r16" ...): the layout promised by
``quant.formats.interleave_rows`` byte for byte, its inverse, and the converter's choice of it."""

from __future__ import annotations

import numpy as np
import pytest

from quant import q4
from quant.formats import QUANT_TYPES, deinterleave_rows, interleave_rows, row_tiled


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0", "q4_k"])
def test_interleave_layout_and_inverse(qtype):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 96)).astype(np.float32)  # 3 tiles, 3 blocks
    plain = q4.quantize(w, qtype)
    tiled = interleave_rows(plain, qtype)
    shapes = QUANT_TYPES[qtype + "r16"].part_shapes(48, 96)
    assert {p: a.shape for p, a in tiled.items()} == {p: s for p, (s, _) in shapes.items()}
    bpb = 16 if qtype != "q8_0" else 32  # qs bytes per block of one row
    qs = tiled["qs"].reshape(3, 3, bpb // 4, 16, 4)  # [tile, block, column group, row, byte]
    for tile, blk, c, i, j in [(0, 0, 0, 0, 0), (1, 2, 3, 5, 1), (2, 1, bpb // 4 - 1, 15, 3)]:
        assert qs[tile, blk, c, i, j] == plain["qs"][16 * tile + i, blk * bpb + 4 * c + j]
    if qtype != "q4_k":  # q4_k's d is per super-block: below
        d = tiled["d"].reshape(3, 3, 16)  # [tile, block, row]
        assert d[2, 1, 7] == plain["d"][39, 1]
    back = deinterleave_rows(tiled, qtype)
    for p in plain:
        np.testing.assert_array_equal(back[p], plain[p])
    # the reference dequantizer reads the tiled type to the same matrix
    np.testing.assert_array_equal(q4.dequantize(tiled, qtype + "r16"), q4.dequantize(plain, qtype))


def test_q4_k_codes_and_super_scales_layout():
    """q4_kr16: per tile and block, 16 sc bytes then 16 mn bytes; per super-block 16 D (Dm)."""
    w = np.random.default_rng(5).standard_normal((32, 576)).astype(np.float32)  # 2 tiles, 18 blocks, 3 supers
    plain = q4.quantize(w, "q4_k")
    tiled = interleave_rows(plain, "q4_k")
    s = tiled["s"].reshape(2, 18, 2, 16)  # [tile, block, {sc, mn}, row]
    for tile, blk, i in [(0, 0, 0), (1, 17, 15), (1, 9, 4)]:
        assert s[tile, blk, 0, i] == plain["s"][16 * tile + i, 2 * blk]
        assert s[tile, blk, 1, i] == plain["s"][16 * tile + i, 2 * blk + 1]
    for part in ("d", "m"):
        sup = tiled[part].reshape(2, 3, 16)  # [tile, super-block, row]
        assert sup[1, 2, 3] == plain[part][19, 2] and sup[0, 1, 15] == plain[part][15, 1]


def test_row_tiled_only_where_rows_fit():
    assert row_tiled("q4_0", 4096) == "q4_0r16"
    assert row_tiled("q8_0", 49152) == "q8_0r16"
    assert row_tiled("q4_0", 72) == "q4_0"  # not a multiple of 16 rows
    assert row_tiled("q4_k", 576) == "q4_kr16" and row_tiled("q4_k", 72) == "q4_k"
    assert row_tiled("f16", 4096) == "f16"  # float types stay row-major


def test_older_format_loads_with_a_note(tmp_path):
    """A version-1 model (row-major blocks only) still loads; the runtime says how to get the
    faster layout, once, through the caller's notifier."""
    import json

    from babymodels import make_hf_checkpoint
    from mixcli.runtime import load_runtime_model
    from quant.convert import convert_checkpoint

    src = make_hf_checkpoint(tmp_path / "src", "llama", seed=1)
    convert_checkpoint(src, tmp_path / "m")
    notes: list[str] = []
    new, _ = load_runtime_model(str(tmp_path / "m"), notify=notes.append)
    assert notes == []
    want = new.logits([1, 2, 3])
    mpath = tmp_path / "m" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["version"] = 1
    mpath.write_text(json.dumps(m))
    old, _ = load_runtime_model(str(tmp_path / "m"), notify=notes.append)
    assert len(notes) == 1 and "older mixcli" in notes[0] and "pull --force" in notes[0]
    np.testing.assert_array_equal(old.logits([1, 2, 3]), want)

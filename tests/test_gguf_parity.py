"""GGUF import against the safetensors conversion of the same weights (issue 5, "Done means").

A baby Mixtral is written twice from one set of float weights (``babymodels.random_weights``):
as a Hugging Face safetensors checkpoint (``babymodels.make_hf_checkpoint``) and as a llama.cpp
GGUF (``test_gguf_import.write_gguf``: llama architecture with ``expert_count``, q/k permuted as
convert_hf_to_gguf.py permutes them, gguf.GGUFWriter). Converting each must give the same model:
the same stored tensors, bit for bit, and so the same logits.

- F16 GGUF (linears, embedding and lm_head F16; norms and router F32), imported keeping its types,
  against ``convert_checkpoint(quant="f16")`` of the f32 safetensors.
- F32 GGUF imported with ``quant="f16"`` against the same (the F32 file's rounding done by us).
- Q4_0 GGUF (llama.cpp's own quantizer, ``gguf.quants``: linears Q4_0, embedding and lm_head
  Q8_0) imported keeping its blocks, against ``convert_checkpoint(quant="q4_0")``: our quantizer
  writes the same blocks llama.cpp writes, so the two model directories hold identical tensors.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

import mixcli
from babymodels import make_hf_checkpoint
from quant.convert import convert_checkpoint
from quant.gguf_convert import convert_gguf
from quant.writer import read_tensor_parts, verify_model_dir
from test_gguf_import import make_gguf_checkpoint

Q = gguf.GGMLQuantizationType
F16_TYPES = {"linear": Q.F16, "embed": Q.F16, "output": Q.F16, "norm": Q.F32, "router": Q.F32}
F32_TYPES = {"linear": Q.F32, "embed": Q.F32, "output": Q.F32, "norm": Q.F32, "router": Q.F32}
Q4_0_TYPES = {"linear": Q.Q4_0, "embed": Q.Q8_0, "output": Q.Q8_0, "norm": Q.F32, "router": Q.F32}

CASES = {
    # id: (GGUF types, convert_gguf quant, convert_checkpoint quant, stacked experts, tied)
    "f16-keep": (F16_TYPES, "keep", "f16", True, False),
    "f32-as-f16-per-expert": (F32_TYPES, "f16", "f16", False, False),
    "q4_0-keep": (Q4_0_TYPES, "keep", "q4_0", True, False),
    "q4_0-keep-tied": (Q4_0_TYPES, "keep", "q4_0", True, True),
}


def _tokens(vocab: int, n: int = 48) -> list[int]:
    return np.random.default_rng(7).integers(0, vocab, n).tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_import_equals_safetensors_conversion(tmp_path: Path, case: str):
    types, gguf_quant, st_quant, stacked, tied = CASES[case]
    seed = 3
    hf_dir = make_hf_checkpoint(tmp_path / "hf", "mixtral", dtype="f32", seed=seed, tied=tied)
    src, cfg, _ = make_gguf_checkpoint(
        tmp_path / "baby.gguf", "mixtral", seed=seed, tied=tied, types=types, stacked=stacked
    )
    reader = gguf.GGUFReader(src)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.expert_count"].contents() == cfg["num_local_experts"]
    assert {t.tensor_type for t in reader.tensors} == set(types.values())

    from_gguf, from_st = tmp_path / "from-gguf", tmp_path / "from-safetensors"
    convert_gguf(src, from_gguf, quant=gguf_quant)
    convert_checkpoint(hf_dir, from_st, quant=st_quant)
    mg, ms = verify_model_dir(from_gguf), verify_model_dir(from_st)
    assert mg["source"]["kind"] == "gguf" and mg["config"]["num_local_experts"] == 4
    assert set(mg["tensors"]) == set(ms["tensors"])
    for name in ms["tensors"]:
        assert mg["tensors"][name]["type"] == ms["tensors"][name]["type"], name
        assert mg["tensors"][name]["shape"] == ms["tensors"][name]["shape"], name
        pg, ps = read_tensor_parts(from_gguf, mg, name), read_tensor_parts(from_st, ms, name)
        assert set(pg) == set(ps), name
        for part in ps:  # bit for bit: q/k un-permuted exactly, the same rounding / the same blocks
            np.testing.assert_array_equal(np.asarray(pg[part]), np.asarray(ps[part]), err_msg=f"{name}.{part}")

    tokens = _tokens(cfg["vocab_size"])
    lg = mixcli.load(from_gguf, ctx=64).logits(tokens)  # [T, V]
    ls = mixcli.load(from_st, ctx=64).logits(tokens)
    assert lg.shape == (len(tokens), cfg["vocab_size"]) and np.isfinite(lg).all()
    np.testing.assert_allclose(lg, ls, rtol=1e-5, atol=1e-5 * float(np.abs(ls).max()))
    # and step by step (the decode path) from the GGUF import
    m = mixcli.load(from_gguf, ctx=64)
    m.prefill(tokens[:40])
    for i, t in enumerate(tokens[40:-1]):
        np.testing.assert_allclose(m.decode(t), ls[40 + i], rtol=1e-4, atol=1e-4 * float(np.abs(ls).max()))

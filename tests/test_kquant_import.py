"""GGUF Q6_K / Q5_K blocks held bit for bit (quant.formats q6_k, q5_k): imported by
``quant.sources.gguf.split_blocks`` and decoded by ``quant.q4.dequantize`` and every kernel table's
``dequant_row`` exactly as the reference we did not write, ``gguf.quants.dequantize`` (llama.cpp's
own Python package), does; and a GGUF with llama.cpp's Q4_K_M / Q5_K_M type mix imports with no
tensor re-quantized and gives transformers-from-GGUF's logits.

The blocks are random bytes with finite fp16 scales: every bit pattern of the codes occurs, and
the check is equality of float32 bits, not closeness.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from mixcli import kernels
from quant import q4
from quant.formats import K_TYPES, QUANT_TYPES, row_tiled
from quant.sources.gguf import EXACT_TYPES, split_blocks

Q = gguf.GGMLQuantizationType
BLOCK_BYTES = {"Q6_K": 210, "Q5_K": 176}
SCALE_OFFSETS = {"Q6_K": (208,), "Q5_K": (0, 2)}  # fp16 fields: d (and dmin)
# ggml's block_q6_K / block_q5_K fields in their byte order, as our part names
GGUF_FIELDS = {"Q6_K": ("ql", "qh", "sc", "d"), "Q5_K": ("d", "m", "s", "qh", "qs")}


def random_k_blocks(rng: np.random.Generator, ggml_type: str, n: int, k: int) -> np.ndarray:
    """[N, K/256 * block bytes] uint8 of ``ggml_type`` with random codes and finite fp16 scales."""
    nb = BLOCK_BYTES[ggml_type]
    blocks = rng.integers(0, 256, size=(n, k // 256, nb), dtype=np.uint8)
    for off in SCALE_OFFSETS[ggml_type]:
        scale = (rng.standard_normal((n, k // 256)) * 0.01).astype("<f2")
        blocks[:, :, off : off + 2] = scale[..., None].view(np.uint8).reshape(n, k // 256, 2)
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("ggml_type", ["Q6_K", "Q5_K"])
@pytest.mark.parametrize("n,k", [(3, 256), (16, 1024), (5, 2816)])
def test_k_blocks_import_and_decode_bit_for_bit(ggml_type, n, k):
    rng = np.random.default_rng(n * k)
    data = random_k_blocks(rng, ggml_type, n, k)
    ours = EXACT_TYPES[ggml_type]
    parts = split_blocks(data, ggml_type, k)
    want_shapes = QUANT_TYPES[ours].part_shapes(n, k)
    assert {p: (a.shape, a.dtype.str.replace("|", "")) for p, a in parts.items()} == {
        p: (s, np.dtype(dt).str.replace("|", "")) for p, (s, dt) in want_shapes.items()
    }
    # no bit changed: the parts, laid back field by field per super-block, are the GGUF bytes
    ns = k // 256
    fields = [parts[p].view(np.uint8).reshape(n, ns, -1) for p in GGUF_FIELDS[ggml_type]]
    np.testing.assert_array_equal(np.concatenate(fields, axis=2).reshape(n, -1), data)
    ref = gguf.quants.dequantize(data, Q[ggml_type]).astype(np.float32)  # [N, K]
    got = q4.dequantize(parts, ours)
    assert got.dtype == np.float32 and got.shape == (n, k)
    np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    # a vector ([K]) decodes like a one-row matrix
    np.testing.assert_array_equal(q4.dequantize({p: a[0] for p, a in parts.items()}, ours), ref[0])
    # the kernels' row reader (the embedding lookup) of every tier and mode, fp16 parts as float16
    # or as their uint16 bits (as Linear passes them)
    args = [parts[p] for p in QUANT_TYPES[ours].parts]
    bits = [a.view(np.uint16) if a.dtype == np.float16 else a for a in args]
    row = np.empty(k, np.float32)
    for tier in kernels.host_tiers():
        for mode in kernels.ACT_MODES:
            table = kernels.select(tier, mode)
            for r in {0, n // 2, n - 1}:
                for a in (args, bits):
                    row[:] = np.nan
                    getattr(table, f"dequant_row_{ours}")(*a, r, row)
                    np.testing.assert_array_equal(row.view(np.uint32), ref[r].view(np.uint32))


def test_k_types_are_storage_types_with_manifest_order_parts():
    """The kernels take the parts in QuantType.parts order, the writer and the manifest check in
    part_shapes order: one order. K must be a multiple of 256 (check_manifest refuses others)."""
    from quant.formats import fallback_type

    for qtype in K_TYPES:
        qt = QUANT_TYPES[qtype]
        assert list(qt.parts) == list(qt.part_shapes(4, 512)) and qt.block == 256
        assert fallback_type(qtype, 512) == qtype and fallback_type(qtype, 288) == "f16"
        for tier in kernels.host_tiers():
            table = kernels.select(tier)
            assert all(callable(getattr(table, f"{op}_{qtype}")) for op in ("matvec", "matmul", "dequant_row"))
    assert QUANT_TYPES["q6_k"].bits_per_weight == 210 * 8 / 256
    assert QUANT_TYPES["q5_k"].bits_per_weight == 176 * 8 / 256


# -- a llama.cpp _M mix, end to end ------------------------------------------------------------------
def _m_mix(bulk: Q, n_layers: int) -> tuple[dict, dict[str, Q]]:
    """llama.cpp's Q4_K_M / Q5_K_M choice (llama-quant.cpp): the bulk type for most tensors; Q6_K
    for the output head, and for attn_v and ffn_down in about half of the layers (use_more_bits:
    the first and last eighth and every third between; here the first half)."""
    overrides = {f"blk.{i}.{t}.weight": Q.Q6_K for i in range(max(1, n_layers // 2)) for t in ("attn_v", "ffn_down")}
    return {"linear": bulk, "embed": bulk, "output": Q.Q6_K}, overrides


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q5_K_M"])
def test_m_mix_gguf_imports_with_nothing_requantized_and_runs_like_transformers(tmp_path, mix):
    """A llama GGUF with a _M file's types converts under the default ``keep`` with no tensor
    re-quantized (the convert summary says so), every tensor as gguf decodes it, and mixcli's
    logits (default int8x2 kernels, prefill and decode) match transformers' on the same file."""
    import torch
    from transformers import AutoModelForCausalLM

    import mixcli
    from babymodels import BABY_DEFAULTS, random_weights
    from mixcli.commands.convert import requantized_text
    from quant.gguf_convert import convert_gguf
    from quant.sources.gguf import open_gguf
    from quant.writer import read_tensor_parts, verify_model_dir
    from test_gguf_import import Q4_K_BABY, write_gguf

    bulk = {"Q4_K_M": Q.Q4_K, "Q5_K_M": Q.Q5_K}[mix]
    cfg = {**BABY_DEFAULTS["llama"], **Q4_K_BABY, "tie_word_embeddings": False}
    types, overrides = _m_mix(bulk, cfg["num_hidden_layers"])
    src = write_gguf(tmp_path / f"baby-{mix}.gguf", cfg, random_weights(cfg, 8), types=types, overrides=overrides)
    in_file = {t.name: t.tensor_type for t in gguf.GGUFReader(src).tensors}
    assert in_file["output.weight"] == in_file["blk.0.attn_v.weight"] == in_file["blk.0.ffn_down.weight"] == Q.Q6_K
    assert in_file["blk.1.ffn_down.weight"] == in_file["blk.0.attn_q.weight"] == in_file["token_embd.weight"] == bulk

    out = tmp_path / "out"
    summary = convert_gguf(src, out)
    assert summary.requantized == () and summary.max_abs_err == 0.0
    assert requantized_text(summary) == "none: every block kept"
    m = verify_model_dir(out)
    ck = open_gguf(src)
    for name, t in m["tensors"].items():
        ref = ck.tensors[name]
        if ref.gguf_name in overrides or ref.gguf_name == "output.weight":
            assert t["type"] == "q6_k", name
        elif in_file[ref.gguf_name] == bulk:  # q4_k row-tiled where the rows allow (not the 100-row embedding)
            assert t["type"] == row_tiled(EXACT_TYPES[bulk.name], ref.shape[0]), name
        got = q4.dequantize(read_tensor_parts(out, m, name), t["type"])
        np.testing.assert_array_equal(got, ck.read(name).reshape(got.shape), err_msg=name)  # gguf's decoder

    tokens = np.random.default_rng(2).integers(3, cfg["vocab_size"], 24).tolist()
    model = mixcli.load(out, ctx=64)
    ours = model.logits(tokens)  # [T, V]
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=src.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([tokens])).logits[0].numpy()
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(ours, want, rtol=0, atol=2e-3 * scale)
    model = mixcli.load(out, ctx=64)  # and token by token (the decode kernels)
    model.prefill(tokens[:20])
    for i, tok in enumerate(tokens[20:-1]):
        np.testing.assert_allclose(model.decode(tok), want[20 + i], rtol=0, atol=2e-3 * scale)


def test_a_requantized_tensor_is_named_in_the_summary(tmp_path):
    """A type we do not hold (Q5_0) is decoded and quantized again; the summary names it."""
    from babymodels import BABY_DEFAULTS, random_weights
    from mixcli.commands.convert import requantized_text
    from quant.gguf_convert import convert_gguf
    from test_gguf_import import Q4_K_BABY, write_gguf

    cfg = {**BABY_DEFAULTS["llama"], **Q4_K_BABY, "tie_word_embeddings": False}
    src = write_gguf(
        tmp_path / "mixed.gguf",
        cfg,
        random_weights(cfg, 9),
        types={"linear": Q.Q4_K, "output": Q.Q6_K},
        overrides={"blk.1.attn_v.weight": Q.Q5_0},
    )
    summary = convert_gguf(src, tmp_path / "out")
    assert summary.requantized == ("blk.1.attn_v.weight",) and summary.max_abs_err > 0
    assert requantized_text(summary) == "1 GGUF tensor: blk.1.attn_v.weight"


def test_mixtral_with_q6_k_experts_imports_exactly_and_runs_like_the_numpy_twins(tmp_path):
    """A Mixtral Q4_K_M mix (stacked ``ffn_down_exps`` of layer 0 in Q6_K: every expert's w2 is
    q6_k): nothing re-quantized, each expert slice as gguf decodes it, and the model on the fast
    kernels (prefill and decode) gives the logits of the same model on the numpy twins."""
    import mixcli.model
    from babymodels import BABY_DEFAULTS, random_weights
    from mixcli.kernels import ref
    from quant.gguf_convert import convert_gguf
    from quant.sources.gguf import open_gguf
    from quant.writer import read_tensor_parts, verify_model_dir
    from test_gguf_import import Q4_K_BABY, write_gguf

    cfg = {**BABY_DEFAULTS["mixtral"], **Q4_K_BABY, "tie_word_embeddings": False}
    types, overrides = _m_mix(Q.Q4_K, cfg["num_hidden_layers"])
    overrides["blk.0.ffn_down_exps.weight"] = overrides.pop("blk.0.ffn_down.weight")
    src = write_gguf(tmp_path / "moe.gguf", cfg, random_weights(cfg, 4), types=types, overrides=overrides)
    out = tmp_path / "out"
    assert convert_gguf(src, out).requantized == ()
    m = verify_model_dir(out)
    ck = open_gguf(src)
    for e in range(cfg["num_local_experts"]):
        name = f"layers.0.experts.{e}.w2"
        assert m["tensors"][name]["type"] == "q6_k" and m["tensors"][name.replace("0.", "1.", 1)]["type"] == "q4_kr16"
        np.testing.assert_array_equal(q4.dequantize(read_tensor_parts(out, m, name), "q6_k"), ck.read(name))
    tokens = np.random.default_rng(3).integers(3, cfg["vocab_size"], 20).tolist()
    want = mixcli.model.load(out, ctx=64, kernels=ref).logits(tokens)  # [T, V], x kept in f32
    fast = mixcli.model.load(out, ctx=64, act="f32")
    np.testing.assert_allclose(fast.logits(tokens), want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
    fast = mixcli.model.load(out, ctx=64)  # the default int8x2 activations: llama.cpp's kind of rounding
    np.testing.assert_allclose(fast.logits(tokens), want, rtol=0, atol=2e-3 * float(np.abs(want).max()))
    fast.reset()  # then token by token (the decode kernels)
    fast.prefill(tokens[:12])
    for i, tok in enumerate(tokens[12:-1]):
        np.testing.assert_allclose(fast.decode(tok), want[12 + i], rtol=0, atol=2e-3 * float(np.abs(want).max()))


def test_k_blocks_need_k_a_multiple_of_256(tmp_path):
    """A GGUF whose Q6_K tensor claims a row of 128 weights is refused before anything reads it, in
    one line; a manifest that names q6_k / q5_k for a K the super-blocks do not divide is refused by
    the one manifest check."""
    import json

    from babymodels import BABY_DEFAULTS, random_weights
    from quant.formats import FormatError, check_manifest
    from quant.gguf_convert import convert_gguf
    from quant.writer import verify_model_dir
    from test_gguf_check import _tensor_info_at, refused
    from test_gguf_import import Q4_K_BABY, write_gguf

    cfg = {**BABY_DEFAULTS["llama"], **Q4_K_BABY, "tie_word_embeddings": False}
    src = write_gguf(tmp_path / "q6.gguf", cfg, random_weights(cfg, 1), types={"linear": Q.Q4_K, "output": Q.Q6_K})
    reader = gguf.GGUFReader(src)
    at = _tensor_info_at(reader, "output.weight") + 8 + len("output.weight") + 4  # its ne[0] (u64)
    data = bytearray(src.read_bytes())
    assert int.from_bytes(data[at : at + 8], "little") == 256
    data[at : at + 8] = (128).to_bytes(8, "little")
    assert "output.weight has dimensions [128, 100] (each > 0, the first a multiple of 256)" in refused(
        tmp_path, bytes(data), "the first a multiple of 256"
    )

    out = tmp_path / "model"
    convert_gguf(src, out)
    m = verify_model_dir(out)
    assert m["tensors"]["output"]["type"] == "q6_k"
    sizes = {f["name"]: f["size"] for f in m["files"]}
    check_manifest(m, sizes.get)
    for qtype in ("q6_k", "q5_k"):  # the embedding (checked first) of a model 128 wide, as q6_k / q5_k
        bad = json.loads(json.dumps(m))
        bad["config"]["hidden_size"] = 128
        bad["tensors"]["tok_embeddings"].update(shape=[cfg["vocab_size"], 128], type=qtype)
        with pytest.raises(
            FormatError, match=f"tensor tok_embeddings of shape \\[100, 128\\] cannot be stored as {qtype}"
        ):
            check_manifest(bad, sizes.get)

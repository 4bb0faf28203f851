"""`mixcli convert` on baby checkpoints: the manifest validates, every stored tensor is what the
reference quantizer (bit-exact with gguf-py, see test_quant) makes of the source as read by the
safetensors library and torch (readers we did not write), f16 mode round-trips, expert regions
are contiguous and page aligned, and the writer's chunking, file rollover and tokenizer handling
hold up.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from babymodels import make_hf_checkpoint
from quant import q4
from quant.convert import convert_checkpoint
from quant.formats import FORMAT_NAME, FORMAT_VERSION, QUANT_PRESETS, TENSOR_ALIGN, role_of, tensor_names
from quant.writer import ModelWriter, read_tensor_parts, verify_model_dir

REPO = Path(__file__).resolve().parent.parent

# Hugging Face name -> canonical name, written out here independently of quant/sources/hf.py
TOP = {"model.embed_tokens.weight": "tok_embeddings", "model.norm.weight": "norm", "lm_head.weight": "output"}
LAYER = {
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.weight": "attn.wq",
    "self_attn.k_proj.weight": "attn.wk",
    "self_attn.v_proj.weight": "attn.wv",
    "self_attn.o_proj.weight": "attn.wo",
    "block_sparse_moe.gate.weight": "moe.gate",
    "mlp.gate_proj.weight": "experts.0.w1",
    "mlp.up_proj.weight": "experts.0.w3",
    "mlp.down_proj.weight": "experts.0.w2",
}


def canonical(hf: str) -> str:
    if hf in TOP:
        return TOP[hf]
    m = re.match(r"model\.layers\.(\d+)\.(.*)$", hf)
    rest = m.group(2)
    e = re.match(r"block_sparse_moe\.experts\.(\d+)\.(w\d)\.weight$", rest)
    return f"layers.{m.group(1)}." + (f"experts.{e.group(1)}.{e.group(2)}" if e else LAYER[rest])


def source_tensors(src: Path) -> dict[str, np.ndarray]:
    """canonical name -> float32 values, read by the safetensors library through torch."""
    out = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[canonical(k)] = st.get_tensor(k).float().numpy()
    return out


def stored_raw(src: Path) -> dict[str, np.ndarray]:
    """canonical name -> the stored array as torch loads it (f16 stays f16)."""
    out = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[canonical(k)] = st.get_tensor(k)
    return out


CASES = {
    # id: (kind, make_hf_checkpoint kwargs)
    "mixtral-bf16-2shards": ("mixtral", {"dtype": "bf16", "shards": 2}),
    "mixtral-f16-single-tied": ("mixtral", {"dtype": "f16", "shards": 1, "index": False, "tied": True}),
    "llama-f32-3shards": ("llama", {"dtype": "f32", "shards": 3}),
    "mistral-bf16-tied-index": ("mistral", {"dtype": "bf16", "tied": True}),
    "mixtral-f32-oddF": ("mixtral", {"dtype": "f32", "intermediate_size": 72, "num_local_experts": 3}),
    # q4_k: 72-row w1/w3 stay row-major q4_k (f32-activation kernels), the rest q4_kr16
    "mixtral-bf16-oddF-q4_k": ("mixtral", {"dtype": "bf16", "intermediate_size": 72, "num_local_experts": 3}),
    "llama-f16-q4_k": ("llama", {"dtype": "f16", "shards": 2}),
}
QUANT = {"mixtral-bf16-oddF-q4_k": "q4_k", "llama-f16-q4_k": "q4_k"}  # the preset, when not q4_0


@pytest.mark.parametrize("case", list(CASES))
def test_convert_matches_reference_quantizer(tmp_path, case):
    kind, kw = CASES[case]
    quant = QUANT.get(case, "q4_0")
    src = make_hf_checkpoint(tmp_path / "src", kind, seed=len(case), **kw)
    summary = convert_checkpoint(src, tmp_path / "out", quant=quant)
    m = verify_model_dir(tmp_path / "out", check_sha=True)
    assert m["format"] == FORMAT_NAME and m["version"] == FORMAT_VERSION
    assert m["source"] == {"kind": "hf-safetensors", "path": str(src), "dtype": kw["dtype"]}
    assert m["quant"]["preset"] == quant and m["quant"]["types"] == QUANT_PRESETS[quant]
    cfg = json.loads((src / "config.json").read_text())
    assert m["config"]["hidden_size"] == cfg["hidden_size"]
    assert m["config"]["tie_word_embeddings"] == kw.get("tied", False)
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["out", "src"]  # no temp dir left

    ref = source_tensors(src)
    if kw.get("tied"):
        assert "output" not in m["tensors"]
    moe = kind == "mixtral"
    names = tensor_names(
        cfg["num_hidden_layers"], cfg.get("num_local_experts", 1) if moe else 1, moe, kw.get("tied", False)
    )
    assert list(m["tensors"]) == names  # formats.tensor_names order
    worst = 0.0
    for name in names:
        t = m["tensors"][name]
        w = ref[name]
        assert t["shape"] == list(w.shape)
        want = QUANT_PRESETS[quant][role_of(name)]
        if w.ndim == 2 and w.shape[1] % 32:
            want = "f16"  # K does not fit a block
        if w.ndim == 2 and want != "f16" and w.shape[0] % 16 == 0:
            want += "r16"  # rows tiled 16 at a time (formats.interleave_rows)
        assert t["type"] == want, name
        parts = read_tensor_parts(tmp_path / "out", m, name)
        expect = q4.quantize(w, want)
        for p in expect:
            assert np.asarray(parts[p]).tobytes() == expect[p].tobytes(), (name, p)
        deq = q4.dequantize({k: np.asarray(v) for k, v in parts.items()}, want)
        err = np.abs(deq - w)
        if want != "f32":
            assert (err <= q4.error_bound(w, want)).all(), name
        assert t["max_abs_err"] == pytest.approx(float(err.max()), abs=0), name
        worst = max(worst, float(err.max()))
    assert m["stats"]["max_abs_err"] == summary.max_abs_err == worst
    assert summary.params == sum(int(np.prod(w.shape)) for n, w in ref.items() if n in m["tensors"])
    assert summary.bytes_on_disk == sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    if kw.get("intermediate_size") == 72:
        assert m["tensors"]["layers.0.experts.0.w2"]["type"] == "f16"
        assert m["tensors"]["layers.0.experts.0.w1"]["type"] == quant  # 72 rows: not a multiple of 16
    assert m["tensors"]["layers.0.attn.wq"]["type"] == quant + "r16"

    # experts: one page-aligned region each, holding exactly w1, w3, w2 and nothing else
    regions = m["experts"]
    assert len(regions) == cfg["num_hidden_layers"] * (cfg.get("num_local_experts", 1) if moe else 1)
    for rname, r in regions.items():
        ws = [m["tensors"][f"{rname}.{w}"] for w in ("w1", "w3", "w2")]
        assert r["offset"] % TENSOR_ALIGN == 0 and r["offset"] == ws[0]["offset"]
        assert r["offset"] + r["nbytes"] == ws[2]["offset"] + ws[2]["nbytes"]
        for a, b in zip(ws, ws[1:]):
            assert 0 <= b["offset"] - (a["offset"] + a["nbytes"]) < TENSOR_ALIGN  # only alignment padding
        inside = [n for n, t in m["tensors"].items() if r["offset"] <= t["offset"] < r["offset"] + r["nbytes"]]
        assert sorted(inside) == sorted(f"{rname}.{w}" for w in ("w1", "w3", "w2"))


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_f16_mode_round_trips(tmp_path, dtype):
    src = make_hf_checkpoint(tmp_path / "src", "mixtral", dtype=dtype, shards=2, seed=5)
    convert_checkpoint(src, tmp_path / "out", quant="f16")
    m = verify_model_dir(tmp_path / "out")
    raw = stored_raw(src)
    for name, t in m["tensors"].items():
        stored = np.asarray(read_tensor_parts(tmp_path / "out", m, name)["w"])
        src_np = raw[name].numpy()
        if t["type"] == "f32":  # router and norms: widened exactly
            assert np.array_equal(stored, src_np.astype(np.float32)), name
        elif dtype == "f16":  # exact: the very same bytes
            assert t["type"] == "f16" and stored.tobytes() == src_np.tobytes(), name
        else:  # fp16 rounding of an f32 source, as numpy rounds
            assert stored.tobytes() == src_np.astype(np.float16).tobytes(), name
            assert (np.abs(stored.astype(np.float32) - src_np) <= q4.error_bound(src_np, "f16")).all()
        assert t["max_abs_err"] == float(np.abs(stored.astype(np.float32) - src_np.astype(np.float32)).max())


def test_bf16_source_is_read_as_torch_reads_it(tmp_path):
    """Our memory-mapped bf16 decoding against torch's, through the whole converter (q8_0)."""
    src = make_hf_checkpoint(tmp_path / "src", "llama", dtype="bf16", seed=7)
    convert_checkpoint(src, tmp_path / "out", quant="q8_0")
    m = verify_model_dir(tmp_path / "out")
    ref = source_tensors(src)
    for name, t in m["tensors"].items():
        parts = read_tensor_parts(tmp_path / "out", m, name)
        expect = q4.quantize(ref[name], t["type"])
        assert all(np.asarray(parts[p]).tobytes() == expect[p].tobytes() for p in expect), name


def test_tokenizer_files_and_section(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    template = (REPO / "tests" / "data" / "tmpl_mixtral.jinja").read_text()
    (tok / "tokenizer.model").write_bytes(b"sentencepiece model bytes, copied verbatim")
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    (tok / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>", "lstrip": False},
                "eos_token": "</s>",
                "chat_template": template,
                "added_tokens_decoder": {"2": {"content": "</s>"}, "32000": {"content": "<|end|>"}},
            }
        )
    )
    (tok / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 32000]}))
    src = make_hf_checkpoint(tmp_path / "src", "mixtral", tokenizer_dir=tok)
    convert_checkpoint(src, tmp_path / "out", quant="q8_0")
    m = verify_model_dir(tmp_path / "out")
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (tok / f).read_bytes()
    assert m["tokenizer"] == {
        "kind": "sentencepiece",
        "file": "tokenizer.model",
        "config_file": "tokenizer_config.json",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos": True,
        "extra_eos_tokens": ["<|end|>"],
        "chat_template": template,
        "template_family": "mistral",
    }


def test_tokenizer_json_only_chatml_and_no_tokenizer(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    template = (REPO / "tests" / "data" / "tmpl_chatml.jinja").read_text()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    (tok / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "chat_template": template, "add_bos_token": False})
    )
    src = make_hf_checkpoint(tmp_path / "src", "llama", tokenizer_dir=tok)
    convert_checkpoint(src, tmp_path / "out", quant="q8_0")
    t = verify_model_dir(tmp_path / "out")["tokenizer"]
    assert (t["kind"], t["file"], t["template_family"], t["add_bos"], t["bos_token"]) == (
        "hf-json",
        "tokenizer.json",
        "chatml",
        False,
        None,
    )
    bare = make_hf_checkpoint(tmp_path / "bare", "llama")
    convert_checkpoint(bare, tmp_path / "out2", quant="q8_0")
    assert verify_model_dir(tmp_path / "out2")["tokenizer"] is None


def test_force_replaces_only_when_complete(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "llama")
    out = tmp_path / "out"
    convert_checkpoint(src, out, quant="q8_0")
    convert_checkpoint(src, out, quant="f16", force=True)
    assert verify_model_dir(out)["quant"]["preset"] == "f16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_progress_reports_every_tensor_and_byte(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "mixtral", dtype="bf16", shards=2)
    calls = []
    convert_checkpoint(src, tmp_path / "a" / "b" / "out", progress=lambda *a: calls.append(a))
    total = sum(w.size * 2 for w in source_tensors(src).values())  # bf16 bytes of all tensors
    n = len(verify_model_dir(tmp_path / "a" / "b" / "out")["tensors"])
    assert calls[-1][1:] == (n, n, total, total)
    assert [c[3] for c in calls] == sorted(c[3] for c in calls)  # bytes only grow
    assert set(range(1, n + 1)) <= {c[1] for c in calls}


def test_writer_chunks_and_rolls_over_files(tmp_path):
    """Row chunks smaller than a tensor, and data files capped small: still exact, and an expert
    region never straddles two files."""
    rng = np.random.default_rng(0)
    w = {n: (rng.standard_normal((70, 96)) * 0.05).astype(np.float32) for n in ("w1", "w3", "w2")}
    big = (rng.standard_normal((300, 64))).astype(np.float32)
    writer = ModelWriter(tmp_path / "m", file_limit=20000, chunk_weights=500)
    released = []
    writer.add_tensor("big", "q8_0", big.shape, lambda a, b: big[a:b], release=lambda a, b: released.append((a, b)))
    for e in range(3):
        writer.begin_expert(0, e, nbytes=3 * q4.nbytes("q4_0", 70, 96))
        for n in ("w1", "w3", "w2"):
            src = (w[n] + e).astype(np.float16)  # an f16 source through the numpy path
            writer.add_tensor(f"layers.0.experts.{e}.{n}", "q4_0", src.shape, lambda a, b, s=src: s[a:b])
        writer.end_expert()
    m = writer.finish({}, {}, None, {"kind": "test"}, fsync=False)
    # 500 // 64 = 7 rows a chunk, rounded up to a whole tile of 16 rows (formats.ROW_TILE)
    assert released == [(a, min(a + 16, 300)) for a in range(0, 300, 16)]
    assert len(m["files"]) > 1
    for r in m["experts"].values():
        assert r["offset"] + r["nbytes"] <= next(f["size"] for f in m["files"] if f["name"] == r["file"])
    for name, t in m["tensors"].items():
        src = big if name == "big" else (w[name[-2:]] + int(name.split(".")[3])).astype(np.float16).astype(np.float32)
        parts = read_tensor_parts(tmp_path / "m", m, name)
        expect = q4.quantize(src, t["type"])
        assert all(np.asarray(parts[p]).tobytes() == expect[p].tobytes() for p in expect), name


def test_add_tensor_parts_writes_given_blocks(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    parts = q4.quantize(w, "q4_1")
    writer = ModelWriter(tmp_path / "m")
    writer.add_tensor_parts("x", "q4_1", w.shape, parts)
    with pytest.raises(ValueError, match="part d"):
        writer.add_tensor_parts("y", "q4_1", w.shape, {**parts, "d": parts["d"][:, :1]})
    m = writer.finish({}, {}, None, {"kind": "test"}, fsync=False)
    got = read_tensor_parts(tmp_path / "m", m, "x")
    assert all(np.asarray(got[p]).tobytes() == parts[p].tobytes() for p in parts)


def test_verify_model_dir_catches_damage(tmp_path):
    from quant.formats import FormatError as ModelFormatError  # quant's own error type

    src = make_hf_checkpoint(tmp_path / "src", "llama")
    out = tmp_path / "out"
    convert_checkpoint(src, out, quant="q8_0")
    m = json.loads((out / "manifest.json").read_text())
    data = out / m["files"][0]["name"]
    t = m["tensors"]["layers.1.attn.wk"]
    raw = bytearray(data.read_bytes())
    raw[t["offset"] + 3] ^= 0xFF
    data.write_bytes(bytes(raw))
    verify_model_dir(out, check_sha=False)
    with pytest.raises(ModelFormatError, match="layers.1.attn.wk fails its sha256"):
        verify_model_dir(out)
    m["tensors"]["norm"]["offset"] += 64
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelFormatError, match="tensor norm starts at"):
        verify_model_dir(out, check_sha=False)
    m["files"][0]["name"] = "../evil.bin"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelFormatError, match="not allowed"):
        verify_model_dir(out, check_sha=False)


def test_cli_convert_subprocess(tmp_path):
    """The real command line: summary on success; one error line and exit 1 on a second run."""
    src = make_hf_checkpoint(tmp_path / "src", "mixtral", dtype="bf16")
    cmd = [sys.executable, "-m", "mixcli", "convert", str(src), "-o", str(tmp_path / "out")]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "bits per weight" in ok.stdout and "largest quant error" in ok.stdout
    verify_model_dir(tmp_path / "out")
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f"error: output {tmp_path / 'out'} already exists (pass --force to replace it, or choose another -o)"
    ]
    q4k = subprocess.run(
        cmd[:-1] + [str(tmp_path / "q4k"), "--quant", "q4_k"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert q4k.returncode == 0, q4k.stderr
    m = verify_model_dir(tmp_path / "q4k")
    assert m["quant"]["preset"] == "q4_k" and m["tensors"]["layers.0.attn.wq"]["type"] == "q4_kr16"

"""Every bad input of `mixcli convert`: a one-line message naming the problem and the fix, the
right exit code, and nothing left behind (no output directory, no temporary files)."""

from __future__ import annotations

import errno
import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from babymodels import make_hf_checkpoint
from mixcli.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, exit_code
from quant import convert as convert_mod
from quant.convert import convert_checkpoint
from quant.errors import ConversionInterrupted, QuantError
from quant.writer import ModelWriter, verify_model_dir

REPO = Path(__file__).resolve().parent.parent


def fails(src: Path, out: Path, match: str, code: int = EXIT_ERROR, **kw) -> QuantError:
    """Convert, expect one of quant's errors whose one-line message matches and which the CLI
    exits with ``code``; check nothing is left."""
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else None
    with pytest.raises(QuantError, match=match) as info:
        convert_checkpoint(src, out, **kw)
    err = info.value
    assert exit_code(err) == code
    assert "\n" not in str(err) and err.hint, str(err)
    after = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else None
    assert after == before  # no output, no .partial- directory, no stray file
    return err


@pytest.fixture
def dirs(tmp_path):
    (tmp_path / "outs").mkdir()
    return tmp_path / "src", tmp_path / "outs" / "model"


def single(src: Path, **kw) -> Path:
    """A one-file f32 baby Mixtral; returns its safetensors file."""
    make_hf_checkpoint(src, "mixtral", shards=1, index=False, **kw)
    return src / "model.safetensors"


def test_missing_directory(dirs):
    src, out = dirs
    fails(src, out, r"checkpoint directory .*src does not exist \(check the path")


def test_empty_directory(dirs):
    src, out = dirs
    src.mkdir()
    fails(src, out, r"checkpoint directory .*src is empty \(download the model's files")


def test_config_missing(dirs):
    src, out = dirs
    single(src)
    (src / "config.json").unlink()
    fails(src, out, r"no config.json in .*src \(download the complete checkpoint")


def test_config_invalid_json(dirs):
    src, out = dirs
    single(src)
    (src / "config.json").write_text('{"hidden_size": 64,,}')
    fails(src, out, r"config .*config.json is not valid JSON \(Expecting property name .* at line 1\)")


def test_unsupported_architecture(dirs):
    src, out = dirs
    single(src, architectures=["GPT2LMHeadModel"])
    fails(
        src, out, r"unsupported architecture GPT2LMHeadModel .*MixtralForCausalLM, MistralForCausalLM, LlamaForCausalLM"
    )


def test_index_names_missing_shard(dirs):
    src, out = dirs
    make_hf_checkpoint(src, "mixtral", shards=3)
    (src / "model-00002-of-00003.safetensors").unlink()
    fails(src, out, r"shard model-00002-of-00003.safetensors named in model.safetensors.index.json is missing")


def test_truncated_safetensors(dirs):
    src, out = dirs
    f = single(src)
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 100)
    fails(src, out, rf"model.safetensors is truncated: its header describes {size} bytes but the file has {size - 100}")


def test_truncated_to_nothing(dirs):
    src, out = dirs
    f = single(src)
    f.write_bytes(b"\x10\x00")
    fails(src, out, r"model.safetensors is truncated \(2 bytes")


@pytest.mark.parametrize(
    "damage,match",
    [
        ("length", r"corrupt safetensors header \(header length \d+ does not fit"),
        ("json", r"corrupt safetensors header \(not JSON"),
        ("offsets", r"corrupt safetensors header \(model.embed_tokens.weight: data_offsets"),
        ("overlap", r"model.safetensors is not a valid safetensors file"),
    ],
)
def test_corrupt_header(dirs, damage, match):
    src, out = dirs
    f = single(src)
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    if damage == "length":
        raw[:8] = struct.pack("<Q", 1 << 40)
    elif damage == "json":
        raw[8 : 8 + n] = b"{" + b"\x00" * (n - 1)
    else:
        e = header["model.embed_tokens.weight"]
        if damage == "offsets":
            e["data_offsets"][1] -= 4  # no longer the shape's size
        else:  # the safetensors library's own check: two tensors on the same bytes
            other = header["model.norm.weight"]
            other["data_offsets"] = [
                e["data_offsets"][0],
                e["data_offsets"][0] + (other["data_offsets"][1] - other["data_offsets"][0]),
            ]
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= n
        raw[8 : 8 + n] = text + b" " * (n - len(text))
    f.write_bytes(bytes(raw))
    fails(src, out, match)


def test_wrong_tensor_shape(dirs):
    src, out = dirs
    f = single(src)
    tensors = load_file(str(f))
    tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((48, 64), np.float32)
    save_file(tensors, str(f))
    fails(
        src,
        out,
        r"tensor model.layers.1.self_attn.k_proj.weight has shape \[48, 64\] but config.json implies \[32, 64\]",
    )


def test_missing_tensor(dirs):
    src, out = dirs
    f = single(src)
    tensors = load_file(str(f))
    del tensors["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, str(f))
    fails(src, out, r"lacks 1 tensor\(s\) the config implies, first layers.0.experts.3.w2")


def test_unexpected_tensor(dirs):
    src, out = dirs
    f = single(src)
    tensors = load_file(str(f))
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, str(f))
    fails(src, out, r"unexpected tensor model.layers.0.self_attn.q_proj.bias in model.safetensors")


@pytest.mark.parametrize(
    "dtype,hf_name,value,what",
    [
        ("f32", "model.layers.1.block_sparse_moe.experts.2.w3.weight", np.nan, "1 NaN"),  # numba path
        ("bf16", "model.layers.0.self_attn.o_proj.weight", -np.inf, "1 inf"),
        ("f32", "model.norm.weight", np.inf, "1 inf"),  # f32 norm: numpy path
        ("f16", "model.embed_tokens.weight", np.nan, "1 NaN"),
    ],
)
def test_non_finite_weights(dirs, monkeypatch, dtype, hf_name, value, what):
    src, out = dirs
    import babymodels

    real = babymodels.random_weights

    def poisoned(cfg, seed=0):
        w = real(cfg, seed)
        w[hf_name].reshape(-1)[5] = value
        return w

    monkeypatch.setattr(babymodels, "random_weights", poisoned)
    make_hf_checkpoint(src, "mixtral", dtype=dtype, shards=2)
    fails(src, out, rf"tensor {hf_name} contains {what} value\(s\) in rows 0\.\.\d+ \(first at row 0, column 5\)")


def test_pickle_only_is_refused_and_never_unpickled(dirs, tmp_path):
    src, out = dirs
    single(src)
    (src / "model.safetensors").unlink()
    (src / "model.safetensors.index.json").unlink(missing_ok=True)
    marker = tmp_path / "unpickled"

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (src / "pytorch_model.bin").write_bytes(pickle.dumps(Bomb()))
    fails(
        src,
        out,
        r"holds only pickle checkpoints \(pytorch_model.bin\), which mixcli never loads \(download the model's \*.safetensors",
    )
    assert not marker.exists()


def test_output_exists_without_force(dirs):
    src, out = dirs
    single(src)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails(src, out, r"output .*model already exists \(pass --force")
    assert (out / "keep.txt").read_text() == "mine"


def test_output_contains_source_even_with_force(tmp_path):
    src = tmp_path / "ckpt" / "src"
    single(src)
    fails(src, tmp_path / "ckpt", r"contains the source checkpoint", code=EXIT_USAGE, force=True)
    assert (src / "model.safetensors").exists()


def test_unknown_quant(dirs):
    src, out = dirs
    single(src)
    fails(
        src,
        out,
        r"unknown quantization 'q3_k' \(choose one of q4_0, q4_1, q4_k, q8_0, f16\)",
        code=EXIT_USAGE,
        quant="q3_k",
    )


def test_disk_full_midway(dirs, monkeypatch):
    src, out = dirs
    single(src)
    calls = {"n": 0}
    real = ModelWriter._write_raw

    def write(self, fh, buf):
        calls["n"] += 1
        if calls["n"] > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, fh, buf)

    monkeypatch.setattr(ModelWriter, "_write_raw", write)
    fails(src, out, r"disk full while writing .*model \(needs about 0\.0 GB, .* GB free now\) \(free 0\.1 GB and retry")
    assert calls["n"] > 10


def test_not_enough_space_up_front(dirs, monkeypatch):
    src, out = dirs
    single(src)
    monkeypatch.setattr(convert_mod, "_free_bytes", lambda path: 1000)
    fails(src, out, r"not enough disk space for .*model: needs about 0\.0 GB, 0\.0 GB free")


def test_ctrl_c_midway(dirs):
    src, out = dirs
    single(src)

    def progress(name, done, total, bytes_done, bytes_total):
        if done == 7:
            raise KeyboardInterrupt

    fails(src, out, r"conversion to .*model interrupted; nothing was written", code=EXIT_INTERRUPTED, progress=progress)


def test_failure_with_force_keeps_the_old_output(dirs):
    src, out = dirs
    single(src)
    convert_checkpoint(src, out, quant="q8_0")

    def progress(*a):
        raise KeyboardInterrupt

    before = sorted(p.name for p in out.parent.iterdir())
    with pytest.raises(ConversionInterrupted, match="interrupted"):
        convert_checkpoint(src, out, quant="f16", force=True, progress=progress)
    assert sorted(p.name for p in out.parent.iterdir()) == before
    assert verify_model_dir(out)["quant"]["preset"] == "q8_0"


def test_created_parent_directories_are_removed_on_failure(tmp_path):
    src = tmp_path / "src"
    single(src)

    def progress(*a):
        raise KeyboardInterrupt

    with pytest.raises(ConversionInterrupted):
        convert_checkpoint(src, tmp_path / "new" / "deeper" / "model", progress=progress)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_error_is_one_line_without_traceback(tmp_path):
    cmd = [sys.executable, "-m", "mixcli", "convert", str(tmp_path / "nope"), "-o", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == EXIT_ERROR
    assert r.stderr.splitlines() == [
        f"error: checkpoint directory {tmp_path / 'nope'} does not exist (check the path, or download the model first)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == []

"""Checksums that mean something: a damaged data file is refused naming the tensor (first open
after a change, and `mixcli verify`), an unchanged model is not hashed again (the stamp), and
--no-verify skips the check. The speed of both paths is measured in benchmarks/verify.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import babyruntime
from mixcli.errors import ModelFormatError
from mixcli.store import open_model_dir
from quant import integrity
from quant.formats import STAMP_NAME

ROOT = Path(__file__).resolve().parent.parent
TENSOR = "layers.1.attn.wq"


@pytest.fixture(scope="module")
def baby(tmp_path_factory) -> Path:
    return babyruntime.baby_chat_model(tmp_path_factory.getbasetemp() / "babyruntime")


@pytest.fixture
def damaged(baby, tmp_path) -> Path:
    """A copy of the baby with 4096 bytes of one attention matrix flipped (size and name unchanged)."""
    d = shutil.copytree(baby, tmp_path / "damaged")
    m = json.loads((d / "manifest.json").read_text())
    t = m["tensors"][TENSOR]
    with open(d / t["file"], "r+b") as fh:
        fh.seek(t["offset"])
        data = bytearray(fh.read(4096))
        fh.seek(t["offset"])
        fh.write(bytes(b ^ 0x5A for b in data))
    return d


def mixcli(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "mixcli", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def test_conversion_stamps_what_it_wrote(baby):
    m = json.loads((baby / "manifest.json").read_text())
    assert (baby / STAMP_NAME).is_file() and integrity.stamp_matches(baby, m)


def test_flipped_bytes_are_refused_naming_the_tensor(damaged):
    gen = ["generate", str(damaged), "-p", "hello", "-n", "3", "--temp", "0", "-t", "1"]
    r = mixcli(*gen)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: ")
    assert f"tensor {TENSOR} fails its sha256 check" in r.stderr and "Traceback" not in r.stderr
    assert not (damaged / STAMP_NAME).exists()  # a failed check leaves no stamp that could vouch for it
    v = mixcli("verify", str(damaged))
    assert v.returncode == 1, v.stderr
    assert f"error: {damaged}: tensor {TENSOR} fails its sha256 check" in v.stderr
    assert "1 damaged: " + TENSOR in v.stdout  # the table names it on its file's row
    skipped = mixcli(*gen, "--no-verify")
    assert skipped.returncode == 0 and skipped.stdout, skipped.stderr  # runs on the damaged weights, as asked


def test_verify_passes_and_restamps_an_intact_model(baby, tmp_path):
    d = shutil.copytree(baby, tmp_path / "copy")  # a copy: new inodes and mtimes, so the old stamp no longer holds
    m = json.loads((d / "manifest.json").read_text())
    assert not integrity.stamp_matches(d, m)
    v = mixcli("verify", str(d))
    assert v.returncode == 0, v.stderr
    assert "ok: every rule and all" in v.stdout and m["files"][0]["name"] in v.stdout
    assert integrity.stamp_matches(d, m)


def test_the_stamp_skips_hashing_until_a_file_changes(baby, tmp_path, monkeypatch):
    d = shutil.copytree(baby, tmp_path / "copy")
    calls = []
    real = integrity.verify_tensors

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(integrity, "verify_tensors", counting)
    open_model_dir(d)  # a copy: hashed once, then stamped
    open_model_dir(d)  # unchanged: not hashed
    assert len(calls) == 1
    data = next(d.glob("weights-*.bin"))
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: hashed again
    open_model_dir(d)
    open_model_dir(d, verify=False)
    assert len(calls) == 2


def test_damage_after_the_stamp_is_found_on_the_next_open(baby, tmp_path):
    d = shutil.copytree(baby, tmp_path / "copy")
    open_model_dir(d)
    m = json.loads((d / "manifest.json").read_text())
    t = m["tensors"]["layers.0.experts.2.w2"]
    raw = bytearray((d / t["file"]).read_bytes())
    raw[t["offset"] + 100] ^= 1
    (d / t["file"]).write_bytes(bytes(raw))  # rewritten: a new mtime
    with pytest.raises(ModelFormatError, match="tensor layers.0.experts.2.w2 fails its sha256 check"):
        open_model_dir(d)

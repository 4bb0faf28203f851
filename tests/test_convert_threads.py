"""The writer's threads: a chunk quantized in two halves on two threads (the default on 4+ cores,
forced here) is byte-for-byte what one thread writes; an error in either half (NaN, an exception
on the pool thread, Ctrl-C) reaches the caller and leaves nothing behind; the sink's early
writeback and short writes change no byte.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from babymodels import make_hf_checkpoint
from quant import q4
from quant import writer as writer_mod
from quant.convert import convert_checkpoint
from quant.errors import CheckpointError, ConversionInterrupted, OutputError
from quant.formats import interleave_rows
from quant.writer import ModelWriter, read_tensor_parts, verify_model_dir


def bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 [N, K] -> bf16 bit patterns [N, K] uint16 (truncated), as a checkpoint stores them."""
    return (w.view(np.uint32) >> 16).astype(np.uint16)


def write_model(out: Path, tensors: dict, quant_threads: int, chunk_weights: int = 1 << 17) -> dict:
    w = ModelWriter(out, chunk_weights=chunk_weights, quant_threads=quant_threads)
    for name, (qtype, src) in tensors.items():
        w.add_tensor(name, qtype, src.shape, lambda a, b, s=src: s[a:b])
    return w.finish({}, {}, None, {"kind": "test"}, fsync=False)


def test_two_threads_write_the_same_bytes_as_one(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1000, 512)) * 0.02).astype(np.float32)  # [N, K]: chunks of 256 rows, a short last one
    tensors = {
        "a": ("q4_0", bf16_bits(x)),
        "b": ("q8_0r16", bf16_bits(x[:992])),
        "c": ("q4_0r16", x[:992]),
        "d": ("q4_1", x.astype(np.float16)),
    }  # the numpy path, split too
    one = write_model(tmp_path / "one", tensors, quant_threads=1)
    two = write_model(tmp_path / "two", tensors, quant_threads=2)
    assert (tmp_path / "one" / "weights-00000.bin").read_bytes() == (
        tmp_path / "two" / "weights-00000.bin"
    ).read_bytes()
    assert {n: t["sha256"] for n, t in one["tensors"].items()} == {n: t["sha256"] for n, t in two["tensors"].items()}
    for name, (qtype, src) in tensors.items():
        values = (src.astype(np.uint32) << 16).view(np.float32) if src.dtype == np.uint16 else src.astype(np.float32)
        base = qtype.removesuffix("r16")
        expect = q4.quantize(values, base)
        if qtype != base:
            expect = interleave_rows(expect, base)
        got = read_tensor_parts(tmp_path / "two", two, name)
        assert all(np.asarray(got[p]).tobytes() == expect[p].tobytes() for p in expect), name


def test_nan_in_the_second_half_names_its_row(tmp_path):
    x = np.full((512, 256), 0.5, dtype=np.float32)
    x[300, 7] = np.nan  # chunk 1 is rows 256..511: this thread's half 256..383, the pool's 384..511
    x[400, 9] = np.inf
    w = ModelWriter(tmp_path / "m", chunk_weights=1 << 16, quant_threads=2)  # 256 rows a chunk, halves of 128
    with w, pytest.raises(CheckpointError, match=r"rows 256\.\.383 \(first at row 300, column 7\)"):
        w.add_tensor("t", "q4_0", x.shape, lambda a, b: x[a:b])
    x[300, 7] = 0.0
    w = ModelWriter(tmp_path / "m2", chunk_weights=1 << 16, quant_threads=2)
    with w, pytest.raises(CheckpointError, match=r"rows 384\.\.511 \(first at row 400, column 9\)"):
        w.add_tensor("t", "q4_0", x.shape, lambda a, b: x[a:b])


def test_an_error_on_the_pool_thread_reaches_the_caller(tmp_path, monkeypatch):
    real = writer_mod.encode_chunk
    seen = []

    def failing(raw, qtype, scratch=None):
        seen.append(threading.current_thread().name)
        if threading.current_thread().name.startswith("mixcli-quant"):
            raise RuntimeError("pool thread failed")
        return real(raw, qtype, scratch)

    monkeypatch.setattr(writer_mod, "encode_chunk", failing)
    x = np.zeros((512, 256), dtype=np.float32)
    w = ModelWriter(tmp_path / "m", chunk_weights=1 << 16, quant_threads=2)
    with pytest.raises(RuntimeError, match="pool thread failed"):
        with w:
            w.add_tensor("t", "q4_0", x.shape, lambda a, b: x[a:b])
    assert any(n.startswith("mixcli-quant") for n in seen) and threading.current_thread().name in seen
    assert w._pool is None and not w._sink.is_alive()  # abort stopped both threads


@pytest.mark.parametrize("where", ["main", "pool"])
def test_conversion_fails_cleanly_from_either_half(tmp_path, monkeypatch, where):
    """Through convert_checkpoint, with every chunk split: Ctrl-C in this thread's half and an
    error in the pool's half both leave no output and no temporary directory."""
    src = make_hf_checkpoint(tmp_path / "src", "mixtral", dtype="bf16")
    out = tmp_path / "out"
    monkeypatch.setattr(writer_mod, "SPLIT_WEIGHTS", 0)
    monkeypatch.setattr(writer_mod, "QUANT_THREADS", 2)  # the default on 4+ cores
    real = writer_mod.encode_chunk
    calls = {"n": 0}

    def flaky(raw, qtype, scratch=None):
        pool = threading.current_thread().name.startswith("mixcli-quant")
        if pool == (where == "pool"):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt if where == "main" else OSError("pool thread failed")
        return real(raw, qtype, scratch)

    monkeypatch.setattr(writer_mod, "encode_chunk", flaky)
    want = (
        (ConversionInterrupted, "interrupted")
        if where == "main"
        else (OutputError, "cannot write .*pool thread failed")
    )
    with pytest.raises(want[0], match=want[1]):
        convert_checkpoint(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert not [t for t in threading.enumerate() if t.name.startswith(("mixcli-quant", "mixcli-writer"))]


def test_split_conversion_matches_unsplit(tmp_path, monkeypatch):
    src = make_hf_checkpoint(tmp_path / "src", "mixtral", dtype="bf16")
    convert_checkpoint(src, tmp_path / "one")
    monkeypatch.setattr(writer_mod, "SPLIT_WEIGHTS", 0)
    monkeypatch.setattr(writer_mod, "QUANT_THREADS", 2)
    convert_checkpoint(src, tmp_path / "two")
    a, b = verify_model_dir(tmp_path / "one"), verify_model_dir(tmp_path / "two")
    assert {n: t["sha256"] for n, t in a["tensors"].items()} == {n: t["sha256"] for n, t in b["tensors"].items()}


def test_early_writeback_and_short_writes_change_no_byte(tmp_path, monkeypatch):
    """A writeback step smaller than the output, and a file object that takes at most 1000 bytes
    a write, as an unbuffered write may: the same bytes and checksums."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((1024, 512)) * 0.02).astype(np.float32)
    tensors = {"a": ("q4_0", x), "b": ("q8_0", x)}
    ref = write_model(tmp_path / "ref", tensors, quant_threads=1)

    class Short:
        def __init__(self, fh):
            self.fh = fh

        def write(self, buf):
            return self.fh.write(buf[:1000])

        def __getattr__(self, name):
            return getattr(self.fh, name)

    real = ModelWriter._write_raw
    advised = []
    monkeypatch.setattr(writer_mod, "WRITEBACK_STEP", 4096)
    monkeypatch.setattr(ModelWriter, "_write_raw", lambda self, fh, buf: real(self, Short(fh), buf))
    real_fadvise = writer_mod.os.posix_fadvise
    monkeypatch.setattr(writer_mod.os, "posix_fadvise", lambda *a: (advised.append(a[1:3]), real_fadvise(*a)))
    got = write_model(tmp_path / "got", tensors, quant_threads=2)
    assert len(advised) > 10
    # each call covers the range sent by the one before it (written back by now) and the new bytes
    assert advised[0][0] == advised[1][0] == 0
    assert all(c[0] == a[0] + a[1] for a, c in zip(advised, advised[2:]))
    assert (tmp_path / "ref" / "weights-00000.bin").read_bytes() == (
        tmp_path / "got" / "weights-00000.bin"
    ).read_bytes()
    assert {n: t["sha256"] for n, t in ref["tensors"].items()} == {n: t["sha256"] for n, t in got["tensors"].items()}


# ---- the page-cache warmer: reading starts before the quantizer (numba) has loaded ------------------
def test_opening_a_checkpoint_does_not_load_numba():
    """The warmer only helps if the checkpoint can be opened and read before numba is imported:
    quant.convert and the safetensors reader must not import it (the writer does, later)."""
    import subprocess
    import sys

    code = (
        "import sys, quant.convert, quant.sources.hf; "
        "assert 'numba' not in sys.modules, sorted(m for m in sys.modules if 'numba' in m)[:3]"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent
    )
    assert r.returncode == 0, r.stderr


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_warmer_reads_the_checkpoint_and_stops_cleanly(tmp_path, monkeypatch):
    """warm() asks the kernel to read the shards front to back (seen through posix_fadvise
    WILLNEED), stops at its byte limit, is stopped by plan() and by close(), and leaves no file
    descriptor open; the conversion after a warm start is byte-identical to one without."""
    import os

    from quant.sources import hf

    src = make_hf_checkpoint(tmp_path / "hf", "mixtral", dtype="bf16", seed=2, num_hidden_layers=2)
    reads: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def spy(fd, off, n, advice):
        if threading.current_thread().name == "mixcli-warm" and advice == os.POSIX_FADV_WILLNEED:
            reads.append((off, n))
        return real(fd, off, n, advice)

    monkeypatch.setattr(hf.os, "posix_fadvise", spy)
    fds = _open_fds()
    ck = hf.open_hf_checkpoint(src)
    ck.warm()
    ck._warmer._thread.join(timeout=30)
    total = sum(n for _, n in reads)
    assert total == ck.nbytes  # a small checkpoint: read whole, each tensor's bytes once
    ck.close()
    assert _open_fds() == fds

    reads.clear()
    monkeypatch.setattr(hf, "WARM_LIMIT", 3000)
    ck = hf.open_hf_checkpoint(src)
    ck.warm()
    ck._warmer._thread.join(timeout=30)
    assert 3000 <= sum(n for _, n in reads) < 3000 + hf.WARM_STEP
    ck.plan([])  # the real reader takes over: the warmer is gone
    assert ck._warmer is None
    ck.close()
    assert _open_fds() == fds

    monkeypatch.setattr(hf, "WARM_LIMIT", 2 << 30)
    a = convert_checkpoint(src, tmp_path / "warm", quant="q4_0")
    monkeypatch.setattr(hf.HFCheckpoint, "warm", lambda self: None)
    b = convert_checkpoint(src, tmp_path / "cold", quant="q4_0")
    for f in sorted(p.name for p in a.out.iterdir() if p.name.startswith("weights-")):
        assert (a.out / f).read_bytes() == (b.out / f).read_bytes()

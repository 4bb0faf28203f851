"""The small ones of issue 21, through the real command line: stdout on a full disk, a closed pipe,
a non-UTF-8 prompt, MIXCLI_HOME that is a file, --threads 0 and below, --max-memory '', and Ctrl-C
while mixcli is still importing. Each ends in one `error:` line (or quietly) with no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import babyruntime

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def baby(tmp_path_factory) -> Path:
    return babyruntime.baby_chat_model(tmp_path_factory.getbasetemp() / "babyruntime")


def run(*args, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "mixcli", *args],
        capture_output=True,
        cwd=ROOT,
        timeout=240,
        env={**os.environ, **(env or {})},
        **kw,
    )


def one_error_line(r, code: int, fragment: str) -> None:
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    assert r.returncode == code, err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert "Traceback" not in err


def gen(baby, *extra):
    return ["generate", str(baby), "-p", "hello", "-n", "4", "--temp", "0", "-t", "1", *extra]


def test_stdout_on_a_full_disk(baby):
    with open("/dev/full", "wb") as full:
        r = subprocess.run(
            [sys.executable, "-m", "mixcli", *gen(baby)], stdout=full, stderr=subprocess.PIPE, cwd=ROOT, timeout=240
        )
    one_error_line(r, 1, "cannot write the output: No space left on device")


def test_a_closed_pipe_ends_quietly(baby):
    p = subprocess.Popen(
        [sys.executable, "-m", "mixcli", *gen(baby, "-n", "50")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    p.stdout.close()  # the reader is gone before the first token: every write meets EPIPE
    err = p.stderr.read().decode()
    assert p.wait(timeout=240) in (0, 141) and err == "", err


def test_non_utf8_prompt_is_refused():
    r = subprocess.run(
        [sys.executable.encode(), b"-m", b"mixcli", b"generate", b"nonexistent-model", b"-p", b"caf\xe9"],
        capture_output=True,
        cwd=ROOT,
        timeout=240,
    )
    one_error_line(r, 2, "--prompt is not valid UTF-8")


def test_mixcli_home_that_is_a_file(baby, tmp_path):
    f = tmp_path / "home-file"
    f.write_text("not a directory")
    one_error_line(run(*gen(baby), env={"MIXCLI_HOME": str(f)}), 2, f"MIXCLI_HOME={f} is not a directory")
    one_error_line(run("models", env={"MIXCLI_HOME": str(f)}), 2, "is not a directory")


def test_threads_zero_means_all_cores_and_below_is_refused(baby):
    ok = run(*gen(baby, "-t", "0"))
    assert ok.returncode == 0 and ok.stdout, ok.stderr
    assert run(*gen(baby, "-t", "1")).stdout == ok.stdout  # the same text: 0 is a thread count, not a new mode
    one_error_line(run(*gen(baby, "-t", "-2")), 2, "--threads must be 0 (all physical cores) or more, got -2")


def test_empty_max_memory_is_refused(baby):
    one_error_line(run(*gen(baby, "--max-memory", "")), 2, "cannot read the memory size ''")


def test_ctrl_c_while_importing_is_quiet():
    """SIGINT lands while typer is still being imported (seen through -X importtime's log)."""
    p = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "mixcli", "models"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    seen = []
    for line in p.stderr:
        seen.append(line)
        if "| typer." in line or "|   click" in line or "| click" in line:
            p.send_signal(signal.SIGINT)
            break
    rest = p.stderr.read()
    code = p.wait(timeout=60)
    lines = [x for x in (rest.splitlines()) if not x.startswith("import time:")]
    assert any("typer" in x or "click" in x for x in seen)
    assert code == 130 and lines == ["error: interrupted"], (code, lines)

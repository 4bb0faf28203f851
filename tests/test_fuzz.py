"""The mutation fuzzer of tests/fuzzing.py, seeded, a few hundred cases: every mutated manifest,
damaged data file and mutated GGUF header ends in success or one clean error line, with no signal,
no hang, no runaway memory, and nothing left behind. benchmarks/fuzz.py runs thousands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CASES = {"manifest": 150, "data": 40, "gguf": 130}


def _fuzz(tmp_path, *args):
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(TESTS / "fuzzing.py"), "--work", str(tmp_path / "fuzz"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=TESTS.parent,
    )


def test_every_mutated_input_ends_cleanly(tmp_path):
    r = _fuzz(tmp_path, "--seed", "21", "--json", *(x for k, n in CASES.items() for x in (f"--{k}", str(n))))
    assert r.stdout.strip(), r.stderr[-2000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    for kind, n in CASES.items():
        counts = report[kind]["counts"]
        assert sum(counts.values()) == n
        assert report[kind]["bad"] == [], (kind, report[kind]["bad"][:5])
        # the campaign exercises both outcomes: some mutations are harmless, most are refused
        assert counts.get("clean", 0) > n // 2, (kind, counts)
        assert counts.get("ok", 0) >= 1, (kind, counts)
    assert r.returncode == 0


def test_the_harness_sees_signals_hangs_and_stray_exceptions(tmp_path):
    """A segfault, a hang and a traceback in a case are each counted as unclean, not lost."""
    code = f"""
import os, signal, sys, time, json
sys.path.insert(0, {str(TESTS)!r})
import fuzzing
from pathlib import Path
out = {{}}
for name, body in [("segv", lambda k, d: os.kill(os.getpid(), signal.SIGSEGV)),
                   ("hang", lambda k, d: time.sleep(30)),
                   ("raise", lambda k, d: {{}}["x"]),
                   ("refuse", lambda k, d: (_ for _ in ()).throw(__import__("mixcli.errors").errors.MixcliError("bad", "fix"))),
                   ("fine", lambda k, d: "ok")]:
    fuzzing.case_body = body
    out[name] = fuzzing.run_in_child("manifest", Path("."), timeout=3)
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["segv"] == ["signal", "SIGSEGV"]
    assert got["hang"][0] == "hang"
    assert got["raise"][0] == "exception" and "KeyError" in got["raise"][1]
    assert got["refuse"] == ["clean", "MixcliError: bad (fix)"]
    assert got["fine"] == ["ok", "ok"]

"""`--act` / $MIXCLI_ACT: the activation arithmetic of the quantized matrix products is a user's
choice on every command that runs a model (generate, chat, bench, perplexity).

What is checked: the CLI's perplexity under ``--act MODE`` equals llama.cpp's method computed
independently from ``mixcli.load(..., act=MODE).logits``, so the flag really selects the
arithmetic; the modes are different arithmetic on every host (their perplexities differ);
``bench --json`` reports the mode and the instruction-set tier it ran; a misspelt mode or tier, by
flag or by environment variable, is one usage line and exit 2 before any model is opened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mixcli import kernels
from test_bench_perplexity import baby, reference_perplexity, run_cli, text  # noqa: F401  (fixtures)


def test_perplexity_under_each_mode_equals_its_reference(baby, text, tmp_path, capsys):  # noqa: F811
    model, tokjson = baby
    f = tmp_path / "text.txt"
    f.write_text(text, encoding="utf-8")
    got = {}
    for act in kernels.ACT_MODES:
        code, out, err = run_cli(capsys, "perplexity", model, f, "--ctx", 32, "--chunks", 3, "--act", act, "--json")
        assert code == 0, err
        got[act] = json.loads(out)["ppl"]
        ref = reference_perplexity(model, tokjson, text, 32, max_chunks=3, act=act)[0]
        assert got[act] == pytest.approx(ref, rel=1e-6), act
    assert len(set(got.values())) == len(got), got  # three arithmetics, three figures
    assert got["int8x2"] == pytest.approx(got["f32"], rel=1e-3)  # two levels stay close to exact
    assert abs(got["int8"] - got["f32"]) > abs(got["int8x2"] - got["f32"])


def test_bench_json_reports_the_mode_and_tier(baby, capsys):  # noqa: F811
    code, out, err = run_cli(capsys, "bench", baby[0], "--pp", 8, "--tg", 2, "--reps", 1, "--act", "f32", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["activations"] == "f32" and res["isa"] == kernels.host_tiers()[0]


def test_forced_tier_runs_and_is_reported(baby):  # noqa: F811
    env = {**os.environ, "MIXCLI_ISA": "generic"}
    r = subprocess.run(
        [sys.executable, "-m", "mixcli", "generate", str(baby[0]), "-p", "hi", "-n", "2", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    timings = json.loads(r.stdout)["timings"]
    assert (timings["isa"], timings["activations"]) == ("generic", "int8x2")


def test_bad_or_unrunnable_tier_is_a_usage_error(baby):  # noqa: F811
    bad = [("avx3", "must be one of avx512vnni, avxvnni, avx2, generic, got 'avx3'")]
    missing = [t for t in kernels.TIERS if t not in kernels.host_tiers()]
    if missing:  # a tier this CPU lacks is refused by name instead of dying with SIGILL
        bad.append((missing[0], "this CPU cannot execute it"))
    for name, msg in bad:
        env = {**os.environ, "MIXCLI_ISA": name}
        r = subprocess.run(
            [sys.executable, "-m", "mixcli", "generate", str(baby[0]), "-p", "hi", "-n", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 2 and r.stdout == ""
        assert msg in r.stderr and r.stderr.startswith("error: $MIXCLI_ISA") and len(r.stderr.strip().splitlines()) <= 2


def test_bad_act_flag_is_a_usage_error(baby, capsys):  # noqa: F811
    for args in (["generate", baby[0], "-p", "hi", "--act", "int4"], ["bench", baby[0], "--act", "fp8"]):
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and out == ""
        assert (
            err.startswith("error: --act must be one of int8x2, int8, f32, got ") and len(err.strip().splitlines()) == 1
        )


def test_bad_environment_mode_is_a_usage_error(baby):  # noqa: F811
    env = {**os.environ, "MIXCLI_ACT": "int4"}
    r = subprocess.run(
        [sys.executable, "-m", "mixcli", "generate", str(baby[0]), "-p", "hi", "-n", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "error: $MIXCLI_ACT must be one of int8x2, int8, f32, got 'int4'"

"""`--act` / $MIXCLI_ACT: the activation arithmetic of the quantized matrix products is a user's
choice on every command that runs a model (generate, chat, bench, perplexity).

What is checked: the CLI's perplexity under ``--act MODE`` equals llama.cpp's method computed
independently from ``mixcli.load(...).logits`` with the kernels bound for that MODE, so the flag
really selects the arithmetic; the modes are different arithmetic (their perplexities differ);
``bench --json`` reports the mode it ran; a misspelt mode, by flag or by environment variable, is
one usage line and exit 2 before any model is opened.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mixcli import kernels
from test_bench_perplexity import baby, reference_perplexity, run_cli, text  # noqa: F401  (fixtures)


@pytest.fixture
def restore_mode():
    """The CLI binds the kernels process-wide; later tests get the default back."""
    yield
    kernels.set_activation_mode()


def test_perplexity_under_each_mode_equals_its_reference(baby, text, tmp_path, capsys, restore_mode):  # noqa: F811
    model, tokjson = baby
    f = tmp_path / "text.txt"
    f.write_text(text, encoding="utf-8")
    got = {}
    for act in kernels.ACT_MODES:
        code, out, err = run_cli(capsys, "perplexity", model, f, "--ctx", 32, "--chunks", 3, "--act", act, "--json")
        assert code == 0, err
        got[act] = json.loads(out)["ppl"]
        kernels.set_activation_mode(act)
        ref = reference_perplexity(model, tokjson, text, 32, max_chunks=3)[0]
        kernels.set_activation_mode()
        assert got[act] == pytest.approx(ref, rel=1e-6), act
    if not kernels.HAS_VNNI:  # the int8 paths need AVX-512 VNNI: every mode runs as f32
        assert len(set(got.values())) == 1, got
        return
    assert len(set(got.values())) == len(got), got  # three arithmetics, three figures
    assert got["int8x2"] == pytest.approx(got["f32"], rel=1e-3)  # two levels stay close to exact
    assert abs(got["int8"] - got["f32"]) > abs(got["int8x2"] - got["f32"])


def test_bench_json_reports_the_mode(baby, capsys, restore_mode):  # noqa: F811
    code, out, err = run_cli(capsys, "bench", baby[0], "--pp", 8, "--tg", 2, "--reps", 1, "--act", "f32", "--json")
    assert code == 0, err
    assert json.loads(out)["activations"] == "f32"


def test_bad_act_flag_is_a_usage_error(baby, capsys, restore_mode):  # noqa: F811
    for args in (["generate", baby[0], "-p", "hi", "--act", "int4"], ["bench", baby[0], "--act", "fp8"]):
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and out == ""
        assert err.startswith("error: --act must be one of int8x2, int8, f32, got ") and len(err.strip().splitlines()) == 1


def test_bad_environment_mode_is_a_usage_error(baby):  # noqa: F811
    env = {**os.environ, "MIXCLI_ACT": "int4"}
    r = subprocess.run([sys.executable, "-m", "mixcli", "generate", str(baby[0]), "-p", "hi", "-n", "1"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "error: $MIXCLI_ACT must be one of int8x2, int8, f32, got 'int4'"

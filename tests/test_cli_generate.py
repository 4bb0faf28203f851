"""`mixcli generate` end to end: in-process (mixcli.cli.main, and typer's CliRunner) and as a real
subprocess (``python -m mixcli``), on a baby Mixtral with a real tokenizer and chat template
(tests/babyruntime.py). stdout must carry only the text (or one JSON object); every bad input is
one ``error:`` line on stderr, a non-zero exit code from mixcli.errors, and an empty stdout.

All runs use ``-t 1``: a model this small is dominated by thread hand-offs, which collapse when
the CI machine's two cores are shared with other work.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numba
import pytest

import babyruntime
from mixcli.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE

ROOT = Path(__file__).resolve().parent.parent
MODES = ["inproc", "subprocess"]


@pytest.fixture(scope="module")
def baby(tmp_path_factory) -> Path:
    return babyruntime.baby_chat_model(tmp_path_factory.getbasetemp() / "babyruntime")


@pytest.fixture(scope="module")
def raising(tmp_path_factory) -> Path:
    """The same baby, but its chat template raises on every conversation."""
    return babyruntime.baby_chat_model(
        tmp_path_factory.getbasetemp() / "babyruntime", name="baby-raising", template=babyruntime.RAISING
    )


@pytest.fixture(autouse=True)
def _keep_numba_threads():
    """In-process runs set numba's thread count (-t 1); give the other tests theirs back."""
    n = numba.get_num_threads()
    yield
    numba.set_num_threads(n)


class Run:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"Run(code={self.code}, out={self.out[:200]!r}, err={self.err[-400:]!r})"

    def one_line_error(self, code: int, *fragments: str) -> None:
        """The failure contract: exit code, nothing on stdout, exactly one `error:` line on stderr."""
        assert self.code == code, self
        assert self.out == "", self
        lines = self.err.strip("\n").split("\n")
        assert len(lines) == 1 and lines[0].startswith("error: "), self
        assert "Traceback" not in self.err
        for f in fragments:
            assert f in lines[0], (f, self)


def run_cli(mode: str, args: list[str], capsys=None, stdin: bytes | None = None, monkeypatch=None) -> Run:
    if mode == "subprocess":
        p = subprocess.run(
            [sys.executable, "-m", "mixcli", *args],
            input=stdin if stdin is not None else b"",
            capture_output=True,
            cwd=ROOT,
            timeout=300,
        )
        return Run(p.returncode, p.stdout.decode("utf-8"), p.stderr.decode("utf-8"))
    from mixcli.cli import main

    capsys.readouterr()
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = main(list(args))
    cap = capsys.readouterr()
    return Run(code, cap.out, cap.err)


@pytest.fixture
def cli(capsys, monkeypatch):
    def call(mode, *args, stdin=None):
        return run_cli(mode, list(args), capsys, stdin, monkeypatch)

    return call


def gen_args(model: Path, *extra: str) -> list[str]:
    return ["generate", str(model), "-t", "1", *extra]


# ---- success paths -----------------------------------------------------------------------------
GREEDY = ("--temp", "0")


def test_text_is_deterministic_and_json_is_one_object(cli, baby):
    """In-process: greedy text repeats; --json is one object whose text is exactly what the plain
    run printed, and whose usage counts the templated prompt (OpenAI's field names)."""
    plain = cli("inproc", *gen_args(baby, "--prompt", "Hello there", *GREEDY, "-n", "12"))
    assert plain.code == 0, plain
    assert plain.out.strip() and "error" not in plain.err, plain
    again = cli("inproc", *gen_args(baby, "--prompt", "Hello there", *GREEDY, "-n", "12"))
    assert again.out == plain.out

    js = cli("inproc", *gen_args(baby, "--prompt", "Hello there", *GREEDY, "-n", "12", "--json"))
    assert js.code == 0, js
    obj = json.loads(js.out)  # the whole of stdout is one JSON document
    assert js.out.endswith("}\n") and js.out.count("\n") == 1
    assert obj["text"] == plain.out  # so the plain run put nothing but the text on stdout
    assert obj["finish_reason"] in ("stop", "length")
    usage = obj["usage"]
    from mixcli.runtime import load_runtime

    rt = load_runtime(str(baby), ctx=64, threads=1)
    want_prompt, _ = rt.chat_prompt([{"role": "user", "content": "Hello there"}])
    assert usage["prompt_tokens"] == len(want_prompt)
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if obj["finish_reason"] == "length":
        assert usage["completion_tokens"] == 12
    t = obj["timings"]
    for key in ("prefill_tokens_per_second", "decode_tokens_per_second", "time_to_first_token"):
        assert key in t and t[key] >= 0
    assert t["prefill_tokens_per_second"] > 0
    # the text is the detokenized completion: re-encoding it gives back about as many tokens
    assert abs(len(rt.tokenizer.encode(obj["text"])) - usage["completion_tokens"]) <= 3


def test_subprocess_stdout_is_only_the_text(cli, baby):
    """A real process: stdout is byte for byte the text --json reports; --stats goes to stderr."""
    ref = json.loads(cli("inproc", *gen_args(baby, "--prompt", "Hello there", *GREEDY, "-n", "12", "--json")).out)
    r = cli("subprocess", *gen_args(baby, "--prompt", "Hello there", *GREEDY, "-n", "12", "--stats"))
    assert r.code == 0, r
    assert r.out == ref["text"]
    assert "tok/s" in r.err and "error" not in r.err


def test_subprocess_json(cli, baby):
    r = cli("subprocess", *gen_args(baby, "--prompt", "Hello there", *GREEDY, "-n", "6", "--json"))
    assert r.code == 0, r
    obj = json.loads(r.out)
    assert set(obj) >= {"text", "finish_reason", "usage", "timings"}
    assert obj["usage"]["completion_tokens"] <= 6 and obj["usage"]["prompt_tokens"] > 0
    assert obj["timings"]["decode_tokens_per_second"] >= 0


@pytest.mark.parametrize("mode", MODES)
def test_stdin_prompt_equals_flag_prompt(cli, baby, mode):
    text = "Hello there, café ☕ 中文\nsecond line"
    a = cli("inproc", *gen_args(baby, "--prompt", text, *GREEDY, "-n", "10"))
    b = cli(mode, *gen_args(baby, "--prompt", "-", *GREEDY, "-n", "10"), stdin=text.encode("utf-8"))
    assert a.code == b.code == 0, (a, b)
    assert a.out == b.out and a.out


@pytest.mark.parametrize("mode", MODES)
def test_stop_string_ends_output_and_is_not_printed(cli, baby, mode):
    args = gen_args(baby, "--prompt", "Tell me something", *GREEDY, "-n", "40")
    text = json.loads(cli("inproc", *args, "--json").out)["text"]
    assert len(text) > 16, text
    stop = text[8:12]
    cut = text.find(stop)
    assert 0 <= cut <= 8
    if mode == "inproc":
        obj = json.loads(cli(mode, *args, "--json", "--stop", stop, "--stop", "never-in-this-output-\u2603").out)
        assert obj["text"] == text[:cut]
        assert obj["finish_reason"] == "stop"
    plain = cli(mode, *args, "--stop", stop)
    assert plain.code == 0 and plain.out == text[:cut], plain


def test_seed_makes_sampling_reproducible(cli, baby):
    args = (
        "--prompt",
        "Once upon a time",
        "--temp",
        "1.0",
        "--top-k",
        "0",
        "--top-p",
        "1",
        "--min-p",
        "0",
        "-n",
        "30",
        "--json",
    )
    a = json.loads(cli("inproc", *gen_args(baby, *args, "--seed", "7")).out)["text"]
    b = json.loads(cli("inproc", *gen_args(baby, *args, "--seed", "7")).out)["text"]
    c = json.loads(cli("subprocess", *gen_args(baby, *args, "--seed", "7")).out)["text"]
    d = json.loads(cli("inproc", *gen_args(baby, *args, "--seed", "8")).out)["text"]
    assert a == b == c
    assert a != d


def test_raw_mode_skips_the_template(cli, baby):
    js = cli("inproc", *gen_args(baby, "--prompt", "Hello there", "--raw", *GREEDY, "-n", "4", "--json"))
    from mixcli.runtime import load_runtime

    rt = load_runtime(str(baby), ctx=64, threads=1)
    assert json.loads(js.out)["usage"]["prompt_tokens"] == len(rt.raw_prompt("Hello there"))


def test_typer_cli_runner(baby):
    """The Typer app itself, through typer's test runner."""
    from typer.testing import CliRunner

    from mixcli import cli as cli_mod

    cli_mod._register()
    res = CliRunner().invoke(cli_mod.app, gen_args(baby, "--prompt", "Hello there", *GREEDY, "-n", "5", "--json"))
    assert res.exit_code == 0, res.output
    obj = json.loads(res.stdout)
    assert obj["usage"]["completion_tokens"] <= 5 and isinstance(obj["text"], str)
    bad = CliRunner().invoke(cli_mod.app, gen_args(baby, "--prompt", "x", "--top-k", "many"))
    assert bad.exit_code == EXIT_USAGE


def test_a_command_module_that_fails_to_import_fails_loudly():
    """A bug that breaks `import mixcli.commands.chat` must not quietly remove `mixcli chat`: the
    CLI exits non-zero with the import error in a traceback (a bug, not a user error)."""
    code = (
        "import sys; sys.modules['mixcli.commands.chat'] = None\n"  # the import now raises ImportError
        "from mixcli.cli import main; sys.exit(main(['--help']))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert p.returncode != 0
    assert "ModuleNotFoundError" in p.stderr and "mixcli.commands.chat" in p.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "mixcli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "COLUMNS": "200"},
    )
    assert ok.returncode == 0 and " chat " in ok.stdout  # the same line with the module intact lists chat


def test_truncate_keeps_the_end_of_a_long_prompt(cli, baby):
    long = "hello world " * 200
    r = cli("inproc", *gen_args(baby, "--prompt", long, "--ctx", "64", "--truncate", "-n", "5", *GREEDY, "--json"))
    assert r.code == 0, r
    obj = json.loads(r.out)
    assert obj["usage"]["prompt_tokens"] + obj["usage"]["completion_tokens"] <= 64
    assert "truncated" in r.err


def test_sigint_exits_130(baby):
    """Ctrl-C during a long generation: exit code 130, no traceback."""
    p = subprocess.Popen(
        [sys.executable, "-m", "mixcli", *gen_args(baby, "--prompt", "Hello there", *GREEDY, "-n", "4000")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert p.stdout.read(1)  # generation has started
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == EXIT_INTERRUPTED, err
    assert err.decode().strip() == "error: interrupted"
    assert "Traceback" not in err.decode()


# ---- bad input: one line on stderr, nothing on stdout, the documented exit code ----------------
@pytest.mark.parametrize("mode", MODES)
def test_unknown_model_suggests_close_names(cli, mode):
    r = cli(mode, "generate", "mixtrl-8x7b-instruct", "--prompt", "hi")
    r.one_line_error(EXIT_ERROR, "unknown model 'mixtrl-8x7b-instruct'", "did you mean", "mixtral-8x7b-instruct")


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_dir_is_not_a_converted_model(cli, baby, mode):
    checkpoint = baby.parent / "baby-chat-src" / "hf"  # the HF checkpoint the baby was converted from
    r = cli(mode, "generate", str(checkpoint), "--prompt", "hi")
    r.one_line_error(EXIT_ERROR, "is not a converted model", "mixcli convert")


def test_other_paths_are_not_converted_models(cli, tmp_path):
    cli("inproc", "generate", str(tmp_path), "--prompt", "hi").one_line_error(EXIT_ERROR, "is not a converted model")
    (tmp_path / "file.bin").write_bytes(b"x")
    r = cli("inproc", "generate", str(tmp_path / "file.bin"), "--prompt", "hi")
    r.one_line_error(EXIT_ERROR, "not a converted model directory")


@pytest.mark.parametrize("mode", MODES)
def test_prompt_longer_than_context(cli, baby, mode):
    r = cli(mode, *gen_args(baby, "--prompt", "hello world " * 200, "--ctx", "64"))
    r.one_line_error(EXIT_USAGE, "the context holds 64", "--truncate")


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(cli, baby, prompt):
    cli("inproc", *gen_args(baby, "--prompt", prompt)).one_line_error(EXIT_USAGE, "empty")
    cli("inproc", *gen_args(baby, "--prompt", "-"), stdin=prompt.encode()).one_line_error(EXIT_USAGE, "empty")


def test_empty_stdin_subprocess(cli, baby):
    cli("subprocess", *gen_args(baby, "--prompt", "-"), stdin=b"").one_line_error(EXIT_USAGE, "empty")


@pytest.mark.parametrize(
    "flags, what, sub",
    [
        (["--temp", "-1"], "temperature", True),
        (["--temp", "nan"], "temperature", False),
        (["--top-p", "0"], "top_p", False),
        (["--top-p", "1.5"], "top_p", True),
        (["--min-p", "2"], "min_p", False),
        (["--top-k", "-3"], "top_k", False),
        (["--max-tokens", "-1"], "--max-tokens", False),
        (["--ctx", "0"], "--ctx", False),
        (["--raw", "--system", "be brief"], "--system", False),
    ],
)
def test_invalid_flag_values(cli, baby, flags, what, sub):
    for mode in MODES if sub else MODES[:1]:
        cli(mode, *gen_args(baby, "--prompt", "hi", *flags)).one_line_error(EXIT_USAGE, what)


@pytest.mark.parametrize("mode", MODES)
def test_stdin_not_utf8(cli, baby, mode):
    r = cli(mode, *gen_args(baby, "--prompt", "-"), stdin=b"caf\xe9 \xff\xfe")
    r.one_line_error(EXIT_USAGE, "not UTF-8", "byte 3")


def test_stdin_closed(baby):
    p = subprocess.run(
        [sys.executable, "-m", "mixcli", *gen_args(baby, "--prompt", "-")],
        capture_output=True,
        cwd=ROOT,
        timeout=300,
        stdin=subprocess.DEVNULL,
        preexec_fn=lambda: os.close(0),
    )
    Run(p.returncode, p.stdout.decode(), p.stderr.decode()).one_line_error(EXIT_USAGE, "stdin is closed")


@pytest.mark.parametrize("mode", MODES)
def test_template_that_raises(cli, raising, mode):
    r = cli(mode, *gen_args(raising, "--prompt", "hi"))
    r.one_line_error(EXIT_ERROR, "chat template", "this template refuses every conversation")
    if mode == "inproc":
        ok = cli(mode, *gen_args(raising, "--prompt", "hi", "--raw", "-n", "3"))  # --raw never renders it
        assert ok.code == 0, ok


@pytest.mark.parametrize("args", [["--temp", "abc"], ["--bogus-flag"]])
def test_unparsable_flags_are_one_line(cli, baby, args):
    """Typer/click's own parse errors follow the house style too: one line, exit 2."""
    cli("subprocess", *gen_args(baby, "--prompt", "hi", *args)).one_line_error(EXIT_USAGE, "mixcli generate --help")


@pytest.mark.parametrize("where", ["front", "back"])
def test_debug_shows_the_traceback(cli, where):
    args = ["generate", "/no/such/model", "--prompt", "hi"]
    args = ["--debug", *args] if where == "front" else [*args, "--debug"]
    r = cli("subprocess", *args)
    assert r.code != 0 and "Traceback" in r.err and "unknown model" in r.err

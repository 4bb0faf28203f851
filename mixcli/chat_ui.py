"""What `mixcli chat` shows: rich rendering for mixcli.chat.Repl, nothing else.

Answers and command output go to stdout; notices, hints and errors to stderr (errors as one
``error: ...`` line, as everywhere in mixcli). Colour follows rich's rules (off when the output is
not a terminal, or with NO_COLOR set).
"""

from __future__ import annotations

import sys

from rich.console import Console


class ChatUI:
    def __init__(self, out: Console | None = None, err: Console | None = None):
        self.out = out or Console(highlight=False, soft_wrap=True)
        self.err = err or Console(stderr=True, highlight=False, soft_wrap=True)
        self._at_line_start = True

    # ---- plain messages --------------------------------------------------------------------------
    def _print(self, console: Console, text: str, style: str | None = None) -> None:
        from .progress import wrap_for  # between words at a terminal's width; a path stays whole

        console.print(wrap_for(console.file, text), style=style, markup=False, highlight=False, emoji=False)

    def banner(self, session) -> None:
        m = session.model
        threads = f"{m.threads} thread{'s' if m.threads != 1 else ''}"
        self._print(self.out, f"mixcli chat · {session.rt.name} · context {m.ctx} tokens · {threads}", "bold")
        self._print(self.out, "/help for commands, Ctrl-C stops an answer, Ctrl-D or /exit leaves", "dim")
        if session.system:
            self._print(self.out, f"system: {session.system}", "dim")

    def goodbye(self, after_eof: bool = False) -> None:
        if after_eof:  # Ctrl-D leaves the cursor after the prompt
            self.out.print()
        self._print(self.out, "bye", "dim")

    def info(self, text: str) -> None:
        self._print(self.out, text)

    def hint(self, text: str) -> None:
        self._print(self.err, text, "dim")

    def notice(self, text: str) -> None:
        self._print(self.err, f"note: {text}", "yellow")

    def error(self, text: str) -> None:
        self.err.print(f"error: {text}", style="red", markup=False, highlight=False, emoji=False, soft_wrap=True)

    def show_conversation(self, session) -> None:
        """After /load: the conversation, one line per message (long ones shortened)."""
        for msg in session.conversation():
            text = " ".join(msg["content"].split())
            if len(text) > 100:
                text = text[:97] + "..."
            self._print(self.out, f"  {msg['role']}: {text}", "dim")

    # ---- an answer -------------------------------------------------------------------------------
    def start_answer(self) -> None:
        self._at_line_start = True

    def stream(self, text: str) -> None:
        self.out.print(text, end="", style="cyan", markup=False, highlight=False, emoji=False, soft_wrap=True)
        self.out.file.flush()
        self._at_line_start = text.endswith("\n")

    def end_answer(self, finish: str | None, stats, session) -> None:
        """Close the answer's line and show its numbers: tokens, speed, prompt reuse, context."""
        if not self._at_line_start:
            self.out.print()
            self._at_line_start = True
        if stats is None:
            return
        from .ui import answer_footer

        self._print(self.out, answer_footer(session.model, stats, finish), "dim")


def stdin_is_terminal() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False

"""One look for long work (convert, pull, perplexity, the first-run kernel compile), wherever it
is started.

On a terminal: a rich bar on stderr with bytes or items, the rate and the time left, gone when the
work ends. Anywhere else (a pipe, a log file, ``TERM=dumb``): sparse plain lines, one per quarter
of the work and at least every ``PLAIN_EVERY_S`` seconds, so a log shows that work went on without
a thousand redraws. stdout is never touched. Importing this module loads only the standard
library; rich is imported when a bar is first shown, so the kernel code can call
``compile_notice`` for free.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

Say = Callable[[str], None]
# convert's callback: (tensor name, tensors done, tensors total, source bytes done, source bytes total)
ConvertCallback = Callable[[str, int, int, int, int], None]

COMPILE_MESSAGE = (
    "compiling kernels for this CPU (first run only)..."  # = kernels.COMPILE_NOTICE (no numba import here)
)
PLAIN_EVERY_S = 30.0  # a plain line at least this often while work goes on, between quarter marks

_compile_noticed = False


def say_stderr(line: str) -> None:
    """A notice on stderr: on a terminal wrapped between words to its width, never inside a word
    (a path or a name longer than the line stays one piece for the terminal to wrap, and to copy
    whole); elsewhere the line as it is. While a bar is live it appears above the bar."""
    try:
        stream = sys.stderr
        print(wrap_for(stream, line), file=stream, flush=True)
    except (OSError, ValueError, AttributeError):  # stderr closed or gone: a notice is not worth an error
        pass


def wrap_for(stream, text: str) -> str:
    """``text`` wrapped between words for ``stream`` when it is a terminal, else unchanged."""
    import os

    try:
        if not stream.isatty() or os.environ.get("TERM") == "dumb":
            return text
        width = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return text
    return "\n".join(_fill(line, width) for line in text.split("\n"))


def _fill(line: str, width: int) -> str:
    """One line filled to ``width``; continuation lines keep an indented line's second column
    ("  /save FILE      write ..." continues under "write")."""
    import re
    import textwrap

    if len(line) <= width:
        return line
    column = re.match(r"\s+\S+(?: \S+)*\s{2,}", line) if line[:1].isspace() else None
    indent = " " * (column.end() if column else len(line) - len(line.lstrip()))
    return textwrap.fill(
        line,
        width,
        subsequent_indent=indent if len(indent) < width // 2 else "",
        break_long_words=False,
        break_on_hyphens=False,
    )


def compile_notice(message: str = COMPILE_MESSAGE) -> None:
    """Say once per process, on stderr, that numba is about to compile (a first run waits tens of
    seconds otherwise in silence). Nothing goes to stdout, so piped output stays exact."""
    global _compile_noticed
    if _compile_noticed:
        return
    _compile_noticed = True
    say_stderr(message)


def _stderr_is_live_terminal(console) -> bool:
    """A bar needs a terminal that moves the cursor; TERM=dumb gets the plain lines."""
    return console.is_terminal and not console.is_dumb_terminal


def format_bytes(n: float) -> str:
    """Decimal units, as download tools and rich's DownloadColumn show them."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """The progress of one piece of long work: ``completed`` of ``total`` bytes (``unit="bytes"``)
    or items (``unit`` is then their name, e.g. "chunks"), optionally with a count of something
    else beside it (``count_unit``; convert: bytes on the bar, "12/272 tensors" beside it).

    Use as a context manager; ``update`` may be called from any thread. ``say`` receives the plain
    lines when stderr is not a terminal (default: stderr)."""

    def __init__(
        self,
        label: str,
        *,
        unit: str = "bytes",
        total: float | None = None,
        count_unit: str | None = None,
        say: Say | None = None,
    ):
        self.label = label
        self.unit = unit
        self.count_unit = count_unit
        self.total = total
        self.completed = 0.0
        self.count: tuple[int, int] | None = None
        self._say = say or say_stderr
        self._lock = threading.Lock()
        self._bar = None  # rich.progress.Progress while live on a terminal
        self._task = None
        self._start = time.monotonic()
        self._last_line_t = self._start
        self._last_quarter = -1
        self._first: tuple[float, float] | None = None  # (time, completed) of the first update: the rate's origin

    # ---- lifetime --------------------------------------------------------------------------------
    def __enter__(self) -> Progress:
        from rich.console import Console

        console = Console(file=sys.stderr)  # the real stream: sys.stderr becomes _AboveBar while the bar is live
        self._start = self._last_line_t = time.monotonic()
        if _stderr_is_live_terminal(console):
            self._bar = self._make_bar(console)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, count="")
            self._stderr, sys.stderr = sys.stderr, _AboveBar(console, sys.stderr)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            sys.stderr.flush()
            sys.stderr = self._stderr
            self._bar.stop()
            self._bar = None

    # ---- updates ---------------------------------------------------------------------------------
    def update(self, completed: float, total: float | None = None, *, count: tuple[int, int] | None = None) -> None:
        with self._lock:
            self.completed = completed
            if total is not None:
                self.total = total
            if count is not None:
                self.count = count
            if self._first is None:
                self._first = (time.monotonic(), completed)
            if self._bar is not None:
                fields = {"count": self._count_text()} if count is not None else {}
                self._bar.update(self._task, completed=completed, total=self.total, **fields)
            else:
                self._maybe_plain_line()

    def _count_text(self) -> str:
        return f"{self.count[0]}/{self.count[1]} {self.count_unit}" if self.count else ""

    def _fraction(self) -> float | None:
        return min(self.completed / self.total, 1.0) if self.total else None

    def _maybe_plain_line(self) -> None:
        now = time.monotonic()
        frac = self._fraction()
        quarter = int(4 * frac) if frac is not None and self.completed > 0 else -1  # no "0%" line: nothing yet
        if quarter > self._last_quarter or now - self._last_line_t >= PLAIN_EVERY_S:
            self._last_quarter = max(quarter, self._last_quarter)
            self._last_line_t = now
            self._say(self.plain_line(now))

    def plain_line(self, now: float) -> str:
        """``converting: 25% (26.0 MB/103.7 MB, 68/272 tensors, 12.3 MB/s, 0:06 left)``; the rate
        is measured from the first update, so time spent opening does not count as slow work."""
        frac = self._fraction()
        amount = (
            f"{format_bytes(self.completed)}/{format_bytes(self.total)}"
            if self.unit == "bytes" and self.total
            else format_bytes(self.completed)
            if self.unit == "bytes"
            else f"{self.completed:.0f}/{self.total:.0f} {self.unit}"
            if self.total
            else f"{self.completed:.0f} {self.unit}"
        )
        parts = [amount]
        if self.count:
            parts.append(self._count_text())
        t0, c0 = self._first or (now, self.completed)
        if now > t0 and self.completed > c0:
            rate = (self.completed - c0) / (now - t0)
            parts.append(f"{format_bytes(rate)}/s" if self.unit == "bytes" else f"{rate:.1f} {self.unit}/s")
            if frac is not None and frac < 1:
                parts.append(f"{_format_seconds((self.total - self.completed) / rate)} left")
        head = f"{self.label}: {100 * frac:.0f}%" if frac is not None else f"{self.label}:"
        return f"{head} ({', '.join(parts)})"

    # ---- the terminal bar ------------------------------------------------------------------------
    def _make_bar(self, console):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        if self.unit == "bytes":
            amount, rate = [DownloadColumn()], [TransferSpeedColumn()]
        else:
            amount = [MofNCompleteColumn(), TextColumn(self.unit)]
            rate = [_item_rate_column(self.unit)]
        # the bar takes what the text leaves of the width (10..40 columns): one line even at 80
        bar_width = max(10, min(40, console.width - 58))
        return RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=bar_width),
            *amount,
            *([TextColumn("{task.fields[count]}")] if self.count_unit else []),
            *rate,
            TimeRemainingColumn(compact=True),
            console=console,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
            refresh_per_second=8,
        )


def _item_rate_column(unit: str):
    from rich.progress import ProgressColumn
    from rich.text import Text

    class ItemRateColumn(ProgressColumn):
        """``3.2 chunks/s``: rich's TransferSpeedColumn for things that are not bytes."""

        def __init__(self, unit: str):
            super().__init__()
            self.unit = unit

        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:.1f} {self.unit}/s", style="progress.data.speed")

    return ItemRateColumn(unit)


class _AboveBar:
    """sys.stderr while a bar is live: whole lines are printed above the bar, wrapped as
    say_stderr wraps them (rich's own redirection folds a long path at the bar's width)."""

    def __init__(self, console, real):
        self._console = console
        self._real = real
        self._pending = ""

    def write(self, s: str) -> int:
        from rich.text import Text

        self._pending += s
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._console.print(Text(wrap_for(self._real, line)), soft_wrap=True, highlight=False)
        return len(s)

    def flush(self) -> None:
        if self._pending:
            self.write("\n")

    def __getattr__(self, name):  # fileno, isatty, encoding...: the real stream's
        return getattr(self._real, name)


@contextmanager
def convert_progress(label: str = "converting", *, say: Say | None = None) -> Iterator[ConvertCallback]:
    """The bar `mixcli convert` and every pull share: source bytes on the bar, tensors beside it.
    Yields the callback quant's converters take."""
    with Progress(label, unit="bytes", count_unit="tensors", say=say) as bar:

        def callback(name: str, done: int, total: int, bytes_done: int, bytes_total: int) -> None:
            bar.update(bytes_done, bytes_total, count=(done, total))

        yield callback


@contextmanager
def follow_size(bar: Progress, directory: Path, every_s: float = 0.25) -> Iterator[None]:
    """While the block runs, set ``bar``'s completed bytes to the largest file under ``directory``
    (a download another program writes there, e.g. pip's)."""
    stop = threading.Event()

    def largest() -> int:
        best = 0
        for p in directory.rglob("*"):
            try:
                best = max(best, p.stat().st_size) if p.is_file() else best
            except OSError:  # renamed or removed between listing and stat
                pass
        return best

    def run() -> None:
        while not stop.wait(every_s):
            size = largest()
            if size:
                bar.update(size, max(bar.total or 0, size) if bar.total else None)

    thread = threading.Thread(target=run, name="follow-size", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()

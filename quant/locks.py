"""One writer per output: an ``fcntl.flock`` on a hidden ``.NAME.lock`` beside the output.

A lock dies with its process (the kernel drops it), so a crash never leaves a directory locked;
the file itself is removed by the holder on release and, after a crash, by the next locker or
``quant.leftovers.sweep``. Because a releasing holder unlinks the file, a locker checks after
locking that the path still names the file it locked, and otherwise tries again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path


class Busy(RuntimeError):
    """Another process holds the lock; ``holder`` is its PID (None if unknown)."""

    def __init__(self, path: Path, holder: int | None):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is locked by process {holder}")


def lock_path(target: Path, kind: str = "") -> Path:
    return target.parent / f".{target.name}{'.' + kind if kind else ''}.lock"


def _holder(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or "x")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def exclusive(
    target: str | os.PathLike,
    *,
    kind: str = "",
    wait: bool = False,
    on_wait: Callable[[int | None], None] | None = None,
) -> Iterator[Path]:
    """Hold the lock of ``target`` (a path that may not exist yet). Busy if another process holds
    it, unless ``wait``: then ``on_wait(holder)`` is called once and this blocks until it is free."""
    path = lock_path(Path(target), kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                os.close(fd)
                raise Busy(Path(target), holder) from None
            if on_wait is not None:
                on_wait(holder)
                on_wait = None
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)

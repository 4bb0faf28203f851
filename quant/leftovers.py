"""Remove what an interrupted mixcli left beside its outputs, once the process that made it is gone.

Every temporary mixcli makes beside an output is named ``.NAME.KIND-PID-START[-...]``: KIND is
``partial`` (a conversion being written), ``old`` (a replaced model awaiting removal), ``download``
(a pull's download) or ``tmp`` (an atomically replaced file), PID and START (the process's start
time in clock ticks since boot, /proc/PID/stat field 22) name the process that owns it. A SIGKILL,
an OOM kill or a power cut skips Python's clean-up; the next convert, pull or model load sweeps
the directory: an entry whose process no longer runs (no such PID, or a PID reused by a process
started at another time) is removed, and the space freed is reported. An ``old`` entry whose model
is missing (killed between the two renames of a replacement) is renamed back instead.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

LEFTOVER_RE = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>partial|old|download|tmp)-(?P<pid>\d+)(?:-(?P<start>\d+))?(?:-.*)?$"
)
LOCK_RE = re.compile(r"^\..+\.lock$")


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22; the name in (...) may hold spaces
    except (ValueError, IndexError):
        return None


def process_tag() -> str:
    """``PID-START`` of this process, for the names of its temporaries."""
    return f"{os.getpid()}-{start_ticks(os.getpid()) or 0}"


def owner_alive(pid: int, start: int | None) -> bool:
    """Whether the process that named a temporary still runs (a name without START: its PID runs)."""
    now = start_ticks(pid)
    return now is not None and (start is None or start == 0 or now == start)


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _stale_lock(path: Path) -> bool:
    """A lock file nobody holds (its holder died): take it for a moment and remove it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            path.unlink()
            return True
    except OSError:
        pass
    finally:
        os.close(fd)
    return False


def sweep(directory: str | os.PathLike, notify: Callable[[str], None] | None = None) -> int:
    """Remove the leftovers of dead mixcli processes in ``directory``; the bytes freed."""
    directory = Path(directory)
    try:
        entries = list(directory.iterdir())
    except OSError:  # missing or unreadable: nothing of ours can be there
        return 0
    freed, removed, restored = 0, 0, []
    for entry in entries:
        m = LEFTOVER_RE.match(entry.name)
        if m is None:
            if LOCK_RE.match(entry.name) and entry.is_file():
                _stale_lock(entry)
            continue
        if owner_alive(int(m["pid"]), int(m["start"]) if m["start"] else None):
            continue
        target = directory / m["name"]
        try:
            if m["kind"] == "old" and not (target.exists() or target.is_symlink()):
                os.replace(entry, target)  # killed mid-replacement: the old model is the only one
                restored.append(m["name"])
                continue
            size = _size(entry)
            _remove(entry)
        except OSError:
            continue
        freed += size
        removed += 1
    if notify is not None:
        if removed:
            notify(
                f"note: removed {removed} leftover{'s' if removed > 1 else ''} of interrupted mixcli runs in "
                f"{directory} ({freed / 1e6:.1f} MB freed)"
            )
        for name in restored:
            notify(f"note: restored {directory / name}, which an interrupted replacement had moved aside")
    return freed

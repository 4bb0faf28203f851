"""`mixcli batch`'s output: JSONL lines appended as results arrive, and what ``--resume`` finds.

Durability policy: each line is one ``os.write`` of the whole line (newline included) on a file
opened with O_APPEND, so a line is in the kernel's page cache, whole, as soon as its prompt is
done: a killed job (Ctrl-C, SIGKILL, a crashed driver) keeps every finished line. ``fsync`` runs
at most once per ``FSYNC_EVERY_S`` and when the job ends, so a power loss costs at most the last
second of results while fast jobs are not slowed by a disk flush per line. A line cut short
(a full disk, power lost mid-write) can only be the last one; ``--resume`` cuts it off and runs
that prompt again.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .batch_input import id_key
from .errors import MixcliError, UsageError

FSYNC_EVERY_S = 1.0


@dataclass
class ExistingOutput:
    """What an earlier run left in the output file."""

    done: set[str] = field(default_factory=set)  # id keys with a line (a result or an error)
    errors: int = 0  # of those, lines with an "error" field
    torn_bytes: int = 0  # a last line without its newline (cut off before resuming)


def scan_output(path: Path) -> ExistingOutput:
    """Ids already answered in ``path`` (missing file: none). A malformed line that is not the
    last one means the file is not one `mixcli batch` wrote: refused rather than appended to."""
    out = ExistingOutput()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return out
    except OSError as exc:
        raise MixcliError(f"cannot read {path}: {exc.strerror}") from None
    body, _, tail = raw.rpartition(b"\n")
    if tail:
        out.torn_bytes = len(tail)  # the last line's write did not finish
    for n, data in enumerate(body.split(b"\n") if body else [], start=1):
        if not data.strip():
            continue
        try:
            obj = json.loads(data)
            ident = obj["id"]
        except (ValueError, TypeError, KeyError):
            raise UsageError(
                f"{path}:{n} is not an output line of mixcli batch",
                "--resume appends to a file this command wrote; move the file away or pick another -o",
            ) from None
        out.done.add(id_key(ident))
        if "error" in obj:
            out.errors += 1
    return out


class ResultWriter:
    """Appends one JSON object per line to ``path`` (see the module docstring for the policy)."""

    def __init__(self, path: Path, *, cut_tail: int = 0):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if cut_tail:
            os.ftruncate(self.fd, os.fstat(self.fd).st_size - cut_tail)
        self._synced = time.monotonic()
        self.lines = 0

    def write(self, obj: dict) -> None:
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:  # a regular file takes it in one call; a short write is continued, never dropped
            view = view[os.write(self.fd, view) :]
        self.lines += 1
        now = time.monotonic()
        if now - self._synced >= FSYNC_EVERY_S:
            os.fsync(self.fd)
            self._synced = now

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

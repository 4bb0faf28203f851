"""Replace a file all at once: write a hidden temporary beside it, fsync, rename over it.

A failure at any point (disk full, EIO, Ctrl-C) leaves the previous version of the file intact and
removes the temporary; only a SIGKILL or power loss between write and rename can leave a
``.NAME.tmp-PID-START`` behind, which ``quant.leftovers`` recognises and removes on a later run.
"""

from __future__ import annotations

import os
from pathlib import Path


def temp_sibling(path: Path, kind: str = "tmp") -> Path:
    """``.NAME.KIND-PID-START`` beside ``path``: the leftover pattern quant.leftovers sweeps."""
    from .leftovers import process_tag

    return path.parent / f".{path.name}.{kind}-{process_tag()}"


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not every filesystem lets a directory be fsynced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path

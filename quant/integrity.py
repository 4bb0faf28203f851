"""Tensor checksums that mean something: stream every tensor through sha256 and compare with the
manifest, but only when the data could have changed since the last time they matched.

After a full check passes, a stamp (size, mtime and inode of manifest.json and of each data file)
is written atomically into the model directory (``formats.STAMP_NAME``). Opening a model whose
files still match the stamp skips the hashing, so an unchanged model starts as fast as before;
a copied, edited, re-downloaded or truncated-and-regrown file changes the stamp and the next open
hashes everything again. ``mixcli verify`` ignores the stamp. A model directory we cannot write
(a read-only store) is simply verified on every open.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .formats import MANIFEST_NAME, STAMP_NAME

HASH_THREADS = max(1, min(4, os.cpu_count() or 1))  # hashlib releases the GIL on large buffers
_STAMP_VERSION = 1


def file_stamps(model_dir: Path, manifest: dict[str, Any]) -> dict[str, list[int]]:
    """{file name: [size, mtime_ns, inode]} for manifest.json and every data file."""
    out = {}
    for name in [MANIFEST_NAME, *(f["name"] for f in manifest["files"])]:
        st = os.stat(model_dir / name)
        out[name] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


def stamp_matches(model_dir: Path, manifest: dict[str, Any]) -> bool:
    """True when the stamp on disk was written for exactly these files as they are now."""
    try:
        stamp = json.loads((model_dir / STAMP_NAME).read_text(encoding="utf-8"))
        return stamp.get("version") == _STAMP_VERSION and stamp.get("files") == file_stamps(model_dir, manifest)
    except (OSError, ValueError, AttributeError):
        return False


def write_stamp(model_dir: Path, manifest: dict[str, Any]) -> bool:
    """Record that the files as they are now passed the check; False where the directory is read-only."""
    body = {"version": _STAMP_VERSION, "files": file_stamps(model_dir, manifest)}
    try:
        write_atomic(model_dir / STAMP_NAME, (json.dumps(body) + "\n").encode())
        return True
    except OSError:
        return False


def remove_stamp(model_dir: Path) -> None:
    try:
        (model_dir / STAMP_NAME).unlink()
    except OSError:
        pass


def verify_tensors(
    manifest: dict[str, Any],
    buffer_of: Callable[[str], Any],
    progress: Callable[[str, int], None] | None = None,
    threads: int = HASH_THREADS,
) -> list[str]:
    """Hash every tensor of a (checked) manifest; the names whose sha256 differs, in file order.
    ``buffer_of(file name)`` gives the data file's bytes (a memoryview-able buffer: a map or the
    bytes read into memory); ``progress(name, nbytes)`` is called as each tensor finishes."""
    tensors = manifest["tensors"]
    order = sorted(tensors, key=lambda n: (tensors[n]["file"], tensors[n]["offset"]))  # sequential reads
    views = {f["name"]: memoryview(buffer_of(f["name"])).cast("B") for f in manifest["files"] if f["size"]}

    def digest(name: str) -> bool:
        t = tensors[name]
        h = hashlib.sha256()
        if t["nbytes"]:
            h.update(views[t["file"]][t["offset"] : t["offset"] + t["nbytes"]])
        return h.hexdigest() == t["sha256"]

    bad = []
    with concurrent.futures.ThreadPoolExecutor(max(1, threads), "mixcli-verify") as pool:
        for name, ok in zip(order, pool.map(digest, order)):
            if not ok:
                bad.append(name)
            if progress is not None:
                progress(name, tensors[name]["nbytes"])
    return bad

"""Reads an expert's contiguous [w1 | w3 | w2] region from a model's data file into a buffer we own.

One sequential ``preadv`` per region (in chunks when the caller may abandon it), with O_DIRECT
where the filesystem allows it, else buffered and then POSIX_FADV_DONTNEED so the page cache does
not hold a second copy. Why not ``madvise(WILLNEED)`` on the mapping: cold, the ways read an
expert at about disk speed (benchmarks/expert_cache.py), so control decides: a read into our own
buffer finishes at a known moment, holds exactly the bytes we count and cannot be evicted behind
our back. ``preadv`` releases the GIL, so a read overlaps the kernels' compute.
"""

from __future__ import annotations

import errno
import os
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .errors import MixcliError

PAGE = 4096
READ_CHUNK = 8 << 20  # an abandonable read checks every 8 MiB whether it is still wanted


class ExpertLoadError(MixcliError):
    """An expert's weights could not be read from the model's data file."""


class _DirectUnsupported(Exception):
    """O_DIRECT reads are refused here (EINVAL): fall back to buffered reads."""


def pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """One positioned read into buf; returns bytes read (0 at end of file). Releases the GIL."""
    return os.preadv(fd, [buf], offset)


def _close_all(*fd_maps: dict[str, int]) -> None:
    for fds in fd_maps:
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        fds.clear()


class ExpertReader:
    """Open descriptors on a model's data files; ``read`` fills a page-aligned buffer."""

    def __init__(self, model_dir: Path, files: Iterable[str], *, direct: bool = True, drop_page_cache: bool = True):
        self.model_dir = Path(model_dir)
        self.drop_page_cache = drop_page_cache
        self._fds: dict[str, int] = {}
        self._dfds: dict[str, int] = {}  # O_DIRECT descriptors: no page-cache copy at all
        self._finalizer = weakref.finalize(self, _close_all, self._fds, self._dfds)
        for fname in sorted(set(files)):
            try:
                self._fds[fname] = os.open(self.model_dir / fname, os.O_RDONLY)
            except OSError as exc:
                self.close()
                raise ExpertLoadError(
                    f"cannot open {self.model_dir / fname}: {exc.strerror}", "check that the model directory is intact"
                ) from None
        if direct and hasattr(os, "O_DIRECT"):
            for fname in self._fds:
                try:
                    self._dfds[fname] = os.open(self.model_dir / fname, os.O_RDONLY | os.O_DIRECT)
                except OSError:  # e.g. tmpfs: buffered reads plus DONTNEED instead
                    _close_all(self._dfds)
                    break

    @property
    def direct(self) -> bool:
        """Whether reads bypass the page cache (O_DIRECT)."""
        return bool(self._dfds)

    def read(
        self,
        key: tuple[int, int],
        file: str,
        offset: int,
        nbytes: int,
        buf: np.ndarray,
        stale: Callable[[], bool] | None = None,
        count: Callable[[int], None] | None = None,
    ) -> bool:
        """Read expert key = (layer, expert)'s region (file, offset, nbytes) into buf [>= nbytes]
        u1, page-aligned. ``stale``: asked between chunks; True abandons the read (returns
        False). ``count(n)``: told of every n bytes read. An ExpertLoadError names the expert."""
        dfd = self._dfds.get(file)
        if dfd is not None:
            try:
                return self._read_with(dfd, True, key, file, offset, nbytes, buf, stale, count)
            except _DirectUnsupported:
                _close_all(self._dfds)
        return self._read_with(self._fds[file], False, key, file, offset, nbytes, buf, stale, count)

    def _read_with(self, fd, direct, key, file, offset, nbytes, buf, stale, count) -> bool:
        # O_DIRECT moves whole pages: read up to the page end (buffers are page multiples)
        span = min(len(buf), (nbytes + PAGE - 1) // PAGE * PAGE) if direct else nbytes
        view = memoryview(buf)[:span]
        pos = 0
        try:
            while pos < nbytes:
                end = min(span, pos + READ_CHUNK) if stale is not None else span
                try:
                    got = pread_into(fd, view[pos:end], offset + pos)
                except OSError as exc:
                    if direct and exc.errno == errno.EINVAL and pos == 0:
                        raise _DirectUnsupported() from None
                    raise
                if got <= 0:
                    raise ExpertLoadError(
                        f"{self.model_dir / file} ends at byte {offset + pos}, inside expert {key[1]} of layer {key[0]}",
                        "the file was truncated or replaced; re-convert the model",
                    )
                got = min(got, nbytes - pos)
                pos += got
                if count is not None:
                    count(got)
                if stale is not None and pos < nbytes and stale():
                    return False
        except OSError as exc:
            raise ExpertLoadError(
                f"reading expert {key[1]} of layer {key[0]} from {self.model_dir / file} failed: {exc.strerror or exc}",
                "check that the model directory is intact and the disk readable",
            ) from None
        finally:
            if self.drop_page_cache and pos and not direct:
                try:
                    os.posix_fadvise(fd, offset, pos, os.POSIX_FADV_DONTNEED)
                except OSError:
                    pass  # advice only
        return True

    def close(self) -> None:
        self._finalizer()

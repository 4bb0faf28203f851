"""Private anonymous memory for weights, on transparent huge pages where the kernel gives them.

Why: decode streams every weight once per token. On 4 KiB pages that is a TLB miss every 64
cache lines, and the hardware prefetchers stop at every page boundary; on 2 MiB pages neither
happens. ``benchmarks/load_mode.py`` compares the two (benchmarks/RESULTS.md, "Load modes").

Linux gives anonymous memory huge pages only where asked in its common "madvise" THP mode, and
only for pages not yet touched: MAP_POPULATE would fault 4 KiB pages in before the advice could
be given. So the mapping is made bare, advised (MADV_HUGEPAGE), then populated in the kernel with
MADV_POPULATE_WRITE, which is also faster than MAP_POPULATE's 4 KiB faults. Where a step is
unsupported (THP compiled out, a kernel before 5.14, not Linux) the memory is the same, only on
smaller pages or faulted later.

The one cost: on a VM that returns free memory to its host (virtio-balloon free page reporting),
fresh huge pages fault in on the host, several times slower than 4 KiB ones. ``--mmap`` starts at
once there, and the page cache keeps its own large folios between runs.
"""

from __future__ import annotations

import errno
import mmap

MADV_POPULATE_WRITE = 23  # Linux 5.14+; Python's mmap module does not name it


def anonymous(size: int, populate: bool = False) -> mmap.mmap:
    """A private anonymous mapping of ``size`` bytes advised for huge pages; ``populate`` faults
    every page in now (raising OSError ENOMEM when there is no memory for it) instead of on first
    write. Other errors (mmap's own) propagate."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    buf = mmap.mmap(-1, size, flags=flags)
    madvise = getattr(buf, "madvise", None)
    if madvise is None:  # no madvise on this platform
        return buf
    try:
        madvise(mmap.MADV_HUGEPAGE)
        huge = True
    except (AttributeError, OSError):  # THP compiled out or disabled: 4 KiB pages
        huge = False
    if populate:
        try:
            madvise(MADV_POPULATE_WRITE)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                buf.close()
                raise
            # EINVAL, a kernel before 5.14: huge pages fault in cheaply during the read (one
            # fault per 2 MiB), 4 KiB ones are faster populated up front by MAP_POPULATE than
            # faulted one by one during the read (benchmarks/RESULTS.md, "Load modes")
            if not huge:
                buf.close()
                buf = mmap.mmap(-1, size, flags=flags | getattr(mmap, "MAP_POPULATE", 0))
    return buf

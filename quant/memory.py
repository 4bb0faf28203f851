"""How much memory the host has free for new allocations.

Both halves size themselves by it: the converter's page-cache warm-up (``quant.sources.hf``) and
the runtime's choice between reading a model into memory and mapping it (``mixcli.store``). It
lives in quant because quant never imports mixcli.
"""

from __future__ import annotations

import os


def available_memory() -> int | None:
    """Bytes the kernel reports as available for new allocations (MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None

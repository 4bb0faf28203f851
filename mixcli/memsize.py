"""Memory sizes as people type them: ``12GB``, ``1.5GiB``, ``800M``, ``4096``.

Why both unit families mean powers of two: ``--max-memory`` is compared with RAM, which tools
(``free``, task managers) report in binary units while labelling them GB, so ``16GB`` must mean
what a user with "16 GB of RAM" has. A number with no unit is bytes. ``available_memory`` asks
the kernel how much is free for new allocations, within the cgroup limit (the store's load rule and
the automatic memory budget size themselves by it; the converter uses quant.memory's, cgroup-blind).
"""

from __future__ import annotations

import re

from quant import memory as quant_memory

from .errors import UsageError

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'12GB' -> 12 * 2**30 bytes; raise UsageError naming the value and the accepted forms."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise UsageError(f"memory size must be positive, got {text}", "e.g. --max-memory 12GB")
        return text
    m = _SIZE_RE.match(str(text))
    suffix = m.group(3).lower() if m else ""
    if not m or suffix == "i" or (suffix == "ib" and not m.group(2)):  # "12Gi", "5iB" are not units
        raise UsageError(
            f"cannot read the memory size {text!r}",
            "write a number with an optional unit K, M, G or T (e.g. 12GB, 1.5GiB, 800M)",
        )
    number, unit = float(m.group(1)), m.group(2).lower()
    n = int(number * _UNITS[unit])
    if n <= 0:
        raise UsageError(f"memory size {text!r} is zero", "give a positive size, e.g. --max-memory 12GB")
    return n


def format_size(n: int | float) -> str:
    """Bytes -> '1.50 GiB' (binary units, the ones parse_size reads)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def available_memory() -> int | None:
    """Bytes available for new allocations: MemAvailable capped by the process's cgroup memory
    limit (``memory_budget.available_memory``), None if unknown."""
    from .memory_budget import available_memory as cgroup_aware

    avail = cgroup_aware()
    return avail if avail is not None else quant_memory.available_memory()

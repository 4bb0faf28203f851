"""How much memory this process may use, and the budget a model gets when it does not fit.

Why not just ``MemAvailable``: a container or CI job runs under a cgroup memory limit that
``/proc/meminfo`` (and psutil) do not see; past it the kernel kills the process instead of
swapping. So the room is the smaller of MemAvailable and, for every cgroup from the process's own
up to the root that sets a limit, the limit minus what the group uses that is not page cache
(usage - active_file - inactive_file: the kernel reclaims page cache under the limit, and
MemAvailable counts it as available too; a container whose earlier work left files cached must not
get a smaller budget for it). v2 reads ``memory.max`` /
``memory.current``, v1 ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``; both ``memory.stat``.

Everything here takes the cgroup root and the ``/proc/self/cgroup`` text as arguments, so tests
run it on fake trees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
UNLIMITED_V1 = 1 << 60  # v1 writes "no limit" as a page-rounded 2**63 - 1
FIT_FRACTION = 0.9  # weights + KV cache above this share of the room: budget instead of plain mapping
HEADROOM_FRACTION = 0.1  # of the room, left to Python, numba, buffers and other programs ...
MIN_HEADROOM = 1 << 30  # ... but at least this much


@dataclass(frozen=True)
class CgroupLimit:
    path: Path  # the cgroup directory that sets the limit
    limit: int  # bytes
    usage: int  # bytes charged now, page cache included
    reclaimable: int  # page cache (active and inactive file pages) in that usage

    @property
    def room(self) -> int:
        return max(0, self.limit - max(0, self.usage - self.reclaimable))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path, *keys: str) -> int:
    """The sum of ``keys`` found in a memory.stat file (0 when none is readable)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return 0
    values = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    return sum(values.get(k, 0) for k in keys)


def _chain(mount: Path, rel: str) -> list[Path]:
    """The process's cgroup directory under ``mount`` and its ancestors up to the mount. Inside a
    cgroup namespace the recorded path may not exist under the mount: then the mount itself."""
    rel = rel.strip("/")
    here = mount / rel if rel else mount
    if not here.is_dir():
        return [mount]
    out = [here]
    while here != mount:
        here = here.parent
        out.append(here)
    return out


def cgroup_limits(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> list[CgroupLimit]:
    """Every memory limit that applies to this process (own cgroup first), v1 or v2."""
    if proc_cgroup is None:
        try:
            proc_cgroup = PROC_CGROUP.read_text()
        except OSError:
            return []
    v1_rel = v2_rel = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_rel = parts[2]
        elif "memory" in parts[1].split(","):
            v1_rel = parts[2]
    out = []
    v1_mount = root / "memory"
    if v1_rel is not None and (v1_mount / "memory.limit_in_bytes").exists():  # v1 (or hybrid: v1 has memory)
        for d in _chain(v1_mount, v1_rel):
            limit = _read_int(d / "memory.limit_in_bytes")
            if limit is None or limit >= UNLIMITED_V1:
                continue
            usage = _read_int(d / "memory.usage_in_bytes") or 0
            out.append(
                CgroupLimit(d, limit, usage, _stat(d / "memory.stat", "total_active_file", "total_inactive_file"))
            )
        return out
    if v2_rel is not None:
        for d in _chain(root, v2_rel):
            limit = _read_int(d / "memory.max")  # absent at the root, "max" where unlimited
            if limit is None:
                continue
            usage = _read_int(d / "memory.current") or 0
            out.append(CgroupLimit(d, limit, usage, _stat(d / "memory.stat", "active_file", "inactive_file")))
    return out


def meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(
    root: Path = CGROUP_ROOT, proc_cgroup: str | None = None, meminfo: Path = Path("/proc/meminfo")
) -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by every cgroup limit's room."""
    rooms = [c.room for c in cgroup_limits(root, proc_cgroup)]
    avail = meminfo_available(meminfo)
    if avail is not None:
        rooms.append(avail)
    return min(rooms) if rooms else None


def auto_budget(model_bytes: int, kv_bytes: int, available: int | None) -> int | None:
    """The memory budget (weights + KV cache) for a model that would not fit, or None: it fits in
    FIT_FRACTION of ``available`` (plain mapping does no harm) or the room is unknown. The budget
    leaves HEADROOM_FRACTION (at least MIN_HEADROOM) of the room to everything else."""
    if available is None or model_bytes + kv_bytes <= FIT_FRACTION * available:
        return None
    return max(0, available - max(MIN_HEADROOM, int(HEADROOM_FRACTION * available)))

"""Benchmark: does this disk read expert-sized regions faster with more reads in flight?

    python benchmarks/read_depth.py [--file PATH] [--experts 16] [--configs 1x100,4x100,8x4]

The expert cache reads a missed Mixtral expert (about 100 MB) as one O_DIRECT ``preadv`` (in
8 MiB chunks when the read may be abandoned), one expert at a time. A cloud disk often gives more
with a deeper queue, so this reads ``--experts`` 100 MB regions of a file (by default a scratch
file of random bytes, big enough that no region is read twice: a virtual disk's host may cache
what was read), each split over T threads
reading C MiB per call, for each "TxC" in --configs, and prints GB/s. Configurations alternate
over distinct regions, and the first is repeated last: the spread between those two rows is the
disk's own variation.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host

EXPERT = 100 << 20  # bytes: one Mixtral-8x7B expert at Q4_0 is 99.1 MB


def scratch(path: Path, size: int) -> None:
    """Random bytes (a disk that skips zero blocks would flatter itself), synced to disk."""
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        for _ in range(size // (128 << 20)):
            f.write(rng.integers(0, 256, 128 << 20, dtype=np.uint8).tobytes())
        f.flush()
        os.fsync(f.fileno())


def read_rate(fd: int, size: int, first: int, experts: int, threads: int, chunk: int) -> float:
    """GB/s reading ``experts`` expert regions from region index ``first`` on, each split over
    ``threads`` threads that read ``chunk`` bytes per preadv into page-aligned buffers."""
    part = EXPERT // threads
    bufs = [memoryview(mmap.mmap(-1, part)) for _ in range(threads)]
    offs = [((first + i) * EXPERT) % (size - EXPERT) // 4096 * 4096 for i in range(experts)]

    def worker(j: int, off: int) -> None:
        pos = 0
        while pos < part:
            n = min(chunk, part - pos)
            os.preadv(fd, [bufs[j][pos : pos + n]], off + j * part + pos)
            pos += n

    t0 = time.perf_counter()
    for off in offs:
        pool = [threading.Thread(target=worker, args=(j, off)) for j in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    return experts * EXPERT / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=None, help="read this file (default: a scratch file)")
    ap.add_argument("--experts", type=int, default=16, help="expert regions read per configuration")
    ap.add_argument("--configs", default="1x100,1x8,2x100,4x100,4x8,8x4,16x2", help="THREADSxMIB_PER_CALL, ...")
    a = ap.parse_args()
    configs = [tuple(int(v) for v in c.split("x")) for c in a.configs.split(",")]
    configs.append(configs[0])
    tmp = None
    path = a.file
    if path is None:
        tmp = Path(tempfile.mkdtemp(prefix="read-depth-", dir=os.environ.get("TMPDIR", "/var/tmp")))
        path = tmp / "scratch.bin"
        scratch(path, (a.experts * len(configs) * EXPERT + (128 << 20)) // (128 << 20) * (128 << 20))
    try:
        size = path.stat().st_size
        if size < 2 * EXPERT:
            raise SystemExit(f"{path} is too small: at least {2 * EXPERT} bytes")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            print(host.describe())
            print(f"O_DIRECT reads of {a.experts} x {EXPERT >> 20} MiB regions of {path} ({size / 2**30:.1f} GiB)")
            print("| threads per expert | MiB per call | GB/s |\n|---|---|---|")
            first = 0
            for threads, mib in configs:
                rate = read_rate(fd, size, first, a.experts, threads, mib << 20)
                first += a.experts
                print(f"| {threads} | {mib} | {rate:.2f} |", flush=True)
        finally:
            os.close(fd)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

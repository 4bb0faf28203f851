"""What checksum verification costs: hashing throughput, and the open time of an unchanged model.

    python benchmarks/verify.py [--layers 1] [--reps 5] [--dir /tmp/mixcli-verify-bench]

Writes a random model of real Mixtral width (benchmarks/synth.py; 1 layer is ~0.9 GB) and
measures, with the files mapped (``load="mmap"``, how a 26 GB model is opened):

- open, no verification (``verify=False``: what opening cost before checksums existed);
- open of an unchanged model (``verify=True``, the stamp matches: no hashing);
- open after a change (the stamp no longer matches: every tensor hashed), with the files in the
  page cache ("warm") and evicted from it first with POSIX_FADV_DONTNEED ("cold": the disk).

Prints a table and the full-size figure extrapolated from the measured MB/s (26 GB / MB/s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixcli.store import open_model_dir
from quant import integrity
from synth import write_random_model

FULL_SIZE = 26e9  # Mixtral-8x7B at q4_0 with 8-bit embedding and head


def evict(model: Path) -> None:
    for f in model.glob("weights-*.bin"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn, reps: int, before=None) -> list[float]:
    out = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mixcli-verify-bench"))
    a = ap.parse_args()
    model = a.dir / f"mixtral-width-{a.layers}l"
    if not (model / "manifest.json").is_file():
        write_random_model(model, num_hidden_layers=a.layers)
    size = sum(f.stat().st_size for f in model.glob("weights-*.bin"))
    open_model_dir(model, load="mmap")  # stamped (the writer stamps too)

    def unstamp():
        integrity.remove_stamp(model)

    hashed = max(2, a.reps // 2)
    rows = [  # (what, seconds, hashes everything)
        (
            "open, verify=False (as before checksums)",
            timed(lambda: open_model_dir(model, load="mmap", verify=False), a.reps),
            False,
        ),
        ("open, unchanged model (stamp matches)", timed(lambda: open_model_dir(model, load="mmap"), a.reps), False),
        (
            "open after a change, files in page cache",
            timed(lambda: open_model_dir(model, load="mmap"), hashed, unstamp),
            True,
        ),
        (
            "open after a change, files evicted (disk)",
            timed(lambda: open_model_dir(model, load="mmap"), hashed, lambda: (unstamp(), evict(model))),
            True,
        ),
    ]
    print(
        f"model: {model} ({size / 1e9:.2f} GB of data files), hash threads: {integrity.HASH_THREADS}, "
        f"median of {a.reps} (2+ for the hashing rows)"
    )
    print(f"| {'what':<44} | {'median s':>9} | {'min s':>7} | {'MB/s':>6} | {'26 GB extrapolated':>18} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 9}|{'-' * 8}|{'-' * 20}|")
    for what, ts, hashing in rows:
        med = statistics.median(ts)
        rate = f"{size / 1e6 / med:6.0f}" if hashing else "      "
        full = f"{FULL_SIZE / (size / med):16.0f} s" if hashing else f"{'':>18}"
        print(f"| {what:<44} | {med:9.4f} | {min(ts):7.4f} | {rate} | {full} |")


if __name__ == "__main__":
    main()

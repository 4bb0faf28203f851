"""Benchmark: the two ways a tier can run a row-tiled matmul, on this host, side by side.

    python benchmarks/prefill_tile.py [--tier NAME] [--tokens 1,2,3,4,8,16,64,256] [--runs 5]

"packed": the lane-per-token tile (``tiles.make_ptile``) from ``act.PACK_MIN`` virtual tokens
on; "few": the decode tile over ``few_tokens`` tokens at a time (``tiles.make_itile(tokens=...)``).
Which one a tier uses is its ``packed_prefill`` switch; this script builds both variants of the
host's best tier (or --tier) and times each on the shapes that matter: the default model's MLP
([1536, 576] q4_1r16: a batched decode step of several sequences) and a Mixtral expert
([14336, 4096] q4_0r16: prefill), in both int8 activation modes. T = 1 is the matvec driver.
Prints microseconds per call and per token; the tier's current choice is marked.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import host
from matvec import _parts
from mixcli.kernels import int8, isa
from mixcli.kernels.table import _int8_pair

SHAPES = (("q4_1r16", 1536, 576), ("q4_0r16", 14336, 4096))


def variants(name: str) -> dict:
    """{"packed": tier, "few": tier}: the host tier with ``packed_prefill`` forced each way (own
    names, so numba's disk cache keeps their drivers apart)."""
    base = isa.tier(name)
    out = {}
    for label, packed in (("packed", True), ("few", False)):
        cls = type(
            f"{type(base).__name__}_{label}", (type(base),), {"name": f"{name}-{label}", "packed_prefill": packed}
        )
        t = cls.__new__(cls)
        t.__dict__.update(base.__dict__)
        out[label] = t
    return out, base.packed_prefill


def time_call(fn, runs: int, min_s: float = 0.05) -> float:
    """Median seconds per call over `runs` passes of enough calls to last min_s."""
    fn()
    t = time.perf_counter()
    fn()
    reps = max(1, int(min_s / max(time.perf_counter() - t, 1e-7)))
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        ts.append((time.perf_counter() - t) / reps)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tier", default=None, help="instruction-set tier (default: the host's best)")
    ap.add_argument("--tokens", default="1,2,3,4,8,16,64,256")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    name = args.tier or isa.host_tiers()[0]
    tiers, packed_now = variants(name)
    Ts = [int(t) for t in args.tokens.split(",")]
    print(host.describe())
    print(f"tier {name}; it uses the {'packed' if packed_now else 'few'} tile now (*); us per call (us per token)")
    print("| shape | act | tile | " + " | ".join(f"T={T}" for T in Ts) + " |")
    print("|---|---|---|" + "---|" * len(Ts))
    rng = np.random.default_rng(0)
    for qtype, n, k in SHAPES:
        parts = _parts(qtype, n, k, rng)
        for levels, act in ((2, "int8x2"), (1, "int8")):
            for label, t in tiers.items():
                mv, mm = _int8_pair(
                    int8.driver(t, qtype, "mv", levels), int8.driver(t, qtype, "mm", levels), len(parts), levels
                )
                cells = []
                for T in Ts:
                    X = rng.standard_normal((T, k)).astype(np.float32)
                    out = np.empty((T, n), np.float32)
                    if T == 1:
                        s = time_call(lambda mv=mv, X=X, out=out: mv(*parts, X[0], out[0]), args.runs)
                    else:
                        s = time_call(lambda mm=mm, X=X, out=out: mm(*parts, X, out), args.runs)
                    cells.append(f"{s * 1e6:.0f} ({s * 1e6 / T:.0f})")
                mark = "*" if (label == "packed") == packed_now else ""
                print(f"| [{n}, {k}] {qtype} | {act} | {label}{mark} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

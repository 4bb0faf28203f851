"""Throughput of the matrix kernels: G weights/s for decode (matvec), G weight-token MAC/s for
prefill (matmul), numba against its numpy twin.

Decode is memory-bandwidth bound, so each case cycles through enough copies of the matrix
(>= 128 MiB) that it streams from DRAM, not from the 32 MiB L3, as a real model's weights do.
Each figure is the median (and best) of several timed passes after a JIT warm-up.

    python benchmarks/matvec.py [--runs 7] [--quick] [--types q4_0r16,q4_kr16,q6_k,q5_k] [--tables avx2:int8x2,avx2:f32]

--tables: the kernel tables to measure side by side (instruction-set tier : activation mode);
default: the host's best tier in both int8 modes, and the f32 mode.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import host
from mixcli import kernels
from mixcli.kernels import ref as kernels_ref
from quant.formats import QUANT_TYPES, interleave_rows

STREAM_BYTES = 128 << 20


def _parts(qtype: str, n: int, k: int, rng) -> list[np.ndarray]:
    """Kernel arguments of a random [N, K] matrix (quantizing a real one is slow; random parts
    have the same layout and cost)."""
    if qtype in ("q6_k", "q5_k"):  # GGUF super-blocks of random bytes, finite fp16 scales
        ns = k // 256
        sup = (rng.standard_normal((n, ns)) * 0.01).astype(np.float16)
        if qtype == "q6_k":  # ql, qh, sc, d
            return [
                rng.integers(0, 256, (n, ns * 128), dtype=np.uint8),
                rng.integers(0, 256, (n, ns * 64), dtype=np.uint8),
                rng.integers(-128, 128, (n, ns * 16), dtype=np.int8),
                sup,
            ]
        return [
            rng.integers(0, 256, (n, ns * 128), dtype=np.uint8),
            rng.integers(0, 256, (n, ns * 32), dtype=np.uint8),
            rng.integers(0, 256, (n, ns * 12), dtype=np.uint8),
            sup,
            sup.copy(),
        ]  # qs, qh, s, d, m
    if qtype.endswith("r16"):
        base = qtype[:-3]
        names = QUANT_TYPES[base].parts
        return list(interleave_rows(dict(zip(names, _parts(base, n, k, rng))), base).values())
    nb = k // 32
    d = (rng.standard_normal((n, nb)) * 0.01).astype(np.float16)
    if qtype == "q4_0":
        return [rng.integers(0, 256, (n, k // 2), dtype=np.uint8), d]
    if qtype == "q4_1":
        return [rng.integers(0, 256, (n, k // 2), dtype=np.uint8), d, d.copy()]
    if qtype == "q8_0":
        return [rng.integers(-127, 128, (n, k), dtype=np.int8), d]
    if qtype == "q4_k":  # qs, s (codes), d, m (super-scales)
        sup = (rng.standard_normal((n, -(-nb // 8))) * 0.5).astype(np.float16)
        return [
            rng.integers(0, 256, (n, k // 2), dtype=np.uint8),
            rng.integers(0, 256, (n, 2 * nb), dtype=np.uint8),
            sup,
            sup.copy(),
        ]
    return [rng.standard_normal((n, k)).astype(np.float16)]


def _time(fn, mats, runs: int) -> tuple[float, float]:
    """(median, best) seconds per call over `runs` passes through every copy."""
    fn(mats[0])
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        for m in mats:
            fn(m)
        ts.append((time.perf_counter() - t) / len(mats))
    return float(np.median(ts)), float(np.min(ts))


@numba.njit(parallel=True, fastmath=True, cache=True)
def _stream_sum(a):
    """A plain streaming read: the ceiling decode can reach (sum of [R, C] uint64, rows in parallel)."""
    s = np.zeros(a.shape[0], np.uint64)
    for r in numba.prange(a.shape[0]):
        acc = np.uint64(0)
        for c in range(a.shape[1]):
            acc += a[r, c]
        s[r] = acc
    return s.sum()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="one shape, fewer runs")
    ap.add_argument("--types", default="", help="comma-separated storage types to run (default: all)")
    ap.add_argument(
        "--tables", default="", help="comma-separated TIER:MODE kernel tables (default: best tier, 3 modes)"
    )
    a = ap.parse_args()
    best = kernels.host_tiers()[0]
    specs = (
        [t.split(":") for t in a.tables.split(",")] if a.tables else [[best, "int8x2"], [best, "int8"], [best, "f32"]]
    )
    tables = [kernels.select(isa, act) for isa, act in specs]
    only = set(filter(None, a.types.split(",")))
    pick = (lambda ts: [t for t in ts if t in only]) if only else (lambda ts: list(ts))
    rng = np.random.default_rng(0)
    shapes = [(14336, 4096)] if a.quick else [(14336, 4096), (4096, 14336)]
    threads = [t for t in (1, 2) if t <= numba.config.NUMBA_NUM_THREADS]
    rows = []
    print(f"host: {host.describe()}")
    print(
        f"numba {numba.__version__}, tables: {', '.join(t.label for t in tables)}, "
        f"threads available {numba.config.NUMBA_NUM_THREADS}"
    )
    # (row-major q4_k has only the f32-activation kernels: not a decode path worth a row here)
    for qtype in pick(("q4_0", "q4_0r16", "q4_1", "q4_1r16", "q4_kr16", "q6_k", "q5_k", "q8_0", "q8_0r16", "f16")):
        for n, k in shapes:
            one = _parts(qtype, n, k, rng)
            nbytes = sum(p.nbytes for p in one)
            copies = max(1, -(-STREAM_BYTES // nbytes))
            mats = [one] + [[p.copy() for p in one] for _ in range(copies - 1)]
            x = rng.standard_normal(k).astype(np.float32)
            out = np.empty(n, np.float32)
            for tb in tables:
                mv = getattr(tb, f"matvec_{qtype}")
                for th in threads:
                    numba.set_num_threads(th)
                    med, best = _time(lambda m: mv(*m, x, out), mats, a.runs)
                    rows.append(
                        (
                            f"mv {qtype} {tb.label}",
                            f"{n}x{k}",
                            str(th),
                            n * k / med / 1e9,
                            n * k / best / 1e9,
                            nbytes / med / 1e9,
                        )
                    )
            ref = getattr(kernels_ref, f"matvec_{qtype}")
            med, best = _time(lambda m: ref(*m, x, out), mats[:1], 2)
            rows.append(
                (f"numpy twin {qtype}", f"{n}x{k}", "-", n * k / med / 1e9, n * k / best / 1e9, nbytes / med / 1e9)
            )
            del mats
    # memory bandwidth: a plain streaming read of the same 128+ MiB
    big = [rng.integers(0, 1 << 62, (4096, 4096), dtype=np.uint64)]  # 128 MiB, 4x the L3
    for th in threads:
        numba.set_num_threads(th)
        med, best = _time(lambda m: _stream_sum(m), big, a.runs)
        nbytes = big[0].nbytes
        rows.append(
            ("stream read (GB/s)", "128 MiB", str(th), nbytes / med / 1e9, nbytes / best / 1e9, nbytes / med / 1e9)
        )
    del big
    # prefill
    for qtype in pick(("q4_0", "q4_0r16", "q4_kr16", "q6_k", "q5_k", "q8_0", "q8_0r16", "f16")):
        n, k = 14336, 4096
        T = 128
        one = _parts(qtype, n, k, rng)
        X = rng.standard_normal((T, k)).astype(np.float32)
        out = np.empty((T, n), np.float32)
        for tb in tables:
            mm = getattr(tb, f"matmul_{qtype}")
            for th in threads:
                numba.set_num_threads(th)
                med, best = _time(lambda m: mm(*m, X, out), [one], max(3, a.runs // 2))
                rows.append(
                    (
                        f"mm {qtype} T={T} {tb.label}",
                        f"{n}x{k}",
                        str(th),
                        n * k * T / med / 1e9,
                        n * k * T / best / 1e9,
                        0.0,
                    )
                )
        ref = getattr(kernels_ref, f"matmul_{qtype}")
        med, best = _time(lambda m: ref(*m, X, out), [one], 2)
        rows.append((f"numpy twin matmul {qtype}", f"{n}x{k}", "-", n * k * T / med / 1e9, n * k * T / best / 1e9, 0.0))

    head = ("kernel", "N x K", "thr", "G/s median", "G/s best", "GB/s median")
    print(f"{head[0]:<36}{head[1]:>12}{head[2]:>5}{head[3]:>12}{head[4]:>10}{head[5]:>13}")
    for name, shape, th, med, best, gbs in rows:
        print(
            f"{name:<36}{shape:>12}{th:>5}{med:>12.2f}{best:>10.2f}{gbs:>13.2f}"
            if gbs
            else f"{name:<36}{shape:>12}{th:>5}{med:>12.2f}{best:>10.2f}{'':>13}"
        )
    print("matvec rows: G weights/s; matmul rows: G weight-token MAC/s")


if __name__ == "__main__":
    main()

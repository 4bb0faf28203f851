"""Speed measurement by llama-bench's method: pp<N> (prompt processing: N tokens in one prefill
from an empty cache) and tg<M> (text generation: M single-token decode steps), each repeated,
reported as mean and standard deviation of tokens per second. Token ids are random, as in
llama-bench: speed does not depend on what the tokens mean (except through MoE routing, which
random tokens spread like real text)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class BenchRow:
    test: str  # "pp512" or "tg128"
    threads: int
    n_tokens: int
    reps: int
    mean_tps: float
    std_tps: float
    samples: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def bench_pp(model, n: int, reps: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(reps):
        toks = rng.integers(0, model.config.vocab_size, n).tolist()
        model.reset()
        t = time.perf_counter()
        model.prefill(toks)
        out.append(n / (time.perf_counter() - t))
    return out


def bench_tg(model, n: int, reps: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed + 1)
    out = []
    for _ in range(reps):
        toks = rng.integers(0, model.config.vocab_size, n).tolist()
        model.reset()
        t = time.perf_counter()
        for tok in toks:  # llama-bench's test_gen: n single-token steps from an empty cache, all timed
            model.decode(tok)
        out.append(n / (time.perf_counter() - t))
    return out


def run_bench(
    model, *, pp: int, tg: int, reps: int, threads: list[int], warmup: bool = True, progress=None
) -> list[BenchRow]:
    """One row per (test, thread count). A warm-up run first takes JIT compile out of the figures."""
    rows = []
    if warmup:
        bench_pp(model, min(max(pp, 2), 16), 1)
        bench_tg(model, min(max(tg, 2), 4), 1)
    for th in threads:
        model.set_threads(th)
        for name, n, fn in (("pp", pp, bench_pp), ("tg", tg, bench_tg)):
            if n <= 0:
                continue
            s = fn(model, n, reps)
            rows.append(
                BenchRow(
                    f"{name}{n}",
                    model.threads,
                    n,
                    reps,
                    statistics.fmean(s),
                    statistics.stdev(s) if len(s) > 1 else 0.0,
                    s,
                )
            )
            if progress:
                progress(rows[-1])
    return rows

"""Benchmark: prefill of long prompts on the Mixtral-width 2-layer model, mixcli against llama-bench.

    python benchmarks/long_prefill.py [--tokens 512,4096] [--kv-types f16,q8_0] [--threads 2]
                                      [--legacy] [--reps 1] [--dir DIR] [--keep]

Writes the random Q4_0 GGUF of ``synth.write_random_gguf`` (context 32768), imports it with its
blocks kept, and for each prompt length N and KV type runs, each in a fresh process:

    mixcli      ``Model.prefill`` of N random tokens (batches of 256) after a short warm-up;
                attention time measured separately (a timer around ``KVCache.attend``)
    legacy      (--legacy, f16 only) the same with prefill attention through the decode kernel
                and a [T*H, n] score buffer, as before the tiled kernel: what tiling changed
    llama.cpp   ``llama-bench -p N -n 0`` (its defaults: batch 2048, ubatch 512, flash attention
                auto; q8_0 adds ``-ctk q8_0 -ctv q8_0 -fa on``, which llama.cpp needs for a
                quantized V cache)

and prints tok/s, the ratio, attention seconds and peak RSS. The model is removed unless --keep.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

TIMEOUT = 3600


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ours_main(argv: list[str]) -> None:
    """Hidden mode: one mixcli prefill measurement, printed as one JSON line."""
    import numpy as np

    import mixcli
    from mixcli.kv_cache import KVCache

    model_dir, n, kv_type, threads, legacy = argv[0], int(argv[1]), argv[2], int(argv[3]), argv[4] == "1"
    spent = [0.0]
    attend = KVCache.attend

    def timed(self, kernels, layer, q3, pos0, scale, out, scratch):
        t = time.perf_counter()
        if legacy and q3.shape[0] > 1:  # the untiled path: decode kernel, a score row per (token, head)
            T, H = q3.shape[0], q3.shape[1]
            kernels.attention(
                q3, self.k[layer], self.v[layer], pos0, scale, out, np.empty((T * H, pos0 + T), np.float32)
            )
        else:
            attend(self, kernels, layer, q3, pos0, scale, out, scratch)
        spent[0] += time.perf_counter() - t

    KVCache.attend = timed
    m = mixcli.load(model_dir, ctx=n + 64, threads=threads, kv_type=kv_type)
    rng = np.random.default_rng(0)
    V = m.config.vocab_size
    m.prefill(rng.integers(3, V, 300).tolist())  # warm-up: kernels from numba's cache, pages in
    m.reset()
    spent[0] = 0.0
    toks = rng.integers(3, V, n).tolist()
    t = time.perf_counter()
    m.prefill(toks)
    dt = time.perf_counter() - t
    print(
        json.dumps(
            {
                "tps": n / dt,
                "seconds": dt,
                "attention_s": spent[0],
                "kernels": m.kernels.label,
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "kv_bytes": m.kv.nbytes,
            }
        )
    )


def _run_json(cmd: list) -> dict:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT, check=False)
    if r.returncode:
        raise RuntimeError(f"{cmd[0]} failed (exit {r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def ours(model_dir: Path, n: int, kv_type: str, threads: int, legacy: bool) -> dict:
    return _run_json([sys.executable, __file__, "--ours", model_dir, n, kv_type, threads, int(legacy)])


def llama_bench(binary: Path, gguf: Path, n: int, kv_type: str, threads: int, reps: int) -> dict:
    cmd = [binary, "-m", gguf, "-p", n, "-n", 0, "-t", threads, "-r", reps, "-o", "json"]
    if kv_type != "f16":
        cmd += ["-ctk", kv_type, "-ctv", kv_type, "-fa", "on"]
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if r.returncode:
        raise RuntimeError(f"llama-bench failed (exit {r.returncode}): {r.stderr[-2000:]}")
    row = json.loads(r.stdout)[0]
    return {"tps": float(row["avg_ts"]), "fa": row.get("flash_attn")}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--ours":
        _ours_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="512,4096", help="comma-separated prompt lengths")
    ap.add_argument("--kv-types", default="f16", help="comma-separated: f16, q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1, help="repetitions of each measurement (medians)")
    ap.add_argument("--legacy", action="store_true", help="also run mixcli with the untiled prefill attention")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--dir", default=None, help="where to write the models (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()

    import statistics

    import host
    from llamacpp_build import build
    from quant.gguf_convert import convert_gguf
    from synth import write_random_gguf

    tmp = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="long-prefill-"))
    tmp.mkdir(parents=True, exist_ok=True)
    gguf, ours_dir = tmp / "mixtral-width-q4_0.gguf", tmp / "mixtral-width"
    try:
        if not gguf.exists():
            write_random_gguf(gguf, layers=2)
        if not ours_dir.exists():
            convert_gguf(gguf, ours_dir, quant="keep")
        bench = None if a.no_llamacpp else build(["llama-bench"])["llama-bench"]
        rows = []
        for n in [int(x) for x in a.tokens.split(",")]:
            for kv in a.kv_types.split(","):
                med = {}
                for name, fn in (
                    ("ours", lambda n=n, kv=kv: ours(ours_dir, n, kv, a.threads, False)),
                    (
                        "legacy",
                        (lambda n=n, kv=kv: ours(ours_dir, n, kv, a.threads, True))
                        if a.legacy and kv == "f16"
                        else None,
                    ),
                    ("llama", (lambda n=n, kv=kv: llama_bench(bench, gguf, n, kv, a.threads, 1)) if bench else None),
                ):
                    if fn is None:
                        continue
                    runs = []
                    for _ in range(a.reps):
                        log(f"pp{n} kv {kv}: {name} ...")
                        runs.append(fn())
                        log(f"  {runs[-1]}")
                    med[name] = {
                        k: statistics.median(r[k] for r in runs)
                        for k in runs[0]
                        if isinstance(runs[0][k], (int, float))
                    }
                rows.append((n, kv, med))
        print(host.describe())
        print(f"prefill tok/s, Mixtral-width 2 layers Q4_0, {a.threads} threads, medians of {a.reps}")
        print(
            f"{'tokens':>7} {'kv':>5} {'mixcli':>8} {'attn s':>7} {'legacy':>8} {'llama.cpp':>10} "
            f"{'ratio':>6} {'peak RSS':>9}"
        )
        for n, kv, med in rows:
            o, lg, ll = med.get("ours", {}), med.get("legacy", {}), med.get("llama", {})
            ratio = o["tps"] / ll["tps"] if o and ll else float("nan")
            print(
                f"{n:>7} {kv:>5} {o.get('tps', float('nan')):>8.2f} {o.get('attention_s', float('nan')):>7.1f} "
                f"{lg.get('tps', float('nan')):>8.2f} {ll.get('tps', float('nan')):>10.2f} {ratio:>6.2f} "
                f"{o.get('peak_rss', 0) / 2**30:>8.2f}G"
            )
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

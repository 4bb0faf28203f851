"""`mixcli batch` on Ray against a plain shell loop over `mixcli generate`, on the default model.

    python benchmarks/batch.py                                   # 16 prompts, 32 tokens, 1/2/4 workers
    python benchmarks/batch.py --prompts 8 --tokens 16 --workers 1,2

Every run answers the same --prompts chat prompts greedily (temperature 0, max_tokens --tokens),
so every row generates the same tokens. Rows:

- loop: one `mixcli generate --json` process per prompt, as a shell loop would (each pays the
  start-up and the model load);
- batch, N workers: one `mixcli batch` process with Ray started inside it, ``--workers N``,
  ``--threads-per-worker`` = max(1, cores / N), ``--parallel`` as given;
- no-ray / ray at --parallel 1: one worker of one thread, one prompt at a time, in the job's
  process against a Ray actor. The difference of their in-job times (first worker ready to last line) divided by the
  prompts is what Ray adds per prompt (the call, the result's trip and the scheduling loop).

Printed: wall seconds of the whole command (Ray start and model loads included), the in-job
seconds `mixcli batch` reports, prompts/s and generated tok/s over the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOPICS = [
    "rivers",
    "mountains",
    "birds",
    "bread",
    "trains",
    "clouds",
    "chess",
    "bees",
    "tea",
    "maps",
    "bridges",
    "glass",
    "owls",
    "salt",
    "kites",
    "moss",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prompt_lines(n: int, tokens: int) -> list[dict]:
    return [
        {
            "id": i,
            "messages": [{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}],
            "max_tokens": tokens,
        }
        for i in range(n)
    ]


def run(cmd: list, timeout: float = 3600) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr}")
    return dt, r


def loop_row(model: str | None, lines: list[dict], tokens: int) -> dict:
    wall, generated = 0.0, 0
    for line in lines:
        cmd = [
            sys.executable,
            "-m",
            "mixcli",
            "generate",
            *([model] if model else []),
            "--prompt",
            line["messages"][0]["content"],
            "--temp",
            "0",
            "-n",
            tokens,
            "--json",
        ]
        dt, r = run(cmd)
        wall += dt
        generated += json.loads(r.stdout)["usage"]["completion_tokens"]
    return {"wall": wall, "job": None, "tokens": generated}


def batch_row(model: str | None, src: Path, out: Path, extra: list) -> dict:
    out.unlink(missing_ok=True)
    dt, r = run(
        [sys.executable, "-m", "mixcli", "batch", *([model] if model else []), src, "-o", out, "--temp", "0", *extra]
    )
    m = re.search(r"batch: \d+ lines written to .* in ([0-9.]+) s", r.stderr)
    generated = sum(json.loads(s)["usage"]["completion_tokens"] for s in out.read_text().splitlines())
    return {"wall": dt, "job": float(m.group(1)) if m else None, "tokens": generated}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model (default: the default model)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--skip-loop", action="store_true")
    ap.add_argument("--overhead-only", action="store_true", help="only the --parallel 1 pair without and with Ray")
    args = ap.parse_args()
    import psutil

    cores = psutil.cpu_count(logical=False) or 1
    lines = prompt_lines(args.prompts, args.tokens)
    tmp = Path(tempfile.mkdtemp(prefix="mixcli-bench-batch-"))
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = []
    log("warm-up (kernel cache, page cache)")
    run(
        [
            sys.executable,
            "-m",
            "mixcli",
            "generate",
            *([args.model] if args.model else []),
            "--prompt",
            "hi",
            "-n",
            "2",
            "--temp",
            "0",
        ]
    )
    if not (args.skip_loop or args.overhead_only):
        log("loop over mixcli generate")
        rows.append(("loop over `mixcli generate`", loop_row(args.model, lines, args.tokens)))
    for w in [] if args.overhead_only else [int(x) for x in args.workers.split(",")]:
        t = max(1, cores // w)
        log(f"batch, {w} workers x {t} threads")
        rows.append(
            (
                f"batch, {w} worker(s) x {t} thread(s), --parallel {args.parallel}",
                batch_row(
                    args.model,
                    src,
                    tmp / "out.jsonl",
                    ["--workers", w, "--threads-per-worker", t, "--parallel", args.parallel],
                ),
            )
        )
    log("one worker at --parallel 1, without and with Ray")
    local = batch_row(args.model, src, tmp / "out.jsonl", ["--no-ray", "--parallel", 1, "--threads-per-worker", 1])
    on_ray = batch_row(args.model, src, tmp / "out.jsonl", ["--workers", 1, "--parallel", 1, "--threads-per-worker", 1])
    rows += [("no Ray, 1 worker x 1 thread, --parallel 1", local), ("Ray, 1 worker x 1 thread, --parallel 1", on_ray)]

    print(
        f"{args.prompts} prompts, max_tokens {args.tokens}, temperature 0, {cores} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    print()
    print("| run | wall s | in-job s | prompts/s (wall) | tok/s (wall) | tokens |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        job = f"{r['job']:.2f}" if r["job"] is not None else "-"
        print(
            f"| {name} | {r['wall']:.2f} | {job} | {args.prompts / r['wall']:.2f} | {r['tokens'] / r['wall']:.1f} "
            f"| {r['tokens']} |"
        )
    if local["job"] is not None and on_ray["job"] is not None:
        print()
        print(
            f"Ray per prompt (in-job, --parallel 1): {1000 * (on_ray['job'] - local['job']) / args.prompts:+.1f} ms; "
            f"Ray start-up and actor load (wall - in-job): {on_ray['wall'] - on_ray['job']:.1f} s against "
            f"{local['wall'] - local['job']:.1f} s without Ray"
        )


if __name__ == "__main__":
    main()

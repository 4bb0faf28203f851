"""Benchmark: Mixtral 8x7B at full size (32 layers, 26 GB at Q4_0) under memory limits, mixcli and
llama.cpp on the same file.

    python benchmarks/full_size.py [--layers 32] [--limits 12GiB,16GiB,none] [--routing random,mixtral]
                                   [--prompt 16] [--tokens 8] [--threads 2] [--dir DIR] [--keep]

1. Writes the GGUF (``synth.write_random_gguf``: random Q4_0 blocks, tensor by tensor, one tensor
   in memory) and imports it with ``mixcli convert`` (blocks kept), timing both and the import's
   peak RSS. ``--layers 2`` makes a small model for a smoke run of this script.
2. For each memory limit (a cgroup v1 memory controller with ``memory.limit_in_bytes``, as
   benchmarks/expert_cache.py makes; "none": no cgroup) and routing, runs each engine in a fresh
   process with the model's pages dropped from the page cache first:

   mixcli     no memory flag: the automatic budget (``memory_budget``) sees the cgroup limit and
              sizes the expert cache; prompt of --prompt random tokens, then --tokens decode steps.
              Reports time to first token from process start (cold), prefill and decode tok/s,
              disk bytes read per decoded token (/proc/self/io, O_DIRECT reads included), peak RSS,
              and per layer the expert cache's hit rate and next-layer guess accuracy.
   llama.cpp  ``llama-bench -p PROMPT -n TOKENS -r 1 -lm mmap --repack 0`` (its default repacking
              allocates a CPU_REPACK copy of the whole model, which cannot load past the RAM): pp and
              tg tok/s, peak RSS (wait4), wall time of the whole run.

Routing "random" is what the random router gives (nearly uniform, consecutive tokens' top-2 sets
overlap 46% of the time, as chance gives). Routing "mixtral" replays a synthetic trace whose
consecutive-token overlap (first or second choice) follows the Mixtral paper's Table 5 (arXiv
2401.04088): about 49% at layers 0 and 31, 64% at layer 15, linear in between. It is made by a
Markov chain per layer: with probability a_l a token keeps one of the previous token's two experts
(either, at random) and draws its other expert at random, else it draws a fresh random pair;
overlap = a_l + (1 - a_l) * 0.464, so a_l = (target - 0.464) / 0.536. mixcli's router logits are
steered to the trace (+30 on its two experts, see ``_Routed``), so the expert cache's own hooks
see the trace's experts as the routed ones; the printed
overlap per layer is measured on the experts the decoded tokens were routed to, under either routing. The next-layer guess of the
expert cache still comes from the real router on the real hidden state, so against a replayed
trace it is near chance: the guess accuracy column means something only under "random". llama.cpp's
router cannot be driven this way: its "mixtral" rows are not measured. After each "mixtral" row the
script prints how far that row could go: the trace replayed through each replacement policy at the
run's slot count, the chain's online ceiling (``chain_hit_ceiling``) and Belady's (the future
known), and the read rate 2x llama.cpp's decode would need at the ceiling, beside the rate the run
read at (``print_ceiling``).

The model directory and GGUF are removed at the end unless --keep. Uses ~2x the model's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from expert_cache import disk_bandwidth, make_cgroup, remove_cgroup, replay_belady  # noqa: E402
from synth import drop_page_cache  # noqa: E402

RANDOM_OVERLAP = 1 - 15 / 28  # P(two random top-2 sets of 8 experts share one) = 0.464
OVERLAP_EDGE, OVERLAP_MIDDLE = 0.49, 0.643  # Table 5, first or second choice: layers 0/31, layer 15
TIMEOUT = 4 * 3600


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def target_overlap(layer: int, n_layers: int) -> float:
    mid = (n_layers - 1) / 2
    return OVERLAP_MIDDLE - (OVERLAP_MIDDLE - OVERLAP_EDGE) * abs(layer - mid) / max(mid, 1)


def mixtral_like_trace(n_tokens: int, n_layers: int, n_experts: int = 8, seed: int = 0) -> np.ndarray:
    """[tokens, layers, 2] expert ids with Table 5's consecutive-token overlap (see the docstring)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n_tokens, n_layers, 2), np.int32)
    for layer in range(n_layers):
        keep = (target_overlap(layer, n_layers) - RANDOM_OVERLAP) / (1 - RANDOM_OVERLAP)
        prev = rng.choice(n_experts, 2, replace=False)
        for t in range(n_tokens):
            if t and rng.random() < keep:
                kept = prev[rng.integers(2)]
                other = rng.choice([e for e in range(n_experts) if e != kept])
                pair = np.array([kept, other])
            else:
                pair = rng.choice(n_experts, 2, replace=False)
            out[t, layer] = pair
            prev = pair
    return out


def chain_hit_ceiling(n_slots: int, n_layers: int, n_experts: int = 8) -> float:
    """The best hit rate an online policy can have on ``mixtral_like_trace`` (no read-ahead):
    under the chain the previous pair is likelier than the rest, which are alike, so the best a
    policy can hold is each layer's previous pair plus s - 2 others, s = n_slots / n_layers.
    A kept expert then always hits, the new one with chance (s - 1) / (E - 1); a fresh pair hits
    s / E per expert."""
    s = n_slots / n_layers
    rates = []
    for layer in range(n_layers):
        a = (target_overlap(layer, n_layers) - RANDOM_OVERLAP) / (1 - RANDOM_OVERLAP)
        rates.append((a * (1 + (s - 1) / (n_experts - 1)) + (1 - a) * 2 * s / n_experts) / 2)
    return float(np.mean(rates))


def overlap(trace: np.ndarray) -> np.ndarray:
    """[layers]: the share of consecutive tokens whose top-2 sets share an expert."""
    a, b = trace[:-1], trace[1:]
    shared = (a[:, :, :, None] == b[:, :, None, :]).any(axis=(2, 3))
    return shared.mean(axis=0)


# ---------------------------------------------------------------------------------------------
# the mixcli run (a child process)
# ---------------------------------------------------------------------------------------------
def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


class _Routed:
    """The model's kernel table with the router's output steered to a replayed trace: the gate
    product (``matvec_f32`` / ``matmul_f32``, which the model calls for the router only) gets +30
    on the logits of the trace's two experts, so the cache's hooks and ``route_topk`` all see the
    trace's choice (with the router's own softmax weights)."""

    def __init__(self, table, trace: np.ndarray):
        self._table, self._trace = table, trace
        self.step = 0  # token index into the trace
        self.layer = 0

    def __getattr__(self, name):
        return getattr(self._table, name)

    def _steer(self, rows):  # rows [T, E]
        T = rows.shape[0]
        for t in range(T):
            rows[t, self._trace[(self.step + t) % len(self._trace), self.layer]] += 30.0
        self.layer += 1
        if self.layer == self._trace.shape[1]:
            self.layer = 0
            self.step += T

    def matvec_f32(self, w, x, out):
        self._table.matvec_f32(w, x, out)
        self._steer(out[None, :])

    def matmul_f32(self, w, X, out):
        self._table.matmul_f32(w, X, out)
        self._steer(out)


def child(argv: list[str]) -> None:
    t_start = time.perf_counter()
    cg, model_dir, routing, prompt, tokens, threads = argv[0], argv[1], argv[2], *map(int, argv[3:6])
    if cg:
        Path(cg, "cgroup.procs").write_text(str(os.getpid()))
    from mixcli.expert_cache import ExpertCache
    from mixcli.runtime import load_runtime_model

    notes: list[str] = []
    m, _ = load_runtime_model(model_dir, ctx=prompt + tokens + 16, threads=threads, notify=notes.append)
    L = m.config.num_hidden_layers
    trace = None
    if routing == "mixtral":
        trace = mixtral_like_trace(prompt + tokens + 1, L, m.config.num_local_experts, seed=1)
        routed = _Routed(m.kernels, trace)
        for block in m.layers:  # the router's product runs in each MoE layer's own kernel table
            block.moe.kernels = routed
    prov = m.experts
    chosen = [[] for _ in range(L)]  # per layer, each decoded token's two experts
    layer_hits = np.zeros((L, 2), np.int64)  # [L, (hits, requests)]
    layer_guess = np.zeros((L, 2), np.int64)  # [L, (right, predicted)]
    cache = prov if isinstance(prov, ExpertCache) else None
    if cache is not None:
        inner_get, inner_route = cache.get, cache.on_route

        def get(layer, e, n):
            h0 = cache.cstats.hits
            w = inner_get(layer, e, n)
            layer_hits[layer] += (cache.cstats.hits - h0, 1)
            return w

        def on_route(layer, x, experts):  # the cache scores the previous layer's guess for this one here
            r0, p0 = cache.cstats.predicted_right, cache.cstats.predicted
            inner_route(layer, x, experts)
            if x.shape[0] == 1:
                chosen[layer].append(sorted(int(e) for e in experts[0]))
            layer_guess[layer] += (cache.cstats.predicted_right - r0, cache.cstats.predicted - p0)

        cache.get, cache.on_route = get, on_route
    rng = np.random.default_rng(0)
    V = m.config.vocab_size
    t = time.perf_counter()
    logits = m.prefill(rng.integers(3, V, prompt).tolist())
    t_first = time.perf_counter()
    tok = int(np.argmax(logits))
    layer_hits[:] = 0
    layer_guess[:] = 0
    io0, t0 = _read_bytes(), time.perf_counter()
    for _ in range(tokens):
        tok = int(rng.integers(3, V))  # random tokens: greedy decoding of random weights repeats one token
        m.decode(tok)
    dt = time.perf_counter() - t0
    res = {
        "engine": "mixcli",
        "ttft_s": t_first - t_start,
        "pp_tps": prompt / (t_first - t),
        "tg_tps": tokens / dt,
        "disk_per_token": (_read_bytes() - io0) / tokens,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "notes": notes,
        "kernels": m.kernels.label,
        "cache": cache is not None,
        "hit_rate": [h / r if r else None for h, r in layer_hits.tolist()],
        "guess_acc": [h / r if r else None for h, r in layer_guess.tolist()],
        "overlap": overlap(np.array(chosen).transpose(1, 0, 2)).tolist() if cache is not None else None,
    }
    if cache is not None:
        res["slots"] = cache.n_slots
        cache.close()
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------
# the parent
# ---------------------------------------------------------------------------------------------
def _percents(xs) -> str:
    return " ".join("-" if x is None else f"{x:.0%}" for x in xs)


def print_ceiling(args, r: dict, llama_tps: float | None = None) -> None:
    """How far a Mixtral-like row can go: the trace replayed through the replacement policies at
    the run's slot count, the chain's online ceiling and Belady's; then the bytes a token needs at
    the ceiling (the run's bytes per miss) and the read rate that 2x llama.cpp's decode
    (``llama_tps``, its random run at the same limit) would need, beside the rate this run read at
    and ``dd``'s. dd's single sequential stream reads slower than the expert reader, so it is no
    bound; the run's own rate is a rate the disk certainly gives."""
    from mixcli.expert_policy import POLICIES, ReplacementPolicy, replay

    L, slots = len(r["hit_rate"]), r["slots"]
    trace = mixtral_like_trace(args.prompt + args.tokens + 1, L, seed=1)  # the child's trace
    n_dec = args.tokens * L * 2  # decode requests; the prompt's tokens warm the pool first
    warm = trace[: args.prompt]
    got = []
    for name in POLICIES:
        full = replay(trace[: args.prompt + args.tokens], slots, ReplacementPolicy(name, L, 8))
        got.append(f"{name} {(full - replay(warm, slots, ReplacementPolicy(name, L, 8))) / n_dec:.0%}")

    def belady_hits(routing):  # [N, L, K] -> hits of Belady's policy over it
        keys = [(layer, int(e)) for token in routing for layer, chosen in enumerate(token) for e in chosen]
        return replay_belady(keys, slots) * len(keys)

    best = (belady_hits(trace[: args.prompt + args.tokens]) - belady_hits(warm)) / n_dec
    ceiling = chain_hit_ceiling(slots, L)
    print(
        f"  the trace replayed at {slots} slots, no read-ahead: {', '.join(got)}; online ceiling "
        f"{ceiling:.0%}; Belady (the future known) {best:.0%}"
    )
    hits = sum(x for x in r["hit_rate"] if x is not None) / L
    misses = 2 * L * (1 - hits)
    if misses and r.get("disk_per_token") and any(args.model_dir.glob("weights-*.bin")):
        per_miss = r["disk_per_token"] / misses
        rate = max(disk_bandwidth(args.model_dir) for _ in range(3))  # a cloud disk varies: its best
        need = 2 * L * (1 - ceiling) * per_miss
        got = r["disk_per_token"] * r["tg_tps"]
        line = (
            f"  {per_miss / 1e6:.0f} MB read per miss; at the ceiling {need / 2**30:.2f} GiB per token; this run "
            f"read {got / 1e9:.2f} GB/s, dd {rate / 1e9:.2f} GB/s (O_DIRECT, best of 3)"
        )
        if llama_tps:
            line += f"; 2x llama.cpp ({2 * llama_tps:.2f} tok/s) needs {2 * llama_tps * need / 1e9:.2f} GB/s with no compute"
        print(line)


def run_mixcli(args, cg: Path | None, routing: str) -> dict:

    drop_page_cache([args.gguf, *sorted(args.dir.glob("weights-*.bin"))])  # the other engine's file too
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(cg or ""),
        str(args.dir),
        routing,
        str(args.prompt),
        str(args.tokens),
        str(args.threads),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, check=False)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"engine": "mixcli", "error": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:]}"}


def run_llamacpp(args, bench: Path, cg: Path | None) -> dict:
    drop_page_cache([args.gguf, *sorted(args.dir.glob("weights-*.bin"))])
    cmd = [
        str(bench),
        "-m",
        str(args.gguf),
        "-p",
        str(args.prompt),
        "-n",
        str(args.tokens),
        "-t",
        str(args.threads),
        "-r",
        "1",
        "-lm",
        "mmap",
        "--repack",
        "0",
        "-o",
        "json",
    ]
    t = time.perf_counter()
    pre = (lambda: Path(cg, "cgroup.procs").write_text(str(os.getpid()))) if cg else None
    with tempfile.TemporaryFile("w+") as errf:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, text=True, preexec_fn=pre)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)  # this child's own peak RSS
        p.returncode = os.waitstatus_to_exitcode(status)
        errf.seek(0)
        err = errf.read()
    wall = time.perf_counter() - t
    rss = usage.ru_maxrss * 1024
    if p.returncode:
        return {"engine": "llama.cpp", "error": f"exit {p.returncode}: {err.strip().splitlines()[-1:]}"}
    rows = json.loads(out)
    tps = {("pp" if r["n_prompt"] else "tg"): float(r["avg_ts"]) for r in rows}
    return {"engine": "llama.cpp", "pp_tps": tps.get("pp"), "tg_tps": tps.get("tg"), "wall_s": wall, "peak_rss": rss}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--limits", default="12GiB,16GiB,none")
    ap.add_argument("--routing", default="random,mixtral")
    ap.add_argument("--engines", default="mixcli,llama.cpp")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mixcli-full-size"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    import host
    from llamacpp_build import build
    from mixcli.memsize import format_size, parse_size

    args.dir.mkdir(parents=True, exist_ok=True)
    args.gguf = args.dir / f"mixtral-8x7b-random-{args.layers}L.Q4_0.gguf"
    model_dir = args.dir / f"mixtral-8x7b-random-{args.layers}L"
    try:
        if not args.gguf.exists():
            from synth import write_random_gguf

            t = time.perf_counter()
            write_random_gguf(args.gguf, layers=args.layers)
            log(f"wrote {args.gguf} ({format_size(args.gguf.stat().st_size)}) in {time.perf_counter() - t:.0f} s")
        if not model_dir.exists():
            t = time.perf_counter()
            p = subprocess.run(
                [sys.executable, "-m", "mixcli", "convert", str(args.gguf), "-o", str(model_dir)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                check=False,
            )
            if p.returncode:
                raise SystemExit(f"convert failed: {p.stderr[-2000:]}")
            rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
            log(f"converted in {time.perf_counter() - t:.0f} s, peak RSS {format_size(rss)}")
        args.dir, args.model_dir = model_dir, model_dir
        bench = build(["llama-bench"])["llama-bench"] if "llama.cpp" in args.engines else None
        rows = []
        for limit in args.limits.split(","):
            cg = None if limit == "none" else make_cgroup(parse_size(limit))
            if limit != "none" and cg is None:
                log(f"no cgroup for {limit}: skipped")
                continue
            try:
                for routing in args.routing.split(","):
                    if "mixcli" in args.engines:
                        log(f"{limit} {routing}: mixcli ...")
                        rows.append((limit, routing, run_mixcli(args, cg, routing)))
                        log(f"  {rows[-1][2]}")
                    if bench is not None and routing == "random":
                        log(f"{limit} {routing}: llama.cpp ...")
                        rows.append((limit, routing, run_llamacpp(args, bench, cg)))
                        log(f"  {rows[-1][2]}")
            finally:
                remove_cgroup(cg)
        print(host.describe())
        print(f"{args.layers} layers, prompt {args.prompt}, decode {args.tokens} tokens, {args.threads} threads")
        print(
            "| limit | routing | engine | TTFT cold s | prefill tok/s | decode tok/s | disk/token | peak RSS | note |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for limit, routing, r in rows:
            if "error" in r:
                print(f"| {limit} | {routing} | {r['engine']} | - | - | - | - | - | {r['error']} |")
                continue
            ttft = f"{r['ttft_s']:.1f}" if "ttft_s" in r else f"(run {r['wall_s']:.0f} s)"
            disk = format_size(r["disk_per_token"]) if "disk_per_token" in r else "-"
            rss = format_size(r.get("peak_rss", 0))
            note = "; ".join(n for n in r.get("notes", []) if "budget" in n)[:160]
            print(
                f"| {limit} | {routing} | {r['engine']} | {ttft} | {r['pp_tps'] or 0:.2f} | {r['tg_tps'] or 0:.3f} | "
                f"{disk} | {rss} | {note} |"
            )
        for limit, routing, r in rows:
            if r.get("cache"):
                print(f"\n{limit} {routing}: {r['slots']} expert slots; per layer hit rate: {_percents(r['hit_rate'])}")
                print(f"  next-layer guess accuracy: {_percents(r['guess_acc'])}")
                if r.get("overlap"):
                    print(f"  consecutive decoded tokens' top-2 overlap, as routed: {_percents(r['overlap'])}")
                if routing == "mixtral":
                    llama = [x for lim, _, x in rows if lim == limit and x.get("engine") == "llama.cpp"]
                    print_ceiling(args, r, llama[0].get("tg_tps") if llama else None)
    finally:
        if not args.keep:
            shutil.rmtree(model_dir, ignore_errors=True)
            args.gguf.unlink(missing_ok=True)


if __name__ == "__main__":
    main()

"""Benchmark: decoding a model whose experts are several times the memory budget.

    python benchmarks/expert_cache.py [--layers 8] [--budget 1.5GiB] [--tokens 16] [--dir /tmp/...]

Writes a random-weight model of Mixtral width (D 4096, F 14336, 8 experts, top-2, q4_0; 8 layers
is about 6 GB of experts) straight through quant.writer.ModelWriter (random nibbles and small
fp16 scales: the speed of a 4-bit matvec does not depend on the values), then decodes random tokens in
a fresh process per configuration:

    mmap      plain memory mapping, the OS page cache decides (MappedExperts)
    cache     the expert cache under --max-memory, loads on demand
    cache+pf  the same with the background loader (this layer's experts and next layer's guesses)
    cache+pf-buffered  the same with buffered reads + DONTNEED instead of O_DIRECT (--modes to add it)

Each configuration runs under the same memory limit (a cgroup v1 memory controller limit of budget
+ --slack for the Python runtime, when this machine lets us create one), so "plain mmap" sees a
machine that has the budget's worth of RAM rather than a page cache holding the whole model. The
data files' pages are dropped (fsync + posix_fadvise DONTNEED) before every run. Routing is
measured twice: the random gates as written (nearly uniform) and with skewed gate rows (rows of
experts 0..2 scaled up so they win top-2 more often, as hot experts do in trained models).

Reported per run: decode tok/s, disk bytes read per token (/proc/self/io read_bytes: counts
page-fault reads of the mapping too), hit rate, next-layer guess accuracy, time stalled on expert
reads, peak RSS, and the time per token the disk alone would need ((bytes read) / bandwidth). It
also measures the ways of loading one expert cold (pread, O_DIRECT pread, madvise WILLNEED +
touch, page faults through the map) and replays the recorded routing through the cache's policies
(mixcli.expert_policy) and Belady's bound. The model directory is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mixcli.expert_policy import DEFAULT_POLICY, ReplacementPolicy, replay  # noqa: E402
from mixcli.memsize import format_size, parse_size  # noqa: E402
from quant import formats  # noqa: E402
from quant.config import ModelConfig  # noqa: E402
from synth import drop_page_cache  # noqa: E402

SKEW = np.array([3.0, 2.2, 1.6, 1.0, 1.0, 1.0, 1.0, 1.0], np.float32)  # gate row scales for "skewed"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
def mixtral_width_config(layers: int, hidden: int = 4096, ffn: int = 14336) -> ModelConfig:
    return ModelConfig(
        architecture="MixtralForCausalLM",
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        head_dim=128,
        vocab_size=32000,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        max_position_embeddings=4096,
        num_local_experts=8,
        num_experts_per_tok=2,
    )


def write_model(out: Path, layers: int, hidden: int = 4096, ffn: int = 14336, seed: int = 0) -> None:
    from quant.writer import ModelWriter

    cfg = mixtral_width_config(layers, hidden, ffn)
    D, F, V, E = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_local_experts
    H, KVH, HD = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rng = np.random.default_rng(seed)
    pool: dict[tuple, list[np.ndarray]] = {}

    def q_parts(qtype: str, n: int, k: int, scale: float) -> dict[str, np.ndarray]:
        """Random quantized parts; a few variants per shape are reused (speed, not values, matters)."""
        variants = pool.setdefault((qtype, n, k), [])
        if len(variants) < 3:
            # zero-mean codes (q4: 1..15 around the offset 8; q8: -127..127): uniform random bytes
            # would give every weight a mean of -d/2, a common-mode signal that makes every token
            # route to the same experts
            if qtype == "q8_0":
                qs = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
            else:
                lo = rng.integers(1, 16, size=(n, k // 2), dtype=np.uint8)
                qs = lo | (rng.integers(1, 16, size=(n, k // 2), dtype=np.uint8) << 4)
            d = (scale * (0.5 + rng.random((n, k // 32)))).astype(np.float16)
            variants.append({"qs": qs, "d": d})
        return variants[int(rng.integers(len(variants)))]

    def f32(shape, std):
        return {"w": (std * rng.standard_normal(shape)).astype(np.float32)}

    w = ModelWriter(out)
    for name in formats.tensor_names(layers, E, True, False):
        if name == "tok_embeddings":
            # large enough that each token's identity survives in the residual stream: with small
            # embeddings every token's later layers route alike and any cache looks perfect
            w.add_tensor_parts(name, "q8_0", (V, D), q_parts("q8_0", V, D, 0.05))
        elif name == "output":
            w.add_tensor_parts(name, "q8_0", (V, D), q_parts("q8_0", V, D, 0.0005))
        elif name.endswith("norm"):
            w.add_tensor_parts(name, "f32", (D,), {"w": np.ones(D, np.float32)})
        elif name.endswith("moe.gate"):
            w.add_tensor_parts(name, "f32", (E, D), f32((E, D), 1 / np.sqrt(D)))
        elif ".attn." in name:
            n, k = {"wq": (H * HD, D), "wk": (KVH * HD, D), "wv": (KVH * HD, D), "wo": (D, H * HD)}[name[-2:]]
            w.add_tensor_parts(name, "q4_0", (n, k), q_parts("q4_0", n, k, 0.002))
        elif name.endswith(".w1") or name.endswith(".w3") or name.endswith(".w2"):
            parts = name.split(".")
            layer, e, which = int(parts[1]), int(parts[3]), parts[4]
            if which == "w1":
                w.begin_expert(layer, e)
            n, k = (F, D) if which != "w2" else (D, F)
            w.add_tensor_parts(name, "q4_0", (n, k), q_parts("q4_0", n, k, 0.003 if which != "w2" else 0.0015))
            if which == "w2":
                w.end_expert()
    w.finish(
        cfg.to_dict(),
        {"preset": "q4_0", "types": formats.QUANT_PRESETS["q4_0"], "group": 32},
        None,
        {"kind": "random", "path": "benchmarks/expert_cache.py", "dtype": "random"},
    )


def drop_model_pages(model_dir: Path) -> None:
    drop_page_cache(model_dir.glob("weights-*.bin"))


# ---------------------------------------------------------------------------------------------
# one run (a child process)
# ---------------------------------------------------------------------------------------------
def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def child(args) -> None:
    if args.cgroup:
        Path(args.cgroup, "cgroup.procs").write_text(str(os.getpid()))
    from mixcli.expert_cache import ExpertCache, make_expert_provider
    from mixcli.model import Model, _kernel_module
    from mixcli.store import open_model_dir

    kernels = _kernel_module()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the runtime, before any weight
    store = open_model_dir(args.model)
    if args.mode == "mmap":
        provider = make_expert_provider(store, kernels, None)
    else:
        provider = ExpertCache(
            store,
            kernels,
            args.budget,
            prefetch=args.mode.startswith("cache+pf"),
            policy=args.policy,
            direct=not args.mode.endswith("buffered"),
        )
    trace: list[tuple[int, int]] = []
    inner_get = provider.get

    def get(layer, e, n):  # record the routing for the policy replay
        trace.append((layer, e))
        return inner_get(layer, e, n)

    provider.get = get
    model = Model(store, ctx=256, threads=args.threads, experts=provider)
    if args.skew:
        for block in model.layers:
            block.moe.gate = np.ascontiguousarray(block.moe.gate * SKEW[:, None])  # [E, D]
        provider.attach(model)
    # tokens are drawn at random rather than sampled: greedy decoding of random weights settles on
    # one repeated token whose routing never changes, which would flatter any cache
    rng = np.random.default_rng(1)
    V = store.config.vocab_size
    model.prefill([int(rng.integers(3, V))])
    for _ in range(args.warmup):  # JIT compilation and a warm cache are not what we measure
        model.decode(int(rng.integers(3, V)))
    if hasattr(provider, "reset_stats"):
        provider.reset_stats()
    trace.clear()
    io0, t0 = _read_bytes(), time.perf_counter()
    for _ in range(args.tokens):
        model.decode(int(rng.integers(3, V)))
    dt = time.perf_counter() - t0
    io = _read_bytes() - io0
    res = {
        "mode": args.mode,
        "skew": args.skew,
        "tokens": args.tokens,
        "seconds": dt,
        "disk_bytes": io,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_load": rss0,
        "trace": trace,
    }
    c = getattr(provider, "cstats", None)
    if c is not None:
        res.update(
            hit_rate=c.hit_rate,
            guess_acc=c.prefetch_accuracy,
            guess_acc_raw=(c.predicted_right_raw / c.predicted if c.predicted else 0.0),
            stall=c.stall_seconds,
            loaded=c.bytes_loaded,
            missed=c.bytes_missed,
            wasted=c.bytes_wasted,
            n_slots=provider.n_slots,
            pinned=provider.pinned_bytes,
            capacity=provider.capacity_bytes,
            guess_hits=c.guess_hits,
            prefetch_hits=c.prefetch_hits,
            waits=c.waits,
            misses=c.misses,
        )
        provider.close()
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------
# measurements made in the parent
# ---------------------------------------------------------------------------------------------
def make_cgroup(limit: int) -> Path | None:
    if not CGROUP_ROOT.is_dir():
        return None
    cg = CGROUP_ROOT / f"mixcli_bench_{os.getpid()}"
    try:
        cg.mkdir()
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        return cg
    except OSError:
        return None


def remove_cgroup(cg: Path | None) -> None:
    if cg is None:
        return
    try:
        (cg / "memory.force_empty").write_text("0")
    except OSError:
        pass
    try:
        cg.rmdir()
    except OSError as exc:
        print(f"note: could not remove {cg}: {exc}", file=sys.stderr)


def load_methods(model_dir: Path) -> dict[str, float]:
    """GB/s loading one expert region cold, four ways (a different region each time)."""
    from mixcli.store import open_model_dir

    store = open_model_dir(model_dir)
    regions = [store.experts[(layer, e)] for layer in range(store.config.num_hidden_layers) for e in range(8)]
    out: dict[str, list[float]] = {}
    buf = mmap.mmap(-1, max(r.nbytes for r in regions) + 4096)
    view = memoryview(buf)
    i = 0
    for _rep in range(2):
        for method in ("pread", "pread O_DIRECT", "madvise WILLNEED + touch", "page faults (plain map)"):
            r = regions[i % len(regions)]
            i += 1
            path = model_dir / r.file
            drop_model_pages(model_dir)
            t0 = time.perf_counter()
            if method.startswith("pread"):
                flags = os.O_RDONLY | (os.O_DIRECT if "DIRECT" in method else 0)
                fd = os.open(path, flags)
                n = (r.nbytes + 4095) // 4096 * 4096 if "DIRECT" in method else r.nbytes
                pos = 0
                while pos < n:
                    got = os.preadv(fd, [view[pos:n]], r.offset + pos)
                    if got <= 0:
                        break
                    pos += got
                os.close(fd)
            else:
                with open(path, "rb") as fh:
                    m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                a = np.frombuffer(m, np.uint8)[r.offset : r.offset + r.nbytes]
                if "madvise" in method:
                    m.madvise(mmap.MADV_WILLNEED, r.offset, (r.nbytes + 4095) // 4096 * 4096)
                int(a[::4096].sum())  # touch every page, as a kernel's first pass would
                del a
                m.close()
            out.setdefault(method, []).append(r.nbytes / (time.perf_counter() - t0) / 1e9)
    return {k: float(np.median(v)) for k, v in out.items()}


def disk_bandwidth(model_dir: Path) -> float:
    f = sorted(model_dir.glob("weights-*.bin"))[0]
    drop_model_pages(model_dir)
    p = subprocess.run(
        ["dd", f"if={f}", "of=/dev/null", "bs=4M", "count=256", "iflag=direct"], capture_output=True, text=True
    )
    last = p.stderr.strip().splitlines()[-1]
    num, unit = last.split(",")[-1].split()
    return float(num) * {"GB/s": 1e9, "MB/s": 1e6, "kB/s": 1e3}.get(unit, 1.0)


def replay_belady(trace: list[tuple[int, int]], n_slots: int) -> float:
    """Hit rate of Belady's policy (evict the expert used farthest in the future: the bound no
    policy beats) on a recorded access sequence, without prefetch."""
    nxt_use = [0] * len(trace)
    seen: dict = {}
    for i in range(len(trace) - 1, -1, -1):
        nxt_use[i] = seen.get(trace[i], 1 << 60)
        seen[trace[i]] = i
    held: dict = {}  # key -> index of its next use
    hits = 0
    for i, key in enumerate(trace):
        if key in held:
            hits += 1
        elif len(held) >= n_slots:
            del held[max(held, key=held.get)]
        held[key] = nxt_use[i]
    return hits / max(len(trace), 1)


def replay_policy(
    trace: list[tuple[int, int]], n_slots: int, policy: str, n_layers: int, k: int, half_life: float = 8.0
) -> float:
    """Hit rate of one of the cache's own policies (mixcli.expert_policy) on recorded decode
    routing: trace holds each token's K experts per layer, layer by layer."""
    routing = np.array([e for _, e in trace], np.int64).reshape(-1, n_layers, k)  # [N, L, K]
    n_experts = int(routing.max()) + 1
    return replay(routing, n_slots, ReplacementPolicy(policy, n_layers, n_experts, half_life)) / max(routing.size, 1)


def run_child(args, mode: str, skew: bool, cg: Path | None) -> dict:
    drop_model_pages(args.dir)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--mode",
        mode,
        "--model",
        str(args.dir),
        "--budget",
        str(args.budget_bytes),
        "--tokens",
        str(args.tokens),
        "--warmup",
        str(args.warmup),
        "--policy",
        args.policy,
    ]
    if skew:
        cmd.append("--skew")
    if cg is not None:
        cmd += ["--cgroup", str(cg)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{mode} run failed (exit {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="mmap")
    ap.add_argument("--model", default="")
    ap.add_argument("--budget", default="1.5GiB")
    ap.add_argument("--skew", action="store_true")
    ap.add_argument("--cgroup", default="")
    ap.add_argument("--policy", default=DEFAULT_POLICY)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096, help="D (smaller for a quick check of this script)")
    ap.add_argument("--ffn", type=int, default=14336, help="F")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--slack", default="256MiB", help="memory for the Python runtime on top of the budget")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mixcli-bench-expert-cache"))
    ap.add_argument("--keep", action="store_true", help="keep the generated model")
    ap.add_argument("--modes", default="mmap,cache,cache+pf")
    ap.add_argument("--routing", default="uniform,skewed")
    args = ap.parse_args()
    if args.child:
        args.budget = int(args.budget)
        args.threads = args.threads or None
        return child(args)

    args.budget_bytes = parse_size(args.budget)
    if not (args.dir / formats.MANIFEST_NAME).is_file():
        free = shutil.disk_usage(args.dir.parent).free
        print(
            f"writing a {args.layers}-layer Mixtral-width model to {args.dir} ({format_size(free)} free) ...",
            flush=True,
        )
        t = time.perf_counter()
        write_model(args.dir, args.layers, args.hidden, args.ffn)
        print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    from mixcli.expert_cache import expert_bytes, memory_for_slots
    from mixcli.store import open_model_dir

    store = open_model_dir(args.dir)
    print(
        f"experts {format_size(expert_bytes(store))}, budget {format_size(args.budget_bytes)}, "
        f"one expert {format_size(store.experts[(0, 0)].nbytes)}"
    )
    bw = disk_bandwidth(args.dir)
    print(f"disk (dd iflag=direct, 1 GiB): {bw / 1e9:.2f} GB/s")
    print("loading one expert cold:")
    for k, v in load_methods(args.dir).items():
        print(f"  {k:28s} {v:.2f} GB/s")
    limit = args.budget_bytes + parse_size(args.slack)
    cg = make_cgroup(limit)
    print(f"memory limit per run: {format_size(limit) + ' (cgroup)' if cg else 'none (no cgroup available)'}")
    rows = []
    try:
        for routing in args.routing.split(","):
            for mode in args.modes.split(","):
                r = run_child(args, mode, routing == "skewed", cg)
                rows.append(r)
                tps = r["tokens"] / r["seconds"]
                print(
                    f"  {routing:8s} {mode:9s} {tps:6.3f} tok/s  disk {r['disk_bytes'] / r['tokens'] / 1e9:5.2f} GB/tok  "
                    f"rss {format_size(r['peak_rss'])}",
                    flush=True,
                )
    finally:
        remove_cgroup(cg)
    # the table
    print()
    print(
        "| routing | mode | tok/s | x mmap | disk GB/token | disk-only s/token | measured s/token | hit rate | "
        "guess right (raw) | stalled s/token | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base = {}
    for r in rows:
        routing = "skewed" if r["skew"] else "uniform"
        tps = r["tokens"] / r["seconds"]
        if r["mode"] == "mmap":
            base[routing] = tps
        per_tok = r["disk_bytes"] / r["tokens"]
        hit = f"{r['hit_rate']:.0%}" if "hit_rate" in r else "-"
        acc = f"{r['guess_acc']:.0%} ({r['guess_acc_raw']:.0%})" if r.get("guess_acc") else "-"
        stall = f"{r['stall'] / r['tokens']:.2f}" if "stall" in r else "-"
        print(
            f"| {routing} | {r['mode']} | {tps:.3f} | {tps / base.get(routing, tps):.2f} | {per_tok / 1e9:.2f} | "
            f"{per_tok / bw:.2f} | {r['seconds'] / r['tokens']:.2f} | {hit} | {acc} | {stall} | "
            f"{format_size(r['peak_rss'])} (runtime before load {format_size(r['rss_before_load'])}) |"
        )
    # policy replay on the recorded decode routing
    n_slots = (args.budget_bytes - (memory_for_slots(store, 0))) // (
        memory_for_slots(store, 1) - memory_for_slots(store, 0)
    )
    L, K = store.config.num_hidden_layers, store.config.num_experts_per_tok
    print(f"\npolicy replay ({n_slots} slots, decode routing, no prefetch): hit rate")
    for r in rows:
        if r["mode"] != "cache+pf":
            continue
        trace = [tuple(t) for t in r["trace"]]
        line = ", ".join(
            f"{p}{'' if hl is None else f'(half-life {hl:g})'} {replay_policy(trace, n_slots, p, L, K, hl or 8.0):.0%}"
            for p, hl in (("lru", None), ("lfu", 2.0), ("lfu", 8.0), ("lfu", 32.0), ("next", None))
        )
        line += f", opt (Belady) {replay_belady(trace, n_slots):.0%}"
        print(f"  {'skewed' if r['skew'] else 'uniform'}: {line}")
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
        print(f"removed {args.dir}")


if __name__ == "__main__":
    main()

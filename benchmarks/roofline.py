"""What bounds decode: bytes of weights read per token against the memory bandwidth measured in
the same minute, and the instructions the hot decode kernel spends per weight, for each activation
arithmetic (``--act``).

    python benchmarks/roofline.py [--rounds 8] [--tokens 16] [--threads 1,2] [--model DIR]

Without --model it writes the Mixtral-width 2-layer Q4_0 model of vs_llamacpp.py (random weights,
imported keeping its blocks) into a temp dir and removes it at the end. The model is loaded once
per activation mode in one process and decode rounds alternate between the modes (and, per
round, a streaming-read pass over a 1 GiB buffer gives the bandwidth ceiling of that moment), so
the ratios are side by side. Columns:

- tok/s: median decode speed; weights GB/s = tok/s x bytes read per token; "of stream" = that
  against the median streaming-read bandwidth (numba, all threads, summing 8-byte words);
- ceiling tok/s = stream bandwidth / bytes per token: the speed if every byte streamed at that
  rate and nothing else took time;
- instructions per 512 weights: static count in the compiled q4_0r16 decode tile's inner loop
  (one 16-row x 32-column block per iteration), and how many of them are ``vpdpbusd``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode import bytes_per_token

STREAM_BYTES = 1 << 30


def _stream_kernel():
    from numba import njit, prange

    @njit(parallel=True, cache=False)
    def total(a):  # a [n] uint64
        s = np.uint64(0)
        for i in prange(a.shape[0]):
            s += a[i]
        return s

    return total


def stream_gbs(buf: np.ndarray, kernel) -> float:
    t = time.perf_counter()
    kernel(buf)
    return buf.nbytes / (time.perf_counter() - t) / 1e9


def tile_loop_counts() -> dict[int, tuple[int, int]]:
    """{levels: (instructions, byte-dot instructions)} in the innermost loop of the q4_0r16 decode
    tile at the host's best tier: the basic block that branches back to itself and holds
    vpdpbusd (or AVX2's vpmaddubsw). The driver is compiled here without numba's cache (cached
    code cannot be inspected) from the product's own tile builder."""
    from numba import njit, prange

    from mixcli import kernels
    from mixcli.kernels import act, isa, tiles
    from mixcli.kernels.irgen import _u16
    from quant import q4

    w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    p = q4.quantize(w, "q4_0r16")
    d = _u16(p["d"])
    tier = isa.tier(kernels.host_tiers()[0])
    out = {}
    for levels in (1, 2):
        tile = tiles.make_itile(tier, "q4_0", levels)

        @njit(parallel=True, fastmath=True)
        def mv(qs, d, x, levels, xq, xdx, xsq, xsum, xsqt, out):
            act.quantize_act_levels(x.reshape(1, x.shape[0]), levels, xq, xdx, xsq, xsum, xsqt)
            for g in prange(qs.shape[0]):
                tile(qs, d, d, g, xq, xdx, xsqt, out)

        mv(p["qs"], d, np.ones(64, np.float32), levels, *act.act(1, 64, levels), np.empty(32, np.float32))
        blocks: dict[str, list[str]] = {}
        label = None
        for line in mv.inspect_asm(mv.signatures[0]).splitlines():
            m = re.match(r"^(\.?L\w+):", line)
            if m:
                label = m.group(1)
                blocks[label] = []
                continue
            s = line.strip()
            if label and s and not s.startswith((".", "#")):
                blocks[label].append(s)
        for name, ins in blocks.items():
            back = [i for i, s in enumerate(ins) if re.match(rf"j\w+\s+{re.escape(name)}$", s)]
            body = ins[: back[0] + 1] if back else []  # the loop: its label to the jump back
            n_dp = sum(1 for s in body if s.startswith(("vpdpbusd", "{vex}", "vpmaddubsw")))
            if n_dp:
                out[levels] = (len(body), n_dp)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a converted model (default: the Mixtral-width 2L Q4_0)")
    ap.add_argument("--rounds", type=int, default=8, help="alternating decode rounds per thread count")
    ap.add_argument("--tokens", type=int, default=16, help="decode steps per round")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--modes", default="int8x2,int8")
    args = ap.parse_args()

    import mixcli

    modes = args.modes.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="mixcli-roofline-"))
    try:
        path = args.model
        if path is None:
            from quant.gguf_convert import convert_gguf
            from synth import write_random_gguf

            gguf_path = write_random_gguf(tmp / "mixtral-width.gguf", layers=2)
            path = tmp / "model"
            convert_gguf(gguf_path, path, quant="keep")
            gguf_path.unlink()
        models = {}
        for md in modes:
            models[md] = m = mixcli.load(path, ctx=64 + args.tokens + 8, load="memory", act=md)
            m.prefill(list(range(3, 67)))  # warm-up: kernels from the cache, experts touched
            m.decode(5)
        bpt = bytes_per_token(next(iter(models.values())))
        # [n] on the same kind of pages as the weights (huge where the kernel gives them), written
        # so its pages are real: the ceiling must not be lowered by TLB misses the weights avoid
        from mixcli import hugepages

        buf = np.frombuffer(hugepages.anonymous(STREAM_BYTES, populate=True), np.uint64)
        buf[:] = 1
        kern = _stream_kernel()
        kern(buf)
        rng = np.random.default_rng(0)
        rows = []
        for th in [int(t) for t in args.threads.split(",")]:
            for m in models.values():
                m.set_threads(th)
            tps = {md: [] for md in modes}
            bw = []
            for r in range(args.rounds):
                bw.append(stream_gbs(buf, kern))
                for md in modes if r % 2 == 0 else modes[::-1]:
                    m = models[md]
                    m.truncate(64)
                    toks = rng.integers(3, m.config.vocab_size, args.tokens).tolist()
                    t = time.perf_counter()
                    for tok in toks:
                        m.decode(tok)
                    tps[md].append(args.tokens / (time.perf_counter() - t))
            gbs = statistics.median(bw)
            for md in modes:
                v = statistics.median(tps[md])
                rows.append((md, th, v, v * bpt / 1e9, v * bpt / 1e9 / gbs, gbs, gbs * 1e9 / bpt))
        counts = tile_loop_counts()
        cfg = next(iter(models.values())).config
        print(
            f"\n{path.name}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"{bpt / 2**20:.1f} MiB of weights read per token; median of {args.rounds} alternating rounds"
        )
        print(
            f"{'act':>7} {'thr':>3} {'tok/s':>7} {'weights GB/s':>12} {'of stream':>9} {'stream GB/s':>11} "
            f"{'ceiling tok/s':>13} {'instr/512 w':>11} {'vpdpbusd':>8}"
        )
        for md, th, v, wg, frac, gbs, ceil in rows:
            ins, dp = counts.get(2 if md == "int8x2" else 1, (0, 0)) if md != "f32" else (0, 0)
            print(
                f"{md:>7} {th:>3} {v:>7.2f} {wg:>12.2f} {frac:>9.1%} {gbs:>11.2f} {ceil:>13.1f} "
                f"{ins or '-':>11} {dp or '-':>8}"
            )
        print(f"\n$ python benchmarks/roofline.py {' '.join(sys.argv[1:])}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

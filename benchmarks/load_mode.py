"""Decode speed with the weights read into memory vs memory-mapped, side by side in one process.

    python benchmarks/load_mode.py [--model DIR] [--rounds 8] [--tokens 24] [--threads 2]

Without --model it writes the Mixtral-width random model (hidden 4096, FFN 14336, 8 experts
top-2, 2 layers, q4_0) into a temp dir. The same model is opened twice, once per load mode
(``mixcli.store``: "memory" reads the data file into anonymous memory, "mmap" maps it), and the two
decode alternately, round by round, so a noisy neighbour slows both alike. A third copy,
"memory-4k", is read into anonymous memory the way mixcli did before ``mixcli/hugepages.py``
(MAP_POPULATE, no huge-page advice): what the huge pages are worth. Prints per-mode median tok/s,
every round, the median of the per-round ratios, and the time each open took (page cache warm:
the file was just written or read).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", type=Path, default=None, help="a converted model dir (default: write the Mixtral-width one)"
    )
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24, help="decode steps per round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import mmap

    from mixcli import hugepages
    from mixcli.model import Model
    from mixcli.store import open_model_dir

    def small_pages(size: int, populate: bool = False) -> mmap.mmap:  # the read before hugepages.py
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)

    tmp = None
    path = args.model
    if path is None:
        from synth import write_random_model

        tmp = Path(tempfile.mkdtemp(prefix="mixcli-load-"))
        path = write_random_model(tmp / "model", quant="q4_0", num_hidden_layers=2)
    try:
        models, open_s = {}, {}
        modes = ("memory", "mmap", "memory-4k")
        for mode in modes:
            huge = hugepages.anonymous
            if mode == "memory-4k":
                hugepages.anonymous = small_pages
            try:
                t = time.perf_counter()
                store = open_model_dir(path, load=mode.split("-")[0])
                open_s[mode] = time.perf_counter() - t
            finally:
                hugepages.anonymous = huge
            models[mode] = Model(store, ctx=256, threads=args.threads)
        V = models["mmap"].config.vocab_size
        for m in models.values():  # page in every expert and load the JIT cache
            m.prefill([(7 * i) % V for i in range(64)])
        tps: dict[str, list[float]] = {k: [] for k in models}
        for r in range(args.rounds):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                m = models[mode]
                m.truncate(64)
                m.decode(11)
                t = time.perf_counter()
                for i in range(args.tokens):
                    m.decode((13 * i + r) % V)
                tps[mode].append(args.tokens / (time.perf_counter() - t))
        size = sum(int(f["size"]) for f in models["mmap"].store.manifest["files"])
        print(
            f"model {path} ({size / 2**20:.0f} MiB), {args.threads} threads, {args.rounds} rounds x {args.tokens} tokens"
        )
        print(f"{'load':9s} {'open s':>7s} {'median tok/s':>13s}  rounds")
        for mode in models:
            print(
                f"{mode:9s} {open_s[mode]:7.3f} {statistics.median(tps[mode]):13.2f}  "
                + " ".join(f"{x:.1f}" for x in tps[mode])
            )
        for other in modes[1:]:
            per_round = statistics.median(a / b for a, b in zip(tps["memory"], tps[other]))
            print(
                f"memory / {other}: ratio of medians {statistics.median(tps['memory']) / statistics.median(tps[other]):.3f}, "
                f"median of per-round ratios {per_round:.3f}"
            )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

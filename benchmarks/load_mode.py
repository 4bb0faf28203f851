"""Decode speed with the weights read into memory vs memory-mapped, side by side in one process.

    python benchmarks/load_mode.py [--model DIR] [--rounds 8] [--tokens 24] [--threads 2]

Without --model it writes the Mixtral-width random model (hidden 4096, FFN 14336, 8 experts
top-2, 2 layers, q4_0) into a temp dir. The same model is opened twice, once per load mode
(``mixcli.store``: "memory" reads the data file into anonymous memory, "mmap" maps it), and the two
decode alternately, round by round, so a noisy neighbour slows both alike. Prints per-mode median
tok/s, every round, and the time each open took (page cache warm: the file was just written or
read).
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
    ap.add_argument("--model", type=Path, default=None, help="a converted model dir (default: write the Mixtral-width one)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24, help="decode steps per round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from mixcli.model import Model
    from mixcli.store import open_model_dir

    tmp = None
    path = args.model
    if path is None:
        from synth import write_random_model

        tmp = Path(tempfile.mkdtemp(prefix="mixcli-load-"))
        path = write_random_model(tmp / "model", quant="q4_0", num_hidden_layers=2)
    try:
        models, open_s = {}, {}
        for mode in ("memory", "mmap"):
            t = time.perf_counter()
            store = open_model_dir(path, load=mode)
            open_s[mode] = time.perf_counter() - t
            models[mode] = Model(store, ctx=256, threads=args.threads)
        V = models["mmap"].config.vocab_size
        for m in models.values():  # page in every expert and load the JIT cache
            m.prefill([(7 * i) % V for i in range(64)])
        tps: dict[str, list[float]] = {k: [] for k in models}
        for r in range(args.rounds):
            for mode in (("memory", "mmap") if r % 2 == 0 else ("mmap", "memory")):
                m = models[mode]
                m.truncate(64)
                m.decode(11)
                t = time.perf_counter()
                for i in range(args.tokens):
                    m.decode((13 * i + r) % V)
                tps[mode].append(args.tokens / (time.perf_counter() - t))
        size = sum(int(f["size"]) for f in models["mmap"].store.manifest["files"])
        print(f"model {path} ({size / 2**20:.0f} MiB), {args.threads} threads, {args.rounds} rounds x {args.tokens} tokens")
        print(f"{'load':8s} {'open s':>7s} {'median tok/s':>13s}  rounds")
        for mode in models:
            print(f"{mode:8s} {open_s[mode]:7.3f} {statistics.median(tps[mode]):13.2f}  "
                  + " ".join(f"{x:.1f}" for x in tps[mode]))
        print(f"ratio memory / mmap: {statistics.median(tps['memory']) / statistics.median(tps['mmap']):.3f}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

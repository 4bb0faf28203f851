"""Decode and prefill speed of the numba forward pass at real Mixtral width.

    python benchmarks/decode.py [--layers 2] [--quant q4_0] [--tokens 32] [--prompt 128]

Writes a random-weight model (hidden 4096, FFN 14336, 8 experts top-2, 32/8 heads, vocab 32000)
into a temp dir, then for 1 and 2 threads reports decode tok/s, prefill tok/s for a 128-token
prompt, bytes of weights read per decoded token, and the effective GB/s that implies. For
llama.cpp on the same weights, side by side, see vs_llamacpp.py; for the bandwidth ceiling of the
same minute and the kernel's instruction counts, roofline.py.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth import write_random_model


def bytes_per_token(model) -> int:
    """Weights a decode step reads: everything but the unused experts and the other embedding rows."""
    store, cfg = model.store, model.config
    total = 0
    for name, t in store.tensors.items():
        if ".experts." in name:
            continue
        if name == "tok_embeddings":
            total += t.nbytes // cfg.vocab_size  # one row
            if cfg.tie_word_embeddings:
                total += t.nbytes
            continue
        total += t.nbytes
    expert = store.experts[(0, 0)].nbytes
    return total + expert * cfg.num_experts_per_tok * cfg.num_hidden_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--quant", default="q4_0")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--prompt", type=int, default=128, help="prefill length")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()

    import mixcli

    tmp = Path(tempfile.mkdtemp(prefix="mixcli-bench-"))
    try:
        t = time.perf_counter()
        path = write_random_model(tmp / "model", quant=args.quant, num_hidden_layers=args.layers)
        print(f"wrote random model in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        model = mixcli.load(path, ctx=args.prompt + args.tokens + 8)
        bpt = bytes_per_token(model)
        rng = np.random.default_rng(0)
        # warm-up: JIT compile and fault the pages in
        model.reset()
        model.prefill(rng.integers(0, 32000, 16).tolist())
        model.decode(5)
        model.reset()
        model.prefill(rng.integers(0, 32000, args.prompt).tolist())
        rows = []
        for th in [int(s) for s in args.threads.split(",")]:
            model.set_threads(th)
            dec, pre = [], []
            for _ in range(args.reps):
                toks = rng.integers(0, 32000, args.prompt).tolist()
                model.reset()
                t0 = time.perf_counter()
                model.prefill(toks)
                pre.append(args.prompt / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                for tok in rng.integers(0, 32000, args.tokens).tolist():
                    model.decode(tok)
                dec.append(args.tokens / (time.perf_counter() - t0))
            d = statistics.median(dec)
            rows.append((th, d, statistics.median(pre), bpt / 2**20, d * bpt / 1e9))
        print(f"\nMixtral-width random model, {args.layers} layers, {args.quant}, median of {args.reps}")
        print(
            f"{'threads':>7} {'decode tok/s':>13} {'prefill tok/s':>14} {'MiB read/token':>15} {'effective GB/s':>15}"
        )
        for th, d, p, mib, gbs in rows:
            print(f"{th:>7} {d:>13.2f} {p:>14.1f} {mib:>15.1f} {gbs:>15.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Runs inside llama-cpp-python's own virtual environment (see vs_llamacpp.py); prints one JSON
line. Kept free of mixcli imports: it only knows llama.cpp.

    python llamacpp_worker.py speed MODEL.gguf --threads N --pp 128 --tg 32
    python llamacpp_worker.py ppl MODEL.gguf --tokens tokens.json --ctx 512 --threads N
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
from llama_cpp import Llama


def speed(args) -> dict:
    llm = Llama(args.model, n_ctx=args.pp + args.tg + 16, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=512, n_ubatch=512, verbose=False, logits_all=False)
    rng = np.random.default_rng(args.seed)
    n_vocab = llm.n_vocab()
    # warm-up
    llm.reset(); llm.eval(rng.integers(3, n_vocab, 8).tolist())
    llm.reset()
    toks = rng.integers(3, n_vocab, args.pp).tolist()
    t = time.perf_counter(); llm.eval(toks); pp = args.pp / (time.perf_counter() - t)
    llm.reset(); llm.eval(toks[:1])
    t = time.perf_counter()
    for tok in rng.integers(3, n_vocab, args.tg).tolist():
        llm.eval([tok])
    tg = args.tg / (time.perf_counter() - t)
    return {"pp_tps": pp, "tg_tps": tg}


def ppl(args) -> dict:
    """llama.cpp's perplexity method on llama.cpp's own logits (same chunking as mixcli's)."""
    tokens = json.load(open(args.tokens))
    ctx = args.ctx
    llm = Llama(args.model, n_ctx=ctx, n_threads=args.threads, n_threads_batch=args.threads, n_batch=ctx,
                n_ubatch=ctx, verbose=False, logits_all=True)
    bos = llm.token_bos() if args.bos else None
    first = ctx // 2
    s = s2 = 0.0
    n = 0
    for c in range(len(tokens) // ctx):
        chunk = list(tokens[c * ctx:(c + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:ctx], dtype=np.float64)  # [ctx, V]
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll = -logp[np.arange(first, ctx - 1), np.asarray(chunk[first + 1:])]
        s += nll.sum(); s2 += (nll * nll).sum(); n += nll.size
    mean = s / n
    p = math.exp(mean)
    return {"ppl": p, "stderr": p * math.sqrt(max(s2 / n - mean * mean, 0) / (n - 1)), "scored": n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["speed", "ppl"])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--bos", action="store_true")
    args = ap.parse_args()
    print(json.dumps(speed(args) if args.mode == "speed" else ppl(args)))


if __name__ == "__main__":
    main()

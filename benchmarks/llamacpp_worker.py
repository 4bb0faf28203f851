"""Runs inside llama-cpp-python's own virtual environment (see vs_llamacpp.py); prints one JSON
line on stdout. Kept free of mixcli imports: it only knows llama.cpp (and numpy).

    python llamacpp_worker.py speed MODEL.gguf --threads N --pp 128 --tg 32 [--seed S] [--warmup 32]
    python llamacpp_worker.py ppl MODEL.gguf --tokens tokens.json --ctx 512 --threads N [--bos] [--chunks C]
    python llamacpp_worker.py tokenize MODEL.gguf --text FILE

speed: one warm-up prefill of --warmup random tokens (pages in the weights the way the measured
runs touch them), then pp = one prefill of --pp random tokens from an empty cache, and tg = --tg
single-token steps after a one-token prefix, timed together; tokens/s for each.
ppl: llama.cpp's perplexity method on the token ids given (the same ids mixcli scores): chunks of
--ctx, first token of each chunk replaced by BOS when --bos, each chunk from an empty cache, the
second half scored: NLL of token j+1 from the logits at j, for j in [ctx/2, ctx-1).
tokenize: llama.cpp's own tokenization of a text (BOS added as the GGUF says), to check that
mixcli's tokenizer produced the same ids.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
from llama_cpp import Llama


def speed(args) -> dict:
    t0 = time.perf_counter()
    llm = Llama(
        args.model,
        n_ctx=max(args.pp, args.warmup) + args.tg + 16,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=512,
        n_ubatch=512,
        verbose=False,
        logits_all=False,
    )
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    n_vocab = llm.n_vocab()
    llm.reset()
    llm.eval(rng.integers(3, n_vocab, args.warmup).tolist())  # warm-up, not timed
    llm.eval([5])
    llm.reset()
    toks = rng.integers(3, n_vocab, args.pp).tolist()
    t = time.perf_counter()
    llm.eval(toks)
    pp = args.pp / (time.perf_counter() - t)
    llm.reset()
    llm.eval(toks[:1])
    gen = rng.integers(3, n_vocab, args.tg).tolist()
    t = time.perf_counter()
    for tok in gen:
        llm.eval([tok])
    tg = args.tg / (time.perf_counter() - t)
    return {"pp_tps": pp, "tg_tps": tg, "load_s": load_s}


def ppl(args) -> dict:
    with open(args.tokens) as fh:
        tokens = json.load(fh)
    ctx = args.ctx
    llm = Llama(
        args.model,
        n_ctx=ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=ctx,
        n_ubatch=ctx,
        verbose=False,
        logits_all=True,
    )
    bos = llm.token_bos() if args.bos else None
    first = ctx // 2
    n_chunks = len(tokens) // ctx
    if args.chunks:
        n_chunks = min(n_chunks, args.chunks)
    if n_chunks == 0:
        raise SystemExit(f"{len(tokens)} tokens: fewer than one chunk of {ctx}")
    s = s2 = 0.0
    n = 0
    for c in range(n_chunks):
        chunk = list(tokens[c * ctx : (c + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:ctx], dtype=np.float64)  # [ctx, V]
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll = -logp[np.arange(first, ctx - 1), np.asarray(chunk[first + 1 :])]
        s += float(nll.sum())
        s2 += float((nll * nll).sum())
        n += nll.size
    mean = s / n
    p = math.exp(mean)
    return {
        "ppl": p,
        "stderr": p * math.sqrt(max(s2 / n - mean * mean, 0.0) / (n - 1)),
        "scored": n,
        "chunks": n_chunks,
        "mean_nll": mean,
    }


def tokenize(args) -> dict:
    llm = Llama(args.model, vocab_only=True, verbose=False)
    with open(args.text, encoding="utf-8") as fh:
        text = fh.read()
    add_bos = bool(llm._model.add_bos_token())
    return {
        "ids": llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False),
        "add_bos": add_bos,
        "bos": llm.token_bos(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["speed", "ppl", "tokenize"])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens")
    ap.add_argument("--text")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=0)
    ap.add_argument("--bos", action="store_true")
    args = ap.parse_args()
    out = {"speed": speed, "ppl": ppl, "tokenize": tokenize}[args.mode](args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

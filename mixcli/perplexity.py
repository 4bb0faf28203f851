"""Perplexity by llama.cpp's method, so our figure and llama-perplexity's are comparable.

The text is tokenized once (with BOS when the model uses one) and split into chunks of ``ctx``
tokens; the first token of each chunk is replaced by BOS; each chunk runs from an empty cache and
only the second half is scored (each scored token has at least ctx/2 tokens of context):
NLL of token j+1 given the logits at j, for j in [ctx/2, ctx-1). PPL = exp(mean NLL), with the
standard error llama.cpp prints: PPL * sqrt(var(NLL) / (n - 1)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UsageError


@dataclass
class PerplexityResult:
    ppl: float
    stderr: float
    n_chunks: int
    n_scored: int
    ctx: int
    mean_nll: float


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """logits [T, V] -> log-probabilities [T, V] in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def perplexity(model, tokens: list[int], ctx: int, bos_id: int | None, progress=None) -> PerplexityResult:
    """tokens: the whole text's ids; ``progress(done, total)`` after each chunk."""
    if ctx < 4:
        raise UsageError(f"--ctx must be at least 4 for perplexity, got {ctx}")
    if ctx > model.ctx:
        raise UsageError(f"--ctx {ctx} exceeds the model's loaded context {model.ctx}")
    n_chunks = len(tokens) // ctx
    if n_chunks == 0:
        raise UsageError(
            f"the text is {len(tokens)} tokens, fewer than one chunk of --ctx {ctx}",
            "use a longer text or a smaller --ctx",
        )
    first = ctx // 2
    nll_sum = nll2_sum = 0.0
    count = 0
    for c in range(n_chunks):
        chunk = list(tokens[c * ctx : (c + 1) * ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        logp = log_softmax(model.logits(chunk))  # [ctx, V]
        targets = np.asarray(chunk[first + 1 :])  # [ctx - first - 1]
        nll = -logp[np.arange(first, ctx - 1), targets]
        nll_sum += float(nll.sum())
        nll2_sum += float((nll * nll).sum())
        count += nll.size
        if progress:
            progress(c + 1, n_chunks)
    mean = nll_sum / count
    var = max(nll2_sum / count - mean * mean, 0.0)
    ppl = math.exp(mean)
    err = ppl * math.sqrt(var / (count - 1)) if count > 1 else float("nan")
    return PerplexityResult(ppl, err, n_chunks, count, ctx, mean)

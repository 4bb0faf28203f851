"""Pick the next token from the logits: llama.cpp's sampler chain, vectorised in numpy.

Order, as llama.cpp's default chain: repetition penalty -> top-k -> top-p -> min-p -> temperature
-> draw. The filters see temperature-1 probabilities, so ``--temperature`` changes how boldly the
model picks among the survivors, never which tokens survive. Temperature 0 means greedy (argmax
after the repetition penalty). Draws come from one numpy Generator per sampler, seeded from
``SamplerConfig.seed``, so the same seed, prompt and model give the same tokens.

Speed: no step sorts or partitions all V logits, which costs milliseconds at V = 32000
(benchmarks/RESULTS.md, "Sampling"). Every filter keeps a best-first prefix of the vocabulary, so
a threshold compare below the best logit finds a small superset of the survivors, and only that is
partitioned and sorted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import UsageError

Sampler = Callable[[np.ndarray, Sequence[int]], int]


@dataclass
class SamplerConfig:
    # llama.cpp's defaults (common/common.h, struct common_params_sampling); written only here.
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1 = off
    min_p: float = 0.05  # 0 = off
    repeat_penalty: float = 1.0  # 1 = off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at; 0 = off, -1 = all
    seed: int | None = None  # None = fresh entropy each run

    def validate(self) -> SamplerConfig:
        """Raise UsageError naming the first bad value; return self so calls can chain."""

        def bad(what: str, value, rule: str):
            raise UsageError(f"{what} must be {rule}, got {value!r}")

        t = self.temperature
        if not (isinstance(t, (int, float)) and t >= 0 and math.isfinite(t)):
            bad("temperature", self.temperature, ">= 0 (0 means greedy)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            bad("top_k", self.top_k, "an integer >= 0 (0 turns it off)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad("top_p", self.top_p, "in (0, 1] (1 turns it off)")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            bad("min_p", self.min_p, "in [0, 1] (0 turns it off)")
        if not (
            isinstance(self.repeat_penalty, (int, float))
            and self.repeat_penalty > 0
            and math.isfinite(self.repeat_penalty)
        ):
            bad("repeat_penalty", self.repeat_penalty, "> 0 (1 turns it off)")
        if not (isinstance(self.repeat_last_n, int) and self.repeat_last_n >= -1):
            bad("repeat_last_n", self.repeat_last_n, "an integer >= -1 (-1 means the whole context)")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            bad("seed", self.seed, "an integer >= 0")
        return self


def _penalized(logits: np.ndarray, history: Sequence[int], cfg: SamplerConfig) -> np.ndarray:
    """x [V] float64: a copy of the logits with llama.cpp's repetition penalty applied.

    Each distinct token among the last ``repeat_last_n`` is penalised once: a positive logit is
    divided by the penalty, a negative one multiplied, so the token always becomes less likely.
    """
    x = np.array(logits, dtype=np.float64).reshape(-1)  # [V], always a copy
    n = cfg.repeat_last_n
    if cfg.repeat_penalty == 1.0 or n == 0 or len(history) == 0:
        return x
    recent = history if n < 0 else history[-n:]
    ids = np.unique(np.asarray(recent, dtype=np.int64))  # [R]
    ids = ids[(ids >= 0) & (ids < x.shape[0])]
    v = x[ids]
    x[ids] = np.where(v <= 0, v * cfg.repeat_penalty, v / cfg.repeat_penalty)
    return x


# How far below the best logit to look first for the survivors (nats); widened until enough.
_GAPS = (6.0, 12.0, 24.0, 48.0)


def _best_first(x: np.ndarray, top: float, enough: Callable[[np.ndarray], bool]) -> np.ndarray:
    """ids [C]: every id whose logit is >= top - gap, for the narrowest gap where ``enough(ids)``.

    Such a set is always a best-first prefix of the vocabulary, so anything a later filter keeps
    is inside it once it is large enough; a compare and ``flatnonzero`` over V cost far less than
    ``argpartition`` or a sort of all V.
    """
    for gap in _GAPS:
        ids = np.flatnonzero(x >= top - gap)
        if enough(ids):
            return ids
    return np.arange(x.shape[0])


def _candidates(x: np.ndarray, cfg: SamplerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Surviving ids [C] and their logits [C] after top-k, top-p and min-p on x [V] (best first if top-p)."""
    v = x.shape[0]
    top = float(x.max())
    k = cfg.top_k if 0 < cfg.top_k < v else v
    if k < v:
        ids = _best_first(x, top, lambda ids: ids.shape[0] >= k)
        if ids.shape[0] > k:
            ids = ids[np.argpartition(-x[ids], k - 1)[:k]]  # the top-k set, unordered
        z = np.exp(x[ids] - top).sum()  # top-p's normaliser: the softmax over the top-k set
    else:
        z = np.exp(x - top).sum()
        if cfg.min_p > 0:
            ids = np.flatnonzero(x >= top + math.log(cfg.min_p))
        elif cfg.top_p < 1.0:
            ids = _best_first(x, top, lambda ids: np.exp(x[ids] - top).sum() >= cfg.top_p * z)
        else:
            ids = np.arange(v)
    vals = x[ids]  # [C]
    if cfg.min_p > 0:
        # min-p keeps p >= min_p * p_max, i.e. logit >= top + log(min_p); both it and top-p keep a
        # best-first prefix, so pruning here first and cutting top-p below gives llama.cpp's result
        keep = vals >= top + math.log(cfg.min_p)
        ids, vals = ids[keep], vals[keep]
    if cfg.top_p < 1.0:
        order = np.argsort(-vals, kind="stable")  # only top-p needs the order
        ids, vals = ids[order], vals[order]
        cum = np.cumsum(np.exp(vals - top)) / z  # [C]
        n = int(np.searchsorted(cum, cfg.top_p, side="left")) + 1  # smallest prefix with mass >= top_p
        ids, vals = ids[:n], vals[:n]
    return ids, vals


def _softmax(vals: np.ndarray, temperature: float) -> np.ndarray:
    e = np.exp((vals - vals.max()) / temperature)
    return e / e.sum()


def filtered_probs(logits: np.ndarray, history: Sequence[int], cfg: SamplerConfig) -> np.ndarray:
    """probs [V] float64: the distribution the sampler draws from (zero outside the survivors)."""
    x = _penalized(logits, history, cfg)
    probs = np.zeros_like(x)
    if cfg.temperature == 0:
        probs[int(np.argmax(x))] = 1.0
        return probs
    ids, vals = _candidates(x, cfg)
    probs[ids] = _softmax(vals, cfg.temperature)
    return probs


def make_sampler(cfg: SamplerConfig) -> Sampler:
    """A function ``(logits [V], token history) -> token id`` with its own seeded generator."""
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)

    def sample(logits: np.ndarray, history: Sequence[int]) -> int:
        x = _penalized(logits, history, cfg)
        if cfg.temperature == 0:
            return int(np.argmax(x))
        ids, vals = _candidates(x, cfg)
        if ids.shape[0] == 1:
            return int(ids[0])
        cum = np.cumsum(_softmax(vals, cfg.temperature))  # [C]
        j = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
        return int(ids[min(j, ids.shape[0] - 1)])

    return sample

"""The token loop, as a generator of response objects that the CLI, the REPL and the Python API
all consume (mlx-lm's shape: the loop yields, the caller renders).

The prompt is matched against what the model's KV cache already holds, and only the new suffix is
prefilled: in a chat, each turn costs only its own tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from .errors import UsageError


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens in the prompt
    prefilled_tokens: int = 0  # of those, tokens actually run (the rest came from the cache)
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    first_token_seconds: float = 0.0  # from the call to the first generated token

    @property
    def prefill_tps(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes from prefill logits; decode steps are completion_tokens - 1
        n = max(self.completion_tokens - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prefilled_tokens": self.prefilled_tokens,
            "completion_tokens": self.completion_tokens,
            "prefill_seconds": round(self.prefill_seconds, 4),
            "decode_seconds": round(self.decode_seconds, 4),
            "prefill_tokens_per_second": round(self.prefill_tps, 2),
            "decode_tokens_per_second": round(self.decode_tps, 2),
            "time_to_first_token": round(self.first_token_seconds, 4),
        }


@dataclass
class GenerationResponse:
    text: str  # new final text since the previous response (may be "")
    token: int | None  # the token sampled at this step (None on the closing response)
    finish_reason: str | None  # None while running; "stop" (EOS or stop string) or "length"
    stats: GenerationStats = field(default_factory=GenerationStats)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _StopMatcher:
    """Holds back text that might be the start of a stop string; cuts at a complete one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def generate(
    model,
    tokenizer,
    prompt_tokens: Sequence[int],
    sampler,
    *,
    max_tokens: int = 256,
    stop: Sequence[str] = (),
    reuse_cache: bool = True,
    should_stop=None,
) -> Iterator[GenerationResponse]:
    """Yield one response per generated token, then a closing one with finish_reason set.

    ``sampler(logits [V], history) -> token id``; ``should_stop()`` lets a caller end early
    (finish_reason "interrupted")."""
    if max_tokens < 0:
        raise UsageError(f"--max-tokens must be >= 0, got {max_tokens}")
    prompt = [int(t) for t in prompt_tokens]
    if not prompt:
        raise UsageError("the prompt is empty", "give some text to continue")
    stats = GenerationStats(prompt_tokens=len(prompt))
    t0 = time.perf_counter()
    keep = common_prefix(model.tokens, prompt) if reuse_cache else 0
    keep = min(keep, len(prompt) - 1)  # at least one token must run to get fresh logits
    model.truncate(keep)
    room = model.ctx - len(prompt)
    if room < 0:
        raise UsageError(
            f"the prompt is {len(prompt)} tokens, the context holds {model.ctx}",
            "raise --ctx, shorten the prompt, or pass --truncate",
        )
    max_tokens = min(max_tokens, room)
    logits = model.prefill(prompt[keep:])
    stats.prefilled_tokens = len(prompt) - keep
    stats.prefill_seconds = time.perf_counter() - t0

    history = list(prompt)
    eos = tokenizer.eos_ids
    detok = tokenizer.stream()
    stopper = _StopMatcher(stop)
    finish = "length"
    hit_stop = False
    for i in range(max_tokens):
        if should_stop is not None and should_stop():
            finish = "interrupted"
            break
        tok = int(sampler(logits, history))
        stats.completion_tokens += 1
        if i == 0:
            stats.first_token_seconds = time.perf_counter() - t0
        if tok in eos:
            finish = "stop"
            break
        history.append(tok)
        text, hit_stop = stopper.feed(detok.push(tok))
        yield GenerationResponse(text, tok, None, stats)
        if hit_stop:
            finish = "stop"
            break
        if i + 1 < max_tokens:
            t = time.perf_counter()
            logits = model.decode(tok)
            stats.decode_seconds += time.perf_counter() - t
    tail = ""
    if not hit_stop:
        tail, hit_stop = stopper.feed(detok.flush())
        if hit_stop:
            finish = "stop"
        else:
            tail += stopper.flush()
    yield GenerationResponse(tail, None, finish, stats)

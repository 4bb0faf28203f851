"""The token loop, as a generator of response objects that the CLI, the REPL and the Python API
all consume (mlx-lm's shape: the loop yields, the caller renders).

The prompt is matched against what the model's KV cache already holds, and only the new suffix is
prefilled: in a chat, each turn costs only its own tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

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


class TokenStream:
    """One sequence's side of the token loop, apart from the forward pass: sample from the
    logits it is given, stop at EOS, a stop string or ``max_tokens``, stream the text. ``generate``
    below drives it over the model's own KV cache; the server drives one per request over a slot
    of a batch (mixcli/batch.py)."""

    def __init__(
        self,
        tokenizer,
        prompt: Sequence[int],
        sampler,
        max_tokens: int,
        stop: Sequence[str] = (),
        stats: GenerationStats | None = None,
        ignore_eos: bool = False,
    ):
        self.history = [int(t) for t in prompt]
        self.sampler = sampler
        self.max_tokens = max_tokens
        self.stats = stats if stats is not None else GenerationStats(prompt_tokens=len(self.history))
        self.eos = () if ignore_eos else tokenizer.eos_ids  # ignore_eos: benchmarks want exact lengths
        self.detok = tokenizer.stream()
        self.stopper = _StopMatcher(stop)
        self.finish: str | None = "length" if max_tokens <= 0 else None  # set once the sequence ended
        self.hit_stop = False

    def sample(self, logits) -> GenerationResponse | None:
        """Sample the next token from ``logits`` [V]: its response, or None if it was EOS. After
        it, ``finish`` is set when the sequence is over; otherwise feed the token to the model."""
        tok = int(self.sampler(logits, self.history))
        self.stats.completion_tokens += 1
        if tok in self.eos:
            self.finish = "stop"
            return None
        self.history.append(tok)
        text, self.hit_stop = self.stopper.feed(self.detok.push(tok))
        if self.hit_stop:
            self.finish = "stop"
        elif self.stats.completion_tokens >= self.max_tokens:
            self.finish = "length"
        return GenerationResponse(text, tok, None, self.stats)

    def close(self, finish: str | None = None) -> GenerationResponse:
        """The closing response: text held back (a partial character or stop string) and the
        finish reason (``finish`` overrides, e.g. "interrupted")."""
        finish = finish or self.finish or "length"
        tail = ""
        if not self.hit_stop:
            tail, self.hit_stop = self.stopper.feed(self.detok.flush())
            if self.hit_stop:
                finish = "stop"
            else:
                tail += self.stopper.flush()
        return GenerationResponse(tail, None, finish, self.stats)


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

    seq = TokenStream(tokenizer, prompt, sampler, max_tokens, stop, stats)
    finish = None
    while seq.finish is None:
        if should_stop is not None and should_stop():
            finish = "interrupted"
            break
        resp = seq.sample(logits)
        if stats.completion_tokens == 1:
            stats.first_token_seconds = time.perf_counter() - t0
        if resp is None:
            break
        yield resp
        if seq.finish is None:
            t = time.perf_counter()
            logits = model.decode(resp.token)
            stats.decode_seconds += time.perf_counter() - t
    yield seq.close(finish)

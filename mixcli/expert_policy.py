"""Which expert leaves the expert cache when a slot is needed: the replacement policies as pure
bookkeeping over (layer, expert) keys, with no memory, threads or model behind them, so recorded
routing can be replayed through them (``replay``) in a test or a benchmark.

"next" (the default) evicts the expert expected back last. An expert's layer comes round again in
d layer steps and it is then chosen with probability p (its decayed use count, half-life 8 tokens,
over that of an every-token expert), so it is expected back in d + L(1-p)/p steps. With steady
routing this approaches Belady's choice where LRU and LFU evict each expert just before its next
use (a token walks the layers in a cycle, and a cycle longer than the pool defeats recency); with
random routing it keeps the most used experts, as LFU does. "lfu" (decayed use count) and "lru"
(last use) remain selectable; ``benchmarks/expert_cache.py`` compares them on recorded routing.
"""

from __future__ import annotations

import numpy as np

from .errors import UsageError

POLICIES = ("next", "lfu", "lru")
DEFAULT_POLICY = "next"
DEFAULT_HALF_LIFE = 8.0  # tokens: how fast the use count forgets (benchmarks/expert_cache.py)

Key = tuple[int, int]  # (layer, expert)


def next_use_score(decayed: float, layer: int, cur_layer: int, n_layers: int, half_life: float) -> float:
    """Minus the expected number of layer steps until an expert is used again (higher = keep):
    d + L (1 - p) / p, d the steps until its layer comes round (L for the current layer: the
    next token), p its decayed use count over the count of an expert used on every token."""
    steady = 1.0 / (1.0 - 0.5 ** (1.0 / half_life))  # the decayed count of an every-token expert
    p = min(1.0, max(decayed / steady, 1e-3))
    d = (layer - cur_layer) % n_layers or n_layers
    return -(d + n_layers * (1.0 - p) / p)


class ReplacementPolicy:
    """Use history of every (layer, expert), kept also for experts not held, so a hot expert that
    was pushed out comes back with its history. The clock counts tokens."""

    def __init__(self, name: str, n_layers: int, n_experts: int, half_life: float = DEFAULT_HALF_LIFE):
        if name not in POLICIES:
            raise UsageError(f"unknown expert cache policy {name!r}", f"use one of {', '.join(POLICIES)}")
        self.name = name
        self.n_layers = n_layers
        self.half_life = float(half_life)
        self.clock = 0.0  # tokens seen
        self.layer = 0  # the layer the forward pass is in
        self._last = np.zeros((n_layers, n_experts), np.float64)  # [L, E] clock at last use
        self._freq = np.zeros((n_layers, n_experts), np.float64)  # [L, E] decayed use count at _last

    def tick(self, n_tokens: int) -> None:
        """n_tokens more tokens entered the first layer."""
        self.clock += n_tokens

    def enter(self, layer: int) -> None:
        self.layer = layer

    def use(self, key: Key) -> None:
        layer, e = key
        self.layer = layer
        if self.name != "lru":
            self._freq[layer, e] = self.decayed(key) + 1.0
        self._last[layer, e] = self.clock + 1e-6 * (layer + 1)  # later layers of a token are more recent

    def decayed(self, key: Key) -> float:
        layer, e = key
        return self._freq[layer, e] * 0.5 ** ((self.clock - self._last[layer, e]) / self.half_life)

    def score(self, key: Key) -> float:
        """Higher = keep."""
        if self.name == "next":
            return next_use_score(self.decayed(key), key[0], self.layer, self.n_layers, self.half_life)
        return self.decayed(key) if self.name == "lfu" else float(self._last[key])

    def rank(self, key: Key | None, *, needed: bool = False, prefetched: bool = False) -> tuple[int, float]:
        """Eviction order of a slot holding key (the lowest goes first): an empty slot, then an
        ordinary resident, then one read ahead and not used yet, then one the current layer still
        needs; by score within each."""
        if key is None:
            return (0, 0.0)
        return (3 if needed else 2 if prefetched else 1, self.score(key))


def replay(routing: np.ndarray, n_slots: int, policy: ReplacementPolicy) -> int:
    """Hits of a pool of n_slots experts without read-ahead over recorded decode routing
    [N, L, K] (each token's chosen experts, layer by layer, in the order the MoE layer asks for
    them), by the rules the expert cache follows; every other request is a miss."""
    held: list[Key | None] = [None] * n_slots
    hits = 0
    for token in routing:
        policy.tick(1)
        for layer, chosen in enumerate(token):
            policy.enter(layer)
            needed = {(layer, int(e)) for e in chosen}
            for e in chosen:
                key = (layer, int(e))
                needed.discard(key)
                policy.use(key)
                if key in held:
                    hits += 1
                    continue
                victim = min(range(n_slots), key=lambda i: policy.rank(held[i], needed=held[i] in needed))
                held[victim] = key
    return hits

"""The expert cache's replacement policies on recorded routing, without a model: a replay of
routing [N, L, K] through ``expert_policy.replay`` counts the hits a pool of slots would get."""

from __future__ import annotations

import numpy as np
import pytest

from mixcli.errors import UsageError
from mixcli.expert_policy import POLICIES, ReplacementPolicy, next_use_score, replay

L, E = 4, 8


def _hits(routing: np.ndarray, n_slots: int) -> dict[str, int]:
    return {p: replay(routing, n_slots, ReplacementPolicy(p, L, E)) for p in POLICIES}


def test_lfu_keeps_a_hot_expert_that_lru_would_evict():
    """Layer 0 always routes to expert 0; layers 1-3 each to a different expert every token; three
    slots. LRU evicts the hot expert every token (three other experts come between its uses).
    LFU loses it once too (after one use it counts no more than the others), but from its second
    use on it outscores every one-off, so all its later uses hit."""
    N = 8
    routing = np.zeros((N, L, 1), np.int64)
    for t in range(N):
        routing[t, 1:, 0] = 1 + t % (E - 1)
    hits = _hits(routing, 3)
    assert hits["lru"] == 0
    assert hits["lfu"] == N - 2  # every use of (0, 0) after the second


def test_next_use_survives_a_cycle_longer_than_the_pool():
    """Every token routes experts 0 and 1 in every layer: 8 experts cycle through 5 slots. LRU
    and LFU (equal counts, so oldest first) evict each expert just before its next use; the
    next-use policy evicts the one whose layer comes round last, as Belady would."""
    N = 6
    routing = np.tile(np.array([0, 1]), (N, L, 1))  # [N, L, 2]
    hits = _hits(routing, 5)
    assert hits["lru"] == 0 and hits["lfu"] == 0
    assert hits["next"] >= 3 * (N - 1)  # at least 3 of 8 per token once the pool is warm


def test_a_pool_holding_every_routed_expert_misses_each_only_once():
    rng = np.random.default_rng(0)
    routing = np.stack([np.stack([rng.choice(E, 2, replace=False) for _ in range(L)]) for _ in range(20)])  # [20, L, 2]
    distinct = len({(layer, int(e)) for tok in routing for layer, ch in enumerate(tok) for e in ch})
    for policy, h in _hits(routing, L * E).items():
        assert h == routing.size - distinct, policy


def test_an_expert_this_layer_still_needs_is_not_evicted_for_its_sibling():
    """Two slots, one layer. Token 0 routes experts 1 then 0 (slot 0 holds 1, slot 1 holds 0),
    token 1 routes 2 then 1. Loading 2 must evict one of two equally scored experts; the first
    slot (expert 1) would go by score alone, but token 1 still needs it, so 0 goes and 1 hits."""
    routing = np.array([[[1, 0]], [[2, 1]]])  # [N=2, L=1, K=2]
    for policy in POLICIES:
        assert replay(routing, 2, ReplacementPolicy(policy, 1, E)) == 1, policy


def test_next_use_score_orders_by_expected_return():
    hl = 8.0
    steady = 1 / (1 - 0.5 ** (1 / hl))
    # an every-token expert of the next layer comes back before one three layers ahead
    assert next_use_score(steady, 2, 1, L, hl) > next_use_score(steady, 0, 1, L, hl)
    # among experts of one layer, the more often chosen one is expected back sooner
    assert next_use_score(steady / 2, 3, 1, L, hl) > next_use_score(steady / 8, 3, 1, L, hl)
    # certain routing: the wait is the distance to the layer (the current layer: a full cycle)
    assert next_use_score(steady, 3, 1, L, hl) == -2 and next_use_score(steady, 1, 1, L, hl) == -L


def test_unknown_policy_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown expert cache policy 'fifo'"):
        ReplacementPolicy("fifo", L, E)

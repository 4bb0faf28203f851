"""Guesses which experts layer l+1 will choose while layer l runs (mixtral-offloading's trick):
layer l+1's router applied to layer l's MoE input, so the expert cache can read them ahead.

The guess is better when that input is rescaled elementwise by ffn_norm[l+1] / ffn_norm[l]: it is
then what layer l+1's router would see if the residual stream did not move between the two
layers. Both guesses, corrected and raw, are scored, so the correction's worth stays measured.

A wrong guess is not free: its read takes disk time from the experts actually needed and evicts a
resident one. Each layer's recent accuracy is kept (``trusted``): below GUESS_MIN_ACCURACY the cache
stops reading that layer's guesses (it still guesses and scores, so it starts again when they come
right). What skipping saves where the routing defeats the guess is measured at full size in
benchmarks/RESULTS.md (2026-12-04): the reads left are then mostly misses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .model import Block

GUESS_MIN_ACCURACY = 0.5  # a guess read pays when right at least as often as wrong (disk-bound)
ACCURACY_WEIGHT = 1 / 8  # each scored token's weight in a layer's running accuracy


class NextLayerPredictor:
    def __init__(self, n_layers: int, n_experts: int, top_k: int, use_next_norm: bool = True):
        self.L, self.E, self.K = n_layers, n_experts, top_k
        self.use_next_norm = use_next_norm
        self._gates_next: list[np.ndarray | None] = [
            None
        ] * n_layers  # [E, D] layer l's gate, norm-corrected for l-1's input
        self._gates_raw: list[np.ndarray | None] = [None] * n_layers  # [E, D]
        self._guess: dict[int, tuple[set[int], set[int]]] = {}  # layer -> (guess, raw guess), one token
        self.accuracy = np.ones(n_layers)  # [L] running share of each layer's guessed experts it chose

    def attach(self, blocks: Sequence[Block]) -> None:
        """Take each layer's router and the norm weights around it."""
        for li in range(1, self.L):
            gate = blocks[li].moe.gate
            if gate is None:
                continue
            prev, cur = blocks[li - 1].ffn_norm, blocks[li].ffn_norm  # [D]
            ratio = np.divide(cur, prev, out=np.zeros_like(cur), where=np.abs(prev) > 1e-12)  # [D]
            self._gates_raw[li] = gate  # [E, D]
            self._gates_next[li] = np.ascontiguousarray(gate * ratio[None, :], dtype=np.float32)  # [E, D]

    def predict(self, layer: int, x: np.ndarray) -> list[int]:
        """Layer+1's likely experts, likeliest first, from layer's MoE input x [T, D]: for one
        token its guessed top K (kept to be scored), for a batch every expert some token's guess
        picks, by how many ([] after the last layer or without routers)."""
        nxt = layer + 1
        if nxt >= self.L or self._gates_next[nxt] is None:
            return []
        K, E = self.K, self.E
        if x.shape[0] == 1:
            guess = np.argsort(-(self._gates_next[nxt] @ x[0]), kind="stable")[:K]  # [K]
            raw = np.argsort(-(self._gates_raw[nxt] @ x[0]), kind="stable")[:K]  # [K]
            self._guess[nxt] = ({int(e) for e in guess}, {int(e) for e in raw})
            return [int(e) for e in (guess if self.use_next_norm else raw)]
        gate = self._gates_next[nxt] if self.use_next_norm else self._gates_raw[nxt]
        g = x @ gate.T  # [T, E]
        top = np.argpartition(-g, K - 1, axis=1)[:, :K] if K < E else np.tile(np.arange(E), (x.shape[0], 1))  # [T, K]
        votes = np.bincount(top.ravel(), minlength=E)  # [E]
        return [int(e) for e in np.argsort(-votes, kind="stable") if votes[e] > 0]

    def score(self, layer: int, chosen: set[int]) -> tuple[int, int, int]:
        """The one-token guess made for layer against what its router chose:
        (experts chosen, of them guessed, of them guessed raw); zeros when none was made."""
        guess = self._guess.pop(layer, None)
        if guess is None:
            return 0, 0, 0
        used = guess[0] if self.use_next_norm else guess[1]
        self.accuracy[layer] += (len(used & chosen) / max(1, len(chosen)) - self.accuracy[layer]) * ACCURACY_WEIGHT
        return len(chosen), len(guess[0] & chosen), len(guess[1] & chosen)

    def trusted(self, layer: int) -> bool:
        """Whether guesses for ``layer`` have lately been right often enough to read them ahead."""
        return layer < self.L and bool(self.accuracy[layer] >= GUESS_MIN_ACCURACY)

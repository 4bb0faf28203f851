"""Where the forward pass gets an expert's weights, and what it counts while doing so.

Every MoE layer asks ``provider.get(layer, expert)`` for the three matrices of each expert the
router picked, and nothing else: an expert that no token routes to is never touched, so its pages
never leave the disk. ``MappedExperts`` hands out views of the memory map and counts; a caching
provider (memory budget, prefetch) can replace it behind the same two methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .linear import Linear
from .store import ModelStore


@dataclass
class ExpertWeights:
    w1: Linear  # [F, D] gate projection
    w3: Linear  # [F, D] up projection
    w2: Linear  # [D, F] down projection
    nbytes: int  # bytes of the contiguous [w1 | w3 | w2] region


@dataclass
class ExpertStats:
    """Counters since the last reset: which experts were used, how many bytes they span."""

    n_layers: int
    n_experts: int
    counts: np.ndarray = field(init=False)  # [L, E] int64: token-expert assignments
    touched: np.ndarray = field(init=False)  # [L, E] int64: forward calls that read the expert
    bytes_read: int = 0  # expert weight bytes read, counting each expert once per forward call
    tokens: int = 0  # tokens processed

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.counts = np.zeros((self.n_layers, self.n_experts), dtype=np.int64)
        self.touched = np.zeros((self.n_layers, self.n_experts), dtype=np.int64)
        self.bytes_read = 0
        self.tokens = 0


class MappedExperts:
    """Experts as plain views of the memory map: the OS page cache does the caching."""

    def __init__(self, store: ModelStore, kernels):
        cfg = store.config
        self.stats = ExpertStats(cfg.num_hidden_layers, cfg.num_local_experts)
        self._experts: dict[tuple[int, int], ExpertWeights] = {}
        for (layer, e), region in store.experts.items():
            p = f"layers.{layer}.experts.{e}."
            self._experts[(layer, e)] = ExpertWeights(
                Linear(store.tensor(p + "w1"), kernels),
                Linear(store.tensor(p + "w3"), kernels),
                Linear(store.tensor(p + "w2"), kernels),
                region.nbytes,
            )

    def get(self, layer: int, expert: int, n_tokens: int) -> ExpertWeights:
        """The weights of one routed expert, used for n_tokens tokens of this forward call."""
        w = self._experts[(layer, expert)]
        self.stats.counts[layer, expert] += n_tokens
        self.stats.touched[layer, expert] += 1
        self.stats.bytes_read += w.nbytes
        return w

"""Where the MoE layer gets an expert's weights, and what it counts while doing so.

``ExpertProvider`` is the seam between the forward pass and expert memory: the layer tells the
provider which experts the router chose (``on_route``), then asks for each one's three matrices
(``get``). An expert that no token routes to is never touched, so its pages never leave the disk.
``MappedExperts`` hands out views of the model's memory map and counts; ``ExpertCache``
(expert_cache.py) holds experts in a budgeted pool and reads ahead on ``on_route``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from .linear import Linear
from .store import ModelStore

if TYPE_CHECKING:
    from .model import Model


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

    def record(self, layer: int, expert: int, n_tokens: int, nbytes: int) -> None:
        """One routed expert handed out for n_tokens tokens of a forward call."""
        self.counts[layer, expert] += n_tokens
        self.touched[layer, expert] += 1
        self.bytes_read += nbytes


@runtime_checkable
class ExpertProvider(Protocol):
    """What the MoE layer needs from whoever holds the experts. Per MoE layer and forward call:
    one ``on_route``, then one ``get`` per distinct chosen expert, in the order the layer runs
    them (top-k order for one token, expert id order for a batch). A dense model's layers skip
    ``on_route`` and ``get`` expert 0."""

    stats: ExpertStats  # the forward pass adds its token count; --stats and /stats read it

    def attach(self, model: Model) -> None:
        """The model is built: take what the provider needs from it (the cache: router weights)."""

    def on_route(self, layer: int, x: np.ndarray, experts: np.ndarray) -> None:
        """Layer ``layer``'s router chose experts [T, K] int32 (most probable first) for its
        input x [T, D]."""

    def get(self, layer: int, expert: int, n_tokens: int) -> ExpertWeights:
        """One chosen expert's weights, used for n_tokens tokens; valid until the next ``get``."""


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

    def attach(self, model: Model) -> None:
        pass  # the views need nothing from the model

    def on_route(self, layer: int, x: np.ndarray, experts: np.ndarray) -> None:
        pass  # the OS pages experts in when the kernels touch them

    def get(self, layer: int, expert: int, n_tokens: int) -> ExpertWeights:
        w = self._experts[(layer, expert)]
        self.stats.record(layer, expert, n_tokens, w.nbytes)
        return w

"""A stored weight matrix bound to the kernels that multiply by it.

The forward pass never looks at quant types: it calls ``matvec`` (decode, one token) or
``matmul`` (prefill, a batch of tokens) and this class dispatches on the storage type once, at
load time, so the per-token path is one Python call per matrix.
"""

from __future__ import annotations

import numpy as np

from quant.formats import QUANT_TYPES

from .store import QTensor


class Linear:
    __slots__ = ("name", "qtype", "n", "k", "nbytes", "_args", "_mv", "_mm", "_row")

    def __init__(self, t: QTensor, kernels):
        self.name = t.name
        self.qtype = t.qtype
        self.n, self.k = t.shape  # N output rows, K input columns
        self.nbytes = t.nbytes
        # the kernels take the parts in the type's order: w; qs, d; qs, d, m; qs, s, d, m (q4_k)
        self._args = tuple(t.parts[name] for name in QUANT_TYPES[t.qtype].parts)
        if getattr(kernels, "FP16_AS_U16", False):  # the numba kernels take fp16 as its bits: view once
            self._args = tuple(a.view(np.uint16) if a.dtype == np.float16 else a for a in self._args)
        self._mv = getattr(kernels, f"matvec_{t.qtype}")
        self._mm = getattr(kernels, f"matmul_{t.qtype}")
        self._row = getattr(kernels, f"dequant_row_{t.qtype}")

    def matvec(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """x [K] f32 -> out [N] f32."""
        self._mv(*self._args, x, out)
        return out

    def matmul(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """X [T, K] f32 -> out [T, N] f32; T == 1 takes the decode kernel."""
        if x.shape[0] == 1:
            self._mv(*self._args, x[0], out[0])
        else:
            self._mm(*self._args, x, out)
        return out

    def row(self, i: int, out: np.ndarray) -> np.ndarray:
        """Row i dequantized into out [K] (the embedding lookup)."""
        self._row(*self._args, i, out)
        return out

"""The kernel table: every kernel a model calls, for one instruction-set tier and activation mode.

``Model``, ``Linear`` and the expert cache receive a ``KernelTable`` and look kernels up by name
(``matvec_<qtype>``, ``matmul_<qtype>``, ``dequant_row_<qtype>``, ``rmsnorm``, ``attention``, ...),
so the choice is made once, when the table is built, and nothing is rebound afterwards. A table
costs nothing until its kernels run: numba compiles a driver the first time a model calls it.
"""

from __future__ import annotations

from quant.formats import QUANT_TYPES

from . import f32, int8, kquants, ops
from .act import act, pact
from .attn import (
    attention,
    attention_prefill,
    attention_prefill_q8_0,
    attention_q8_0,
    attention_slots,
    slot_caches,
    store_attend_slots,
)
from .irgen import _u16
from .isa import tier

ACT_MODES = ("int8x2", "int8", "f32")  # two int8 levels, llama.cpp's one level, exact f32
LEVELS = {"int8x2": 2, "int8": 1, "f32": 0}
_OPS = (
    "rmsnorm",
    "rope_inplace",
    "silu_mul",
    "route_topk",
    "add_scaled",
    "matvec_f16",
    "matvec_f32",
    "matmul_f16",
    "matmul_f32",
)


def _int8_pair(drv_mv, drv_mm, nparts: int, L: int):
    """(matvec, matmul) taking a storage type's parts in their manifest order (qs, d[, m] or qs, s,
    d, m), fp16 parts as float16 or as uint16 bits; no-min types pass d again as m."""
    if nparts == 2:

        def mv(qs, d, x, out):
            d = _u16(d)
            drv_mv(qs, d, d, x, *act(1, x.shape[0], L), out)

        def mm(qs, d, X, out):
            d = _u16(d)
            drv_mm(qs, d, d, X, *pact(X.shape[0], X.shape[1], L), out)
    elif nparts == 3:

        def mv(qs, d, m, x, out):
            drv_mv(qs, _u16(d), _u16(m), x, *act(1, x.shape[0], L), out)

        def mm(qs, d, m, X, out):
            drv_mm(qs, _u16(d), _u16(m), X, *pact(X.shape[0], X.shape[1], L), out)
    else:

        def mv(qs, s, d, m, x, out):
            drv_mv(qs, s, _u16(d), _u16(m), x, *act(1, x.shape[0], L), out)

        def mm(qs, s, d, m, X, out):
            drv_mm(qs, s, _u16(d), _u16(m), X, *pact(X.shape[0], X.shape[1], L), out)

    return mv, mm


class KernelTable:
    """Kernels by name for (instruction-set tier ``isa``, activation mode ``act``)."""

    FP16_AS_U16 = True  # fp16 parts may be passed as their uint16 bits (Linear views them once)

    def __init__(self, isa: str, act: str):
        if act not in ACT_MODES:
            raise ValueError(f"activation mode {act!r} is not one of {', '.join(ACT_MODES)}")
        self.isa, self.act, self.levels = isa, act, LEVELS[act]
        self.attention = attention
        self.attention_slots = attention_slots  # one decode token per slot, each over its own cache
        self.slot_caches, self.store_attend_slots = slot_caches, store_attend_slots  # the same, stores included
        self.attention_q8_0 = attention_q8_0  # the q8_0 KV cache (mixcli.kv_cache)
        self.attention_prefill, self.attention_prefill_q8_0 = attention_prefill, attention_prefill_q8_0  # tiled
        for name in _OPS:
            setattr(self, name, getattr(ops, name))
        t = tier(isa)
        for qtype, spec in QUANT_TYPES.items():
            if qtype in kquants.QTYPES:  # GGUF's K-quants: one plain-numba set for every tier
                for op, fn in kquants.kernels(qtype, self.levels).items():
                    setattr(self, f"{op}_{qtype}", fn)
                continue
            setattr(self, f"dequant_row_{qtype}", getattr(f32, f"dequant_row_{qtype}"))
            if qtype in ("f16", "f32"):
                continue
            if self.levels and qtype in int8.QTYPES:
                mv, mm = _int8_pair(
                    int8.driver(t, qtype, "mv", self.levels),
                    int8.driver(t, qtype, "mm", self.levels),
                    len(spec.parts),
                    self.levels,
                )
            else:
                mv, mm = getattr(f32, f"matvec_{qtype}"), getattr(f32, f"matmul_{qtype}")
            setattr(self, f"matvec_{qtype}", mv)
            setattr(self, f"matmul_{qtype}", mm)

    @property
    def label(self) -> str:
        """'avx2 int8x2': what the run statistics and bench titles print."""
        return f"{self.isa} {self.act}"

    def __repr__(self):
        return f"<KernelTable {self.label}>"

"""The numba kernels of the forward pass, one table per instruction-set tier.

    from mixcli import kernels
    table = kernels.select()                  # the host's best tier, default activation mode
    table = kernels.select("avx2", "int8")    # or a lower tier / another mode, explicitly
    table.matvec_q4_0r16(qs, d, x, out)

Modules (dependencies point down the list; none imports the package):

- ``table``: ``KernelTable``, every kernel a model calls, by name, for one (tier, mode).
- ``isa``: which tiers the host executes; ``MIXCLI_ISA`` picks a lower one.
- ``tier`` and the family modules ``x86_avx512``, ``x86_avx2``, ``generic``: the byte dot product
  and tile sizes of each tier.
- ``tiles``: the int8 tiles as LLVM IR generators over a tier; ``int8``: their parallel drivers.
- ``act``: int8 activation rounding and scratch; ``f32``: f32-activation kernels and embedding rows;
  ``ops``: float matrices, norms, RoPE, SiLU, routing; ``attn``: attention over the fp16 KV cache.
- ``irgen``: IR building blocks; ``ref``: the numpy twin of every kernel.

Shapes use DESIGN.md's letters: N output rows, K input columns, NB = K / 32 blocks, T tokens,
D hidden, H / KVH heads, HD head dim, S cache positions, E experts, F FFN width.
"""

from __future__ import annotations

import functools
import os
import threading

from .isa import TIERS, IsaError, host_tiers, resolve
from .table import ACT_MODES, KernelTable

DEFAULT_ACT = "int8x2"  # two int8 levels: the default model still answers "Paris" (README)


def resolve_act(act: str | None = None, source: str = "$MIXCLI_ACT") -> str:
    """The activation mode: ``act`` (None: $MIXCLI_ACT, else DEFAULT_ACT), checked."""
    act = act if act is not None else (os.environ.get("MIXCLI_ACT") or DEFAULT_ACT)
    if act not in ACT_MODES:
        raise ValueError(f"{source} must be one of {', '.join(ACT_MODES)}, got {act!r}")
    return act


def select(isa: str | None = None, act: str | None = None) -> KernelTable:
    """The kernel table for a tier (None: $MIXCLI_ISA, else the host's best) and an activation
    mode (None: $MIXCLI_ACT, else DEFAULT_ACT). Raises IsaError / ValueError for bad names."""
    return _table(resolve(isa), resolve_act(act))


@functools.cache
def _table(isa: str, act: str) -> KernelTable:
    return KernelTable(isa, act)


COMPILE_NOTICE = "compiling kernels for this CPU (first run only)..."
_notice_lock = threading.Lock()
_notice_pending: list = []


def on_first_compile(callback) -> None:
    """Call ``callback()`` once, when this process first compiles a kernel instead of loading it
    from numba's cache (a first run, a new CPU, or changed kernel sources). Costs nothing when
    every kernel comes from the cache."""
    from numba.core import event

    class _Once(event.Listener):
        def on_start(self, ev):
            with _notice_lock:
                pending, _notice_pending[:] = list(_notice_pending), []
            for cb in pending:
                cb()

        def on_end(self, ev):
            pass

    with _notice_lock:
        first = not _notice_pending and not getattr(on_first_compile, "_registered", False)
        _notice_pending.append(callback)
        if first:
            on_first_compile._registered = True
            event.register("numba:compile", _Once())


__all__ = [
    "COMPILE_NOTICE",
    "on_first_compile",
    "ACT_MODES",
    "DEFAULT_ACT",
    "TIERS",
    "IsaError",
    "KernelTable",
    "host_tiers",
    "resolve",
    "resolve_act",
    "select",
]

"""Which instruction-set tiers this host can execute, and which one runs.

Tiers, best first: ``avx512vnni``, ``avxvnni``, ``avx2``, ``generic``. The host's best tier runs
unless ``MIXCLI_ISA`` (or an explicit choice) names a lower one; naming a tier the host cannot
execute is an error rather than a SIGILL. Features come from LLVM's view of the host, the same
view numba compiles for; with ``NUMBA_CPU_NAME`` set (a portable cache target) only the generic
tier is safe.
"""

from __future__ import annotations

import functools
import os

import llvmlite.binding as llvm
import numba

from .generic import Generic
from .tier import Tier
from .x86_avx2 import Avx2, AvxVnni
from .x86_avx512 import Avx512Vnni

TIERS = ("avx512vnni", "avxvnni", "avx2", "generic")  # best first
_NEEDS = {  # LLVM host feature names each tier needs
    "avx512vnni": ("avx512vnni", "avx512vl", "avx512bw", "avx2", "fma", "f16c"),
    "avxvnni": ("avxvnni", "avx2", "fma", "f16c"),
    "avx2": ("avx2", "fma", "f16c"),
    "generic": (),
}


class IsaError(ValueError):
    """An instruction-set tier that does not exist or that this host cannot execute."""


@functools.lru_cache(maxsize=1)
def _features() -> frozenset[str]:
    if numba.config.CPU_NAME not in (None, "host"):
        return frozenset()  # a portable cache target: nothing beyond the baseline is safe
    return frozenset(name for name, on in llvm.get_host_cpu_features().items() if on)


def host_tiers(features=None) -> tuple[str, ...]:
    """The tiers this host can execute, best first (always ending with ``generic``)."""
    feats = _features() if features is None else frozenset(features)
    return tuple(t for t in TIERS if all(f in feats for f in _NEEDS[t]))


def resolve(name: str | None = None, source: str = "$MIXCLI_ISA") -> str:
    """The tier to run: ``name`` (None: $MIXCLI_ISA, else the host's best)."""
    name = name if name is not None else (os.environ.get("MIXCLI_ISA") or None)
    runnable = host_tiers()
    if name is None:
        return runnable[0]
    if name not in TIERS:
        raise IsaError(f"{source} must be one of {', '.join(TIERS)}, got {name!r}")
    if name not in runnable:
        raise IsaError(f"{source}={name}: this CPU cannot execute it (it can run {', '.join(runnable)})")
    return name


@functools.cache
def tier(name: str) -> Tier:
    """The code generator of a tier (whether the host can run it is ``resolve``'s question)."""
    if name == "avx512vnni":
        return Avx512Vnni(gfni="gfni" in _features())
    return {"avxvnni": AvxVnni, "avx2": Avx2, "generic": Generic}[name]()

"""mixcli: run Mixtral-class Mixture-of-Experts models on a CPU from 4-bit memory-mapped weights.

Python API::

    import mixcli
    model = mixcli.load("~/models/mixtral-q4")
    logits = model.logits([1, 415, 2936])   # [T, V] float32
"""
from __future__ import annotations

__version__ = "0.1.0"


def load(path, ctx=None, threads=None, **kw):
    """Open a converted model directory; see mixcli.model.Model."""
    from .model import load as _load

    return _load(path, ctx=ctx, threads=threads, **kw)


__all__ = ["load", "__version__"]

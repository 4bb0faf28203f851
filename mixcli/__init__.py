"""mixcli: run Mixtral-class Mixture-of-Experts models on a CPU from 4-bit memory-mapped weights.

Python API (mixcli/api.py)::

    import mixcli
    model = mixcli.load("~/models/mixtral-q4")   # or a registry name; None: the default model
    logits = model.logits([1, 415, 2936])        # [T, V] float32
    text = mixcli.generate(model, [{"role": "user", "content": "Hi"}], max_tokens=64)
    for r in mixcli.stream_generate(model, "Once upon a time", max_tokens=32):
        print(r.text, end="")
"""

from __future__ import annotations

__version__ = "0.1.0"

# the submodule mixcli.generate (the token loop) is loaded first, so that the function below, not
# the module, is what ``mixcli.generate`` names (a submodule binds its name on first import only)
from . import generate as _token_loop  # noqa: F401


def load(name_or_path=None, ctx=None, threads=None, **kw):
    """Open a model (path, registry name, or None for the default); see mixcli.api.load."""
    from .api import load as _load

    return _load(name_or_path, ctx=ctx, threads=threads, **kw)


def generate(model, prompt, **kw) -> str:
    """The generated text; see mixcli.api.stream_generate for the arguments."""
    from .api import generate as _generate

    return _generate(model, prompt, **kw)


def stream_generate(model, prompt, **kw):
    """Yield GenerationResponse objects (text, token, finish_reason, stats); see mixcli.api."""
    from .api import stream_generate as _stream

    return _stream(model, prompt, **kw)


__all__ = ["load", "generate", "stream_generate", "__version__"]

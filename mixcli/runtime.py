"""What `generate` and `chat` share: resolve a model argument, load the model and its tokenizer,
and turn text (or a conversation) into prompt tokens with the model's own chat template."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import MixcliError, UsageError
from .memsize import format_size


@dataclass
class Runtime:
    path: Path
    model: object  # mixcli.model.Model
    tokenizer: object  # mixcli.tokenizer.Tokenizer
    template: str | None  # Jinja chat template text, or None for a base model without one
    add_bos: bool

    @property
    def name(self) -> str:
        return self.path.name

    def chat_prompt(self, messages: list[dict]) -> tuple[list[int], str | None]:
        """Conversation -> prompt tokens ending in the assistant's turn, plus a notice (e.g. the
        system message was folded into the first user turn because the template rejects it)."""
        from .chat_template import render_conversation

        if self.template is None:
            raise MixcliError(f"{self.name} has no chat template", "use --raw for a base model")
        tok = self.tokenizer
        text, notice = render_conversation(
            self.template, messages, bos_token=tok.bos_token, eos_token=tok.eos_token, add_generation_prompt=True
        )
        return tok.encode(text, add_bos=False, parse_special=True), notice

    def raw_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=self.add_bos, parse_special=False)


def load_runtime(model_arg: str | None, *, ctx: int | None = None, threads: int | None = None,
                 max_memory: str | None = None, mmap: bool | None = None, act: str | None = None,
                 notify=None) -> Runtime:
    from .chat_template import FALLBACK_TEMPLATES
    from .tokenizer import load_tokenizer

    model, path = load_runtime_model(model_arg, ctx=ctx, threads=threads, max_memory=max_memory, mmap=mmap,
                                     act=act, notify=notify)
    info = model.store.tokenizer_info
    if not info:
        raise MixcliError(f"{path} carries no tokenizer", "re-convert it from a checkpoint that has tokenizer files")
    tokenizer = load_tokenizer(path, info)
    template = info.get("chat_template") or FALLBACK_TEMPLATES.get(info.get("template_family") or "")
    return Runtime(path, model, tokenizer, template, bool(info.get("add_bos", False)))


def load_runtime_model(model_arg: str | None, *, ctx: int | None = None, threads: int | None = None,
                       max_memory: str | None = None, mmap: bool | None = None, act: str | None = None,
                       notify=None):
    """The model alone (no tokenizer), for benchmarks: (Model, path). ``mmap``: True maps the
    weights, False reads them into memory, None decides by size (``store.resolve_load_mode``,
    with a --max-memory budget as the limit when one is given). ``act``: the activation
    arithmetic (``kernels.ACT_MODES``; None: $MIXCLI_ACT or the default), checked before the model
    is opened so a typo costs no load time."""
    from .model import Model
    from .registry import resolve_model
    from quant.formats import FORMAT_VERSION

    from .store import open_model_dir

    def _pull(target):
        from .pull import offer_pull

        return offer_pull(target, notify=notify)

    if act is not None or os.environ.get("MIXCLI_ACT"):
        select_activation_mode(act, "--act" if act is not None else "$MIXCLI_ACT")
    path = resolve_model(model_arg, pull=_pull, notify=notify)
    budget = None
    if max_memory:
        from .memsize import parse_size

        budget = parse_size(max_memory)
        if mmap is False:
            from .store import model_bytes

            size = model_bytes(path)
            if size > budget:
                raise UsageError(f"--no-mmap reads the whole model ({format_size(size)}) into memory, "
                                 f"more than --max-memory {max_memory}", "drop --no-mmap or raise --max-memory")
    store = open_model_dir(path, load="auto" if mmap is None else ("mmap" if mmap else "memory"), budget=budget)
    if notify is not None and store.manifest.get("version", 0) < FORMAT_VERSION:
        notify(f"{path} was converted by an older mixcli (format {store.manifest.get('version')}): it runs, but "
               "`mixcli pull --force` (registry models) or converting again gives the faster row-tiled layout")
    return Model(store, ctx=ctx, threads=threads, experts=expert_provider(store, max_memory)), path


def select_activation_mode(act: str | None, source: str = "--act") -> str:
    """Bind the quantized kernels for ``act`` (None: $MIXCLI_ACT, else the default); models built
    afterwards use it. A name that is not a mode is a usage error naming ``source``."""
    from . import kernels

    act = act if act is not None else os.environ.get("MIXCLI_ACT")
    if act and act not in kernels.ACT_MODES:
        raise UsageError(f"{source} must be one of {', '.join(kernels.ACT_MODES)}, got {act!r}")
    return kernels.set_activation_mode(act)


def expert_provider(store, max_memory: str | None):
    """None (plain memory map) unless a --max-memory budget asks for the expert cache."""
    if not max_memory:
        return None
    from .expert_cache import make_expert_provider
    from .memsize import parse_size
    from .model import _kernel_module

    return make_expert_provider(store, _kernel_module(), parse_size(max_memory))

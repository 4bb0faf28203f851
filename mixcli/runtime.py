"""What `generate` and `chat` share: resolve a model argument, load the model and its tokenizer,
and turn text (or a conversation) into prompt tokens with the model's own chat template."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import MixcliError, UsageError
from .memsize import format_size

if TYPE_CHECKING:  # the model module imports numba's kernels lazily; keep `mixcli --help` quick
    from .model import Model
    from .tokenizer import Tokenizer


@dataclass
class Runtime:
    path: Path
    model: Model  # which also carries the three below (attach_text)
    tokenizer: Tokenizer
    template: str | None  # Jinja chat template text, or None for a base model without one
    add_bos: bool

    @property
    def name(self) -> str:
        return self.path.name

    def chat_prompt(self, messages: list[dict]) -> tuple[list[int], str | None]:
        """Conversation -> prompt tokens ending in the assistant's turn, plus a notice (e.g. the
        system message was folded into the first user turn because the template rejects it)."""
        return template_tokens(self.tokenizer, self.template, messages, self.name)

    def raw_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=self.add_bos, parse_special=False)


def template_tokens(tok, template: str | None, messages: list[dict], name: str) -> tuple[list[int], str | None]:
    """``messages`` through ``template`` (sandboxed Jinja) -> (prompt tokens, notice)."""
    from .chat_template import render_conversation

    if template is None:
        raise MixcliError(f"{name} has no chat template", "use --raw for a base model")
    text, notice = render_conversation(
        template, messages, bos_token=tok.bos_token, eos_token=tok.eos_token, add_generation_prompt=True
    )
    return tok.encode(text, add_bos=False, parse_special=True), notice


def chat_tokens(model, messages: list[dict]) -> tuple[list[int], str | None]:
    """``messages`` through the model's own chat template -> (prompt tokens, notice)."""
    name = model.path.name if model.path is not None else "this model"
    return template_tokens(text_tokenizer(model), model.chat_template, messages, name)


def raw_tokens(model, text: str) -> list[int]:
    """Plain text -> prompt tokens (BOS first where the model wants it; special tokens as text)."""
    return text_tokenizer(model).encode(text, add_bos=model.add_bos, parse_special=False)


def text_tokenizer(model):
    if model.tokenizer is None:
        raise MixcliError(f"{model.path} carries no tokenizer", "re-convert it from a checkpoint that has tokenizer files")
    return model.tokenizer


def attach_text(model, path) -> None:
    """Give ``model`` its tokenizer, chat template and BOS rule from the manifest (None where the
    model was converted without a tokenizer: logits still work, text does not)."""
    from .chat_template import FALLBACK_TEMPLATES
    from .tokenizer import load_tokenizer

    info = model.store.tokenizer_info
    model.path = Path(path)
    if not info:
        return
    model.tokenizer = load_tokenizer(path, info)
    model.chat_template = info.get("chat_template") or FALLBACK_TEMPLATES.get(info.get("template_family") or "")
    model.add_bos = bool(info.get("add_bos", False))


def load_runtime(model_arg: str | None, *, ctx: int | None = None, threads: int | None = None,
                 max_memory: str | None = None, mmap: bool | None = None, act: str | None = None,
                 notify=None, verify: bool = True) -> Runtime:
    model, path = load_runtime_model(model_arg, ctx=ctx, threads=threads, max_memory=max_memory, mmap=mmap,
                                     act=act, notify=notify, verify=verify)
    attach_text(model, path)
    tok = text_tokenizer(model)  # generate, chat and serve need text: fail now, not at the first prompt
    return Runtime(path, model, tok, model.chat_template, model.add_bos)


def load_runtime_model(model_arg: str | None, *, ctx: int | None = None, threads: int | None = None,
                       max_memory: str | None = None, mmap: bool | None = None, act: str | None = None,
                       notify=None, verify: bool = True) -> tuple[Model, Path]:
    """The model alone (no tokenizer), for benchmarks: (Model, path). ``mmap``: True maps the
    weights, False reads them into memory, None decides by size (``store.resolve_load_mode``,
    with a --max-memory budget as the limit when one is given). ``act``: the activation
    arithmetic (``kernels.ACT_MODES``; None: $MIXCLI_ACT or the default), checked with $MIXCLI_ISA
    before the model is opened so a typo costs no load time. ``verify``: check the tensors' sha256
    when the files changed since they last passed (``store.verify_model``)."""
    from quant.formats import FORMAT_VERSION

    from .model import Model
    from .registry import resolve_model
    from .store import open_model_dir

    def _pull(target):
        from .pull import offer_pull

        return offer_pull(target, notify=notify)

    table = select_kernels(act)  # a bad --act, $MIXCLI_ACT or $MIXCLI_ISA costs no load time
    if notify is not None:  # a command, not a library call: say so when kernels compile
        from .kernels import COMPILE_NOTICE, on_first_compile
        from .progress import compile_notice

        on_first_compile(lambda: compile_notice(COMPILE_NOTICE))
    if threads is not None and threads < 0:  # 0 (like no flag) means all physical cores, everywhere
        raise UsageError(f"--threads must be 0 (all physical cores) or more, got {threads}")
    budget = None
    if max_memory is not None:  # checked before anything opens; '' is a mistake, not "no budget"
        from .memsize import parse_size

        budget = parse_size(max_memory)
    from quant.leftovers import sweep

    from .store_paths import models_dir

    sweep(models_dir(), notify)  # what a killed convert or pull left in the store (quant.leftovers)
    path = resolve_model(model_arg, pull=_pull, notify=notify)
    if budget is not None and mmap is False:
        from .store import model_bytes

        size = model_bytes(path)
        if size > budget:
            raise UsageError(f"--no-mmap reads the whole model ({format_size(size)}) into memory, "
                             f"more than --max-memory {max_memory}", "drop --no-mmap or raise --max-memory")
    store = open_model_dir(path, load="auto" if mmap is None else ("mmap" if mmap else "memory"), budget=budget,
                           verify=verify, notify=notify)
    if notify is not None and store.manifest.get("version", 0) < FORMAT_VERSION:
        notify(f"{path} was converted by an older mixcli (format {store.manifest.get('version')}): it runs, but "
               "`mixcli pull --force` (registry models) or converting again gives the faster row-tiled layout")
    return Model(store, ctx=ctx, threads=threads, experts=expert_provider(store, max_memory, table),
                 kernels=table), path


def select_kernels(act: str | None = None, isa: str | None = None, source: str = "--act"):
    """The kernel table for ``act`` (None: $MIXCLI_ACT, else the default) on tier ``isa`` (None:
    $MIXCLI_ISA, else the host's best). A bad name is a usage error naming where it came from."""
    from .kernels import ACT_MODES, IsaError
    from .model import _kernel_module

    if act is not None and act not in ACT_MODES:
        raise UsageError(f"{source} must be one of {', '.join(ACT_MODES)}, got {act!r}")
    try:
        return _kernel_module(isa, act)
    except IsaError as e:
        raise UsageError(str(e), "unset MIXCLI_ISA to use the best tier this CPU runs") from None
    except ValueError as e:
        raise UsageError(str(e)) from None


def expert_provider(store, max_memory: str | None, kernels):
    """None (plain memory map) unless a --max-memory budget asks for the expert cache."""
    if not max_memory:
        return None
    from .expert_cache import make_expert_provider
    from .memsize import parse_size

    return make_expert_provider(store, kernels, parse_size(max_memory))

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
        raise MixcliError(
            f"{model.path} carries no tokenizer", "re-convert it from a checkpoint that has tokenizer files"
        )
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


def load_runtime(model_arg: str | None, **options) -> Runtime:
    """The model with its tokenizer and chat template; ``options`` are ``load_runtime_model``'s."""
    model, path = load_runtime_model(model_arg, **options)
    attach_text(model, path)
    tok = text_tokenizer(model)  # generate, chat and serve need text: fail now, not at the first prompt
    return Runtime(path, model, tok, model.chat_template, model.add_bos)


def load_runtime_model(
    model_arg: str | None,
    *,
    ctx: int | None = None,
    threads: int | None = None,
    max_memory: str | None = None,
    mmap: bool | None = None,
    act: str | None = None,
    notify=None,
    verify: bool = True,
    kv_type: str | None = None,
    kv_slots: int = 1,
):
    """The model alone (no tokenizer), for benchmarks: (Model, path). ``mmap``: True maps the
    weights, False reads them into memory, None decides by size (``store.resolve_load_mode``,
    with a --max-memory budget as the limit when one is given). ``max_memory``: a budget for the
    weights and the KV cache together; None picks one when the model does not fit the available
    memory (``memory_budget``, said on ``notify``), "0" (or ``mmap``) keeps plain mapping.
    ``kv_type``: the KV cache's storage (``kv_cache.KV_TYPES``); ``kv_slots``: KV caches of ``ctx``
    the budget must hold (the server's sequences). ``act``: the activation
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
    from .kv_cache import check_kv_type

    kv_type = check_kv_type(kv_type)
    budget = None
    plain = mmap is not None  # --mmap / --no-mmap: the user chose; no automatic budget
    if max_memory is not None and str(max_memory).strip() == "0":  # --max-memory 0: plain mapping
        plain, max_memory = True, None
    elif max_memory is not None:  # checked before anything opens; '' is a mistake, not "no budget"
        from .memsize import parse_size

        budget = parse_size(max_memory)
    from quant.leftovers import sweep

    from .store_paths import models_dir

    sweep(models_dir(), notify)  # what a killed convert or pull left in the store (quant.leftovers)
    path = resolve_model(model_arg, pull=_pull, notify=notify)
    from .store import model_bytes

    auto_note = None
    if budget is None and not plain:
        budget, auto_note = _auto_budget(path, ctx, kv_type, kv_slots)
    kv = kv_slots * _kv_bytes_for(path, ctx, kv_type) if budget is not None else 0
    weights_budget = None if budget is None else budget - kv  # the KV cache counts inside the budget
    if budget is not None and mmap is False:
        size = model_bytes(path)
        if size > weights_budget:
            raise UsageError(
                f"--no-mmap reads the whole model ({format_size(size)}) into memory, "
                f"more than --max-memory {max_memory} leaves after the KV cache ({format_size(kv)})",
                "drop --no-mmap or raise --max-memory",
            )
    store = open_model_dir(
        path,
        load="auto" if mmap is None else ("mmap" if mmap else "memory"),
        budget=weights_budget,
        verify=verify,
        notify=notify,
    )
    if notify is not None and store.manifest.get("version", 0) < FORMAT_VERSION:
        notify(
            f"{path} was converted by an older mixcli (format {store.manifest.get('version')}): it runs, but "
            "`mixcli pull --force` (registry models) or converting again gives the faster row-tiled layout"
        )
    experts = None
    if budget is not None:
        experts = _budget_provider(store, table, budget, kv, auto_note, notify)
    return Model(store, ctx=ctx, threads=threads, experts=experts, kernels=table, kv_type=kv_type), path


def _config_of(path):
    from .config import ModelConfig
    from .store import read_manifest

    return ModelConfig.from_dict(read_manifest(path)["config"])


def _kv_bytes_for(path, ctx: int | None, kv_type: str) -> int:
    """Bytes of the KV cache the model at ``path`` will allocate for ``ctx`` (as ``Model`` clamps it)."""
    from .kv_cache import kv_cache_bytes
    from .model import DEFAULT_CTX

    cfg = _config_of(path)
    n = min(DEFAULT_CTX if ctx is None else max(1, int(ctx)), cfg.max_position_embeddings)
    return kv_cache_bytes(cfg, n, kv_type)


def _auto_budget(path, ctx: int | None, kv_type: str, kv_slots: int = 1) -> tuple[int | None, str | None]:
    """(budget, the reason to tell the user) when weights + KV cache do not fit the available
    memory (``memory_budget.auto_budget``), else (None, None). A manifest too broken to read a
    config from is left to ``open_model_dir`` to report."""
    from . import memory_budget
    from .store import model_bytes

    try:
        size, kv = model_bytes(path), kv_slots * _kv_bytes_for(path, ctx, kv_type)
    except (MixcliError, KeyError, TypeError, ValueError):
        return None, None
    avail = memory_budget.available_memory()
    budget = memory_budget.auto_budget(size, kv, avail)
    if budget is None:
        return None, None
    limits = memory_budget.cgroup_limits()
    where = f" (cgroup limit {format_size(min(c.limit for c in limits))})" if limits else ""
    return budget, (
        f"model {format_size(size)} + KV cache {format_size(kv)} do not fit in "
        f"{memory_budget.FIT_FRACTION:.0%} of the {format_size(avail)} available{where}: "
        f"memory budget {format_size(budget)}"
    )


def _budget_provider(store, table, budget: int, kv: int, auto_note: str | None, notify):
    """The expert provider under ``budget`` bytes for weights and a KV cache of ``kv`` bytes.
    An explicit budget too small for the expert cache is a usage error; an automatic one falls
    back to plain mapping, and says so."""
    from .expert_cache import MIN_SLOTS, ExpertCache, expert_bytes, memory_for_slots, pinned_bytes

    need = memory_for_slots(store, MIN_SLOTS) + kv
    if budget - kv >= pinned_bytes(store) + expert_bytes(store):
        need = 0  # the whole model fits: plain mapping (make_expert_provider)
    if budget < need and auto_note is None:
        raise UsageError(
            f"--max-memory {format_size(budget)} is too small for {store.path.name}: the KV cache "
            f"takes {format_size(kv)} and the expert cache needs {format_size(need - kv)}",
            f"use --max-memory {format_size(need)} or more, or a smaller --ctx or --kv-type q8_0",
        )
    if budget < need:
        if notify is not None:
            notify(
                f"{auto_note}, too small for the expert cache (it needs {format_size(need)}): "
                "mapping the whole model (the page cache decides; --max-memory SIZE to choose)"
            )
        return None
    provider = expert_provider(store, budget - kv, table)
    if auto_note is not None and notify is not None:
        if isinstance(provider, ExpertCache):
            held = (
                f"{format_size(provider.pinned_bytes)} of non-expert weights and the KV cache stay resident, "
                f"{provider.n_slots} of {len(store.experts)} experts cached"
            )
        else:
            held = "the whole model fits it"
        notify(f"{auto_note}; {held} (--max-memory SIZE to choose, --mmap to map without a budget)")
    return provider


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


def expert_provider(store, max_memory: str | int | None, kernels):
    """None (plain memory map) unless a budget for the weights (a --max-memory text or bytes)
    asks for the expert cache."""
    if not max_memory:
        return None
    from .expert_cache import make_expert_provider
    from .memsize import parse_size

    return make_expert_provider(store, kernels, parse_size(max_memory))

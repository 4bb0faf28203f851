"""The Python API for text, shaped like mlx-lm's: ``load``, ``generate``, ``stream_generate``.

    import mixcli
    model = mixcli.load()                                   # the default model, or a name / path
    print(mixcli.generate(model, [{"role": "user", "content": "Hi!"}], max_tokens=64))
    for r in mixcli.stream_generate(model, "Once upon a time", max_tokens=32, temperature=0):
        print(r.text, end="", flush=True)

A prompt is a list of messages (through the model's chat template), a string (raw text unless
``chat=True``) or a list of token ids. Sampling defaults are the CLI's, ``sampling.SamplerConfig``'s
(llama.cpp's); ``temperature=0`` is greedy and ``seed`` reproducible.
``mixcli generate`` and the chat REPL run on ``stream_generate``; the server uses the same prompt
encoding (``runtime.chat_tokens`` / ``raw_tokens``) and per-sequence loop (``generate.TokenStream``)
over batched steps instead of the model's single KV cache.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import UsageError
from .generate import GenerationResponse


def load(
    name_or_path: str | Path | None = None,
    ctx: int | None = None,
    threads: int | None = None,
    *,
    max_memory: str | None = None,
    act: str | None = None,
    isa: str | None = None,
    load: str = "auto",
    **kw,
):
    """A converted model directory, registry name or alias (None: the default model, fetched and
    converted on first use) -> the model (``logits(tokens)``, ``prefill``, ``decode``), carrying
    its ``tokenizer`` and ``chat_template``. ``load``: "auto", "memory" or "mmap"; ``max_memory``:
    a budget for the weights and the KV cache ("12GB"), as ``--max-memory``; ``act``, ``isa``: the kernels' activation mode and
    instruction-set tier (None: $MIXCLI_ACT / $MIXCLI_ISA, else the defaults); other keywords go to
    ``mixcli.model.Model``. Like the CLI, a model that does not fit the available memory (cgroup
    limits included) gets an automatic budget and an expert cache when neither ``max_memory`` nor
    ``load`` says otherwise; what was chosen goes to the "mixcli" logger."""
    from .model import Model
    from .registry import resolve_model
    from .runtime import _auto_budget, _budget_provider, _kv_bytes_for, attach_text, select_kernels
    from .store import open_model_dir

    def _pull(entry):
        from .pull import pull_model

        return pull_model(entry)

    if "kernels" not in kw:
        kw["kernels"] = select_kernels(act, isa, source="act")
    path = resolve_model(None if name_or_path is None else str(name_or_path), pull=_pull)
    budget = kv = note = None  # as the CLI: the budget holds the weights and the KV cache
    if "experts" not in kw:
        from .kv_cache import check_kv_type

        kv_type = check_kv_type(kw.get("kv_type"))
        if max_memory:
            from .memsize import parse_size

            budget = parse_size(max_memory)
        elif load == "auto":  # the CLI's automatic budget
            budget, note = _auto_budget(path, ctx, kv_type)
        if budget is not None:
            kv = _kv_bytes_for(path, ctx, kv_type)
    store = open_model_dir(path, load=load, budget=None if budget is None else budget - kv)
    if budget is not None:
        kw["experts"] = _budget_provider(store, kw["kernels"], budget, kv, note, logging.getLogger("mixcli").info)
    model = Model(store, ctx=ctx, threads=threads, **kw)
    attach_text(model, path)
    return model


def prompt_tokens(model, prompt, chat: bool | None = None) -> list[int]:
    """Messages, text or token ids -> prompt tokens (see the module docstring)."""
    from .runtime import chat_tokens, raw_tokens

    if isinstance(prompt, str):
        if chat:
            return chat_tokens(model, [{"role": "user", "content": prompt}])[0]
        return raw_tokens(model, prompt)
    items = list(prompt)
    if items and all(isinstance(m, dict) for m in items):
        if chat is False:
            raise UsageError("chat=False needs a string or token ids, not a list of messages")
        return chat_tokens(model, items)[0]
    if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return [int(t) for t in items]
    raise UsageError("a prompt is a string, a list of {'role', 'content'} messages, or a list of token ids")


def stream_generate(
    model,
    prompt,
    *,
    max_tokens: int = 256,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repeat_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | str = (),
    chat: bool | None = None,
    sampler=None,
    should_stop=None,
) -> Iterator[GenerationResponse]:
    """Yield a ``GenerationResponse`` per generated token (``text``, ``token``), then a closing
    one with ``finish_reason`` ("stop", "length", or "interrupted" when ``should_stop()`` said so)
    and ``stats``. The model's KV cache keeps the sequence: a next prompt sharing its start
    prefills only the rest. ``sampler(logits, history) -> id`` replaces the sampling arguments."""
    from .generate import generate as _loop
    from .runtime import text_tokenizer
    from .sampling import SamplerConfig, make_sampler

    tokens = prompt_tokens(model, prompt, chat)
    if sampler is None:
        given = {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_p": min_p,
            "repeat_penalty": repeat_penalty,
            "seed": seed,
        }
        sampler = make_sampler(SamplerConfig(**{k: v for k, v in given.items() if v is not None}))
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    yield from _loop(
        model, text_tokenizer(model), tokens, sampler, max_tokens=max_tokens, stop=stops, should_stop=should_stop
    )


def generate(model, prompt, **kw) -> str:
    """The whole generated text (``stream_generate``'s arguments)."""
    return "".join(r.text for r in stream_generate(model, prompt, **kw))

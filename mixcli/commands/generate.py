"""`mixcli generate`: for shell scripts. Only the generated text (or one JSON object) goes to
stdout; notices, progress and statistics go to stderr."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from ..errors import UsageError
from ..sampling import SamplerConfig
from ..store import AUTO_MAX_BYTES, AUTO_MEMORY_FRACTION

ModelArg = Annotated[
    str | None,
    typer.Argument(help="Converted model directory or registry name (default: the default model)."),
]
CtxOpt = Annotated[
    int | None, typer.Option("--ctx", help="Context size in tokens (default 4096, at most the model's).")
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", "-t", help="Threads (default, or 0: all physical cores).")]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Budget for resident weights and the KV cache, e.g. 12GB: hot experts stay "
        "cached, the rest is read on demand. Default: chosen from the available memory (cgroup limit "
        "included) when the model does not fit it; 0: map the whole model, no budget.",
    ),
]
KvTypeOpt = Annotated[
    str | None,
    typer.Option(
        "--kv-type",
        help="KV cache storage: f16 (default) or q8_0 (llama.cpp's block of 32 int8 and one "
        "fp16 scale: 53% of the memory, for long contexts).",
    ),
]
MmapOpt = Annotated[
    bool | None,
    typer.Option(
        "--mmap/--no-mmap",
        help="Map the weights (instant start, less resident memory) or read them into "
        "memory (faster decode, slower start). Default: read a model of up to "
        f"{AUTO_MAX_BYTES / 2**30:g} GiB that fits in {AUTO_MEMORY_FRACTION:.0%} of the available memory.",
    ),
]

ActOpt = Annotated[
    str | None,
    typer.Option(
        "--act",
        help="Activation arithmetic of the quantized matrix products: int8x2 (default: two int8 "
        "levels, logits within ~1e-4 of f32), int8 (llama.cpp's one level: faster, most in prompt "
        "processing, but small models' answers can change), f32 (exact, slow). Also $MIXCLI_ACT.",
    ),
]

VerifyOpt = Annotated[
    bool,
    typer.Option(
        "--verify/--no-verify",
        help="Check each tensor's sha256 when the model's files changed since "
        "they last passed (once; `mixcli verify` checks on demand). --no-verify skips it.",
    ),
]

# sampling flags, shared with `mixcli chat`; defaults are SamplerConfig's (llama.cpp's)
_S = SamplerConfig()
TempOpt = Annotated[
    float | None, typer.Option("--temp", help=f"Temperature; 0 is greedy (default {_S.temperature:g}).")
]
TopKOpt = Annotated[
    int | None, typer.Option("--top-k", help=f"Keep the k most likely tokens (0: all; default {_S.top_k}).")
]
TopPOpt = Annotated[
    float | None, typer.Option("--top-p", help=f"Nucleus sampling mass in (0, 1] (default {_S.top_p:g}).")
]
MinPOpt = Annotated[
    float | None, typer.Option("--min-p", help=f"Drop tokens below min_p x the top probability (default {_S.min_p:g}).")
]
RepeatPenaltyOpt = Annotated[
    float | None, typer.Option("--repeat-penalty", help=f"1 is off (default {_S.repeat_penalty:g}).")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed for exactly reproducible sampling.")]


def read_prompt(prompt: str) -> str:
    """The --prompt value, or all of stdin for '-'."""
    if prompt != "-":
        return utf8_text(prompt, "--prompt")
    if sys.stdin is None or sys.stdin.closed:
        raise UsageError("--prompt - reads stdin, but stdin is closed", "pipe text in or pass --prompt TEXT")
    try:
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    except (OSError, ValueError):
        raise UsageError("--prompt - could not read stdin", "pipe text in or pass --prompt TEXT") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"stdin is not UTF-8 (byte {exc.start})", "convert the input to UTF-8, e.g. with iconv"
        ) from None


def utf8_text(value: str, flag: str) -> str:
    """A text argument as given; one that was not UTF-8 on the command line (Python keeps such
    bytes as surrogates) is a usage error, not a traceback in the tokenizer."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(
            f"{flag} is not valid UTF-8 (character {exc.start})",
            "pass UTF-8 text, or convert it first, e.g. with iconv",
        ) from None
    return value


def sampler_config(temp, top_k, top_p, min_p, repeat_penalty, seed):
    """Flags left unset take SamplerConfig's defaults (the one place defaults are written)."""
    from ..sampling import SamplerConfig

    given = {
        "temperature": temp,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "repeat_penalty": repeat_penalty,
        "seed": seed,
    }
    cfg = SamplerConfig(**{k: v for k, v in given.items() if v is not None})
    cfg.validate()
    return cfg


def generate_command(
    model: ModelArg = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text, or - to read stdin.")] = ...,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")] = 256,
    temp: TempOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    seed: SeedOpt = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop at this string (repeatable; not printed).")
    ] = None,
    chat: Annotated[
        bool | None,
        typer.Option("--chat/--raw", help="Wrap the prompt in the model's chat template (default when it has one)."),
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="System message (chat mode).")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object: text, finish_reason, usage, timings.")
    ] = False,
    truncate: Annotated[
        bool, typer.Option("--truncate", help="Drop the start of a prompt that does not fit the context.")
    ] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print speed and expert statistics to stderr.")] = False,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    max_memory: MaxMemoryOpt = None,
    mmap: MmapOpt = None,
    act: ActOpt = None,
    kv_type: KvTypeOpt = None,
    verify: VerifyOpt = True,
):
    """Generate text from a prompt; only the text goes to stdout.

    Notices, progress and --stats go to stderr, so the output can be piped as it is."""
    from ..api import stream_generate
    from ..progress import say_stderr
    from ..runtime import load_runtime
    from ..sampling import make_sampler

    if max_tokens < 0:
        raise UsageError(f"--max-tokens must be >= 0, got {max_tokens}")
    cfg = sampler_config(temp, top_k, top_p, min_p, repeat_penalty, seed)
    text = read_prompt(prompt)
    if not text.strip():
        raise UsageError("the prompt is empty", "pass --prompt TEXT or pipe text to --prompt -")
    notify = say_stderr
    rt = load_runtime(
        model,
        ctx=ctx,
        threads=threads,
        max_memory=max_memory,
        mmap=mmap,
        act=act,
        notify=notify,
        verify=verify,
        kv_type=kv_type,
    )
    use_chat = (rt.template is not None) if chat is None else chat
    for flag, value in [("--system", system), *(("--stop", x) for x in stop or ())]:
        if value:
            utf8_text(value, flag)
    if system and not use_chat:
        raise UsageError("--system needs chat mode", "drop --raw, or put the system text in the prompt")
    if use_chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        tokens, notice = rt.chat_prompt(messages)
        if notice:
            notify(f"note: {notice}")
    else:
        tokens = rt.raw_prompt(text)
    ctx_n = rt.model.ctx
    if len(tokens) >= ctx_n:
        if not truncate:
            raise UsageError(
                f"the prompt is {len(tokens)} tokens, the context holds {ctx_n}",
                "raise --ctx, shorten the prompt, or pass --truncate",
            )
        keep = ctx_n - max(1, min(max_tokens, ctx_n // 2))
        head = tokens[:1] if rt.tokenizer.bos_id is not None and tokens[0] == rt.tokenizer.bos_id else []
        tokens = head + tokens[len(tokens) - (keep - len(head)) :]
        notify(f"note: prompt truncated to its last {len(tokens)} tokens to fit the context of {ctx_n}")

    sampler = make_sampler(cfg)
    out = []
    final = None
    for resp in stream_generate(rt.model, tokens, sampler=sampler, max_tokens=max_tokens, stop=stop or ()):
        if resp.text:
            if as_json:
                out.append(resp.text)
            else:
                sys.stdout.write(resp.text)
                sys.stdout.flush()
        final = resp
    st = final.stats
    if as_json:
        obj = {
            "model": rt.name,
            "text": "".join(out),
            "finish_reason": final.finish_reason,
            "usage": {
                "prompt_tokens": st.prompt_tokens,
                "completion_tokens": st.completion_tokens,
                "total_tokens": st.prompt_tokens + st.completion_tokens,
            },
            "timings": {
                **st.to_dict(),
                "isa": getattr(rt.model.kernels, "isa", "numpy"),
                "activations": getattr(rt.model.kernels, "act", "f32"),
            },
        }
        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    elif sys.stdout.isatty():
        sys.stdout.write("\n")
    sys.stdout.flush()
    if stats:
        from ..ui import format_stats

        notify(format_stats(rt.model, st))

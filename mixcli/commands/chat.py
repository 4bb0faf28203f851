"""`mixcli chat`: a terminal REPL over one model (the loop itself is mixcli.chat.Repl)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import UsageError
from .generate import (
    ActOpt,
    CtxOpt,
    KvTypeOpt,
    MaxMemoryOpt,
    MinPOpt,
    MmapOpt,
    ModelArg,
    RepeatPenaltyOpt,
    SeedOpt,
    TempOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    VerifyOpt,
    sampler_config,
)


def chat_command(
    model: ModelArg = None,
    system: Annotated[
        str | None, typer.Option("--system", help="System message (kept by /reset; /system changes it).")
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-tokens", "-n", help="Most tokens per answer (default: until the model stops or the context is full)."
        ),
    ] = None,
    temp: TempOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    seed: SeedOpt = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="End an answer at this string (repeatable; not shown).")
    ] = None,
    load: Annotated[str | None, typer.Option("--load", help="Start from a conversation saved with /save.")] = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    max_memory: MaxMemoryOpt = None,
    mmap: MmapOpt = None,
    act: ActOpt = None,
    kv_type: KvTypeOpt = None,
    verify: VerifyOpt = True,
):
    """Chat with a model in the terminal.

    Answers stream as they are generated; /help lists the commands, Ctrl-D leaves."""
    from ..chat import ChatSession, Repl
    from ..chat_ui import ChatUI, stdin_is_terminal
    from ..progress import say_stderr
    from ..runtime import load_runtime
    from ..sampling import make_sampler

    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {max_tokens}")
    cfg = sampler_config(temp, top_k, top_p, min_p, repeat_penalty, seed)
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
    session = ChatSession(rt, make_sampler(cfg), system=system, max_tokens=max_tokens, stop=stop or ())
    if load:
        session.load(load)
        if system:  # the command line wins over the file
            session.set_system(system)
    if stdin_is_terminal():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    ui = ChatUI()
    if load:
        ui.info(f"loaded {len(session.conversation())} messages from {load}")
        ui.show_conversation(session)
    return Repl(session, ui).run()

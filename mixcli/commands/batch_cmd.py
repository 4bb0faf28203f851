"""`mixcli batch`: a JSONL file of prompts answered by workers on Ray (mixcli/batch_job.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError
from .generate import (
    ActOpt,
    CtxOpt,
    MaxMemoryOpt,
    MinPOpt,
    MmapOpt,
    RepeatPenaltyOpt,
    SeedOpt,
    TempOpt,
    TopKOpt,
    TopPOpt,
    sampler_config,
    utf8_text,
)


def batch_command(
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="[MODEL] INPUT.jsonl",
            help="Model (directory, registry name or Hub id; default: the default "
            "model) and the JSONL file of prompts.",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="JSONL file the answers are appended to, one line per prompt, in the order they finish.",
        ),
    ],
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip the ids that already have a line in --output.")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", "-w", help="Worker processes, each with the model loaded once (default: one per Ray node)."
        ),
    ] = None,
    threads_per_worker: Annotated[
        int | None,
        typer.Option(
            "--threads-per-worker", help="Threads of each worker (default: the CPUs shared out among the workers)."
        ),
    ] = None,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel",
            "-np",
            help="Prompts each worker decodes together, one pass over the weights per step for all of them.",
        ),
    ] = 4,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Join a Ray cluster (ray://HEAD:10001, HEAD:6379 or auto) instead of starting Ray here.",
        ),
    ] = None,
    no_ray: Annotated[bool, typer.Option("--no-ray", help="Run one worker in this process, without Ray.")] = False,
    retries: Annotated[
        int,
        typer.Option(
            "--retries", help="Restarts of a worker whose process died, and extra tries of each prompt it held."
        ),
    ] = 2,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", help="Most tokens per answer, for lines without max_tokens.")
    ] = 256,
    temp: TempOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    seed: SeedOpt = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop at this string, for lines without stop (repeatable).")
    ] = None,
    ctx: CtxOpt = None,
    max_memory: MaxMemoryOpt = None,
    mmap: MmapOpt = None,
    act: ActOpt = None,
):
    """Answer a JSONL file of prompts with workers on Ray.

    Each input line is {"id", "prompt"} (raw text) or {"id", "messages"} (chat), with optional
    max_tokens, temperature, top_p, stop, seed; each output line is {"id", "text",
    "finish_reason", "usage"}, or {"id", "error"} for a prompt that cannot run."""
    from dataclasses import asdict

    from ..batch_job import BatchOptions, run_batch

    if len(args) == 1:
        model, source = None, args[0]
    elif len(args) == 2:
        model, source = args
    else:
        raise UsageError(f"expected [MODEL] INPUT.jsonl, got {len(args)} arguments")
    for value in stop or ():
        utf8_text(value, "--stop")
    cfg = sampler_config(temp, top_k, top_p, min_p, repeat_penalty, seed)
    opts = BatchOptions(
        input=Path(source),
        output=output,
        model=model,
        resume=resume,
        use_ray=not no_ray,
        ray_address=ray_address,
        workers=workers,
        threads_per_worker=threads_per_worker,
        parallel=parallel,
        retries=retries,
        max_memory=max_memory,
        ctx=ctx,
        act=act,
        mmap=mmap,
        sampling=asdict(cfg),
        max_tokens=max_tokens,
        stop=list(stop or ()),
    )
    run_batch(opts)

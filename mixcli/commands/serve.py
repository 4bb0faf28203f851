"""`mixcli serve`: an OpenAI-compatible HTTP server (mixcli/server.py) over one model, decoding up
to --parallel requests together (mixcli/engine.py)."""

from __future__ import annotations

import ipaddress
import sys
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
    sampler_config,
)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(
    model: ModelArg = None,
    host: Annotated[
        str,
        typer.Option(
            "--host", help="Address to listen on (loopback by default; anything else should come with --api-key)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8080,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel",
            "-np",
            help="Sequences decoded together in each step (each has its own KV cache of --ctx tokens).",
        ),
    ] = 4,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue",
            help="Requests that may wait for a free sequence; beyond it the server answers 503 with Retry-After.",
        ),
    ] = 64,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="MIXCLI_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on /v1 routes.",
        ),
    ] = None,
    temp: TempOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    seed: SeedOpt = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    max_memory: MaxMemoryOpt = None,
    mmap: MmapOpt = None,
    act: ActOpt = None,
    kv_type: KvTypeOpt = None,
):
    """Serve the OpenAI API on 127.0.0.1:8080 until Ctrl-C."""
    from ..engine import Engine
    from ..memsize import format_size
    from ..runtime import load_runtime
    from ..server import ServerState, bind, serve

    if parallel < 1:
        raise UsageError(f"--parallel must be at least 1, got {parallel}")
    if max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {max_queue}")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {port}")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty", "give a key, or leave it out for no authentication")
    defaults = sampler_config(temp, top_k, top_p, min_p, repeat_penalty, seed)
    notify = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    sock = bind(host, port)  # before the model loads: a taken port costs no load time
    rt = load_runtime(
        model,
        ctx=ctx,
        threads=threads,
        max_memory=max_memory,
        mmap=mmap,
        act=act,
        notify=notify,
        kv_type=kv_type,
        kv_slots=parallel + 1,
    )  # the model's own cache and one per sequence
    engine = Engine(rt.model, rt.tokenizer, parallel=parallel, max_queue=max_queue)
    names = tuple(dict.fromkeys([rt.name] + ([model] if model else [])))
    state = ServerState(engine, rt.model, names, defaults, api_key)
    if not is_loopback(host) and api_key is None:
        notify(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model")
    shown = sock.getsockname()
    url_host = f"[{shown[0]}]" if ":" in shown[0] else shown[0]
    notify(
        f"mixcli serve: {rt.name} on http://{url_host}:{shown[1]}/v1 ({parallel} parallel, context "
        f"{engine.ctx} each, KV cache up to {format_size(engine.decoder.kv_bytes)}); Ctrl-C stops"
    )
    code = serve(state, sock)
    notify("mixcli serve: stopped")
    return code

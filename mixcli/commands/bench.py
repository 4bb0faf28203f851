"""`mixcli bench` and `mixcli perplexity`: speed and quality, measured as llama.cpp measures them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import MixcliError, UsageError
from .generate import ActOpt, KvTypeOpt, MaxMemoryOpt, MmapOpt, ModelArg


def _threads_list(spec: str) -> list[int]:
    try:
        out = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--threads takes a comma-separated list of counts, got {spec!r}") from None
    if not out or min(out) < 0:
        raise UsageError(f"--threads needs counts >= 0 (0: all physical cores), got {spec!r}")
    from ..model import physical_cores

    return [n or physical_cores() for n in out]


def bench_command(
    model: ModelArg = None,
    pp: Annotated[int, typer.Option("--pp", "-p", help="Prompt tokens per prompt-processing test (0: skip).")] = 512,
    tg: Annotated[int, typer.Option("--tg", "-n", help="Tokens per generation test (0: skip).")] = 128,
    reps: Annotated[int, typer.Option("--reps", "-r", help="Repetitions of each test.")] = 3,
    threads: Annotated[
        str, typer.Option("--threads", "-t", help="Thread counts to test, e.g. 1,2 (0: all physical cores).")
    ] = "",
    max_memory: MaxMemoryOpt = None,
    mmap: MmapOpt = None,
    act: ActOpt = None,
    kv_type: KvTypeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
):
    """Measure prompt and generation speed, llama-bench style.

    Prompt processing (ppN) and generation (tgM) in tokens per second: mean and standard deviation
    over --reps runs, for each thread count."""
    from ..bench import run_bench
    from ..model import physical_cores
    from ..progress import say_stderr
    from ..runtime import load_runtime_model

    if reps < 1:
        raise UsageError(f"--reps must be >= 1, got {reps}")
    if pp < 0 or tg < 0:
        raise UsageError("--pp and --tg must be >= 0")
    counts = _threads_list(threads) if threads else [physical_cores()]
    m, path = load_runtime_model(
        model, ctx=max(pp, tg, 16) + 8, max_memory=max_memory, mmap=mmap, act=act, notify=say_stderr, kv_type=kv_type
    )
    rows = run_bench(m, pp=pp, tg=tg, reps=reps, threads=counts)
    if as_json:
        print(
            json.dumps(
                {
                    "model": str(path),
                    "isa": getattr(m.kernels, "isa", "numpy"),
                    "activations": getattr(m.kernels, "act", "f32"),
                    "results": [r.to_dict() for r in rows],
                },
                indent=2,
            )
        )
        return
    from rich.console import Console
    from rich.table import Table

    from ..ui import kernel_label

    cfg = m.config
    title = (
        f"{path.name}: {cfg.architecture}, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_local_experts} experts, {m.store.manifest['quant']['preset']}, "
        f"weights {'in memory' if m.store.load == 'memory' else 'mapped'}, kernels {kernel_label(m)}"
    )
    t = Table()
    for c in ("test", "threads", "tokens/s", "± std", "reps"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r.test, str(r.threads), f"{r.mean_tps:.2f}", f"{r.std_tps:.2f}", str(r.reps))
    con = Console()
    con.print(title, markup=False, highlight=False)  # a line of its own: a table's title is folded to its width
    con.print(t)
    from ..ui import cache_report

    cache = cache_report(m)  # with --max-memory: what the expert cache did over the whole run
    if cache:
        con.print(cache, markup=False, highlight=False, soft_wrap=True)


def perplexity_command(
    model: Annotated[str, typer.Argument(help="Converted model directory or registry name.")],
    file: Annotated[Path, typer.Argument(help="UTF-8 text file to score.")],
    ctx: Annotated[int, typer.Option("--ctx", "-c", help="Tokens per chunk.")] = 512,
    chunks: Annotated[int | None, typer.Option("--chunks", help="Score at most this many chunks.")] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", "-t", help="Threads (default, or 0: all physical cores).")
    ] = None,
    act: ActOpt = None,
    kv_type: KvTypeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Score a text file's perplexity, by llama.cpp's method.

    The text is tokenized (with BOS) and cut into
    chunks of --ctx tokens; each chunk starts from an empty cache with its first token replaced by
    BOS, and only its second half is scored, so every scored token sees at least ctx/2 tokens.
    PPL = exp(mean negative log-likelihood), shown with llama.cpp's standard error."""
    from ..perplexity import perplexity
    from ..progress import Progress, say_stderr
    from ..runtime import load_runtime

    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MixcliError(f"text file {file} does not exist", "check the path") from None
    except UnicodeDecodeError:
        raise MixcliError(f"{file} is not UTF-8 text", "convert it to UTF-8") from None
    except OSError as exc:
        raise MixcliError(f"cannot read {file}: {exc.strerror}") from None
    rt = load_runtime(model, ctx=ctx, threads=threads, act=act, notify=say_stderr, kv_type=kv_type)
    tok = rt.tokenizer
    ids = tok.encode(text, add_bos=rt.add_bos, parse_special=False)
    if chunks is not None:
        ids = ids[: ctx * max(chunks, 1)]
    with Progress("perplexity", unit="chunks", total=max(len(ids) // ctx, 1)) as bar:
        res = perplexity(rt.model, ids, ctx, tok.bos_id if rt.add_bos else None, progress=lambda d, n: bar.update(d, n))
    if as_json:
        print(
            json.dumps(
                {
                    "model": rt.name,
                    "file": str(file),
                    "ppl": res.ppl,
                    "stderr": res.stderr,
                    "chunks": res.n_chunks,
                    "scored_tokens": res.n_scored,
                    "ctx": res.ctx,
                }
            )
        )
    else:
        print(
            f"PPL = {res.ppl:.4f} +/- {res.stderr:.4f}  ({res.n_chunks} chunks of {ctx} tokens, {res.n_scored} scored)"
        )

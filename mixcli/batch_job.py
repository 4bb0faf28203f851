"""A `mixcli batch` job: input checked, output resumed, workers started, results written as they come.

The order: every input line is checked (a malformed one stops the job before anything loads),
the output is locked against a second job and scanned for ids already answered (``--resume``),
then the workers start (Ray actors, mixcli/batch_ray.py; or one in this process without Ray,
mixcli/batch_local.py) and each finished prompt is appended to the output at once
(mixcli/batch_output.py) while a progress bar on stderr shows prompts, tokens/s and time left.
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .progress import Progress, say_stderr

INSTALL_RAY = "pip install 'mixcli[ray]'"


@dataclass
class BatchOptions:
    input: Path
    output: Path
    model: str | None = None
    resume: bool = False
    use_ray: bool = True  # False: --no-ray, one worker in this process even where Ray is installed
    ray_address: str | None = None
    workers: int | None = None  # None: one per Ray node
    threads_per_worker: int | None = None  # None: the CPUs shared out among the workers
    parallel: int = 4  # sequences a worker decodes together
    retries: int = 2
    max_memory: str | None = None
    ctx: int | None = None
    act: str | None = None
    mmap: bool | None = None
    sampling: dict = field(default_factory=dict)  # SamplerConfig fields (defaults for lines that set none)
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)


@dataclass
class BatchSummary:
    total: int = 0  # prompts in the input
    skipped: int = 0  # already in the output (--resume)
    written: int = 0  # lines written by this run
    errors: int = 0  # of those, error lines
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # from the first worker ready to the last line
    mode: str = "local"  # "ray" or "local"
    workers: list[dict] = field(default_factory=list)  # what each worker reported when ready
    per_node: dict = field(default_factory=dict)  # node id -> prompts answered there
    retried: int = 0
    restarts: int = 0


class _BatchProgress(Progress):
    """The one progress look, with generated tokens per second beside the prompt count."""

    def _count_text(self) -> str:
        if not self.count or self._first is None:
            return ""
        dt = time.monotonic() - self._start
        return f"{self.count[0] / dt:.1f} tok/s" if dt > 0 else ""


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def check_options(o: BatchOptions) -> None:
    for name, value, lo in (
        ("--workers", o.workers, 1),
        ("--threads-per-worker", o.threads_per_worker, 1),
        ("--parallel", o.parallel, 1),
        ("--retries", o.retries, 0),
        ("--max-tokens", o.max_tokens, 1),
    ):
        if value is not None and value < lo:
            raise UsageError(f"{name} must be at least {lo}, got {value}")
    if o.ray_address is not None and not o.use_ray:
        raise UsageError("--ray-address and --no-ray contradict each other", "drop one of them")
    if o.max_memory is not None:
        from .memsize import parse_size

        parse_size(o.max_memory)


def open_output(o: BatchOptions):
    """What ``-o`` already holds (nothing unless ``--resume``), after checking it may be written."""
    from .batch_output import ExistingOutput, scan_output

    out = o.output
    if out.is_dir():
        raise UsageError(f"-o {out} is a directory", "name a .jsonl file")
    if not out.parent.is_dir():
        raise UsageError(f"the directory of -o {out} does not exist", "create it first")
    if not o.resume and out.exists() and out.stat().st_size > 0:
        raise UsageError(f"{out} already exists", "pass --resume to add the prompts it lacks, or choose another -o")
    return scan_output(out) if o.resume else ExistingOutput()


def run_batch(o: BatchOptions, *, notify=say_stderr, on_line=None) -> BatchSummary:
    """Run the job ``o`` describes; ``on_line(line, {"node", "pid"} of its worker or None)`` sees
    each line after it is written."""
    from quant.locks import Busy, exclusive

    from .batch_input import read_input

    check_options(o)
    items = read_input(o.input, notify)
    summary = BatchSummary(total=len(items))
    try:
        with exclusive(o.output, kind="batch"):
            existing = open_output(o)
            todo = [it for it in items if it.key not in existing.done]
            summary.skipped = len(items) - len(todo)
            if existing.torn_bytes:
                notify(
                    f"{o.output}: cutting off an unfinished last line ({existing.torn_bytes} bytes); "
                    "its prompt runs again"
                )
            if o.resume:
                extra = len(existing.done - {it.key for it in items})
                notify(
                    f"resume: {summary.skipped} of {len(items)} prompts already in {o.output}"
                    + (
                        f" ({existing.errors} of the lines are errors: delete those lines to run them again)"
                        if existing.errors
                        else ""
                    )
                    + (f"; {extra} ids there are not in {o.input}" if extra else "")
                )
            if not todo:
                notify(f"nothing to run: every prompt of {o.input} has a line in {o.output}")
                return summary
            _run(o, todo, existing.torn_bytes, summary, notify, on_line)
    except Busy as exc:
        raise UsageError(
            f"another mixcli batch (process {exc.holder}) is writing {o.output}", "wait for it, or write elsewhere"
        ) from None
    return summary


def _pool(o: BatchOptions, notify):
    """(pool, cluster context or None): Ray workers, or one worker in this process."""
    from .batch_ray import ray_missing

    missing = ray_missing() if o.use_ray else "--no-ray"
    if missing is not None and o.ray_address is not None:
        raise UsageError(f"--ray-address needs Ray, which cannot be imported ({missing})", INSTALL_RAY)
    kw = {
        "ctx": o.ctx,
        "max_memory": o.max_memory,
        "act": o.act,
        "sampling": dict(o.sampling),
        "max_tokens": o.max_tokens,
        "stop": list(o.stop),
    }
    if missing is not None:
        from .batch_local import LocalPool

        if o.use_ray:
            notify(
                f"Ray is not installed: running in this process, one worker; `{INSTALL_RAY}` runs --workers "
                "in parallel, here or on a Ray cluster (--ray-address)"
            )
        elif o.workers not in (None, 1):
            notify(f"--no-ray runs one worker in this process (--workers {o.workers} ignored)")
        kw["model"] = str(resolve_here(o.model, notify))
        return LocalPool({**kw, "mmap": o.mmap}, threads=o.threads_per_worker, parallel=o.parallel, notify=notify), None
    from .batch_ray import RayCluster, RayPool, cluster_shape
    from .memsize import parse_size

    if o.ray_address is None:  # Ray inside this job, on this machine: resolve (and pull) the model once, here
        kw["model"] = str(resolve_here(o.model, notify))
        workers = o.workers or 1
        threads = o.threads_per_worker or max(1, physical_cores() // workers)
        cluster = RayCluster(None, num_cpus=max(physical_cores(), workers * threads), notify=notify)
    else:  # a path every node sees, or a name each node resolves in (and pulls into) its own store
        p = Path(o.model).expanduser() if o.model else None
        kw["model"] = str(p.resolve()) if p is not None and p.exists() else o.model
        cluster = RayCluster(o.ray_address, num_cpus=0, notify=notify)
        workers = threads = None
    cluster.__enter__()
    try:
        nodes, cpus = cluster_shape()
        workers = workers or o.workers or nodes
        threads = threads or o.threads_per_worker or max(1, int(cpus // workers))
        mmap = True if o.mmap is None else o.mmap  # workers on one node share one mapped copy
        pool = RayPool(
            {**kw, "mmap": mmap},
            workers=workers,
            threads=threads,
            parallel=o.parallel,
            retries=o.retries,
            memory_bytes=parse_size(o.max_memory) if o.max_memory else None,
            notify=notify,
        )
    except BaseException:
        cluster.__exit__(None, None, None)
        raise
    return pool, cluster


def resolve_here(model: str | None, notify) -> Path:
    """The model directory on this machine, pulled first if it is a registry name that is missing
    (the same offer `mixcli generate` makes)."""
    from .pull import offer_pull
    from .registry import resolve_model

    return resolve_model(model, pull=lambda t: offer_pull(t, notify=notify), notify=notify).resolve()


def _run(o: BatchOptions, todo, cut_tail: int, summary: BatchSummary, notify, on_line) -> None:
    from .batch_input import id_key
    from .batch_output import ResultWriter

    pool, cluster = _pool(o, notify)
    summary.mode = "local" if cluster is None else "ray"
    try:
        notify(
            f"starting {getattr(pool, 'workers', 1)} worker(s)"
            + (" on Ray" if cluster is not None else " in this process")
            + f" for {len(todo)} prompts"
        )
        summary.workers = pool.start()
        nodes = collections.Counter(w["node"] for w in summary.workers)
        notify(
            f"workers ready: {len(summary.workers)} on {len(nodes)} node(s), {summary.workers[0]['threads']} "
            f"threads and {o.parallel} sequences each, context {summary.workers[0]['ctx']}"
        )
        t0 = time.monotonic()
        with (
            ResultWriter(o.output, cut_tail=cut_tail) as writer,
            _BatchProgress("batch", unit="prompts", total=len(todo), count_unit="tok/s") as bar,
        ):
            written: set[str] = set()

            def on_result(line: dict, where) -> None:
                key = id_key(line["id"])
                if key in written:  # never two lines for one id, whatever a retry brought back
                    return
                written.add(key)
                writer.write(line)
                summary.written += 1
                if "error" in line:
                    summary.errors += 1
                else:
                    summary.prompt_tokens += line["usage"]["prompt_tokens"]
                    summary.completion_tokens += line["usage"]["completion_tokens"]
                bar.update(summary.written, count=(summary.completion_tokens, 0))
                if on_line is not None:
                    on_line(line, where)

            try:
                pool.run([it.to_dict() for it in todo], on_result)
            except BaseException:
                notify(
                    f"stopped: {summary.written} of {len(todo)} prompts written to {o.output}; "
                    "run again with --resume for the rest"
                )
                raise
        summary.seconds = time.monotonic() - t0
        summary.per_node = dict(pool.per_node)
        summary.retried, summary.restarts = pool.retried, pool.restarts
    finally:
        pool.close()
        if cluster is not None:
            cluster.__exit__(None, None, None)
    notify(format_summary(summary, o.output))


def format_summary(s: BatchSummary, output: Path) -> str:
    rate = f"{s.written / s.seconds:.2f} prompts/s, {s.completion_tokens / s.seconds:.1f} tok/s" if s.seconds else ""
    parts = [f"batch: {s.written} lines written to {output} in {s.seconds:.1f} s ({rate})"]
    if s.errors:
        parts.append(f"{s.errors} error lines")
    if s.restarts or s.retried:
        parts.append(f"{s.restarts} worker restarts, {s.retried} prompts retried")
    if s.mode == "ray":
        parts.append("per node: " + ", ".join(f"{n[:8]} {c}" for n, c in sorted(s.per_node.items())))
    return "; ".join(parts)

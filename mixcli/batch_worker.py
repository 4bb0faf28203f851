"""One `mixcli batch` worker: the model loaded once, prompts decoded together by the server's engine.

A worker owns a ``Runtime`` and an ``engine.Engine`` (the server's decode thread over
``batch.BatchDecoder``): ``run(item)`` encodes one prompt, queues it and waits for its answer, so
callers on several threads (the Ray actor's concurrency, or the in-process pool) keep up to
``parallel`` sequences in each forward pass. Nothing here imports Ray: the same class runs inside
a Ray actor (mixcli/batch_ray.py) and in the job's own process when Ray is not installed.

A prompt that fails for its own reason (too long for the context, a chat template that refuses
it, bad sampling values) comes back as an output line with an ``error`` field; only a dead
process loses a prompt, and the job retries those.
"""

from __future__ import annotations

import os
import queue
from dataclasses import asdict, replace
from pathlib import Path

from .errors import MixcliError

DEFAULT_MAX_TOKENS = 256  # as `mixcli generate`


def error_line(ident, kind: str, message: str) -> dict:
    """An output line for a prompt that has no answer. ``kind``: context_length_exceeded,
    invalid_prompt, generation_failed, worker_failed."""
    return {"id": ident, "error": {"type": kind, "message": message}}


def resolve_on_node(model: str | None, *, pull: bool) -> Path:
    """The model directory on this node: a path as given, else a registry name or Hub id from
    this node's store, pulled into it on first use when ``pull`` (no question asked: a worker has
    no terminal; concurrent pulls of one model wait for each other, mixcli.pull's lock)."""
    from .registry import resolve_model

    def _pull(target):
        from .pull import plan_hub, pull_hub, pull_model
        from .registry import ModelEntry

        if not pull:
            raise MixcliError(f"{target} is not in this node's model store", "pull it there, or pass a shared path")
        if isinstance(target, ModelEntry):
            return pull_model(target)
        return pull_hub(plan_hub(target))

    return resolve_model(model, pull=_pull)


class BatchWorker:
    """The model and an engine of ``parallel`` slots; ``run`` is safe to call from many threads."""

    def __init__(
        self,
        model: str | None,
        *,
        parallel: int = 4,
        ctx: int | None = None,
        threads: int | None = None,
        max_memory: str | None = None,
        mmap: bool | None = True,
        act: str | None = None,
        sampling: dict | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        stop: list[str] | None = None,
        pull: bool = True,
        notify=None,
    ):
        from .engine import Engine
        from .runtime import load_runtime
        from .sampling import SamplerConfig

        path = resolve_on_node(model, pull=pull)
        self.rt = load_runtime(
            str(path), ctx=ctx, threads=threads, max_memory=max_memory, mmap=mmap, act=act, notify=notify
        )  # notify: the first-run compile notice (in the job's process)
        self.engine = Engine(self.rt.model, self.rt.tokenizer, parallel=parallel, max_queue=1 << 30)
        self.engine.start()
        self.ctx = self.engine.ctx
        self.defaults = SamplerConfig(**(sampling or {}))
        self.max_tokens = max_tokens
        self.stop = list(stop or ())
        self.pid = os.getpid()

    def describe(self) -> dict:
        m = self.rt.model
        return {
            "model": self.rt.name,
            "ctx": self.ctx,
            "threads": m.threads,
            "pid": self.pid,
            "slots": len(self.engine.decoder.slots),
        }

    def encode(self, item: dict) -> list[int]:
        if "messages" in item:
            return self.rt.chat_prompt(item["messages"])[0]
        return self.rt.raw_prompt(item["prompt"])

    def run(self, item: dict) -> dict:
        """One prompt -> its output line: ``{"id", "text", "finish_reason", "usage"}`` or an
        error line."""
        from .engine import Job
        from .openai_api import usage
        from .sampling import make_sampler

        ident = item["id"]
        try:
            tokens = self.encode(item)
        except MixcliError as exc:
            return error_line(ident, "invalid_prompt", str(exc))
        if not tokens:
            return error_line(ident, "invalid_prompt", "the prompt is empty after encoding")
        if len(tokens) >= self.ctx:
            return error_line(
                ident,
                "context_length_exceeded",
                f"the prompt is {len(tokens)} tokens, the context holds {self.ctx} "
                "(one more is needed for the answer; raise --ctx or shorten the prompt)",
            )
        given = {k: item[k] for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed") if k in item}
        try:
            cfg = replace(self.defaults, **given).validate()
            sampler = make_sampler(cfg)
        except MixcliError as exc:
            return error_line(ident, "invalid_prompt", str(exc))
        max_tokens = min(int(item.get("max_tokens", self.max_tokens)), self.ctx - len(tokens))
        stop = tuple(item["stop"]) if "stop" in item else tuple(self.stop)
        answers: queue.SimpleQueue = queue.SimpleQueue()
        self.engine.submit(Job(tokens, sampler, max_tokens, stop, answers.put))
        parts = []
        while True:
            resp = answers.get()
            if isinstance(resp, BaseException):
                return error_line(ident, "generation_failed", f"{type(resp).__name__}: {resp}")
            parts.append(resp.text)
            if resp.finish_reason is not None:
                st = resp.stats
                return {
                    "id": ident,
                    "text": "".join(parts),
                    "finish_reason": resp.finish_reason,
                    "usage": usage(st.prompt_tokens, st.completion_tokens),
                }

    def close(self) -> None:
        self.engine.shutdown(timeout=5)


def sampling_dict(cfg) -> dict:
    """A SamplerConfig as plain data for a worker in another process."""
    return asdict(cfg)

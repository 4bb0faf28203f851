"""The server's decode loop: requests join and leave a running batch between steps.

One thread owns the model. Each step it admits waiting requests into free slots (the slot whose
cache holds the longest prefix of the prompt, so a client resending a conversation prefills only
the new turn), drops cancelled ones, and runs one ``BatchDecoder.step`` over every decoding
sequence's next token plus up to one chunk of prompt tokens of the sequences still prefilling.
Then each sequence samples its token (``generate.TokenStream``) and its responses go back to the
caller through the ``emit`` function it gave (thread-safe; the server posts them to its event
loop). The model and the tokenizer are only ever used from this thread.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .batch import BatchDecoder
from .generate import GenerationStats, TokenStream


class QueueFull(Exception):
    """More requests wait than the server allows (the HTTP layer answers 503)."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work (503)."""


@dataclass
class Job:
    """One request's sequence. ``emit`` receives GenerationResponse objects (the last one has
    finish_reason set) or one exception; it is called from the engine thread."""

    prompt: list[int]
    sampler: Callable
    max_tokens: int
    stop: Sequence[str]
    emit: Callable
    ignore_eos: bool = False  # llama-server's field: run to max_tokens (benchmarks)
    cancelled: bool = False  # set by the caller (e.g. the client disconnected): dropped at the next step
    slot: int | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet run
    stream: TokenStream | None = None
    next_token: int | None = None
    t0: float = field(default_factory=time.perf_counter)


class Engine:
    def __init__(self, model, tokenizer, parallel: int = 4, max_queue: int = 64, ctx: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.decoder = BatchDecoder(model, parallel, ctx)
        self.ctx = self.decoder.ctx
        self.max_queue = max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mixcli-engine", daemon=True)
        self.completed = 0  # sequences finished (any reason), for /health

    # ---- the caller's side (any thread) ----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise ShuttingDown()
            free = len(self.decoder.slots) - len(self.active)
            if len(self.waiting) >= self.max_queue + max(0, free):
                raise QueueFull()
            self.waiting.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self._cv:
            self._cv.notify()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking work; running sequences end at the next step with finish_reason "length"
        (cut short), waiting ones get ShuttingDown."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if timeout is not None and self._thread.is_alive():
            self._thread.join(timeout)

    def status(self) -> dict:
        with self._cv:
            busy = len(self.active)
            return {
                "slots_idle": len(self.decoder.slots) - busy,
                "slots_processing": busy,
                "requests_waiting": len(self.waiting),
                "requests_completed": self.completed,
            }

    # ---- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        self.model.set_threads(self.model.threads)  # numba's thread count is per thread
        while True:
            with self._cv:
                while not (self.active or self.waiting or self._stopping):
                    self._cv.wait()
                if self._stopping:
                    self._stop_all()
                    return
            try:
                with self._cv:
                    self._admit()
                self._drop_cancelled()
                if self.active:
                    self._step()
            except Exception as exc:  # never a dead server: the running sequences fail, the loop goes on
                with self._cv:
                    for job in list(self.active):
                        self.decoder.release(job.slot, clear=True)
                        self._finish(job, exc)

    def _finish(self, job: Job, resp_or_exc) -> None:
        try:
            job.emit(resp_or_exc)
        except Exception:  # the receiver is gone (its loop closed): nothing left to tell
            pass
        if job in self.active:
            self.active.remove(job)
        self.completed += 1

    def _stop_all(self) -> None:
        for job in list(self.active):
            if job.stream is None:
                job.stream = TokenStream(
                    self.tokenizer,
                    job.prompt,
                    job.sampler,
                    job.max_tokens,
                    job.stop,
                    GenerationStats(prompt_tokens=len(job.prompt)),
                )
            self.decoder.release(job.slot, clear=bool(job.pending))
            self._finish(job, job.stream.close("length"))
        while self.waiting:
            self._finish(self.waiting.popleft(), ShuttingDown())

    def _admit(self) -> None:
        while self.waiting and len(self.active) < len(self.decoder.slots):
            job = self.waiting.popleft()
            if job.cancelled:
                self.completed += 1
                continue
            busy = {j.slot for j in self.active}
            free = [s.index for s in self.decoder.slots if s.index not in busy]
            job.slot, keep = self.decoder.pick_slot(job.prompt, free)
            job.pending = job.prompt[keep:]
            job.stream = TokenStream(
                self.tokenizer,
                job.prompt,
                job.sampler,
                job.max_tokens,
                job.stop,
                GenerationStats(prompt_tokens=len(job.prompt), prefilled_tokens=len(job.pending)),
                ignore_eos=job.ignore_eos,
            )
            self.active.append(job)

    def _drop_cancelled(self) -> None:
        with self._cv:
            for job in [j for j in self.active if j.cancelled]:
                # every token in the slot was fully processed, so its cache stays reusable;
                # a job cut mid-prompt keeps the part it ran
                self.decoder.release(job.slot)
                self._finish(job, job.stream.close("interrupted"))

    def _step(self) -> None:
        work, jobs = [], []
        budget = self.decoder.chunk
        for job in self.active:
            if job.pending:
                if budget <= 0:
                    continue
                part, job.pending = job.pending[:budget], job.pending[budget:]
                budget -= len(part)
                work.append((job.slot, part))
            else:
                work.append((job.slot, [job.next_token]))
            jobs.append(job)
        t = time.perf_counter()
        try:
            logits = self.decoder.step(work)
        except Exception as exc:  # never a dead server: these sequences fail, the others go on
            with self._cv:
                for job in jobs:
                    self.decoder.release(job.slot, clear=True)
                    self._finish(job, exc)
            return
        dt = time.perf_counter() - t
        ended = []
        for job, lg in zip(jobs, logits):
            st = job.stream.stats
            if job.stream.stats.completion_tokens == 0 and job.next_token is None:
                st.prefill_seconds += dt
                if job.pending:
                    continue  # more prompt to run before the first token
            else:
                st.decode_seconds += dt
            resp = job.stream.sample(lg)
            if st.completion_tokens == 1:
                st.first_token_seconds = time.perf_counter() - job.t0
            if resp is not None:
                job.next_token = resp.token
                try:
                    job.emit(resp)
                except Exception:
                    job.cancelled = True
            if job.stream.finish is not None:
                ended.append(job)
        with self._cv:
            for job in ended:
                self.decoder.release(job.slot)
                self._finish(job, job.stream.close())

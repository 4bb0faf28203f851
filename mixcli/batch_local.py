"""`mixcli batch` without Ray: one worker in the job's own process.

The same ``BatchWorker`` as a Ray actor runs, fed by ``parallel + 2`` threads so its engine
always decodes ``parallel`` prompts together; there is no other process to lose, so nothing is
retried (an exception in a prompt becomes its error line).
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable

from .batch_worker import BatchWorker, error_line

LOCAL_NODE = "local"


class LocalPool:
    def __init__(self, worker_kwargs: dict, *, threads: int | None, parallel: int, notify=None):
        self.kwargs = {**worker_kwargs, "threads": threads, "parallel": parallel, "notify": notify}
        self.parallel = parallel
        self.worker: BatchWorker | None = None
        self.per_node: collections.Counter = collections.Counter()
        self.retried = 0
        self.restarts = 0

    def start(self) -> list[dict]:
        self.worker = BatchWorker(**self.kwargs)
        return [{"node": LOCAL_NODE, **self.worker.describe()}]

    def run(self, items: list[dict], on_result: Callable[[dict, dict | None], None]) -> None:
        """Run every item; ``on_result(line, {"node", "pid"})`` is called in this thread as each ends."""
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for item in items:
            todo.put(item)
        done: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()

        def feed() -> None:
            while not stop.is_set():
                try:
                    item = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put(self.worker.run(item))
                except Exception as exc:  # a bug, not the prompt's fault: its line says so
                    done.put(error_line(item["id"], "generation_failed", f"{type(exc).__name__}: {exc}"))

        feeders = [
            threading.Thread(target=feed, daemon=True, name=f"mixcli-batch-feed-{i}")
            for i in range(min(len(items), self.parallel + 2))
        ]
        for t in feeders:
            t.start()
        try:
            for _ in items:
                line = done.get()
                if "error" not in line:
                    self.per_node[LOCAL_NODE] += 1
                on_result(line, {"node": LOCAL_NODE, "pid": self.worker.pid})
        finally:
            stop.set()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None

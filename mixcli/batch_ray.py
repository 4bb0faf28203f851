"""`mixcli batch` on Ray: worker actors that load the model once, fed prompts by the job's process.

Ray does the scheduling across nodes, restarts a worker whose process died (up to ``retries``
times) and carries prompts and results; this module only keeps each worker ``parallel + 2``
prompts deep (its engine decodes ``parallel`` together and always has the next one waiting)
and sends the prompts of a failed call again, at most ``retries`` more times each, to any live
worker. A worker's actor runs calls on several threads (``max_concurrency``) so that one process
serves many prompts at once through ``batch_worker.BatchWorker``.

Without ``--ray-address`` Ray is started inside the job (``start_local``): no dashboard, no usage
reports, a small object store, a temporary directory of its own (removed at the end; one left by
a killed job is removed by the next). Ray's services listen on every interface (Ray has no
loopback-only mode; README says how to require a token). With an address the job joins that
cluster.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .batch_worker import error_line
from .errors import MixcliError, UsageError

OBJECT_STORE_BYTES = 200 * 1024 * 1024  # prompts and answers are small; Ray's default takes 30% of RAM
TEMP_PREFIX = "mixcli-ray-"
PLACEMENT_NOTICE_S = 60  # a worker not ready after this (no free resources, a slow load) is mentioned
EXTRA_DEPTH = 2  # prompts queued in a worker beyond its slots, so a finished slot refills at once


def ray_missing() -> str | None:
    """None when Ray can be imported, else why not."""
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        return str(exc) or "ray is not installed"
    return None


def _sweep_temp_dirs(notify) -> None:
    """Temporary directories of embedded Ray clusters whose job process is gone."""
    root = Path(tempfile.gettempdir())
    for d in root.glob(f"{TEMP_PREFIX}*"):
        try:
            pid = int(d.name[len(TEMP_PREFIX) :].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)
            if notify is not None:
                notify(f"removed {d} (left by a killed mixcli batch)")


class RayCluster:
    """A context: join ``address`` (``ray://host:10001``, ``host:port`` or ``auto``), or start
    Ray inside this process with ``num_cpus`` logical CPUs. Ray already started by the caller
    (a program using mixcli as a library, the tests) is used as it is and left running."""

    def __init__(self, address: str | None, num_cpus: int, notify=None):
        self.address, self.num_cpus, self.notify = address, num_cpus, notify
        self.started = False
        self.temp_dir: str | None = None

    def __enter__(self) -> RayCluster:
        import ray

        if ray.is_initialized():
            return self
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports to Anyscale (no network at run time)
        say = self.notify or (lambda m: None)
        if self.address is None:
            _sweep_temp_dirs(self.notify)
            say(f"starting Ray on this machine ({self.num_cpus} CPUs; --ray-address joins a cluster instead)")
            self.temp_dir = start_local(self.num_cpus)
        else:
            say(f"joining the Ray cluster at {self.address}")
            check_reachable(self.address)
            try:
                ray.init(
                    address=self.address, log_to_driver=False, logging_level=logging.ERROR, namespace="mixcli-batch"
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise MixcliError(
                    f"cannot join the Ray cluster at {self.address}: {first_line(exc)}",
                    "check the address (ray://HEAD:10001, HEAD:6379 or auto) and that it runs",
                ) from None
        self.started = True
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            import ray

            ray.shutdown()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that nothing answers on is an error now: ray.init would
    retry it for minutes."""
    import socket

    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise MixcliError(
            f"nothing answers at the Ray address {address} ({exc.strerror or exc})",
            "check the address (ray://HEAD:10001 or HEAD:6379) and that the cluster runs",
        ) from None


def start_local(num_cpus: int, temp_root: str | None = None) -> str:
    """Ray on this machine only, owned by this process; returns its temporary directory."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp_dir = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=temp_root)
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
            _temp_dir=temp_dir,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            logging_level=logging.ERROR,
            namespace="mixcli-batch",
        )
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return temp_dir


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def last_line(exc: BaseException) -> str:
    lines = [s for s in str(exc).strip().splitlines() if s.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


class _ActorBody:
    """What runs in each worker process (wrapped by ``ray.remote`` in ``_actor_class``)."""

    def __init__(self, kwargs: dict):
        import ray

        from .batch_worker import BatchWorker

        self.node = ray.get_runtime_context().get_node_id()
        self.error = None
        try:
            self.worker = BatchWorker(**kwargs)
        except Exception as exc:  # reported by ready(): the job says which node could not load the model
            self.worker, self.error = None, str(exc) or type(exc).__name__

    def ready(self) -> dict:
        if self.worker is None:
            return {"node": self.node, "error": self.error}
        return {"node": self.node, **self.worker.describe()}

    def run(self, item: dict) -> tuple[dict, dict]:
        return self.worker.run(item), {"node": self.node, "pid": self.worker.pid}


_ACTOR = None


def _actor_class():
    global _ACTOR
    if _ACTOR is None:
        import ray

        _ACTOR = ray.remote(_ActorBody)
    return _ACTOR


def cluster_shape() -> tuple[int, float]:
    """(alive nodes, logical CPUs) of the Ray cluster this process is connected to."""
    import ray

    return len(ray_nodes()), float(ray.cluster_resources().get("CPU", 0))


def placement(workers: int, threads: int) -> list:
    """A scheduling strategy per worker: nodes taken in turn, each as often as its CPUs hold
    ``threads`` (so 2 workers on a 16-CPU and an 8-CPU node get one each, where Ray's own SPREAD
    may put both on the first); soft, so a node that is gone or too small lets Ray place it elsewhere.
    Workers beyond what the nodes hold are left to SPREAD."""
    import itertools

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(((n["NodeID"], n["Resources"].get("CPU", 0.0)) for n in ray_nodes()), key=lambda n: -n[1])
    turns = itertools.zip_longest(*[[node] * int(cpus // threads) for node, cpus in nodes])
    order = [node for turn in turns for node in turn if node is not None]
    return [NodeAffinitySchedulingStrategy(order[i], soft=True) if i < len(order) else "SPREAD" for i in range(workers)]


def ray_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


class RayPool:
    """``workers`` actors of ``threads`` CPUs each, spread over the cluster's nodes."""

    def __init__(
        self,
        worker_kwargs: dict,
        *,
        workers: int,
        threads: int,
        parallel: int,
        retries: int,
        memory_bytes: int | None = None,
        notify=None,
    ):
        self.kwargs = {**worker_kwargs, "threads": threads, "parallel": parallel}
        self.workers, self.threads, self.parallel, self.retries = workers, threads, parallel, retries
        self.memory_bytes = memory_bytes
        self.notify = notify or (lambda m: None)
        self.actors: list = []
        self.per_node: collections.Counter = collections.Counter()
        self.retried = 0  # prompt calls sent again after their worker died
        self.restarts = 0  # worker deaths noticed

    def start(self) -> list[dict]:
        """Create the actors and wait until each has loaded the model; a worker that could not
        load it stops the job with its node's reason."""
        import ray

        _, cpus = cluster_shape()
        need = self.workers * self.threads
        if need > cpus:
            raise UsageError(
                f"{self.workers} workers x {self.threads} threads need {need} CPUs, the Ray cluster has {cpus:g}",
                "lower --workers or --threads-per-worker",
            )
        opts = {
            "num_cpus": self.threads,
            "max_restarts": self.retries,
            "max_task_retries": 0,
            "max_concurrency": self.parallel + EXTRA_DEPTH,
        }
        if self.memory_bytes:
            opts["memory"] = self.memory_bytes
        cls = _actor_class()
        self.actors = [
            cls.options(**opts, scheduling_strategy=where).remote(self.kwargs)
            for where in placement(self.workers, self.threads)
        ]
        infos = []
        for ref in [a.ready.remote() for a in self.actors]:
            while True:
                try:
                    info = ray.get(ref, timeout=PLACEMENT_NOTICE_S)
                    break
                except ray.exceptions.GetTimeoutError:
                    self.notify(
                        f"still waiting for {self.workers - len(infos)} worker(s) to start: Ray may lack "
                        "free CPUs or memory for them (`ray status` shows what is free)"
                    )
                except ray.exceptions.RayError as exc:
                    raise MixcliError(f"a batch worker did not start: {last_line(exc)}") from None
            if info.get("error"):
                raise MixcliError(
                    f"the worker on Ray node {info['node'][:12]} could not load the model: {info['error']}",
                    "on a cluster, pass a path every node sees, or a registry name / Hub id that each node pulls",
                )
            infos.append(info)
        return infos

    def run(self, items: list[dict], on_result: Callable[[dict, dict | None], None]) -> None:
        """Run every item; ``on_result(line, {"node", "pid"} of its worker, or None)`` is called
        in this thread as each ends."""
        import ray

        pending = collections.deque(items)
        attempts: collections.Counter = collections.Counter()
        load = [0] * len(self.actors)
        alive = [True] * len(self.actors)
        pinging: dict = {}  # ping ref -> actor index: no work is sent to a worker whose call just failed
        inflight: dict = {}  # ref -> (item, actor index)
        depth = self.parallel + EXTRA_DEPTH
        while pending or inflight or pinging:
            for i, actor in enumerate(self.actors):
                while alive[i] and i not in pinging.values() and load[i] < depth and pending:
                    item = pending.popleft()
                    inflight[actor.run.remote(item)] = (item, i)
                    load[i] += 1
            if not any(alive):
                raise MixcliError(
                    f"every batch worker died ({len(pending) + len(inflight)} prompts left)",
                    "see the Ray logs for why; --resume runs the rest",
                )
            ready, _ = ray.wait(list(inflight) + list(pinging), num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in pinging:
                    i = pinging.pop(ref)
                    try:
                        info = ray.get(ref)
                        alive[i] = not info.get("error")
                    except ray.exceptions.RayError:
                        alive[i] = False
                    if not alive[i]:
                        self.notify(f"batch worker {i} is gone for good; the others go on")
                    continue
                item, i = inflight.pop(ref)
                load[i] -= 1
                try:
                    line, where = ray.get(ref)
                except ray.exceptions.RayActorError as exc:  # the process died: Ray restarts it
                    if i not in pinging.values() and alive[i]:
                        self.restarts += 1
                        pinging[self.actors[i].ready.remote()] = i
                    attempts[item["line"]] += 1
                    if attempts[item["line"]] > self.retries:
                        on_result(
                            error_line(
                                item["id"],
                                "worker_failed",
                                f"its worker died {attempts[item['line']]} times ({first_line(exc)})",
                            ),
                            None,
                        )
                    else:
                        self.retried += 1
                        pending.appendleft(item)
                    continue
                except ray.exceptions.RayTaskError as exc:  # a bug in the worker, not a lost process
                    on_result(error_line(item["id"], "generation_failed", last_line(exc)), None)
                    continue
                if "error" not in line:
                    self.per_node[where["node"]] += 1
                on_result(line, where)

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []

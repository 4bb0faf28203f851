"""An expert cache: experts compete for a fixed memory budget; the next ones load in the background.

Why not leave it to the page cache: with a model larger than RAM the OS evicts blindly and reads
late (one page fault, one readahead window at a time, in the middle of a matrix product). The
runtime knows better: which experts the router picked and how often, and which experts the next
layer will probably pick. So this provider keeps a fixed number of *slots*, each one expert's
contiguous [w1 | w3 | w2] region, in one anonymous mapping allocated once (resident expert memory
never exceeds the slots; the budget is ``max_memory - pinned``, pinned being every non-expert
weight), and never touches expert pages through the store's memory map. Its parts:

* ``expert_policy``: which resident expert to evict (pure, replayable on recorded routing);
* ``expert_reader``: one sequential read per expert region into a slot (O_DIRECT, or buffered);
* ``expert_predictor``: layer l+1's likely experts from layer l's input;
* this module: the slots, and one background thread that, once layer l's router has spoken
  (``on_route``), reads layer l's missing experts in routing order (the second loads while the
  first computes), then layer l+1's predicted ones, abandoning a guess that turned stale.

Results are bit-identical to the memory-mapped provider: a slot holds the same bytes at the same
alignment (both page-aligned), and the same kernels run on them.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from .errors import MixcliError, ModelFormatError, UsageError
from .expert_policy import DEFAULT_HALF_LIFE, DEFAULT_POLICY, ReplacementPolicy
from .expert_predictor import NextLayerPredictor
from .expert_reader import PAGE, ExpertLoadError, ExpertReader
from .experts import ExpertStats, ExpertWeights, MappedExperts
from .linear import Linear
from .memsize import format_size
from .store import ModelStore, QTensor

WAIT_POLL = 0.25  # seconds between checks that the loader thread is alive while waiting on it
MIN_SLOTS = 2  # one expert computing, one loading
DEFAULT_DIRECT = True  # O_DIRECT reads when the filesystem allows them (measured in the benchmark)


@dataclass
class CacheStats:
    """Counters since the last reset (``get`` calls are the unit: one routed expert per call)."""

    hits: int = 0  # the expert was resident when the forward pass asked for it
    prefetch_hits: int = 0  # ... and it was there because the loader thread read it ahead
    guess_hits: int = 0  # ... read ahead as a guess for this layer while the previous one ran
    waits: int = 0  # the loader thread was still reading it: we waited for the rest
    misses: int = 0  # read synchronously on the forward pass's own time
    evictions: int = 0
    bytes_loaded: int = 0  # read from disk by either thread (includes wasted guesses)
    bytes_missed: int = 0  # read synchronously (the forward pass waited for all of it)
    bytes_wasted: int = 0  # read ahead and evicted or abandoned before any use
    stall_seconds: float = 0.0  # time the forward pass spent waiting for expert reads
    predicted: int = 0  # decode steps x K: experts guessed for the next layer
    guesses_skipped: int = 0  # guesses not read ahead: their layer's recent accuracy was too low
    predicted_right: int = 0  # of those, how many the next layer's router then chose
    predicted_right_raw: int = 0  # the same for the guess without the norm-weight correction
    tokens: int = 0  # tokens whose MoE layers ran (decode and prefill)
    peak_resident_bytes: int = 0  # largest sum of region sizes held or being read at once

    @property
    def requests(self) -> int:
        return self.hits + self.waits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        return self.predicted_right / self.predicted if self.predicted else 0.0


class _Slot:
    """One expert-sized, page-aligned piece of the slot mapping."""

    __slots__ = ("index", "buf", "key", "loading", "prefetched", "in_use")

    def __init__(self, index: int, buf: np.ndarray):
        self.index = index
        self.buf = buf  # [slot_bytes] u1
        self.key: tuple[int, int] | None = None  # (layer, expert) held or being read
        self.loading = False  # a read into buf is in progress
        self.prefetched: str | None = None  # "layer" or "guess": read by the loader, not yet used
        self.in_use = False  # handed to the forward pass; its kernels may be reading buf


@dataclass(frozen=True)
class _Part:
    rel: int  # byte offset inside the expert region
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class _TensorLayout:
    name: str  # "w1", "w3" or "w2"
    qtype: str
    shape: tuple[int, ...]
    nbytes: int
    parts: tuple[tuple[str, _Part], ...]


def _expert_layouts(store: ModelStore):
    """Per expert: (file, offset, nbytes, layout); identical layouts share slot-bound weights."""
    out = {}
    for (layer, e), region in store.experts.items():
        tl = []
        for w in ("w1", "w3", "w2"):
            t: QTensor = store.tensor(f"layers.{layer}.experts.{e}.{w}")
            entry = store.manifest["tensors"][t.name]
            parts = []
            for pname, arr in t.parts.items():
                rel = int(entry["parts"][pname]["offset"]) - region.offset
                if t.file != region.file or rel < 0 or rel + arr.nbytes > region.nbytes:
                    raise ModelFormatError(
                        f"{store.path}: tensor {t.name} lies outside its expert region",
                        "re-run `mixcli convert` on the source checkpoint",
                    )
                parts.append((pname, _Part(rel, tuple(arr.shape), arr.dtype)))
            tl.append(_TensorLayout(w, t.qtype, tuple(t.shape), t.nbytes, tuple(parts)))
        out[(layer, e)] = (region.file, region.offset, region.nbytes, tuple(tl))
    return out


def pinned_bytes(store: ModelStore) -> int:
    """Bytes of every weight that is not an expert: these stay mapped and resident."""
    return sum(t.nbytes for name, t in store.tensors.items() if ".experts." not in name)


def cache_overhead(store: ModelStore) -> int:
    """Pinned bytes of a cached model: the non-expert weights plus the cache's predictor gates."""
    cfg = store.config
    return pinned_bytes(store) + cfg.num_hidden_layers * cfg.num_local_experts * cfg.hidden_size * 4


def slot_bytes(store: ModelStore) -> int:
    """One slot: the largest expert region, rounded up to a page."""
    return (max(r.nbytes for r in store.experts.values()) + PAGE - 1) // PAGE * PAGE


def memory_for_slots(store: ModelStore, n_slots: int) -> int:
    """The --max-memory that gives exactly n_slots expert slots."""
    return cache_overhead(store) + n_slots * slot_bytes(store)


def expert_bytes(store: ModelStore) -> int:
    return sum(r.nbytes for r in store.experts.values())


def _loader_main(ref: weakref.ReferenceType[ExpertCache]) -> None:
    """The background thread: holds the cache only while working, so dropping it ends the thread."""
    while True:
        cache = ref()
        if cache is None or cache._closed:
            return
        try:
            job = cache._next_job(WAIT_POLL)
            if job is not None:
                cache._run_job(*job)
        except BaseException as exc:  # a bug here must reach the forward pass, not vanish
            cache._fail(exc)
            return
        del cache, job


class ExpertCache:
    """The caching ``ExpertProvider`` (see the module docstring): ``attach``, ``on_route`` and
    ``get`` are the model's hooks; ``cstats`` counts what the cache did (``ui.cache_report``)."""

    def __init__(
        self,
        store: ModelStore,
        kernels=None,
        max_memory: int = 0,
        *,
        prefetch: bool = True,
        policy: str = DEFAULT_POLICY,
        half_life: float = DEFAULT_HALF_LIFE,
        drop_page_cache: bool = True,
        predict_with_next_norm: bool = True,
        direct: bool = DEFAULT_DIRECT,
    ):
        cfg = store.config
        self.store = store
        self.config = cfg
        self.L, self.E, self.K = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
        self.replacement = ReplacementPolicy(policy, self.L, self.E, half_life)
        self.policy = policy
        self.stats = ExpertStats(self.L, self.E)  # what the forward pass used (as MappedExperts)
        self.cstats = CacheStats()  # what the cache did
        self.predictor = NextLayerPredictor(self.L, self.E, self.K, predict_with_next_norm)
        self._kernels = kernels

        self._regions = _expert_layouts(store)
        self.slot_bytes = slot_bytes(store)
        self.max_memory = int(max_memory)
        self.pinned_bytes = cache_overhead(store)
        self.n_slots = self._slots_in_budget(store.path.name, len(self._regions))
        self.capacity_bytes = self.n_slots * self.slot_bytes
        self._slots, self._arena = _allocate_slots(self.n_slots, self.slot_bytes)
        self._where: dict[tuple[int, int], _Slot] = {}
        self._bound: dict[tuple[int, tuple], ExpertWeights] = {}  # (slot, layout) -> weights over the slot
        self.reader = ExpertReader(
            store.path, (f for (f, _, _, _) in self._regions.values()), direct=direct, drop_page_cache=drop_page_cache
        )

        self._needed: set[tuple[int, int]] = set()  # this layer's routed experts not yet handed out
        self._wanted: set[tuple[int, int]] = set()  # what the loader may still read
        self._queue: collections.deque[tuple[int, int]] = collections.deque()
        self._in_use: _Slot | None = None
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self.prefetch = bool(prefetch)
        self._thread: threading.Thread | None = None
        if self.prefetch:
            self._thread = threading.Thread(
                target=_loader_main, args=(weakref.ref(self),), name="mixcli-expert-loader", daemon=True
            )
            self._thread.start()

    def _slots_in_budget(self, name: str, n_experts: int) -> int:
        n = (self.max_memory - self.pinned_bytes) // self.slot_bytes
        if n < MIN_SLOTS:
            need = self.pinned_bytes + MIN_SLOTS * self.slot_bytes
            raise UsageError(
                f"--max-memory {format_size(self.max_memory)} is too small for {name}: its "
                f"non-expert weights take {format_size(self.pinned_bytes)} and the expert cache needs "
                f"room for at least {MIN_SLOTS} experts of {format_size(self.slot_bytes)}",
                f"use --max-memory {format_size(need)} or more",
            )
        return int(min(n, n_experts))

    @property
    def mapped_bytes(self) -> int:
        """Bytes of the slot mapping itself (what the budget pays for the slots)."""
        return len(self._arena)

    # ---- the provider's hooks ------------------------------------------------------------------
    def attach(self, model) -> None:
        """Take the router weights to predict with (and the model's kernels, if none were given)."""
        if self._kernels is None:
            self._kernels = model.kernels
        self.predictor.attach(model.layers)

    def on_route(self, layer: int, x: np.ndarray, experts: np.ndarray) -> None:
        """Layer's router chose experts [T, K] for x [T, D]: queue this layer's missing experts
        in the order the layer will ask for them (top-k order for one token, expert id order for
        a batch), then the next layer's predicted ones."""
        self._raise_pending()
        T = x.shape[0]
        order = [int(e) for e in (experts[0] if T == 1 else np.unique(experts))]
        if T == 1:
            n, right, right_raw = self.predictor.score(layer, set(order))
            self.cstats.predicted += n
            self.cstats.predicted_right += right
            self.cstats.predicted_right_raw += right_raw
        guess = self.predictor.predict(layer, x)
        with self._cv:
            self._release_in_use()
            self.replacement.enter(layer)
            if layer == 0:
                self._tick(T)
            self._needed = {(layer, e) for e in order}
            room = max(0, self.n_slots - len(order) - 1)  # never guess more than fits beside this layer
            if guess and not self.predictor.trusted(layer + 1):  # wrong too often lately: not worth a read
                self.cstats.guesses_skipped += len(guess)
                guess = []
            nxt = [(layer + 1, e) for e in guess][:room]
            self._wanted = self._needed | set(nxt)
            for s in self._slots:  # guesses this layer did not take: ordinary residents from now on
                if s.prefetched and not s.loading and s.key not in self._wanted:
                    s.prefetched = None
                    self.cstats.bytes_wasted += self._regions[s.key][2]
            self._queue.clear()
            if self.prefetch:
                self._queue.extend(k for k in [(layer, e) for e in order] + nxt if k not in self._where)
                self._cv.notify_all()

    def get(self, layer: int, expert: int, n_tokens: int) -> ExpertWeights:
        """The weights of one routed expert, resident in a slot until the next call."""
        key = (layer, expert)
        nbytes = self._regions[key][2]
        self.stats.record(layer, expert, n_tokens, nbytes)
        if self.E == 1 and layer == 0:
            self._tick(n_tokens)
        with self._cv:
            self._raise_pending_locked()
            self._release_in_use()
            self._needed.discard(key)
            self.replacement.use(key)
            slot = self._where.get(key)
            if slot is not None and slot.loading:
                self._wait_for(slot, key)
                slot = self._where.get(key)
                if slot is not None:
                    self.cstats.waits += 1
            elif slot is not None:
                self.cstats.hits += 1
                if slot.prefetched:
                    self.cstats.prefetch_hits += 1
                    self.cstats.guess_hits += slot.prefetched == "guess"
            miss = slot is None
            if miss:  # read it here, on the forward pass's time
                slot = self._claim(key, main=True)
                while slot is None:  # every slot is being read by the loader (tiny budgets only)
                    self._wait_for(None, None)
                    slot = self._claim(key, main=True)
            slot.prefetched = None
            slot.in_use = True
            self._in_use = slot
            if self.E == 1 and self.prefetch:  # dense: the next layer's only expert is certain
                nxt = ((layer + 1) % self.L, 0)
                self._wanted = {nxt}
                self._queue.clear()
                if nxt not in self._where:
                    self._queue.append(nxt)
            self._cv.notify_all()  # the slot handed out before this one is free for the loader
        if miss:
            self._read_on_forward_pass(slot, key)
        return self._weights(slot, key)

    def _read_on_forward_pass(self, slot: _Slot, key) -> None:
        t0 = time.perf_counter()
        try:
            self._read(slot, key, None)
        except BaseException:
            with self._cv:
                self._drop(slot)
                self._in_use = None
                slot.in_use = False
                self._cv.notify_all()
            raise
        with self._cv:
            slot.loading = False
            self._cv.notify_all()
        self.cstats.misses += 1
        self.cstats.bytes_missed += self._regions[key][2]
        self.cstats.stall_seconds += time.perf_counter() - t0

    # ---- bookkeeping (callers hold self._cv) ---------------------------------------------------
    def _tick(self, n_tokens: int) -> None:
        self.replacement.tick(n_tokens)
        self.cstats.tokens += n_tokens

    def _release_in_use(self) -> None:
        if self._in_use is not None:
            self._in_use.in_use = False
            self._in_use = None

    def _resident_bytes(self) -> int:
        return sum(self._regions[s.key][2] for s in self._slots if s.key is not None)

    def _claim(self, key, main: bool) -> _Slot | None:
        """A slot for key, evicting by the replacement policy's rank. The loader thread may not
        evict what this layer still needs or what it already read ahead; the forward pass may
        evict anything not being read or computed on."""
        best, best_rank = None, None
        for s in self._slots:
            if s.loading or s.in_use:
                continue
            needed, ahead = s.key in self._needed, bool(s.prefetched)
            if not main and s.key is not None and (needed or ahead):
                continue
            rank = self.replacement.rank(s.key, needed=needed, prefetched=ahead)
            if best_rank is None or rank < best_rank:
                best, best_rank = s, rank
        if best is None:
            return None
        if best.key is not None:
            self._drop(best)
            self.cstats.evictions += 1
        best.key = key
        best.loading = True
        best.prefetched = None if main else ("layer" if key in self._needed else "guess")
        self._where[key] = best
        self.cstats.peak_resident_bytes = max(self.cstats.peak_resident_bytes, self._resident_bytes())
        return best

    def _drop(self, slot: _Slot) -> None:
        if slot.key is not None:
            if slot.prefetched and not slot.loading:
                self.cstats.bytes_wasted += self._regions[slot.key][2]
            self._where.pop(slot.key, None)
        slot.key = None
        slot.loading = False
        slot.prefetched = None

    def _wait_for(self, slot: _Slot, key) -> None:
        """Wait (holding nothing but the condition) until the loader finishes slot; never hang: a
        dead loader thread or a recorded error ends the wait with an error."""
        t0 = time.perf_counter()
        first = True
        while (slot is None and first) or (slot is not None and slot.loading and slot.key == key):
            first = False
            self._raise_pending_locked()
            if self._thread is None or not self._thread.is_alive():
                raise ExpertLoadError(
                    "the expert loader thread stopped while reading an expert",
                    "run again; if it repeats, run without --max-memory and report it",
                )
            self._cv.wait(WAIT_POLL)
        self._raise_pending_locked()
        self.cstats.stall_seconds += time.perf_counter() - t0

    def _raise_pending(self) -> None:
        with self._cv:
            self._raise_pending_locked()

    def _raise_pending_locked(self) -> None:
        err = self._error
        if err is None:
            return
        self._error = None
        if isinstance(err, MixcliError):
            raise err
        raise ExpertLoadError(
            f"the expert loader thread failed: {type(err).__name__}: {err}",
            "run again; if it repeats, run without --max-memory and report it",
        ) from err

    def _fail(self, exc: BaseException) -> None:
        with self._cv:
            self._error = exc
            self._cv.notify_all()

    # ---- the loader thread ---------------------------------------------------------------------
    def _next_job(self, timeout: float):
        with self._cv:
            if not self._queue:
                self._cv.wait(timeout)
            while self._queue and not self._closed:
                key = self._queue.popleft()
                if key in self._where or key not in self._wanted:
                    continue
                slot = self._claim(key, main=False)
                if slot is not None:
                    return slot, key
                if key in self._needed:  # no free slot yet: wait for the forward pass to release one
                    self._queue.appendleft(key)
                    self._cv.wait(timeout)
                    return None
        return None

    def _run_job(self, slot: _Slot, key) -> None:
        def stale() -> bool:
            return slot.key != key or key not in self._wanted

        try:
            done = self._read(slot, key, stale)
        except MixcliError as exc:
            with self._cv:
                if slot.key == key:
                    self._drop(slot)
                self._fail(exc)
            return
        with self._cv:
            if slot.key == key:
                if done:
                    slot.loading = False
                else:  # abandoned: the guess went stale while reading
                    self.cstats.bytes_wasted += self._regions[key][2]
                    self._drop(slot)
            self._cv.notify_all()

    # ---- slots ---------------------------------------------------------------------------------
    def _read(self, slot: _Slot, key, stale) -> bool:
        """Read key's region into slot (``expert_reader``); False if ``stale()`` turned true."""
        fname, offset, nbytes, _ = self._regions[key]
        return self.reader.read(key, fname, offset, nbytes, slot.buf, stale, self._count_loaded)

    def _count_loaded(self, n: int) -> None:
        self.cstats.bytes_loaded += n

    def _weights(self, slot: _Slot, key) -> ExpertWeights:
        """Linear views over the slot, built once per (slot, layout) and reused for every expert."""
        _, _, nbytes, layout = self._regions[key]
        bound = self._bound.get((slot.index, layout))
        if bound is None:
            if self._kernels is None:
                from .model import _kernel_module

                self._kernels = _kernel_module()
            lin = []
            for tl in layout:
                parts = {
                    p: slot.buf[q.rel : q.rel + int(np.prod(q.shape)) * q.dtype.itemsize].view(q.dtype).reshape(q.shape)
                    for p, q in tl.parts
                }
                qt = QTensor(tl.name, tl.qtype, tl.shape, parts, "", 0, tl.nbytes)
                lin.append(Linear(qt, self._kernels))
            bound = ExpertWeights(lin[0], lin[1], lin[2], nbytes)
            self._bound[(slot.index, layout)] = bound
        if bound.nbytes != nbytes:
            bound = ExpertWeights(bound.w1, bound.w3, bound.w2, nbytes)
        return bound

    # ---- public --------------------------------------------------------------------------------
    def resident(self) -> dict[tuple[int, int], int]:
        """(layer, expert) -> region bytes for every expert held or being read now."""
        with self._cv:
            return {s.key: self._regions[s.key][2] for s in self._slots if s.key is not None}

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until the loader has nothing queued or in flight (tests, benchmarks); False on
        timeout. A loader error is raised here."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._queue or any(s.loading for s in self._slots):
                self._raise_pending_locked()
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cv.wait(min(left, WAIT_POLL))
            self._raise_pending_locked()
        return True

    def reset_stats(self) -> None:
        self.stats.reset()
        self.cstats = CacheStats()

    def close(self) -> None:
        """Stop the loader thread (the slots stay valid until the cache is dropped)."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def _allocate_slots(n_slots: int, size: int):
    """n_slots page-aligned buffers of size bytes in one anonymous mapping: (slots, mapping)."""
    import mmap

    # anonymous: pages exist only once written. Not advised for huge pages (hugepages.py) as the
    # weights read into memory are: this pool lives under a memory budget with slots refilled from
    # disk, where huge pages' reclaim and first-touch costs are unmeasured.
    arena = mmap.mmap(-1, n_slots * size)
    flat = np.frombuffer(arena, dtype=np.uint8)  # [n_slots * size]
    return [_Slot(i, flat[i * size : (i + 1) * size]) for i in range(n_slots)], arena


def make_expert_provider(store: ModelStore, kernels=None, max_memory: int | None = None, prefetch: bool = True):
    """The provider for ``Model(store, experts=...)``: ``MappedExperts`` when there is no budget or
    the whole model fits in it (the page cache then does no harm), else an ``ExpertCache``."""
    if kernels is None:
        from .model import _kernel_module

        kernels = _kernel_module()
    if max_memory is None:
        return MappedExperts(store, kernels)
    if max_memory <= 0:
        raise UsageError(f"--max-memory must be positive, got {max_memory}", "e.g. --max-memory 12GB")
    if max_memory >= pinned_bytes(store) + expert_bytes(store):
        return MappedExperts(store, kernels)
    return ExpertCache(store, kernels, max_memory, prefetch=prefetch)

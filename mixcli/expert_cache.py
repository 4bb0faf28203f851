"""An expert cache: experts compete for a fixed memory budget; the next ones load in the background.

Why not leave it to the page cache: with a model larger than RAM the OS evicts blindly and reads
late (one page fault, one readahead window at a time, in the middle of a matrix product). The
runtime knows better: which experts the router picked and how often, and, by applying layer l+1's
router to layer l's MoE input (mixtral-offloading's trick), which experts the next layer will
probably pick. So this provider

* keeps a fixed number of *slots*, each one expert's contiguous [w1 | w3 | w2] region, in one
  anonymous mapping allocated once: resident expert memory can never exceed the slots, and the
  budget is ``max_memory - pinned`` where pinned is every non-expert weight;
* loads an expert with one sequential ``preadv`` of its region straight into a slot, with
  O_DIRECT where the filesystem allows it (else buffered, then POSIX_FADV_DONTNEED so the page
  cache does not hold a second copy). Why not ``madvise(WILLNEED)`` on the mapping: cold, all
  four ways read a 94.5 MiB expert at about disk speed (benchmarks/expert_cache.py measures them),
  so speed does not decide; control does. A read into our own buffer finishes at a known moment
  (the loader can say "ready"), holds exactly the bytes we count, and cannot be evicted behind our
  back; pages behind WILLNEED may be dropped again before use, their readiness cannot be
  observed, and the mapped pages count against RSS with no way to bound them;
* never touches expert pages through the store's memory map;
* chooses victims by *expected next use* ("next", the default): an expert's layer comes round
  again in d layer steps and it is then chosen with probability p (its decayed use count with a
  half-life of 8 tokens, over that of an every-token expert), so it is expected back in
  d + L(1-p)/p steps; evict the largest. Replaying recorded and synthetic routing through it, LFU
  and LRU (benchmarks/expert_cache.py): it is at least as good as LFU everywhere, and when routing
  is steady it approaches Belady's bound where LRU and LFU score zero (a token walks the layers
  in a cycle, and a cycle longer than the pool evicts each expert just before its next use).
  LRU wins only on very sticky routing with a large pool; "lfu" and "lru" remain selectable;
* runs one background thread that, when layer l's router has spoken, first reads layer l's own
  missing experts in routing order (so the second expert loads while the first one computes) and
  then layer l+1's predicted ones; reads are chunked so a guess that turned stale is abandoned.
  The numba kernels release the GIL, and so does ``preadv``, so loading overlaps compute.

Results are bit-identical to the memory-mapped provider: a slot holds the same bytes at the same
alignment (both page-aligned), and the same kernels run on them.
"""
from __future__ import annotations

import collections
import errno
import os
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from .errors import MixcliError, ModelFormatError, UsageError
from .experts import ExpertStats, ExpertWeights, MappedExperts
from .linear import Linear
from .memsize import format_size
from .store import ModelStore, QTensor

PAGE = 4096
READ_CHUNK = 8 << 20  # a background read checks every 8 MiB whether its guess is still wanted
WAIT_POLL = 0.25  # seconds between checks that the loader thread is alive while waiting on it
MIN_SLOTS = 2  # one expert computing, one loading
DEFAULT_POLICY = "next"
DEFAULT_DIRECT = True  # O_DIRECT reads when the filesystem allows them (measured in the benchmark)
POLICIES = ("next", "lfu", "lru")
DEFAULT_HALF_LIFE = 8.0  # tokens: how fast the LFU score forgets (measured in the benchmark)


class _DirectUnsupported(Exception):
    """O_DIRECT reads are refused here (EINVAL): fall back to buffered reads."""


class ExpertLoadError(MixcliError):
    """An expert's weights could not be read from the model's data file."""


def pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """One positioned read into buf; returns bytes read (0 at end of file). Releases the GIL."""
    return os.preadv(fd, [buf], offset)


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
            cache._fail(None, exc)
            return
        del cache, job


class ExpertCache:
    """The caching expert provider (see the module docstring). ``get`` is called by the forward
    pass; ``attach`` and ``before_moe`` are the model's hooks; ``cache_stats`` is for --stats."""

    def __init__(self, store: ModelStore, kernels=None, max_memory: int = 0, *, prefetch: bool = True,
                 policy: str = DEFAULT_POLICY, half_life: float = DEFAULT_HALF_LIFE,
                 drop_page_cache: bool = True, predict_with_next_norm: bool = True, direct: bool = DEFAULT_DIRECT):
        if policy not in POLICIES:
            raise UsageError(f"unknown expert cache policy {policy!r}", f"use one of {', '.join(POLICIES)}")
        cfg = store.config
        self.store = store
        self.config = cfg
        self.L, self.E, self.K = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
        self.stats = ExpertStats(self.L, self.E)  # what the forward pass used (as MappedExperts)
        self.cstats = CacheStats()  # what the cache did
        self.policy = policy
        self.half_life = float(half_life)
        self.drop_page_cache = drop_page_cache
        self.predict_with_next_norm = predict_with_next_norm
        self._kernels = kernels

        self._regions = _expert_layouts(store)
        self.slot_bytes = slot_bytes(store)
        self.max_memory = int(max_memory)
        self.pinned_bytes = cache_overhead(store)
        n = (self.max_memory - self.pinned_bytes) // self.slot_bytes
        if n < MIN_SLOTS:
            need = self.pinned_bytes + MIN_SLOTS * self.slot_bytes
            raise UsageError(
                f"--max-memory {format_size(self.max_memory)} is too small for {store.path.name}: its "
                f"non-expert weights take {format_size(self.pinned_bytes)} and the expert cache needs "
                f"room for at least {MIN_SLOTS} experts of {format_size(self.slot_bytes)}",
                f"use --max-memory {format_size(need)} or more",
            )
        self.n_slots = int(min(n, len(self._regions)))
        self.capacity_bytes = self.n_slots * self.slot_bytes
        import mmap

        # anonymous: pages exist only once written. Not advised for huge pages (hugepages.py) as
        # the weights read into memory are: this pool lives under a memory budget with slots
        # refilled from disk, where huge pages' reclaim and first-touch costs are unmeasured.
        self._arena = mmap.mmap(-1, self.capacity_bytes)
        arena = np.frombuffer(self._arena, dtype=np.uint8)  # [n_slots * slot_bytes]
        self._slots = [_Slot(i, arena[i * self.slot_bytes : (i + 1) * self.slot_bytes]) for i in range(self.n_slots)]
        self._where: dict[tuple[int, int], _Slot] = {}
        self._bound: dict[tuple[int, tuple], ExpertWeights] = {}  # (slot, layout) -> weights over the slot

        self._fds: dict[str, int] = {}
        for fname in {f for (f, _, _, _) in self._regions.values()}:
            try:
                self._fds[fname] = os.open(store.path / fname, os.O_RDONLY)
            except OSError as exc:
                raise ExpertLoadError(f"cannot open {store.path / fname}: {exc.strerror}",
                                      "check that the model directory is intact") from None
        self._dfds: dict[str, int] = {}  # O_DIRECT descriptors: no page-cache copy at all
        if direct and hasattr(os, "O_DIRECT"):
            for fname in self._fds:
                try:
                    self._dfds[fname] = os.open(store.path / fname, os.O_RDONLY | os.O_DIRECT)
                except OSError:  # e.g. tmpfs: buffered reads plus DONTNEED instead
                    break
        self._finalizer = weakref.finalize(self, _close_fds, list(self._fds.values()) + list(self._dfds.values()))

        # replacement scores: last use (LRU) or a decayed use count (LFU), kept for every expert so
        # a hot expert that was pushed out comes back with its history
        self._clock = 0.0  # tokens seen
        self._cur_layer = 0  # the layer the forward pass is in
        self._last = np.zeros((self.L, self.E), np.float64)  # [L, E] clock at last use
        self._freq = np.zeros((self.L, self.E), np.float64)  # [L, E] decayed use count at _last

        # router-driven state, set in before_moe
        self._gates_next: list[np.ndarray | None] = [None] * self.L  # [E, D] layer l's gate, norm-corrected for l-1's input
        self._gates_raw: list[np.ndarray | None] = [None] * self.L  # [E, D]
        self._guess: dict[int, tuple[set[int], set[int]]] = {}  # layer -> (guess, raw guess) for T == 1
        self._needed: set[tuple[int, int]] = set()  # this layer's routed experts not yet handed out
        self._wanted: set[tuple[int, int]] = set()  # what the loader may still read
        self._queue: collections.deque[tuple[int, int]] = collections.deque()
        self._in_use: _Slot | None = None

        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self._error_key: tuple[int, int] | None = None
        self._closed = False
        self.prefetch = bool(prefetch)
        self._thread: threading.Thread | None = None
        if self.prefetch:
            self._thread = threading.Thread(target=_loader_main, args=(weakref.ref(self),),
                                            name="mixcli-expert-loader", daemon=True)
            self._thread.start()

    # ---- model hooks ---------------------------------------------------------------------------
    def attach(self, model) -> None:
        """Take the router weights: the guess for layer l+1 is gate[l+1] applied to layer l's MoE
        input, rescaled elementwise by ffn_norm[l+1] / ffn_norm[l] so it is the input layer l+1
        would see if the residual stream did not move (measured against the raw guess: both are
        counted in ``cstats``)."""
        if self._kernels is None:
            self._kernels = model.kernels
        layers = model.layers
        for li in range(1, self.L):
            gate = layers[li].gate
            if gate is None:
                continue
            prev, cur = layers[li - 1].ffn_norm, layers[li].ffn_norm  # [D]
            ratio = np.divide(cur, prev, out=np.zeros_like(cur), where=np.abs(prev) > 1e-12)  # [D]
            self._gates_raw[li] = gate  # [E, D]
            self._gates_next[li] = np.ascontiguousarray(gate * ratio[None, :], dtype=np.float32)  # [E, D]

    def before_moe(self, layer: int, xb: np.ndarray, router_logits: np.ndarray) -> None:
        """Layer ``layer``'s router ran on xb [T, D] giving router_logits [T, E]: queue this layer's
        missing experts, then the next layer's predicted ones."""
        self._raise_pending()
        T = xb.shape[0]
        K, E = self.K, self.E
        # the order the forward pass will ask in: by router logit for one token, by expert id
        # for a batch (it groups tokens by expert)
        top = np.argsort(-router_logits, axis=1, kind="stable")[:, :K]  # [T, K]
        order = [int(e) for e in (top[0] if T == 1 else np.unique(top))]
        if T == 1:
            self._score_guess(layer, set(order))
        guess_order: list[int] = []
        if T == 1 and layer + 1 < self.L and self._gates_next[layer + 1] is not None:
            g = self._gates_next[layer + 1] @ xb[0]  # [E]
            graw = self._gates_raw[layer + 1] @ xb[0]  # [E]
            gs = np.argsort(-g, kind="stable")[:K]
            self._guess[layer + 1] = ({int(e) for e in gs}, {int(e) for e in np.argsort(-graw, kind="stable")[:K]})
            guess_order = [int(e) for e in (gs if self.predict_with_next_norm else np.argsort(-graw, kind="stable")[:K])]
        elif T > 1 and layer + 1 < self.L and self._gates_next[layer + 1] is not None:
            gate = self._gates_next[layer + 1] if self.predict_with_next_norm else self._gates_raw[layer + 1]
            g = xb @ gate.T  # [T, E]
            gtop = np.argpartition(-g, K - 1, axis=1)[:, :K] if K < E else np.tile(np.arange(E), (T, 1))  # [T, K]
            gc = np.bincount(gtop.ravel(), minlength=E)  # [E]
            guess_order = [int(e) for e in np.argsort(-gc, kind="stable") if gc[e] > 0]
        with self._cv:
            self._release_in_use()
            self._cur_layer = layer
            self._tick(T if layer == 0 else 0)
            self._needed = {(layer, e) for e in order}
            nxt = [(layer + 1, e) for e in guess_order]
            room = max(0, self.n_slots - len(order) - 1)  # never guess more than fits beside this layer
            nxt = nxt[:room]
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
        st = self.stats
        st.counts[layer, expert] += n_tokens
        st.touched[layer, expert] += 1
        if self.E == 1 and layer == 0:
            self._tick(n_tokens)
        with self._cv:
            self._raise_pending_locked()
            self._release_in_use()
            self._needed.discard(key)
            self._use(key)
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
            if slot is None:  # a miss: read it here, on the forward pass's time
                slot = self._claim(key, main=True)
                while slot is None:  # every slot is being read by the loader (tiny budgets only)
                    self._wait_for(None, None)
                    slot = self._claim(key, main=True)
                miss = True
            else:
                miss = False
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
            n = self._regions[key][2]
            self.cstats.misses += 1
            self.cstats.bytes_missed += n
            self.cstats.stall_seconds += time.perf_counter() - t0
        st.bytes_read += self._regions[key][2]
        return self._weights(slot, key)

    # ---- bookkeeping (callers hold self._cv) ---------------------------------------------------
    def _tick(self, n_tokens: int) -> None:
        self._clock += n_tokens
        self.cstats.tokens += n_tokens

    def _use(self, key) -> None:
        l, e = key
        self._cur_layer = l
        if self.policy != "lru":
            self._freq[l, e] = self._decayed(l, e) + 1.0
        self._last[l, e] = self._clock + 1e-6 * (l + 1)  # later layers of a token are more recent

    def _decayed(self, l: int, e: int) -> float:
        return self._freq[l, e] * 0.5 ** ((self._clock - self._last[l, e]) / self.half_life)

    def _score(self, key) -> float:
        """Higher = keep."""
        l, e = key
        if self.policy == "next":
            return next_use_score(self._decayed(l, e), l, self._cur_layer, self.L, self.half_life)
        return self._decayed(l, e) if self.policy == "lfu" else self._last[l, e]

    def _release_in_use(self) -> None:
        if self._in_use is not None:
            self._in_use.in_use = False
            self._in_use = None

    def _resident_bytes(self) -> int:
        return sum(self._regions[s.key][2] for s in self._slots if s.key is not None)

    def _claim(self, key, main: bool) -> _Slot | None:
        """A slot for key, evicting the lowest-value expert. The loader thread may not evict what
        this layer still needs or what it already read ahead; the forward pass may evict anything
        not being read or computed on."""
        best, best_rank = None, None
        for s in self._slots:
            if s.loading or s.in_use:
                continue
            if s.key is None:
                rank = (0, 0.0)
            elif s.key in self._needed:  # this layer still asks for it
                if not main:
                    continue
                rank = (3, self._score(s.key))
            elif s.prefetched:  # read ahead, not used yet
                if not main:
                    continue
                rank = (2, self._score(s.key))
            else:
                rank = (1, self._score(s.key))
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
                raise ExpertLoadError("the expert loader thread stopped while reading an expert",
                                      "run again; if it repeats, run without --max-memory and report it")
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
        raise ExpertLoadError(f"the expert loader thread failed: {type(err).__name__}: {err}",
                              "run again; if it repeats, run without --max-memory and report it") from err

    def _fail(self, key, exc: BaseException) -> None:
        with self._cv:
            self._error = exc
            self._error_key = key
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
                self._fail(key, exc)
            return
        with self._cv:
            if slot.key == key:
                if done:
                    slot.loading = False
                else:  # abandoned: the guess went stale while reading
                    self.cstats.bytes_wasted += self._regions[key][2]
                    self._drop(slot)
            self._cv.notify_all()

    # ---- reading -------------------------------------------------------------------------------
    def _read(self, slot: _Slot, key, stale) -> bool:
        """Read key's region into slot in chunks; False if ``stale()`` turned true on the way."""
        fname, offset, nbytes, _ = self._regions[key]
        dfd = self._dfds.get(fname)
        if dfd is not None:
            try:
                return self._read_with(dfd, True, slot, key, stale)
            except _DirectUnsupported:
                _close_fds(list(self._dfds.values()))
                self._dfds.clear()
        return self._read_with(self._fds[fname], False, slot, key, stale)

    def _read_with(self, fd: int, direct: bool, slot: _Slot, key, stale) -> bool:
        fname, offset, nbytes, _ = self._regions[key]
        # O_DIRECT moves whole pages: read up to the page end (slots are page multiples)
        span = min(self.slot_bytes, (nbytes + PAGE - 1) // PAGE * PAGE) if direct else nbytes
        view = memoryview(slot.buf)[:span]
        pos = 0
        try:
            while pos < nbytes:
                end = min(span, pos + READ_CHUNK) if stale is not None else span
                try:
                    got = pread_into(fd, view[pos:end], offset + pos)
                except OSError as exc:
                    if direct and exc.errno == errno.EINVAL and pos == 0:
                        raise _DirectUnsupported() from None
                    raise
                if got <= 0:
                    raise ExpertLoadError(
                        f"{self.store.path / fname} ends at byte {offset + pos}, inside expert {key[1]} of layer {key[0]}",
                        "the file was truncated or replaced; re-convert the model",
                    )
                got = min(got, nbytes - pos)
                pos += got
                self.cstats.bytes_loaded += got
                if stale is not None and pos < nbytes and stale():
                    return False
        except OSError as exc:
            raise ExpertLoadError(
                f"reading expert {key[1]} of layer {key[0]} from {self.store.path / fname} failed: "
                f"{exc.strerror or exc}",
                "check that the model directory is intact and the disk readable",
            ) from None
        finally:
            if self.drop_page_cache and pos and not direct:
                try:
                    os.posix_fadvise(fd, offset, pos, os.POSIX_FADV_DONTNEED)
                except OSError:
                    pass  # advice only
        return True

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
                parts = {p: slot.buf[q.rel : q.rel + int(np.prod(q.shape)) * q.dtype.itemsize].view(q.dtype).reshape(q.shape)
                         for p, q in tl.parts}
                qt = QTensor(tl.name, tl.qtype, tl.shape, parts, "", 0, tl.nbytes)
                lin.append(Linear(qt, self._kernels))
            bound = ExpertWeights(lin[0], lin[1], lin[2], nbytes)
            self._bound[(slot.index, layout)] = bound
        if bound.nbytes != nbytes:
            bound = ExpertWeights(bound.w1, bound.w3, bound.w2, nbytes)
        return bound

    # ---- predictions ---------------------------------------------------------------------------
    def _score_guess(self, layer: int, actual: set[int]) -> None:
        guess = self._guess.pop(layer, None)
        if guess is None:
            return
        cs = self.cstats
        cs.predicted += len(actual)
        cs.predicted_right += len(guess[0] & actual)
        cs.predicted_right_raw += len(guess[1] & actual)

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

    def cache_stats(self) -> str:
        """Two lines for --stats and /stats."""
        c = self.cstats
        tok = max(c.tokens, 1)
        lines = [
            f"expert cache: {self.n_slots} slots x {format_size(self.slot_bytes)} = {format_size(self.capacity_bytes)} "
            f"(+ {format_size(self.pinned_bytes)} pinned, budget {format_size(self.max_memory)}) | policy {self.policy}"
            f"{' + prefetch' if self.prefetch else ''}",
            f"  hits {c.hit_rate:.0%} ({c.hits}/{c.requests}; {c.prefetch_hits} read ahead, {c.guess_hits} of them "
            f"guessed a layer early) | waited {c.waits} | "
            f"missed {c.misses} | evictions {c.evictions} | disk {format_size(c.bytes_loaded / tok)}/token "
            f"({format_size(c.bytes_missed / tok)} on the critical path) | stalled {c.stall_seconds:.2f} s",
        ]
        if c.predicted:
            lines.append(
                f"  next-layer guess right {c.prefetch_accuracy:.0%} ({c.predicted_right}/{c.predicted}; "
                f"without norm correction {c.predicted_right_raw / c.predicted:.0%}) | "
                f"read ahead but unused {format_size(c.bytes_wasted)}"
            )
        return "\n".join(lines)


def next_use_score(decayed: float, layer: int, cur_layer: int, n_layers: int, half_life: float) -> float:
    """Minus the expected number of layer steps until an expert is used again (higher = keep).

    Its layer comes round again in d steps (d = L for the current layer: the next token); each
    time, it is chosen with probability p, estimated as its decayed use count over the count an
    expert used on every token would have. Expected wait: d + L (1 - p) / p. With steady routing
    (p near 1) this evicts the expert whose layer is farthest ahead, Belady's choice for a cycle;
    with random routing it keeps the most often chosen experts, as LFU does."""
    steady = 1.0 / (1.0 - 0.5 ** (1.0 / half_life))  # the decayed count of an every-token expert
    p = min(1.0, max(decayed / steady, 1e-3))
    d = (layer - cur_layer) % n_layers or n_layers
    return -(d + n_layers * (1.0 - p) / p)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


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

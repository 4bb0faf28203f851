"""Several sequences decoded together: one forward pass over all their new tokens (the server's
continuous batching, llama.cpp's ``--parallel`` slots).

Each of the P slots owns a KV cache and the tokens it holds. A step takes, for any subset of the
slots, the tokens to append (one for a decoding sequence, a chunk of the prompt for one that is
prefilling), concatenates them into one batch of T tokens and runs every weight matrix once over
that batch (the model's ``matmul`` kernels), so dense weights are read once per step for all
sequences. The blocks are the model's own (``Model.forward_blocks``): attention runs per slot,
over that slot's cache (one ``SeqRows`` per slot), and the MoE layer groups the batch's tokens by
routed expert exactly as prefill does. A slot's results depend on the other rows of the batch only
through float rounding: the per-row arithmetic is the same.

The weights and kernels are the ``Model``'s; its own single-sequence KV cache is not touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import UsageError
from .kv_cache import KVCache
from .model import RunState, SeqRows


@dataclass
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # the sequence held in this slot's cache
    last_used: int = 0  # step counter when it last ran, for choosing among equal prefixes

    @property
    def pos(self) -> int:
        return len(self.tokens)


class BatchDecoder:
    """P KV caches over one model's weights; ``step`` runs one batched forward pass."""

    def __init__(self, model, parallel: int, ctx: int | None = None):
        if parallel < 1:
            raise UsageError(f"--parallel must be at least 1, got {parallel}")
        cfg = model.config
        self.model = model
        self.ctx = model.ctx if ctx is None else min(int(ctx), model.ctx)  # S per slot
        self.chunk = model.batch  # most prompt tokens of one slot per step
        L, KVH, HD = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        S = self.ctx
        # np.zeros maps pages lazily: a slot's cache costs memory only as far as it is filled
        self.caches = [KVCache(L, KVH, HD, S, model.kv.kv_type) for _ in range(parallel)]  # the model's kv type
        self.slots = [Slot(i) for i in range(parallel)]
        self.max_tokens = parallel + self.chunk  # T: every slot decoding plus one prompt chunk
        self._steps = 0
        self._state: RunState | None = None  # [Tmax, ...], allocated at the first step

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    # ---- slots -------------------------------------------------------------------------------
    def pick_slot(self, prompt: Sequence[int], free: Sequence[int]) -> tuple[int, int]:
        """(slot, cached tokens to keep) among ``free`` slots: the longest cached prefix of
        ``prompt``, then the least recently used. At least one prompt token is always run."""
        from .generate import common_prefix

        best = None
        for i in free:
            s = self.slots[i]
            keep = min(common_prefix(s.tokens, prompt), len(prompt) - 1)
            key = (keep, -s.last_used)
            if best is None or key > best[0]:
                best = (key, i, keep)
        if best is None:
            raise RuntimeError("no free slot")
        _, i, keep = best
        self.slots[i].tokens = self.slots[i].tokens[:keep]
        return i, keep

    def release(self, i: int, clear: bool = False) -> None:
        """The slot's sequence ended; its cache stays for a later prompt with the same prefix
        unless ``clear`` (e.g. a forward pass was cut and may have left it half written)."""
        if clear:
            self.slots[i].tokens = []

    # ---- the forward pass ------------------------------------------------------------------------
    def step(self, work: Sequence[tuple[int, Sequence[int]]]) -> list[np.ndarray]:
        """Append ``tokens`` to slot ``i`` for each (i, tokens) in ``work`` (each slot at most
        once, all tokens of all entries at most ``max_tokens``) in one forward pass; the
        next-token logits [V] after each entry's last token, in order (views, valid until the
        next step)."""
        m, V = self.model, self.model.config.vocab_size
        seqs: list[SeqRows] = []
        toks: list[int] = []
        for i, ts in work:
            ts = [int(t) for t in ts]
            s = self.slots[i]
            if not ts:
                raise UsageError("nothing to process: the token list is empty")
            if s.pos + len(ts) > self.ctx:
                raise UsageError(f"{s.pos + len(ts)} tokens do not fit the context of {self.ctx}")
            if min(ts) < 0 or max(ts) >= V:
                raise UsageError(f"token id out of range 0..{V - 1}")
            seqs.append(SeqRows(len(toks), len(ts), s.pos, self.caches[i]))
            toks.extend(ts)
        T = len(toks)
        if T > self.max_tokens:
            raise ValueError(f"a step of {T} tokens exceeds {self.max_tokens}")
        if self._state is None:
            self._state = RunState.allocate(m.config, self.max_tokens, self.ctx)
        st = self._state.rows(T)
        for seq in seqs:
            st.pos[seq.row0 : seq.row0 + seq.n] = np.arange(seq.pos0, seq.pos0 + seq.n)
        x = m.forward_blocks(toks, st, seqs)
        last = np.array([seq.row0 + seq.n - 1 for seq in seqs], np.int64)
        logits = m.head(np.ascontiguousarray(x[last]), np.empty((len(seqs), V), np.float32))  # [B, V]
        self._steps += 1
        for (i, _), seq in zip(work, seqs):
            s = self.slots[i]
            s.tokens.extend(toks[seq.row0 : seq.row0 + seq.n])
            s.last_used = self._steps
        return [logits[b] for b in range(len(seqs))]

"""Several sequences decoded together: one forward pass over all their new tokens (the server's
continuous batching, llama.cpp's ``--parallel`` slots).

Each of the P slots owns a KV cache and the tokens it holds. A step takes, for any subset of the
slots, the tokens to append (one for a decoding sequence, a chunk of the prompt for one that is
prefilling), concatenates them into one batch of T tokens and runs every weight matrix once over
that batch (the model's ``matmul`` kernels), so dense weights are read once per step for all
sequences. Attention runs per slot, over that slot's cache; the MoE layer groups the batch's
tokens by routed expert exactly as prefill does (``Model._moe``). A slot's results depend on the
other rows of the batch only through float rounding: the per-row arithmetic is the same.

The weights and kernels are the ``Model``'s; its own single-sequence KV cache is not touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import UsageError
from .kv_cache import KVCache


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
        L, KVH, HD, H = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads
        S = self.ctx
        # np.zeros maps pages lazily: a slot's cache costs memory only as far as it is filled
        self.caches = [KVCache(L, KVH, HD, S, model.kv.kv_type) for _ in range(parallel)]  # the model's kv type
        self.slots = [Slot(i) for i in range(parallel)]
        self.max_tokens = parallel + self.chunk  # T: every slot decoding plus one prompt chunk
        self._decode_scratch = np.zeros((H, S), np.float32)  # [H, S] attention scores, one token
        self._steps = 0
        self._state = None

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
    def _buffers(self):
        if self._state is None:
            st = self.model._buffers(self.max_tokens)  # [Tmax, ...] run state; we keep our own reference
            self._state = dict(st)
        return self._state

    def step(self, work: Sequence[tuple[int, Sequence[int]]]) -> list[np.ndarray]:
        """Append ``tokens`` to slot ``i`` for each (i, tokens) in ``work`` (each slot at most
        once, all tokens of all entries at most ``max_tokens``) in one forward pass; the
        next-token logits [V] after each entry's last token, in order (views, valid until the
        next step)."""
        m, cfg, k = self.model, self.model.config, self.model.kernels
        D, H, KVH, HD, V = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size
        segs = []  # (slot, start row, n, pos0)
        toks = []
        for i, ts in work:
            ts = [int(t) for t in ts]
            s = self.slots[i]
            if not ts:
                raise UsageError("nothing to process: the token list is empty")
            if s.pos + len(ts) > self.ctx:
                raise UsageError(f"{s.pos + len(ts)} tokens do not fit the context of {self.ctx}")
            if min(ts) < 0 or max(ts) >= V:
                raise UsageError(f"token id out of range 0..{V - 1}")
            segs.append((i, len(toks), len(ts), s.pos))
            toks.extend(ts)
        T = len(toks)
        if T > self.max_tokens:
            raise ValueError(f"a step of {T} tokens exceeds {self.max_tokens}")
        full = self._buffers()
        st = {name: (a[:T] if isinstance(a, np.ndarray) and a.ndim >= 1 and a.shape[0] == self.max_tokens else a)
              for name, a in full.items()}
        x, xb = st["x"], st["xb"]
        pos = st["pos"]  # [T]
        for i, r0, n, p0 in segs:
            pos[r0:r0 + n] = np.arange(p0, p0 + n)
        for t, tok in enumerate(toks):
            m.tok_embeddings.row(tok, x[t])

        for li, layer in enumerate(m.layers):
            k.rmsnorm(x, layer.attn_norm, cfg.rms_norm_eps, xb)
            q = layer.wq.matmul(xb, st["q"])
            kk = layer.wk.matmul(xb, st["k"])
            vv = layer.wv.matmul(xb, st["v"])
            q3 = q.reshape(T, H, HD)  # [T, H, HD]
            k3 = kk.reshape(T, KVH, HD)  # [T, KVH, HD]
            v3 = vv.reshape(T, KVH, HD)  # [T, KVH, HD]
            k.rope_inplace(q3, pos, m.inv_freq)
            k.rope_inplace(k3, pos, m.inv_freq)
            att = st["att"].reshape(T, H, HD)
            for i, r0, n, p0 in segs:
                self.caches[i].store(li, p0, k3[r0:r0 + n], v3[r0:r0 + n])
                # one token: scores in the decode buffer; a prompt chunk: the tiled kernels
                self.caches[i].attend(k, li, q3[r0:r0 + n], p0, m.scale, att[r0:r0 + n], self._decode_scratch)
            layer.wo.matmul(st["att"], st["xo"])
            x += st["xo"]
            k.rmsnorm(x, layer.ffn_norm, cfg.rms_norm_eps, xb)
            m._moe(li, layer, xb, st)
            x += st["moe"]

        last = np.array([r0 + n - 1 for _, r0, n, _ in segs], np.int64)
        xs = np.ascontiguousarray(x[last])  # [B, D]
        xn = np.empty_like(xs)
        k.rmsnorm(xs, m.norm, cfg.rms_norm_eps, xn)
        logits = np.empty((len(segs), V), np.float32)  # [B, V]
        m.output.matmul(xn, logits)
        m.experts.stats.tokens += T
        self._steps += 1
        for i, r0, n, _ in segs:
            s = self.slots[i]
            s.tokens.extend(toks[r0:r0 + n])
            s.last_used = self._steps
        return [logits[b] for b in range(len(segs))]

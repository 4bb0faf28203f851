"""The forward pass of a Mixtral-class model, to be read beside the paper.

Kept apart as in llama2.c: the *weights* (``Linear`` views bound to their kernels once, at load),
the *run state* (``RunState``, buffers preallocated per batch size, so a decode step allocates
nothing of size D or larger) and the fp16 *KV cache*. Each ``Block`` is
``x += attention(rmsnorm(x)); x += moe(rmsnorm(x))``; a dense Llama/Mistral model runs the same
``MoELayer`` with one expert of weight 1. Where the MoE layer gets expert weights is its
``ExpertProvider``'s business (experts.py), not the layer's.

Prefill runs the prompt in batches of up to ``batch`` tokens: each matrix is read once per batch,
and the MoE layer groups the batch's tokens by routed expert, so each chosen expert is read once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import ModelFormatError, UsageError
from .experts import ExpertProvider, ExpertWeights, MappedExperts
from .kv_cache import KVCache
from .linear import Linear
from .store import ModelStore, open_model_dir

DEFAULT_CTX = 4096  # llama.cpp's default context
DEFAULT_BATCH = 256  # prompt tokens per prefill step


def _kernel_module(isa: str | None = None, act: str | None = None):
    """The kernel table for an instruction-set tier and activation mode (None: $MIXCLI_ISA /
    $MIXCLI_ACT, else the host's best tier and the default mode), or the numpy twins with
    MIXCLI_KERNELS=ref (a whole-model reference)."""
    if os.environ.get("MIXCLI_KERNELS") == "ref":
        from .kernels import ref

        return ref
    from . import kernels

    return kernels.select(isa, act)


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # psutil may not know on exotic systems
        n = None
    return max(1, n or os.cpu_count() or 1)


def _f32_vector(store: ModelStore, name: str) -> np.ndarray:
    return np.ascontiguousarray(store.tensor(name).dequantize(), dtype=np.float32)


@dataclass
class RunState:
    """The buffers of a forward pass over T tokens (llama2.c's RunState), allocated once per T."""

    x: np.ndarray  # [T, D] residual stream
    xb: np.ndarray  # [T, D] a sublayer's normed input
    q: np.ndarray  # [T, H*HD]
    k: np.ndarray  # [T, KVH*HD]
    v: np.ndarray  # [T, KVH*HD]
    att: np.ndarray  # [T, H*HD] attention heads' output, before wo
    attn_out: np.ndarray  # [T, D] the attention sublayer's output
    scores: np.ndarray  # [H, S] one token's attention scores (a prompt chunk allocates its own)
    router_logits: np.ndarray  # [T, E]
    route_weights: np.ndarray  # [T, K] f32 top-K softmax, renormalised
    route_experts: np.ndarray  # [T, K] int32 chosen experts, most probable first
    h1: np.ndarray  # [T, F] w1 x, then silu(w1 x) * (w3 x)
    h3: np.ndarray  # [T, F] w3 x
    expert_out: np.ndarray  # [T, D] one expert's output
    moe_out: np.ndarray  # [T, D] the MoE sublayer's output
    pos: np.ndarray  # [T] int64 each token's position
    slots: tuple | None = None  # (seqs, attn.SlotCaches) of a batched decode step, made at its first layer

    @classmethod
    def allocate(cls, cfg: ModelConfig, T: int, S: int) -> RunState:
        D, H, KVH, HD, F = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.intermediate_size,
        )
        E, K = cfg.num_local_experts, cfg.num_experts_per_tok

        def f32(*shape):
            return np.zeros(shape, np.float32)

        return cls(
            x=f32(T, D),
            xb=f32(T, D),
            q=f32(T, H * HD),
            k=f32(T, KVH * HD),
            v=f32(T, KVH * HD),
            att=f32(T, H * HD),
            attn_out=f32(T, D),
            scores=f32(H, S),
            router_logits=f32(T, E),
            route_weights=f32(T, K),
            route_experts=np.zeros((T, K), np.int32),
            h1=f32(T, F),
            h3=f32(T, F),
            expert_out=f32(T, D),
            moe_out=f32(T, D),
            pos=np.zeros(T, np.int64),
        )

    def rows(self, T: int) -> RunState:
        """The first T rows of every per-token buffer (views): a smaller step in this state."""
        return RunState(
            **{
                f.name: getattr(self, f.name) if f.name == "scores" else getattr(self, f.name)[:T]
                for f in fields(self)
                if f.name != "slots"
            }
        )


@dataclass
class SeqRows:
    """Rows row0..row0+n of a forward pass: one sequence's new tokens, at positions pos0.., with
    the KV cache that holds its first pos0 positions."""

    row0: int
    n: int
    pos0: int
    kv: KVCache  # [L, KVH, S, HD] keys and values, f16 or q8_0 (kv_cache.py)


class Attention:
    """Causal grouped-query self-attention with RoPE: H query heads share KVH kv heads."""

    def __init__(self, store: ModelStore, layer: int, cfg: ModelConfig, kernels):
        p = f"layers.{layer}.attn."
        self.layer = layer
        self.wq = Linear(store.tensor(p + "wq"), kernels)  # [H*HD, D]
        self.wk = Linear(store.tensor(p + "wk"), kernels)  # [KVH*HD, D]
        self.wv = Linear(store.tensor(p + "wv"), kernels)  # [KVH*HD, D]
        self.wo = Linear(store.tensor(p + "wo"), kernels)  # [D, H*HD]
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        HD = self.head_dim
        # RoPE frequencies computed as transformers does (float32 powers of theta)
        exponents = np.arange(0, HD, 2, dtype=np.float32) / np.float32(HD)  # [HD/2]
        self.inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)  # [HD/2]
        self.scale = np.float32(1.0 / np.sqrt(HD))
        self.kernels = kernels

    def __call__(self, x: np.ndarray, st: RunState, seqs: Sequence[SeqRows]) -> np.ndarray:
        """x [T, D] normed -> st.attn_out [T, D]; each sequence's rows attend over its own cache."""
        T, H, KVH, HD = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        kernels = self.kernels
        self.wq.matmul(x, st.q)
        self.wk.matmul(x, st.k)
        self.wv.matmul(x, st.v)
        kernels.rope_inplace(st.q.reshape(T, H, HD), st.pos, self.inv_freq)
        kernels.rope_inplace(st.k.reshape(T, KVH, HD), st.pos, self.inv_freq)
        if len(seqs) > 1 and len(seqs) == T and all(q.kv.kv_type == "f16" for q in seqs):
            self.attend_decoding(st, seqs)
        else:
            for seq in seqs:
                self.attend(st, seq)
        return self.wo.matmul(st.att, st.attn_out)

    def attend_decoding(self, st: RunState, seqs: Sequence[SeqRows]) -> None:
        """One new token per sequence (a batched decode step, row b = seqs[b]'s token), every
        sequence's attention in one kernel call."""
        B, H, KVH, HD = len(seqs), self.n_heads, self.n_kv_heads, self.head_dim
        if st.slots is None or st.slots[0] is not seqs:  # the step's first layer: check the caches once
            caches = self.kernels.slot_caches(
                [seq.kv.k for seq in seqs], [seq.kv.v for seq in seqs], [seq.pos0 + 1 for seq in seqs], H
            )
            st.slots = (seqs, caches)
        self.kernels.store_attend_slots(
            st.q.reshape(B, H, HD),
            st.k.reshape(B, KVH, HD),
            st.v.reshape(B, KVH, HD),
            st.slots[1],
            self.layer,
            self.scale,
            st.att.reshape(B, H, HD),
        )

    def attend(self, st: RunState, seq: SeqRows) -> None:
        """Store seq's keys and values in its cache, then its queries' attention into st.att."""
        n, p0, H, KVH, HD = seq.n, seq.pos0, self.n_heads, self.n_kv_heads, self.head_dim
        rows = slice(seq.row0, seq.row0 + n)
        seq.kv.store(self.layer, p0, st.k[rows].reshape(n, KVH, HD), st.v[rows].reshape(n, KVH, HD))
        # one token: scores in the preallocated [H, S] buffer; a prompt chunk: the cache picks a kernel
        seq.kv.attend(
            self.kernels,
            self.layer,
            st.q[rows].reshape(n, H, HD),
            p0,
            self.scale,
            st.att[rows].reshape(n, H, HD),
            st.scores,
        )


class MoELayer:
    """Mixtral's sparse mixture of experts: the router scores E experts per token, the top K are
    kept with their softmax weights renormalised to sum 1, and the output is the weighted sum of
    those experts' SwiGLU FFNs. A dense model: one expert (the MLP), weight 1, no router."""

    def __init__(self, layer: int, gate: np.ndarray | None, top_k: int, experts: ExpertProvider, kernels):
        self.layer = layer
        self.gate = gate  # [E, D] f32 router weights; None for a dense model
        self.top_k = top_k  # K
        self.experts = experts
        self.kernels = kernels

    def __call__(self, x: np.ndarray, st: RunState) -> np.ndarray:
        """x [T, D] normed -> st.moe_out [T, D]."""
        out = st.moe_out
        out[:] = 0.0
        if self.gate is None:  # dense: the single expert takes every token with weight 1
            self.expert_ffn(self.experts.get(self.layer, 0, x.shape[0]), x, st.h1, st.h3, out)
            return out
        self.route(x, st)
        if x.shape[0] == 1:
            self._run_one_token(x, st, out)
        else:
            self._run_grouped(x, st, out)
        return out

    def route(self, x: np.ndarray, st: RunState) -> None:
        """Router logits, top K, renormalised weights into st.route_*; the provider is told."""
        if x.shape[0] == 1:
            self.kernels.matvec_f32(self.gate, x[0], st.router_logits[0])
        else:
            self.kernels.matmul_f32(self.gate, x, st.router_logits)  # [T, E]
        self.kernels.route_topk(st.router_logits, self.top_k, st.route_weights, st.route_experts)
        self.experts.on_route(self.layer, x, st.route_experts)

    def _run_one_token(self, x: np.ndarray, st: RunState, out: np.ndarray) -> None:
        for j in range(self.top_k):
            w = self.experts.get(self.layer, int(st.route_experts[0, j]), 1)
            self.expert_ffn(w, x, st.h1, st.h3, st.expert_out)
            self.kernels.add_scaled(out[0], st.expert_out[0], st.route_weights[0, j])

    def _run_grouped(self, x: np.ndarray, st: RunState, out: np.ndarray) -> None:
        """Tokens grouped by expert, so each chosen expert's weights are read once per batch."""
        K = self.top_k
        flat = st.route_experts.ravel()  # [T*K]
        order = np.argsort(flat, kind="stable")
        chosen, starts = np.unique(flat[order], return_index=True)
        ends = list(starts[1:]) + [len(order)]
        for e, s0, s1 in zip(chosen, starts, ends):
            sel = order[s0:s1]
            toks = sel // K  # [Te] rows routed to e
            weights = st.route_weights.ravel()[sel]  # [Te]
            Te = len(toks)
            w = self.experts.get(self.layer, int(e), Te)
            ye = st.expert_out[:Te]
            self.expert_ffn(w, np.ascontiguousarray(x[toks]), st.h1[:Te], st.h3[:Te], ye)
            out[toks] += ye * weights[:, None]  # a token routes to an expert at most once: no duplicate rows

    def expert_ffn(self, w: ExpertWeights, x: np.ndarray, h1: np.ndarray, h3: np.ndarray, y: np.ndarray) -> None:
        """y [T, D] = w2( silu(w1 x) * (w3 x) ) for x [T, D] (SwiGLU)."""
        w.w1.matmul(x, h1)
        w.w3.matmul(x, h3)
        self.kernels.silu_mul(h1, h3, h1)
        w.w2.matmul(h1, y)


class Block:
    """One transformer block: x += attention(rmsnorm(x)); x += moe(rmsnorm(x))."""

    def __init__(self, store: ModelStore, layer: int, cfg: ModelConfig, kernels, experts: ExpertProvider):
        p = f"layers.{layer}."
        self.attn_norm = _f32_vector(store, p + "attn_norm")  # [D]
        self.attention = Attention(store, layer, cfg, kernels)
        self.ffn_norm = _f32_vector(store, p + "ffn_norm")  # [D]
        gate = store.tensors.get(p + "moe.gate")
        gate = None if gate is None else np.ascontiguousarray(gate.dequantize(), dtype=np.float32)  # [E, D]
        self.moe = MoELayer(layer, gate, cfg.num_experts_per_tok, experts, kernels)
        self.eps = cfg.rms_norm_eps
        self.kernels = kernels

    def __call__(self, x: np.ndarray, st: RunState, seqs: Sequence[SeqRows]) -> None:
        """x [T, D] in place."""
        self.kernels.rmsnorm(x, self.attn_norm, self.eps, st.xb)
        x += self.attention(st.xb, st, seqs)
        self.kernels.rmsnorm(x, self.ffn_norm, self.eps, st.xb)
        x += self.moe(st.xb, st)


class Model:
    """A loaded model with its KV cache. ``logits(tokens)`` is the whole public surface tests use;
    ``prefill`` / ``decode`` extend the cached sequence for generation."""

    # text side, set by mixcli.load / runtime.attach_text (None for a model converted without one)
    tokenizer = None  # mixcli.tokenizer.Tokenizer
    chat_template: str | None = None  # Jinja text
    add_bos = False  # a raw prompt starts with BOS
    path: Path | None = None

    def __init__(
        self,
        store: ModelStore,
        ctx: int | None = None,
        threads: int | None = None,
        batch: int = DEFAULT_BATCH,
        experts: ExpertProvider | None = None,
        kernels=None,
        kv_type: str | None = None,
    ):
        cfg = store.config
        self.store = store
        self.config: ModelConfig = cfg
        self.kernels = kernels if kernels is not None else _kernel_module()  # a kernels.KernelTable
        max_ctx = cfg.max_position_embeddings
        ctx = DEFAULT_CTX if ctx is None else int(ctx)
        if ctx <= 0:
            raise UsageError(f"--ctx must be positive, got {ctx}")
        self.ctx = min(ctx, max_ctx)  # S
        self.batch = max(1, int(batch))
        self.set_threads(threads)

        provider = experts if experts is not None else MappedExperts(store, self.kernels)
        self.layers = [Block(store, i, cfg, self.kernels, provider) for i in range(cfg.num_hidden_layers)]
        self.tok_embeddings = Linear(store.tensor("tok_embeddings"), self.kernels)  # [V, D]
        self.norm = _f32_vector(store, "norm")  # [D]
        self.output = Linear(
            store.tensor("tok_embeddings" if cfg.tie_word_embeddings else "output"), self.kernels
        )  # [V, D]
        self._experts = provider
        provider.attach(self)  # a caching provider takes the router weights to predict with

        self.kv = KVCache.for_config(cfg, self.ctx, kv_type)  # f16 or q8_0 (kv_cache.py)
        self.pos = 0  # tokens held in the cache
        self.tokens: list[int] = []  # the cached sequence
        self._states: dict[int, RunState] = {}  # by batch size T
        self._head_xn = np.zeros((1, cfg.hidden_size), np.float32)  # [1, D] the last token, normed
        self._head_logits = np.zeros((1, cfg.vocab_size), np.float32)  # [1, V] its logits

    @property
    def experts(self) -> ExpertProvider:
        """Where every MoE layer gets its experts; assigning one (a recorder wrapping the
        provider, say) rewires every layer."""
        return self._experts

    @experts.setter
    def experts(self, provider: ExpertProvider) -> None:
        self._experts = provider
        for block in self.layers:
            block.moe.experts = provider

    # ---- housekeeping -------------------------------------------------------------------------
    def set_threads(self, threads: int | None) -> None:
        import numba

        n = physical_cores() if not threads else int(threads)
        if n < 1:
            raise UsageError(f"--threads must be 0 (all physical cores) or more, got {threads}")
        self.threads = min(n, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(self.threads)

    def reset(self) -> None:
        """Forget the cached sequence (the cache memory is kept and overwritten)."""
        self.pos = 0
        self.tokens = []

    def truncate(self, n: int) -> None:
        """Keep only the first n cached tokens: later positions are simply overwritten."""
        self.pos = min(self.pos, max(0, n))
        self.tokens = self.tokens[: self.pos]

    def run_state(self, T: int) -> RunState:
        """The buffers for a forward pass of T tokens: the decode state and the latest other size
        are kept, so decoding and a repeated prefill size allocate nothing."""
        st = self._states.get(T)
        if st is None:
            st = RunState.allocate(self.config, T, self.ctx)
            self._states = {t: s for t, s in self._states.items() if t == 1}
            self._states[T] = st
        return st

    # ---- the network ------------------------------------------------------------------------
    def forward_blocks(self, tokens: Sequence[int], st: RunState, seqs: Sequence[SeqRows]) -> np.ndarray:
        """Embed tokens [T] (positions already in st.pos) and run every block; x [T, D]."""
        x = st.x
        for t, tok in enumerate(tokens):
            self.tok_embeddings.row(int(tok), x[t])
        for block in self.layers:
            block(x, st, seqs)
        self.experts.stats.tokens += len(tokens)
        return x

    def head(self, x: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
        """Final norm and output projection: x [N, D] -> logits [N, V]; one row goes through
        buffers kept for it (the result is then valid until the next one-row call)."""
        if x.shape[0] == 1:
            xn, logits = self._head_xn, (self._head_logits if logits is None else logits)
        else:
            xn = np.empty_like(x)
            logits = np.empty((x.shape[0], self.config.vocab_size), np.float32) if logits is None else logits
        self.kernels.rmsnorm(x, self.norm, self.config.rms_norm_eps, xn)
        return self.output.matmul(xn, logits)

    def _forward(self, tokens: np.ndarray, want_all: bool) -> np.ndarray:
        """Run tokens [T] at positions pos..pos+T-1, extend the cache; logits [T or 1, V]."""
        T, pos0 = len(tokens), self.pos
        st = self.run_state(T)
        st.pos[:] = np.arange(pos0, pos0 + T)
        x = self.forward_blocks(tokens, st, (SeqRows(0, T, pos0, self.kv),))
        logits = self.head(x if want_all else x[T - 1 :])
        self.pos += T
        return logits

    # ---- public ----------------------------------------------------------------------------
    def _check_room(self, n: int) -> None:
        if self.pos + n > self.ctx:
            raise UsageError(
                f"{self.pos + n} tokens do not fit the context of {self.ctx}",
                f"raise --ctx (the model allows up to {self.config.max_position_embeddings}) or shorten the input",
            )

    def _check_tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens, dtype=np.int64).reshape(-1)  # [T]
        if arr.size and (arr.min() < 0 or arr.max() >= self.config.vocab_size):
            raise UsageError(f"token id out of range 0..{self.config.vocab_size - 1}")
        return arr

    def prefill(self, tokens, want_all: bool = False) -> np.ndarray:
        """Append tokens to the cached sequence; the logits [V] after the last one
        (or [T, V] for every one with want_all)."""
        arr = self._check_tokens(tokens)
        if arr.size == 0:
            raise UsageError("nothing to process: the token list is empty")
        self._check_room(arr.size)
        outs = []
        for s in range(0, arr.size, self.batch):
            chunk = arr[s : s + self.batch]
            outs.append(self._run(chunk, want_all).copy() if want_all else self._run(chunk, False))
            self.tokens.extend(int(t) for t in chunk)
        return np.concatenate(outs, axis=0) if want_all else outs[-1][0].copy()  # decode reuses the row

    def decode(self, token: int) -> np.ndarray:
        """Append one token; its next-token logits [V] (a view, valid until the next call)."""
        if not 0 <= int(token) < self.config.vocab_size:
            raise UsageError(f"token id {token} out of range 0..{self.config.vocab_size - 1}")
        self._check_room(1)
        out = self._run(np.array([int(token)], np.int64), False)
        self.tokens.append(int(token))
        return out[0]

    def _run(self, tokens: np.ndarray, want_all: bool) -> np.ndarray:
        """``_forward``, with arithmetic that broke down (a kernel dividing by an overflowed norm:
        weights far outside any trained range, e.g. a damaged GGUF imported as it was) as one error."""
        try:
            return self._forward(tokens, want_all)
        except (ZeroDivisionError, FloatingPointError, OverflowError) as exc:
            raise ModelFormatError(
                f"{self.store.path}: the forward pass broke down ({type(exc).__name__}): the weights hold values "
                "far outside any trained model's range",
                "run `mixcli verify`, or convert the model again from an intact source",
            ) from None

    def logits(self, tokens) -> np.ndarray:
        """Next-token logits [T, V] float32 at every position of tokens, from an empty cache."""
        self.reset()
        return self.prefill(tokens, want_all=True)


def load(
    path: str | Path,
    ctx: int | None = None,
    threads: int | None = None,
    load: str = "auto",
    isa: str | None = None,
    act: str | None = None,
    verify: bool = True,
    **kw,
) -> Model:
    """Open a converted model directory and build the runtime model. ``load``: "memory" reads the
    weights into memory (faster decode), "mmap" maps them (instant start, less memory), "auto"
    reads when the model fits comfortably in available memory (``store.resolve_load_mode``).
    ``isa``, ``act``: the kernel tier and activation mode (see ``mixcli.kernels.select``).
    ``verify``: check the tensors' sha256 when the files changed since they last passed."""
    if "kernels" not in kw:
        kw["kernels"] = _kernel_module(isa, act)
    return Model(open_model_dir(path, load=load, verify=verify), ctx=ctx, threads=threads, **kw)

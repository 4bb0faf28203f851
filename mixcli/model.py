"""The forward pass: embeddings, attention over the KV cache, the MoE layer, the output head.

Kept apart as in llama2.c: the *weights* (``Linear`` views of the memory map, built once), the
*run state* (buffers preallocated for a one-token decode step, so decoding allocates nothing of
size D or larger), and the *KV cache*. A dense Llama/Mistral model runs through the same MoE code
with one expert of weight 1.

Prefill processes the prompt in batches of up to ``batch`` tokens: each matrix is read once per
batch (matrix-matrix kernels), and in the MoE layer the batch's tokens are grouped by routed expert
so every chosen expert's weights are read once per batch.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import ModelFormatError, UsageError
from .experts import MappedExperts
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


class Layer:
    """One transformer block's non-expert weights (the experts come from the provider)."""

    def __init__(self, store: ModelStore, i: int, kernels):
        p = f"layers.{i}."
        t = store.tensor
        self.attn_norm = np.ascontiguousarray(t(p + "attn_norm").dequantize(), dtype=np.float32)  # [D]
        self.ffn_norm = np.ascontiguousarray(t(p + "ffn_norm").dequantize(), dtype=np.float32)  # [D]
        self.wq = Linear(t(p + "attn.wq"), kernels)  # [H*HD, D]
        self.wk = Linear(t(p + "attn.wk"), kernels)  # [KVH*HD, D]
        self.wv = Linear(t(p + "attn.wv"), kernels)  # [KVH*HD, D]
        self.wo = Linear(t(p + "attn.wo"), kernels)  # [D, H*HD]
        gate = store.tensors.get(p + "moe.gate")
        self.gate = None if gate is None else np.ascontiguousarray(gate.dequantize(), dtype=np.float32)  # [E, D]


class Model:
    """A loaded model with its KV cache. ``logits(tokens)`` is the whole public surface tests use;
    ``prefill`` / ``decode`` extend the cached sequence for generation."""

    # text side, set by mixcli.load / runtime.attach_text (None for a model converted without one)
    tokenizer = None  # mixcli.tokenizer.Tokenizer
    chat_template: str | None = None  # Jinja text
    add_bos = False  # a raw prompt starts with BOS
    path: Path | None = None

    def __init__(self, store: ModelStore, ctx: int | None = None, threads: int | None = None,
                 batch: int = DEFAULT_BATCH, experts=None, kernels=None, kv_type: str | None = None):
        cfg = store.config
        self.store = store
        self.config: ModelConfig = cfg
        self.kernels = k = kernels if kernels is not None else _kernel_module()  # a kernels.KernelTable
        max_ctx = cfg.max_position_embeddings
        ctx = DEFAULT_CTX if ctx is None else int(ctx)
        if ctx <= 0:
            raise UsageError(f"--ctx must be positive, got {ctx}")
        self.ctx = min(ctx, max_ctx)  # S
        self.batch = max(1, int(batch))
        self.set_threads(threads)

        self.layers = [Layer(store, i, k) for i in range(cfg.num_hidden_layers)]
        self.tok_embeddings = Linear(store.tensor("tok_embeddings"), k)  # [V, D]
        self.norm = np.ascontiguousarray(store.tensor("norm").dequantize(), dtype=np.float32)  # [D]
        self.output = Linear(store.tensor("tok_embeddings" if cfg.tie_word_embeddings else "output"), k)  # [V, D]
        self.experts = experts if experts is not None else MappedExperts(store, k)
        attach = getattr(self.experts, "attach", None)
        if attach is not None:  # a caching provider wants the router weights to predict with
            attach(self)

        D, H, KVH, HD = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        L, S = cfg.num_hidden_layers, self.ctx
        self.kv = KVCache(L, KVH, HD, S, kv_type)  # f16 or q8_0 (kv_cache.py)
        self.pos = 0  # tokens held in the cache
        self.tokens: list[int] = []  # the cached sequence
        # inv_freq [HD/2] f32, computed as transformers does (float32 powers of theta)
        self.inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, HD, 2, dtype=np.float32) / np.float32(HD)))).astype(np.float32)
        self.scale = np.float32(1.0 / np.sqrt(HD))
        self._state: dict[int, dict[str, np.ndarray]] = {}  # run-state buffers by batch size T

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

    def _buffers(self, T: int) -> dict[str, np.ndarray]:
        st = self._state.get(T)
        if st is not None:
            return st
        cfg = self.config
        D, H, KVH, HD, F = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
        E, K = cfg.num_local_experts, cfg.num_experts_per_tok
        f32 = np.float32
        st = {
            "x": np.zeros((T, D), f32),  # [T, D] residual stream
            "xb": np.zeros((T, D), f32),  # [T, D] normed input
            "q": np.zeros((T, H * HD), f32),  # [T, H*HD]
            "k": np.zeros((T, KVH * HD), f32),  # [T, KVH*HD]
            "v": np.zeros((T, KVH * HD), f32),  # [T, KVH*HD]
            "att": np.zeros((T, H * HD), f32),  # [T, H*HD] attention output
            "att_scratch": np.zeros((T * H, self.ctx), f32) if T == 1 else None,  # scores, see _attention
            "xo": np.zeros((T, D), f32),  # [T, D] projection output
            "moe": np.zeros((T, D), f32),  # [T, D] MoE output
            "router": np.zeros((T, E), f32),  # [T, E]
            "rw": np.zeros((T, K), f32),  # [T, K] routing weights
            "ri": np.zeros((T, K), np.int32),  # [T, K] routed experts
            "h1": np.zeros((T, F), f32),  # [T, F]
            "h3": np.zeros((T, F), f32),  # [T, F]
            "y": np.zeros((T, D), f32),  # [T, D] one expert's output
            "pos": np.zeros(T, np.int64),  # [T]
        }
        if T == 1:  # keep only the decode state and the latest prefill size
            self._state = {1: st, **{t: s for t, s in self._state.items() if t == 1}}
        else:
            self._state = {t: s for t, s in self._state.items() if t == 1}
            self._state[T] = st
        return st

    # ---- the network ------------------------------------------------------------------------
    def _forward(self, tokens: np.ndarray, want_all: bool) -> np.ndarray:
        """Run tokens [T] at positions pos..pos+T-1, extend the cache; logits [T or 1, V]."""
        cfg, k = self.config, self.kernels
        T = len(tokens)
        D, H, KVH, HD = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        st = self._buffers(T)
        x, xb = st["x"], st["xb"]
        pos0 = self.pos
        st["pos"][:] = np.arange(pos0, pos0 + T)
        for t, tok in enumerate(tokens):
            self.tok_embeddings.row(int(tok), x[t])

        for li, layer in enumerate(self.layers):
            # attention
            k.rmsnorm(x, layer.attn_norm, cfg.rms_norm_eps, xb)
            q = layer.wq.matmul(xb, st["q"])
            kk = layer.wk.matmul(xb, st["k"])
            vv = layer.wv.matmul(xb, st["v"])
            q3 = q.reshape(T, H, HD)  # [T, H, HD]
            k3 = kk.reshape(T, KVH, HD)  # [T, KVH, HD]
            k.rope_inplace(q3, st["pos"], self.inv_freq)
            k.rope_inplace(k3, st["pos"], self.inv_freq)
            self.kv.store(li, pos0, k3, vv.reshape(T, KVH, HD))
            att = st["att"].reshape(T, H, HD)
            self._attention(li, q3, pos0, att, st)
            layer.wo.matmul(st["att"], st["xo"])
            x += st["xo"]
            # mixture of experts (a dense model: one expert, weight 1)
            k.rmsnorm(x, layer.ffn_norm, cfg.rms_norm_eps, xb)
            self._moe(li, layer, xb, st)
            x += st["moe"]

        if want_all:
            xs = x
        else:
            xs = x[T - 1 : T]
        xn = np.empty_like(xs)
        k.rmsnorm(xs, self.norm, cfg.rms_norm_eps, xn)
        logits = np.empty((xs.shape[0], cfg.vocab_size), np.float32)  # [T or 1, V]
        self.output.matmul(xn, logits)
        self.pos += T
        self.experts.stats.tokens += T
        return logits

    def _attention(self, li, q3, pos0, att, st) -> None:
        # decode scores go to the [H, S] buffer; prefill runs the tiled kernels, which need none
        self.kv.attend(self.kernels, li, q3, pos0, self.scale, att, st["att_scratch"])

    def _moe(self, li: int, layer: Layer, xb: np.ndarray, st) -> None:
        cfg, k = self.config, self.kernels
        T = xb.shape[0]
        out = st["moe"]
        out[:] = 0.0
        if layer.gate is None:  # dense: the single expert takes every token with weight 1
            w = self.experts.get(li, 0, T)
            self._expert_ffn(w, xb, st["h1"], st["h3"], out)
            return
        if T > 1:
            k.matmul_f32(layer.gate, xb, st["router"])  # [T, E]
        else:
            k.matvec_f32(layer.gate, xb[0], st["router"][0])
        before = getattr(self.experts, "before_moe", None)
        if before is not None:  # e.g. start prefetching layer li+1's predicted experts
            before(li, xb, st["router"])
        k.route_topk(st["router"], cfg.num_experts_per_tok, st["rw"], st["ri"])
        ri, rw = st["ri"], st["rw"]  # [T, K]
        if T == 1:
            for j in range(cfg.num_experts_per_tok):
                w = self.experts.get(li, int(ri[0, j]), 1)
                y = st["y"]
                self._expert_ffn(w, xb, st["h1"], st["h3"], y)
                k.add_scaled(out[0], y[0], np.float32(rw[0, j]))
            return
        # prefill: group the batch's tokens by expert so each expert is read once per batch
        flat_e = ri.ravel()  # [T*K]
        order = np.argsort(flat_e, kind="stable")
        experts, starts = np.unique(flat_e[order], return_index=True)
        ends = list(starts[1:]) + [len(order)]
        for e, s0, s1 in zip(experts, starts, ends):
            sel = order[s0:s1]
            toks = sel // cfg.num_experts_per_tok  # [Te] token rows routed to e
            wts = rw.ravel()[sel]  # [Te]
            Te = len(toks)
            w = self.experts.get(li, int(e), Te)
            xe = np.ascontiguousarray(xb[toks])  # [Te, D]
            h1 = st["h1"][:Te]
            h3 = st["h3"][:Te]
            ye = st["y"][:Te]
            self._expert_ffn(w, xe, h1, h3, ye)
            out[toks] += ye * wts[:, None]  # a token routes to an expert at most once: no duplicate rows

    def _expert_ffn(self, w, x: np.ndarray, h1: np.ndarray, h3: np.ndarray, y: np.ndarray) -> None:
        """y [T, D] = w2( silu(w1 x) * (w3 x) ) for x [T, D] (SwiGLU)."""
        w.w1.matmul(x, h1)
        w.w3.matmul(x, h3)
        self.kernels.silu_mul(h1, h3, h1)
        w.w2.matmul(h1, y)

    # ---- public ----------------------------------------------------------------------------
    def _check_room(self, n: int) -> None:
        if self.pos + n > self.ctx:
            raise UsageError(
                f"{self.pos + n} tokens do not fit the context of {self.ctx}",
                "raise --ctx (the model allows up to "
                f"{self.config.max_position_embeddings}) or shorten the input",
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
        return np.concatenate(outs, axis=0) if want_all else outs[-1][0]

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
                "far outside any trained model's range", "run `mixcli verify`, or convert the model again from an intact source",
            ) from None

    def logits(self, tokens) -> np.ndarray:
        """Next-token logits [T, V] float32 at every position of tokens, from an empty cache."""
        self.reset()
        return self.prefill(tokens, want_all=True)


def load(path: str | Path, ctx: int | None = None, threads: int | None = None, load: str = "auto",
         isa: str | None = None, act: str | None = None, verify: bool = True, **kw) -> Model:
    """Open a converted model directory and build the runtime model. ``load``: "memory" reads the
    weights into memory (faster decode), "mmap" maps them (instant start, less memory), "auto"
    reads when the model fits comfortably in available memory (``store.resolve_load_mode``).
    ``isa``, ``act``: the kernel tier and activation mode (see ``mixcli.kernels.select``).
    ``verify``: check the tensors' sha256 when the files changed since they last passed."""
    if "kernels" not in kw:
        kw["kernels"] = _kernel_module(isa, act)
    return Model(open_model_dir(path, load=load, verify=verify), ctx=ctx, threads=threads, **kw)

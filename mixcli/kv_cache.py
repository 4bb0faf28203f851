"""The KV cache: every layer's keys and values for S positions, in fp16 or llama.cpp's q8_0 blocks.

Why q8_0: Mixtral's cache costs 128 KiB per position in fp16 (32 layers x 8 kv heads x 128 dims x
2 bytes, K and V), 4 GiB at 32k tokens. q8_0 (``--kv-type q8_0``, llama.cpp's ``-ctk q8_0 -ctv
q8_0``) stores each block of 32 values of a head's row as 32 int8 and one fp16 scale (34 bytes),
53% of fp16. A row is rounded once, when it is stored (the scale is the block's largest magnitude
/ 127, ``quant.q4``'s rule, bit-exact with gguf's reference), and read by attention kernels that
take the blocks as they are (``kernels.attn``).

``attend`` picks the kernel: one query token (decode) runs ``attention`` / ``attention_q8_0`` with
the caller's score buffer [H, >= n]; several (prefill) run the tiled kernels, which need no score
buffer that grows with the window (an fp16 chunk whose buffer would be at most SCORE_BUFFER_MAX
runs the decode kernel over one, which is faster there). Positions past those written are never read, so ``np.zeros``
costs memory only as far as the cache is filled.
"""

from __future__ import annotations

import numpy as np

from quant import q4
from quant.formats import QK

from .errors import UsageError

KV_TYPES = ("f16", "q8_0")
DEFAULT_KV_TYPE = "f16"  # llama.cpp's default
# fp16 prefill runs the decode kernel with a [T*H, n] score buffer up to this size (its attention
# took half the tiled kernel's time at 512 positions, benchmarks/long_prefill.py), tiled beyond
SCORE_BUFFER_MAX = 64 << 20


def check_kv_type(kv_type: str | None) -> str:
    kv_type = DEFAULT_KV_TYPE if kv_type is None else kv_type
    if kv_type not in KV_TYPES:
        raise UsageError(f"--kv-type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
    return kv_type


def row_bytes(head_dim: int, kv_type: str) -> int:
    """Bytes of one head's K (or V) row at one position."""
    return head_dim * 2 if kv_type == "f16" else head_dim + head_dim // QK * 2


def kv_cache_bytes(cfg, ctx: int, kv_type: str = DEFAULT_KV_TYPE) -> int:
    """Bytes of a full cache of ``ctx`` positions for ModelConfig ``cfg`` (K and V)."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * ctx * row_bytes(cfg.head_dim, kv_type)


class KVCache:
    """K and V of L layers x KVH heads x S positions x HD dims, stored as ``kv_type``."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, ctx: int, kv_type: str = DEFAULT_KV_TYPE):
        self.kv_type = kv_type = check_kv_type(kv_type)
        L, KVH, S, HD = n_layers, n_kv_heads, ctx, head_dim
        self.ctx = S
        if kv_type == "f16":
            self.k = np.zeros((L, KVH, S, HD), np.float16)  # [L, KVH, S, HD]
            self.v = np.zeros((L, KVH, S, HD), np.float16)  # [L, KVH, S, HD]
        else:
            if HD % QK:
                raise UsageError(
                    f"--kv-type q8_0 needs a head dim that is a multiple of {QK}, this model's is {HD}",
                    "use --kv-type f16",
                )
            self.k = np.zeros((L, KVH, S, HD), np.int8)  # [L, KVH, S, HD] q8_0 values
            self.v = np.zeros((L, KVH, S, HD), np.int8)
            self.k_d = np.zeros((L, KVH, S, HD // QK), np.float16)  # [L, KVH, S, HD/32] block scales
            self.v_d = np.zeros((L, KVH, S, HD // QK), np.float16)

    @classmethod
    def for_config(cls, cfg, ctx: int, kv_type: str = DEFAULT_KV_TYPE) -> KVCache:
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, ctx, kv_type)

    @property
    def nbytes(self) -> int:
        n = self.k.nbytes + self.v.nbytes
        return n + (self.k_d.nbytes + self.v_d.nbytes if self.kv_type == "q8_0" else 0)

    def store(self, layer: int, pos0: int, k3: np.ndarray, v3: np.ndarray) -> None:
        """Write positions pos0..pos0+T-1 of ``layer`` from k3, v3 [T, KVH, HD] f32."""
        T, KVH, HD = k3.shape
        sl = slice(pos0, pos0 + T)
        if self.kv_type == "f16":
            self.k[layer, :, sl, :] = k3.transpose(1, 0, 2)
            self.v[layer, :, sl, :] = v3.transpose(1, 0, 2)
            return
        for x, qs, d in ((k3, self.k, self.k_d), (v3, self.v, self.v_d)):
            parts = q4.quantize(x.reshape(T * KVH, HD), "q8_0")  # qs [T*KVH, HD] i1, d [T*KVH, HD/32] f2
            qs[layer, :, sl, :] = parts["qs"].reshape(T, KVH, HD).transpose(1, 0, 2)
            d[layer, :, sl, :] = parts["d"].reshape(T, KVH, HD // QK).transpose(1, 0, 2)

    def attend(
        self, kernels, layer: int, q3: np.ndarray, pos0: int, scale, out: np.ndarray, scratch: np.ndarray | None
    ) -> None:
        """out [T, H, HD] = causal attention of q3 [T, H, HD] (query t at pos0+t) over positions
        0..pos0+T-1 of ``layer``; ``scratch`` [H, >= pos0+1] f32 holds decode scores (T == 1)."""
        T = q3.shape[0]
        if self.kv_type == "f16":
            kc, vc = self.k[layer], self.v[layer]  # [KVH, S, HD]
            H, n = q3.shape[1], pos0 + T
            if T == 1:
                kernels.attention(q3, kc, vc, pos0, scale, out, scratch)
            elif T * H * n * 4 <= SCORE_BUFFER_MAX:  # a score row per (token, head): faster while small
                kernels.attention(q3, kc, vc, pos0, scale, out, np.empty((T * H, n), np.float32))
            else:
                kernels.attention_prefill(q3, kc, vc, pos0, scale, out)
            return
        args = (self.k[layer], self.k_d[layer], self.v[layer], self.v_d[layer])
        if T == 1:
            kernels.attention_q8_0(q3, *args, pos0, scale, out, scratch)
        else:
            kernels.attention_prefill_q8_0(q3, *args, pos0, scale, out)

"""Tiny Hugging Face checkpoints built inside the tests ("baby Mixtral", "baby Llama").

They have the real layout (config.json, safetensors shards, model.safetensors.index.json, the
legacy per-expert Mixtral names), so the converter reads them exactly as it reads a downloaded
model, and transformers' ``MixtralForCausalLM.from_pretrained(dir)`` loads them as the reference
for parity tests. Dependencies: numpy and safetensors only.

bf16 files are written by hand (8-byte header length, JSON header, data) because numpy has no
bf16 dtype and the safetensors numpy API cannot save one; f32/f16 go through the library.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

_COMMON = {
    "hidden_size": 64,  # D
    "intermediate_size": 96,  # F
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # H
    "num_key_value_heads": 2,  # KVH
    "head_dim": 16,  # HD
    "vocab_size": 100,  # V
    "rope_theta": 1e6,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "use_cache": True,
}
BABY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {
        **_COMMON,
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": 4,  # E
        "num_experts_per_tok": 2,  # K
        "router_aux_loss_coef": 0.02,
        "output_router_logits": False,
        "sliding_window": None,
    },
    "mistral": {**_COMMON, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None},
    "llama": {
        **_COMMON,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
    },
}
_TORCH_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
_TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounding to nearest even as torch does."""
    u = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def save_bf16_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write uint16 bf16 bit arrays as a safetensors file with dtype BF16."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, a in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the library writes it
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for a in tensors.values():
            fh.write(np.ascontiguousarray(a, dtype="<u2").tobytes())


def hf_tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes ([out, in]) a config implies, in checkpoint order."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    moe = cfg["architectures"][0] == "MixtralForCausalLM"
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (q, d)
        shapes[p + "self_attn.k_proj.weight"] = (kv, d)
        shapes[p + "self_attn.v_proj.weight"] = (kv, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, q)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        if moe:
            shapes[p + "block_sparse_moe.gate.weight"] = (cfg["num_local_experts"], d)
            for e in range(cfg["num_local_experts"]):
                x = f"{p}block_sparse_moe.experts.{e}."
                shapes[x + "w1.weight"] = (f, d)
                shapes[x + "w2.weight"] = (d, f)
                shapes[x + "w3.weight"] = (f, d)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (f, d)
            shapes[p + "mlp.up_proj.weight"] = (f, d)
            shapes[p + "mlp.down_proj.weight"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, d)
    return shapes


def random_weights(cfg: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights with sensible scales: linears std 0.5/sqrt(fan_in), norms 1 +- 0.1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in hf_tensor_shapes(cfg).items():
        if len(shape) == 1:
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif name == "model.embed_tokens.weight":
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.5 / np.sqrt(shape[1]) * rng.standard_normal(shape)).astype(np.float32)
    return out


def make_hf_checkpoint(
    path: str | Path,
    kind: str = "mixtral",
    *,
    tied: bool = False,
    shards: int = 1,
    dtype: str = "f32",
    seed: int = 0,
    index: bool = True,
    tokenizer_dir: str | Path | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight checkpoint directory of ``kind`` ("mixtral", "llama", "mistral").

    ``shards`` files named like HF's (``model-00001-of-00002.safetensors``); with one shard and
    ``index=False`` a lone ``model.safetensors`` and no index. ``dtype`` is the stored dtype
    ("f32", "f16", "bf16"). ``tokenizer_dir`` copies tokenizer files found there."""
    if dtype not in _TORCH_DTYPE:
        raise ValueError(f"dtype {dtype!r} not in {sorted(_TORCH_DTYPE)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {**BABY_DEFAULTS[kind], "tie_word_embeddings": tied, "torch_dtype": _TORCH_DTYPE[dtype], **config_overrides}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = random_weights(cfg, seed)
    names = list(weights)
    sizes = np.cumsum([weights[n].size for n in names])
    group = np.minimum((sizes - 1) * shards // sizes[-1], shards - 1)  # contiguous, ~equal bytes
    if shards == 1 and not index:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map, total = {}, 0
    for i, fname in enumerate(files):
        part = {n: weights[n] for n, g in zip(names, group) if g == i}
        if dtype == "bf16":
            stored = {n: bf16_bits(w) for n, w in part.items()}
            save_bf16_safetensors(path / fname, stored)
        else:
            stored = {n: w.astype(np.float16 if dtype == "f16" else np.float32) for n, w in part.items()}
            save_file(stored, str(path / fname), metadata={"format": "pt"})
        for n, a in stored.items():
            weight_map[n] = fname
            total += a.nbytes
    if shards > 1 or index:
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, path / name)
    return path

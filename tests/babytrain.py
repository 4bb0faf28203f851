"""Briefly trained baby checkpoints, for tests that need a model that behaves like a real one.

Random-weight babies predict almost uniformly: their top two logits are often closer than 4-bit
rounding moves them, so greedy agreement under quantization would measure ties, not the runtime.
A few hundred AdamW steps on tests/data/tok_corpus.txt (bytes modulo the vocabulary) give
peaked, text-like next-token distributions, as a trained model has. Needs torch + transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CORPUS = Path(__file__).parent / "data" / "tok_corpus.txt"


def corpus_tokens(vocab: int) -> np.ndarray:
    """The training text as token ids: its UTF-8 bytes modulo the vocabulary size. [N] int64"""
    return np.frombuffer(CORPUS.read_bytes(), np.uint8).astype(np.int64) % vocab


def _hub_names(state: dict, cfg: dict) -> dict[str, np.ndarray]:
    """transformers' in-memory names -> the Hugging Face hub layout mixcli converts (Mixtral
    experts split back into per-expert w1/w3/w2; transformers 5 keeps them fused)."""
    out = {}
    for name, t in state.items():
        a = t.detach().float().numpy()
        if name.endswith("mlp.gate.weight") and "experts" not in name and cfg.get("num_local_experts"):
            out[name.replace("mlp.gate.", "block_sparse_moe.gate.")] = a
        elif name.endswith("mlp.experts.gate_up_proj"):  # [E, 2F, D]: gate (w1) rows, then up (w3)
            p = name[: -len("mlp.experts.gate_up_proj")]
            f = a.shape[1] // 2
            for e in range(a.shape[0]):
                out[f"{p}block_sparse_moe.experts.{e}.w1.weight"] = a[e, :f]
                out[f"{p}block_sparse_moe.experts.{e}.w3.weight"] = a[e, f:]
        elif name.endswith("mlp.experts.down_proj"):  # [E, D, F]
            p = name[: -len("mlp.experts.down_proj")]
            for e in range(a.shape[0]):
                out[f"{p}block_sparse_moe.experts.{e}.w2.weight"] = a[e]
        elif name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        else:
            out[name] = a
    return out


def train_checkpoint(
    path: str | Path, steps: int = 300, lr: float = 1e-2, seed: int = 0, text_tokens: int | None = None
) -> Path:
    """Train the checkpoint in ``path`` (written by babymodels.make_hf_checkpoint) in place."""
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    data = torch.from_numpy(corpus_tokens(cfg["vocab_size"])[:text_tokens])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (16,), generator=g)
        batch = torch.stack([data[s : s + 64] for s in starts])  # [B, 64]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = _hub_names(model.state_dict(), cfg)
    dtype = {"float16": np.float16, "float32": np.float32}[cfg.get("torch_dtype", "float32")]
    for old in list(path.glob("*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    save_file(
        {n: np.ascontiguousarray(a, dtype=dtype) for n, a in weights.items()},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return path

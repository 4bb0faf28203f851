"""Random-weight models of real Mixtral width, written straight into the converted format.

Speed does not depend on weight values, so instead of generating a 6 GB bf16 checkpoint and
converting it, this writes random q4_0 blocks (random nibbles, small fp16 scales) through the
converter's own writer. Shared by the benchmark scripts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant import formats
from quant.config import ModelConfig
from quant.writer import ModelWriter

MIXTRAL_WIDTH = dict(
    architecture="MixtralForCausalLM",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=2,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=32000,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    max_position_embeddings=32768,
    num_local_experts=8,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def _random_parts(rng, qtype: str, n: int, k: int, scale: float) -> dict[str, np.ndarray]:
    shapes = formats.QUANT_TYPES[qtype].part_shapes(n, k)
    parts = {}
    for name, (shape, dt) in shapes.items():
        if name in ("qs", "s"):  # nibbles / int8 weights, q4_k's byte codes
            parts[name] = rng.integers(0, 256, size=shape, dtype=np.uint8).view(np.dtype(dt))
        elif name in ("d", "m"):
            parts[name] = (rng.random(shape, dtype=np.float32) * scale).astype(dt) * (-1 if name == "m" else 1)
        else:  # float types: small random values
            parts[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dt)
    return parts


def write_random_model(out: Path, quant: str = "q4_0", seed: int = 0, gate_bias=None, **overrides) -> Path:
    """Write a random model; ``gate_bias`` [L, E] (optional) skews routing toward some experts by
    adding a constant direction to the router rows (used by the expert-cache benchmark)."""
    cfg = ModelConfig(**{**MIXTRAL_WIDTH, **overrides})
    preset = formats.QUANT_PRESETS[quant]
    rng = np.random.default_rng(seed)
    D, F, H, KVH, HD, V, E = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.vocab_size,
        cfg.num_local_experts,
    )
    w = ModelWriter(out)
    shapes = {"attn.wq": (H * HD, D), "attn.wk": (KVH * HD, D), "attn.wv": (KVH * HD, D), "attn.wo": (D, H * HD)}
    for name in formats.tensor_names(cfg.num_hidden_layers, E, cfg.moe, cfg.tie_word_embeddings):
        role = formats.role_of(name)
        qtype = preset[role]
        if role == "norm":
            w.add_tensor_parts(name, "f32", (D,), {"w": np.ones(D, "<f4")})
            continue
        if role == "router":
            g = rng.standard_normal((E, D)).astype(np.float32) * 0.05
            if gate_bias is not None:
                layer = int(name.split(".")[1])
                g += np.asarray(gate_bias, np.float32)[layer][:, None] / np.sqrt(D)
            w.add_tensor_parts(name, "f32", (E, D), {"w": g.astype("<f4")})
            continue
        if name in ("tok_embeddings", "output"):
            shape = (V, D)
        elif ".experts." in name:
            shape = (F, D) if name.endswith(("w1", "w3")) else (D, F)
        else:
            shape = shapes[name.split(".", 2)[2]]
        if name.endswith(".w1"):
            layer, e = int(name.split(".")[1]), int(name.split(".")[3])
            w.begin_expert(layer, e)
        w.add_tensor_parts(name, qtype, shape, _random_parts(rng, qtype, *shape, scale=0.002))
        if name.endswith(".w2"):
            w.end_expert()
    w.finish(
        config=cfg,
        quant={"preset": quant, "types": preset, "group": formats.QK},
        tokenizer=None,
        source={"kind": "synthetic", "seed": seed},
    )
    return out


def _random_q4_0_bytes(rng, shape: tuple[int, ...], scale: float = 0.002) -> np.ndarray:
    """GGUF Q4_0 data for a float tensor of ``shape`` (last axis K): uint8 [..., K/32*18].

    Nibbles are drawn from 1..15 (weights -7..7 x d, mean 0). Uniform bytes would give every
    weight a mean of -0.5 d with d > 0: each product then adds the same direction to every token's
    hidden state, and the random router sends every token to the same two experts."""
    *lead, k = shape
    nb = k // 32
    blocks = rng.integers(1, 16, size=(*lead, nb, 18), dtype=np.uint8)
    blocks |= rng.integers(1, 16, size=(*lead, nb, 18), dtype=np.uint8) << 4
    d = (rng.random((*lead, nb), dtype=np.float32) * scale + scale / 4).astype("<f2")
    blocks[..., :2] = d[..., None].view(np.uint8).reshape(*lead, nb, 2)
    return blocks.reshape(*lead, nb * 18)


def write_random_gguf(path: Path, layers: int = 2, seed: int = 0, vocab: int = 32000) -> Path:
    """A Q4_0 GGUF of a random model at real Mixtral width, as llama.cpp lays one out (stacked
    experts, llama architecture with expert_count), with a dummy SentencePiece vocabulary so that
    llama.cpp loads it. Norms and router stay f32, token_embd and output Q4_0 like llama.cpp's
    pure Q4_0 files; the blocks are random bytes (speed does not depend on values). Written tensor
    by tensor: ``layers=32`` is the full-size model (26 GB) in the memory of one tensor."""
    import gguf
    from gguf import GGMLQuantizationType as T

    c = {**MIXTRAL_WIDTH, "num_hidden_layers": layers, "vocab_size": vocab}
    D, F, H, KVH, HD, E = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
        c["head_dim"],
        c["num_local_experts"],
    )
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("mixtral-width-random")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(D)
    w.add_block_count(layers)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KVH)
    w.add_rope_dimension_count(HD)
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_expert_count(E)
    w.add_expert_used_count(c["num_experts_per_tok"])
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    toks += [f"\u2581t{i}" for i in range(vocab - len(toks))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([-float(i) for i in range(vocab)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    from mixcli.chat_template import FALLBACK_TEMPLATES

    w.add_chat_template(FALLBACK_TEMPLATES["mistral"])  # as Mixtral-Instruct's GGUFs carry one: `mixcli chat` runs

    # (name, shape, maker): the header lists every tensor first, then each one's data is made and
    # written in turn, so memory holds one tensor at a time (a full-size model's is 26 GB)
    specs = []

    def q4(name, shape, scale=0.002):
        specs.append((name, shape, lambda: _random_q4_0_bytes(rng, shape, scale)))

    def f32(name, make):
        specs.append((name, None, make))

    # embeddings 50x the other weights: at 0.002 every token's row (rms ~0.006) is drowned by the
    # attention output (rms ~0.1, nearly the same for every token), and the random router sends
    # consecutive tokens to the same two experts; at 0.1 they overlap about as chance gives
    q4("token_embd.weight", (vocab, D), 0.1)
    for i in range(layers):
        p = f"blk.{i}."
        f32(p + "attn_norm.weight", lambda: np.ones(D, np.float32))
        f32(p + "ffn_norm.weight", lambda: np.ones(D, np.float32))
        q4(p + "attn_q.weight", (H * HD, D))
        q4(p + "attn_k.weight", (KVH * HD, D))
        q4(p + "attn_v.weight", (KVH * HD, D))
        q4(p + "attn_output.weight", (D, H * HD))
        f32(p + "ffn_gate_inp.weight", lambda: (rng.standard_normal((E, D)) * 0.05).astype(np.float32))
        q4(p + "ffn_gate_exps.weight", (E, F, D))
        q4(p + "ffn_up_exps.weight", (E, F, D))
        q4(p + "ffn_down_exps.weight", (E, D, F))
    f32("output_norm.weight", lambda: np.ones(D, np.float32))
    q4("output.weight", (vocab, D))
    f32_shapes = {"attn_norm": (D,), "ffn_norm": (D,), "ffn_gate_inp": (E, D), "output_norm": (D,)}
    for name, shape, _ in specs:
        if shape is None:  # f32: norms and router
            fshape = f32_shapes[name.split(".")[-2]]
            w.add_tensor_info(name, fshape, np.dtype(np.float32), 4 * int(np.prod(fshape)))
        else:
            *lead, k = shape
            w.add_tensor_info(
                name, (*lead, k // 32 * 18), np.dtype(np.uint8), int(np.prod(lead)) * (k // 32) * 18, raw_dtype=T.Q4_0
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _name, _, make in specs:
        w.write_tensor_data(make())
    w.close()
    return path


def drop_page_cache(files) -> None:
    """Flush and drop the files' pages from the page cache, so the next read comes from disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

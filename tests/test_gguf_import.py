"""GGUF import: baby Llama / Mixtral GGUFs written here with gguf.GGUFWriter, as llama.cpp writes them.

References we did not write: ``gguf.quants`` (llama.cpp's block quantizers), transformers' GGUF
loader (its q/k reverse permutation and its tokenizer built from GGUF metadata).

``write_gguf`` / ``make_gguf_checkpoint`` are for other tests too: ``make_gguf_checkpoint(path,
"mixtral", seed=s)`` holds the same float weights as ``babymodels.make_hf_checkpoint(dir,
"mixtral", seed=s)``, so a GGUF import and a safetensors conversion of one model can be compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from babymodels import BABY_DEFAULTS, random_weights
from mixcli.errors import CheckpointError
from quant import q4
from quant.formats import role_of, row_tiled
from quant.gguf_convert import convert_gguf
from quant.sources.gguf import open_gguf
from quant.writer import read_tensor_parts, verify_model_dir

Q = gguf.GGMLQuantizationType

# ---------------------------------------------------------------------------------------------
# Writing GGUFs the way llama.cpp's convert_hf_to_gguf.py does
# ---------------------------------------------------------------------------------------------
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = "the cat sat on the mat. the dog ate the hat, then the cat ran! Is that the rat? The end."


def _tiled(qtype: str, w: np.ndarray) -> str:
    """The storage type a matrix of block type ``qtype`` gets: row-tiled when its rows allow."""
    return row_tiled(qtype, w.shape[0]) if w.ndim == 2 else qtype


def byte_level_vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    """A tiny GPT-2 style vocabulary (tokens, token types, merges) learned by BPE on CORPUS:
    3 control tokens, the characters of the corpus in GPT-2's byte spelling, then merges."""
    spell = {" ": "Ġ", "\n": "Ċ"}
    words = [["Ġ" if c == " " else c for c in w] for w in (CORPUS.replace(" ", "\n ").split("\n"))]
    chars = sorted({spell.get(c, c) for c in CORPUS + "\n"} | set("abcdefghijklmnopqrstuvwxyzTI"))
    tokens = SPECIALS + chars
    merges: list[str] = []
    while len(tokens) < size:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:  # the corpus is fully merged: pad with more single characters
            tokens += [c for c in "0123456789ABCDEFGHJKLMNOPQRSUVWXYZ" if c not in tokens][: size - len(tokens)]
            break
        (a, b), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        if a + b not in tokens:
            tokens.append(a + b)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i : i + 2] = [a + b]
                i += 1
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, merges


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _min_max_k_codes(x: np.ndarray, qmax: int) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K's two-level codes for sub-blocks x [R, NS, 8, 32] by a plain min/max rule:
    (d, dmin [R, NS] fp16, sc, mn [R, NS, 8] 6-bit codes, q [R, NS, 8, 32] in 0..qmax)."""
    x = x.astype(np.float32)
    lo = np.minimum(x.min(-1), 0)
    d_sub, m_sub = (x.max(-1) - lo) / qmax, -lo  # [R, NS, 8]
    d, dmin = (d_sub.max(-1) / 63).astype(np.float16), (m_sub.max(-1) / 63).astype(np.float16)  # [R, NS]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[..., None] > 0, np.clip(np.rint(d_sub / d[..., None]), 0, 63), 0).astype(np.uint8)
        mn = np.where(dmin[..., None] > 0, np.clip(np.rint(m_sub / dmin[..., None]), 0, 63), 0).astype(np.uint8)
        dq = (d[..., None].astype(np.float32) * sc)[..., None]
        mq = (dmin[..., None].astype(np.float32) * mn)[..., None]
        q = np.where(dq > 0, np.clip(np.rint((x + mq) / dq), 0, qmax), 0).astype(np.uint8)  # [R, NS, 8, 32]
    return d, dmin, sc, mn, q


def q4_k_gguf_bytes(w: np.ndarray) -> np.ndarray:
    """GGUF Q4_K blocks of W [..., K] (K a multiple of 256) -> [..., K/256 * 144] uint8, laid out
    as llama.cpp's quantize_row_q4_K_ref lays them (the gguf package cannot quantize Q4_K): per
    256 weights fp16 d and dmin, 12 bytes of 6-bit sub-block scale and min codes, then per 64
    weights 32 bytes, weight l in the low nibble of byte l and weight 32+l in its high nibble.
    A plain min/max rule (llama.cpp searches its scales; the layout is what matters here)."""
    lead, k = w.shape[:-1], w.shape[-1]
    d, dmin, sc, mn, q = _min_max_k_codes(w.reshape(-1, k // 256, 8, 32), 15)
    scales = _pack_k_scales(sc, mn)  # [R, NS, 12]
    nib = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).reshape(*q.shape[:2], 128)  # [R, NS, 128]
    head = np.stack([d, dmin], axis=-1).view(np.uint8).reshape(*d.shape, 4)
    return np.concatenate([head, scales, nib], axis=-1).reshape(*lead, k // 256 * 144)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """6-bit codes sc, mn [..., 8] -> Q4_K / Q5_K's 12 packed bytes (llama.cpp's layout)."""
    return np.concatenate(
        [
            sc[..., :4] | ((sc[..., 4:] >> 4) << 6),
            mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4),
        ],
        axis=-1,
    )


def q5_k_gguf_bytes(w: np.ndarray) -> np.ndarray:
    """GGUF Q5_K blocks of W [..., K] (K a multiple of 256) -> [..., K/256 * 176] uint8, laid out
    as ggml's block_q5_K: fp16 d, dmin, 12 bytes of 6-bit codes (as Q4_K), 32 bytes qh (bit j of
    byte l: the 5th bit of weight 32j + l), 128 bytes of nibbles (as Q4_K). The gguf package cannot
    quantize Q5_K; a plain min/max rule, as ``q4_k_gguf_bytes``."""
    lead, k = w.shape[:-1], w.shape[-1]
    d, dmin, sc, mn, q = _min_max_k_codes(w.reshape(-1, k // 256, 8, 32), 31)
    low = q & 0x0F
    nib = (low[:, :, 0::2] | (low[:, :, 1::2] << 4)).reshape(*q.shape[:2], 128)  # [R, NS, 128]
    qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=2, dtype=np.uint8)  # [R, NS, 32]
    head = np.stack([d, dmin], axis=-1).view(np.uint8).reshape(*d.shape, 4)
    return np.concatenate([head, _pack_k_scales(sc, mn), qh, nib], axis=-1).reshape(*lead, k // 256 * 176)


def q6_k_gguf_bytes(w: np.ndarray) -> np.ndarray:
    """GGUF Q6_K blocks of W [..., K] (K a multiple of 256) -> [..., K/256 * 210] uint8, laid out
    as ggml's block_q6_K: 128 bytes ql, 64 bytes qh, 16 int8 scales (one per 16 weights), fp16 d;
    per 128 weights, weight 32j + l has its low 4 bits in nibble j >> 1 of ql[l + 32 (j & 1)] and
    its high 2 bits at bit 2j of qh[l]. The gguf package cannot quantize Q6_K; a plain absmax rule
    (llama.cpp searches its scales; the layout is what matters here)."""
    lead, k = w.shape[:-1], w.shape[-1]
    x = w.reshape(-1, k // 256, 16, 16).astype(np.float32)  # [R, NS, 16, 16]
    s_sub = np.abs(x).max(-1) / 31  # [R, NS, 16]
    d = (s_sub.max(-1) / 127).astype(np.float16)  # [R, NS]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[..., None] > 0, np.clip(np.rint(s_sub / d[..., None]), -128, 127), 0).astype(np.int8)
        step = (d[..., None].astype(np.float32) * sc)[..., None]
        q = (np.where(step != 0, np.clip(np.rint(x / step), -32, 31), 0) + 32).astype(np.uint8)  # 0..63
    q = q.reshape(*q.shape[:2], 2, 4, 32)  # [R, NS, half, j, l]
    ql = np.concatenate(
        [(q[:, :, :, 0] & 15) | ((q[:, :, :, 2] & 15) << 4), (q[:, :, :, 1] & 15) | ((q[:, :, :, 3] & 15) << 4)],
        axis=-1,
    )  # [R, NS, 2, 64]
    qh = ((q >> 4) << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=3, dtype=np.uint8)  # [R, NS, 2, 32]
    r, ns = q.shape[:2]
    return np.concatenate(
        [
            ql.reshape(r, ns, 128),
            qh.reshape(r, ns, 64),
            sc.view(np.uint8),
            d[..., None].view(np.uint8).reshape(r, ns, 2),
        ],
        axis=-1,
    ).reshape(*lead, k // 256 * 210)


def _encode(w: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype == Q.Q4_K:
        return q4_k_gguf_bytes(w)
    if qtype == Q.Q5_K:
        return q5_k_gguf_bytes(w)
    if qtype == Q.Q6_K:
        return q6_k_gguf_bytes(w)
    return gguf.quants.quantize(w.astype(np.float32), qtype)  # [..., bytes] uint8


DEFAULT_TYPES = {"linear": Q.Q4_0, "embed": Q.Q8_0, "output": Q.Q8_0, "norm": Q.F32, "router": Q.F32}


def write_gguf(
    path: Path,
    cfg: dict[str, Any],
    weights: dict[str, np.ndarray],
    *,
    types: dict[str, Q] | None = None,
    stacked: bool = True,
    arch: str = "llama",
    chat_template: str | None = CHATML,
    tokenizer: str = "gpt2",
    split_max_tensors: int = 0,
    overrides: dict[str, Q] | None = None,
) -> Path:
    """Write HF-named float weights as a llama.cpp GGUF: names, permuted q/k, metadata, vocab.

    ``types`` maps role (linear, embed, output, norm, router) to a GGUF type; ``stacked`` writes
    Mixtral experts as ``ffn_*_exps`` [E, ...] tensors (current llama.cpp), else as the older
    per-expert ``ffn_gate.E``. ``split_max_tensors`` splits it as llama.cpp's gguf-split does
    (``path`` minus ``.gguf`` plus ``-0000i-of-0000n.gguf``; the first shard's path is returned).
    ``overrides`` maps GGUF tensor names to a type of their own (llama.cpp's _M mixes)."""
    types = {**DEFAULT_TYPES, **(types or {})}
    h, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    n_exp = cfg.get("num_local_experts", 0) if cfg["architectures"][0] == "MixtralForCausalLM" else 0
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_name("baby")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(h)
    w.add_head_count_kv(kvh)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    if n_exp:
        w.add_expert_count(n_exp)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if tokenizer == "gpt2":
        tokens, ttypes, merges = byte_level_vocab(cfg["vocab_size"])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types(ttypes)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def put(name: str, arr: np.ndarray, role: str) -> None:
        t = (overrides or {}).get(name, types[role])
        w.add_tensor(name, _encode(arr, t), raw_dtype=t if t not in (Q.F32, Q.F16) else None)

    put("token_embd.weight", weights["model.embed_tokens.weight"], "embed")
    for layer in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{layer}.", f"blk.{layer}."
        put(b + "attn_norm.weight", weights[p + "input_layernorm.weight"], "norm")
        put(b + "attn_q.weight", llama_permute(weights[p + "self_attn.q_proj.weight"], h), "linear")
        put(b + "attn_k.weight", llama_permute(weights[p + "self_attn.k_proj.weight"], kvh), "linear")
        put(b + "attn_v.weight", weights[p + "self_attn.v_proj.weight"], "linear")
        put(b + "attn_output.weight", weights[p + "self_attn.o_proj.weight"], "linear")
        put(b + "ffn_norm.weight", weights[p + "post_attention_layernorm.weight"], "norm")
        if n_exp:
            put(b + "ffn_gate_inp.weight", weights[p + "block_sparse_moe.gate.weight"], "router")
            for gname, wname in (("ffn_gate", "w1"), ("ffn_down", "w2"), ("ffn_up", "w3")):
                per = [weights[f"{p}block_sparse_moe.experts.{e}.{wname}.weight"] for e in range(n_exp)]
                if stacked:
                    put(f"{b}{gname}_exps.weight", np.stack(per), "linear")  # [E, N, K]
                else:
                    for e, x in enumerate(per):
                        put(f"{b}{gname}.{e}.weight", x, "linear")
        else:
            put(b + "ffn_gate.weight", weights[p + "mlp.gate_proj.weight"], "linear")
            put(b + "ffn_up.weight", weights[p + "mlp.up_proj.weight"], "linear")
            put(b + "ffn_down.weight", weights[p + "mlp.down_proj.weight"], "linear")
    put("output_norm.weight", weights["model.norm.weight"], "norm")
    if "lm_head.weight" in weights:
        put("output.weight", weights["lm_head.weight"], "output")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shards = w.format_shard_names(Path(path))
    return Path(shards[0])


def make_gguf_checkpoint(
    path: Path, kind: str = "mixtral", *, tied: bool = False, seed: int = 0, **kw: Any
) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
    """A baby GGUF with babymodels' float weights for (kind, tied, seed): (file, cfg, weights)."""
    cfg = {**BABY_DEFAULTS[kind], "tie_word_embeddings": tied}
    weights = random_weights(cfg, seed)
    return write_gguf(Path(path), cfg, weights, **kw), cfg, weights


# canonical name -> HF name (for comparing against the float originals)
def hf_name(name: str) -> str:
    top = {"tok_embeddings": "model.embed_tokens.weight", "norm": "model.norm.weight", "output": "lm_head.weight"}
    if name in top:
        return top[name]
    parts = name.split(".")
    p = f"model.layers.{parts[1]}."
    rest = ".".join(parts[2:])
    fixed = {
        "attn_norm": "input_layernorm.weight",
        "ffn_norm": "post_attention_layernorm.weight",
        "attn.wq": "self_attn.q_proj.weight",
        "attn.wk": "self_attn.k_proj.weight",
        "attn.wv": "self_attn.v_proj.weight",
        "attn.wo": "self_attn.o_proj.weight",
        "moe.gate": "block_sparse_moe.gate.weight",
    }
    if rest in fixed:
        return p + fixed[rest]
    e, wn = parts[3], parts[4]
    return f"{p}block_sparse_moe.experts.{e}.{wn}.weight"


def _dense_hf_name(name: str) -> str:
    n = hf_name(name)
    for w, mlp in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        n = n.replace(f"block_sparse_moe.experts.0.{w}.weight", f"mlp.{mlp}.weight")
    return n


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked-experts", "per-expert"])
def test_mixtral_gguf_config_and_exact_blocks(tmp_path, stacked):
    src, cfg, weights = make_gguf_checkpoint(tmp_path / "baby.gguf", "mixtral", stacked=stacked)
    ck = open_gguf(src)
    c = ck.config
    assert (c.architecture, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (
        "MixtralForCausalLM",
        64,
        96,
        2,
    )
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (4, 2, 16, 100)
    assert (c.num_local_experts, c.num_experts_per_tok, c.tie_word_embeddings) == (4, 2, False)
    assert c.rope_theta == cfg["rope_theta"] and c.max_position_embeddings == cfg["max_position_embeddings"]
    assert c.rms_norm_eps == pytest.approx(cfg["rms_norm_eps"])

    out = tmp_path / "out"
    summary = convert_gguf(src, out)
    m = verify_model_dir(out)
    assert summary.max_abs_err == 0.0 and m["source"]["kind"] == "gguf"
    for name, t in m["tensors"].items():
        want_type = {"embed": "q8_0", "output": "q8_0", "norm": "f32", "router": "f32"}.get(
            "embed"
            if name == "tok_embeddings"
            else "output"
            if name == "output"
            else "norm"
            if name.endswith("norm")
            else "router"
            if name.endswith("moe.gate")
            else "linear",
            "q4_0",
        )
        want_type = _tiled(want_type, weights[hf_name(name)])
        assert t["type"] == want_type, name
        ours = read_tensor_parts(out, m, name)
        ref = q4.quantize(weights[hf_name(name)], want_type)  # our quantizer on the original floats
        for part, arr in ref.items():
            np.testing.assert_array_equal(np.asarray(ours[part]), arr, err_msg=f"{name}.{part}")


def test_unpermuted_qk_equal_originals_and_transformers(tmp_path):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    types = {"linear": Q.F32, "embed": Q.F32, "output": Q.F32}
    src, cfg, weights = make_gguf_checkpoint(tmp_path / "f32.gguf", "llama", types=types)
    ck = open_gguf(src)
    reader = gguf.GGUFReader(src)
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    hf_proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for layer in range(cfg["num_hidden_layers"]):
        for ours_name, gname, hname in (("wq", "attn_q", "q_proj"), ("wk", "attn_k", "k_proj")):
            got = ck.read(f"layers.{layer}.attn.{ours_name}")
            original = weights[f"model.layers.{layer}.self_attn.{hname}.weight"]
            stored_w = stored[f"blk.{layer}.{gname}.weight"]
            assert not np.array_equal(stored_w, original)  # the file really holds the permuted rows
            np.testing.assert_array_equal(got, original)
            np.testing.assert_array_equal(got, hf_proc.process(stored_w, f"blk.{layer}.{gname}.weight").weights)


def test_llama_gguf_q4_1_f16_tied(tmp_path):
    types = {"linear": Q.Q4_1, "embed": Q.F16}
    src, cfg, weights = make_gguf_checkpoint(tmp_path / "llama.gguf", "llama", tied=True, types=types)
    ck = open_gguf(src)
    assert ck.config.architecture == "LlamaForCausalLM" and not ck.config.moe and ck.config.tie_word_embeddings
    out = tmp_path / "out"
    convert_gguf(src, out)
    m = verify_model_dir(out)
    assert "output" not in m["tensors"]
    assert m["quant"]["preset"] == "keep"  # q4_1 linears with an f16 embedding: no preset says that
    for name, t in m["tensors"].items():
        ref_type = "f16" if name == "tok_embeddings" else "f32" if name.endswith("norm") else "q4_1"
        ref_type = _tiled(ref_type, weights[_dense_hf_name(name)])
        assert t["type"] == ref_type
        ref = q4.quantize(weights[_dense_hf_name(name)], ref_type)
        ours = read_tensor_parts(out, m, name)
        for part, arr in ref.items():
            np.testing.assert_array_equal(np.asarray(ours[part]), arr, err_msg=f"{name}.{part}")


def test_requantize_non_exact_types(tmp_path):
    """Q5_0 / BF16 have no exact home: gguf dequantizes, our quantizer re-quantizes."""
    types = {"linear": Q.Q5_0, "embed": Q.BF16, "output": Q.Q5_0}
    src, cfg, weights = make_gguf_checkpoint(tmp_path / "q5.gguf", "llama", types=types)
    reader = {t.name: t for t in gguf.GGUFReader(src).tensors}
    for quant in ("keep", "q4_0"):
        out = tmp_path / f"out-{quant}"
        convert_gguf(src, out, quant=quant)
        m = verify_model_dir(out)
        t = reader["blk.1.attn_v.weight"]
        deq = gguf.quants.dequantize(np.array(t.data), t.tensor_type)  # [N, K] f32, the reference decoder
        qtype = _tiled("q8_0" if quant == "keep" else "q4_0", deq)
        assert m["tensors"]["layers.1.attn.wv"]["type"] == qtype
        ours = read_tensor_parts(out, m, "layers.1.attn.wv")
        for part, arr in q4.quantize(deq, qtype).items():
            np.testing.assert_array_equal(np.asarray(ours[part]), arr)
        emb = reader["token_embd.weight"]
        emb_deq = gguf.quants.dequantize(np.array(emb.data), emb.tensor_type)
        emb_type = _tiled("f16" if quant == "keep" else "q8_0", emb_deq)
        ours = read_tensor_parts(out, m, "tok_embeddings")
        for part, arr in q4.quantize(emb_deq, emb_type).items():
            np.testing.assert_array_equal(np.asarray(ours[part]), arr)


def _random_q4_k_rows(rng, n: int, k: int, d_scale: float = 1.0) -> np.ndarray:
    """Valid GGUF Q4_K rows [N, K/256 * 144]: any codes and nibbles, fp16 d / dmin of either sign
    from subnormal to ~1000 (times ``d_scale``), some exactly zero."""
    raw = rng.integers(0, 256, (n, k // 256, 144), dtype=np.uint8)
    mag = rng.standard_normal((n, k // 256, 2)) * 10.0 ** rng.uniform(-9, 2.5, (n, k // 256, 2)) * d_scale
    mag[rng.random(mag.shape) < 0.05] = 0.0
    raw[:, :, :4] = np.clip(mag, -1000 * d_scale, 1000 * d_scale).astype("<f2").view(np.uint8).reshape(n, k // 256, 4)
    return raw.reshape(n, -1)


def test_q4_k_blocks_import_with_gguf_values_bit_for_bit():
    """Our split of GGUF Q4_K (codes unpacked, nibbles re-ordered, D = 64 d) dequantizes to exactly
    what gguf.quants.dequantize (llama.cpp's decoder, which we did not write) gives, through the
    numpy reference, the row-tiled form and the kernels' row reader; a d that 64 d would
    overflow is refused (the converter re-quantizes that tensor)."""
    from mixcli.kernels import f32
    from quant.formats import interleave_rows
    from quant.sources.gguf import split_q4_k

    rng = np.random.default_rng(11)
    n, k = 32, 768
    raw = _random_q4_k_rows(rng, n, k)
    want = gguf.quants.dequantize(raw, Q.Q4_K).reshape(n, k)  # [N, K] f32
    parts = split_q4_k(raw, k)
    got = q4.dequantize(parts, "q4_k")
    assert got.tobytes() == want.tobytes()
    tiled = interleave_rows(parts, "q4_k")
    assert q4.dequantize(tiled, "q4_kr16").tobytes() == want.tobytes()
    row = np.empty(k, np.float32)
    for r in (0, 17, n - 1):
        f32.dequant_row_q4_kr16(tiled["qs"], tiled["s"], tiled["d"], tiled["m"], r, row)
        assert row.tobytes() == want[r].tobytes()
    # a file built from floats by llama.cpp's layout holds the floats to Q4_K precision
    w = np.random.default_rng(1).standard_normal((4, 512)).astype(np.float32)
    enc = q4_k_gguf_bytes(w)
    np.testing.assert_array_equal(q4.dequantize(split_q4_k(enc, 512), "q4_k"), gguf.quants.dequantize(enc, Q.Q4_K))
    assert np.abs(gguf.quants.dequantize(enc, Q.Q4_K) - w).max() < 0.5
    big = _random_q4_k_rows(rng, 2, 256, d_scale=1.0)
    big[1, :2] = np.array([2000.0], "<f2").view(np.uint8)  # 64 * 2000 > 65504
    assert split_q4_k(big, 256) is None


Q4_K_BABY = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}  # every K a multiple of 256


def test_llama_gguf_q4_k_imports_exactly_and_runs_like_transformers(tmp_path):
    """A Q4_K GGUF (linears Q4_K, embedding and head Q8_0, as in a Q4_K_M file's bulk) converts
    under the default ``keep`` to q4_kr16 with no error, every tensor as gguf decodes it, and the
    model's logits match transformers' on the same file."""
    import torch
    from transformers import AutoModelForCausalLM

    import mixcli

    cfg = {**BABY_DEFAULTS["llama"], **Q4_K_BABY, "tie_word_embeddings": False}
    weights = random_weights(cfg, 5)
    src = write_gguf(tmp_path / "q4k.gguf", cfg, weights, types={"linear": Q.Q4_K})
    out = tmp_path / "out"
    summary = convert_gguf(src, out)
    m = verify_model_dir(out)
    assert summary.max_abs_err == 0.0
    ck = open_gguf(src)
    for name, t in m["tensors"].items():
        if role_of(name) == "linear":
            assert t["type"] == "q4_kr16", name
            got = q4.dequantize(read_tensor_parts(out, m, name), t["type"])
            np.testing.assert_array_equal(got, ck.read(name), err_msg=name)  # gguf's decoder, q/k un-permuted
    tokens = np.random.default_rng(2).integers(3, cfg["vocab_size"], 24).tolist()
    ours = mixcli.load(out, ctx=64).logits(tokens)  # [T, V]
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=src.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([tokens])).logits[0].numpy()
    np.testing.assert_allclose(ours, want, rtol=0, atol=2e-3 * float(np.abs(want).max()))


def test_q4_k_gguf_fallbacks_and_requantization(tmp_path):
    """A Q4_K tensor whose 64 d overflows fp16 is re-quantized by our q4_k rule (same type, not
    exact); ``--quant q4_k`` on another type re-quantizes by our rule, on Q4_K copies."""
    from quant.formats import interleave_rows

    cfg = {**BABY_DEFAULTS["llama"], **Q4_K_BABY, "tie_word_embeddings": False}
    weights = random_weights(cfg, 6)
    # weights 0 .. 1.2e6: GGUF's d (range / 15 / 63) is past 1023.5, so 64 d overflows fp16; ours fits
    wo = np.random.default_rng(0).uniform(0, 1.2e6, (cfg["hidden_size"], cfg["hidden_size"])).astype(np.float32)
    weights["model.layers.1.self_attn.o_proj.weight"] = wo
    src = write_gguf(tmp_path / "q4k.gguf", cfg, weights, types={"linear": Q.Q4_K})
    ck = open_gguf(src)
    assert ck.exact_parts("layers.1.attn.wo") is None and ck.exact_parts("layers.0.attn.wo") is not None
    for quant in ("keep", "q4_k"):
        out = tmp_path / quant
        summary = convert_gguf(src, out, quant=quant)
        m = verify_model_dir(out)
        assert m["tensors"]["layers.1.attn.wo"]["type"] == "q4_kr16" and summary.max_abs_err > 0
        deq = ck.read("layers.1.attn.wo")
        ours = read_tensor_parts(out, m, "layers.1.attn.wo")
        for part, arr in q4.quantize(deq, "q4_kr16").items():
            np.testing.assert_array_equal(np.asarray(ours[part]), arr)
        exact = read_tensor_parts(out, m, "layers.0.attn.wo")
        np.testing.assert_array_equal(q4.dequantize(exact, "q4_kr16"), ck.read("layers.0.attn.wo"))
    q40 = write_gguf(tmp_path / "q40.gguf", cfg, random_weights(cfg, 6), types={"linear": Q.Q4_0})
    convert_gguf(q40, tmp_path / "from-q4_0", quant="q4_k")
    m = verify_model_dir(tmp_path / "from-q4_0")
    assert m["quant"]["preset"] == "q4_k"
    deq = open_gguf(q40).read("layers.0.experts.0.w2")
    ours = read_tensor_parts(tmp_path / "from-q4_0", m, "layers.0.experts.0.w2")
    want = interleave_rows(q4.quantize(deq, "q4_k"), "q4_k")
    for part, arr in want.items():
        np.testing.assert_array_equal(np.asarray(ours[part]), arr)


def test_gpt2_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    from mixcli.tokenizer import load_tokenizer

    src, cfg, _ = make_gguf_checkpoint(tmp_path / "baby.gguf", "mixtral")
    out = tmp_path / "out"
    convert_gguf(src, out)
    info = verify_model_dir(out)["tokenizer"]
    assert info["kind"] == "hf-json" and info["template_family"] == "chatml" and info["chat_template"] == CHATML
    assert (info["bos_token"], info["eos_token"], info["add_bos"]) == ("<|im_start|>", "<|im_end|>", False)
    assert info["extra_eos_tokens"] == ["<|endoftext|>"]
    ours = load_tokenizer(out, info)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="baby.gguf")
    texts = [
        "the cat sat on the mat.",
        "<|im_start|>user\nIs that the rat?<|im_end|>\n",
        "The  end, then the dog!",
        "hat the at eht",
    ]
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert len(ids) < len(text)  # the merges are in use
        assert ours.decode(ids, skip_special=False) == ref.decode(ids) == text


def test_sentencepiece_tokenizer_matches_transformers():
    """A llama (SentencePiece, scores + byte fallback) vocabulary, against transformers' own
    builder fed the same metadata."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    from quant.gguf_tokenizer import build_tokenizer

    pieces = ["▁t", "he", "▁the", "▁c", "at", "▁cat", "▁s", "▁sat", "▁o", "n", "▁on", "▁m", "▁mat", "er", "▁h", "ere"]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz▁.,"))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(pieces))
    scores = [0.0] * (3 + 256) + [-100.0 - i for i in range(len(chars))] + [-1.0 - i for i in range(len(pieces))]
    meta = {"tokenizer.ggml.model": "llama"}
    ours = build_tokenizer(meta, tokens, types, None, scores)
    ref, _ = convert_gguf_tokenizer(
        "llama", {"tokenizer_type": "llama", "tokens": tokens, "scores": scores, "token_type": types}
    )
    for text in ["the cat sat on the mat", "here, there", " leading space", "café ünï 🤖", "<s>the</s>"]:
        got = ours.encode(text, add_special_tokens=False)
        assert got.ids == ref.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(got.ids, skip_special_tokens=False) == ref.decode(got.ids, skip_special_tokens=False)
    assert ours.encode("the cat", add_special_tokens=False).tokens == ["▁the", "▁cat"]


# -- bad input ----------------------------------------------------------------------------------
def _assert_clean_failure(tmp_path: Path, src: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as info:
        convert_gguf(src, tmp_path / "out" / "model")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing left: not the model, not a .partial, not the parent


def test_truncated_gguf(tmp_path):
    src, _, _ = make_gguf_checkpoint(tmp_path / "t.gguf", "mixtral")
    data = src.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 40):
        src.write_bytes(data[:cut])
        _assert_clean_failure(tmp_path, src, "truncated|not a valid GGUF")


def test_bad_magic(tmp_path):
    src, _, _ = make_gguf_checkpoint(tmp_path / "m.gguf", "llama")
    data = bytearray(src.read_bytes())
    data[:4] = b"GGML"
    src.write_bytes(bytes(data))
    _assert_clean_failure(tmp_path, src, "not a GGUF file")


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_unsupported_architecture(tmp_path, arch):
    cfg = {**BABY_DEFAULTS["llama"], "tie_word_embeddings": True}
    src = write_gguf(tmp_path / f"{arch}.gguf", cfg, random_weights(cfg), arch=arch)
    _assert_clean_failure(tmp_path, src, f"architecture {arch} is not supported.*llama")


def test_unsupported_tensor_type(tmp_path):
    cfg = {**BABY_DEFAULTS["llama"], "tie_word_embeddings": True}
    weights = random_weights(cfg)
    src = write_gguf(tmp_path / "i32.gguf", cfg, weights)
    # rewrite with one norm stored as I32 (a type no decoder handles)
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, field.contents())
        else:
            w.add_key_value(key, field.contents(), vtype)
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name == "blk.0.attn_norm.weight":
            w.add_tensor(t.name, data.astype(np.int32))
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _assert_clean_failure(tmp_path, tmp_path / "bad.gguf", "blk.0.attn_norm.weight has GGUF type I32")


def test_cli_convert_gguf_keeps_blocks_and_refuses_keep_for_a_directory(tmp_path):
    """`mixcli convert model.gguf -o DIR` (the command a user types) imports GGUF files; with no
    --quant it keeps the file's blocks. `--quant keep` names a GGUF-only choice."""
    import subprocess
    import sys

    src, cfg, weights = make_gguf_checkpoint(tmp_path / "baby.gguf", "mixtral", types={"linear": Q.Q4_0})
    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "mixcli", "convert", str(src), "-o", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, timeout=300)
    assert r.returncode == 0, r.stderr
    m = verify_model_dir(tmp_path / "out")
    assert m["source"]["kind"] == "gguf" and m["stats"]["max_abs_err"] == 0.0
    assert m["tensors"]["layers.0.attn.wq"]["type"] == "q4_0r16"  # Q4_0 blocks kept, rows tiled

    cmd = [sys.executable, "-m", "mixcli", "convert", str(tmp_path), "-o", str(tmp_path / "out2"), "--quant", "keep"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "GGUF files only" in r.stderr, r.stderr
    assert not (tmp_path / "out2").exists()


# -- split GGUF (llama.cpp's gguf-split) ---------------------------------------------------------
def test_split_gguf_converts_like_the_single_file(tmp_path):
    """The shards of a split GGUF (named by any of them) give the model the single file gives."""
    (tmp_path / "one").mkdir()
    single, cfg, weights = make_gguf_checkpoint(
        tmp_path / "one" / "baby.gguf", "mixtral", seed=3, types={"output": Q.Q5_0}
    )
    (tmp_path / "split").mkdir()
    first = write_gguf(tmp_path / "split" / "baby.gguf", cfg, weights, types={"output": Q.Q5_0}, split_max_tensors=9)
    shards = sorted((tmp_path / "split").iterdir())
    assert first.name == "baby-00001-of-00003.gguf" and len(shards) == 3
    a, b = verify_model_dir(convert_gguf(single, tmp_path / "a").out), None
    for named in (shards[0], shards[2]):  # any shard names the whole model
        out = tmp_path / f"b-{named.name}"
        b = verify_model_dir(convert_gguf(named, out).out)
        assert b["tensors"].keys() == a["tensors"].keys()
        for name in a["tensors"]:
            assert b["tensors"][name]["sha256"] == a["tensors"][name]["sha256"], name
        assert b["config"] == a["config"] and b["tokenizer"]["eos_token"] == a["tokenizer"]["eos_token"]


def test_split_gguf_missing_or_foreign_shard(tmp_path):
    cfg = {**BABY_DEFAULTS["llama"], "tie_word_embeddings": True}
    weights = random_weights(cfg)
    first = write_gguf(tmp_path / "m.gguf", cfg, weights, split_max_tensors=8)
    second = tmp_path / "m-00002-of-00003.gguf"
    data = second.read_bytes()
    second.unlink()
    _assert_clean_failure(
        tmp_path, first, r"one of 3 shards of a split GGUF, and m-00002-of-00003.gguf is missing \(download all 3 files"
    )
    # a shard from elsewhere under the right name: its split metadata gives it away
    (tmp_path / "m-00003-of-00003.gguf").rename(second)
    (tmp_path / "m-00003-of-00003.gguf").write_bytes(data)
    _assert_clean_failure(tmp_path, first, "m-00002-of-00003.gguf is not shard 2 of 3")


def test_reading_tensors_leaves_no_file_pages_resident(tmp_path):
    """Tensors are read with pread, not through the reader's map: after reading every tensor, the
    process holds no more of the file's mapping than the header the reader parsed (the kernel's
    own count: Rss of the mapping in /proc/self/smaps)."""
    import gc

    cfg = {**BABY_DEFAULTS["mixtral"], "intermediate_size": 1024, "tie_word_embeddings": False}
    src = write_gguf(tmp_path / "r.gguf", cfg, random_weights(cfg), types={"output": Q.Q5_0})  # ~1 MB
    ref_reader = gguf.GGUFReader(src)
    header_end = min(int(t.data_offset) for t in ref_reader.tensors)
    want = gguf.quants.dequantize(
        np.array(next(t for t in ref_reader.tensors if t.name == "blk.1.ffn_down_exps.weight").data[2]), Q.Q4_0
    )
    del ref_reader
    gc.collect()
    assert _mapped_rss_kib(src) is None  # no map of it left
    with open_gguf(src) as ck:
        for name in ck.tensors:
            if ck.exact_parts(name) is None:
                ck.read(name)
        np.testing.assert_array_equal(ck.read("layers.1.experts.2.w2"), want)
        rss = _mapped_rss_kib(src)
        assert rss is not None  # the reader's map is there ...
        # ... but only its header was touched (plus the kernel's fault-around, 64 KiB by default)
        bound = header_end + (64 << 10) + 4096
        assert rss * 1024 <= bound, (rss, header_end)
        assert src.stat().st_size > 8 * bound  # reading the tensors through the map would have shown


def _mapped_rss_kib(path: Path) -> int | None:
    """Resident KiB of this process's mappings of ``path`` (from /proc/self/smaps), None if unmapped."""
    total, inside = None, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                inside = len(head) >= 6 and head[5] == str(path.resolve())
                if inside:
                    total = total or 0
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total

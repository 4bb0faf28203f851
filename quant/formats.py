"""Every fact about the converted model format, in one place.

A converted model is a directory holding ``manifest.json`` and one or more data files. The
manifest names the format and its version, carries the model config, the quantization spec, the
tokenizer files and chat template, and a table of tensors. Each tensor is made of *parts* (for a
4-bit tensor: packed nibbles ``qs``, fp16 scales ``d`` and, for q4_1, fp16 mins ``m``), each part a
plain little-endian array at a byte offset in a data file, so the runtime can map it with
``numpy.memmap`` and hand the views straight to the numba kernels.

Block layouts mirror GGUF's (same group size, same nibble order) so a GGUF Q4_0 / Q4_1 / Q8_0
tensor imports by copying bytes, and because llama.cpp's order suits SIMD: in each block of 32
weights, byte j holds weight j in its low nibble and weight j+16 in its high nibble, so one
16-byte load feeds two contiguous 16-float activation runs.

The default 4-bit type is q4_0 (symmetric, groups of 32, 4.5 bits/weight), chosen by
measurement (``python benchmarks/quant_choice.py``; benchmarks/RESULTS.md, "Quantization
choice"): at equal bits the symmetric rule with the smaller group has the smaller error, and G=32
keeps GGUF's blocks (an exact import, and decode reads fewer bytes than q4_1's 5 bits/weight).

q4_k: two-level scales, for models where q4_0 is not enough
------------------------------------------------------------
On the default model (SmolLM2-135M, shipped as a Q4_1 GGUF) our q4_0 re-quantization falls short
of 90% greedy agreement with transformers, and its perplexity is far above the source's; a K-quant-style type with 8-bit block codes under fp16 super-block scales closes most
of that gap at 4.625 bits/weight (benchmarks/RESULTS.md, "q4_k"; tests/test_default_model.py
asserts the floors). And most GGUF files people have are Q4_K_M, whose Q4_K tensors q4_k holds
exactly (q4_0 would re-quantize them, lossily).

Definition, for a matrix [N, K] (K a multiple of 32, else ``fallback_type`` keeps it in f16):

- blocks of 32 weights along K (QK), NB = K / 32; super-blocks of 8 blocks (256 weights),
  NS = ceil(NB / 8): the last super-block of a row may be partial (K = 576: 18 blocks, 3
  super-blocks, the last holding 2);
- w = (D / 64) * sc * q - (Dm / 64) * mn, with q in 0..15 (unsigned nibbles in q4_0/q4_1's
  layout: byte j of a block = q[j] | q[j+16] << 4), sc and mn uint8 codes (0..255) per block,
  D and Dm fp16 per super-block;
- parts: qs [N, K/2] u1, s [N, 2*NB] u1 (per block sc then mn: s[:, 2b] = sc_b, s[:, 2b+1] =
  mn_b), d [N, NS] <f2 (D), m [N, NS] <f2 (Dm). 4 + 16/32 + 32/256 = 4.625 bits/weight.

Why the divisor 64: a power of two, so GGUF Q4_K (per 32 weights d_sub = d * sc6, m_sub = dmin *
mn6, 6-bit codes) imports exactly with D = 64 d, Dm = 64 dmin (exact in fp16 unless it overflows;
``quant.sources.gguf`` then re-quantizes that tensor), and so that our own super-scale
D = max(d_b) * 64 / 255 stays a normal fp16 number where max(d_b) / 255 would often be subnormal
(and lose bits) for ordinary weights.

The quantizer (``quant.q4``, numba twin ``quant.fastquant``), per block: lo = min(min(x), 0),
d_b = (max(x) - lo) / 15, m_b = -lo; per super-block D = fp16(max d_b * 64 / 255), Dm likewise
from m_b; sc = clip(rint(d_b * 64 / D), 0, 255) (0 where D = 0), mn likewise; then with the stored
d' = D * sc / 64, m' = Dm * mn / 64: q = clip(rint((x + m') / d'), 0, 15) (0 where d' = 0).

Kernels exist for the row-tiled form q4_kr16 (``mixcli.kernels``: per block it is q4_1's
arithmetic with d_w = sc * D / 64 and m_w = -mn * Dm / 64). A q4_k matrix whose N is not a
multiple of 16 stays row-major "q4_k" and runs on f32-activation kernels in every activation mode:
exact but far slower (the speed of every type's f32 path; benchmarks/RESULTS.md, "q4_k"). Such matrices are rare (Llama / Mistral / Mixtral
widths and vocabularies are multiples of 16); keeping the type, rather than switching such a
tensor to q4_1, keeps a GGUF Q4_K import exact everywhere and needs no second storage rule.

q6_k and q5_k: GGUF's K-quants, imported bit for bit
---------------------------------------------------
A Q4_K_M file keeps its output head and about half of ``ffn_down`` and ``attn_v`` in Q6_K (Q5_K_M:
Q5_K and Q6_K). These types hold those blocks exactly: GGUF's bytes per super-block of 256
weights (QK_K), its fields split into parts as for Q4_0 (no bit changes, and llama.cpp's kernels
for these layouts port directly):

- q6_k, 6.5625 bits/weight: ql [N, NS*128] u1 (low 4 bits), qh [N, NS*64] u1 (high 2 bits),
  sc [N, NS*16] i1 (a scale per 16 weights), d [N, NS] <f2; w = d * sc * (q - 32), q in 0..63,
  arranged as in ggml's ``dequantize_row_q6_K``;
- q5_k, 5.5 bits/weight: qs [N, NS*128] u1 (low 4 bits), qh [N, NS*32] u1 (5th bit), s [N, NS*12]
  u1 (Q4_K's packed 6-bit scale and min codes), d, m [N, NS] <f2 (d, dmin);
  w = d * sc * q - dmin * mn.

K must be a multiple of 256 (GGUF cannot store anything else in these types). They stay row-major
(no r16 form); their kernels (``mixcli.kernels.kquants``) are plain numba loops shared by every
instruction-set tier. ``quant.q4.dequantize`` decodes them (equal to ``gguf.quants.dequantize``
bit for bit) and ``quant.sources.gguf.split_blocks`` imports them; nothing quantizes floats into
them (no ``--quant`` preset names them: they come from GGUF files only).

Dimension letters: N output rows, K input columns (the reduction axis), G quant group (32),
NB = K / 32 blocks per row, NS = ceil(NB / 8) q4_k super-blocks per row (K / 256 for q6_k, q5_k).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from .errors import FormatError as FormatError  # re-exported beside check_manifest, which raises it

FORMAT_NAME = "mixcli-q"
FORMAT_VERSION = 2  # 2: the row-tiled "r16" types (1 had row-major blocks only)
READABLE_VERSIONS = (1, 2)  # a version-1 model is a version-2 model without r16 tensors
MANIFEST_NAME = "manifest.json"
STAMP_NAME = ".verified.json"  # files as they were when every sha256 last matched (quant.integrity)
DATA_FILE_PATTERN = "weights-{:05d}.bin"
DATA_FILE_RE = re.compile(r"^weights-\d{5}\.bin$")
TENSOR_ALIGN = 4096  # every tensor starts on a page: map, madvise and prefetch it alone
PART_ALIGN = 64  # every part of a tensor starts on a cache line
QK = 32  # weights per quant block (G)
SUPER = 8  # q4_k: blocks per super-block (256 weights share the fp16 D and Dm)
QK_K = 256  # weights per super-block of GGUF's K-quants (q6_k, q5_k)


@dataclass(frozen=True)
class QuantType:
    """One storage type: how a [N, K] matrix becomes parts, and what it costs."""

    name: str
    block: int  # weights per block along K (1 for float types)
    bits_per_weight: float
    parts: tuple[str, ...]
    base: str = ""  # a row-tiled type: the block type whose blocks it holds ("" for itself)
    rows: int = 1  # rows interleaved per tile (ROW_TILE for the "r16" types, else 1)

    def part_shapes(self, n: int, k: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and numpy dtype string of each part for an [N, K] matrix (or [K] vector, n=0)."""
        if self.rows > 1:  # the base type's bytes, ROW_TILE rows to a line: [N / 16, 16 * ...]
            return {
                p: ((n // self.rows, self.rows * shape[1]), dt)
                for p, (shape, dt) in QUANT_TYPES[self.base].part_shapes(n, k).items()
            }
        lead = (n,) if n else ()
        if self.name == "f32":
            return {"w": (lead + (k,), "<f4")}
        if self.name == "f16":
            return {"w": (lead + (k,), "<f2")}
        nb = k // self.block
        if self.name == "q8_0":
            return {"qs": (lead + (k,), "i1"), "d": (lead + (nb,), "<f2")}
        if self.name == "q4_0":
            return {"qs": (lead + (k // 2,), "u1"), "d": (lead + (nb,), "<f2")}
        if self.name == "q4_1":
            return {
                "qs": (lead + (k // 2,), "u1"),
                "d": (lead + (nb,), "<f2"),
                "m": (lead + (nb,), "<f2"),
            }
        if self.name == "q4_k":
            ns = -(-nb // SUPER)
            return {
                "qs": (lead + (k // 2,), "u1"),
                "s": (lead + (2 * nb,), "u1"),
                "d": (lead + (ns,), "<f2"),
                "m": (lead + (ns,), "<f2"),
            }
        ns = k // QK_K
        if self.name == "q6_k":
            return {
                "ql": (lead + (ns * 128,), "u1"),
                "qh": (lead + (ns * 64,), "u1"),
                "sc": (lead + (ns * 16,), "i1"),
                "d": (lead + (ns,), "<f2"),
            }
        if self.name == "q5_k":
            return {
                "qs": (lead + (ns * 128,), "u1"),
                "qh": (lead + (ns * 32,), "u1"),
                "s": (lead + (ns * 12,), "u1"),
                "d": (lead + (ns,), "<f2"),
                "m": (lead + (ns,), "<f2"),
            }
        raise KeyError(self.name)


QUANT_TYPES: dict[str, QuantType] = {
    "f32": QuantType("f32", 1, 32.0, ("w",)),
    "f16": QuantType("f16", 1, 16.0, ("w",)),
    # int8 weights, one fp16 scale per 32 (GGUF Q8_0)
    "q8_0": QuantType("q8_0", QK, 8.5, ("qs", "d")),
    # 4-bit, w = d * (q - 8), one fp16 scale per 32 (GGUF Q4_0)
    "q4_0": QuantType("q4_0", QK, 4.5, ("qs", "d")),
    # 4-bit, w = d * q + m, fp16 scale and min per 32 (GGUF Q4_1)
    "q4_1": QuantType("q4_1", QK, 5.0, ("qs", "d", "m")),
    # 4-bit, w = (D/64) * sc * q - (Dm/64) * mn: uint8 sc, mn per 32, fp16 D, Dm per 256 (see above)
    "q4_k": QuantType("q4_k", QK, 4.625, ("qs", "s", "d", "m")),
}
for _b in ("q4_0", "q4_1", "q8_0", "q4_k"):
    _t = QUANT_TYPES[_b]
    QUANT_TYPES[_b + "r16"] = QuantType(_b + "r16", QK, _t.bits_per_weight, _t.parts, base=_b, rows=16)
ROW_TILE = 16
# GGUF's K-quants, held bit for bit (see the docstring); parts in the kernels' argument order
# (GGUF's byte order within a super-block is quant.sources.gguf's business)
QUANT_TYPES["q6_k"] = QuantType("q6_k", QK_K, 6.5625, ("ql", "qh", "sc", "d"))
QUANT_TYPES["q5_k"] = QuantType("q5_k", QK_K, 5.5, ("qs", "qh", "s", "d", "m"))
K_TYPES = ("q6_k", "q5_k")


def base_type(qtype: str) -> str:
    """The block type a storage type holds ("q4_0r16" -> "q4_0"; "q4_0" -> "q4_0")."""
    return QUANT_TYPES[qtype].base or qtype


def row_tiled(qtype: str, n: int) -> str:
    """The storage type for an [N, K] matrix of block type ``qtype``: its row-tiled form when N is
    a multiple of ROW_TILE (see ``interleave_rows``), else ``qtype`` itself."""
    tiled = qtype + "r16"
    return tiled if tiled in QUANT_TYPES and n and n % ROW_TILE == 0 else qtype


def interleave_rows(parts: dict, qtype: str) -> dict:
    """Parts of block type ``qtype`` for [N, K] (N a multiple of 16) -> the parts of its row-tiled
    type: per tile of 16 rows and per block, 4-byte column groups of the 16 rows side by side.

    Why: decode multiplies one activation vector by every row. With a tile's 16 rows side by side,
    one 64-byte load holds 4 bytes (8 nibbles) of each of 16 rows, the 4 matching activation bytes
    are broadcast to all lanes, and ``vpdpbusd`` leaves each row's dot product in its own lane: no
    per-row shuffles or horizontal sums, the 16 fp16 scales of a block are one load, and a thread
    reads one sequential stream per part instead of one per row (benchmarks/RESULTS.md, "Row-tiled
    storage"; llama.cpp repacks Q4_0 into 8-row tiles for the same reason).

    qs [N, NB*B] (B = 16 bytes per block for 4-bit, 32 for q8_0) -> [N/16, NB*(B/4)*16*4] in
    order (tile, block, column group c, row i, byte j) = qs[16*tile + i, block*B + 4*c + j];
    d, m [N, NB] -> [N/16, NB*16] in order (tile, block, row). Every other part is re-laid the
    same way: q4_k's s [N, 2*NB] -> (tile, block, {sc, mn}, row), 16 sc bytes then 16 mn bytes per
    block, and its d, m [N, NS] -> (tile, super-block, row)."""
    out = {}
    for name, a in parts.items():
        a = np.asarray(a)
        n, w = a.shape
        g = n // ROW_TILE
        if name == "qs":
            nb = w // _BLOCK_BYTES[qtype]
            a = a.reshape(g, ROW_TILE, nb, _BLOCK_BYTES[qtype] // 4, 4).transpose(0, 2, 3, 1, 4)
        else:
            a = a.reshape(g, ROW_TILE, w).transpose(0, 2, 1)
        out[name] = np.ascontiguousarray(a).reshape(g, ROW_TILE * w)
    return out


def deinterleave_rows(parts: dict, qtype: str) -> dict:
    """The inverse of ``interleave_rows``: row-tiled parts -> the row-major parts of ``qtype``."""
    out = {}
    for name, a in parts.items():
        a = np.asarray(a)
        g, w = a.shape
        w //= ROW_TILE
        if name == "qs":
            nb = w // _BLOCK_BYTES[qtype]
            a = a.reshape(g, nb, _BLOCK_BYTES[qtype] // 4, ROW_TILE, 4).transpose(0, 3, 1, 2, 4)
        else:
            a = a.reshape(g, w, ROW_TILE).transpose(0, 2, 1)
        out[name] = np.ascontiguousarray(a).reshape(g * ROW_TILE, w)
    return out


_BLOCK_BYTES = {"q4_0": QK // 2, "q4_1": QK // 2, "q8_0": QK, "q4_k": QK // 2}  # bytes of qs per block

# What `--quant` offers, and which storage type each role gets under it. Router and norms are
# never quantized (tiny, and routing decisions are sensitive). Under 4-bit, the embedding and
# the output head stay 8-bit, as llama.cpp keeps its output head at 6 bits: one embedding row is
# read per token, and the head's error goes straight into every logit.
QUANT_PRESETS: dict[str, dict[str, str]] = {
    "q4_0": {"linear": "q4_0", "embed": "q8_0", "output": "q8_0", "router": "f32", "norm": "f32"},
    "q4_1": {"linear": "q4_1", "embed": "q8_0", "output": "q8_0", "router": "f32", "norm": "f32"},
    "q4_k": {"linear": "q4_k", "embed": "q8_0", "output": "q8_0", "router": "f32", "norm": "f32"},
    "q8_0": {"linear": "q8_0", "embed": "q8_0", "output": "q8_0", "router": "f32", "norm": "f32"},
    "f16": {"linear": "f16", "embed": "f16", "output": "f16", "router": "f32", "norm": "f32"},
}
DEFAULT_QUANT = "q4_0"

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM", "MistralForCausalLM", "LlamaForCausalLM")


def fallback_type(qtype: str, k: int) -> str:
    """A block type needs K to be a multiple of its block; otherwise keep the tensor in f16."""
    qt = QUANT_TYPES[qtype]
    return qtype if k % qt.block == 0 else "f16"


def align(offset: int, to: int) -> int:
    return (offset + to - 1) // to * to


# Canonical tensor names in a converted model (role in brackets, shape in dimension letters).
def tensor_names(n_layers: int, n_experts: int, moe: bool, tied: bool) -> list[str]:
    names = ["tok_embeddings"]  # [embed] [V, D]
    for layer in range(n_layers):
        p = f"layers.{layer}."
        names += [p + "attn_norm", p + "ffn_norm"]  # [norm] [D]
        names += [p + "attn.wq", p + "attn.wk", p + "attn.wv", p + "attn.wo"]
        # wq [H*HD, D], wk/wv [KVH*HD, D], wo [D, H*HD]
        if moe:
            names.append(p + "moe.gate")  # [router] [E, D]
        for e in range(n_experts):
            # w1, w3 [F, D]; w2 [D, F]: written back to back, one contiguous region per expert
            names += [f"{p}experts.{e}.w1", f"{p}experts.{e}.w3", f"{p}experts.{e}.w2"]
    names.append("norm")  # [norm] [D]
    if not tied:
        names.append("output")  # [output] [V, D]
    return names


def role_of(name: str) -> str:
    if name == "tok_embeddings":
        return "embed"
    if name == "output":
        return "output"
    if name.endswith("norm"):
        return "norm"
    if name.endswith("moe.gate"):
        return "router"
    return "linear"


def expert_region_name(layer: int, expert: int) -> str:
    return f"layers.{layer}.experts.{expert}"


# ---------------------------------------------------------------------------------------------
# manifest.json schema (version 2). All offsets are absolute byte offsets in the named data file.
#
# {
#   "format": "mixcli-q", "version": 2,
#   "config": {ModelConfig.to_dict()},
#   "quant": {"preset": "q4_0", "types": {"linear": "q4_0", "embed": "q8_0", ...}, "group": 32},
#   "tokenizer": {"kind": "sentencepiece" | "hf-json", "file": "tokenizer.model",
#                 "config_file": "tokenizer_config.json" | null, "bos_token": "<s>",
#                 "eos_token": "</s>", "add_bos": true, "extra_eos_tokens": [],
#                 "chat_template": "<jinja text>" | null, "template_family": "mistral" | "chatml" | null}
#                 (or null when the checkpoint carried no tokenizer)
#   "source": {"kind": "hf-safetensors" | "gguf", "path": "<as given>", "dtype": "bf16"},
#   "files": [{"name": "weights-00000.bin", "size": 123}],
#   "tensors": {
#     "<canonical name>": {"type": "q4_0", "shape": [N, K], "file": "weights-00000.bin",
#                          "offset": o, "nbytes": n, "sha256": "<hex of the bytes [o, o+n)>",
#                          "parts": {"qs": {"offset": o, "shape": [N, K/2], "dtype": "u1"},
#                                    "d": {"offset": o2, "shape": [N, K/32], "dtype": "<f2"}},
#                          "max_abs_err": 0.01}
#     (a row-tiled type, "q4_0r16" etc., has parts of shape [N/16, 16*...]: see interleave_rows)
#   },
#   "experts": {"layers.0.experts.3": {"file": "weights-00000.bin", "offset": o, "nbytes": n}},
#   "stats": {"params": P, "bytes": B, "bits_per_weight": b, "seconds": s, "max_abs_err": e}
# }
#
# Rules ``check_manifest`` enforces (the writer's verification and the loader share it): format and
# version match; the config's fields have their types and ranges (CONFIG_RULES, CONFIG_LIMIT); every
# file name matches DATA_FILE_RE (so no path can leave the model directory); files exist with the
# recorded size; the tensor table holds exactly the tensors the config implies, each of the shape the
# config implies (``expected_shape``) and a storage type this reader knows; every part lies inside
# its tensor and its file, has the shape its type implies, and starts at a multiple of PART_ALIGN;
# every tensor starts at a multiple of TENSOR_ALIGN; an expert region covers exactly its w1, w3, w2
# in order; every sha256 is 64 hex digits; every number is finite.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


# ---------------------------------------------------------------------------------------------
# The one manifest check
# ---------------------------------------------------------------------------------------------
CONFIG_LIMIT = 1 << 24  # no dimension of a model we can run comes near this; kernels index with int32
# config field -> (kind, lower bound[, upper bound]); "int": a JSON integer in [lower, CONFIG_LIMIT],
# "float": a number in (lower, upper] (float32 must hold rope_theta's powers; eps is a small epsilon)
CONFIG_RULES: dict[str, tuple] = {
    "hidden_size": ("int", 1),  # D
    "intermediate_size": ("int", 1),  # F
    "num_hidden_layers": ("int", 1),  # L
    "num_attention_heads": ("int", 1),  # H
    "num_key_value_heads": ("int", 1),  # KVH
    "head_dim": ("int", 2),  # HD
    "vocab_size": ("int", 1),  # V
    "max_position_embeddings": ("int", 1),
    "num_local_experts": ("int", 1),  # E
    "num_experts_per_tok": ("int", 1),  # K
    "rms_norm_eps": ("float", 0.0, 1.0),
    "rope_theta": ("float", 0.0, 1e30),
}


def expected_shape(cfg: Any, name: str) -> tuple[int, ...]:
    """The shape a model config implies for a canonical tensor name (HF layout: [out, in]).
    ``cfg`` has the config's fields as attributes (mixcli's ModelConfig, or a namespace)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    leaf = name.rsplit(".", 1)[-1]
    if name in ("tok_embeddings", "output"):
        return (v, d)  # [V, D]
    if leaf in ("norm", "attn_norm", "ffn_norm"):
        return (d,)  # [D]
    return {
        "wq": (q, d),  # [H*HD, D]
        "wk": (kv, d),  # [KVH*HD, D]
        "wv": (kv, d),
        "wo": (d, q),  # [D, H*HD]
        "gate": (cfg.num_local_experts, d),  # [E, D]
        "w1": (f, d),  # [F, D]
        "w3": (f, d),
        "w2": (d, f),  # [D, F]
    }[leaf]


def tensor_set_difference(want: list[str], have: Any) -> tuple[list[str], list[str]]:
    """(missing, extra): the names of ``want`` not in ``have``, in order, and those of ``have``
    not in ``want``, sorted. Every reader and the manifest check ask this one question."""
    have_set, want_set = set(have), set(want)
    return [n for n in want if n not in have_set], sorted(have_set - want_set)


def tensor_count(n_layers: int, n_experts: int, moe: bool, tied: bool) -> int:
    """len(tensor_names(...)), without building the list (a hostile config may say 10**12 layers)."""
    return 2 + (not tied) + n_layers * (6 + moe + 3 * n_experts)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def check_config(c: Any) -> SimpleNamespace:
    """A manifest's "config" -> a namespace of its checked fields; FormatError names the first
    field that breaks a rule, and its value."""
    if not isinstance(c, dict):
        raise FormatError(f"config is {type(c).__name__}, not an object")
    if c.get("architecture") not in SUPPORTED_ARCHITECTURES:
        raise FormatError(
            f"config.architecture is {c.get('architecture')!r}, expected one of {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    for key, (kind, low, *high) in CONFIG_RULES.items():
        v = c.get(key)
        if kind == "int" and not (_is_int(v) and low <= v <= CONFIG_LIMIT):
            raise FormatError(f"config.{key} is {v!r}, expected an integer in {int(low)}..{CONFIG_LIMIT}")
        if kind == "float" and not (_is_num(v) and low < v <= high[0]):
            raise FormatError(f"config.{key} is {v!r}, expected a number > {low:g} and <= {high[0]:g}")
    if not isinstance(c.get("tie_word_embeddings"), bool):
        raise FormatError(f"config.tie_word_embeddings is {c.get('tie_word_embeddings')!r}, expected true or false")
    cfg = SimpleNamespace(**{k: c[k] for k in (*CONFIG_RULES, "architecture", "tie_word_embeddings")})
    if cfg.head_dim % 2:
        raise FormatError(f"config.head_dim is {cfg.head_dim}, rotary embeddings need an even head_dim")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise FormatError(
            f"config.num_key_value_heads is {cfg.num_key_value_heads}, which does not divide "
            f"num_attention_heads {cfg.num_attention_heads}"
        )
    if cfg.num_experts_per_tok > cfg.num_local_experts:
        raise FormatError(
            f"config.num_experts_per_tok is {cfg.num_experts_per_tok}, more than num_local_experts "
            f"{cfg.num_local_experts}"
        )
    for key in ("bos_token_id", "eos_token_id"):
        ids = c.get(key)
        for i in ids if isinstance(ids, list) else [ids]:
            if i is not None and not (_is_int(i) and 0 <= i < cfg.vocab_size):
                raise FormatError(f"config.{key} is {ids!r}, expected token ids in 0..{cfg.vocab_size - 1} or null")
    scaling = c.get("rope_scaling")
    if scaling not in (None, {}) and not (
        isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) in ("default", None)
    ):
        raise FormatError(f"config.rope_scaling is {scaling!r}, which this mixcli does not support")
    cfg.moe = cfg.num_local_experts > 1
    return cfg


def _int_field(entry: dict, key: str, what: str, low: int = 0) -> int:
    v = entry.get(key)
    if not _is_int(v) or v < low:
        raise FormatError(f"{what} has {key} {v!r}, expected an integer >= {low}")
    return v


def check_manifest(m: Any, file_size: Callable[[str], int | None]) -> SimpleNamespace:
    """Check a parsed manifest against every rule of the schema above; return its config (see
    ``check_config``). ``file_size(name)`` gives a data file's size on disk, None when it is
    missing; it is asked only about names that match DATA_FILE_RE. Raises FormatError naming the
    field and its value. Pure apart from ``file_size``: the writer's verification and the loader
    both call it, so there is one definition of a valid model."""
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise FormatError(f"format is {m.get('format') if isinstance(m, dict) else None!r}, expected {FORMAT_NAME!r}")
    if m.get("version") not in READABLE_VERSIONS:
        raise FormatError(
            f"format version {m.get('version')!r}, this mixcli reads versions {', '.join(map(str, READABLE_VERSIONS))}",
            "convert the model again with this mixcli",
        )
    for key, kind in (
        ("config", dict),
        ("quant", dict),
        ("source", dict),
        ("files", list),
        ("tensors", dict),
        ("experts", dict),
        ("stats", dict),
    ):
        if not isinstance(m.get(key), kind):
            raise FormatError(f"manifest field {key!r} is {type(m.get(key)).__name__}, expected {kind.__name__}")
    if not (m.get("tokenizer") is None or isinstance(m["tokenizer"], dict)):
        raise FormatError("manifest field 'tokenizer' is neither an object nor null")
    cfg = check_config(m["config"])

    sizes: dict[str, int] = {}
    for f in m["files"]:
        name = f.get("name") if isinstance(f, dict) else None
        if not isinstance(name, str) or not DATA_FILE_RE.match(name) or name in sizes:
            raise FormatError(f"data file name {name!r} is not allowed (it must be unique and match weights-NNNNN.bin)")
        size = _int_field(f, "size", f"data file {name}")
        actual = file_size(name)
        if actual is None:
            raise FormatError(f"data file {name} is missing")
        if actual != size:
            raise FormatError(f"data file {name} is {actual} bytes, the manifest says {size} (truncated?)")
        sizes[name] = size

    tensors = m["tensors"]
    n_want = tensor_count(cfg.num_hidden_layers, cfg.num_local_experts, cfg.moe, cfg.tie_word_embeddings)
    if n_want != len(tensors):
        raise FormatError(
            f"the config implies {n_want} tensors (num_hidden_layers {cfg.num_hidden_layers}, "
            f"num_local_experts {cfg.num_local_experts}), the tensor table holds {len(tensors)}"
        )
    want = tensor_names(cfg.num_hidden_layers, cfg.num_local_experts, cfg.moe, cfg.tie_word_embeddings)
    missing, extra = tensor_set_difference(want, tensors)
    if missing or extra:
        raise FormatError(
            f"tensor table does not match the config: it lacks {missing[0]}"
            if missing
            else f"tensor table does not match the config: it has no place for {extra[0]}"
        )
    for name in want:
        _check_tensor(name, tensors[name], cfg, sizes)
    _check_experts(m["experts"], tensors, cfg, sizes)
    return cfg


_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def _check_tensor(name: str, t: Any, cfg: SimpleNamespace, sizes: dict[str, int]) -> None:
    what = f"tensor {name}"
    if not isinstance(t, dict):
        raise FormatError(f"{what} entry is {type(t).__name__}, not an object")
    qt = QUANT_TYPES.get(t.get("type")) if isinstance(t.get("type"), str) else None
    if qt is None:
        raise FormatError(
            f"{what} has storage type {t.get('type')!r}, which this mixcli does not know",
            "upgrade mixcli (a newer one converted this model), or convert the model again with this one",
        )
    shape, want = t.get("shape"), expected_shape(cfg, name)
    if not isinstance(shape, list) or tuple(shape) != want or not all(_is_int(s) for s in shape):
        raise FormatError(f"{what} has shape {shape!r}, the config implies {list(want)}")
    n, k = (shape[0], shape[1]) if len(shape) == 2 else (0, shape[0])
    if k % qt.block or (qt.rows > 1 and (not n or n % qt.rows)):
        raise FormatError(f"{what} of shape {shape} cannot be stored as {qt.name}")
    fname = t.get("file")
    if not isinstance(fname, str) or fname not in sizes:
        raise FormatError(f"{what} lies in data file {fname!r}, which the manifest does not list")
    offset, nbytes = _int_field(t, "offset", what), _int_field(t, "nbytes", what)
    if offset % TENSOR_ALIGN:
        raise FormatError(f"{what} starts at {offset}, not a multiple of {TENSOR_ALIGN}")
    if offset + nbytes > sizes[fname]:
        raise FormatError(
            f"{what} (bytes {offset}..{offset + nbytes}) runs past the end of {fname} ({sizes[fname]} bytes)"
        )
    if not isinstance(t.get("sha256"), str) or not _SHA_RE.match(t["sha256"]):
        raise FormatError(f"{what} has sha256 {t.get('sha256')!r}, expected 64 hex digits")
    if t.get("max_abs_err") is not None and not _is_num(t["max_abs_err"]):
        raise FormatError(f"{what} has max_abs_err {t['max_abs_err']!r}, expected a finite number")
    parts, expect = t.get("parts"), qt.part_shapes(n, k)
    if not isinstance(parts, dict) or list(parts) != list(expect):
        raise FormatError(
            f"{what} has parts {list(parts) if isinstance(parts, dict) else parts!r}, {qt.name} needs {list(expect)}"
        )
    prev_end = offset
    for pname, (pshape, dtype) in expect.items():
        p = parts[pname]
        if (
            not isinstance(p, dict)
            or p.get("shape") != list(pshape)
            or p.get("dtype") != dtype
            or not all(_is_int(x) for x in p["shape"])
        ):
            raise FormatError(f"{what} part {pname} is {p!r}, expected shape {list(pshape)} dtype {dtype}")
        poff = _int_field(p, "offset", f"{what} part {pname}")
        if poff % PART_ALIGN or poff < prev_end:
            raise FormatError(f"{what} part {pname} is misplaced (offset {poff})")
        prev_end = poff + math.prod(pshape) * np.dtype(dtype).itemsize
    if prev_end > offset + nbytes:
        raise FormatError(f"{what}'s parts overrun its {nbytes} bytes")


def _check_experts(regions: dict, tensors: dict, cfg: SimpleNamespace, sizes: dict[str, int]) -> None:
    want = [
        expert_region_name(layer, e) for layer in range(cfg.num_hidden_layers) for e in range(cfg.num_local_experts)
    ]
    missing, extra = tensor_set_difference(want, regions)
    if missing or extra:
        raise FormatError(
            f"expert regions do not match the config: {'missing ' + missing[0] if missing else 'unexpected ' + extra[0]}"
        )
    for rname in want:
        r = regions[rname]
        if not isinstance(r, dict) or not isinstance(r.get("file"), str) or r["file"] not in sizes:
            raise FormatError(f"expert region {rname} is malformed or lies in an unlisted file")
        offset, nbytes = (
            _int_field(r, "offset", f"expert region {rname}"),
            _int_field(r, "nbytes", f"expert region {rname}"),
        )
        w1, w3, w2 = (tensors[f"{rname}.{w}"] for w in ("w1", "w3", "w2"))
        if (
            {w1["file"], w3["file"], w2["file"]} != {r["file"]}
            or offset != w1["offset"]
            or not w1["offset"] < w3["offset"] < w2["offset"]
            or offset + nbytes != w2["offset"] + w2["nbytes"]
            or w1["offset"] + w1["nbytes"] > w3["offset"]
            or w3["offset"] + w3["nbytes"] > w2["offset"]
        ):
            raise FormatError(
                f"expert region {rname} (offset {offset}, {nbytes} bytes) does not cover exactly its w1, w3, w2 in order"
            )

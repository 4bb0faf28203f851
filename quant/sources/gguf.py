"""Read a llama.cpp GGUF file: config from its metadata, tensors under our canonical names.

What the ``gguf`` package (llama.cpp's own Python reader) does for us: it parses and validates the
header (magic, version, alignment, duplicate names), maps the file, and hands each tensor out as a
numpy view: ``[rows, bytes]`` uint8 for block types, ``[rows, K]`` for F16/F32 (shapes are in numpy
order; GGUF's own ``ne`` is reversed, ``ne[0]`` = K). Its ``quants.dequantize`` decodes every block
type llama.cpp defines, K-quants included. What is ours, and why:

- GGUF only speaks llama.cpp names (``blk.3.ffn_gate_exps``); we map them to
  ``quant.formats.tensor_names`` and build the Hugging Face-style config ``ModelConfig`` expects.
- llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` so its rotary kernel can
  rotate adjacent pairs; our forward pass (like transformers') rotates the two halves of each head.
  We undo it. It is a row permutation, so whole quant blocks move and a Q4 tensor stays exact.
- GGUF Q4_0 / Q4_1 / Q8_0 blocks (and Q6_K / Q5_K super-blocks) are our block types with the
  fields interleaved per block; we split them into our separate ``qs`` / ``d`` / ``m`` (...) arrays
  without touching a bit (``exact_parts``).
- GGUF Q4_K super-blocks (256 weights: fp16 d, dmin, twelve bytes of 6-bit scale and min codes,
  128 bytes of nibbles) hold exactly what our q4_k holds with 8-bit codes: D = 64 d, Dm = 64 dmin
  (``split_q4_k``; a tensor whose 64 d overflows fp16 is re-quantized instead). The values, not
  the bytes, are what is kept: the codes are unpacked and the nibbles re-ordered.
- Tensor bytes are read with ``pread`` into a buffer per tensor (an expert's slice of a stacked
  tensor, or the rows a chunk needs), never through the reader's map: pages touched in a map
  stay in our resident set until the map goes, so the peak grew with the file (benchmarks/RESULTS.md,
  "GGUF conversion in bounded memory"). Read, used and dropped, a tensor costs memory only while
  it is converted.
- A split GGUF (llama.cpp's ``gguf-split``: ``name-00001-of-00003.gguf`` ...) is opened as one:
  the metadata comes from the first shard, the tensors from whichever shard holds them.

Dimension letters: N output rows, K input columns, NB = K / 32 blocks per row, E experts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quant.config import ModelConfig
from quant.errors import CheckpointError, FormatError
from quant.formats import QK, expected_shape, tensor_names, tensor_set_difference
from quant.q4 import unpack_k_scales
from quant.sources.gguf_check import check_gguf_header

SUPPORTED_GGUF_ARCHS = ("llama",)
SHARD_RE = re.compile(
    r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE
)  # Llama, Mistral and Mixtral GGUFs all say "llama"
DOWNLOAD_HINT = "download the .gguf file again (it is damaged or incomplete)"

# GGUF block types our format stores bit for bit: GGUF type name -> our type name
EXACT_TYPES = {
    "F32": "f32",
    "F16": "f16",
    "Q8_0": "q8_0",
    "Q4_0": "q4_0",
    "Q4_1": "q4_1",
    "Q4_K": "q4_k",
    "Q6_K": "q6_k",
    "Q5_K": "q5_k",
}
Q4_K_BYTES = 144  # one GGUF Q4_K super-block: d, dmin (fp16), 12 bytes of codes, 128 bytes of nibbles

# Bytes of one GGUF block, in order: (field, byte offset, byte length) for the exact block types
_BLOCK_FIELDS = {
    "Q4_0": (("d", 0, 2), ("qs", 2, 16)),  # 18 bytes: fp16 d, 16 bytes of nibbles
    "Q4_1": (("d", 0, 2), ("m", 2, 2), ("qs", 4, 16)),  # 20 bytes: fp16 d, fp16 m, nibbles
    "Q8_0": (("d", 0, 2), ("qs", 2, 32)),  # 34 bytes: fp16 d, 32 int8
    # super-blocks of 256 weights (ggml's block_q6_K, block_q5_K)
    "Q6_K": (("ql", 0, 128), ("qh", 128, 64), ("sc", 192, 16), ("d", 208, 2)),  # 210 bytes
    "Q5_K": (("d", 0, 2), ("m", 2, 2), ("s", 4, 12), ("qh", 16, 32), ("qs", 48, 128)),  # 176 bytes
}
_BLOCK_WEIGHTS = {"Q6_K": 256, "Q5_K": 256}  # weights per block where not QK
_FIELD_DTYPES = {"d": "<f2", "m": "<f2", "sc": "i1"}  # the rest are bytes (Q8_0's qs: int8)

_TOP = {"token_embd.weight": "tok_embeddings", "output_norm.weight": "norm", "output.weight": "output"}
_LAYER = {
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "attn_q": "attn.wq",
    "attn_k": "attn.wk",
    "attn_v": "attn.wv",
    "attn_output": "attn.wo",
    "ffn_gate_inp": "moe.gate",
}
_FFN = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}  # llama.cpp gate/up/down = w1/w3/w2
_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+?)(?:_exps|\.(\d+))?\.weight$")


@dataclass(frozen=True)
class GGUFTensorRef:
    """Where one canonical tensor lives in the GGUF."""

    gguf_name: str
    index: int  # position in its shard's reader.tensors
    ggml_type: str  # e.g. "Q4_1"
    shape: tuple[int, ...]  # our logical shape: [N, K] or [K]
    expert: int | None  # slice of a stacked [E, N, ...] tensor, else None
    unpermute_heads: int | None  # heads whose rotary row permutation to undo (q/k), else None
    shard: int = 0  # which file of a split GGUF holds it (0 for a single file)


def reverse_permute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation: ``w_hf = w_gguf[order]``.

    llama.cpp writes ``w.reshape(n_head, 2, HD // 2, K).swapaxes(1, 2)``: within each head it
    interleaves the first and second halves of the rotary pairs; this gathers them back."""
    hd = n_rows // n_head
    if n_rows % n_head or hd % 2:
        raise CheckpointError(
            f"cannot undo the rotary permutation of {n_rows} rows over {n_head} heads",
            "the GGUF's head counts do not fit its attention tensors; use an unmodified GGUF",
        )
    return np.arange(n_rows).reshape(n_head, hd // 2, 2).swapaxes(1, 2).reshape(n_rows)  # [N]


def split_blocks(data: np.ndarray, ggml_type: str, k: int) -> dict[str, np.ndarray]:
    """GGUF rows of interleaved blocks [N, NB * block_bytes] uint8 -> our parts (copies, no bit
    changed): qs [N, K/2] u1 (q4) or [N, K] i1 (q8_0), d [N, NB] <f2, m [N, NB] <f2 (q4_1);
    for Q6_K / Q5_K the parts of quant.formats' q6_k / q5_k (NB = K / 256 super-blocks)."""
    fields = _BLOCK_FIELDS[ggml_type]
    n, nb = data.shape[0], k // _BLOCK_WEIGHTS.get(ggml_type, QK)
    bpb = sum(f[2] for f in fields)
    blocks = np.ascontiguousarray(data).reshape(n, nb, bpb)  # [N, NB, block bytes]
    parts: dict[str, np.ndarray] = {}
    for field, off, length in fields:
        raw = np.ascontiguousarray(blocks[:, :, off : off + length]).reshape(n, nb * length)  # [N, NB * length]
        dtype = "i1" if (ggml_type, field) == ("Q8_0", "qs") else _FIELD_DTYPES.get(field, "u1")
        parts[field] = raw.view(dtype)  # d, m: [N, NB] <f2
    return parts


def split_q4_k(data: np.ndarray, k: int) -> dict[str, np.ndarray] | None:
    """GGUF Q4_K rows [N, K/256 * 144] uint8 -> our q4_k parts (quant.formats), the same values:
    qs [N, K/2], s [N, 2*NB], d, m [N, NS] with D = 64 d, Dm = 64 dmin (a power of two: exact in
    fp16). None when some 64 d or 64 dmin is not a finite fp16 (the caller re-quantizes).

    The 6-bit codes of the 8 sub-blocks are packed in 12 bytes (``quant.q4.unpack_k_scales``).
    The nibbles come per 64 weights as 32 bytes, weights 0-31 in the
    low nibbles and 32-63 in the high; ours are per 32 weights, byte j = w[j] | w[j+16] << 4."""
    n, ns = data.shape[0], k // 256
    blocks = np.ascontiguousarray(data).reshape(n, ns, Q4_K_BYTES)  # [N, NS, 144]
    sup = blocks[:, :, 0:4].copy().view("<f2")  # [N, NS, 2]: d, dmin
    with np.errstate(over="ignore", invalid="ignore"):
        big = sup * np.float16(64.0)  # exact unless it overflows
    if not np.isfinite(big).all():
        return None
    sc, mn = unpack_k_scales(blocks[:, :, 4:16])  # [N, NS, 8] each
    nib = blocks[:, :, 16:].reshape(n, ns, 4, 1, 32)  # per 64 weights: 32 bytes
    w = np.concatenate([nib & 0x0F, nib >> 4], axis=3).reshape(n, ns * 8, 32)  # [N, NB, 32] values 0..15
    return {
        "qs": (w[:, :, :16] | (w[:, :, 16:] << 4)).reshape(n, k // 2),
        "s": np.stack([sc, mn], axis=3).reshape(n, 2 * ns * 8),
        "d": np.ascontiguousarray(big[:, :, 0]),
        "m": np.ascontiguousarray(big[:, :, 1]),
    }


def _field_value(field: Any) -> Any:
    value = field.contents()
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


class GGUFCheckpoint:
    """An opened, validated GGUF (one file, or the shards of a split one); tensors by canonical name."""

    def __init__(
        self,
        path: Path,
        readers: list[Any],
        metadata: dict[str, Any],
        hf_config: dict[str, Any],
        config: ModelConfig,
        tensors: dict[str, GGUFTensorRef],
    ):
        self.path = path
        self.readers = readers  # one per shard; the first holds the metadata
        self.reader = readers[0]
        self.metadata = metadata  # every key except the big token arrays, as Python values
        self.hf_config = hf_config
        self.config = config
        self.tensors = tensors  # canonical name -> GGUFTensorRef, in tensor_names order
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self._fds = [os.open(r.data.filename, os.O_RDONLY) for r in readers]  # pread: see the module docstring

    # -- facts ------------------------------------------------------------------------------
    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value (token lists included), or ``default`` when absent."""
        f = self.reader.fields.get(key)
        return default if f is None else _field_value(f)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def nbytes(self, name: str) -> int:
        """Bytes the tensor (or its expert's slice) takes in the GGUF."""
        ref = self.tensors[name]
        t = self.readers[ref.shard].tensors[ref.index]
        return int(t.n_bytes) // (int(t.data.shape[0]) if ref.expert is not None else 1)

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.tensors)

    @property
    def dtype(self) -> str:
        """The GGUF type carrying the most bytes (what the manifest records as the source dtype)."""
        by: dict[str, int] = {}
        for name, ref in self.tensors.items():
            by[ref.ggml_type] = by.get(ref.ggml_type, 0) + self.nbytes(name)
        return max(by, key=by.get)

    # -- data -------------------------------------------------------------------------------
    def _raw(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The stored array, read from the file into memory (never through the map): [N, bytes]
        uint8 for block types, [N, K] float for F16/F32 (a vector is [K] or [bytes]); with
        ``start``/``stop`` only those rows of a matrix."""
        ref = self.tensors[name]
        t = self.readers[ref.shard].tensors[ref.index]
        shape, offset, nbytes = tuple(int(x) for x in t.data.shape), int(t.data_offset), int(t.n_bytes)
        if ref.expert is not None:  # [E, N, ...]: one expert's slice
            nbytes //= shape[0]
            offset += ref.expert * nbytes
            shape = shape[1:]
        if start or stop is not None:
            stop = shape[0] if stop is None else stop
            row = nbytes // shape[0]
            offset, nbytes, shape = offset + start * row, (stop - start) * row, (stop - start, *shape[1:])
        buf = np.empty(nbytes, dtype=np.uint8)
        done, fd = 0, self._fds[ref.shard]
        with memoryview(buf) as view:
            while done < nbytes:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise CheckpointError(f"{self.path} ended inside tensor {ref.gguf_name}", DOWNLOAD_HINT)
                done += n
        return buf.view(t.data.dtype).reshape(shape)

    def _order(self, name: str) -> np.ndarray | None:
        ref = self.tensors[name]
        if ref.unpermute_heads is None:
            return None
        key = (ref.shape[0], ref.unpermute_heads)
        if key not in self._orders:
            self._orders[key] = reverse_permute_rows(*key)
        return self._orders[key]

    def exact_parts(self, name: str) -> tuple[str, dict[str, np.ndarray]] | None:
        """(our type, parts) when our format holds this tensor's values exactly, else None.
        q/k come back with their rows un-permuted (whole blocks move, no value changes)."""
        ref = self.tensors[name]
        ours = EXACT_TYPES.get(ref.ggml_type)
        if ours is None or (
            len(ref.shape) == 2
            and ref.ggml_type in _BLOCK_FIELDS
            and ref.shape[1] % _BLOCK_WEIGHTS.get(ref.ggml_type, QK)
        ):
            return None
        raw = self._raw(name)
        order = self._order(name)
        if ref.ggml_type == "Q4_K":
            if len(ref.shape) != 2:
                return None
            parts = split_q4_k(raw[order] if order is not None else raw, ref.shape[1])
            return (ours, parts) if parts is not None else None
        if len(ref.shape) == 1:
            if ref.ggml_type in _BLOCK_FIELDS:
                return ours, {k: v[0] for k, v in split_blocks(raw.reshape(1, -1), ref.ggml_type, ref.shape[0]).items()}
            return ours, {"w": np.ascontiguousarray(raw, dtype="<f4" if ours == "f32" else "<f2")}
        rows = raw[order] if order is not None else raw  # [N, ...] in transformers' row order
        if ref.ggml_type in _BLOCK_FIELDS:
            return ours, split_blocks(rows, ref.ggml_type, ref.shape[1])
        return ours, {"w": np.ascontiguousarray(rows, dtype="<f4" if ours == "f32" else "<f2")}

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) dequantized to float32 [stop-start, K] (a vector is one row),
        in transformers' row order (q/k un-permuted)."""
        import gguf

        ref = self.tensors[name]
        order = self._order(name)
        if len(ref.shape) == 1:
            sel = self._raw(name).reshape(1, -1)
        elif order is not None:  # q/k: scattered rows, and small tensors: read whole, then pick
            sel = self._raw(name)[order[start:stop]]
        else:
            sel = self._raw(name, start, stop)  # [rows, bytes or K]
        qtype = gguf.GGMLQuantizationType[ref.ggml_type]
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F64):
            return np.asarray(sel, dtype=np.float32)
        out = gguf.quants.dequantize(np.ascontiguousarray(sel), qtype)
        return np.asarray(out, dtype=np.float32).reshape(stop - start, ref.shape[-1])

    def read(self, name: str) -> np.ndarray:
        """A whole tensor as float32 in its own shape (small tensors and tests)."""
        ref = self.tensors[name]
        n = ref.shape[0] if len(ref.shape) == 2 else 1
        return self.rows(name, 0, n).reshape(ref.shape)

    def close(self) -> None:
        """Close our descriptors and drop the maps (numpy closes one once no view remains)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self.reader = None
        self.readers = []

    def __enter__(self) -> GGUFCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_reader(path: Path) -> Any:
    import gguf

    try:  # counts and lengths against the file size, before the reader trusts them
        check_gguf_header(path)
    except FormatError as exc:
        raise CheckpointError(exc.message, exc.hint) from None
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...: all mean "bad file"
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise CheckpointError(
                f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
                "pass a llama.cpp .gguf file, or a Hugging Face checkpoint directory",
            ) from None
        raise CheckpointError(
            f"{path} is not a valid GGUF file ({detail}); it may be truncated", DOWNLOAD_HINT
        ) from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {t.name} ends at byte {end} but the file has {size}", DOWNLOAD_HINT
            )
    return reader


def _metadata(reader: Any) -> dict[str, Any]:
    big = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    return {k: _field_value(f) for k, f in reader.fields.items() if k not in big and not k.startswith("GGUF.")}


def hf_config_from_metadata(meta: dict[str, Any], n_vocab: int, tied: bool) -> dict[str, Any]:
    """A Hugging Face config.json dict from llama.cpp's metadata keys (``llama.*``)."""
    arch = meta.get("general.architecture")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    for key in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count"):
        if get(key) is None:
            raise CheckpointError(f"GGUF metadata lacks {arch}.{key}", DOWNLOAD_HINT)
    d, h = int(get("embedding_length")), int(get("attention.head_count"))
    experts = int(get("expert_count", 0) or 0)
    hf: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if experts > 1 else "LlamaForCausalLM"],
        "hidden_size": d,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": h,
        "num_key_value_heads": int(get("attention.head_count_kv", h)),
        "head_dim": int(get("attention.key_length", d // h)),
        "vocab_size": int(n_vocab),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if experts > 1:
        hf["num_local_experts"] = experts
        hf["num_experts_per_tok"] = int(get("expert_used_count", 2))
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none", "linear") or (
        scaling == "linear" and float(get("rope.scaling.factor", 1.0)) != 1.0
    ):
        hf["rope_scaling"] = {"rope_type": scaling, "factor": get("rope.scaling.factor")}
    rot = get("rope.dimension_count")
    if rot is not None and int(rot) != hf["head_dim"]:
        raise CheckpointError(
            f"GGUF rotates {rot} of {hf['head_dim']} head dimensions (partial rotary embeddings)",
            "mixcli supports full rotary embeddings only (Llama, Mistral, Mixtral)",
        )
    return hf


def canonical_gguf_name(gguf_name: str, n_experts: int) -> list[tuple[str, int | None]] | None:
    """(canonical name, expert slice) pairs one GGUF tensor provides, None for unknown names."""
    if gguf_name in _TOP:
        return [(_TOP[gguf_name], None)]
    m = _BLK_RE.match(gguf_name)
    if not m:
        return None
    layer, kind, expert = m.group(1), m.group(2), m.group(3)
    p = f"layers.{layer}."
    stacked = gguf_name.endswith("_exps.weight")
    if kind in _LAYER and not stacked and expert is None:
        return [(p + _LAYER[kind], None)]
    if kind in _FFN:
        w = _FFN[kind]
        if stacked:
            return [(f"{p}experts.{e}.{w}", e) for e in range(n_experts)]
        if expert is not None:  # older Mixtral GGUFs: one tensor per expert, blk.N.ffn_gate.E
            return [(f"{p}experts.{int(expert)}.{w}", None)]
        return [(f"{p}experts.0.{w}", None)]  # dense Llama: the MLP is expert 0
    return None


def open_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Validate a GGUF file and index its tensors; raise CheckpointError on bad input."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"GGUF file {path} does not exist", "check the path")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file", "pass the .gguf file itself")
    paths = shard_paths(path)
    readers = [_open_reader(p) for p in paths]
    reader = readers[0]
    if len(readers) > 1:
        _check_shards(paths, readers)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise CheckpointError(
            f"GGUF architecture {arch or '(none given)'!s} is not supported",
            "mixcli reads llama-architecture GGUFs (Llama, Mistral, Mixtral)",
        )
    by_name: dict[str, tuple[int, int, Any]] = {}  # name -> (shard, index, tensor)
    for shard, r in enumerate(readers):
        for i, t in enumerate(r.tensors):
            if t.name in by_name:
                raise CheckpointError(f"tensor {t.name} appears twice in {path.name}'s shards", DOWNLOAD_HINT)
            by_name[t.name] = (shard, i, t)
    if "token_embd.weight" not in by_name:
        raise CheckpointError(f"{path} has no token_embd.weight tensor", "use an unmodified llama.cpp GGUF")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = int(by_name["token_embd.weight"][2].shape[1])  # ne = [D, V]
    if tokens is not None and len(tokens.data) > n_vocab:
        raise CheckpointError(
            f"GGUF tokenizer has {len(tokens.data)} tokens but the embedding only {n_vocab} rows", DOWNLOAD_HINT
        )
    hf = hf_config_from_metadata(meta, n_vocab, tied="output.weight" not in by_name)
    try:
        config = ModelConfig.from_hf(hf)
    except CheckpointError as exc:
        raise CheckpointError(str(exc.message).replace("config.json", "GGUF metadata"), exc.hint) from None

    import gguf

    found: dict[str, GGUFTensorRef] = {}
    for gname, (shard, index, t) in by_name.items():
        targets = canonical_gguf_name(gname, config.num_local_experts)
        if targets is None:
            raise CheckpointError(
                f"unexpected tensor {gname} in {path.name}: not part of the llama layout mixcli reads",
                "mixcli imports Llama, Mistral and Mixtral GGUFs without extras (rope_freqs, biases, ...)",
            )
        ttype = t.tensor_type.name
        if ttype not in EXACT_TYPES and ttype != "F64" and t.tensor_type not in gguf.quants._type_traits:
            raise CheckpointError(
                f"tensor {gname} has GGUF type {ttype}, which mixcli cannot decode",
                "use a GGUF quantized to F16, Q8_0, Q4_0, Q4_1 or a K-quant",
            )
        stacked = targets[0][1] is not None
        ne = [int(x) for x in t.shape]  # GGUF order: ne[0] = K
        if stacked and (len(ne) != 3 or ne[2] != config.num_local_experts):
            raise CheckpointError(
                f"tensor {gname} has shape {ne[::-1]} but the metadata implies {config.num_local_experts} experts",
                "use GGUF metadata and weights from the same model",
            )
        shape = tuple(reversed(ne[:2])) if stacked else tuple(reversed(ne))
        for cname, expert in targets:
            if cname in found:
                raise CheckpointError(f"tensor {gname} provides {cname} a second time", DOWNLOAD_HINT)
            heads = None
            if cname.endswith("attn.wq"):
                heads = config.num_attention_heads
            elif cname.endswith("attn.wk"):
                heads = config.num_key_value_heads
            found[cname] = GGUFTensorRef(gname, index, ttype, shape, expert, heads, shard)

    names = tensor_names(config.num_hidden_layers, config.num_local_experts, config.moe, config.tie_word_embeddings)
    missing, extra = tensor_set_difference(names, found)
    if missing:
        raise CheckpointError(
            f"{path.name} lacks {len(missing)} tensor(s) its metadata implies, first {missing[0]}",
            "use an unmodified, complete llama.cpp GGUF",
        )
    if extra:
        raise CheckpointError(
            f"tensor {found[extra[0]].gguf_name} does not fit the GGUF metadata (it implies no {extra[0]})",
            "use GGUF metadata and weights from the same model",
        )
    for n in names:
        want, ref = expected_shape(config, n), found[n]
        if ref.shape != want:
            raise CheckpointError(
                f"tensor {ref.gguf_name} has shape {list(ref.shape)} but the GGUF metadata implies {list(want)}",
                "use GGUF metadata and weights from the same model",
            )
    return GGUFCheckpoint(paths[0], readers, meta, hf, config, {n: found[n] for n in names})


def shard_paths(path: Path) -> list[Path]:
    """The files of the GGUF ``path`` names: itself, or every shard of a split GGUF (whichever
    shard was named), in order; a missing shard is an error that names it."""
    m = SHARD_RE.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    if count < 1:
        raise CheckpointError(f"{path.name} says it is one of {count} shards", DOWNLOAD_HINT)
    ext = path.name[-5:]  # ".gguf" as spelled
    paths = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}{ext}") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"{path.name} is one of {count} shards of a split GGUF, and {missing[0]} is missing"
            + (f" ({len(missing)} missing)" if len(missing) > 1 else ""),
            f"download all {count} files into {path.parent}",
        )
    return paths


def _check_shards(paths: list[Path], readers: list[Any]) -> None:
    """Each shard says it is shard i of n (llama.cpp's split.* keys) and they agree on the total."""
    total = None
    for i, (p, r) in enumerate(zip(paths, readers)):
        no, count = _field_int(r, "split.no"), _field_int(r, "split.count")
        if no != i or count != len(paths):
            raise CheckpointError(
                f"{p.name} is not shard {i + 1} of {len(paths)} (its split metadata says "
                f"{'none' if no is None else f'{no + 1} of {count}'})",
                "download the shards again from one repo and revision",
            )
        total = _field_int(r, "split.tensors.count") if total is None else total
    held = sum(len(r.tensors) for r in readers)
    if total is not None and held != total:
        raise CheckpointError(
            f"the {len(paths)} shards of {paths[0].name} hold {held} tensors, they say {total}",
            "download the shards again from one repo and revision",
        )


def _field_int(reader: Any, key: str) -> int | None:
    f = reader.fields.get(key)
    return None if f is None else int(_field_value(f))

"""Read a Hugging Face checkpoint directory: config.json plus safetensors shards.

What the ``safetensors`` library does for us: ``safe_open`` is the second, thorough check of
every shard's structure (overlapping or uncovered data regions, bad dtypes). What is ours, and why:

- the safetensors numpy API cannot return bf16 (numpy has no bf16 dtype), and Mixtral ships bf16;
- its errors do not say which file is truncated by how much, which the user needs to fix it;
- reading speed. Memory-mapping the shards was the first design, but page faults on a cold map
  read well below ``cat`` speed while ``pread`` in row chunks reaches it (benchmarks/RESULTS.md,
  "The converter"), and a thread can read the next chunks while the quantizer works (see
  ``HFCheckpoint.plan``). Each chunk buffer is dropped once quantized, so resident memory stays
  at a few chunks however large the checkpoint.

So we parse the header ourselves (8-byte little-endian length, JSON, then data) and check the
file size against the largest ``data_offsets`` before reading. A bf16 tensor comes out as its
uint16 bit patterns (the f32 value is those bits shifted left by 16); the writer's quantizer
decodes them on the fly. Pickle checkpoints (``*.bin``, ``*.pt``) are refused, never unpickled:
loading a pickle runs arbitrary code.
"""

from __future__ import annotations

import json
import os
import queue
import re
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quant.config import ModelConfig
from quant.errors import CheckpointError
from quant.floats import to_float32
from quant.formats import expected_shape, tensor_names, tensor_set_difference
from quant.memory import available_memory

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
DOWNLOAD_HINT = "download the file again from the model's Hugging Face repo"
# Chunks read ahead of the quantizer (a few MB each): the disk and the quantizer overlap.
READAHEAD_CHUNKS = 8
# Before the quantizer is ready (numba's import and JIT-cache load, ~0.5 s) a thread asks the kernel
# to read the first bytes of the checkpoint into the page cache (POSIX_FADV_WILLNEED: no copy into
# our memory, which on the 2-core target is CPU the conversion needs), so the disk is not idle while
# numba loads. At most WARM_LIMIT bytes, never more than a quarter of the available memory, and
# paced at WARM_RATE so it does not queue far more than the disk reads in that time.
WARM_LIMIT = 2 << 30
WARM_STEP = 8 << 20
WARM_RATE = 2e9  # bytes/s: about the 2-core target VM's cold sequential read speed

# safetensors dtype -> (our name, numpy dtype of the stored bits)
DTYPES = {"BF16": ("bf16", np.dtype("<u2")), "F16": ("f16", np.dtype("<f2")), "F32": ("f32", np.dtype("<f4"))}

# Hugging Face name -> canonical name (quant.formats.tensor_names)
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.weight": "attn.wq",
    "self_attn.k_proj.weight": "attn.wk",
    "self_attn.v_proj.weight": "attn.wv",
    "self_attn.o_proj.weight": "attn.wo",
    "block_sparse_moe.gate.weight": "moe.gate",
    # dense Llama / Mistral: the MLP is expert 0, always on
    "mlp.gate_proj.weight": "experts.0.w1",
    "mlp.up_proj.weight": "experts.0.w3",
    "mlp.down_proj.weight": "experts.0.w2",
}
_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings", "model.norm.weight": "norm", "lm_head.weight": "output"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
# buffers some exporters save that carry no weights
_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class TensorInfo:
    """Where one source tensor's bytes are: ``nbytes`` at absolute ``start`` in ``file``."""

    hf_name: str
    file: Path
    dtype: str  # "bf16" | "f16" | "f32"
    shape: tuple[int, ...]
    start: int
    nbytes: int


def canonical_name(hf_name: str) -> str | None:
    """Map a Hugging Face tensor name to ours, or None when we do not know it."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    m = _LAYER_RE.match(hf_name)
    if not m:
        return None
    layer, rest = m.group(1), m.group(2)
    if rest in _LAYER_NAMES:
        return f"layers.{layer}.{_LAYER_NAMES[rest]}"
    e = _EXPERT_RE.match(rest)
    if e:
        return f"layers.{layer}.experts.{e.group(1)}.{e.group(2)}"
    return None


def _read_header(file: Path) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header; return (tensor entries, absolute data start)."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file} is truncated ({size} bytes, not even a safetensors header)", DOWNLOAD_HINT)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{file} has a corrupt safetensors header (header length {n} does not fit the {size}-byte file)",
                DOWNLOAD_HINT,
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} has a corrupt safetensors header (not JSON: {exc})", DOWNLOAD_HINT) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a corrupt safetensors header (not a JSON object)", DOWNLOAD_HINT)
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_end = 0
    for name, entry in header.items():
        try:
            dtype, shape, (b, e) = entry["dtype"], [int(s) for s in entry["shape"]], entry["data_offsets"]
            b, e = int(b), int(e)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{file} has a corrupt safetensors header (bad entry for {name})", DOWNLOAD_HINT
            ) from None
        if dtype in DTYPES and (e - b != int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1].itemsize or b < 0):
            raise CheckpointError(
                f"{file} has a corrupt safetensors header ({name}: data_offsets [{b}, {e}] do not fit shape {shape} {dtype})",
                DOWNLOAD_HINT,
            )
        data_end = max(data_end, e)
    if data_start + data_end > size:
        raise CheckpointError(
            f"{file} is truncated: its header describes {data_start + data_end} bytes but the file has {size}",
            DOWNLOAD_HINT,
        )
    _library_check(file)
    return header, data_start


def _library_check(file: Path) -> None:
    """Let the safetensors library vet the structure (overlaps, gaps, trailing bytes) too."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            f.keys()
    except SafetensorError as exc:
        raise CheckpointError(f"{file} is not a valid safetensors file ({exc})", DOWNLOAD_HINT) from None


def _load_json(file: Path, what: str) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{what} {file} is not valid JSON ({exc.msg} at line {exc.lineno})",
            "download it again from the model's Hugging Face repo",
        ) from None
    except UnicodeDecodeError:
        raise CheckpointError(
            f"{what} {file} is not UTF-8 text", "download it again from the model's Hugging Face repo"
        ) from None


def _shard_files(path: Path) -> list[Path]:
    """The safetensors files to read, from the index when there is one."""
    index = path / INDEX_NAME
    if index.exists():
        data = _load_json(index, "index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map", "download it again from the model's Hugging Face repo")
        shards = sorted(set(map(str, weight_map.values())))
        for shard in shards:
            if Path(shard).name != shard or shard in (".", ".."):
                raise CheckpointError(
                    f"{index} names a shard outside the directory: {shard!r}",
                    "use the index file that came with the checkpoint",
                )
            if not (path / shard).is_file():
                raise CheckpointError(
                    f"shard {shard} named in {INDEX_NAME} is missing from {path}",
                    "download the missing shard (all files of the model repo)",
                )
        return [path / s for s in shards]
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles[:3])}), which mixcli never loads",
            "download the model's *.safetensors files instead, or convert them to safetensors "
            "with transformers' save_pretrained(safe_serialization=True) somewhere you trust",
        )
    raise CheckpointError(f"no *.safetensors weights in {path}", "download the model's safetensors shards into it")


class _ReadAhead:
    """Reads planned chunks on a thread into a short queue; ``take`` hands them out in order."""

    def __init__(self, read: Any, chunks: list[tuple[str, int, int]]):
        self._q: queue.Queue = queue.Queue(maxsize=READAHEAD_CHUNKS)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(read, chunks), name="mixcli-readahead", daemon=True)
        self._thread.start()

    def _run(self, read: Any, chunks: list[tuple[str, int, int]]) -> None:
        for key in chunks:
            try:
                item = (key, read(*key))
            except BaseException as exc:  # re-raised in the consumer
                item = (key, exc)
            while not self._stopped.is_set():
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stopped.is_set() or isinstance(item[1], BaseException):
                return
        self._q.put((None, None))

    def take(self) -> tuple[Any, Any]:
        return self._q.get()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


class _Warmer:
    """Asks the kernel to read ahead (name order, front to back) and keeps nothing: the pages stay
    in the page cache for the real reader."""

    def __init__(self, tensors: list[TensorInfo], limit: int):
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(tensors, limit), name="mixcli-warm", daemon=True)
        self._thread.start()

    def _run(self, tensors: list[TensorInfo], limit: int) -> None:
        fds: dict[Path, int] = {}  # its own descriptors: the checkpoint's belong to the reader
        done = 0
        t0 = time.monotonic()
        try:
            for t in tensors:
                fd = fds.get(t.file)
                if fd is None:
                    fd = fds[t.file] = os.open(t.file, os.O_RDONLY)
                off, end = t.start, t.start + t.nbytes
                while off < end and done < limit:
                    n = min(WARM_STEP, end - off)
                    os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
                    off += n
                    done += n
                    # pace: wait until the disk could have read what was asked (or we are stopped)
                    if self._stopped.wait(max(0.0, done / WARM_RATE - (time.monotonic() - t0))):
                        return
                if done >= limit:
                    return
        except OSError:
            return  # only a hint: the real reader reports any problem with the file
        finally:
            for fd in fds.values():
                os.close(fd)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


class HFCheckpoint:
    """An opened, validated checkpoint; tensors by canonical name, read a row chunk at a time."""

    def __init__(self, path: Path, hf_config: dict[str, Any], config: ModelConfig, tensors: dict[str, TensorInfo]):
        self.path = path
        self.hf_config = hf_config
        self.config = config
        self.tensors = tensors  # canonical name -> TensorInfo, in tensor_names order
        self._fds: dict[Path, int] = {}
        self._readahead: _ReadAhead | None = None
        self._warmer: _Warmer | None = None

    # -- facts ------------------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        """The source dtype carrying the most bytes (what the manifest records)."""
        by: dict[str, int] = {}
        for t in self.tensors.values():
            by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        return max(by, key=by.get)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    # -- data -------------------------------------------------------------------------------
    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        t = self.tensors[name]
        k = t.shape[-1]
        n = t.shape[0] if len(t.shape) == 2 else 1
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows {start}:{stop} of {name} with {n} rows")
        dt = DTYPES[{"bf16": "BF16", "f16": "F16", "f32": "F32"}[t.dtype]][1]
        arr = np.empty((stop - start, k), dtype=dt)  # [rows, K]
        if (
            arr.nbytes
            and os.preadv(self._fd(t.file), [memoryview(arr).cast("B")], t.start + start * k * dt.itemsize)
            != arr.nbytes
        ):
            raise CheckpointError(f"{t.file} shrank while being read ({t.hf_name})", DOWNLOAD_HINT)
        return arr

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor as stored: [stop-start, K] uint16 bf16 bits, float16
        or float32 (a vector is one row of K). Served from the read-ahead when it is the next
        planned chunk, else read now."""
        ahead = self._readahead
        if ahead is not None:
            key, arr = ahead.take()
            if key == (name, start, stop):
                if isinstance(arr, BaseException):
                    raise arr
                return arr
            self._stop_readahead()  # off plan: fall back to plain reads
        return self._read(name, start, stop)

    def warm(self) -> None:
        """Start pulling the checkpoint into the page cache, front to back, until ``plan`` (or
        ``close``) is called: for the time between opening and the quantizer being ready."""
        if self._warmer is None:
            avail = available_memory()
            limit = WARM_LIMIT if avail is None else min(WARM_LIMIT, avail // 4)
            self._warmer = _Warmer(list(self.tensors.values()), limit)

    def _stop_warming(self) -> None:
        if self._warmer is not None:
            self._warmer.stop()
            self._warmer = None

    def plan(self, chunks: list[tuple[str, int, int]]) -> None:
        """Declare the (name, start, stop) row chunks ``rows`` will be asked for, in order; a
        thread reads them ahead (pread releases the GIL) so the disk works while we quantize."""
        self._stop_warming()
        self._stop_readahead()
        self._readahead = _ReadAhead(self._read, chunks)

    def _stop_readahead(self) -> None:
        if self._readahead is not None:
            self._readahead.stop()
            self._readahead = None

    def read(self, name: str) -> np.ndarray:
        """A whole tensor as float32 in its own shape (small tensors and tests)."""
        t = self.tensors[name]
        n = t.shape[0] if len(t.shape) == 2 else 1
        return to_float32(self._read(name, 0, n)).reshape(t.shape)

    def close(self) -> None:
        self._stop_warming()
        self._stop_readahead()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_hf_checkpoint(path: str | os.PathLike) -> HFCheckpoint:
    """Validate a checkpoint directory and index its tensors; raise CheckpointError on bad input."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint directory {path} does not exist", "check the path, or download the model first"
        )
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not a directory", "pass the directory that holds config.json and the *.safetensors files"
        )
    if not any(path.iterdir()):
        raise CheckpointError(
            f"checkpoint directory {path} is empty",
            "download the model's files into it (config.json, *.safetensors, tokenizer files)",
        )
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"no config.json in {path}", "download the complete checkpoint, config.json included")
    hf = _load_json(cfg_file, "config")
    if not isinstance(hf, dict):
        raise CheckpointError(
            f"config {cfg_file} is not a JSON object", "download it again from the model's Hugging Face repo"
        )
    config = ModelConfig.from_hf(hf)

    found: dict[str, TensorInfo] = {}
    for file in _shard_files(path):
        header, data_start = _read_header(file)
        for hf_name, entry in header.items():
            name = canonical_name(hf_name)
            if name is None:
                if _IGNORED_RE.search(hf_name):
                    continue
                raise CheckpointError(
                    f"unexpected tensor {hf_name} in {file.name}: not part of the {config.architecture} layout mixcli reads",
                    "use an unmodified Hugging Face checkpoint of a supported architecture",
                )
            if name == "output" and config.tie_word_embeddings:
                continue  # tied: the head is the embedding; a stored copy is ignored
            if name in found:
                raise CheckpointError(
                    f"tensor {hf_name} appears twice ({found[name].file.name} and {file.name})", DOWNLOAD_HINT
                )
            if entry["dtype"] not in DTYPES:
                raise CheckpointError(
                    f"tensor {hf_name} has dtype {entry['dtype']}; mixcli reads BF16, F16 and F32",
                    "use the original floating-point checkpoint",
                )
            b, e = (int(x) for x in entry["data_offsets"])
            found[name] = TensorInfo(
                hf_name, file, DTYPES[entry["dtype"]][0], tuple(int(s) for s in entry["shape"]), data_start + b, e - b
            )

    names = tensor_names(config.num_hidden_layers, config.num_local_experts, config.moe, config.tie_word_embeddings)
    missing, extra = tensor_set_difference(names, found)
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {len(missing)} tensor(s) the config implies, first {missing[0]}",
            "download every shard, and the config.json of the same model",
        )
    if extra:
        t = found[extra[0]]
        raise CheckpointError(
            f"tensor {t.hf_name} does not fit config.json (it implies no {extra[0]})",
            "use the config.json that came with these weights",
        )
    for n in names:
        want, t = expected_shape(config, n), found[n]
        if t.shape != want:
            raise CheckpointError(
                f"tensor {t.hf_name} has shape {list(t.shape)} but config.json implies {list(want)}",
                "use weights and config.json from the same model",
            )
    return HFCheckpoint(path, hf, config, {n: found[n] for n in names})

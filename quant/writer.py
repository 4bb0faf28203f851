"""Write a converted model directory: page-aligned data files, then manifest.json last.

The writer is independent of where tensors come from (a safetensors directory or a GGUF file):
``add_tensor`` quantizes a source a row chunk at a time, so peak memory is one chunk
plus whatever the source maps; ``add_tensor_parts`` takes already-quantized parts (an exact GGUF
import). Bytes go out through a background thread that writes and hashes them (both release the
GIL), so the disk, sha256 and the quantizer run at the same time; it also starts the disk writing
as it goes (``WRITEBACK_STEP``), so the closing fsync has almost nothing left to wait for. With 4+
cores a second thread quantizes half of each chunk (``QUANT_THREADS``).

``verify_model_dir`` checks a directory with ``quant.formats.check_manifest``, the same check
the runtime's loader makes, plus every tensor's sha256 (``quant.integrity``).

Dimension letters: N rows, K columns (reduction axis), NB = K / 32 blocks per row.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import fastquant, q4
from .errors import CheckpointError
from .floats import to_float32
from .formats import (
    DATA_FILE_PATTERN,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PART_ALIGN,
    QK,
    QUANT_TYPES,
    ROW_TILE,
    TENSOR_ALIGN,
    FormatError,
    align,
    base_type,
    check_manifest,
    expert_region_name,
    interleave_rows,
)
from .integrity import verify_tensors, write_stamp

FILE_LIMIT = 16 << 30  # start a new data file past this size (an expert region never splits)
# Weights per row chunk (the quantizer works a row at a time, so this is no cache size): 8 MB of
# bf16 a read. Fewer, larger reads and hand-offs let the reader work further ahead; past 4M a
# chunk the conversion got no faster while the reader's queue (8 chunks) grows the peak RSS
# (benchmarks/RESULTS.md, "The converter").
CHUNK_WEIGHTS = 1 << 22
_QUEUE_DEPTH = 8  # chunks in flight to the writer thread
# The sink asks the kernel to start writing a data file every this many bytes. Without it the whole
# output stays dirty in the page cache (the kernel's background writeback waits for 10% of RAM)
# and ``finish``'s fsync writes it all at the end, after the reading is done instead of beside it.
WRITEBACK_STEP = 64 << 20
# Threads that quantize a chunk (this one and a pool's; see ModelWriter._encode), and the chunk size
# below which one thread does it alone. Two only with 4+ cores: on the 2-core target the reader's
# copy out of the page cache is the critical path and a second quantizer takes CPU from it (slower
# there: benchmarks/RESULTS.md, "The converter"). With cores to spare, one quantizer would limit a
# fast disk (expected, not measured: no such machine was at hand).
QUANT_THREADS = 2 if (os.cpu_count() or 1) >= 4 else 1
SPLIT_WEIGHTS = 1 << 16


_RAW_DTYPES = {"bf16": np.uint16, "f16": np.float16, "f32": np.float32}  # how each source dtype arrives


def warm_quantizers(kinds: set[tuple[str, str]]) -> None:
    """Quantize one tiny chunk per (source dtype, storage type): numba loads each kernel from its
    cache now (0.1-0.2 s), while the checkpoint is still being read ahead, instead of inside the
    first real chunk."""
    for dtype, qtype in sorted(kinds):
        rows = QUANT_TYPES[qtype].rows
        encode_chunk(np.zeros((rows, QK), _RAW_DTYPES[dtype]), qtype)


def encode_chunk(
    raw: np.ndarray, qtype: str, scratch: np.ndarray | None = None
) -> tuple[dict[str, np.ndarray], float, np.ndarray | None]:
    """Source rows [N, K] (float32, float16, or uint16 bf16 bits) -> (parts, max |dequant - x|,
    x as float32 when it holds NaN/inf else None). ``scratch`` (flat uint32) may hold the
    decoded rows; the returned parts never alias it."""
    base, tile = base_type(qtype), QUANT_TYPES[qtype].rows
    n, k = raw.shape
    if base in fastquant.FAST_TYPES and k % QK == 0 and n % tile == 0:
        # a row-tiled type comes out of the kernel already tiled (re-laying costs as much as quantizing)
        parts, err, nbad, _ = fastquant.quantize_chunk(raw, base, tile=tile, keep_x=False)
        return parts, err, (fastquant.decode(raw, scratch) if nbad else None)
    if base != qtype:  # row-tiled: the base type's blocks, re-laid (rows: a multiple of 16)
        parts, err, bad = encode_chunk(raw, base, scratch)
        return (interleave_rows(parts, base) if bad is None else parts), err, bad
    x = to_float32(raw)  # [N, K]
    if not np.isfinite(x).all():
        return {}, 0.0, x
    parts = q4.quantize(x, qtype)
    err = float(np.abs(q4.dequantize(parts, qtype) - x).max()) if x.size and qtype != "f32" else 0.0
    return parts, err, None


class _Sink(threading.Thread):
    """Writes queued buffers to their file and feeds the tensor's hasher, in order."""

    def __init__(self, write: Callable[[Any, memoryview], None]):
        super().__init__(name="mixcli-writer", daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)
        self.error: BaseException | None = None
        self._write = write

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain, so the producer never blocks on a dead sink
            fh, buf, hasher = item
            try:
                self._write(fh, buf)
                if hasher is not None:
                    hasher.update(buf)
            except BaseException as exc:  # handed to the producer thread
                self.error = exc


class ModelWriter:
    """Writes tensors into ``out_dir``; ``finish`` writes manifest.json and returns it."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        file_limit: int = FILE_LIMIT,
        chunk_weights: int = CHUNK_WEIGHTS,
        quant_threads: int | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.file_limit = file_limit
        self.chunk_weights = chunk_weights
        self.tensors: dict[str, dict[str, Any]] = {}
        self.experts: dict[str, dict[str, Any]] = {}
        self.files: list[dict[str, Any]] = []
        self.max_abs_err = 0.0
        self.max_err_tensor: str | None = None
        self._hashers: dict[str, Any] = {}
        # the second quantizer thread (see _encode), by default only with 4+ cores (QUANT_THREADS)
        threads = QUANT_THREADS if quant_threads is None else quant_threads
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "mixcli-quant") if threads > 1 else None
        self._fh = None
        self._pos = 0
        self._expert: dict[str, Any] | None = None
        self._t0 = time.perf_counter()
        self._writeback: dict[Any, tuple[int, int]] = {}  # file name -> offsets (see _start_writeback)
        self._sink = _Sink(self._write_raw)
        self._sink.start()
        self._closed = False
        self._new_file()

    # -- bytes out ----------------------------------------------------------------------------
    def _write_raw(self, fh: Any, buf: memoryview) -> None:
        """The one place bytes reach the disk (runs on the sink thread)."""
        while len(buf):  # an unbuffered write may take less than all
            buf = buf[fh.write(buf) :]
        self._start_writeback(fh)

    def _start_writeback(self, fh: Any) -> None:
        """Every WRITEBACK_STEP bytes, have the kernel start writing this file's new bytes to disk
        (asynchronously: POSIX_FADV_DONTNEED starts writeback of dirty pages and drops clean ones),
        over the range from the previous call on, so the pages it sent then, written by now, leave
        the page cache too. Runs on the sink thread."""
        end = fh.tell()
        start, prev = self._writeback.get(fh.name, (0, 0))  # not yet sent from ``start``; sent last from ``prev``
        if end - start >= WRITEBACK_STEP and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fh.fileno(), prev, end - prev, os.POSIX_FADV_DONTNEED)
            self._writeback[fh.name] = (end, start)

    def _emit(self, data: np.ndarray | bytes, hasher: Any = None) -> None:
        if self._sink.error is not None:
            raise self._sink.error
        buf = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        if len(buf):
            self._sink.q.put((self._fh, buf, hasher))
            self._pos += len(buf)

    def _pad_to(self, offset: int, hasher: Any = None) -> None:
        if offset > self._pos:
            self._emit(bytes(offset - self._pos), hasher)

    def _new_file(self) -> None:
        if self._fh is not None:
            self._sink.q.put((self._fh, memoryview(b""), None))
            self.files[-1]["size"] = self._pos
        name = DATA_FILE_PATTERN.format(len(self.files))
        self._fh = open(self.out_dir / name, "wb", buffering=0)
        self.files.append({"name": name, "size": 0})
        self._pos = 0

    def _start_tensor(
        self, name: str, qtype: str, shape: tuple[int, ...]
    ) -> tuple[int, dict[str, dict[str, Any]], int]:
        """Reserve space for a tensor: (offset, part layout, nbytes); rolls to a new file if needed."""
        if self._closed:
            raise RuntimeError("writer already finished")
        if name in self.tensors:
            raise ValueError(f"tensor {name} written twice")
        if len(shape) not in (1, 2):
            raise ValueError(f"tensor {name}: shape {shape} is not a vector or a matrix")
        qt = QUANT_TYPES[qtype]
        n, k = (shape[0], shape[1]) if len(shape) == 2 else (0, shape[0])
        if k % qt.block:
            raise ValueError(f"tensor {name}: K={k} is not a multiple of the {qtype} block ({qt.block})")
        layout, rel = {}, 0
        for part, (pshape, dtype) in qt.part_shapes(n, k).items():
            rel = align(rel, PART_ALIGN)
            layout[part] = {"offset": rel, "shape": list(pshape), "dtype": dtype}
            rel += int(np.prod(pshape)) * np.dtype(dtype).itemsize
        offset = align(self._pos, TENSOR_ALIGN)
        region_open = self._expert is not None and self._expert["offset"] is not None
        if offset + rel > self.file_limit and self._pos > 0 and not region_open:
            self._new_file()
            offset = 0
        self._pad_to(offset)
        for p in layout.values():
            p["offset"] += offset
        if self._expert is not None:
            if self._expert["offset"] is None:
                self._expert["offset"] = offset
                self._expert["file"] = self.files[-1]["name"]
            self._expert["tensors"].append(name)
        return offset, layout, rel

    def _record(
        self,
        name: str,
        qtype: str,
        shape: tuple[int, ...],
        offset: int,
        layout: dict,
        nbytes: int,
        hasher: Any,
        err: float | None,
    ) -> dict[str, Any]:
        entry = {
            "type": qtype,
            "shape": list(shape),
            "file": self.files[-1]["name"],
            "offset": offset,
            "nbytes": nbytes,
            "sha256": None,
            "parts": layout,
            "max_abs_err": err,
        }
        self.tensors[name] = entry
        self._hashers[name] = hasher
        if err is not None and err > self.max_abs_err:
            self.max_abs_err, self.max_err_tensor = err, name
        return entry

    # -- public API ---------------------------------------------------------------------------
    def row_step(self, k: int) -> int:
        """Rows per chunk that ``add_tensor`` asks ``rows`` for, for a tensor K wide: a multiple of
        ROW_TILE, so a row-tiled tensor's chunks are whole tiles."""
        return max(1, self.chunk_weights // max(k, 1) // ROW_TILE) * ROW_TILE

    def add_tensor(
        self,
        name: str,
        qtype: str,
        shape: tuple[int, ...],
        rows: Callable[[int, int], np.ndarray],
        *,
        release: Callable[[int, int], None] | None = None,
        progress: Callable[[int, int], None] | None = None,
        label: str | None = None,
    ) -> dict[str, Any]:
        """Quantize and write a tensor a row chunk at a time.

        ``rows(a, b)`` returns source rows [a, b) as [b-a, K] float32 / float16 / uint16 (bf16
        bits); a vector of K is one row. ``release(a, b)`` is called once those rows are consumed
        (a memory-mapped source drops its pages); ``progress(rows_done, rows_total)`` after each
        chunk. ``label`` names the tensor in errors (e.g. its source name)."""
        shape = tuple(int(s) for s in shape)
        offset, layout, nbytes = self._start_tensor(name, qtype, shape)
        nrows, k = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
        step = self.row_step(k)
        parts = list(layout)
        held: dict[str, list[np.ndarray]] = {p: [] for p in parts[1:]}  # small parts: written after the first
        hasher = hashlib.sha256()
        err = 0.0
        for a in range(0, nrows, step):
            b = min(nrows, a + step)
            raw = rows(a, b)
            if raw.shape != (b - a, k):
                raise ValueError(f"rows({a}, {b}) of {name} gave shape {raw.shape}, expected {(b - a, k)}")
            for r0, chunk, chunk_err, bad in self._encode(raw, qtype):
                if bad is not None:
                    raise _nonfinite_error(label or name, bad, a + r0)
                if not np.isfinite(chunk_err):
                    raise CheckpointError(
                        f"tensor {label or name} has values beyond what {qtype}'s fp16 scales can hold (|w| > 65504)",
                        "convert with --quant q8_0 or q4_0, which keep such weights finite, or check the checkpoint",
                    )
                err = max(err, chunk_err)
                self._emit(chunk[parts[0]], hasher)  # [rows, ...] first part streams in row order
                for p in parts[1:]:
                    held[p].append(chunk[p])
            if release is not None:
                release(a, b)
            if progress is not None:
                progress(b, nrows)
        for p in parts[1:]:
            self._pad_to(layout[p]["offset"], hasher)
            for c in held[p]:
                self._emit(c, hasher)
        return self._record(name, qtype, shape, offset, layout, nbytes, hasher, err)

    def _encode(self, raw: np.ndarray, qtype: str) -> list[tuple[int, dict[str, np.ndarray], float, np.ndarray | None]]:
        """A row chunk raw [N, K] -> its pieces (first row, parts, max error, x or None; see
        ``encode_chunk``) in row order: two halves quantized at once, on this thread and the
        pool's, when the chunk is large enough to pay for the hand-off (the kernels release the
        GIL). The pool's error, if any, is raised here; both halves are done when this returns."""
        n = raw.shape[0]
        tile = QUANT_TYPES[qtype].rows
        h = n // 2 // tile * tile  # rows of the first half: whole tiles
        if self._pool is None or h == 0 or raw.size < SPLIT_WEIGHTS:
            return [(0, *encode_chunk(raw, qtype))]
        second = self._pool.submit(encode_chunk, raw[h:], qtype)  # raw[h:] [N-h, K]
        try:
            first = encode_chunk(raw[:h], qtype)  # [h, K]
        finally:
            concurrent.futures.wait([second])  # never leave the pool working on a chunk we dropped
        return [(0, *first), (h, *second.result())]

    def add_tensor_parts(
        self,
        name: str,
        qtype: str,
        shape: tuple[int, ...],
        parts: dict[str, np.ndarray],
        max_abs_err: float | None = None,
        label: str | None = None,
    ) -> dict[str, Any]:
        """Write an already-quantized tensor (e.g. GGUF Q4_0 blocks split into qs and d); NaN or inf
        in a float part is refused as at quantization. ``label`` names the tensor in errors."""
        shape = tuple(int(s) for s in shape)
        offset, layout, nbytes = self._start_tensor(name, qtype, shape)
        if set(parts) != set(layout):
            raise ValueError(f"tensor {name}: parts {sorted(parts)} but {qtype} needs {sorted(layout)}")
        hasher = hashlib.sha256()
        for p, spec in layout.items():
            arr = np.asarray(parts[p])
            if list(arr.shape) != spec["shape"] or arr.dtype != np.dtype(spec["dtype"]):
                raise ValueError(
                    f"tensor {name} part {p}: {arr.shape} {arr.dtype}, expected {spec['shape']} {spec['dtype']}"
                )
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # weights, scales, mins: copied, not quantized
                raise CheckpointError(
                    f"tensor {label or name} has {int((~np.isfinite(arr)).sum())} NaN or inf value(s) in its "
                    f"{'weights' if p == 'w' else 'block scales' if p == 'd' else 'block offsets'}",
                    "the file is corrupt or from a diverged training run; download it again or use another one",
                )
            self._pad_to(spec["offset"], hasher)
            self._emit(arr, hasher)
        return self._record(name, qtype, shape, offset, layout, nbytes, hasher, max_abs_err)

    def begin_expert(self, layer: int, expert: int, nbytes: int | None = None) -> None:
        """The next three tensors (w1, w3, w2) form one contiguous region; ``nbytes``, when
        known, lets the writer start a new data file first instead of splitting the region."""
        if self._expert is not None:
            raise RuntimeError("begin_expert inside another expert region")
        if nbytes is not None and self._pos > 0 and align(self._pos, TENSOR_ALIGN) + nbytes > self.file_limit:
            self._new_file()
        self._expert = {"name": expert_region_name(layer, expert), "offset": None, "file": None, "tensors": []}

    def end_expert(self) -> None:
        region, self._expert = self._expert, None
        if region is None:
            raise RuntimeError("end_expert without begin_expert")
        want = [f"{region['name']}.{w}" for w in ("w1", "w3", "w2")]
        if region["tensors"] != want:
            raise ValueError(f"expert region {region['name']} holds {region['tensors']}, expected {want}")
        last = self.tensors[want[-1]]
        self.experts[region["name"]] = {
            "file": region["file"],
            "offset": region["offset"],
            "nbytes": last["offset"] + last["nbytes"] - region["offset"],
        }

    def _drain(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._sink.is_alive():
            self._sink.q.put(None)
            self._sink.join()
        if self._fh is not None:
            self.files[-1]["size"] = self._pos
            self._fh.close()
            self._fh = None

    def finish(
        self,
        config: Any,
        quant: dict[str, Any],
        tokenizer: dict[str, Any] | None,
        source: dict[str, Any],
        extra: dict[str, Any] | None = None,
        *,
        fsync: bool = True,
    ) -> dict[str, Any]:
        """Flush data, then write manifest.json (last, so its presence means complete)."""
        if self._expert is not None:
            raise RuntimeError(f"expert region {self._expert['name']} not ended")
        self._drain()
        self._closed = True
        if self._sink.error is not None:
            raise self._sink.error
        if fsync:
            for f in self.files:
                with open(self.out_dir / f["name"], "rb+") as fh:
                    os.fsync(fh.fileno())
        for name, h in self._hashers.items():
            self.tensors[name]["sha256"] = h.hexdigest()
        params = sum(int(np.prod(t["shape"])) for t in self.tensors.values())
        nbytes = sum(t["nbytes"] for t in self.tensors.values())
        if is_dataclass(config):
            config = asdict(config)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": config,
            "quant": quant,
            "tokenizer": tokenizer,
            "source": source,
            "files": self.files,
            "tensors": self.tensors,
            "experts": self.experts,
            "stats": {
                "params": params,
                "bytes": nbytes,
                "bits_per_weight": nbytes * 8 / params if params else 0.0,
                "seconds": time.perf_counter() - self._t0,
                "max_abs_err": self.max_abs_err,
                "max_err_tensor": self.max_err_tensor,
            },
        }
        for key, value in (extra or {}).items():
            if key in manifest:
                raise ValueError(f"extra manifest key {key!r} would overwrite a schema field")
            manifest[key] = value
        path = self.out_dir / MANIFEST_NAME
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.write("\n")
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        write_stamp(self.out_dir, manifest)  # the hashes are of the bytes just written: no need to re-read them
        return manifest

    def abort(self) -> None:
        """Stop the sink and close files; the caller removes the directory."""
        self._closed = True
        self._drain()

    def __enter__(self) -> ModelWriter:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None or not self._closed:
            self.abort()


def _nonfinite_error(name: str, x: np.ndarray, row0: int) -> CheckpointError:
    """x [N, K] float32 with at least one NaN/inf: name the tensor and the first bad element."""
    nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
    r, c = (int(v) for v in np.argwhere(~np.isfinite(x))[0])
    kinds = " and ".join(s for s, n in ((f"{nan} NaN", nan), (f"{inf} inf", inf)) if n)
    return CheckpointError(
        f"tensor {name} contains {kinds} value(s) in rows {row0}..{row0 + x.shape[0] - 1} (first at row {row0 + r}, column {c})",
        "the checkpoint is corrupt or from a diverged training run; download it again or use another checkpoint",
    )


# ------------------------------------------------------------------------------------------------
# Checking a converted directory
# ------------------------------------------------------------------------------------------------
def verify_model_dir(model_dir: str | Path, check_sha: bool = True) -> dict[str, Any]:
    """Check a converted model directory against every manifest rule (``formats.check_manifest``)
    and, with ``check_sha``, every tensor's sha256; return the manifest. Raises FormatError."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise FormatError(f"{model_dir} has no {MANIFEST_NAME}", "convert a checkpoint with `mixcli convert` first")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        check_manifest(m, lambda name: _size_or_none(model_dir / name))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(
            f"{model_dir} is not a valid mixcli model: {MANIFEST_NAME} is not valid JSON ({exc})"
        ) from None
    except FormatError as exc:
        raise FormatError(f"{model_dir} is not a valid mixcli model: {exc.message}", exc.hint) from None
    if check_sha:
        bad = verify_tensors(m, lambda name: _map_read_only(model_dir / name))
        if bad:
            raise FormatError(
                f"{model_dir} is not a valid mixcli model: tensor {bad[0]} fails its sha256 check "
                f"(the file is damaged{f'; {len(bad) - 1} more tensors too' if len(bad) > 1 else ''})"
            )
    return m


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _map_read_only(path: Path) -> np.ndarray:
    with open(path, "rb") as fh:
        return np.frombuffer(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)  # [size]


def read_tensor_parts(model_dir: str | Path, manifest: dict[str, Any], name: str) -> dict[str, np.ndarray]:
    """Memory-mapped views of one tensor's parts (shapes per formats.QuantType.part_shapes)."""
    t = manifest["tensors"][name]
    path = Path(model_dir) / t["file"]
    return {
        p: np.memmap(path, dtype=np.dtype(spec["dtype"]), mode="r", offset=spec["offset"], shape=tuple(spec["shape"]))
        for p, spec in t["parts"].items()
    }

"""Open a converted model directory: validate its manifest, bring in its data files, build views.

Each tensor part is a read-only numpy view into one buffer per data file. The buffer is either

* the file read into private anonymous memory (``load="memory"``), or
* a read-only memory map of the file (``load="mmap"``): opening even a 26 GB model costs
  milliseconds and the OS (or the expert cache) decides which pages ever reach memory.

Why read at all: decode streams every weight once per token, and from anonymous memory on huge
pages (``hugepages.py``) it runs faster than from the page cache's pages of the same file
(``python benchmarks/load_mode.py``; figures in benchmarks/RESULTS.md, "Load modes"). The cost is
start-up and memory that stays resident, and start-up is worst on a VM that hands free memory back
to its host, where fresh huge pages fault in on the host. So ``load="auto"`` reads a model only when
it fits comfortably in the available memory (AUTO_MEMORY_FRACTION) and is at most AUTO_MAX_BYTES,
whose read takes seconds at worst; a bigger model would cost more start-up than a one-shot
``mixcli generate`` wins back. It is mapped instead (and ``--max-memory`` brings in the expert
cache); ``--no-mmap`` reads it anyway, for long chat sessions.
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quant import formats

from . import hugepages
from .config import ModelConfig
from .errors import MixcliError, ModelFormatError
from .memsize import available_memory, format_size


@dataclass
class QTensor:
    """One weight as stored: its type, logical shape and the parts the kernels take."""

    name: str
    qtype: str
    shape: tuple[int, ...]  # [N, K] or [K]
    parts: dict[str, np.ndarray]  # views into the mapped file, e.g. qs [N, K/2] u1, d [N, K/32] f2
    file: str
    offset: int
    nbytes: int

    def dequantize(self) -> np.ndarray:
        from quant.q4 import dequantize

        return dequantize(self.parts, self.qtype)


@dataclass
class ExpertRegion:
    file: str
    offset: int
    nbytes: int


@dataclass
class ModelStore:
    path: Path
    manifest: dict
    config: ModelConfig
    tensors: dict[str, QTensor]
    experts: dict[tuple[int, int], ExpertRegion]
    maps: dict[str, np.ndarray] = field(repr=False)  # file name -> uint8 [size] read-only buffer
    load: str = "mmap"  # how the buffers were filled: "memory" (read) or "mmap" (mapped)

    def tensor(self, name: str) -> QTensor:
        return self.tensors[name]

    @property
    def tokenizer_info(self) -> dict | None:
        return self.manifest.get("tokenizer")


def _bad(path: Path, what: str) -> ModelFormatError:
    return ModelFormatError(
        f"{path} is not a usable converted model: {what}",
        "re-run `mixcli convert` on the source checkpoint",
    )


def read_manifest(path: Path) -> dict:
    mpath = path / formats.MANIFEST_NAME
    if not path.exists():
        raise ModelFormatError(f"model directory {path} does not exist", "check the path or run `mixcli models`")
    if not mpath.is_file():
        raise ModelFormatError(
            f"{path} is not a converted model (no {formats.MANIFEST_NAME})",
            f"convert a checkpoint first: mixcli convert SRC -o {path}",
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise _bad(path, f"manifest.json unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != formats.FORMAT_NAME:
        raise _bad(path, "manifest.json is not a mixcli manifest")
    if manifest.get("version") not in formats.READABLE_VERSIONS:
        raise ModelFormatError(
            f"{path} has format version {manifest.get('version')}, this mixcli reads versions "
            f"{', '.join(map(str, formats.READABLE_VERSIONS))}",
            "re-convert the model with this version of mixcli",
        )
    return manifest


LOAD_MODES = ("auto", "memory", "mmap")
AUTO_MEMORY_FRACTION = 0.6  # "auto" reads a model into memory when it needs at most this much of what is available
AUTO_MAX_BYTES = 4 << 30  # ... and at most this much (start-up cost, see the module docstring)
READ_CHUNK = 64 << 20


def resolve_load_mode(load: str, total_bytes: int, budget: int | None = None) -> str:
    """ "memory" or "mmap" for a model of ``total_bytes``. "auto" reads a model of at most
    AUTO_MAX_BYTES that fits the --max-memory ``budget`` when one is given, else takes at most
    AUTO_MEMORY_FRACTION of the available memory (leaving the rest to the KV cache, the page cache
    and other programs)."""
    if load not in LOAD_MODES:
        raise ValueError(f"load must be one of {LOAD_MODES}, got {load!r}")
    if load != "auto":
        return load
    if total_bytes > AUTO_MAX_BYTES:
        return "mmap"
    if budget is not None:
        return "memory" if total_bytes <= budget else "mmap"
    avail = available_memory()
    return "memory" if avail is not None and total_bytes <= AUTO_MEMORY_FRACTION * avail else "mmap"


def _map_file(fpath: Path) -> np.ndarray:
    with open(fpath, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=np.uint8)  # [size], read-only, zero-copy


def _read_file(fpath: Path, size: int) -> np.ndarray:
    """The file's ``size`` bytes in a private anonymous mapping, read sequentially, returned as a
    read-only uint8 [size] view (read-only like a map, so the kernels see the same array type)."""
    # huge pages where the kernel gives them, faulted in up front in the kernel (hugepages.py): far
    # fewer faults than one by one during the read, and decode streams faster
    try:
        buf = hugepages.anonymous(size, populate=True)
    except (OSError, MemoryError, OverflowError) as exc:
        raise MixcliError(
            f"cannot hold the model's {format_size(size)} data file {fpath.name} in memory ({exc})",
            "pass --mmap to map it instead",
        ) from None
    view = memoryview(buf)
    try:
        with open(fpath, "rb", buffering=0) as fh:
            done = 0
            while done < size:
                n = fh.readinto(view[done : min(size, done + READ_CHUNK)])
                if not n:
                    raise ModelFormatError(
                        f"data file {fpath} ended after {done} of {size} bytes while being read",
                        "re-run `mixcli convert` on the source checkpoint",
                    )
                done += n
    except OSError as exc:
        raise ModelFormatError(
            f"cannot read data file {fpath}: {exc.strerror or exc}", "check the disk, or re-run `mixcli convert`"
        ) from None
    finally:
        view.release()
    arr = np.frombuffer(buf, dtype=np.uint8)
    arr.flags.writeable = False
    return arr


def model_bytes(path: str | Path) -> int:
    """The size of a converted model's data files, as its manifest records them."""
    try:
        return sum(int(f["size"]) for f in read_manifest(Path(path))["files"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(Path(path), f"manifest.json is incomplete ({exc})") from None


def _file_size(path: Path, name: str) -> int | None:
    try:
        return (path / name).stat().st_size if (path / name).is_file() else None
    except OSError:
        return None


def open_model_dir(
    path: str | Path, load: str = "mmap", budget: int | None = None, verify: bool = True, notify=None
) -> ModelStore:
    """Validate a converted model (``quant.formats.check_manifest``: nothing reaches a kernel
    unchecked), map or read its data files (``load``: "mmap", "memory" or "auto", see
    ``resolve_load_mode``) and, with ``verify``, check every tensor's sha256 unless the files are
    unchanged since they last passed (``quant.integrity``). ``notify`` hears about a long check."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        formats.check_manifest(manifest, lambda name: _file_size(path, name))
    except formats.FormatError as exc:
        raise ModelFormatError(f"{path} is not a usable converted model: {exc.message}", exc.hint) from None
    config = ModelConfig.from_dict(manifest["config"])
    files = {f["name"]: f["size"] for f in manifest["files"]}
    table = manifest["tensors"]

    mode = resolve_load_mode(load, sum(files.values()), budget)
    maps: dict[str, np.ndarray] = {}
    for name, size in files.items():
        maps[name] = (
            np.zeros(0, dtype=np.uint8)
            if size == 0
            else (_read_file(path / name, size) if mode == "memory" else _map_file(path / name))
        )
    if verify:
        verify_model(path, manifest, maps, notify)

    tensors: dict[str, QTensor] = {}
    for name, t in table.items():  # every field below was checked by check_manifest
        buf, parts = maps[t["file"]], {}
        for pname, p in t["parts"].items():
            dt = np.dtype(p["dtype"])
            nb = int(np.prod(p["shape"])) * dt.itemsize
            parts[pname] = buf[p["offset"] : p["offset"] + nb].view(dt).reshape(p["shape"])
        tensors[name] = QTensor(name, t["type"], tuple(t["shape"]), parts, t["file"], t["offset"], t["nbytes"])
    experts = {
        (layer, e): ExpertRegion(**manifest["experts"][formats.expert_region_name(layer, e)])
        for layer in range(config.num_hidden_layers)
        for e in range(config.num_local_experts)
    }
    return ModelStore(path, manifest, config, tensors, experts, maps, load=mode)


VERIFY_NOTICE_BYTES = 1 << 30  # say so on stderr when a check will read more than this


def verify_model(path: Path, manifest: dict, maps: dict[str, np.ndarray], notify=None, *, force: bool = False) -> None:
    """Hash every tensor unless the stamp says the files are unchanged since they last passed
    (``force``: hash anyway); refuse the model naming the first damaged tensor; stamp it on success."""
    from quant import integrity

    if not force and integrity.stamp_matches(path, manifest):
        return
    total = sum(int(f["size"]) for f in manifest["files"])
    if notify is not None and total >= VERIFY_NOTICE_BYTES:
        notify(
            f"checking the sha256 of {format_size(total)} of weights in {path.name} (once after a change; "
            "--no-verify skips it)"
        )
    bad = integrity.verify_tensors(manifest, maps.__getitem__)
    if bad:
        integrity.remove_stamp(path)
        more = f"; {len(bad) - 1} more tensors too" if len(bad) > 1 else ""
        raise ModelFormatError(
            f"{path}: tensor {bad[0]} fails its sha256 check (the data file is damaged{more})",
            "run `mixcli verify` for the full list; convert or pull the model again",
        )
    integrity.write_stamp(path, manifest)

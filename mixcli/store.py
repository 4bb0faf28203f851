"""Open a converted model directory: validate its manifest, map its data files, build views.

Nothing is read here but the manifest: each tensor part is a numpy view into a read-only memory
map, so opening even a 26 GB model costs milliseconds and the OS (or the expert cache) decides
which pages ever reach memory.
"""
from __future__ import annotations

import json
import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quant import formats

from .config import ModelConfig
from .errors import ModelFormatError


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
    maps: dict[str, np.ndarray] = field(repr=False)  # file name -> uint8 [size] memory map

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


def open_model_dir(path: str | Path) -> ModelStore:
    """Validate and map a converted model (see the manifest rules at the end of quant/formats.py)."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        config = ModelConfig.from_dict(manifest["config"])
        files = {f["name"]: int(f["size"]) for f in manifest["files"]}
        table = manifest["tensors"]
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(path, f"manifest.json is incomplete ({exc})") from None

    maps: dict[str, np.ndarray] = {}
    for name, size in files.items():
        if not formats.DATA_FILE_RE.match(name):
            raise _bad(path, f"data file name {name!r} is not allowed (it could leave the model directory)")
        fpath = path / name
        if not fpath.is_file():
            raise _bad(path, f"data file {name} is missing")
        actual = fpath.stat().st_size
        if actual != size:
            raise _bad(path, f"data file {name} is {actual} bytes, the manifest says {size} (truncated?)")
        if size == 0:
            maps[name] = np.zeros(0, dtype=np.uint8)
            continue
        with open(fpath, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        maps[name] = np.frombuffer(mm, dtype=np.uint8)  # [size], read-only, zero-copy

    tensors: dict[str, QTensor] = {}
    for name, t in table.items():
        try:
            qtype = formats.QUANT_TYPES[t["type"]]
            shape = tuple(int(s) for s in t["shape"])
            fname = t["file"]
            if fname not in maps:
                raise _bad(path, f"tensor {name} names an unknown data file {fname!r}")
            if t["offset"] % formats.TENSOR_ALIGN:
                raise _bad(path, f"tensor {name} is not page-aligned")
            n, k = (shape if len(shape) == 2 else (0, shape[0]))
            if qtype.rows > 1 and (len(shape) != 2 or n % qtype.rows):
                raise _bad(path, f"tensor {name} of type {qtype.name} needs a multiple of {qtype.rows} rows, has shape {list(shape)}")
            expected = qtype.part_shapes(n, k)
            if set(expected) != set(t["parts"]):
                raise _bad(path, f"tensor {name} has parts {sorted(t['parts'])}, type {qtype.name} needs {sorted(expected)}")
            parts = {}
            buf = maps[fname]
            for pname, (pshape, pdtype) in expected.items():
                p = t["parts"][pname]
                dt = np.dtype(pdtype)
                if tuple(p["shape"]) != tuple(pshape) or np.dtype(p["dtype"]) != dt:
                    raise _bad(path, f"tensor {name} part {pname} has shape {p['shape']}, expected {list(pshape)}")
                off = int(p["offset"])
                nb = int(np.prod(pshape)) * dt.itemsize
                if off % formats.PART_ALIGN or off < 0 or off + nb > buf.size:
                    raise _bad(path, f"tensor {name} part {pname} lies outside its data file")
                parts[pname] = buf[off : off + nb].view(dt).reshape(pshape)
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad(path, f"tensor {name} entry is malformed ({exc})") from None
        tensors[name] = QTensor(name, qtype.name, shape, parts, fname, int(t["offset"]), int(t["nbytes"]))

    want = formats.tensor_names(
        config.num_hidden_layers, config.num_local_experts, config.moe, config.tie_word_embeddings
    )
    missing = [n for n in want if n not in tensors]
    if missing:
        raise _bad(path, f"{len(missing)} tensors missing, e.g. {missing[0]}")

    experts: dict[tuple[int, int], ExpertRegion] = {}
    for layer in range(config.num_hidden_layers):
        for e in range(config.num_local_experts):
            key = formats.expert_region_name(layer, e)
            r = manifest.get("experts", {}).get(key)
            if r is None:
                raise _bad(path, f"expert region {key} is missing")
            experts[(layer, e)] = ExpertRegion(r["file"], int(r["offset"]), int(r["nbytes"]))
    return ModelStore(path, manifest, config, tensors, experts, maps)

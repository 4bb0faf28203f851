"""Check a GGUF file's header against its size before ``gguf.GGUFReader`` sees it.

The reader trusts every count and length in the header: a corrupt array count or string length
makes it allocate and loop for as long as the number says (the fuzzer's 4-byte flips made it
allocate gigabytes). This walks the same structure (magic, version, tensor and key-value counts, each key,
value and array, each tensor's dimensions, type and offset) with every count and length bounded
by the bytes that remain in the file, so a damaged header is refused in milliseconds with one line
naming the field. It also checks the types of the metadata values mixcli reads (a string where a
count belongs would otherwise surface as a TypeError deep in the import).

Layout (GGUF v2 and v3, little- or big-endian as llama.cpp writes it): "GGUF", u32 version,
u64 n_tensors, u64 n_kv; n_kv x (string key, u32 value type, value); n_tensors x (string name,
u32 n_dims, n_dims x u64 ne, u32 ggml type, u64 offset); padding to ``general.alignment``; data.
A string is u64 length + bytes; an array is u32 element type, u64 count, elements.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

from quant.formats import CONFIG_LIMIT, FormatError

HINT = "download the .gguf file again (it is damaged or incomplete)"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 2  # arrays of arrays (llama.cpp writes none; allow one level for other tools)
# value type -> struct code of a scalar (STRING = 8 and ARRAY = 9 are walked separately)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_INTS, _FLOATS = {0, 1, 2, 3, 4, 5, 10, 11}, {6, 12}
# metadata mixcli reads (with "{arch}." expanded): what kind of value each must be
_KEYS = {
    "general.architecture": "str",
    "general.alignment": "int",
    "{arch}.embedding_length": "int",
    "{arch}.block_count": "int",
    "{arch}.feed_forward_length": "int",
    "{arch}.attention.head_count": "int",
    "{arch}.attention.head_count_kv": "int",
    "{arch}.attention.key_length": "int",
    "{arch}.context_length": "int",
    "{arch}.expert_count": "int",
    "{arch}.expert_used_count": "int",
    "{arch}.rope.dimension_count": "int",
    "{arch}.attention.layer_norm_rms_epsilon": "float",
    "{arch}.rope.freq_base": "float",
    "{arch}.rope.scaling.factor": "float",
    "{arch}.rope.scaling.type": "str",
    "{arch}.vocab_size": "int",
    "tokenizer.ggml.model": "str",
    "tokenizer.ggml.pre": "str",
    "tokenizer.ggml.bos_token_id": "int",
    "tokenizer.ggml.eos_token_id": "int",
    "tokenizer.ggml.unknown_token_id": "int",
    "tokenizer.ggml.padding_token_id": "int",
    "tokenizer.ggml.add_bos_token": "bool",
    "tokenizer.ggml.add_eos_token": "bool",
    "tokenizer.ggml.tokens": "str[]",
    "tokenizer.ggml.merges": "str[]",
    "tokenizer.ggml.scores": "float[]",
    "tokenizer.ggml.token_type": "int[]",
    "tokenizer.chat_template": "str",
}


# metadata that sizes the model: 1..CONFIG_LIMIT (a 0 here divided by zero in the reader's arithmetic)
_POSITIVE = (
    "{arch}.embedding_length",
    "{arch}.block_count",
    "{arch}.feed_forward_length",
    "{arch}.attention.head_count",
    "{arch}.attention.head_count_kv",
    "{arch}.attention.key_length",
    "{arch}.context_length",
    "{arch}.rope.dimension_count",
    "{arch}.vocab_size",
)


class _Walker:
    def __init__(self, path: Path, buf, order: str):
        self.path, self.buf, self.order, self.pos = path, buf, order, 0

    def fail(self, what: str) -> FormatError:
        return FormatError(f"{self.path} is not a valid GGUF file: {_printable(what)}", HINT)

    def take(self, code: str, what: str):
        size = struct.calcsize(code)
        if self.pos + size > len(self.buf):
            raise self.fail(f"{what} at byte {self.pos} lies past the end of the file ({len(self.buf)} bytes)")
        (v,) = struct.unpack_from(self.order + code, self.buf, self.pos)
        self.pos += size
        return v

    def skip(self, count: int, size: int, what: str) -> None:
        """Skip ``count`` items of ``size`` bytes, refusing a count the rest of the file cannot hold."""
        left = len(self.buf) - self.pos
        if count * size > left:
            raise self.fail(f"{what} claims {count} x {size} bytes, but only {left} bytes remain")
        self.pos += count * size

    def string(self, what: str) -> str:
        n = self.take("Q", f"{what} length")
        start, left = self.pos, len(self.buf) - self.pos
        if n > left:
            raise self.fail(f"{what} is {n} bytes long, but only {left} bytes remain")
        self.pos += n
        raw = bytes(self.buf[start : self.pos])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8 (byte {exc.start} of {raw[:40]!r})") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        """Walk one value; return it for scalars and strings, (element type, count) for arrays."""
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype], what)
        if vtype == 8:
            return self.string(what)
        if vtype != 9:
            raise self.fail(f"{what} has value type {vtype}, which GGUF does not define")
        etype, count = self.take("I", f"{what} element type"), self.take("Q", f"{what} element count")
        if etype in _SCALARS:
            self.skip(count, struct.calcsize(_SCALARS[etype]), f"array {what}")
        elif etype == 8:
            self.skip(count, 8, f"array {what}")  # each string is at least its 8-byte length
            self.pos -= count * 8
            for i in range(count):
                self.string(f"{what}[{i}]")
        elif etype == 9 and depth < MAX_NESTING:
            self.skip(count, 12, f"array {what}")  # each array is at least its type and count
            self.pos -= count * 12
            for i in range(count):
                self.value(9, f"{what}[{i}]", depth + 1)
        else:
            raise self.fail(f"array {what} has element type {etype}, which GGUF does not allow here")
        return (etype, count)


def _printable(text: str, limit: int = 300) -> str:
    """Control characters escaped (a damaged name must not break the one-line message), cut to ``limit``."""
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return out if len(out) <= limit else out[:limit] + "..."


def _name(w: _Walker, raw: str, what: str) -> str:
    """A key or tensor name: printable text (names are ASCII identifiers in every GGUF we read)."""
    if not raw.isprintable() or not raw:
        raise w.fail(f"{what} {_printable(raw, 60)!r} is not a printable name")
    return raw


def _kind_ok(kind: str, vtype: int, v) -> bool:
    if kind.endswith("[]"):
        if vtype != 9:
            return False
        etype = v[0]
        return {"str[]": etype == 8, "float[]": etype in _FLOATS, "int[]": etype in _INTS}[kind]
    if kind == "str":
        return vtype == 8
    if kind == "bool":
        return vtype == 7
    if kind == "int":
        return vtype in _INTS or vtype == 7
    return vtype in _INTS | _FLOATS and math.isfinite(v)


def check_gguf_header(path: str | Path) -> None:
    """Walk ``path``'s GGUF header with every count bounded by the file size; raise FormatError
    naming the first field that cannot be right."""
    path = Path(path)
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size < 24:
            raise FormatError(f"{path} is not a valid GGUF file: {size} bytes cannot hold a GGUF header", HINT)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as buf:
            _check(path, buf)


def _check(path: Path, buf) -> None:
    if bytes(buf[:4]) != b"GGUF":
        return  # not GGUF at all: the reader's own error (which names the magic) says so
    (version,) = struct.unpack_from("<I", buf, 4)
    order = "<" if version & 0xFFFF else ">"  # llama.cpp's big-endian files: the version reads byte-swapped
    w = _Walker(path, buf, order)
    w.pos = 4
    version = w.take("I", "version")
    if version not in (2, 3):
        raise w.fail(f"version {version}; mixcli reads GGUF versions 2 and 3")
    n_tensors, n_kv = w.take("Q", "tensor count"), w.take("Q", "key-value count")
    w.skip(n_kv, 8 + 4 + 1, f"key-value count {n_kv}")  # each pair is at least a key length, a type, a byte
    w.pos -= n_kv * 13
    meta: dict[str, tuple[int, object]] = {}
    for i in range(n_kv):
        key = _name(w, w.string(f"key {i}"), f"key {i}")
        vtype = w.take("I", f"type of {key}")
        meta[key] = (vtype, w.value(vtype, key))
    arch = meta.get("general.architecture", (8, ""))[1]
    arch = arch if isinstance(arch, str) else ""
    for pattern, kind in _KEYS.items():
        key = pattern.format(arch=arch)
        if key in meta and not _kind_ok(kind, *meta[key]):
            vtype, v = meta[key]
            shown = v if vtype != 9 else f"array of type {v[0]}"
            raise w.fail(f"metadata {key} is {shown!r} (value type {vtype}), expected {kind.replace('[]', ' array')}")
    for pattern in _POSITIVE:
        key = pattern.format(arch=arch)
        if key in meta and not 0 < meta[key][1] <= CONFIG_LIMIT:
            raise w.fail(f"metadata {key} is {meta[key][1]}, expected 1..{CONFIG_LIMIT}")
    align = meta.get("general.alignment", (4, 32))[1]
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise w.fail(f"general.alignment is {align!r}, expected a power of two")
    w.skip(n_tensors, 8 + 4 + 4 + 8, f"tensor count {n_tensors}")  # name length, n_dims, type, offset at least
    w.pos -= n_tensors * 24
    tensors = []
    for i in range(n_tensors):
        name = _name(w, w.string(f"tensor {i} name"), f"tensor {i} name")
        n_dims = w.take("I", f"tensor {name} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise w.fail(f"tensor {name} has {n_dims} dimensions (GGUF allows 1..{MAX_DIMS})")
        ne = [w.take("Q", f"tensor {name} dimension {d}") for d in range(n_dims)]
        ttype, offset = w.take("I", f"tensor {name} type"), w.take("Q", f"tensor {name} offset")
        tensors.append((name, ne, ttype, offset))
    data_start = -(-w.pos // align) * align
    _check_tensors(w, tensors, data_start, align)
    # the reader builds name lists of layers x experts: bound both by the tensors that hold them
    layers = meta.get(f"{arch}.block_count", (4, 0))[1]
    if layers * 4 > len(tensors):
        raise w.fail(
            f"metadata {arch}.block_count is {layers}, but {len(tensors)} tensors cannot hold that many layers"
        )
    experts = meta.get(f"{arch}.expert_count", (4, 0))[1]
    stacked = {ne[2] for name, ne, _, _ in tensors if name.endswith("_exps.weight") and len(ne) == 3}
    if experts > 1 and (stacked != {experts} if stacked else experts * 3 > len(tensors)):
        raise w.fail(
            f"metadata {arch}.expert_count is {experts}, which the expert tensors do not hold "
            f"({'stacked by ' + str(sorted(stacked)) if stacked else str(len(tensors)) + ' tensors'})"
        )


def _check_tensors(w: _Walker, tensors: list, data_start: int, align: int) -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = len(w.buf)
    for name, ne, ttype, offset in tensors:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise w.fail(f"tensor {name} has ggml type {ttype}, which gguf does not define") from None
        if any(n <= 0 for n in ne) or ne[0] % block:
            raise w.fail(f"tensor {name} has dimensions {ne} (each > 0, the first a multiple of {block})")
        n_bytes = math.prod(ne) // block * type_size
        if offset % align or data_start + offset + n_bytes > size:
            raise w.fail(
                f"tensor {name} (offset {offset}, {n_bytes} bytes) lies outside the file's "
                f"{size - data_start} bytes of data or off its {align}-byte alignment"
            )

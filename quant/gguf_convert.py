"""Convert a llama.cpp GGUF file into a mixcli model directory.

Where our format holds a GGUF block type exactly (Q4_0, Q4_1, Q8_0, Q6_K, Q5_K, F16, F32 bit for
bit; Q4_K as q4_k, the same values with its codes unpacked), the blocks are re-laid into our parts
without re-quantizing: a Q4_1 GGUF imported with ``quant="keep"`` computes exactly what llama.cpp
computes from it, and so does a Q4_K_M or Q5_K_M file (Q4_K / Q5_K plus Q6_K). Everything else (Q5_0,
Q5_1, Q2_K, Q3_K, the IQ types, BF16, ...) is dequantized by the ``gguf`` package and re-quantized by
our writer; the summary names those tensors (``ConvertSummary.requantized``).

``quant``:
- ``"keep"``: each tensor keeps its GGUF type where we hold it exactly; a type we do not hold
  becomes q8_0 (block types: its error is far below that of any <= 6-bit source) or f16 (float
  types). Norms and the router are always f32 (lossless from F16/F32, and the runtime's choice).
- a preset of ``quant.formats.QUANT_PRESETS``: types by role as for safetensors, copied exactly
  when the GGUF tensor already has that type (``--quant q4_k`` on a Q4_K tensor copies it; on
  any other type it re-quantizes by q4_k's rule).

All-or-nothing like ``quant.convert.convert_checkpoint`` (whose clean-up helpers we share): the
model is written into a hidden ``.<name>.partial-<pid>`` directory beside ``out`` and renamed into
place only when complete; any error or Ctrl-C removes it.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from . import q4
from .convert import (
    ConvertSummary,
    Progress,
    install_model_dir,
    output_lock,
    storage_type,
)
from .errors import ArgumentError, OutputError
from .formats import QK, QUANT_PRESETS, base_type, interleave_rows, role_of, row_tiled
from .gguf_tokenizer import write_tokenizer
from .sources.gguf import EXACT_TYPES, GGUFCheckpoint, open_gguf
from .writer import ModelWriter

KEEP = "keep"
QUANT_CHOICES = (KEEP, *QUANT_PRESETS)
_FLOAT_GGUF_TYPES = ("F32", "F16", "BF16", "F64")


def gguf_storage_type(ckpt: GGUFCheckpoint, name: str, quant: str) -> str:
    """Our storage type for one tensor under ``quant`` (see the module docstring)."""
    ref = ckpt.tensors[name]
    role = role_of(name)
    if role in ("norm", "router"):
        return "f32"
    if quant != KEEP:
        return storage_type(name, ref.shape, quant)
    if ref.ggml_type in EXACT_TYPES:  # the same blocks, row-tiled where the rows allow
        return (
            row_tiled(EXACT_TYPES[ref.ggml_type], ref.shape[0]) if len(ref.shape) == 2 else EXACT_TYPES[ref.ggml_type]
        )
    return "f16" if ref.ggml_type in _FLOAT_GGUF_TYPES else storage_type(name, ref.shape, "q8_0")


def plan_types(ckpt: GGUFCheckpoint, quant: str) -> dict[str, str]:
    return {name: gguf_storage_type(ckpt, name, quant) for name in ckpt.tensors}


def quant_section(types: dict[str, str], quant: str) -> dict[str, Any]:
    """The manifest's "quant" section. Under "keep" the preset is named after what the file
    turned out to hold (e.g. "q4_1" for SmolLM2's Q4_1 GGUF) when one preset describes it."""
    by_role: dict[str, Counter] = {}
    for name, t in types.items():
        by_role.setdefault(role_of(name), Counter())[base_type(t)] += 1  # presets name block types
    roles = {role: c.most_common(1)[0][0] for role, c in by_role.items()}
    preset = quant
    if quant == KEEP:
        uniform = all(len(c) == 1 for c in by_role.values())
        match = [p for p, spec in QUANT_PRESETS.items() if all(spec[r] == t for r, t in roles.items())]
        preset = match[0] if uniform and match else KEEP
    types_out = dict(QUANT_PRESETS.get(preset, {}))
    types_out.update(roles)
    return {"preset": preset, "types": types_out, "group": QK, "requested": quant}


def planned_bytes(ckpt: GGUFCheckpoint, types: dict[str, str]) -> int:
    total = 0
    for name, ref in ckpt.tensors.items():
        n, k = (ref.shape[0], ref.shape[1]) if len(ref.shape) == 2 else (1, ref.shape[0])
        total += q4.nbytes(types[name], n, k) + 4096
    return total


def _write_model(
    ckpt: GGUFCheckpoint,
    tmp: Path,
    quant: str,
    types: dict[str, str],
    src: Path,
    progress: Progress | None,
    requantized_out: list[str],
) -> dict[str, Any]:
    names = list(ckpt.tensors)
    total_bytes = ckpt.total_bytes
    done_bytes = 0
    requantized: list[str] = []
    with ModelWriter(tmp) as writer:
        for i, name in enumerate(names):
            ref = ckpt.tensors[name]
            qtype = types[name]
            src_bytes = ckpt.nbytes(name)
            if name.endswith(".w1") and ".experts." in name:
                layer, expert = int(name.split(".")[1]), int(name.split(".")[3])
                region = sum(
                    q4.nbytes(types[name[:-2] + w], *ckpt.tensors[name[:-2] + w].shape) + 4096
                    for w in ("w1", "w3", "w2")
                )
                writer.begin_expert(layer, expert, region)
            base = base_type(qtype)
            exact = ckpt.exact_parts(name) if EXACT_TYPES.get(ref.ggml_type) == base else None
            if exact is not None:
                parts = exact[1] if base == qtype else interleave_rows(exact[1], base)
                writer.add_tensor_parts(name, qtype, ref.shape, parts, max_abs_err=0.0, label=ref.gguf_name)
            else:
                if base not in ("f32", "f16"):  # widening F16 norms to f32 is not re-quantizing
                    requantized.append(ref.gguf_name)
                nrows = ref.shape[0] if len(ref.shape) == 2 else 1

                def on_chunk(
                    rows_done: int,
                    rows_total: int,
                    name: str = name,
                    i: int = i,
                    base: int = done_bytes,
                    rb: float = src_bytes / nrows,
                ) -> None:
                    if progress is not None:
                        progress(name, i, len(names), base + int(rows_done * rb), total_bytes)

                writer.add_tensor(
                    name,
                    qtype,
                    ref.shape,
                    lambda a, b, name=name: ckpt.rows(name, a, b),
                    progress=on_chunk,
                    label=ref.gguf_name,
                )
            done_bytes += src_bytes
            if name.endswith(".w2") and ".experts." in name:
                writer.end_expert()
            if progress is not None:
                progress(name, i + 1, len(names), done_bytes, total_bytes)
        tokenizer = write_tokenizer(ckpt, tmp)
        requantized_out[:] = list(dict.fromkeys(requantized))  # a stacked GGUF tensor: one name per expert
        return writer.finish(
            ckpt.config,
            quant_section(types, quant),
            tokenizer,
            {"kind": "gguf", "path": str(src), "dtype": ckpt.dtype},
        )


def convert_gguf(
    src_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    quant: str = KEEP,
    force: bool = False,
    progress: Progress | None = None,
) -> ConvertSummary:
    """Convert the GGUF file ``src_file`` into the model directory ``out_dir``."""
    t0 = time.perf_counter()
    src, out = Path(src_file), Path(out_dir)
    if quant not in QUANT_CHOICES:
        raise ArgumentError(f"unknown quantization {quant!r} for a GGUF", f"choose one of {', '.join(QUANT_CHOICES)}")
    with output_lock(out):
        if out.exists() or out.is_symlink():
            if not force:
                raise OutputError(f"output {out} already exists", "pass --force to replace it, or choose another -o")
            if src.exists() and out.resolve() in src.resolve().parents:
                raise ArgumentError(
                    f"output {out} contains the source file {src}", "choose an output outside its directory"
                )
        ckpt = open_gguf(src)
        types = plan_types(ckpt, quant)
        need = planned_bytes(ckpt, types)
        source_bytes = ckpt.total_bytes
        requantized: list[str] = []
        with ckpt:
            manifest = install_model_dir(
                out, need, lambda tmp: _write_model(ckpt, tmp, quant, types, src, progress, requantized)
            )
    stats = manifest["stats"]
    return ConvertSummary(
        out=out,
        quant=manifest["quant"]["preset"],
        params=stats["params"],
        bits_per_weight=stats["bits_per_weight"],
        bytes_on_disk=sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
        seconds=time.perf_counter() - t0,
        max_abs_err=stats["max_abs_err"],
        max_err_tensor=stats.get("max_err_tensor"),
        source_bytes=source_bytes,
        requantized=tuple(requantized),
    )

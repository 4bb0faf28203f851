"""`mixcli convert SRC -o OUT`: a Hugging Face checkpoint directory or a GGUF file -> a mixcli
model directory.

Thin: flags in, ``quant.convert.convert_checkpoint`` (or ``quant.gguf_convert.convert_gguf`` for a
``.gguf`` file) does the work, mixcli.progress shows it on stderr (the bar every pull shares:
source bytes and tensors done) and a summary table goes to stdout at the end. Errors are
quant's (``quant.errors``) or ``MixcliError``s; the app turns either into one line and an exit code.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from mixcli.errors import UsageError
from quant.formats import DEFAULT_QUANT, QUANT_PRESETS, QUANT_TYPES

if TYPE_CHECKING:
    from quant.convert import ConvertSummary


# --quant's choices: the presets of quant.formats, and "keep" (a GGUF's blocks as they are)
QuantChoice = Enum("QuantChoice", {name: name for name in (*QUANT_PRESETS, "keep")}, type=str)


def convert_command(
    src: Annotated[
        Path, typer.Argument(help="Hugging Face checkpoint directory (config.json + *.safetensors) or a .gguf file")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="directory to create for the converted model")],
    quant: Annotated[
        QuantChoice | None,
        typer.Option(
            "--quant",
            help="weight format: 4-bit q4_0 / q4_1 / q4_k "
            f"({QUANT_TYPES['q4_k'].bits_per_weight:g} bits/weight, two-level scales: "
            "closest to the original of the 4-bit types), 8-bit q8_0, f16 (no quantization), or keep "
            "(GGUF only: its Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K / Q8_0 / F16 blocks as they are, other types "
            "to q8_0). "
            f"Default: {DEFAULT_QUANT} for a checkpoint directory, keep for a GGUF file",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace OUTPUT if it exists (only once the new one is complete)")
    ] = False,
) -> None:
    """Convert a Hugging Face checkpoint or a GGUF file for mixcli.

    The result is a directory of memory-mappable 4-bit (or 8-bit, f16) weights and a manifest."""
    from ..progress import convert_progress

    with convert_progress() as progress:
        if src.suffix.lower() == ".gguf" and not src.is_dir():
            from quant.gguf_convert import KEEP, convert_gguf  # numba: loaded only when converting

            q = QuantChoice(quant).value if quant is not None else KEEP
            summary = convert_gguf(src, output, quant=q, force=force, progress=progress)
        else:
            from quant.convert import convert_checkpoint

            if quant == QuantChoice.keep:
                raise UsageError(
                    "--quant keep applies to GGUF files only",
                    f"choose {', '.join(c.value for c in QuantChoice if c != QuantChoice.keep)}",
                )
            q = QuantChoice(quant).value if quant is not None else DEFAULT_QUANT
            summary = convert_checkpoint(src, output, quant=q, force=force, progress=progress)
    out = Console()
    out.print(f"converted to {summary.out}", soft_wrap=True, highlight=False, markup=False)  # a path: never folded
    out.print(summary_table(summary))


def summary_table(s: ConvertSummary) -> Table:
    table = Table(show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("quantization", s.quant)
    table.add_row("parameters", f"{s.params:,} ({s.params / 1e9:.2f} B)" if s.params >= 1e8 else f"{s.params:,}")
    table.add_row("bits per weight", f"{s.bits_per_weight:.2f}")
    table.add_row("size on disk", _size(s.bytes_on_disk))
    table.add_row("source size", _size(s.source_bytes))
    table.add_row("time", f"{s.seconds:.1f} s")
    where = f" ({s.max_err_tensor})" if s.max_err_tensor else ""
    table.add_row("largest quant error", f"{s.max_abs_err:.3g}{where}")
    if s.requantized is not None:  # a GGUF import: which blocks were not kept as they were
        table.add_row("re-quantized", requantized_text(s))
    return table


def requantized_text(s: ConvertSummary) -> str:
    """'none: every block kept' or '2 GGUF tensors: blk.0.attn_v.weight, output.weight'."""
    if not s.requantized:
        return "none: every block kept"
    names = ", ".join(s.requantized[:3]) + (", ..." if len(s.requantized) > 3 else "")
    return f"{len(s.requantized)} GGUF tensor{'s' if len(s.requantized) > 1 else ''}: {names}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"

"""`mixcli verify MODEL`: check a converted model completely, whatever its stamp says.

Every manifest rule (``quant.formats.check_manifest``) and every tensor's sha256, streamed from the
mapped files; a table per data file on stdout, and exit 1 naming the first damaged tensor. A model
that passes gets a fresh stamp, so the next `generate` or `chat` starts without hashing again.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from ..errors import ModelFormatError


def verify_command(
    model: Annotated[
        str | None, typer.Argument(help="Converted model directory or registry name (default: the default model).")
    ] = None,
):
    """Check a converted model: every rule and every tensor sha256."""
    from rich.console import Console
    from rich.table import Table

    from quant import integrity

    from ..memsize import format_size
    from ..registry import resolve_model
    from ..store import open_model_dir

    path = resolve_model(model)
    store = open_model_dir(path, load="mmap", verify=False)  # every rule but the checksums
    m = store.manifest
    by_file: dict[str, list[str]] = {}
    for name, t in m["tensors"].items():
        by_file.setdefault(t["file"], []).append(name)
    t0 = time.perf_counter()
    bad = integrity.verify_tensors(m, store.maps.__getitem__)
    seconds = time.perf_counter() - t0
    total = sum(f["size"] for f in m["files"])
    table = Table(
        title=f"{path}: {len(m['tensors'])} tensors, {format_size(total)}, hashed in {seconds:.1f} s "
        f"({total / 1e6 / max(seconds, 1e-9):.0f} MB/s)",
        title_justify="left",
    )
    for col in ("data file", "tensors", "size", "sha256"):
        table.add_column(col, justify="right" if col in ("tensors", "size") else "left")
    for f in m["files"]:
        damaged = [n for n in by_file.get(f["name"], []) if n in bad]
        table.add_row(
            f["name"],
            str(len(by_file.get(f["name"], []))),
            format_size(f["size"]),
            "ok"
            if not damaged
            else f"[red]{len(damaged)} damaged: {', '.join(damaged[:3])}" + (" ..." if len(damaged) > 3 else ""),
        )
    Console(soft_wrap=True).print(table)
    if bad:
        integrity.remove_stamp(path)
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ModelFormatError(
            f"{path}: tensor {bad[0]}{more} fails its sha256 check (the data file is damaged)",
            "convert or pull the model again",
        )
    integrity.write_stamp(path, m)
    print(f"ok: every rule and all {len(m['tensors'])} checksums of {path.name} match")

"""`mixcli models` and `mixcli pull`: the registry, what is present locally, and fetching."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from quant.formats import DEFAULT_QUANT, QUANT_PRESETS


def _dir_size(path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def models_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
):
    """List the registry's models and the converted ones in the store.

    Names are never cut: on a narrow terminal the description, architecture and source columns
    are left out (all of them are in --json)."""
    from rich.console import Console
    from rich.text import Text

    from ..registry import load_registry, local_models
    from ..store_paths import models_dir

    reg = load_registry()
    store = models_dir()
    local = {p.name: p for p in local_models(store)}
    rows = []
    for e in reg.entries.values():
        p = local.pop(e.name, None)
        rows.append(_row(e.name, e, p, reg.default == e.name))
    for name, p in local.items():
        rows.append(_row(name, None, p, False))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    con = Console(highlight=False)
    for part in models_listing(rows, store, con.width):
        con.print(part, soft_wrap=isinstance(part, Text))  # a line of text is never folded by rich


# (header, required, priority): names, presence and format always; then what fits, in this order
MODEL_COLUMNS = [
    ("name", True, 0),
    ("local", True, 0),
    ("quant", True, 0),
    ("architecture", False, 1),
    ("source", False, 2),
    ("description", False, 3),
]


def models_listing(rows: list[dict], store, width: int) -> list:
    """What `mixcli models` prints at ``width`` columns: the store's path on a line of its own (a
    path is never folded), then a table whose names are whole; columns that do not fit are left
    out (description first) and named in a last line."""
    from rich.text import Text

    from ..table_fit import Col, fit_table

    cells = [
        [
            r["name"] + (" (default)" if r["default"] else ""),
            f"{r['bytes'] / 2**20:.0f} MiB" if r["present"] else "no",
            r["quant"] or "",
            r["architecture"],
            r["source"],
            r["description"],
        ]
        for r in rows
    ]
    cols = [
        Col(
            h,
            required=req,
            priority=prio,
            wrap=h in ("name", "description"),
            min_width=max((len(r["name"]) for r in rows), default=4)
            if h == "name"
            else 30
            if h == "description"
            else None,
            justify="right" if h == "local" else "left",
        )
        for h, req, prio in MODEL_COLUMNS
    ]
    table, left_out = fit_table(width, cols, cells, box=_box(), show_edge=False)
    out: list = [Text(f"store: {store}")]
    if table is None:  # a name wider than the terminal: one plain line per model
        out += [Text("  ".join(c for c in row[:3] if c)) for row in cells]
    else:
        out.append(table)
    if left_out:
        out.append(Text(f"({', '.join(left_out)}: in a wider terminal or with --json)", style="dim"))
    return out


def _box():
    from rich import box

    return box.SIMPLE_HEAD


def _row(name, entry, path, default) -> dict:
    quant = entry.quant if entry else None
    size = 0
    if path is not None:
        size = _dir_size(path)
        try:
            quant = json.loads((path / "manifest.json").read_text())["quant"]["preset"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    src = ""
    if entry:
        s = entry.source
        src = s.get("repo") or (f"pip:{s.get('package')}=={s.get('version')}" if s.get("package") else "")
    return {
        "name": name,
        "default": default,
        "architecture": entry.architecture if entry else "",
        "source": src,
        "present": path is not None,
        "path": str(path) if path else None,
        "bytes": size,
        "quant": quant,
        "description": entry.description if entry else "(local)",
    }


def pull_command(
    name: Annotated[
        str | None,
        typer.Argument(
            help="A registry name, or a Hugging Face repo: owner/name (safetensors or GGUF) or owner/name:QUANT "
            "(a GGUF repo's quant, e.g. :Q4_K_M). Default: the default model."
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch and convert again even if present.")] = False,
    keep_source: Annotated[
        bool,
        typer.Option(
            "--keep-source",
            help=(
                "Keep the downloaded files (under $MIXCLI_HOME/downloads) after converting; files found in the "
                "Hugging Face cache are always kept."
            ),
        ),
    ] = False,
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant",
            help=(
                f"How to convert a safetensors repo ({', '.join(QUANT_PRESETS)}; default: the registry's or "
                f"{DEFAULT_QUANT}). A GGUF keeps its blocks."
            ),
        ),
    ] = None,
):
    """Fetch a model (registry or Hub) and convert it."""
    from ..progress import say_stderr
    from ..pull import pull

    path = pull(name, force=force, keep_source=keep_source, quant=quant, notify=say_stderr)
    print(path)

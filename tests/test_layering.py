"""Dependencies point one way: ``mixcli`` imports ``quant``, never the reverse.

quant is the offline half (the format, the quantizers, the converters) and must stand alone: what
both halves need (the model config a manifest stores, the errors, the free-memory probe) lives in
quant. Checked twice: in a fresh interpreter that imports every quant module (what actually gets
loaded), and in quant's source (an import inside a function runs only when the function does).
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import quant

REPO = Path(__file__).resolve().parent.parent
QUANT_DIR = REPO / "quant"


def quant_modules() -> list[str]:
    """Every module of the quant package, found on disk (a new module is covered without edits)."""
    names = ["quant"]
    for info in pkgutil.walk_packages(quant.__path__, prefix="quant."):
        names.append(info.name)
    return sorted(names)


def test_the_module_list_sees_the_package():
    names = quant_modules()
    assert {"quant.formats", "quant.convert", "quant.errors", "quant.config", "quant.sources.hf"} <= set(names)


def test_importing_every_quant_module_loads_no_mixcli_module():
    code = (
        "import importlib, json, sys\n"
        f"for name in {quant_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'mixcli' or m.startswith('mixcli.'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def mixcli_imports(source: str) -> list[str]:
    """Every import statement in ``source`` that names mixcli, at any depth (functions included)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "mixcli"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "mixcli":
            found.append(node.module)
    return found


def test_the_source_scan_finds_an_import_inside_a_function():
    src = "def warm():\n    from mixcli.memsize import available_memory\n    import mixcli.errors\n"
    assert mixcli_imports(src) == ["mixcli.memsize", "mixcli.errors"]
    assert mixcli_imports("from quant.errors import QuantError\nimport numpy\n") == []


def test_no_quant_source_file_imports_mixcli():
    offenders = {
        str(p.relative_to(REPO)): names
        for p in sorted(QUANT_DIR.rglob("*.py"))
        if (names := mixcli_imports(p.read_text(encoding="utf-8")))
    }
    assert offenders == {}

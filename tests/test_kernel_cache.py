"""numba's on-disk kernel cache where the package directory cannot be written (a system-wide
install): compiled kernels go to the user's cache directory instead, and the next process loads
them from there rather than compiling again; and the one-line compile notice appears only when
something is compiled."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys
import numpy as np
from mixcli import kernels
from mixcli.kernels import int8
from quant import q4
from quant.formats import interleave_rows

notes = []
kernels.on_first_compile(lambda: notes.append(kernels.COMPILE_NOTICE))
table = kernels.select("generic", "int8")
w = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
p = interleave_rows(q4.quantize(w, "q4_0"), "q4_0")
out = np.empty(16, np.float32)
x = np.ones(64, np.float32)
table.matvec_q4_0r16(p["qs"], p["d"], x, out)
drv = int8.driver(kernels.isa.tier("generic"), "q4_0r16", "mv", 1)
print(json.dumps({"hits": sum(drv.stats.cache_hits.values()), "misses": sum(drv.stats.cache_misses.values()),
                  "notes": notes, "sum": float(out.sum())}))
"""


def _read_only_copy(tmp: Path) -> Path:
    """mixcli and quant copied with every __pycache__ made a plain file: nothing can be cached
    beside the sources (as in a read-only site-packages, which root could still write)."""
    for pkg in ("mixcli", "quant"):
        shutil.copytree(ROOT / pkg, tmp / pkg, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
    for d in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp / "mixcli", tmp / "quant"]:
        (d / "__pycache__").write_text("not a directory")
    return tmp


def test_cache_falls_back_to_the_user_cache_dir(tmp_path):
    src = _read_only_copy(tmp_path / "site")
    xdg = tmp_path / "xdg-cache"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(src), XDG_CACHE_HOME=str(xdg), PYTHONDONTWRITEBYTECODE="1")
    runs = []
    for _ in range(2):
        r = subprocess.run(
            [sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["misses"] == 1 and first["hits"] == 0  # compiled, and written somewhere
    assert second["hits"] == 1 and second["misses"] == 0  # the next process loaded it
    assert first["notes"] == ["compiling kernels for this CPU (first run only)..."] and second["notes"] == []
    assert first["sum"] == second["sum"]
    cached = list(xdg.rglob("*.nbi"))
    assert any("mv" in p.name for p in cached), cached  # the driver's index sits in the user's cache
    assert not any(p.is_dir() for p in src.rglob("__pycache__"))  # nothing written beside the sources

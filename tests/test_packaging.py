"""`pip install .` ships every package: pyproject's explicit package list names each directory of
mixcli/ and quant/ that has an __init__.py (an editable install, as the tests use, would hide a
missing one; the kernel package was missing from the list once)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_in_the_wheel_list():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        str(p.parent.relative_to(ROOT)).replace("/", ".")
        for top in ("mixcli", "quant")
        for p in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert "mixcli.kernels" in on_disk
    assert on_disk == listed

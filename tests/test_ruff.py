"""The code meets its ruff configuration (pyproject.toml's [tool.ruff]), lint and format, so CI
enforces what pre-commit does locally. ruff comes with the ``test`` extra, pinned: a missing ruff
fails here rather than skipping, as a skipped check would pass for a check that never ran."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PATHS = ("mixcli", "quant", "tests", "benchmarks")


def ruff(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=REPO, input=stdin, capture_output=True, text=True, timeout=300
    )


def test_ruff_reads_the_projects_configuration():
    """The checks below would pass vacuously if ruff checked nothing: a probe file with an unused
    import and unsorted imports, checked as if it were in mixcli/, must be refused with both."""
    r = ruff(
        "check",
        "--no-cache",
        "--output-format",
        "concise",
        "--stdin-filename",
        "mixcli/_probe.py",
        "-",
        stdin="import sys\nimport os\n\nprint(sys.argv)\n",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "F401" in r.stdout and "I001" in r.stdout, r.stdout


def test_ruff_check_is_clean():
    r = ruff("check", "--no-cache", "--output-format", "concise", *PATHS)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_is_clean():
    r = ruff("format", "--no-cache", "--check", *PATHS)
    assert r.returncode == 0, "run `ruff format mixcli quant tests benchmarks`\n" + r.stdout + r.stderr

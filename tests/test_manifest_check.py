"""The one manifest check (quant.formats.check_manifest): each rule it enforces, on a real
converted baby Mixtral, through the pure function and through both of its callers (the writer's
verify_model_dir and the loader, mixcli.store.open_model_dir)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from babymodels import make_hf_checkpoint
from mixcli.errors import ModelFormatError
from mixcli.store import open_model_dir
from quant.convert import convert_checkpoint
from quant.formats import FormatError, check_manifest, expected_shape
from quant.writer import verify_model_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    out = root / "model"
    convert_checkpoint(make_hf_checkpoint(root / "src", "mixtral"), out, quant="q4_0")
    return out, json.loads((out / "manifest.json").read_text())


def sizes_of(d: Path):
    return lambda name: (d / name).stat().st_size if (d / name).is_file() else None


def check(d: Path, m: dict):
    return check_manifest(m, sizes_of(d))


def test_the_intact_manifest_passes(model):
    d, m = model
    cfg = check(d, m)
    assert (cfg.hidden_size, cfg.num_local_experts, cfg.moe) == (64, 4, True)
    assert expected_shape(cfg, "layers.1.experts.2.w2") == (64, 96)


def _set(path: str, value):
    """A mutation: set the manifest field at a dotted path (list indices as numbers)."""

    def apply(m):
        keys = path.split("|")
        obj = m
        for k in keys[:-1]:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        last = keys[-1]
        if value is DELETE:
            del obj[last]
        else:
            obj[int(last) if isinstance(obj, list) else last] = value

    return apply


DELETE = object()
WQ = "tensors|layers.0.attn.wq"
RULES = [
    # (mutation, message the error must contain)
    (_set("format", "gguf"), "format is 'gguf'"),
    (_set("version", 99), "format version 99"),
    (_set("tensors", []), "manifest field 'tensors' is list"),
    (_set("config", 3), "manifest field 'config' is int"),
    (_set("config|architecture", "GPT2"), "config.architecture is 'GPT2'"),
    (_set("config|num_attention_heads", 0), "config.num_attention_heads is 0"),
    (_set("config|hidden_size", "64"), "config.hidden_size is '64'"),
    (_set("config|hidden_size", 64.0), "config.hidden_size is 64.0"),
    (_set("config|hidden_size", True), "config.hidden_size is True"),
    (_set("config|num_hidden_layers", 10**12), "config.num_hidden_layers is 1000000000000"),
    (_set("config|vocab_size", -5), "config.vocab_size is -5"),
    (_set("config|head_dim", 15), "config.head_dim is 15"),
    (_set("config|num_key_value_heads", 3), "num_key_value_heads is 3, which does not divide"),
    (_set("config|num_experts_per_tok", 5), "num_experts_per_tok is 5, more than num_local_experts"),
    (_set("config|rms_norm_eps", float("nan")), "config.rms_norm_eps is nan"),
    (_set("config|rope_theta", float("inf")), "config.rope_theta is inf"),
    (_set("config|rope_theta", 1e300), "config.rope_theta is 1e+300"),
    (_set("config|rms_norm_eps", 2.0), "config.rms_norm_eps is 2.0"),
    (_set("config|eos_token_id", 100), "config.eos_token_id is 100"),
    (_set("config|tie_word_embeddings", "no"), "config.tie_word_embeddings is 'no'"),
    (_set("config|rope_scaling", {"rope_type": "yarn"}), "config.rope_scaling"),
    (_set("files|0|name", "../evil.bin"), "data file name '../evil.bin' is not allowed"),
    (_set("files|0|size", 12), "the manifest says 12"),
    (_set("files|0|name", "weights-00009.bin"), "data file weights-00009.bin is missing"),
    (_set("config|num_hidden_layers", 1), "the config implies"),  # fewer layers than the tensors hold
    (_set("tensors|norm", DELETE), "the config implies"),
    # the config's shapes disagree with the tensors (a loader that trusted it would index out of bounds)
    (_set("config|vocab_size", 200), "tensor tok_embeddings has shape [100, 64], the config implies [200, 64]"),
    (
        _set("config|intermediate_size", 128),
        "tensor layers.0.experts.0.w1 has shape [96, 64], the config implies [128, 64]",
    ),
    (_set("config|head_dim", 32), "tensor layers.0.attn.wq has shape [64, 64], the config implies [128, 64]"),
    (_set(WQ + "|shape", [64, 32]), "tensor layers.0.attn.wq has shape [64, 32]"),
    (_set(WQ + "|type", "q3_x"), "storage type 'q3_x', which this mixcli does not know"),
    (_set(WQ + "|type", "q8_0"), "tensor layers.0.attn.wq part qs is"),
    (_set(WQ + "|offset", 100), "starts at 100, not a multiple of 4096"),
    (_set(WQ + "|offset", 1 << 40), "runs past the end"),
    (_set(WQ + "|offset", -4096), "offset -4096"),
    (_set(WQ + "|nbytes", 1 << 40), "runs past the end"),
    (_set(WQ + "|nbytes", 16), "parts overrun its 16 bytes"),
    (_set(WQ + "|file", "weights-00003.bin"), "which the manifest does not list"),
    (_set(WQ + "|sha256", "00"), "has sha256 '00'"),
    (_set(WQ + "|max_abs_err", float("inf")), "max_abs_err inf"),
    (_set(WQ + "|parts|d|shape", [4, 1024]), "part d is"),
    (_set(WQ + "|parts|d|shape", [4.0, 32]), "part d is"),  # equal as numbers, not an integer shape
    (_set(WQ + "|shape", [64.0, 64]), "tensor layers.0.attn.wq has shape [64.0, 64]"),
    (_set(WQ + "|parts|qs|offset", 8), "part qs is misplaced"),
    (_set("experts|layers.1.experts.3", DELETE), "expert regions do not match the config: missing layers.1.experts.3"),
    # an expert region not covering its parts (the loader would read another expert's bytes)
    (_set("experts|layers.0.experts.1|nbytes", 4096), "expert region layers.0.experts.1 (offset"),
    (_set("experts|layers.0.experts.1|offset", 0), "does not cover exactly its w1, w3, w2"),
]


@pytest.mark.parametrize("mutate, message", RULES, ids=[r[1][:40] for r in RULES])
def test_each_rule(model, mutate, message):
    d, m = model
    bad = copy.deepcopy(m)
    mutate(bad)
    with pytest.raises(FormatError) as err:
        check(d, bad)
    assert message in err.value.message
    assert "\n" not in str(err.value) and err.value.hint


def test_both_callers_refuse_a_config_that_disagrees_with_the_tensors(model, tmp_path):
    """The two rules the loader missed before: shapes from the config, and expert regions."""
    d, m = model
    picked = [
        r
        for r in RULES
        if r[1].startswith(("tensor tok_embeddings has shape", "expert region layers.0.experts.1 (offset"))
    ]
    assert len(picked) == 2
    for mutate, message in picked:
        copy_dir = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        copy_dir.mkdir()
        for f in d.iterdir():
            (copy_dir / f.name).symlink_to(f)
        bad = copy.deepcopy(m)
        mutate(bad)
        (copy_dir / "manifest.json").unlink()
        (copy_dir / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(
            ModelFormatError,
            match="is not a usable converted model: " + message.split(" (")[0].replace("[", r"\[").replace("]", r"\]"),
        ):
            open_model_dir(copy_dir, verify=False)
        with pytest.raises(FormatError, match="is not a valid mixcli model"):
            verify_model_dir(copy_dir, check_sha=False)


def test_quant_imports_no_mixcli_for_the_check():
    """The check and its error type live in quant: importing them loads no mixcli module."""
    code = "import sys, quant.formats, quant.integrity; print(sorted(m for m in sys.modules if m.startswith('mixcli')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr

"""`mixcli pull owner/name[:QUANT]` from the Hugging Face Hub, against a stand-in Hub on 127.0.0.1.

The stand-in (tests/fakehub.py) serves repos these tests write: a baby Mixtral as safetensors,
the same baby as a GGUF repo with several quants, a split GGUF, and a gated repo. HF_ENDPOINT
points ``huggingface_hub`` at it; HF_HUB_CACHE / HF_HOME at a private directory, so nothing here
reads the user's Hugging Face cache or token, and nothing reaches the network. The reference
for every pulled model is what ``mixcli convert`` makes of the same files on disk.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from babymodels import make_hf_checkpoint
from fakehub import GOOD_TOKEN, FakeHub
from mixcli import hub as hubmod
from mixcli import pull as pullmod
from mixcli.errors import MixcliError
from mixcli.pull import downloads_dir, pull
from mixcli.registry import find_hub_model, load_registry, resolve_model
from mixcli.store_paths import models_dir
from quant.convert import convert_checkpoint
from quant.gguf_convert import convert_gguf
from quant.writer import verify_model_dir
from test_gguf_import import make_gguf_checkpoint, write_gguf

Q = gguf.GGMLQuantizationType
REPO_ROOT = Path(__file__).resolve().parent.parent
README = b"# a model card\n"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The repos' files, written once: {repo: {name: bytes}} and the local copies they came from."""
    d = tmp_path_factory.mktemp("hub-sources")
    st = make_hf_checkpoint(d / "st", "mixtral", dtype="bf16", shards=2, seed=1)
    st_files = {p.name: p.read_bytes() for p in st.iterdir() if p.is_file()}
    st_files["consolidated.safetensors"] = b"\0" * 64  # Mistral's own layout: not needed, not downloaded
    st_files["pytorch_model.bin"] = b"\0" * 64  # a pickle: never downloaded
    st_files["README.md"] = README
    quants = {}
    for qtype, name in (
        (Q.Q4_0, "baby-mixtral.Q4_0.gguf"),
        (Q.Q8_0, "baby-mixtral.Q8_0.gguf"),
        (Q.Q4_1, "baby-mixtral-Q4_1.gguf"),
    ):
        (d / qtype.name).mkdir()
        path, _, _ = make_gguf_checkpoint(d / qtype.name / name, "mixtral", seed=2, types={"linear": qtype})
        quants[name] = path
    gguf_files = {name: p.read_bytes() for name, p in quants.items()} | {"README.md": README}
    (d / "split").mkdir()
    _, cfg, weights = make_gguf_checkpoint(d / "split-src.gguf", "mixtral", seed=2)
    first = write_gguf(d / "split" / "baby-Q4_0.gguf", cfg, weights, split_max_tensors=10)
    split_files = {f"Q4_0/{p.name}": p.read_bytes() for p in sorted((d / "split").iterdir())}
    split_files["baby-Q8_0.gguf"] = gguf_files["baby-mixtral.Q8_0.gguf"]
    return {
        "repos": {
            "baby/mixtral-st": st_files,
            "baby/mixtral-gguf": gguf_files,
            "baby/mixtral-split": split_files,
            "gated/mixtral-gguf": {"baby-mixtral.Q4_0.gguf": gguf_files["baby-mixtral.Q4_0.gguf"]},
        },
        "st_dir": st,
        "quants": quants,
        "split_first": first,
    }


@pytest.fixture
def hub(sources, tmp_path, monkeypatch):
    fake = FakeHub()
    for repo, files in sources["repos"].items():
        fake.add(repo, files, gated=repo.startswith("gated/"))
    url = fake.start()
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("MIXCLI_HOME", str(tmp_path / "mixcli-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    yield fake
    fake.stop()


def _store() -> list[str]:
    return sorted(p.name for p in models_dir().iterdir()) if models_dir().exists() else []


def _tensor_shas(path: Path) -> dict[str, str]:
    return {n: t["sha256"] for n, t in verify_model_dir(path)["tensors"].items()}


def _reference(tmp_path: Path, src: Path, name: str, **kw) -> dict[str, str]:
    out = tmp_path / "reference" / name
    if src.is_dir():
        convert_checkpoint(src, out, **kw)
    else:
        convert_gguf(src, out, **kw)
    return _tensor_shas(out)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    return {**env, **extra}


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mixcli", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=_env(**env),
        timeout=600,
    )


# -- the command forms ----------------------------------------------------------------------------
def test_pull_gguf_quant_tag_then_found_by_the_same_reference(hub, sources, tmp_path):
    said: list[str] = []
    path = pull("baby/mixtral-gguf:q8_0", notify=said.append)  # the tag matches case-insensitively
    assert path == models_dir() / "baby--mixtral-gguf--Q8_0"
    assert _tensor_shas(path) == _reference(tmp_path, sources["quants"]["baby-mixtral.Q8_0.gguf"], "q8")
    assert hub.gets("baby-mixtral.Q8_0.gguf") == [None] and not hub.gets("baby-mixtral.Q4_0.gguf")
    assert not hub.gets("README.md")
    assert not downloads_dir().exists()  # the download is gone once converted
    assert any("to download" in s for s in said) and any("ready" in s for s in said)
    for ref in ("baby/mixtral-gguf:Q8_0", "baby/mixtral-gguf", "hf.co/baby/mixtral-gguf:q8_0"):
        assert resolve_model(ref) == path, ref
    n = len(hub.log)
    assert pull("baby/mixtral-gguf:Q8_0") == path and all(m != "GET" or "/resolve/" not in p for m, p, _ in hub.log[n:])

    pull("baby/mixtral-gguf:Q4_1")  # the `-Q4_1.gguf` spelling of the label
    assert _store() == ["baby--mixtral-gguf--Q4_1", "baby--mixtral-gguf--Q8_0"]
    with pytest.raises(
        MixcliError,
        match=r"several models were pulled from baby/mixtral-gguf \(baby/mixtral-gguf:Q4_1, "
        r"baby/mixtral-gguf:Q8_0\) \(name one with its :QUANT tag\)",
    ):
        resolve_model("baby/mixtral-gguf")


def test_cli_pull_then_generate_by_reference(hub, sources):
    r = _cli("pull", "baby/mixtral-gguf:Q4_0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(models_dir() / "baby--mixtral-gguf--Q4_0")
    g = _cli("generate", "baby/mixtral-gguf", "--prompt", "the cat", "-n", "3", "--temp", "0", "--raw")
    assert g.returncode == 0, g.stderr
    assert g.stdout.strip()  # three tokens of a random baby: some text


def test_pull_safetensors_repo_downloads_only_what_conversion_needs(hub, sources, tmp_path):
    path = pull("baby/mixtral-st", quant="q4_1")
    assert path == models_dir() / "baby--mixtral-st"
    assert _tensor_shas(path) == _reference(tmp_path, sources["st_dir"], "st", quant="q4_1")
    got = {p.rsplit("/", 1)[-1] for m, p, _ in hub.log if m == "GET" and "/resolve/" in p}
    assert got == {
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    assert resolve_model("baby/mixtral-st") == path
    assert not downloads_dir().exists()


def test_pull_split_gguf_joins_the_shards(hub, sources, tmp_path):
    path = pull("baby/mixtral-split:Q4_0")
    assert _tensor_shas(path) == _reference(tmp_path, sources["split_first"], "split")
    assert len([p for m, p, _ in hub.log if m == "GET" and "-of-00003.gguf" in p]) == 3
    assert not hub.gets("baby-Q8_0.gguf")


def test_gguf_repo_without_a_tag(hub):
    with pytest.raises(MixcliError, match=r"several GGUF quants \(Q4_0, Q4_1, Q8_0\): name one"):
        pull("baby/mixtral-gguf")
    assert _store() == []


# -- errors: one line each, nothing half-written in the store ---------------------------------------
def _one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_gated_repo_says_how_to_log_in(hub, monkeypatch):
    with pytest.raises(MixcliError) as info:
        pull("gated/mixtral-gguf:Q4_0")
    msg = _one_line(info)
    assert "gated/mixtral-gguf is a gated repo" in msg and "hf auth login" in msg and "HF_TOKEN" in msg
    assert _store() == []
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    assert (pull("gated/mixtral-gguf:Q4_0") / "manifest.json").is_file()


def test_cli_errors_are_one_line_with_exit_1(hub):
    r = _cli("pull", "gated/mixtral-gguf:Q4_0")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and errors[0].startswith("error: gated/mixtral-gguf is a gated")
    assert r.stderr.endswith(errors[0] + "\n") and "Traceback" not in r.stderr
    r = _cli("pull", "nobody/nothing")
    assert r.returncode == 1 and r.stderr.startswith("error: no model nobody/nothing on the Hugging Face Hub")
    assert r.stderr.count("\n") == 1


def test_unknown_repo_and_missing_quant(hub):
    with pytest.raises(MixcliError, match="no model nobody/nothing on the Hugging Face Hub"):
        pull("nobody/nothing")
    with pytest.raises(MixcliError) as info:
        pull("baby/mixtral-gguf:Q5_K_S")
    assert "baby/mixtral-gguf has no GGUF file for :Q5_K_S (it has Q4_0, Q4_1, Q8_0)" in _one_line(info)
    with pytest.raises(MixcliError, match="holds safetensors weights, not GGUF files"):
        pull("baby/mixtral-st:Q4_K_M")
    assert _store() == []


def test_hub_unreachable(hub, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(MixcliError) as info:
        pull("baby/mixtral-gguf:Q4_0")
    assert f"cannot reach the Hugging Face Hub at http://127.0.0.1:{port}" in _one_line(info)
    assert _store() == []


def test_download_cut_mid_file_resumes_next_time(hub, sources, tmp_path, monkeypatch):
    """The connection drops half-way and the Hub is gone when the client retries: the pull fails,
    keeping what arrived; the next pull asks only for the rest. (The client writes what it
    receives in chunks of DOWNLOAD_CHUNK_SIZE, 10 MiB; 4 KiB here, for a file of 118 KB.)"""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    name = "baby-mixtral.Q4_0.gguf"
    size = len(sources["repos"]["baby/mixtral-gguf"][name])
    hub.cut[name] = size // 2
    with pytest.raises(MixcliError) as info:
        pull("baby/mixtral-gguf:Q4_0")
    msg = _one_line(info)
    assert "503" in msg and f"kept in {name}.part" in msg and "resume" in msg
    assert _store() == []  # no model, no half model
    parts = list(downloads_dir().rglob("*.part"))
    assert len(parts) == 1
    kept = parts[0].stat().st_size
    assert size // 2 - 4096 < kept <= size // 2
    hub.down = False  # the network is back
    path = pull("baby/mixtral-gguf:Q4_0")
    assert hub.gets(name)[-1] == f"bytes={kept}-"  # resumed, not started again
    assert _tensor_shas(path) == _reference(tmp_path, sources["quants"][name], "q4")
    assert not downloads_dir().exists()


def test_checksum_mismatch_deletes_the_download(hub):
    hub.corrupt.add("baby-mixtral.Q4_0.gguf")
    with pytest.raises(MixcliError) as info:
        pull("baby/mixtral-gguf:Q4_0")
    assert "checksum mismatch for baby-mixtral.Q4_0.gguf: sha256" in _one_line(info)
    assert _store() == [] and not list(downloads_dir().rglob("*.gguf*"))


def test_disk_full_while_downloading_keeps_the_part_and_resumes(hub, monkeypatch, tmp_path, sources):
    class FullDisk:
        def __init__(self, fh, room):
            self.fh, self.room = fh, room

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def tell(self):
            return self.fh.tell()

        def fileno(self):
            return self.fh.fileno()

        def seek(self, *a):
            return self.fh.seek(*a)

        def truncate(self, *a):
            return self.fh.truncate(*a)

        def write(self, b):
            if self.fh.tell() + len(b) > self.room:
                self.fh.write(b[: self.room - self.fh.tell()])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(b)

    real = hubmod._open_part
    monkeypatch.setattr(hubmod, "_open_part", lambda p: FullDisk(real(p), 1000))
    with pytest.raises(MixcliError) as info:
        pull("baby/mixtral-gguf:Q8_0")
    assert "disk full while downloading baby-mixtral.Q8_0.gguf" in _one_line(info) and "resumes" in str(info.value)
    assert _store() == []
    monkeypatch.setattr(hubmod, "_open_part", real)
    pull("baby/mixtral-gguf:Q8_0")
    assert hub.gets("baby-mixtral.Q8_0.gguf")[-1] == "bytes=1000-"


def test_free_space_check_refuses_with_the_numbers(hub, monkeypatch):
    monkeypatch.setattr(pullmod, "free_bytes", lambda path: 1000)
    with pytest.raises(MixcliError) as info:
        pull("baby/mixtral-st")
    msg = _one_line(info)
    assert "not enough disk space to pull baby/mixtral-st: needs" in msg and "download + about" in msg
    assert "1000 B free" in msg or "free in" in msg
    assert not any(p.endswith(".safetensors") for m, p, _ in hub.log if m == "GET")  # no weight was fetched


# -- the Hugging Face cache, offline use, --keep-source -------------------------------------------
def test_files_in_the_hf_cache_are_not_downloaded_again_nor_deleted(hub, monkeypatch, sources, tmp_path):
    from huggingface_hub import hf_hub_download

    cached = hf_hub_download(
        "baby/mixtral-gguf",
        "baby-mixtral.Q4_0.gguf",
        cache_dir=os.environ["HF_HUB_CACHE"],
        endpoint=os.environ["HF_ENDPOINT"],
    )
    hub.log.clear()
    path = pull("baby/mixtral-gguf:Q4_0")
    assert hub.gets("baby-mixtral.Q4_0.gguf") == []
    assert Path(cached).is_file()  # the user's cache keeps its file
    assert _tensor_shas(path) == _reference(tmp_path, sources["quants"]["baby-mixtral.Q4_0.gguf"], "q4c")
    # HF_HUB_OFFLINE: the cached snapshot is all there is, and no request is made
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.log.clear()
    assert pull("baby/mixtral-gguf:Q4_0", force=True) == path and hub.log == []
    with pytest.raises(MixcliError) as info:
        pull("baby/mixtral-st")
    assert "HF_HUB_OFFLINE is set and baby/mixtral-st is not in the Hugging Face cache" in _one_line(info)


def test_keep_source_keeps_the_download_for_the_next_pull(hub):
    pull("baby/mixtral-gguf:Q4_0", keep_source=True)
    kept = list(downloads_dir().rglob("*.gguf"))
    assert [p.name for p in kept] == ["baby-mixtral.Q4_0.gguf"]
    hub.log.clear()
    pull("baby/mixtral-gguf:Q4_0", force=True)  # converts again from the kept file ...
    assert hub.gets("baby-mixtral.Q4_0.gguf") == []
    assert not downloads_dir().exists()  # ... and, without --keep-source, removes it now


# -- registry entries with Hub sources -------------------------------------------------------------
@pytest.fixture
def hub_registry(hub, tmp_path, monkeypatch):
    from mixcli import registry

    text = (
        registry.REGISTRY_FILE.read_text()
        + """
[models.baby-hub]
aliases = ["baby"]
description = "a baby Mixtral on the stand-in Hub"
architecture = "MixtralForCausalLM"
quant = "keep"
[models.baby-hub.source]
kind = "huggingface"
repo = "baby/mixtral-gguf:Q4_1"
"""
    )
    path = tmp_path / "models.toml"
    path.write_text(text)
    real = registry.load_registry
    monkeypatch.setattr(registry, "load_registry", lambda p=path: real(p))
    monkeypatch.setattr(pullmod, "load_registry", lambda p=path: real(p))
    return hub


def test_models_toml_entries_have_hub_sources():
    reg = load_registry()
    for name in ("mixtral-8x7b-instruct", "mixtral-8x7b", "mistral-7b-instruct"):
        e = reg.entries[name]
        assert e.pullable and hubmod.parse_ref(e.source["repo"]) is not None, name


def test_registry_entry_offers_to_pull_with_size_and_free_space(hub_registry, monkeypatch):
    from mixcli.pull import offer_pull

    def resolve(arg):
        return resolve_model(arg, pull=lambda target: offer_pull(target))

    monkeypatch.setattr(pullmod, "_interactive", lambda: False)
    with pytest.raises(MixcliError) as info:
        resolve("baby")
    msg = _one_line(info)
    assert msg.startswith("baby-hub is not pulled yet: that is baby/mixtral-gguf:Q4_1 (")
    assert "to download, about" in msg and "free in" in msg and "(run `mixcli pull baby-hub`)" in msg
    assert _store() == []
    asked: list[str] = []
    monkeypatch.setattr(pullmod, "_interactive", lambda: True)
    monkeypatch.setattr(pullmod, "_ask", lambda q: asked.append(q) or False)
    with pytest.raises(MixcliError, match="baby-hub was not pulled"):
        resolve("baby")
    monkeypatch.setattr(pullmod, "_ask", lambda q: asked.append(q) or True)
    path = resolve("baby")
    assert path == models_dir() / "baby-hub" and len(asked) == 2 and "Pull it now?" in asked[0]
    assert resolve("baby-hub") == path  # found by name from now on, no question
    assert len(asked) == 2
    # a Hub reference not pulled yet is offered the same way
    monkeypatch.setattr(pullmod, "_ask", lambda q: False)
    with pytest.raises(MixcliError, match=r"baby/mixtral-gguf:Q8_0 was not pulled"):
        resolve("baby/mixtral-gguf:Q8_0")


def test_cli_pull_registry_name(hub_registry):
    path = pull("baby")
    assert path == models_dir() / "baby-hub"
    assert json.loads((path / "manifest.json").read_text())["source"]["kind"] == "gguf"
    assert find_hub_model(models_dir(), hubmod.parse_ref("baby/mixtral-gguf:Q4_1")) is None  # stored by its name


# -- pure functions ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,want",
    [
        ("TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF:Q4_K_M", ("TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF", "Q4_K_M")),
        ("mistralai/Mixtral-8x7B-v0.1", ("mistralai/Mixtral-8x7B-v0.1", None)),
        ("hf.co/a/b:q8_0", ("a/b", "q8_0")),
        ("https://huggingface.co/a/b", ("a/b", None)),
        ("mixtral", None),
        ("./models/x", None),
        ("a/b/c", None),
        ("a--x/b", None),
        ("/abs/path", None),
    ],
)
def test_parse_ref(text, want):
    ref = hubmod.parse_ref(text)
    assert (None if ref is None else (ref.repo, ref.tag)) == want


@pytest.mark.parametrize(
    "name,label",
    [
        ("mixtral-8x7b-instruct-v0.1.Q4_K_M.gguf", "Q4_K_M"),
        ("Mixtral-8x7B-Instruct-v0.1-Q6_K-00002-of-00002.gguf", "Q6_K"),
        ("Q8_0/Mixtral-Q8_0-00001-of-00003.gguf", "Q8_0"),
        ("model-f16.gguf", "f16"),
    ],
)
def test_gguf_label(name, label):
    assert hubmod.gguf_label(name) == label


def test_a_missing_relative_path_is_not_taken_for_a_repo(hub, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        MixcliError,
        match=r"model directory models/mixtral-q4 does not exist \(check the path; "
        r"for the Hugging Face repo models/mixtral-q4, run `mixcli pull",
    ):
        resolve_model("models/mixtral-q4", pull=lambda target: pytest.fail("offered a pull"))
    assert hub.log == []


def test_a_second_pull_of_the_same_file_stops_instead_of_appending(hub, sources):
    import fcntl

    from mixcli.pull import plan_hub

    plan = plan_hub(hubmod.parse_ref("baby/mixtral-gguf:Q4_0"))
    part = hubmod.part_path(plan.into / "baby-mixtral.Q4_0.gguf")
    part.parent.mkdir(parents=True)
    with open(part, "ab") as other:  # another pull holds it
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(MixcliError) as info:
            pull("baby/mixtral-gguf:Q4_0")
        assert "another process is downloading baby-mixtral.Q4_0.gguf" in _one_line(info)
    assert part.stat().st_size == 0 and _store() == []
    assert (pull("baby/mixtral-gguf:Q4_0") / "manifest.json").is_file()  # once it is gone


def test_partial_downloads_of_an_older_commit_are_dropped(hub, sources):
    """A .part of a commit the repo has moved past cannot be resumed: the next pull deletes it."""
    from mixcli.pull import plan_hub

    old = plan_hub(hubmod.parse_ref("baby/mixtral-gguf:Q4_0")).into
    stale = hubmod.part_path(old / "baby-mixtral.Q4_0.gguf")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * 100)
    hub.repos["baby/mixtral-gguf"].commit = "f" * 40  # a new commit on the Hub
    pull("baby/mixtral-gguf:Q4_0")
    assert not stale.exists() and not downloads_dir().exists()

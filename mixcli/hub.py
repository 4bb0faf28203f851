"""The Hugging Face Hub, through ``huggingface_hub``: references, repo listings, file downloads.

Everything network-facing goes through the Hub's own client (its endpoint, ``HF_TOKEN`` and
``hf auth login`` tokens, ``HF_HUB_OFFLINE``, its cache layout); what is ours, and why:

- ``hf_hub_download`` writes each download to a temporary file of its own and deletes it when
  the transfer fails, so a cut 26 GB download starts again from zero. We ask the Hub for the
  file's location (``get_hf_file_metadata``) and stream it with the client's ``http_get`` into a
  ``.part`` file that stays: the next run resumes it with a Range request.
- Every finished file is checked against the Hub's listing before it is used: the sha256 of an
  LFS file, the git blob id of a small one. A mismatch deletes the file.
- Files already in the user's Hugging Face cache (same commit) are used where they are, never
  downloaded again, and never deleted: that cache is the user's.
- Every failure becomes one line naming the problem and what to do (``MixcliError``).

Environment variables are read when a function runs, not when huggingface_hub was imported, so
``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` set by a caller (or a test) apply.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import MixcliError, UsageError
from .memsize import format_size

Notify = Callable[[str], None]

DEFAULT_ENDPOINT = "https://huggingface.co"
# owner/name as the Hub allows them (letters, digits, - _ .; no "--" or ".." inside)
_REPO_RE = re.compile(r"^(?P<owner>[A-Za-z0-9][\w.-]{0,95})/(?P<name>[A-Za-z0-9][\w.-]{0,95})$")
_URL_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/", "hf://")
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})$", re.IGNORECASE)


@dataclass(frozen=True)
class HubRef:
    """``owner/name`` and an optional GGUF quant tag (``:Q4_K_M``), as the user typed them."""

    repo: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"{self.repo}:{self.tag}" if self.tag else self.repo

    @property
    def folder(self) -> str:
        """The repo as one path component: owner--name (the Hub forbids "--" inside a name)."""
        return self.repo.replace("/", "--")


def parse_ref(text: str) -> HubRef | None:
    """``owner/name[:TAG]`` (also with an ``hf.co/`` or ``https://huggingface.co/`` prefix) ->
    HubRef; None when ``text`` is not shaped like a Hub reference."""
    t = text.strip()
    for prefix in _URL_PREFIXES:
        if t.lower().startswith(prefix):
            t = t[len(prefix) :]
            break
    repo, tag = t, None
    if ":" in t:
        repo, tag = t.rsplit(":", 1)
        if not re.fullmatch(r"[\w.-]+", tag):
            return None
    if not _REPO_RE.match(repo) or "--" in repo or ".." in repo:
        return None
    return HubRef(repo, tag or None)


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    v = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return v.strip().upper() in ("1", "ON", "YES", "TRUE")


def hf_cache_dir() -> Path:
    """The user's Hugging Face hub cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


# -- errors --------------------------------------------------------------------------------------
def _login_hint(repo: str) -> str:
    return (
        f"accept its terms at {endpoint()}/{repo} while logged in, then `hf auth login` "
        f"(or set HF_TOKEN) on this machine, and run the command again"
    )


@contextlib.contextmanager
def hub_errors(repo: str, what: str) -> Iterator[None]:
    """Turn huggingface_hub's and the transport's exceptions into one-line MixcliErrors."""
    from huggingface_hub import errors as he

    try:
        yield
    except MixcliError:
        raise
    except he.GatedRepoError:
        raise MixcliError(
            f"{repo} is a gated repo and the Hub refused access (401/403) while {what}", _login_hint(repo)
        ) from None
    except he.RepositoryNotFoundError:
        raise MixcliError(
            f"no model {repo} on the Hugging Face Hub ({endpoint()})",
            "check the name (owner/name, as in the repo's URL); a private repo also needs `hf auth login` or HF_TOKEN",
        ) from None
    except he.RevisionNotFoundError:
        raise MixcliError(f"{repo} has no such revision", "check the reference") from None
    except (he.OfflineModeIsEnabled, he.LocalEntryNotFoundError) as exc:
        if offline():
            raise MixcliError(
                f"HF_HUB_OFFLINE is set and {repo} is not in the Hugging Face cache ({hf_cache_dir()})",
                "unset HF_HUB_OFFLINE to download it",
            ) from None
        raise _unreachable(repo, what, exc) from None
    except he.HfHubHTTPError as exc:
        code = exc.response.status_code if exc.response is not None else None
        if code == 401:
            raise MixcliError(
                f"the Hub rejected the token while {what} {repo} (401)", "run `hf auth login` again or fix HF_TOKEN"
            ) from None
        if code in (403,):
            raise MixcliError(f"the Hub refused access to {repo} (403) while {what}", _login_hint(repo)) from None
        raise MixcliError(
            f"the Hub answered {code} while {what} {repo}",
            "try again later; files already downloaded are kept and resumed",
        ) from None
    except _transport_errors() as exc:
        raise _unreachable(repo, what, exc) from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP library's "could not talk to the server" exceptions (huggingface_hub 2.x uses
    httpx2, 1.x httpx, earlier requests), plus the standard library's."""
    import importlib

    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            m = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(m, n) for n in names if isinstance(getattr(m, n, None), type)]
    return tuple(found)


def _unreachable(repo: str, what: str, exc: BaseException) -> MixcliError:
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return MixcliError(
        f"cannot reach the Hugging Face Hub at {endpoint()} while {what} {repo} ({detail[:160]})",
        "check the network (or HF_ENDPOINT); run the command again to resume, "
        "or set HF_HUB_OFFLINE=1 to use only the Hugging Face cache",
    )


# -- listings --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RepoFile:
    name: str  # path in the repo
    size: int | None
    sha256: str | None = None  # LFS files: the content's sha256
    blob_id: str | None = None  # small files: the git blob id (sha1 of "blob <size>\0" + content)


@dataclass(frozen=True)
class RepoListing:
    repo: str
    commit: str
    files: dict[str, RepoFile]
    cached_only: bool = False  # listed from the local cache (HF_HUB_OFFLINE)


def list_repo(repo: str) -> RepoListing:
    """The repo's files at its current commit, with sizes and checksums; under HF_HUB_OFFLINE the
    files of the cached snapshot."""
    if offline():
        return _cached_listing(repo)
    from huggingface_hub import HfApi

    with hub_errors(repo, "listing"):
        info = HfApi(endpoint=endpoint()).model_info(repo, files_metadata=True)
    files = {}
    for s in info.siblings or []:
        lfs = s.lfs
        files[s.rfilename] = RepoFile(
            s.rfilename,
            s.size if s.size is not None else (lfs.size if lfs else None),
            lfs.sha256 if lfs else None,
            None if lfs else s.blob_id,
        )
    return RepoListing(repo, info.sha or "main", files)


def _cached_listing(repo: str) -> RepoListing:
    folder = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    ref = folder / "refs" / "main"
    commit = ref.read_text().strip() if ref.is_file() else None
    snap = folder / "snapshots" / commit if commit else None
    if snap is None or not snap.is_dir():
        raise MixcliError(
            f"HF_HUB_OFFLINE is set and {repo} is not in the Hugging Face cache ({hf_cache_dir()})",
            "unset HF_HUB_OFFLINE to download it",
        )
    files = {}
    for p in snap.rglob("*"):
        if p.is_file():
            name = p.relative_to(snap).as_posix()
            files[name] = RepoFile(name, p.stat().st_size)
    return RepoListing(repo, commit, files, cached_only=True)


def cached_file(listing: RepoListing, name: str) -> Path | None:
    """The file in the user's Hugging Face cache at the listing's commit, if it is there whole."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(listing.repo, name, cache_dir=str(hf_cache_dir()), revision=listing.commit)
    if not isinstance(found, str):
        return None
    size = listing.files[name].size
    return Path(found) if size is None or os.path.getsize(found) == size else None


# -- downloads ---------------------------------------------------------------------------------------
def file_hash(path: Path, algorithm="sha256") -> str:
    """Hex digest of a file, read in chunks (``algorithm``: a name, or a callable giving a hash object)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()


def _git_blob_id(path: Path) -> str:
    return file_hash(path, lambda: hashlib.sha1(f"blob {path.stat().st_size}\0".encode()))


def verify(path: Path, f: RepoFile) -> None:
    """Refuse (and delete) a downloaded file whose size or checksum differs from the listing."""
    got_size = path.stat().st_size
    if f.size is not None and got_size != f.size:
        path.unlink(missing_ok=True)
        raise MixcliError(
            f"download of {f.name} has {got_size} bytes, the Hub lists {f.size}; deleted it", "run the command again"
        )
    if f.sha256:
        kind, want, got = "sha256", f.sha256.lower(), file_hash(path)
    elif f.blob_id:
        kind, want, got = "git blob id", f.blob_id.lower(), _git_blob_id(path)
    else:
        return
    if got != want:
        path.unlink(missing_ok=True)
        raise MixcliError(
            f"checksum mismatch for {f.name}: {kind} {got}, the Hub lists {want}; deleted the download",
            "run the command again; if it repeats, the download path alters files: report it",
        )


def _open_part(part: Path):
    """The partial download, opened to append (its own function: tests stand a full disk in)."""
    return open(part, "ab")


def _lock(fh, name: str) -> None:
    """One writer per partial download: a second pull of the same file stops instead of
    appending to it (the lock goes with the file descriptor, also when a process dies)."""
    import fcntl

    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise MixcliError(
            f"another process is downloading {name} into the same place (a second `mixcli pull`?)",
            "wait for it to finish, then run the command again",
        ) from None


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def download(listing: RepoListing, name: str, dest: Path, notify: Notify | None = None) -> Path:
    """Download ``name`` at the listing's commit to ``dest`` (resuming ``dest.part`` if an earlier
    run was cut), verify it, and move it into place. Returns ``dest``."""
    from urllib.parse import urlsplit

    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    f = listing.files[name]
    if listing.cached_only:
        raise MixcliError(
            f"HF_HUB_OFFLINE is set and {name} of {listing.repo} is not in the Hugging Face cache",
            "unset HF_HUB_OFFLINE to download it",
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    url = hf_hub_url(listing.repo, name, revision=listing.commit, endpoint=endpoint())
    with hub_errors(listing.repo, f"looking up {name} in"):
        meta = get_hf_file_metadata(url, endpoint=endpoint())
    size = meta.size if meta.size is not None else f.size
    headers = build_hf_headers()
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # a signed CDN URL: the token stays with the Hub
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if notify:
        total = format_size(size) if size is not None else "unknown size"
        notify(f"resuming {name} at {format_size(have)} of {total}" if have else f"downloading {name} ({total})")
    try:
        with hub_errors(listing.repo, f"downloading {name} from"), _open_part(part) as fh:
            _lock(fh, name)
            http_get(
                meta.location,
                fh,
                resume_size=have,
                headers=headers,
                expected_size=size,
                displayed_filename=Path(name).name,
            )
    except OSError as exc:
        got = part.stat().st_size if part.exists() else 0
        of = f"{format_size(got)} of {format_size(size)}" if size else format_size(got)
        if exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(part.parent).free
            raise MixcliError(
                f"disk full while downloading {name} ({of} done, {format_size(free)} free in {part.parent})",
                "free some space and run the command again: the download resumes",
            ) from None
        raise MixcliError(
            f"download of {name} stopped at {of} ({str(exc).splitlines()[0][:160]})",
            "run the command again: the download resumes where it stopped",
        ) from None
    except MixcliError as exc:
        got = part.stat().st_size if part.exists() else 0
        if got:
            raise MixcliError(
                f"{exc.message}; {format_size(got)} of {format_size(size or 0)} kept in {part.name}", exc.hint
            ) from None
        raise
    verify(part, f)
    os.replace(part, dest)
    return dest


def fetch(
    listing: RepoListing, names: list[str], into: Path, notify: Notify | None = None
) -> tuple[dict[str, Path], set[str]]:
    """Bring ``names`` to disk: from the Hugging Face cache where they are there, else downloaded
    into ``into`` (kept files from an earlier ``--keep-source`` pull count as there).
    Returns ({name: path}, names that were downloaded into ``into``, now or earlier)."""
    paths: dict[str, Path] = {}
    ours: set[str] = set()
    for name in names:
        cached = cached_file(listing, name)
        if cached is not None:
            paths[name] = cached
            continue
        dest = into / name
        ours.add(name)
        if dest.is_file() and (listing.files[name].size in (None, dest.stat().st_size)):
            paths[name] = dest  # verified when it was downloaded
            continue
        paths[name] = download(listing, name, dest, notify)
    return paths, ours


def missing_bytes(listing: RepoListing, names: list[str], into: Path) -> int:
    """Bytes still to download for ``names`` (not in the HF cache, not already in ``into``)."""
    total = 0
    for name in names:
        f = listing.files[name]
        if cached_file(listing, name) is not None or (into / name).is_file():
            continue
        part = part_path(into / name)
        total += max((f.size or 0) - (part.stat().st_size if part.exists() else 0), 0)
    return total


# -- what to download ----------------------------------------------------------------------------------
def gguf_label(name: str) -> str:
    """The quant label of a GGUF file name, llama.cpp's convention: the last ``-`` or ``.``
    separated part of the name (shard suffix dropped), e.g. ``Q4_K_M``."""
    stem = Path(name).name[: -len(".gguf")]
    m = SHARD_RE.match(stem)
    if m:
        stem = m.group("stem")
    return re.split(r"[-.]", stem)[-1]


def gguf_groups(listing: RepoListing) -> dict[str, list[str]]:
    """label (upper case) -> the files of that quant (a shard set sorted, or one file)."""
    groups: dict[str, list[str]] = {}
    for name in sorted(listing.files):
        if name.lower().endswith(".gguf") and "mmproj" not in name.lower():
            groups.setdefault(gguf_label(name).upper(), []).append(name)
    return groups


def choose_gguf(ref: HubRef, listing: RepoListing) -> tuple[str, list[str]]:
    """(label, files) of the GGUF quant ``ref.tag`` names (case-insensitive); without a tag
    Q4_K_M (llama.cpp's default), else the repo's only quant."""
    groups = gguf_groups(listing)
    labels = ", ".join(sorted(groups))
    if ref.tag:
        files = groups.get(ref.tag.upper())
        if files is None:
            raise MixcliError(
                f"{ref.repo} has no GGUF file for :{ref.tag} (it has {labels})",
                f"pick one of those, e.g. mixcli pull {ref.repo}:{sorted(groups)[0]}",
            )
        label = ref.tag.upper()
    elif "Q4_K_M" in groups:
        label, files = "Q4_K_M", groups["Q4_K_M"]
    elif len(groups) == 1:
        label, files = next(iter(groups.items()))
    else:
        raise UsageError(
            f"{ref.repo} has several GGUF quants ({labels}): name one",
            f"e.g. mixcli pull {ref.repo}:{sorted(groups)[0]}",
        )
    shards = [n for n in files if SHARD_RE.match(Path(n).name[:-5])]
    if shards and len(shards) != len(files):
        raise MixcliError(
            f"{ref.repo} has both split and whole GGUF files for {label} ({', '.join(files)})",
            "download the one you want yourself and run `mixcli convert FILE -o DIR`",
        )
    if not shards and len(files) > 1:
        raise MixcliError(
            f"{ref.repo} has {len(files)} GGUF files for {label} ({', '.join(files)})",
            "download the one you want yourself and run `mixcli convert FILE -o DIR`",
        )
    if shards:
        count = int(SHARD_RE.match(Path(shards[0]).name[:-5]).group("count"))
        if len(shards) != count:
            raise MixcliError(
                f"{ref.repo} lists {len(shards)} of the {count} shards of {label}",
                "the repo is incomplete: pick another quant or repo",
            )
    return label, files


def safetensors_files(listing: RepoListing, index: dict | None) -> list[str]:
    """The files converting this repo needs: config, weights (the shards its index names, else
    model.safetensors, else the root's *.safetensors but Mistral's consolidated ones), tokenizer."""
    from quant.formats import TOKENIZER_FILES

    root = [n for n in listing.files if "/" not in n]
    if index is not None:
        weights = sorted(set(index.get("weight_map", {}).values()))
        unknown = [w for w in weights if w not in listing.files]
        if unknown:
            raise MixcliError(
                f"{listing.repo}'s model.safetensors.index.json names {unknown[0]}, which the repo lacks",
                "the repo is incomplete: report it to its owner",
            )
        weights = ["model.safetensors.index.json", *weights]
    elif "model.safetensors" in listing.files:
        weights = ["model.safetensors"]
    else:
        weights = sorted(n for n in root if n.endswith(".safetensors") and not n.startswith("consolidated"))
    extra = [n for n in (*TOKENIZER_FILES, "chat_template.jinja") if n in listing.files]
    return ["config.json", *weights, *extra]


def repo_kind(listing: RepoListing) -> str:
    """ "gguf" or "safetensors"; an error for a repo mixcli cannot use."""
    has_st = "config.json" in listing.files and any(n.endswith(".safetensors") for n in listing.files)
    has_gguf = bool(gguf_groups(listing))
    if has_gguf and not has_st:
        return "gguf"
    if has_st:
        return "safetensors"
    pickles = [n for n in listing.files if n.endswith((".bin", ".pt", ".pth"))]
    raise MixcliError(
        f"{listing.repo} has neither GGUF files nor safetensors weights"
        + (f" (only pickle files like {pickles[0]}, which mixcli never loads)" if pickles else ""),
        "pick a repo with .gguf or .safetensors files",
    )

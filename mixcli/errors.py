"""User-facing errors: one line that names the problem and what to do about it.

The CLI catches ``MixcliError`` and prints ``error: <message>`` to stderr with the exit code the
error carries; anything else is a bug and keeps its traceback only under ``--debug``.
"""
from __future__ import annotations

# Exit codes, the same for every command (documented in README and `mixcli --help`).
EXIT_OK = 0
EXIT_ERROR = 1  # the model, checkpoint or file is wrong (a MixcliError)
EXIT_USAGE = 2  # bad flags or arguments (typer/click use 2 as well)
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


class MixcliError(Exception):
    """A problem the user can fix; ``str(err)`` is the whole one-line message."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class UsageError(MixcliError):
    """A bad flag value or argument."""

    exit_code = EXIT_USAGE


class CheckpointError(MixcliError):
    """The source checkpoint cannot be converted as it is."""


class ModelFormatError(MixcliError):
    """A converted model directory is missing, incomplete or of another format version."""

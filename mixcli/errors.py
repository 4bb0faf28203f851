"""User-facing errors: one line that names the problem and what to do about it.

The CLI catches a ``MixcliError`` or one of quant's errors (``quant.errors``: the converter and the
format have their own, since quant never imports mixcli), prints ``error: <message>`` to stderr and
exits with ``exit_code(err)``; anything else is a bug and keeps its traceback only under ``--debug``.
"""

from __future__ import annotations

from quant.errors import (
    ArgumentError,
    CheckpointError,
    ConversionInterrupted,
    FormatError,
    OutputError,
    QuantError,
)

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "USER_ERRORS",
    "ArgumentError",
    "CheckpointError",
    "ConversionInterrupted",
    "FormatError",
    "MixcliError",
    "ModelFormatError",
    "OutputError",
    "QuantError",
    "UsageError",
    "exit_code",
]

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


class ModelFormatError(MixcliError):
    """A converted model directory is missing, incomplete or of another format version."""


# Every error that is the user's to fix: the CLI prints it as one line, a library caller catches these.
USER_ERRORS: tuple[type[Exception], ...] = (MixcliError, QuantError)

# quant's errors by kind -> exit code; any other QuantError is a file problem (EXIT_ERROR)
_QUANT_EXIT_CODES: tuple[tuple[type[QuantError], int], ...] = (
    (ArgumentError, EXIT_USAGE),
    (ConversionInterrupted, EXIT_INTERRUPTED),
)


def exit_code(err: BaseException) -> int:
    """The exit code for a user error: a MixcliError carries its own, quant's map by kind."""
    if isinstance(err, MixcliError):
        return err.exit_code
    return next((code for kind, code in _QUANT_EXIT_CODES if isinstance(err, kind)), EXIT_ERROR)

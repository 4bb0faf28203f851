"""quant's errors: a problem with an input or an output that the user can fix, as one line.

quant is the offline half (the format, the quantizers, the converters) and imports nothing from
``mixcli``, so its errors are its own. ``str(err)`` is the whole message, ``message (hint)``;
``mixcli.errors.exit_code`` gives each kind the CLI's exit code, and the CLI prints it as
``error: <message> (<hint>)``.
"""

from __future__ import annotations


class QuantError(Exception):
    """A problem the user can fix: ``message`` names it, ``hint`` says what to do."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class CheckpointError(QuantError):
    """The source checkpoint (a safetensors directory or a GGUF file) cannot be converted as it is."""


class FormatError(QuantError, ValueError):
    """A converted model breaks a rule of the format (``quant.formats.check_manifest``)."""

    def __init__(self, message: str, hint: str | None = "convert the model again with `mixcli convert`"):
        super().__init__(message, hint)


class ArgumentError(QuantError):
    """A converter argument that cannot work: an unknown quantization, an output inside the source."""


class OutputError(QuantError):
    """The output cannot be written: it exists, another process is writing it, the disk is full."""


class ConversionInterrupted(QuantError):
    """Ctrl-C during a conversion; nothing was left behind."""

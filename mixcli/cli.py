"""The `mixcli` command: thin Typer commands that parse, call the library, and render.

Every command reports a problem as one line on stderr, ``error: <what> (<what to do>)``, and exits
with ``mixcli.errors.exit_code``: 1 for a model/checkpoint/file problem, 2 for bad usage, 130 for
Ctrl-C. A Python traceback appears only with ``--debug``. Heavy modules are imported inside the
commands so ``mixcli --help`` and the first token come quickly.
"""

from __future__ import annotations

import errno
import os
import signal
import sys


def _interrupted_while_starting(signum, frame) -> None:
    """Ctrl-C while the imports run (before main() restores Python's handler): no traceback."""
    sys.stderr.write("error: interrupted\n")
    os._exit(130)


def _started_as_program() -> bool:
    """`mixcli ...` or `python -m mixcli ...`, not an import by a program with its own Ctrl-C plans."""
    argv0 = sys.argv[0] if sys.argv else ""
    return os.path.basename(argv0) == "mixcli" or argv0.endswith(os.path.join("mixcli", "__main__.py"))


if _started_as_program() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_starting)

from typing import Annotated  # noqa: E402

import typer  # noqa: E402

from .errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, USER_ERRORS, exit_code  # noqa: E402

# numba colours its own error messages through colorama.init(), whose exit hook then writes ESC[0m
# after the last line on a terminal (even with NO_COLOR): mixcli's output ends where its text ends
os.environ.setdefault("NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING", "1")

app = typer.Typer(
    name="mixcli",
    help="Run Mixtral-class Mixture-of-Experts models on a CPU from 4-bit memory-mapped weights.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_DEBUG = False


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False,
):
    """mixcli: exit codes are 0 ok, 1 model/file error, 2 bad usage, 130 interrupted."""
    global _DEBUG
    _DEBUG = _DEBUG or debug  # main() strips --debug from anywhere on the line and sets it first


def _register() -> None:
    """Adds the commands to ``app``, once per process: ``main`` may run many times in one process
    (the tests, a program embedding the CLI), and typer would keep every duplicate."""
    if app.registered_commands:
        return
    from .commands.convert import convert_command
    from .commands.generate import generate_command
    from .commands.models import models_command, pull_command

    app.command("convert", help=convert_command.__doc__)(convert_command)
    app.command("models")(models_command)
    app.command("pull")(pull_command)
    app.command("generate")(generate_command)
    from .commands.bench import bench_command, perplexity_command

    app.command("bench")(bench_command)
    app.command("perplexity")(perplexity_command)
    from .commands.experts import experts_command

    app.command("experts")(experts_command)
    from .commands.serve import serve_command

    app.command("serve")(serve_command)
    from .commands.batch_cmd import batch_command

    app.command("batch")(batch_command)
    from .commands.verify import verify_command

    app.command("verify")(verify_command)
    from .commands.chat import chat_command  # a broken command module is a bug: fail loudly

    app.command("chat")(chat_command)


def _reflow_help() -> None:
    """Docstrings wrap at the source's width; the help should wrap at the terminal's. Joins each
    paragraph into one line (typer shows the first paragraph as the command's one-line summary)."""
    import inspect

    for info in app.registered_commands:
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if doc:
            info.help = "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


def _err(msg: str) -> None:
    from .progress import wrap_for  # on a terminal, between words; in a pipe, one line as it is

    sys.stderr.write(wrap_for(sys.stderr, f"error: {msg}") + "\n")
    sys.stderr.flush()


def _click_exceptions() -> tuple[type, ...]:
    """Typer >= 0.20 raises its own bundled copy of click's exceptions; older ones raise click's."""
    found = []
    try:
        from typer._click.exceptions import ClickException as Bundled

        found.append(Bundled)
    except ImportError:
        pass
    try:
        from click import ClickException

        found.append(ClickException)
    except ImportError:
        pass
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turn known failures into one line and an exit code."""
    global _DEBUG
    args = list(sys.argv[1:] if argv is None else argv)
    _DEBUG = "--debug" in args
    args = [a for a in args if a != "--debug"]  # accepted anywhere on the line
    try:
        _register()
        _reflow_help()
        if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on Ctrl-C is KeyboardInterrupt
        rv = app(args=args, standalone_mode=False, prog_name="mixcli")
        code = rv if isinstance(rv, int) else 0
        if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into a quiet return of 130
            _err("interrupted")
    except typer.Abort:
        _err("interrupted")
        code = EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if _DEBUG:
            raise
        _err("interrupted")
        code = EXIT_INTERRUPTED
    except typer.Exit as exc:
        code = exc.exit_code
        if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into a quiet Exit(130)
            _err("interrupted")
    except _click_exceptions() as exc:
        code = exc.exit_code if exc.exit_code else EXIT_USAGE
        if type(exc).__name__ == "NoArgsIsHelpError" or _DEBUG:
            exc.show()  # bare `mixcli`: the help text
        else:
            ctx = getattr(exc, "ctx", None)
            where = f"{ctx.command_path} --help" if ctx is not None else "mixcli --help"
            _err(f"{exc.format_message()} (see '{where}')")
    except BrokenPipeError:
        code = 0  # `mixcli generate ... | head`: the reader left, which is not an error
        _silence_stdout()
    except SystemExit as exc:
        if type(sys.stdout).__name__ != "PacifyFlushWrapper":
            raise
        # click met EPIPE on stdout, wrapped the streams and exits 1; a closed pipe is no error here
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        _silence_stdout()
        code = 0 if exc.code == 1 else exc.code
    except OSError as exc:  # a full disk or an I/O error under stdout, or anything else the OS refused
        if _DEBUG:
            raise
        if exc.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG) and exc.filename is None:
            _err(
                f"cannot write the output: {exc.strerror} (free space on the disk that stdout goes to, or write elsewhere)"
            )
            _silence_stdout()
        else:
            _err(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
        code = EXIT_ERROR
    except USER_ERRORS as exc:  # a MixcliError, or one of quant's (a bad checkpoint, a damaged model)
        if _DEBUG:
            raise
        _err(str(exc))
        code = exit_code(exc)
    try:
        sys.stdout.flush() if not sys.stdout.closed else None
    except BrokenPipeError:
        _silence_stdout()
    except OSError as exc:
        _err(f"cannot write the output: {exc.strerror}")
        _silence_stdout()
        code = code or EXIT_ERROR
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what is still buffered cannot
    fail again at exit (Python's own advice for a closed pipe)."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError):
        pass


def entry() -> None:
    sys.exit(main())

"""vmvault's entry point: global options anywhere, errors as `error [code]: message` + `hint:`."""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from vmvault.errors import InternalError, InvalidInput, VmvaultError
from vmvault.settings import debug_enabled

EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    from vmvault.memory import bound_native_heap

    bound_native_heap()
    _exit(run(list(sys.argv[1:] if argv is None else argv)))


def _exit(code: int) -> NoReturn:
    """End a finished command without tearing the interpreter down object by object.

    A one-shot command has loaded SQLAlchemy, the CLI framework and often an object-store SDK;
    the interpreter's own teardown frees all of it one object at a time, about 0.3 s of a 1.5 s
    `restore disks` (docs/performance.md). Everything a normal exit does that matters still
    happens: the atexit handlers run (logging's flush, temporary directories, weakref
    finalizers), garbage cycles are collected (closing any file only they hold) and the standard
    streams are flushed. SQLite needs no close for what was committed (its journal is crash-safe).
    While another non-daemon thread runs, the ordinary exit waits for it as it always did.
    """
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if others or os.environ.get("VMVAULT_FULL_EXIT"):
        sys.exit(code)
    atexit._run_exitfuncs()
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing more to say
            stream.flush()
    os._exit(code)


def run(argv: list[str]) -> int:
    """Run one command line; returns the exit code."""
    from vmvault.cli import output
    from vmvault.cli.state import STATE, split_globals

    if debug_enabled():
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    try:
        state, rest = split_globals(argv)
        STATE.output, STATE.home, STATE.server, STATE.query = state.output, state.home, state.server, state.query
        return _invoke(rest)
    except VmvaultError as exc:
        output.print_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        output.info("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as exc:  # the last line of defence: no traceback unless VMVAULT_DEBUG=1
        known = _known_error(exc)
        if known is not None:
            output.print_error(known)
            return known.exit_code
        return _unexpected(exc)


def _invoke(args: list[str]) -> int:
    import typer

    from vmvault.cli.app import app

    command = typer.main.get_command(app)
    try:
        result = command.main(args=args, prog_name="vmvault", standalone_mode=False)
    except typer.Abort:
        return EXIT_INTERRUPTED
    except typer.TyperException as exc:
        return _usage_error(exc)
    return result if isinstance(result, int) else 0


def _usage_error(exc: Exception) -> int:
    """Typer/Click usage errors in vmvault's error format (exit 64, like InvalidInput)."""
    from vmvault.cli import output

    ctx = getattr(exc, "ctx", None)
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    if type(exc).__name__ == "NoArgsIsHelpError":
        if message.strip():  # Rich help is printed while the error is built; plain help is its message
            sys.stdout.write(message + "\n")
        return 0
    where = ctx.command_path if ctx is not None else "vmvault"
    output.print_error(InvalidInput(message, hint=f"see: {where} --help"))
    return InvalidInput.exit_code


def _known_error(exc: Exception) -> VmvaultError | None:
    if "sqlalchemy" not in sys.modules:
        return None
    from vmvault.catalog.db import translate_db_error

    return translate_db_error(exc)


def _unexpected(exc: Exception) -> int:
    from vmvault.cli import output

    if debug_enabled():
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    error = InternalError(
        f"unexpected error: {type(exc).__name__}: {exc}",
        hint="rerun with VMVAULT_DEBUG=1 to see the traceback, and report it",
    )
    output.print_error(error)
    return error.exit_code


if __name__ == "__main__":
    main()

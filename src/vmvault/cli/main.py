"""vmvault's entry point: global options anywhere, errors as `error [code]: message` + `hint:`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from vmvault.errors import InternalError, InvalidInput, VmvaultError
from vmvault.settings import debug_enabled

EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    from vmvault.memory import bound_native_heap

    bound_native_heap()
    sys.exit(run(list(sys.argv[1:] if argv is None else argv)))


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

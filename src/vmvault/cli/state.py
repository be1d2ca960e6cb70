"""Global CLI options (-o, --query, --home, --server), pulled out of argv wherever they appear."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmvault.errors import InvalidInput

if TYPE_CHECKING:
    from vmvault.service.context import Context

OUTPUT_FORMATS = ("table", "json", "tsv", "csv")
_VALUED = {"-o": "output", "--output": "output", "--home": "home", "--server": "server", "--query": "query"}


@dataclass
class CliState:
    output: str = "table"
    home: str | None = None
    server: str | None = None  # --server URL: commands with a remote form call its API
    query: str | None = None  # --query JMESPATH: applied to the JSON before it is printed (as az)

    @property
    def json(self) -> bool:
        return self.output == "json"

    @property
    def structured(self) -> bool:
        """Print the data itself (JSON, TSV or a --query's result), not vmvault's human table."""
        return self.output != "table" or self.query is not None


STATE = CliState()


def split_globals(argv: list[str]) -> tuple[CliState, list[str]]:
    """Take -o/--output and --home (as `-o json`, `-o=json`, `-ojson`) out of argv, before `--`."""
    state, rest, i = CliState(), [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        flag, eq, value = arg.partition("=")
        if flag in _VALUED:
            if not eq:
                if i + 1 >= len(argv):
                    raise InvalidInput(f"option {flag} needs a value", hint=_hint_for(flag))
                value, i = argv[i + 1], i + 1
            if flag == "-o" and value.lower() not in OUTPUT_FORMATS and _is_files_script(argv):
                rest.extend(["--file", value])  # `files script -o FILE`, as the issue words it
            else:
                setattr(state, _VALUED[flag], value)
        elif arg.startswith("-o") and not arg.startswith("--") and len(arg) > 2:
            state.output = arg[2:]
        else:
            rest.append(arg)
        i += 1
    state.output = _check_output(state.output)
    if state.query is not None:
        _check_query(state.query)
    return state, rest


def _check_query(expression: str) -> None:
    """Refuse a --query that is not JMESPath before anything runs."""
    import jmespath
    from jmespath.exceptions import JMESPathError

    try:
        jmespath.compile(expression)
    except JMESPathError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInput(
            f"--query '{expression}' is not a JMESPath expression: {message}",
            hint="see https://jmespath.org, e.g. --query \"[?properties.status=='Completed'].name\"",
        ) from None


def _is_files_script(argv: list[str]) -> bool:
    words = [a for a in argv if not a.startswith("-")]
    return any(words[i : i + 2] == ["files", "script"] for i in range(len(words)))


def _hint_for(flag: str) -> str:
    hints = {"--home": "e.g. --home /var/lib/vmvault", "--server": "e.g. --server http://127.0.0.1:8080",
             "--query": "e.g. --query [0].name"}  # fmt: skip
    return hints.get(flag, "e.g. -o json")


def _check_output(value: str) -> str:
    lowered = value.lower()
    if lowered not in OUTPUT_FORMATS:
        raise InvalidInput(f"unknown output format '{value}'", hint="use -o table, -o json, -o tsv or -o csv")
    return lowered


@contextmanager
def service_context() -> Iterator[Context]:
    """The service context for the global --home (imports the service layer lazily)."""
    from vmvault.service.context import context
    from vmvault.settings import load_settings

    if STATE.server is not None:
        raise InvalidInput(
            f"this command does not run against a server (--server {STATE.server}) yet",
            hint="run it on the server itself, or call the API there (docs/api.md)",
        )

    with context(load_settings(STATE.home)) as ctx:
        yield ctx

"""Printing results (JSON or Rich tables on stdout) and errors (stderr)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from vmvault.cli.state import STATE
from vmvault.errors import VmvaultError

JsonDict = dict[str, Any]

VAULT_COLUMNS = ("name", "redundancy", "storageDir", "protectedItems", "recoveryPoints", "created")
VM_COLUMNS = ("name", "kind", "disks", "vault", "protectionState", "lastRecoveryPoint")
JOB_COLUMNS = ("id", "operation", "status", "vm", "vault", "startTime", "durationSeconds")
RP_COLUMNS = ("id", "time", "consistency", "expires")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
        return ", ".join(str(v["name"]) for v in value)
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _print_table(table: Any) -> None:
    """Render a Rich table to stdout without the trailing padding Rich adds to every line."""
    import io

    from rich.console import Console

    tty = sys.stdout.isatty()
    buffer = io.StringIO()
    console = Console(file=buffer, highlight=False, soft_wrap=False, force_terminal=tty, width=_width(tty))
    console.print(table)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines()))


def _width(tty: bool) -> int:
    import shutil

    return shutil.get_terminal_size().columns if tty else 250


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def print_list(rows: Sequence[JsonDict], columns: Sequence[str]) -> None:
    """A JSON array with -o json, else a table of the given columns."""
    if STATE.json:
        print_json(list(rows))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(Text(_cell(row.get(c))) for c in columns))
    _print_table(table)


def print_object(obj: JsonDict) -> None:
    """A JSON object with -o json, else one `key  value` line per field."""
    if STATE.json:
        print_json(obj)
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in _flatten(obj):
        table.add_row(Text(key), Text(_cell(value)))
    _print_table(table)


def _flatten(obj: JsonDict, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in obj.items():
        if isinstance(value, dict):
            items.extend(_flatten(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def info(message: str) -> None:
    """A human note on stderr (never mixed into the JSON on stdout)."""
    sys.stderr.write(message + "\n")


def print_error(error: VmvaultError) -> None:
    """`error [code]: message` and `hint: ...` on stderr; with -o json also {"error": {...}}."""
    print_error_dict(error.to_dict())


def print_error_dict(error: JsonDict) -> None:
    lines = [f"error [{error.get('code')}]: {error.get('message')}"]
    if error.get("recommendedAction"):
        lines.append(f"hint: {error['recommendedAction']}")
    if STATE.json:
        lines.append(json.dumps({"error": error}))
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()

"""Printing results (JSON or Rich tables on stdout) and errors (stderr)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from vmvault.cli.state import STATE
from vmvault.errors import VmvaultError

JsonDict = dict[str, Any]
# Table columns: a key, or a dotted path into the object ("properties.status"), optionally with
# its header as ("header", "path"); the header of a path is its last part.
Column = str | tuple[str, str]

VAULT_COLUMNS: tuple[Column, ...] = (
    "name", ("redundancy", "properties.redundancy"), ("storageDir", "properties.storageDir"),
    ("protectedItems", "properties.protectedItems"), ("recoveryPoints", "properties.recoveryPoints"),
    ("created", "properties.created"),
)  # fmt: skip
VM_COLUMNS = ("name", "kind", "disks", "vault", "protectionState", "lastRecoveryPoint")
JOB_COLUMNS: tuple[Column, ...] = (
    ("id", "name"), "properties.operation", "properties.status", ("vm", "properties.entityFriendlyName"),
    ("vault", "properties.vaultName"), "properties.startTime", "properties.duration",
)  # fmt: skip
RP_COLUMNS: tuple[Column, ...] = (
    ("id", "name"), ("time", "properties.recoveryPointTime"), ("consistency", "properties.recoveryPointType"),
    ("expires", "properties.recoveryPointProperties.expiryTime"),
)  # fmt: skip


def _header(column: Column) -> str:
    return column[0] if isinstance(column, tuple) else column.rsplit(".", 1)[-1]


def _value(row: Any, column: Column) -> Any:
    path = column[1] if isinstance(column, tuple) else column
    for key in path.split("."):
        if not isinstance(row, dict):
            return None
        row = row.get(key)
    return row


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
    """Data as -o json|tsv|table prints it, after --query (az's rules: see _tsv and _auto_table)."""
    if STATE.query is not None:
        import jmespath

        data = jmespath.search(STATE.query, data)
    if STATE.output == "tsv":
        sys.stdout.write(_tsv(data if isinstance(data, list) else [data], ordered=STATE.query is not None))
    elif STATE.output == "csv":
        sys.stdout.write(_csv(data if isinstance(data, list) else [data]))
    elif STATE.output == "table":
        _auto_table(data if isinstance(data, list) else [data])
    else:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _csv(rows: list[Any]) -> str:
    """-o csv: a header of the rows' top-level keys, one line per row (nested values as JSON); a cell
    that a spreadsheet would take for a formula (=, +, -, @) is prefixed with ' so it stays text."""
    import csv
    import io

    records = [r if isinstance(r, dict) else {"value": r} for r in rows]
    keys: list[str] = []
    for record in records:
        keys += [k for k in record if k not in keys]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(keys)
    for record in records:
        writer.writerow([_csv_cell(record.get(k)) for k in keys])
    return out.getvalue()


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        text = json.dumps(value)
    else:
        text = str(value).lower() if isinstance(value, bool) else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@") and not _is_number(text) else text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _tsv(rows: list[Any], *, ordered: bool) -> str:
    """az's -o tsv (knack's _TsvOutput): one line per item, its top-level values tab-separated.

    A dict's values come sorted by key (in their own order after --query, as knack's OrderedDict);
    a nested list prints its length, a nested object nothing, None "None", a lone bool true/false.
    """

    def cell(value: Any) -> str:
        if isinstance(value, list):
            return str(len(value))
        return "" if isinstance(value, dict) else str(value)

    lines = []
    for row in rows:
        if isinstance(row, dict):
            values = list(row.values()) if ordered else [v for _, v in sorted(row.items())]
            lines.append("\t".join(cell(v) for v in values))
        elif isinstance(row, list):
            lines.append("\t".join(cell(v) for v in row))
        elif isinstance(row, bool):
            lines.append(str(row).lower())
        else:
            lines.append(cell(row))
    return "".join(line + "\n" for line in lines)


def _auto_table(rows: list[Any]) -> None:
    """az's table of a --query result: each object's scalar fields (not id, type, etag), capitalised."""
    records: list[dict[str, Any]] = []
    for row in rows:
        if isinstance(row, dict):
            skip = ("id", "type", "etag")
            fields = {k: v for k, v in row.items() if k not in skip and v is not None}
            fields = {k: v for k, v in fields.items() if not isinstance(v, dict | list)}
            records.append({(k[:1].upper() + k[1:]): v for k, v in fields.items()})
        elif isinstance(row, list):
            records.append({f"Column{i + 1}": v for i, v in enumerate(row)})
        else:
            records.append({"Result": row})
    headers: list[str] = []
    for record in records:
        headers.extend(h for h in record if h not in headers)
    if not headers:
        return
    cells = [[_cell(r.get(h)) for h in headers] for r in records]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in lines))


def print_list(rows: Sequence[JsonDict], columns: Sequence[Column]) -> None:
    """A JSON array with -o json (or tsv, or --query's result), else a table of the given columns."""
    if STATE.structured:
        print_json(list(rows))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(_header(column), overflow="fold")
    for row in rows:
        table.add_row(*(Text(_cell(_value(row, c))) for c in columns))
    _print_table(table)


def print_object(obj: JsonDict) -> None:
    """A JSON object with -o json (or tsv, or --query's result), else one `key  value` line per field."""
    if STATE.structured:
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

"""`vmvault report`: backup success, data transferred, growth, durations and RPO breaches per item and vault."""

from __future__ import annotations

from typing import Annotated

import typer

from vmvault.cli import output
from vmvault.cli.app import app
from vmvault.cli.state import STATE, service_context

COLUMNS = ("scope", "vault", "item", "backups", "successRate", "bytesTransferred", "storedGrowthBytes",
           "averageDurationSeconds", "longestDurationSeconds", "rpoBreaches")  # fmt: skip


@app.command("report")
def report(
    days: Annotated[int, typer.Option("--days", help="The period: the last N days, up to now (1-3660).")] = 30,
) -> None:
    """Per protected item and per vault over the period (-o json: the whole report; -o csv: its rows)."""
    from vmvault.cli import remote
    from vmvault.service import reports

    if remote.active():
        data = remote.get("/reports", days=days)
    else:
        with service_context() as ctx:
            data = reports.backup_report(ctx, days)
    if STATE.output == "csv" and STATE.query is None:
        output.print_json(data["rows"])
    elif STATE.structured:
        output.print_json(data)
    else:
        output.print_list(data["rows"], COLUMNS)

"""Backup reports: per protected item and per vault over a period (CLI `vmvault report`, API, portal).

For each item (a VM in a vault) and each vault: backups run, succeeded, success rate, data
transferred (bytes written to the vault), stored growth (the stored size of the newest point at
the end of the period minus at its start), average and longest backup duration, and RPO breaches
(alerts raised in the period by service/rpo.py, plus "late now" from the same rule).
"""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import from_iso, seconds_between, to_iso
from vmvault.catalog.models import AlertRow, JobRow
from vmvault.errors import InvalidInput
from vmvault.service import rpo
from vmvault.service.context import Context
from vmvault.service.jobs import Operation, Status
from vmvault.service.views import JsonDict

COLUMNS = (
    "scope", "vault", "item", "backups", "succeeded", "failed", "successRate", "bytesTransferred",
    "storedGrowthBytes", "averageDurationSeconds", "longestDurationSeconds", "rpoBreaches", "rpoBreachedNow",
)  # fmt: skip
MAX_DAYS = 3660


def period_days(days: int) -> int:
    if not 1 <= days <= MAX_DAYS:
        raise InvalidInput(
            f"a report covers 1 to {MAX_DAYS} days, not {days}", hint="choose a period of 7, 30 or 90 days"
        )
    return days


def backup_report(ctx: Context, days: int = 30) -> JsonDict:
    """The report of the last `days` days (UTC, up to now): rows per item, then per vault."""
    end = ctx.now()
    start = end - timedelta(days=period_days(days))
    with ctx.catalog.read() as s:
        backups = s.scalars(
            select(JobRow).where(JobRow.operation == Operation.BACKUP, JobRow.start_time >= to_iso(start))
        ).all()
        alerts = s.scalars(
            select(AlertRow).where(AlertRow.kind == rpo.RPO_BREACHED, AlertRow.raised >= to_iso(start))
        ).all()
        vault_names = {v.id: v.name for v in repos.list_vaults(s)}
        growth = _growth(s, start, vault_names)
    late = {(r.vault, r.vm) for r in rpo.item_rpos(ctx, end) if r.breached}
    keys = {(j.vault or "", j.vm or "") for j in backups} | set(growth) | late
    keys |= {(vault_names.get(a.vault_id, ""), a.vm_name) for a in alerts}
    rows = [_row("item", vault, vm, [j for j in backups if (j.vault, j.vm) == (vault, vm)],
                 sum(1 for a in alerts if (vault_names.get(a.vault_id), a.vm_name) == (vault, vm)),
                 growth.get((vault, vm), 0), (vault, vm) in late) for vault, vm in sorted(keys)]  # fmt: skip
    for vault in sorted({k[0] for k in keys}):
        mine = [r for r in rows if r["vault"] == vault]
        rows.append(_vault_row(vault, mine, [j for j in backups if j.vault == vault]))
    return {"from": to_iso(start), "to": to_iso(end), "days": days, "rows": rows}


def _growth(s: Session, start: datetime, vault_names: dict[int, str]) -> dict[tuple[str, str], int]:
    """Stored size of each VM's newest point now minus at the period's start (soft-deleted points too)."""
    out: dict[tuple[str, str], int] = {}
    vm_names = {v.id: v.name for v in repos.list_vms(s)}
    for vault_id, vault in vault_names.items():
        before: dict[str, int] = {}
        after: dict[str, int] = {}
        for p in sorted(repos.recovery_points_in_vault(s, vault_id), key=lambda p: p.time):
            stored = sum(int(d.get("storedBytes") or 0) for d in p.disks)
            after[p.vm_id] = stored
            if from_iso(p.time) < start:
                before[p.vm_id] = stored
        for vm_id, size in after.items():
            out[(vault, vm_names.get(vm_id, vm_id))] = size - before.get(vm_id, 0)
    return out


def _row(scope: str, vault: str, vm: str, runs: list[JobRow], breaches: int, growth: int, late: bool) -> JsonDict:
    ended = [j for j in runs if j.end_time]
    ok = [j for j in ended if j.status in (Status.COMPLETED, Status.COMPLETED_WITH_WARNINGS)]
    durations = [seconds_between(j.start_time, j.end_time) for j in ended]
    return {
        "scope": scope,
        "vault": vault,
        "item": vm,
        "backups": len(ended),
        "succeeded": len(ok),
        "failed": len(ended) - len(ok),
        "successRate": round(len(ok) / len(ended), 4) if ended else None,
        "bytesTransferred": sum(int((j.progress or {}).get("bytesWritten", 0)) for j in ended),
        "storedGrowthBytes": growth,
        "averageDurationSeconds": round(sum(durations) / len(durations), 1) if durations else None,
        "longestDurationSeconds": round(max(durations), 1) if durations else None,
        "rpoBreaches": breaches,
        "rpoBreachedNow": late,
    }


def _vault_row(vault: str, items: list[JsonDict], runs: list[JobRow]) -> JsonDict:
    row = _row("vault", vault, "", runs, sum(int(r["rpoBreaches"]) for r in items), 0, False)
    row["storedGrowthBytes"] = sum(int(r["storedGrowthBytes"]) for r in items)
    row["rpoBreachedNow"] = sum(1 for r in items if r["rpoBreachedNow"])
    return row


def report_csv(report: JsonDict) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in report["rows"]:
        # a formula-looking cell (a VM named "=cmd") stays text in a spreadsheet
        writer.writerow({k: _cell(row[k]) for k in COLUMNS})
    return out.getvalue()


def _cell(value: object) -> object:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return "" if value is None else value

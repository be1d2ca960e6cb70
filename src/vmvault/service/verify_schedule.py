"""Scheduled verification: every vault re-read and authenticated a slice at a time.

Like PBS verify jobs or Veeam health checks: with a period of N days (`serve --verify-every N`),
each day a Verify job of each vault deep-checks ceil(points / N) of its recovery points, those
verified longest ago (never verified first), so every point is re-read within N days. The job
is an ordinary Verify job (details.trigger "Scheduled", details.points), so a failure ends it
Failed, is notified to the vault's targets like any failed job, and is recorded on the affected
points (verify_state Failed: restores refuse them until a later verify passes).
"""

from __future__ import annotations

import logging
import math
import threading
from datetime import datetime, timedelta

from sqlalchemy import select

from vmvault.catalog import repos
from vmvault.catalog.clock import from_iso
from vmvault.catalog.models import JobRow, RecoveryPointRow, VaultRow
from vmvault.errors import Cancelled, InvalidInput
from vmvault.service.context import Context
from vmvault.service.jobs import JobOutcome, JobRun, Operation, create_job, run_job
from vmvault.service.vaultio import opened_vault
from vmvault.service.views import JsonDict

log = logging.getLogger("vmvault")

DEFAULT_PERIOD_DAYS = 30
SCHEDULED = "Scheduled"
MIN_GAP = timedelta(hours=20)  # one slice a day, whichever process runs it


def next_slice(points: list[tuple[str, str, str | None]], period_days: int) -> list[str]:
    """(id, time, verify_time) of a vault's points -> the ids to verify today, oldest verification first."""
    if not points or period_days < 1:
        return []
    size = math.ceil(len(points) / period_days)
    ordered = sorted(points, key=lambda p: (p[2] is not None, p[2] or "", p[1]))
    return [p[0] for p in ordered[:size]]


def period_of(vault: VaultRow, default_days: int) -> int:
    """The vault's own period (vault verify-schedule), else the service's."""
    return default_days if vault.verify_every_days is None else vault.verify_every_days


def set_schedule(ctx: Context, vault_name: str, days: int | None) -> JsonDict:
    """Set a vault's verification period in days (0: off; None: follow serve --verify-every)."""
    if days is not None and not 0 <= days <= 3650:
        raise InvalidInput(f"--every {days} is not a number of days from 0 to 3650",
                           hint="e.g. --every 30 (0: no scheduled verification of this vault)")  # fmt: skip
    with ctx.catalog.write() as s:
        vault = repos.get_vault(s, vault_name)
        vault.verify_every_days = days
        return schedule_view(vault)


def show_schedule(ctx: Context, vault_name: str) -> JsonDict:
    with ctx.catalog.read() as s:
        return schedule_view(repos.get_vault(s, vault_name))


def schedule_view(vault: VaultRow) -> JsonDict:
    days = vault.verify_every_days
    if days is None:
        effect = "follows vmvault serve --verify-every"
    elif days == 0:
        effect = "off"
    else:
        effect = f"every point re-verified within {days} day(s), a slice a day"
    return {"vault": vault.name, "verifyEveryDays": days, "effect": effect}


def due_vaults(ctx: Context, now: datetime | None = None, default_days: int = DEFAULT_PERIOD_DAYS) -> list[str]:
    """Vaults with a period whose last scheduled Verify job started MIN_GAP ago or more (or never)."""
    moment = now or ctx.now()
    out = []
    with ctx.catalog.read() as s:
        for vault in s.scalars(select(VaultRow).order_by(VaultRow.name)).all():
            if period_of(vault, default_days) <= 0:
                continue
            query = (
                select(JobRow.start_time, JobRow.details)
                .where(JobRow.operation == Operation.VERIFY, JobRow.vault == vault.name)
                .order_by(JobRow.start_time.desc())
            )
            last = next((start for start, details in s.execute(query).all()
                         if isinstance(details, dict) and details.get("trigger") == SCHEDULED), None)  # fmt: skip
            if last is None or moment - from_iso(last) >= MIN_GAP:
                out.append(vault.name)
    return out


def verify_slice(
    ctx: Context, vault_name: str, period_days: int = DEFAULT_PERIOD_DAYS, cancel: threading.Event | None = None
) -> JobOutcome[JsonDict] | None:
    """Today's slice of one vault as a Verify job; None when the vault has no point."""
    from vmvault.service.vaults import _record_verification, _verify_failure

    with ctx.catalog.read() as s:
        row = repos.get_vault(s, vault_name)
        query = select(RecoveryPointRow.id, RecoveryPointRow.time, RecoveryPointRow.verify_time).where(
            RecoveryPointRow.vault_id == row.id
        )
        points = [(str(i), str(t), v) for i, t, v in s.execute(query).all()]
        s.expunge(row)
    chosen = next_slice(points, period_days)
    if not chosen:
        return None
    details = {"trigger": SCHEDULED, "periodDays": period_days, "points": chosen, "pointsInVault": len(points)}
    job = create_job(ctx, Operation.VERIFY, vm=None, vault=vault_name, details=details)

    def work(run: JobRun) -> JsonDict:
        from vmvault.engine.verify import VerifyReport, run_verify

        merged = VerifyReport()
        with opened_vault(ctx, row) as vault:
            for rp_id in chosen:
                if run.cancel.is_set():
                    raise Cancelled(f"the scheduled verification of vault '{vault_name}' was cancelled")
                report = run_verify(vault, rp_id, on_progress=run.progress)
                merged.problems += report.problems
                merged.ok = merged.ok and report.ok
                merged.objects_checked += report.objects_checked
                merged.bytes_checked += report.bytes_checked
                merged.points.update(report.points)
        _record_verification(ctx, merged.points)
        return {
            "vault": vault_name,
            "recoveryPoints": chosen,
            "ok": bool(merged.ok),
            "problems": [str(p) for p in merged.problems],
            "objectsChecked": int(merged.objects_checked),
            "bytesChecked": int(merged.bytes_checked),
            "jobId": job.id,
        }

    return run_job(ctx, job, work, failure=_verify_failure, cancel=cancel)


def run_due(
    ctx: Context,
    period_days: int = DEFAULT_PERIOD_DAYS,
    cancel: threading.Event | None = None,
    now: datetime | None = None,
) -> list[str]:
    """One slice of every due vault (the maintenance thread of `vmvault serve`); returns the job ids."""
    ids = []
    for name in due_vaults(ctx, now, period_days):
        if cancel is not None and cancel.is_set():
            break
        with ctx.catalog.read() as s:
            days = period_of(repos.get_vault(s, name), period_days)
        outcome = verify_slice(ctx, name, days, cancel)
        if outcome is not None:
            log.info("scheduled verification of vault %s: job %s %s", name, outcome.job["id"], outcome.job["status"])
            ids.append(str(outcome.job["id"]))
    return ids

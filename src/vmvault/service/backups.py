"""Backups: back a protected VM up now, and list its recovery points."""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import later_than, now_iso
from vmvault.catalog.models import JobRow, VaultRow
from vmvault.errors import Cancelled, InvalidInput, VmvaultError
from vmvault.proc import boot_id
from vmvault.service.context import Context
from vmvault.service.jobs import (
    JobOutcome,
    JobRun,
    Operation,
    ProgressCallback,
    Status,
    create_job,
    disk_tasks,
    end_job,
    run_job,
    show_job,
)
from vmvault.service.protection import ACTIVE_STATES, PROTECTION_STOPPED
from vmvault.service.validate import parse_retain_until
from vmvault.service.vaultio import opened_vault, read_manifest_or_none
from vmvault.service.vaults import recovery_point_row
from vmvault.service.views import JsonDict, recovery_point_view

log = logging.getLogger("vmvault")

ON_DEMAND, SCHEDULED = "OnDemand", "Scheduled"  # job details["trigger"]


@dataclass(frozen=True)
class BackupPlan:
    """Everything a backup needs from the catalog, read before the job starts."""

    vm_id: str
    vm_name: str
    vault: VaultRow
    disks: list[dict[str, Any]]  # name, path, format, chain (vms.disks)
    definition: dict[str, Any]
    retain_until: str
    policy_id: int | None = None


def new_rp_id() -> str:
    return secrets.token_hex(8)


def backup_now(
    ctx: Context,
    vm_name: str,
    *,
    retain_until: str | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    queue: bool | None = None,
) -> JobOutcome[Any]:
    """Back up a protected VM into its vault as a Backup job; result: the published manifest.

    Bad input (unknown VM, unprotected VM, bad date) raises before any job is recorded. While
    `vmvault serve` runs (or with queue=True) the job is queued for its workers and returned
    InProgress at once (follow it with jobs.wait_for_job); otherwise it runs here.
    """
    plan = plan_backup(ctx, vm_name, parse_retain_until(retain_until))
    details = backup_details(plan, ON_DEMAND)
    if queue is None:
        from vmvault.service.worker import service_running

        queue = on_other_host(ctx, vm_name) or service_running(ctx)
    if queue:
        job = create_job(
            ctx, Operation.BACKUP, vm=vm_name, vault=plan.vault.name, exclusive=True, queued=True, details=details
        )
        return JobOutcome(job=show_job(ctx, job.id))
    job = create_job(ctx, Operation.BACKUP, vm=vm_name, vault=plan.vault.name, exclusive=True, details=details)
    return execute_backup(ctx, job, plan, on_progress=on_progress, cancel=cancel)


def follow_backup(
    ctx: Context,
    job_id: str,
    *,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> JobOutcome[Any]:
    """Wait for a queued backup to end; if the service went away before running it, run it here.

    The job is then claimed by this process exactly as a worker claims it (conditional update).
    """
    from vmvault.errors import Busy
    from vmvault.service.jobs import owner_fields, wait_for_job
    from vmvault.service.worker import service_running

    while True:
        try:
            return JobOutcome(job=wait_for_job(ctx, job_id, timeout=2.0, on_progress=on_progress, cancel=cancel))
        except Busy as exc:
            if exc.code != "timeout":
                raise
            if service_running(ctx):
                continue  # still queued or running under the service: go on waiting
        if on_other_host(ctx, str(repos_job_vm(ctx, job_id))):
            continue  # its host's agent runs it (vm add --host): only follow it
        with ctx.catalog.write() as s:
            row = repos.get_job(s, job_id)
            details = {**(row.details or {}), **owner_fields(), "claimedAt": now_iso()}
            claimed = repos.claim_job(s, row.id, os.getpid(), boot_id(), details)
            if claimed:
                s.refresh(row)
        if claimed:
            return run_claimed_backup(ctx, row, cancel=cancel, on_progress=on_progress)


def on_other_host(ctx: Context, vm_name: str) -> bool:
    """The VM belongs to another host (`vm add --host`): its jobs are queued for that host's agent."""
    from vmvault.service.hostvms import host_elsewhere

    return host_elsewhere(ctx, vm_name) is not None


def repos_job_vm(ctx: Context, job_id: str) -> str | None:
    with ctx.catalog.read() as s:
        return repos.get_job(s, job_id).vm


def backup_details(plan: BackupPlan, trigger: str, **extra: Any) -> dict[str, Any]:
    """A Backup job's details: why it runs, how long its point is kept, one task per disk."""
    return {"trigger": trigger, "retainUntil": plan.retain_until, "tasks": disk_tasks([d["name"] for d in plan.disks]),
            **extra}  # fmt: skip


def execute_backup(
    ctx: Context,
    job: JobRow,
    plan: BackupPlan,
    *,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> JobOutcome[Any]:
    """Run a Backup job this process owns; the point and the item's state are recorded with its end."""

    def work(run: JobRun) -> Any:
        from vmvault.service.reconcile import reconcile_named

        reconcile_named(ctx, plan.vault, f"before backup job {job.id} of VM {plan.vm_name}")
        return _run_backup(ctx, plan, job.id, run)

    scheduled = (job.details or {}).get("trigger") == SCHEDULED

    def record(s: Session, manifest: Any) -> None:
        record_point(ctx, s, job.id, plan.vm_id, plan.vault.id, manifest, scheduled)

    outcome = run_job(ctx, job, work, record=record, on_progress=on_progress, cancel=cancel)
    if not outcome.failed:
        from vmvault.service.vaultsettings import save

        save(ctx, plan.vault)  # the VM's definition and retain-until as of this backup
    return outcome


def record_point(
    ctx: Context, s: Session, job_id: str, vm_id: str, vault_id: int, manifest: Any, scheduled: bool
) -> None:
    """A Backup job's published point in the catalog, in the transaction that ends the job."""
    repos.add_recovery_point(s, recovery_point_row(manifest, vault_id))
    repos.mark_protected_after_backup(s, vm_id)
    current = repos.get_job(s, job_id)
    repos.update_job_details(s, job_id, {**(current.details or {}), "recoveryPoint": manifest.rp_id})
    record_retention(ctx, s, manifest.rp_id, scheduled)


def record_retention(ctx: Context, s: Session, rp_id: str, scheduled: bool) -> None:
    """Let retention (service/retention.py, when this build has it) record the new point's rules and expiry."""
    try:
        retention = importlib.import_module("vmvault.service.retention")
    except ModuleNotFoundError as exc:
        if exc.name != "vmvault.service.retention":
            raise
        return
    record_new_point = getattr(retention, "record_new_point", None)
    if record_new_point is not None:
        record_new_point(s, rp_id, scheduled=scheduled, now=ctx.now())


def run_claimed_backup(
    ctx: Context,
    job: JobRow,
    *,
    cancel: threading.Event | None = None,
    on_progress: ProgressCallback | None = None,
) -> JobOutcome[Any]:
    """Run a queued Backup job this process has claimed (a worker of `vmvault serve`)."""
    details = job.details or {}
    try:
        plan = plan_backup(ctx, job.vm or "", str(details.get("retainUntil") or ""))
    except VmvaultError as exc:  # the VM or its protection changed since the job was queued
        return JobOutcome(job=end_job(ctx, job.id, Status.FAILED, exc), error=exc)
    if not details.get("tasks"):
        job.details = {**details, **backup_details(plan, str(details.get("trigger") or ON_DEMAND))}
    return execute_backup(ctx, job, plan, cancel=cancel, on_progress=on_progress)


def plan_backup(ctx: Context, vm_name: str, retain_until: str) -> BackupPlan:
    with ctx.catalog.read() as s:
        vm = repos.get_vm(s, vm_name)
        item = repos.protected_item(s, vm.id)
        if item is None:
            raise InvalidInput(
                f"VM '{vm_name}' is not protected by any vault",
                hint=f"protect it first: vmvault protection enable {vm_name} --vault NAME",
            )
        if item.protection_state not in ACTIVE_STATES:
            stopped = item.protection_state == PROTECTION_STOPPED
            raise InvalidInput(
                f"protection of VM '{vm_name}' is {item.protection_state}: it takes no backups",
                hint=f"resume it first: vmvault protection resume {vm_name}"
                if stopped
                else f"see it with: vmvault item show {vm_name}",
            )
        vault = repos.vault_by_id(s, item.vault_id)
        excluded = set(item.excluded_disks or [])
        disks = [{**d, "name": str(d["name"]), "path": str(d.get("path") or "")} for d in vm.disks]
        disks = [d for d in disks if d["name"] not in excluded]
    if not (vm.definition or {}).get("describeOnHost"):  # else its host's agent describes it first
        _check_disks(vm_name, disks)
    if not retain_until:
        raise InvalidInput(f"no retain-until date for the backup of VM '{vm_name}'", hint="give --retain-until")
    return BackupPlan(vm.id, vm.name, vault, disks, dict(vm.definition), retain_until, item.policy_id)


def _check_disks(vm_name: str, disks: list[dict[str, Any]]) -> None:
    missing = [d["name"] for d in disks if not d["path"]]
    if not disks or missing:
        raise InvalidInput(
            f"VM '{vm_name}' has no source path for disk(s) {', '.join(missing) or '(none)'}",
            hint="restore its disks with: vmvault restore disks, then add the VM again with: vmvault vm add",
        )


def _run_backup(ctx: Context, plan: BackupPlan, job_id: str, run: JobRun) -> Any:
    """A backup run by this process: the catalog is the local one, the vault opened with this host's key."""
    from vmvault.service.quiesce import budget_for

    with opened_vault(ctx, plan.vault) as vault:
        return run_backup_into(vault, plan, job_id, run, LocalBooks(ctx, plan), budget_for(ctx, plan),
                               str(ctx.settings.home))  # fmt: skip


class BackupRun(Protocol):
    """The running job as a backup reports to it: service/jobs.py JobRun here, an agent's run on an agent."""

    cancel: threading.Event
    details: JsonDict | None
    warnings: list[JsonDict]

    def progress(self, progress: Any) -> None: ...


class BackupBooks(Protocol):
    """What a running backup reads from and writes to the catalog: the catalog itself in this process
    (LocalBooks), the server's REST API on an agent (service/agentrun.py)."""

    def previous_point_id(self) -> str | None: ...

    def next_point_time(self) -> str: ...

    def save_vm(self, updates: dict[str, Any], disks: list[dict[str, Any]] | None = None) -> None: ...

    def save_disk(self, name: str, values: dict[str, Any]) -> None: ...


def run_backup_into(
    vault: Any, plan: BackupPlan, job_id: str, run: BackupRun, books: BackupBooks, budget: Any, home: str
) -> Any:
    """One backup over the VM's connector: it opens the point in time, the engine reads it into the vault."""
    from vmvault.connectors.contract import BackupRequest, Note
    from vmvault.connectors.registry import connector_for
    from vmvault.engine.backup import PointSpec, backup_exported

    connector = connector_for(plan.definition.get("kind"))
    port = _BackupPort(books, run)
    with _cancel_reason(run, plan.vm_name), _count_retries(run, vault):
        previous_id = books.previous_point_id()
        previous = read_manifest_or_none(vault, previous_id) if previous_id else None
        request = BackupRequest(plan.vm_id, plan.vm_name, plan.disks, plan.definition, _bookkeeping(previous),
                                budget, home)  # fmt: skip
        with connector.open_point(request, port) as point:
            spec = PointSpec(
                vm_name=plan.vm_name,
                vm_id=plan.vm_id,
                rp_id=point.rp_id,
                time=point.time,
                retain_until=plan.retain_until,
                consistency=point.consistency,
                vm_definition=point.definition,
                job_id=job_id,
            )
            manifest, stats = backup_exported(
                vault, spec, point.disks, previous, on_progress=run.progress, cancel=point.cancel
            )
            for disk in stats:
                for warning in disk.warnings:
                    port.warn(Note("cbt_fallback", warning, point.read_hint))
    port.report()
    return manifest


def _bookkeeping(previous: Any) -> Any:
    """The previous point as a connector reads it: id, time and its vm_definition (checkpoint names...)."""
    from vmvault.connectors.contract import PreviousPoint

    if previous is None:
        return None
    return PreviousPoint(previous.rp_id, previous.time, dict(previous.vm_definition or {}))


class LocalBooks:
    """BackupBooks on this process's catalog."""

    def __init__(self, ctx: Context, plan: BackupPlan) -> None:
        self.ctx, self.plan = ctx, plan

    def previous_point_id(self) -> str | None:
        with self.ctx.catalog.read() as s:
            latest = repos.latest_recovery_point(s, self.plan.vm_id, self.plan.vault.id)
        return latest.id if latest else None

    def next_point_time(self) -> str:
        return _next_point_time(self.ctx, self.plan.vm_id)

    def save_vm(self, updates: dict[str, Any], disks: list[dict[str, Any]] | None = None) -> None:
        from vmvault.service.vms import save_definition

        save_definition(self.ctx, self.plan.vm_id, updates, disks)

    def save_disk(self, name: str, values: dict[str, Any]) -> None:
        save_disk(self.ctx, self.plan.vm_id, name, values)


def save_disk(ctx: Context, vm_id: str, name: str, values: dict[str, Any]) -> None:
    """Merge values into the record of one disk of the VM (a connector's bookkeeping: bitmaps, formats)."""
    with ctx.catalog.write() as s:
        row = repos.find_vm_by_id(s, vm_id)
        if row is not None:
            row.disks = [{**d, **values} if d.get("name") == name else d for d in row.disks]


class _BackupPort:
    """The catalog and the job, as a connector reports to them (connectors/contract.py BackupPort)."""

    def __init__(self, books: BackupBooks, run: BackupRun) -> None:
        self.books, self.run = books, run
        self.notes: list[Any] = []

    @property
    def cancel(self) -> threading.Event:
        return self.run.cancel

    def new_point(self) -> tuple[str, str]:
        return new_rp_id(), self.books.next_point_time()

    def warn(self, note: Any) -> None:
        self.notes.append(note)

    def quiesced(self, q: Any, snapshot_s: float | None) -> None:
        from vmvault.service.quiesce import record

        record(self.run, q, snapshot_s)

    def save_vm(self, updates: dict[str, Any], disks: list[dict[str, Any]] | None = None) -> None:
        self.books.save_vm(updates, disks)

    def save_disk(self, name: str, values: dict[str, Any]) -> None:
        self.books.save_disk(name, values)

    def report(self) -> None:
        """The warnings, once the point is published (a failed backup's reason is its error)."""
        for note in self.notes:
            log.warning("%s", note.message)
            self.run.warnings.append(note.to_dict())


@contextmanager
def _count_retries(run: BackupRun, vault: Any) -> Iterator[None]:
    """The job's details record how many storage requests were retried (throttling), even when it fails."""
    before = int(vault.backend.retries)
    try:
        yield
    finally:
        if run.details is not None:
            run.details["storageRetries"] = int(vault.backend.retries) - before


@contextmanager
def _cancel_reason(run: BackupRun, vm_name: str) -> Iterator[None]:
    """A cancel that says why (the service stopping) names it in the Cancelled job's error."""
    try:
        yield
    except Cancelled as exc:
        reason = getattr(run.cancel, "reason", "")
        if not reason:
            raise
        raise Cancelled(
            f"{reason} while the backup ran; no recovery point was created",
            hint=f"it runs at the next scheduled time, or now with: vmvault backup now {vm_name}",
        ) from exc


def _next_point_time(ctx: Context, vm_id: str) -> str:
    """Now (UTC, microseconds), strictly later than the VM's last point in any vault."""
    with ctx.catalog.read() as s:
        latest = repos.latest_recovery_point(s, vm_id)
    return later_than(latest.time if latest else None)


def list_recovery_points(ctx: Context, vm_name: str, *, include_deleted: bool = False) -> list[JsonDict]:
    """The VM's recovery points, oldest first: id, time, consistency, expires (soft-deleted ones on request)."""
    with ctx.catalog.read() as s:
        vm = repos.get_vm(s, vm_name)
        rows = repos.recovery_points_for_vm(s, vm.id)
        names = {r.vault_id: repos.vault_by_id(s, r.vault_id).name for r in rows}
        kept = [r for r in rows if include_deleted or not r.soft_deleted]
        return [recovery_point_view(r, vm_name, names[r.vault_id]) for r in kept]

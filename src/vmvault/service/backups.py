"""Backups: back a protected VM up now, and list its recovery points."""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import later_than
from vmvault.catalog.models import VaultRow
from vmvault.errors import InvalidInput
from vmvault.service.context import Context
from vmvault.service.jobs import JobOutcome, JobRun, Operation, ProgressCallback, create_job, run_job
from vmvault.service.protection import PROTECTED
from vmvault.service.validate import parse_retain_until
from vmvault.service.vaultio import opened_vault, read_manifest_or_none
from vmvault.service.vaults import recovery_point_row
from vmvault.service.views import JsonDict, recovery_point_view

CRASH_CONSISTENT = "CrashConsistent"


@dataclass(frozen=True)
class BackupPlan:
    """Everything a backup needs from the catalog, read before the job starts."""

    vm_id: str
    vm_name: str
    vault: VaultRow
    disks: list[dict[str, str]]
    definition: dict[str, Any]
    retain_until: str


def new_rp_id() -> str:
    return secrets.token_hex(8)


def backup_now(
    ctx: Context,
    vm_name: str,
    *,
    retain_until: str | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> JobOutcome[Any]:
    """Back up a protected VM into its vault as a Backup job; result: the published manifest.

    Bad input (unknown VM, unprotected VM, bad date) raises before any job is recorded.
    """
    plan = plan_backup(ctx, vm_name, parse_retain_until(retain_until))
    job = create_job(ctx, Operation.BACKUP, vm=vm_name, vault=plan.vault.name, exclusive=True)

    def work(run: JobRun) -> Any:
        return _run_backup(ctx, plan, job.id, run)

    def record(s: Session, manifest: Any) -> None:
        repos.add_recovery_point(s, recovery_point_row(manifest, plan.vault.id))
        repos.set_protection_state(s, plan.vm_id, PROTECTED)

    return run_job(ctx, job, work, record=record, on_progress=on_progress, cancel=cancel)


def plan_backup(ctx: Context, vm_name: str, retain_until: str) -> BackupPlan:
    with ctx.catalog.read() as s:
        vm = repos.get_vm(s, vm_name)
        item = repos.protected_item(s, vm.id)
        if item is None:
            raise InvalidInput(
                f"VM '{vm_name}' is not protected by any vault",
                hint=f"protect it first: vmvault protection enable {vm_name} --vault NAME",
            )
        vault = repos.vault_by_id(s, item.vault_id)
        disks = [{"name": str(d["name"]), "path": str(d.get("path") or "")} for d in vm.disks]
    _check_disks(vm_name, disks)
    return BackupPlan(vm.id, vm.name, vault, disks, dict(vm.definition), retain_until)


def _check_disks(vm_name: str, disks: list[dict[str, str]]) -> None:
    missing = [d["name"] for d in disks if not d["path"]]
    if not disks or missing:
        raise InvalidInput(
            f"VM '{vm_name}' has no source path for disk(s) {', '.join(missing) or '(none)'}",
            hint="restore its disks with: vmvault restore disks, then add the VM again with: vmvault vm add",
        )


def _run_backup(ctx: Context, plan: BackupPlan, job_id: str, run: JobRun) -> Any:
    from vmvault.engine.backup import DiskSource, run_backup

    with opened_vault(ctx, plan.vault) as vault:
        previous = _previous_manifest(ctx, vault, plan)
        return run_backup(
            vault,
            vm_name=plan.vm_name,
            vm_id=plan.vm_id,
            disks=[DiskSource(d["name"], Path(d["path"])) for d in plan.disks],
            previous=previous,
            rp_id=new_rp_id(),
            time=_next_point_time(ctx, plan.vm_id),
            retain_until=plan.retain_until,
            consistency=CRASH_CONSISTENT,
            vm_definition=plan.definition,
            job_id=job_id,
            on_progress=run.progress,
            cancel=run.cancel,
        )


def _previous_manifest(ctx: Context, vault: Any, plan: BackupPlan) -> Any:
    with ctx.catalog.read() as s:
        latest = repos.latest_recovery_point(s, plan.vm_id, plan.vault.id)
    return read_manifest_or_none(vault, latest.id) if latest else None


def _next_point_time(ctx: Context, vm_id: str) -> str:
    """Now (UTC, microseconds), strictly later than the VM's last point in any vault."""
    with ctx.catalog.read() as s:
        latest = repos.latest_recovery_point(s, vm_id)
    return later_than(latest.time if latest else None)


def list_recovery_points(ctx: Context, vm_name: str) -> list[JsonDict]:
    """The VM's recovery points, oldest first: id, time, consistency, expires."""
    with ctx.catalog.read() as s:
        vm = repos.get_vm(s, vm_name)
        return [recovery_point_view(r) for r in repos.recovery_points_for_vm(s, vm.id)]

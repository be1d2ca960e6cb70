"""Reconcile the catalog with a vault after a crash (issue 18, docs/operations.md).

A process can die between two steps that go to different places:
- a backup between publishing its manifest and recording the point in the catalog: the vault
  holds a point the catalog does not list and the job was reaped as Failed ("no recovery point
  was created"). Every manifest that authenticates, that the vault's record chain records (its
  intent record, written before the manifest, names it with this content: vault/seqchain.py) and
  whose Backup job this catalog knows (no longer running, no other point recorded) is adopted:
  the point is recorded and the job corrected to Completed with a note. Any other manifest (a job
  unknown here, one added or replaced outside vmvault) is never adopted, only reported (by
  `vault verify`, whose chain audit names the tampering).
- retention between deleting a manifest and deleting its catalog row: the row of an expired
  point (its expiry time has passed) whose manifest is gone is removed, as retention decided.
- a restore or file-recovery session: its pin stays until it expires; stale pins are removed.

Run at the start of `vmvault serve` (every vault), before each backup (its vault) and by
`vault verify` (its vault).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import from_iso, now_iso
from vmvault.catalog.models import VaultRow
from vmvault.errors import NotFound, ObjectNotFound, VmvaultError
from vmvault.service.context import Context
from vmvault.service.jobs import Operation, Status
from vmvault.service.vaultio import opened_vault, read_manifest_or_none
from vmvault.service.views import JsonDict
from vmvault.vault.seqchain import Recorded

log = logging.getLogger(__name__)


@dataclass
class Reconciled:
    adopted: list[JsonDict] = field(default_factory=list)  # {recoveryPoint, vm, job}
    dropped: list[JsonDict] = field(default_factory=list)  # {recoveryPoint, vm}: retention had deleted them
    unlisted: list[JsonDict] = field(default_factory=list)  # {recoveryPoint, vm, job, reason}: not adopted
    stale_pins: int = 0

    def view(self) -> JsonDict:
        return {
            "adoptedPoints": self.adopted,
            "droppedPoints": self.dropped,
            "unlistedPoints": self.unlisted,
            "stalePinsRemoved": self.stale_pins,
        }


def reconcile_vault(ctx: Context, row: VaultRow, vault: Any, when: str) -> Reconciled:
    """Bring the catalog in line with an opened vault; `when` says what ran it (for the job note)."""
    out = Reconciled()
    present = set(vault.list_recovery_points())
    with ctx.catalog.read() as s:
        listed = {p.id: p for p in repos.recovery_points_in_vault(s, row.id)}
    candidates = sorted(present - set(listed))
    recorded = vault.recorded_points() if candidates else None  # None too for a vault without a chain
    for rp_id in candidates:
        _adopt(ctx, row, vault, rp_id, when, out, recorded)
    _drop_deleted(ctx, [p for p in listed.values() if p.id not in present], out)
    from vmvault.vault.lock import remove_stale_pins

    out.stale_pins = remove_stale_pins(vault)  # of restores and sessions whose process died
    return out


def reconcile_named(ctx: Context, row: VaultRow, when: str) -> Reconciled | None:
    """Open the vault and reconcile it; a vault that cannot be opened is logged, not raised."""
    try:
        with opened_vault(ctx, row) as vault:
            return reconcile_vault(ctx, row, vault, when)
    except VmvaultError as exc:
        log.warning("reconciling vault %s after a crash: %s", row.name, exc.message)
        return None


def reconcile_all(ctx: Context, when: str) -> None:
    from vmvault.connectors.registry import images

    images().remove_dead_work_dirs()  # sockets of exports whose vmvault was killed
    with ctx.catalog.read() as s:
        rows = list(repos.list_vaults(s))
    for row in rows:
        result = reconcile_named(ctx, row, when)
        if result is not None and (result.adopted or result.dropped):
            log.info("vault %s reconciled after a crash: %s", row.name, result.view())


def adopt_reported_point(ctx: Context, row: VaultRow, rp_id: str, note: str) -> str | None:
    """Adopt one point by the crash rule above (an agent reported it after its job was failed
    `agent_lost`): None when it is now recorded, else why it was not (the point is left alone)."""
    out = Reconciled()
    with opened_vault(ctx, row) as vault:
        _adopt(ctx, row, vault, rp_id, note, out, vault.recorded_points(), note=note)
    if out.unlisted:
        return str(out.unlisted[0]["reason"])
    with ctx.catalog.read() as s:
        return None if repos.find_recovery_point(s, rp_id) is not None else f"points/{rp_id} is not in the vault"


def _adopt(
    ctx: Context, row: VaultRow, vault: Any, rp_id: str, when: str, out: Reconciled, recorded: Recorded | None,
    note: str | None = None,
) -> None:  # fmt: skip
    try:
        manifest = vault.read_manifest(rp_id)  # authenticated, or it raises
        unrecorded = recorded.unrecorded(rp_id, vault.manifest_digest(rp_id)) if recorded is not None else None
    except (NotFound, ObjectNotFound):
        return  # deleted meanwhile
    except VmvaultError as exc:
        out.unlisted.append({"recoveryPoint": rp_id, "vm": None, "job": None, "reason": exc.message})
        return
    entry = {"recoveryPoint": rp_id, "vm": manifest.vm_name, "job": manifest.job_id}
    if unrecorded is not None:  # sealed with the vault's keys, but not written by a backup of this vault
        out.unlisted.append({**entry, "reason": f"{unrecorded}: not adopted"})
        return
    with ctx.catalog.write() as s:
        if repos.find_recovery_point(s, rp_id) is not None:
            return  # its own job recorded it meanwhile
        reason = _why_not_adopted(s, manifest)
        if reason is not None:
            out.unlisted.append({**entry, "reason": reason})
            return
        _record(ctx, s, row, manifest, when, note)
    out.adopted.append(entry)


def _why_not_adopted(s: Session, manifest: Any) -> str | None:
    job = repos.find_job(s, manifest.job_id) if manifest.job_id else None
    if job is None or job.operation != Operation.BACKUP:
        return "its backup job is not known to this catalog: not adopted (see docs/operations.md)"
    if job.status == Status.IN_PROGRESS:
        return "its backup job is still running"
    other = (job.details or {}).get("recoveryPoint")
    if other and other != manifest.rp_id:  # one job writes one point
        return f"its backup job recorded another point ({other})"
    if repos.find_vm_by_id(s, manifest.vm_id) is None:
        return f"its VM (id {manifest.vm_id}) is not in this catalog"
    return None


def _record(ctx: Context, s: Session, row: VaultRow, manifest: Any, when: str, note: str | None = None) -> None:
    from vmvault.service.backups import record_retention
    from vmvault.service.vaults import recovery_point_row

    job = repos.get_job(s, manifest.job_id)
    repos.add_recovery_point(s, recovery_point_row(manifest, row.id))
    repos.mark_protected_after_backup(s, manifest.vm_id)
    record_retention(ctx, s, manifest.rp_id, (job.details or {}).get("trigger") == "Scheduled")
    agent = (job.details or {}).get("agentHost")  # an agent's job: it died or lost the server, not a process here
    runner = f"the agent of host '{agent}' running this job died or lost the server" if agent else (
        "the process running this job died")  # fmt: skip
    note = note or f"{runner} after the recovery point was written; reconciled after the crash ({when}, {now_iso()})"
    repos.finish_job(s, job.id, Status.COMPLETED)
    repos.update_job_details(s, job.id, {**(job.details or {}), "recoveryPoint": manifest.rp_id, "reconciled": note})


def _drop_deleted(ctx: Context, missing: list[Any], out: Reconciled) -> None:
    """Rows whose manifest is gone: removed when retention had expired them (else verify reports them)."""
    now = ctx.now()
    with ctx.catalog.write() as s:
        for point in missing:
            current = repos.find_recovery_point(s, point.id)
            if current is None or not current.expiry_time or from_iso(current.expiry_time) > now:
                continue
            vm = repos.find_vm_by_id(s, current.vm_id)
            repos.delete_recovery_point(s, current.id)
            out.dropped.append({"recoveryPoint": current.id, "vm": vm.name if vm else current.vm_id})


# ---- leftovers a killed vmvault left on VMs (service start) ---------------------------------------------------


def reconcile_vms(ctx: Context) -> list[str]:
    """Let each kind's connector undo what a killed vmvault left on its VMs (libvirt: backup jobs, scratch
    files, failed checkpoints). A VM with a live Backup job (another process's) is that job's business.
    Returns what was done, one line each.
    """
    from vmvault.connectors.contract import LeftoverVm
    from vmvault.connectors.registry import connector_for

    with ctx.catalog.read() as s:
        rows = [r for r in repos.list_vms(s) if repos.running_job_for_vm(s, r.name, Operation.BACKUP) is None]
        s.expunge_all()
    done: list[str] = []
    for kind in dict.fromkeys(r.kind for r in rows):
        connector = connector_for(kind)
        if connector.capabilities().changed_blocks != "checkpoints":
            continue  # only a hypervisor that keeps vmvault's checkpoints can hold leftovers of a killed backup
        leftovers = [LeftoverVm(r.id, r.name, dict(r.definition or {}), *_latest_point(ctx, r)) for r in rows
                     if r.kind == kind]  # fmt: skip
        done += connector.reconcile(str(ctx.settings.home), leftovers)
    for line in done:
        log.info("reconciled: %s", line)
    return done


def _latest_point(ctx: Context, row: Any) -> tuple[Any, bool]:
    """The bookkeeping of the VM's latest point, and whether it could be read (its vault opened)."""
    from vmvault.connectors.contract import PreviousPoint

    with ctx.catalog.read() as s:
        latest = repos.latest_recovery_point(s, row.id)
        vault = repos.vault_by_id(s, latest.vault_id) if latest is not None else None
        s.expunge_all()
    if latest is None or vault is None:
        return None, True
    try:
        with opened_vault(ctx, vault) as opened:
            manifest = read_manifest_or_none(opened, latest.id)
    except (VmvaultError, OSError) as exc:
        log.warning("checkpoints of VM %s left alone: %s", row.name, exc)
        return None, False
    if manifest is None:
        return None, False
    return PreviousPoint(manifest.rp_id, manifest.time, dict(manifest.vm_definition or {})), True


def reconcile_vms_at_start(ctx: Context) -> None:
    """reconcile_vms for `vmvault serve` start: never keeps the service from starting."""
    try:
        reconcile_vms(ctx)
    except Exception:  # logged; the next backup of each VM reconciles again
        log.warning("reconciling leftovers of backups on VMs failed", exc_info=True)

"""Protection: which vault and policy back a VM up, which disks are left out, stop and resume.

Every change is recorded as a job that is done when recorded (ConfigureBackup, DisableBackup),
as Azure records them. States (Azure's protectionState): IRPending (protected, initial backup
pending), Protected, ProtectionStopped (no more backups; the points stay and keep expiring by
the policy).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import to_iso
from vmvault.catalog.models import ProtectedItemRow, VmRow
from vmvault.errors import AlreadyExists, InvalidInput, NotFound
from vmvault.service.context import Context
from vmvault.service.jobs import Operation, record_completed_job
from vmvault.service.vaultsettings import saves_settings, vault_of_job
from vmvault.service.views import JsonDict, job_view

IR_PENDING = "IRPending"  # protected, no recovery point yet
PROTECTED = "Protected"
PROTECTION_STOPPED = "ProtectionStopped"  # disabled, data kept
ACTIVE_STATES = (IR_PENDING, PROTECTED)


@saves_settings(vault_of_job)
def enable_protection(
    ctx: Context,
    vm_name: str,
    vault_name: str,
    *,
    policy: str | None = None,
    exclude_disks: Sequence[str] | None = None,
) -> JsonDict:
    """Protect a VM with a vault and a policy (default DefaultPolicy); returns the ConfigureBackup job.

    Enabling again with the same vault (and no other policy or exclusions) is a no-op.
    """
    from vmvault.service.policies import resolve_policy

    anchor = to_iso(ctx.now())
    with ctx.catalog.write() as s:
        vm = repos.get_vm(s, vm_name)
        vault = repos.get_vault(s, vault_name)
        chosen = resolve_policy(s, vault, policy)
        excluded = check_exclusions(vm, exclude_disks or [])
        item = repos.protected_item(s, vm.id)
        if item is not None and item.vault_id != vault.id:
            current = repos.vault_by_id(s, item.vault_id).name
            raise AlreadyExists(
                f"VM '{vm_name}' is already protected by vault '{current}'",
                hint=f"back it up into '{current}' with: vmvault backup now {vm_name}",
            )
        if item is None:
            state = PROTECTED if repos.latest_recovery_point(s, vm.id, vault.id) else IR_PENDING
            item = repos.add_protected_item(s, vm.id, vault.id, state)
            item.policy_id, item.excluded_disks, item.schedule_anchor = chosen.id, excluded, anchor
        elif _changes(item, chosen.id if policy else None, excluded if exclude_disks else None):
            raise AlreadyExists(
                f"VM '{vm_name}' is already protected (policy and exclusions are changed with protection update)",
                hint=f"vmvault protection update {vm_name} --policy NAME [--exclude-disk DISK ...]",
            )
        elif item.protection_state not in ACTIVE_STATES:
            raise InvalidInput(
                f"protection of VM '{vm_name}' is {item.protection_state}",
                hint=f"resume it with: vmvault protection resume {vm_name}",
            )
        s.flush()
        job = record_completed_job(s, Operation.CONFIGURE_BACKUP, vm=vm_name, vault=vault_name)
        return job_view(job)


def _changes(item: ProtectedItemRow, policy_id: int | None, excluded: list[str] | None) -> bool:
    return (policy_id is not None and policy_id != item.policy_id) or (
        excluded is not None and sorted(excluded) != sorted(item.excluded_disks or [])
    )


def check_exclusions(vm: VmRow, names: Sequence[str]) -> list[str]:
    """The disks to leave out: each must be a disk of the VM, and at least one disk must stay."""
    disks = [str(d["name"]) for d in vm.disks]
    out: list[str] = []
    for name in names:
        if name not in disks:
            raise NotFound(
                f"VM '{vm.name}' has no disk '{name}'", hint=f"its disks are: {', '.join(disks) or '(none)'}"
            )
        if name not in out:
            out.append(name)
    if disks and len(out) == len(disks):
        raise InvalidInput(
            f"excluding every disk of VM '{vm.name}' leaves nothing to back up",
            hint="keep at least one disk (stop the backups instead with: vmvault protection disable VM)",
        )
    return out


def _item(s: Session, vm_name: str) -> tuple[VmRow, ProtectedItemRow]:
    vm = repos.get_vm(s, vm_name)
    item = repos.protected_item(s, vm.id)
    if item is None:
        raise NotFound(
            f"VM '{vm_name}' is not protected",
            hint=f"protect it with: vmvault protection enable {vm_name} --vault NAME",
        )
    return vm, item


@saves_settings(vault_of_job)
def update_protection(
    ctx: Context,
    vm_name: str,
    *,
    policy: str | None = None,
    exclude_disks: Sequence[str] | None = None,
) -> JsonDict:
    """Change an item's policy and/or its excluded disks (exclude_disks=[] includes every disk again)."""
    from vmvault.service.policies import resolve_policy

    if policy is None and exclude_disks is None:
        raise InvalidInput("nothing to update", hint="give --policy NAME and/or --exclude-disk DISK (or --all-disks)")
    anchor = to_iso(ctx.now())
    with ctx.catalog.write() as s:
        vm, item = _item(s, vm_name)
        vault = repos.vault_by_id(s, item.vault_id)
        if policy is not None:
            chosen = resolve_policy(s, vault, policy)
            if chosen.id != item.policy_id:
                item.policy_id = chosen.id
                item.schedule_anchor = max(item.schedule_anchor or anchor, anchor)
        if exclude_disks is not None:
            item.excluded_disks = check_exclusions(vm, exclude_disks)
        s.flush()
        return job_view(record_completed_job(s, Operation.CONFIGURE_BACKUP, vm=vm_name, vault=vault.name))


@saves_settings(vault_of_job)
def disable_protection(ctx: Context, vm_name: str) -> JsonDict:
    """Stop backups and keep the data (ProtectionStopped); queued backups of the VM are cancelled.

    A backup already running finishes. The points keep expiring by the item's policy.
    """
    from vmvault.errors import Cancelled
    from vmvault.service.jobs import Status, end_job

    with ctx.catalog.write() as s:
        _vm, item = _item(s, vm_name)
        vault = repos.vault_by_id(s, item.vault_id)
        if item.protection_state not in ACTIVE_STATES:
            raise InvalidInput(
                f"protection of VM '{vm_name}' is already {item.protection_state}",
                hint=f"resume it with: vmvault protection resume {vm_name}",
            )
        item.protection_state = PROTECTION_STOPPED
        s.flush()
        job = record_completed_job(s, Operation.DISABLE_BACKUP, vm=vm_name, vault=vault.name)
        queued = [j.id for j in repos.queued_jobs(s, [Operation.BACKUP]) if j.vm == vm_name]
    for job_id in queued:
        end_job(ctx, job_id, Status.CANCELLED, Cancelled(f"protection of VM '{vm_name}' was disabled"))
    return job_view(job)


@saves_settings(vault_of_job)
def resume_protection(ctx: Context, vm_name: str, *, policy: str | None = None) -> JsonDict:
    """Start backing a stopped item up again (optionally with another policy)."""
    from vmvault.service.policies import resolve_policy

    anchor = to_iso(ctx.now())
    with ctx.catalog.write() as s:
        vm, item = _item(s, vm_name)
        vault = repos.vault_by_id(s, item.vault_id)
        if item.protection_state != PROTECTION_STOPPED:
            raise InvalidInput(
                f"protection of VM '{vm_name}' is {item.protection_state}, not stopped",
                hint=f"see it with: vmvault item show {vm_name}",
            )
        if policy is not None or item.policy_id is None:
            item.policy_id = resolve_policy(s, vault, policy).id
        item.protection_state = PROTECTED if repos.latest_recovery_point(s, vm.id, vault.id) else IR_PENDING
        item.schedule_anchor = anchor  # slots missed while stopped are not made up for
        s.flush()
        return job_view(record_completed_job(s, Operation.CONFIGURE_BACKUP, vm=vm_name, vault=vault.name))

"""Protection: which vault backs a VM up (recorded as a ConfigureBackup job)."""

from __future__ import annotations

from vmvault.catalog import repos
from vmvault.errors import AlreadyExists
from vmvault.service.context import Context
from vmvault.service.jobs import Operation, record_completed_job
from vmvault.service.views import JsonDict, job_view

IR_PENDING = "IRPending"  # protected, no recovery point yet
PROTECTED = "Protected"


def enable_protection(ctx: Context, vm_name: str, vault_name: str) -> JsonDict:
    """Protect a VM with a vault; returns the ConfigureBackup job. Same vault again is a no-op."""
    with ctx.catalog.write() as s:
        vm = repos.get_vm(s, vm_name)
        vault = repos.get_vault(s, vault_name)
        item = repos.protected_item(s, vm.id)
        if item is not None and item.vault_id != vault.id:
            current = repos.vault_by_id(s, item.vault_id).name
            raise AlreadyExists(
                f"VM '{vm_name}' is already protected by vault '{current}'",
                hint=f"back it up into '{current}' with: vmvault backup now {vm_name}",
            )
        if item is None:
            state = PROTECTED if repos.latest_recovery_point(s, vm.id, vault.id) else IR_PENDING
            repos.add_protected_item(s, vm.id, vault.id, state)
        job = record_completed_job(s, Operation.CONFIGURE_BACKUP, vm=vm_name, vault=vault_name)
        return job_view(job)

"""A live backup's quiesce budget (per VM, else the service's setting) and the policy's consistency choice.

The budget (connectors/contract.py Budget): how long the freeze call may take, the guest's fsfreeze
hooks included (`vmvault vm update NAME --quiesce-timeout S`, else VMVAULT_QUIESCE_TIMEOUT, default
60 s), and how long file systems stay frozen for the snapshot (VMVAULT_FROZEN_WINDOW, default 10 s).
A policy with `snapshotConsistencyType: OnlyCrashConsistent` skips the quiesce.
"""

from __future__ import annotations

import logging
from typing import Any

from vmvault.catalog import repos
from vmvault.domain.policy import only_crash_consistent
from vmvault.errors import InvalidInput
from vmvault.service.context import Context
from vmvault.service.views import JsonDict

log = logging.getLogger("vmvault")

MIN_TIMEOUT_S = 1
MAX_TIMEOUT_S = 3600


def budget_for(ctx: Context, plan: Any) -> Any:
    """The Budget of this backup: the VM's quiesce timeout, else the setting; crash_only from its policy."""
    from vmvault.connectors.contract import Budget

    with ctx.catalog.read() as s:
        vm = repos.find_vm_by_id(s, plan.vm_id)
        timeout = vm.quiesce_timeout_s if vm is not None else None
        policy = repos.policy_by_id(s, plan.policy_id) if plan.policy_id is not None else None
        crash_only = policy is not None and only_crash_consistent(policy.properties or {})
    freeze_s = float(timeout) if timeout else ctx.settings.quiesce_timeout_s
    return Budget(freeze_s=freeze_s, frozen_s=ctx.settings.frozen_window_s, crash_only=crash_only)


def check_timeout(seconds: int | None) -> int | None:
    if seconds is not None and not MIN_TIMEOUT_S <= seconds <= MAX_TIMEOUT_S:
        raise InvalidInput(
            f"quiesce timeout {seconds} s is out of range",
            hint=f"give {MIN_TIMEOUT_S}-{MAX_TIMEOUT_S} seconds, or 0 for the service's default",
        )
    return seconds


def set_quiesce_timeout(ctx: Context, name: str, seconds: int) -> JsonDict:
    """Set a VM's quiesce budget in seconds (0: back to the service's setting)."""
    value = check_timeout(seconds or None)
    with ctx.catalog.write() as s:
        row = repos.get_vm(s, name)
        row.quiesce_timeout_s = value
        return quiesce_view(ctx, row.name, value)


def quiesce_view(ctx: Context, name: str, value: int | None) -> JsonDict:
    return {
        "vm": name,
        "quiesceTimeoutSeconds": value if value is not None else ctx.settings.quiesce_timeout_s,
        "quiesceTimeoutSource": "vm" if value is not None else "setting",
        "frozenWindowSeconds": ctx.settings.frozen_window_s,
    }


def record(run: Any, q: Any, snapshot_s: float | None) -> None:
    """The quiesce's figures in the job's details (`quiesce`): freeze, frozen window, snapshot and thaw times."""
    report = q.report()
    if snapshot_s is not None:
        report["snapshotSeconds"] = round(snapshot_s, 3)
    if run.details is None:
        run.details = {}
    run.details["quiesce"] = report
    log.info("quiesce: %s", ", ".join(f"{k} {v}" for k, v in report.items()))

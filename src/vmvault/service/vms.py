"""VM use cases: add (from disk images), list, show."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import VmRow
from vmvault.errors import AlreadyExists, InvalidInput
from vmvault.service.context import Context
from vmvault.service.paths import Rule, allowed
from vmvault.service.validate import check_name
from vmvault.service.views import JsonDict, vm_view

KIND_DISKS = "disks"
KIND_IMPORTED = "imported"


def add_vm(ctx: Context, name: str, disks: list[str | Path]) -> JsonDict:
    """Add a VM given by its disk images (disk0..N in order); each is probed first."""
    from vmvault.engine.probe import probe_disk

    check_name("VM", name)
    paths = _check_disk_paths(ctx, name, disks)
    _refuse_taken(ctx, name)
    definitions = [_disk_definition(i, path, probe_disk(path)) for i, path in enumerate(paths)]
    row = VmRow(
        id=str(uuid.uuid4()),
        name=name,
        kind=KIND_DISKS,
        disks=[{"name": f"disk{i}", "path": str(p)} for i, p in enumerate(paths)],
        definition={"disks": definitions},
        created=now_iso(),
    )
    with ctx.catalog.write() as s:
        _refuse_taken_in(s, name)
        repos.add_vm(s, row)
        return _view(s, row)


def _check_disk_paths(ctx: Context, name: str, disks: list[str | Path]) -> list[Path]:
    if not disks:
        raise InvalidInput(f"VM '{name}' needs at least one disk", hint=f"vmvault vm add {name} --disk PATH")
    paths = [allowed(ctx, Rule.DISKS, d) for d in disks]  # API callers: in the allowed disk roots (service/paths.py)
    for i, path in enumerate(paths):
        if path in paths[:i]:
            raise InvalidInput(f"disk {path} is given twice for VM '{name}'", hint="give each --disk once")
    return paths


def _disk_definition(index: int, path: Path, info: Any) -> JsonDict:
    return {"name": f"disk{index}", "path": str(path), "format": info.format, "virtualSize": int(info.virtual_size)}


def _refuse_taken(ctx: Context, name: str) -> None:
    with ctx.catalog.read() as s:
        _refuse_taken_in(s, name)


def _refuse_taken_in(s: Session, name: str) -> None:
    if repos.find_vm(s, name) is not None:
        raise AlreadyExists(
            f"VM '{name}' already exists", hint=f"choose another name, or see it with: vmvault vm show {name}"
        )


def _view(s: Session, row: VmRow) -> JsonDict:
    item = repos.protected_item(s, row.id)
    vault_name = repos.vault_by_id(s, item.vault_id).name if item else None
    return vm_view(row, item, vault_name, repos.latest_recovery_point(s, row.id))


def list_vms(ctx: Context) -> list[JsonDict]:
    with ctx.catalog.read() as s:
        return [_view(s, row) for row in repos.list_vms(s)]


def show_vm(ctx: Context, name: str) -> JsonDict:
    with ctx.catalog.read() as s:
        return _view(s, repos.get_vm(s, name))


# ---- vm list with live status ---------------------------------------------------------------------------

STATUS_TIMEOUT_S = 1.0  # per socket: vm list stays fast when a QEMU or agent hangs


def list_vms_with_status(ctx: Context) -> list[JsonDict]:
    """list_vms plus, per VM, powerState, agent reachability and protection in words (short timeouts)."""
    with ctx.catalog.read() as s:
        rows = list(repos.list_vms(s))
        views = [_view(s, row) for row in rows]
        s.expunge_all()
    return _with_status(rows, views)


def show_vm_with_status(ctx: Context, name: str) -> JsonDict:
    """show_vm plus the live status list_vms_with_status gives."""
    with ctx.catalog.read() as s:
        row = repos.get_vm(s, name)
        view = _view(s, row)
        s.expunge_all()
    return _with_status([row], [view])[0]


def _with_status(rows: list[VmRow], views: list[JsonDict]) -> list[JsonDict]:
    from vmvault.service.libvirt_vms import KIND_LIBVIRT, statuses

    libvirt_rows = [r for r in rows if r.kind == KIND_LIBVIRT]
    live = statuses(libvirt_rows) if libvirt_rows else {}
    for row, view in zip(rows, views, strict=True):
        view.update(live.get(row.id) or _qemu_status(row))
        view["protection"] = protection_words(view["protectionState"], view["vault"])
    return views


def protection_words(state: str, vault: str | None) -> str:
    words = {
        "Protected": f"protected in vault {vault}",
        "IRPending": f"protected in vault {vault} (initial backup pending)",
        "ProtectionStopped": f"stopped with data in vault {vault}",
        "SoftDeleted": f"soft deleted in vault {vault}",
    }
    return words.get(state, "not protected")


def _qemu_status(row: VmRow) -> JsonDict:
    """A plain QEMU VM: running when its QMP socket answers, else stopped; a disk-only VM: unknown."""
    from vmvault.errors import HypervisorError
    from vmvault.hypervisor.guest_agent import GuestAgent
    from vmvault.hypervisor.qmp import QemuNotRunning, QmpClient

    definition = row.definition or {}
    qmp = definition.get("qmp")
    if row.kind != "qmp" or not qmp:
        return {"powerState": "unknown", "agent": "n/a (disk images)"}
    try:
        with QmpClient(str(qmp)).connect(greeting_timeout=STATUS_TIMEOUT_S) as client:
            status = client.query_status()
        state = "running" if status.get("running") else str(status.get("status") or "paused")
    except QemuNotRunning:
        return {"powerState": "stopped", "agent": "not running" if definition.get("guestAgent") else "no socket"}
    except (HypervisorError, OSError):
        state = "unknown (QMP busy)"
    agent = definition.get("guestAgent")
    if not agent:
        return {"powerState": state, "agent": "no socket"}
    try:
        with GuestAgent(str(agent), timeout=STATUS_TIMEOUT_S).connect(timeout=STATUS_TIMEOUT_S):
            reachable = "answers"
    except (HypervisorError, OSError):
        reachable = "no answer"
    return {"powerState": state, "agent": reachable}

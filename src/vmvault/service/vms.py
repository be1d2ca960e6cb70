"""VM use cases: add (from disk images), list, show."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import VmRow
from vmvault.connectors.diskimage.diskformat import FORMATS
from vmvault.errors import AlreadyExists, InvalidInput, NotFound
from vmvault.service.context import Context
from vmvault.service.paths import Rule, allowed
from vmvault.service.validate import check_name
from vmvault.service.views import JsonDict, vm_view

KIND_DISKS = "disks"
KIND_IMPORTED = "imported"


def add_vm(ctx: Context, name: str, disks: list[str | Path], formats: list[str] | None = None) -> JsonDict:
    """Add a VM given by its disk images (disk0..N in order), each with its format recorded for good.

    formats: none (each guessed once, here, and shown), one for every disk, or one per disk. A
    guessed qcow2 that names a backing file or data file is refused: its header may be a guest's
    writing inside a raw disk (connectors/diskimage/diskformat.py).
    """
    check_name("VM", name)
    paths = _check_disk_paths(ctx, name, disks)
    chosen = _formats(name, paths, formats or [])
    _refuse_taken(ctx, name)
    infos = [_inspect(path, fmt) for path, fmt in zip(paths, chosen, strict=True)]
    definitions = [_disk_definition(i, path, info) for i, (path, info) in enumerate(zip(paths, infos, strict=True))]
    row = VmRow(
        id=str(uuid.uuid4()),
        name=name,
        kind=KIND_DISKS,
        disks=[disk_record(f"disk{i}", info) for i, info in enumerate(infos)],
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


def _formats(name: str, paths: list[Path], formats: list[str]) -> list[str | None]:
    if any(f not in FORMATS for f in formats):
        raise InvalidInput(f"unknown disk format {sorted(set(formats) - set(FORMATS))}", hint="--format raw or qcow2")
    if len(formats) == 1:
        return [formats[0]] * len(paths)
    if formats and len(formats) != len(paths):
        raise InvalidInput(
            f"VM '{name}' has {len(paths)} disks and {len(formats)} --format values",
            hint="give one --format for all disks, or one per --disk in the same order",
        )
    return list(formats) or [None] * len(paths)


def _inspect(path: Path, fmt: str | None) -> Any:
    """The disk's info opened as `fmt`; guessed (once, here) when the user gave none."""
    from vmvault.connectors.diskimage.diskformat import read_qcow2_header
    from vmvault.connectors.diskimage.images import disk_info, probe_format

    if fmt is None:
        fmt = probe_format(path)
        header = read_qcow2_header(path) if fmt == "qcow2" else None
        if header is not None and (header.backing_name or header.data_file):
            named = header.backing_name or "an external data file"
            raise InvalidInput(
                f"disk {path} looks like a qcow2 image that names {named!r}; vmvault does not trust a "
                "guessed format with a backing file (a guest can write such a header into a raw disk)",
                hint=f"say what it is: --format qcow2 if {path} is a qcow2 image you made, --format raw if the "
                "VM uses it as a raw disk",
                code="disk_format_ambiguous",
            )
    return disk_info(path, fmt)


def disk_record(name: str, info: Any) -> JsonDict:
    """A disk as the catalog keeps it (vms.disks): its format and qcow2 chain, fixed at `vm add`."""
    from vmvault.connectors.diskimage.diskformat import chain_to_record

    record: JsonDict = {"name": name, "path": str(info.path), "format": info.format}
    if info.format == "qcow2":
        record["chain"] = chain_to_record(list(info.chain))
    return record


def set_disk_format(ctx: Context, vm_name: str, disk_name: str, fmt: str) -> JsonDict:
    """An admin's word on a disk's format: recorded with its current qcow2 chain (read under diskformat's rules)."""
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown disk format '{fmt}'", hint="--format raw or qcow2")
    with ctx.catalog.read() as s:
        row = repos.get_vm(s, vm_name)
        disk = next((d for d in row.disks or [] if d.get("name") == disk_name), None)
        kind = row.kind
    if kind not in (KIND_DISKS, "qmp"):
        raise InvalidInput(f"VM '{vm_name}' is a {kind} VM: its disks' formats come from its definition")
    if disk is None or not disk.get("path"):
        raise NotFound(f"VM '{vm_name}' has no disk '{disk_name}'", hint=f"see its disks: vmvault vm show {vm_name}")
    record = disk_record(disk_name, _inspect(Path(str(disk["path"])), fmt))
    with ctx.catalog.write() as s:
        row = repos.get_vm(s, vm_name)
        row.disks = [record if d.get("name") == disk_name else d for d in row.disks]
        defined = (row.definition or {}).get("disks") or []
        if kind == KIND_DISKS and defined:  # what the next points' definitions say, too
            defined = [{**d, "format": fmt} if d.get("name") == disk_name else d for d in defined]
            row.definition = {**row.definition, "disks": defined}
        return _view(s, row)


def recorded_format(vm: VmRow, disk_name: str) -> str:
    """The format recorded for a VM's disk (libvirt: its domain XML's <driver type>); refuses unknown."""
    disk = next((d for d in vm.disks or [] if d.get("name") == disk_name), {})
    in_definition = (vm.definition or {}).get("disks") or []
    defined: dict[str, Any] = next((d for d in in_definition if d.get("name") == disk_name), {})
    fmt = disk.get("format") or (defined.get("format") if vm.kind == "libvirt" else None)
    if fmt not in FORMATS:
        raise InvalidInput(
            f"the format of disk {disk_name} of VM '{vm.name}' is not recorded",
            hint=f"record it: vmvault vm set-format {vm.name} --disk {disk_name} --format raw|qcow2",
            code="disk_format_unknown",
        )
    return str(fmt)


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
    from vmvault.connectors.libvirt.connector import KIND_LIBVIRT
    from vmvault.service.libvirt_vms import statuses

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
    from vmvault.connectors.guest_agent import GuestAgent
    from vmvault.connectors.qemu.qmp import QemuNotRunning, QmpClient
    from vmvault.errors import HypervisorError

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


def save_definition(ctx: Context, vm_id: str, updates: JsonDict, disks: list[JsonDict] | None = None) -> None:
    """Keys merged into a VM's catalog definition and, when given, its disk records (a connector's bookkeeping)."""
    with ctx.catalog.write() as s:
        row = repos.find_vm_by_id(s, vm_id)
        if row is None:
            return
        row.definition = {**(row.definition or {}), **updates}  # a new dict: the JSON column sees the change
        if disks is not None:  # a disk still at the same path and format keeps the chain recorded for it
            kept = {(d.get("name"), d.get("path"), d.get("format")): d for d in row.disks or []}
            row.disks = [kept.get((d["name"], d["path"], d["format"]), d) for d in disks]

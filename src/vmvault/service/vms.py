"""VM use cases: add (from disk images), list, show."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import VmRow
from vmvault.errors import AlreadyExists, InvalidInput, NotFound, VmvaultError
from vmvault.service.context import Context
from vmvault.service.paths import Rule, allowed
from vmvault.service.validate import absolute, check_name
from vmvault.service.views import JsonDict, vm_view

KIND_DISKS = "disks"  # the catalog's kinds of VM (connectors/registry.py)
KIND_QMP = "qmp"
KIND_LIBVIRT = "libvirt"
FORMATS = ("raw", "qcow2")
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
    where = {"disks": [{"path": str(p), "format": f} for p, f in zip(paths, chosen, strict=True)]}
    return _add(ctx, name, KIND_DISKS, where)


def add_qmp_vm(ctx: Context, name: str, qmp_socket: str | Path, agent_socket: str | Path | None = None) -> JsonDict:
    """Add a running QEMU VM: its disks and definition come from QMP (the VM must be running)."""
    check_name("VM", name)
    qmp_path = absolute(qmp_socket)
    agent_path = absolute(agent_socket) if agent_socket else None
    if agent_path is not None and agent_path == qmp_path:
        raise InvalidInput("the QMP socket and the guest agent socket are the same file", hint="give each its socket")
    _refuse_taken(ctx, name)
    return _add(ctx, name, KIND_QMP, {"qmp": str(qmp_path), "guestAgent": str(agent_path) if agent_path else None})


def add_libvirt_vm(ctx: Context, name: str, domain: str, uri: str | None = None) -> JsonDict:
    """Add a libvirt domain: its disks and definition (the domain XML) come from libvirt."""
    check_name("VM", name)
    _refuse_taken(ctx, name)
    return _add(ctx, name, KIND_LIBVIRT, {"domain": domain, "connect": uri})


def _add(ctx: Context, name: str, kind: str, where: JsonDict) -> JsonDict:
    """The VM as its connector describes it now, in the catalog."""
    from vmvault.connectors.registry import connector_for

    with ctx.catalog.read() as s:
        known = [dict(r.definition or {}) for r in repos.list_vms(s) if r.kind == kind]
    disks, definition = connector_for(kind).describe(where, known)
    row = VmRow(id=str(uuid.uuid4()), name=name, kind=kind, disks=disks, definition=definition, created=now_iso())
    with ctx.catalog.write() as s:
        _refuse_taken_in(s, name)
        repos.add_vm(s, row)
        return _view(s, row)


def discover(ctx: Context, uri: str | None = None) -> list[JsonDict]:
    """The libvirt domains at uri that no VM of this catalog is yet."""
    from vmvault.connectors.registry import connector_for

    with ctx.catalog.read() as s:
        known = {str((r.definition or {}).get("uuid")) for r in repos.list_vms(s) if r.kind == KIND_LIBVIRT}
    return [d for d in connector_for(KIND_LIBVIRT).discover(uri) if d.get("uuid") not in known]


def _check_disk_paths(ctx: Context, name: str, disks: list[str | Path]) -> list[Path]:
    if not disks:
        raise InvalidInput(f"VM '{name}' needs at least one disk", hint=f"vmvault vm add {name} --disk PATH")
    paths = [_recorded_path(allowed(ctx, Rule.DISKS, d)) for d in disks]  # API: in the allowed roots (paths.py)
    for i, path in enumerate(paths):
        if path in paths[:i]:
            raise InvalidInput(f"disk {path} is given twice for VM '{name}'", hint="give each --disk once")
    return paths


def _recorded_path(path: Path) -> Path:
    """The path recorded for good: a symlink is resolved to its image file here, once, because each
    backup refuses to follow one (offline.check_registered_disk); LVM's links onto block devices stay."""
    real = Path(os.path.realpath(path))
    return path if not path.is_symlink() or real.is_block_device() else real


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


def set_disk_format(ctx: Context, vm_name: str, disk_name: str, fmt: str) -> JsonDict:
    """An admin's word on a disk's format: recorded with its current qcow2 chain (read under diskformat's rules)."""
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown disk format '{fmt}'", hint="--format raw or qcow2")
    with ctx.catalog.read() as s:
        row = repos.get_vm(s, vm_name)
        disk = next((d for d in row.disks or [] if d.get("name") == disk_name), None)
        kind = row.kind
    if kind not in (KIND_DISKS, KIND_QMP):
        raise InvalidInput(f"VM '{vm_name}' is a {kind} VM: its disks' formats come from its definition")
    if disk is None or not disk.get("path"):
        raise NotFound(f"VM '{vm_name}' has no disk '{disk_name}'", hint=f"see its disks: vmvault vm show {vm_name}")
    from vmvault.connectors.registry import connector_for

    (described,), _ = connector_for(KIND_DISKS).describe({"disks": [{"path": str(disk["path"]), "format": fmt}]}, [])
    record = {**described, "name": disk_name}
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
    """Each kind's connector reports its VMs' power state and agent (libvirt: one connection per URI)."""
    from vmvault.connectors.registry import connector_for
    from vmvault.service.hosts import local_host_name

    here = local_host_name()
    # A VM of another host (vm add --host) is not probed from here: its sockets are on that host.
    live: dict[str, JsonDict] = {r.id: {"powerState": "unknown", "agent": f"on host {r.host}"}
                                 for r in rows if r.host is not None and r.host != here}  # fmt: skip
    for kind in dict.fromkeys(r.kind for r in rows):
        group = [r for r in rows if r.kind == kind and r.id not in live]
        found = connector_for(kind).status([dict(r.definition or {}) for r in group])
        live.update({r.id: status for r, status in zip(group, found, strict=True)})
    for row, view in zip(rows, views, strict=True):
        view.update(live[row.id])
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


# ---- the portal's Add VM page: running QEMU VMs and libvirt domains, with paths confined ----------


def add_running_vm(ctx: Context, name: str, qmp_socket: str, agent_socket: str | None) -> JsonDict:
    """A running plain QEMU VM by its QMP (and guest agent) socket; for API/portal callers the sockets
    must lie in the allowed disk roots like the disks (a socket is a way into a process)."""
    if not qmp_socket:
        raise InvalidInput(f"VM '{name}' needs the path of its QMP socket", hint="give the QMP socket's path")
    qmp = allowed(ctx, Rule.DISKS, qmp_socket)
    agent = allowed(ctx, Rule.DISKS, agent_socket) if agent_socket else None
    return add_qmp_vm(ctx, name, qmp, agent)


def discover_libvirt(ctx: Context, uri: str | None = None) -> tuple[list[JsonDict], str | None]:
    """libvirt domains not yet added, or the reason none can be listed (no libvirtd, no binding)."""
    try:
        return discover(ctx, uri), None
    except VmvaultError as exc:
        return [], exc.message
    except Exception as exc:  # libvirt.libvirtError (or ImportError): shown as the page's note, not a crash
        return [], f"cannot list libvirt domains: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def add_discovered_domain(ctx: Context, name: str, domain: str) -> JsonDict:
    """A libvirt domain picked from discover_libvirt()'s list (by name or UUID), at the default URI."""
    if not domain:
        raise InvalidInput("pick a libvirt domain to add", hint="choose one in the list of discovered domains")
    return add_libvirt_vm(ctx, name, domain)

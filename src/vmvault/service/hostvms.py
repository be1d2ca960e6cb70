"""VMs of another host (`vm add NAME --host HOST ...`): their jobs run on that host's agent.

Accepted before the host's agent has registered. Paths are paths on that host, so nothing is
opened here: no existence, format or backing-chain check on the server. A disk given without
--format is guessed and its chain read on the agent at its first backup, under `vm add`'s rules
(connectors/diskimage: checkOnHost), and recorded then.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import PurePosixPath

from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import VmRow
from vmvault.errors import InvalidInput
from vmvault.service.context import Context
from vmvault.service.validate import check_name
from vmvault.service.views import JsonDict
from vmvault.service.vms import FORMATS, KIND_DISKS, KIND_LIBVIRT, KIND_QMP, _refuse_taken_in, _view

DESCRIBE_ON_HOST = "describeOnHost"  # definition key: the agent describes the VM at its first backup


def add_vm_on_host(
    ctx: Context, name: str, host: str | None, *, disks: list[str] | None = None, formats: list[str] | None = None,
    qmp: str | None = None, guest_agent: str | None = None, libvirt: str | None = None, connect: str | None = None,
) -> JsonDict:  # fmt: skip
    """`vm add NAME --host HOST` (CLI, locally or through the API): one of disks, qmp or libvirt, paths on
    that host; nothing on this machine is opened. host None: only the API's plain disk form may skip it."""
    forms = [f for f, given in (("--disk", bool(disks)), ("--qmp", qmp is not None), ("--libvirt", libvirt is not None))
             if given]  # fmt: skip
    if host is None:
        raise InvalidInput(
            f"VM '{name}' by {' and '.join(forms) or '--guest-agent/--connect'} is added on a server only with --host "
            "(its agent describes it); the server's own running VMs are added on the server itself",
            hint=f"vmvault vm add {name} --host HOST {forms[0] if forms else '--qmp'} ...",
        )
    if len(forms) != 1:
        raise InvalidInput(
            f"vm add --host takes one of --disk, --qmp or --libvirt (got {', '.join(forms) or 'none'})",
            hint=f"vmvault vm add {name} --host {host} --disk PATH (a path on that host)",
        )
    if (formats and not disks) or (guest_agent and qmp is None) or (connect and libvirt is None):
        raise InvalidInput(
            "with --host: --format goes with --disk, --guest-agent with --qmp, --connect with --libvirt",
            hint=f"vmvault vm add {name} --host {host} --qmp SOCKET [--guest-agent SOCKET]",
        )
    if qmp is not None:
        return add_host_qmp_vm(ctx, name, host, qmp, guest_agent)
    if libvirt is not None:
        return add_host_libvirt_vm(ctx, name, host, libvirt, connect)
    return add_host_vm(ctx, name, host, list(disks or []), formats)


def add_host_vm(ctx: Context, name: str, host: str, disks: list[str], formats: list[str] | None = None) -> JsonDict:
    """A VM given by disk images on another host."""
    check_name("VM", name)
    check_name("host", host)
    paths = [host_path(name, d) for d in disks]
    if not paths:
        raise InvalidInput(
            f"VM '{name}' needs at least one disk", hint=f"vmvault vm add {name} --host {host} --disk PATH"
        )
    if len(set(paths)) != len(paths):
        raise InvalidInput(f"a disk is given twice for VM '{name}'", hint="give each --disk once")
    chosen = _formats(name, len(paths), formats or [])
    records = [{"name": f"disk{i}", "path": p, "format": f, "checkOnHost": f is None}
               for i, (p, f) in enumerate(zip(paths, chosen, strict=True))]  # fmt: skip
    definition = {"disks": [{"name": r["name"], "path": r["path"], "format": r["format"]} for r in records]}
    return _add_row(ctx, VmRow(id=str(uuid.uuid4()), name=name, kind=KIND_DISKS, disks=records,
                               definition=definition, created=now_iso(), host=host))  # fmt: skip


def add_host_qmp_vm(ctx: Context, name: str, host: str, qmp: str, guest_agent: str | None = None) -> JsonDict:
    """A running QEMU VM of another host by its QMP socket (a path on that host): its disks and
    definition come from QMP on the agent, at its first backup (then recorded)."""
    check_name("VM", name)
    check_name("host", host)
    where = {"kind": KIND_QMP, "qmp": host_path(name, qmp),
             "guestAgent": host_path(name, guest_agent) if guest_agent else None}  # fmt: skip
    return _add_described_later(ctx, name, host, KIND_QMP, where)


def add_host_libvirt_vm(ctx: Context, name: str, host: str, domain: str, uri: str | None = None) -> JsonDict:
    """A libvirt domain of another host: its disks and XML come from that host's libvirt, on its agent."""
    check_name("VM", name)
    check_name("host", host)
    if not domain or len(domain) > 256 or any(ord(c) < 32 for c in domain):
        raise InvalidInput(f"invalid libvirt domain name '{domain}'", hint="give the domain's name (virsh list --all)")
    where = {"kind": KIND_LIBVIRT, "domain": domain, "connect": uri}
    return _add_described_later(ctx, name, host, KIND_LIBVIRT, where)


def _add_described_later(ctx: Context, name: str, host: str, kind: str, where: JsonDict) -> JsonDict:
    definition = {**where, DESCRIBE_ON_HOST: True}
    return _add_row(ctx, VmRow(id=str(uuid.uuid4()), name=name, kind=kind, disks=[], definition=definition,
                               created=now_iso(), host=host))  # fmt: skip


def _add_row(ctx: Context, row: VmRow) -> JsonDict:
    with ctx.catalog.write() as s:
        _refuse_taken_in(s, row.name)
        s.add(row)
        s.flush()
        return _view(s, row)


def described_on_host(
    definition: JsonDict, kind: str, save: Callable[[JsonDict, list[JsonDict]], None]
) -> tuple[list[JsonDict], JsonDict]:
    """On the agent, before a VM's first backup: describe it as `vm add` would, from this host's
    QMP or libvirt; save(updates, disks) records it (the server's catalog, through the API)."""
    from vmvault.connectors.registry import connector_for

    where = {k: v for k, v in definition.items() if k != DESCRIBE_ON_HOST}
    disks, described = connector_for(kind).describe(where, [])
    described = {**described, DESCRIBE_ON_HOST: False}
    save(described, disks)
    return disks, described


def host_elsewhere(ctx: Context, vm_name: str) -> str | None:
    """The VM's host when it is another host than this one (`vm add --host`): its agent runs its jobs."""
    from vmvault.catalog import repos
    from vmvault.service.hosts import local_host_name

    with ctx.catalog.read() as s:
        row = repos.find_vm(s, vm_name)
        host = row.host if row is not None else None
    return host if host is not None and host != local_host_name() else None


def refuse_secondary(vm_name: str, host: str, verb: str) -> None:
    """--from-secondary for a VM of another host: its agent reads the vault's primary copy only."""
    from vmvault.service.vaultio import reading_from_secondary

    if reading_from_secondary():
        raise InvalidInput(
            f"VM '{vm_name}' belongs to host '{host}', whose agent reads the vault's primary copy",
            hint=f"{verb} it without --from-secondary",
        )


def host_path(vm: str, raw: str, what: str = "disk path") -> str:
    """An absolute path on the VM's host, without '..' or control characters (it is never opened here)."""
    path = PurePosixPath(raw)
    if not path.is_absolute() or ".." in path.parts or any(ord(c) < 32 for c in raw) or len(raw) > 4096:
        raise InvalidInput(
            f"{what} '{raw}' of VM '{vm}' is not an absolute path on its host",
            hint="give it from /, as the VM's host sees it, without '..'",
        )
    return str(path)


def _formats(name: str, count: int, formats: list[str]) -> list[str | None]:
    if any(f not in FORMATS for f in formats):
        raise InvalidInput(f"unknown disk format {sorted(set(formats) - set(FORMATS))}", hint="--format raw or qcow2")
    if len(formats) == 1:
        return [formats[0]] * count
    if formats and len(formats) != count:
        raise InvalidInput(f"VM '{name}' has {count} disks and {len(formats)} --format values",
                           hint="give one --format for all disks, or one per --disk in the same order")  # fmt: skip
    return list(formats) or [None] * count


def discover_on_host(ctx: Context, host: str) -> list[JsonDict]:
    """The libvirt domains the agent of host found at its registration that no VM of this catalog is yet."""
    from vmvault.catalog import repos
    from vmvault.catalog.models import HostRow
    from vmvault.errors import NotFound

    with ctx.catalog.read() as s:
        row = s.get(HostRow, host)
        if row is None:
            raise NotFound(f"host '{host}' not found", hint=f"start its agent: vmvault agent run --host {host}")
        found = dict((row.details or {}).get("hypervisors") or {})
        known = {str((r.definition or {}).get("uuid")) for r in repos.list_vms(s) if r.kind == KIND_LIBVIRT}
    uri = found.get("libvirtUri")
    return [{**d, "connect": uri, "host": host} for d in found.get("libvirtDomains") or []
            if d.get("uuid") not in known]  # fmt: skip

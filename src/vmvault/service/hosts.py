"""Hosts: the machines of a deployment, registered with a heartbeat (`vmvault host list|show|remove`).

Every `vmvault serve` registers the machine it runs on (role Server, named by its host name) and
beats its heartbeat every HEARTBEAT_S; a host is Online while its last heartbeat is younger than
HOST_LEASE_S, else Offline. Agents on hypervisor hosts (role Agent) will register the same way.
A host's running jobs: a server's are the InProgress jobs owned by a process of its boot
(jobs.owner_boot_id), less other hosts' VMs'; an agent's are those of its VMs;
its VMs are those whose `host` names it (VMs added without a host have none: any server runs them).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from vmvault.catalog.clock import now_iso, seconds_between
from vmvault.catalog.models import HostRow, JobRow, VmRow
from vmvault.errors import Busy, InvalidInput, NotFound
from vmvault.proc import boot_id
from vmvault.service.context import Context
from vmvault.service.views import JsonDict

HEARTBEAT_S = 10.0
HOST_LEASE_S = 60.0
SERVER, AGENT = "Server", "Agent"
ONLINE, OFFLINE = "Online", "Offline"


def local_host_name() -> str:
    return socket.gethostname() or "localhost"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("vmvault")
    except PackageNotFoundError:
        return "unknown"


def heartbeat_server(ctx: Context, address: str | None) -> None:
    """Register (or refresh) this machine as a Server host; called by every `vmvault serve`."""
    name, now = local_host_name(), now_iso()
    with ctx.catalog.write() as s:
        row = s.get(HostRow, name)
        if row is None:
            row = HostRow(name=name, role=SERVER, registered=now, details={})
            s.add(row)
        pids = {str(p): a for p, a in dict((row.details or {}).get("servers") or {}).items() if p != str(os.getpid())}
        row.role, row.version, row.boot_id, row.last_heartbeat = SERVER, version(), boot_id(), now
        row.address = address or row.address
        # The serves of this machine (several may run, each with its own home), by pid.
        row.details = {**(row.details or {}), "servers": {**pids, str(os.getpid()): address}}


def server_online(ctx: Context) -> bool:
    """Some Server host beat its heartbeat within the lease (its serves run queued jobs)."""
    with ctx.catalog.read() as s:
        rows = s.scalars(select(HostRow).where(HostRow.role == SERVER)).all()
        return any(state_of(r) == ONLINE for r in rows)


def state_of(row: HostRow) -> str:
    return ONLINE if seconds_between(row.last_heartbeat, now_iso()) <= HOST_LEASE_S else OFFLINE


def _running_jobs(s: Session, row: HostRow) -> list[str]:
    """The claimed jobs a host runs: an agent's are its VMs' (several agents may share a machine's boot
    id, so never by boot id); a server's are those its machine claimed, less other hosts' VMs'."""
    running = select(JobRow.id).where(JobRow.status == "InProgress", JobRow.owner_pid > 0)
    if row.role == AGENT:
        query = running.join(VmRow, VmRow.name == JobRow.vm).where(VmRow.host == row.name)
    elif row.boot_id:
        elsewhere = select(VmRow.name).where(VmRow.host.is_not(None), VmRow.host != row.name)
        query = running.where(JobRow.owner_boot_id == row.boot_id,
                              JobRow.vm.is_(None) | JobRow.vm.not_in(elsewhere))  # fmt: skip
    else:
        return []
    return list(s.scalars(query.order_by(JobRow.start_time)).all())


def _vms(s: Session, name: str) -> list[str]:
    return list(s.scalars(select(VmRow.name).where(VmRow.host == name).order_by(VmRow.name)).all())


def _view(s: Session, row: HostRow) -> JsonDict:
    vms = int(s.scalar(select(func.count()).select_from(VmRow).where(VmRow.host == row.name)) or 0)
    return {
        "name": row.name,
        "role": row.role,
        "state": state_of(row),
        "lastHeartbeat": row.last_heartbeat,
        "version": row.version,
        # Another vmvault version than this server's (the agent or server there needs the same release).
        "versionMismatch": bool(row.version) and row.version != version(),
        "address": row.address,
        "runningJobs": len(_running_jobs(s, row)),
        "vms": vms,
    }


def host_of_vms(ctx: Context) -> dict[str, str | None]:
    """Each VM's host by VM name (None: no host named, the servers' own machine runs its jobs)."""
    with ctx.catalog.read() as s:
        return {name: host for name, host in s.execute(select(VmRow.name, VmRow.host)).all()}


def list_hosts(ctx: Context) -> list[JsonDict]:
    with ctx.catalog.read() as s:
        rows: Sequence[HostRow] = s.scalars(select(HostRow).order_by(HostRow.name)).all()
        return [_view(s, r) for r in rows]


def _get(s: Session, name: str) -> HostRow:
    row = s.get(HostRow, name)
    if row is None:
        raise NotFound(f"host '{name}' not found", hint="list hosts with: vmvault host list")
    return row


def show_host(ctx: Context, name: str) -> JsonDict:
    with ctx.catalog.read() as s:
        row = _get(s, name)
        return {
            **_view(s, row),
            "registered": row.registered,
            "bootId": row.boot_id,
            "vmNames": _vms(s, row.name),
            "runningJobIds": _running_jobs(s, row),
            "details": dict(row.details or {}),
        }


def remove_host(ctx: Context, name: str) -> JsonDict:
    """Forget an Offline host that no VM belongs to; nothing changes otherwise."""
    with ctx.catalog.write() as s:
        row = _get(s, name)
        view = _view(s, row)
        if view["state"] == ONLINE:
            raise Busy(
                f"host '{name}' is Online (last heartbeat {row.last_heartbeat})",
                hint=f"stop its vmvault first; it is Offline {HOST_LEASE_S:.0f} s after its last heartbeat",
            )
        vms = _vms(s, name)
        if vms:
            raise InvalidInput(
                f"host '{name}' still has {len(vms)} VM(s): {', '.join(vms[:10])}",
                hint="their jobs run on that host: move them to another host first, then remove it",
            )
        s.delete(row)
    return {**view, "removed": True}

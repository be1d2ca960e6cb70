"""libvirt-managed VMs: discover and add domains, report their agent, reconcile leftovers at service start.

Their backups run over the libvirt connector (connectors/libvirt/connector.py, docs/libvirt.md).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import VmRow
from vmvault.connectors.libvirt.connector import KIND_LIBVIRT
from vmvault.errors import InvalidInput
from vmvault.service.context import Context
from vmvault.service.validate import check_name
from vmvault.service.views import JsonDict

log = logging.getLogger("vmvault")



# ---- discover and add ------------------------------------------------------------------------------------


def discover(ctx: Context, uri: str | None = None) -> list[JsonDict]:
    """The domains at uri that no VM of this catalog is yet."""
    from vmvault.connectors.libvirt import domain as lv

    uri = uri or lv.DEFAULT_URI
    with ctx.catalog.read() as s:
        known = {str((r.definition or {}).get("uuid")) for r in repos.list_vms(s) if r.kind == KIND_LIBVIRT}
    conn = lv.connect(uri)
    try:
        found = [lv.inspect(d) for d in conn.listAllDomains(0)]
    finally:
        conn.close()
    return [{**d.to_dict(), "connect": uri} for d in sorted(found, key=lambda d: d.name) if d.uuid not in known]


def add_libvirt_vm(ctx: Context, name: str, domain: str, uri: str | None = None) -> JsonDict:
    from vmvault.connectors.libvirt import domain as lv
    from vmvault.connectors.libvirt.connector import definition_of
    from vmvault.service.vms import _refuse_taken, _refuse_taken_in, _view

    check_name("VM", name)
    uri = uri or lv.DEFAULT_URI
    _refuse_taken(ctx, name)
    conn = lv.connect(uri)
    try:
        info = lv.inspect(lv.lookup(conn, domain))
    finally:
        conn.close()
    if not info.disks:
        raise InvalidInput(f"domain '{domain}' has no writable file disk to back up")
    row = VmRow(
        id=str(uuid.uuid4()),
        name=name,
        kind=KIND_LIBVIRT,
        disks=[{"name": d.name, "path": d.path, "format": d.format} for d in info.disks],  # the XML's <driver type>
        definition=definition_of(uri, info),
        created=now_iso(),
    )
    with ctx.catalog.write() as s:
        _refuse_taken_in(s, name)
        if any((r.definition or {}).get("uuid") == info.uuid for r in repos.list_vms(s) if r.kind == KIND_LIBVIRT):
            raise InvalidInput(f"domain '{domain}' ({info.uuid}) is already added", hint="see it with: vmvault vm list")
        repos.add_vm(s, row)
        return _view(s, row)


# ---- status for vm list / item show ---------------------------------------------------------------------

AGENT_FIX = "vmvault vm enable-agent {name}, effective at next boot"
STATUS_TIMEOUT_S = 1  # vm list stays fast: one guest-ping per running domain, this long at most


def statuses(rows: list[VmRow]) -> dict[str, JsonDict]:
    """Power state, disks (targets) and agent reachability of libvirt VMs, by VM id (one connection per URI)."""
    from vmvault.connectors.libvirt import domain as lv

    out: dict[str, JsonDict] = {}
    by_uri: dict[str, list[VmRow]] = {}
    for row in rows:
        by_uri.setdefault(str((row.definition or {}).get("connect") or lv.DEFAULT_URI), []).append(row)
    for uri, group in by_uri.items():
        try:
            conn = lv.connect(uri)
        except lv.LibvirtError:
            out.update({r.id: {"powerState": "unknown", "agent": f"unknown (libvirt at {uri} not reachable)"}
                        for r in group})  # fmt: skip
            continue
        try:
            for row in group:
                out[row.id] = _status(conn, row)
        finally:
            conn.close()
    return out


def _status(conn: Any, row: VmRow) -> JsonDict:
    from vmvault.connectors.libvirt import domain as lv

    definition = row.definition or {}
    try:
        dom = lv.lookup(conn, str(definition.get("domain")), definition.get("uuid"))
        info = lv.inspect(dom)
    except lv.LibvirtError:
        return {"powerState": "undefined", "agent": "unknown (the domain is gone from libvirt)"}
    return {"powerState": info.state, "disks": [{"name": d.name, "path": d.path} for d in info.disks],
            "agent": _agent_state(dom, info)}  # fmt: skip


def _agent_state(dom: Any, info: Any) -> str:
    from vmvault.connectors.libvirt import domain as lv

    if not info.agent_channel:
        pending = info.running and lv.has_agent_channel(lv.persistent_xml(dom))
        return "no channel (added, effective at next boot)" if pending else "no channel"
    if not info.running:
        return "channel (domain not running)"
    return "answers" if lv.agent_answers(dom, STATUS_TIMEOUT_S) else "channel, no answer"


def agent_advice(row: VmRow) -> JsonDict:
    """What item show says about a libvirt VM's guest agent: channel present, and the fix when not."""
    from vmvault.connectors.libvirt import domain as lv

    definition = row.definition or {}
    try:
        conn = lv.connect(str(definition.get("connect") or lv.DEFAULT_URI))
    except lv.LibvirtError as exc:
        return {"channel": None, "message": f"cannot ask libvirt: {exc.message}"}
    try:
        dom = lv.lookup(conn, str(definition.get("domain")), definition.get("uuid"))
        info = lv.inspect(dom)
        pending = not info.agent_channel and lv.has_agent_channel(lv.persistent_xml(dom))
    except lv.LibvirtError as exc:
        return {"channel": None, "message": exc.message}
    finally:
        conn.close()
    if info.agent_channel:
        return {"channel": True, "message": None}
    crash = "backups are CrashConsistent until then"
    if pending:
        return {"channel": False, "message": f"the {lv.AGENT_CHANNEL} channel is added and takes effect at the "
                f"next boot of domain {info.name}: {crash}"}  # fmt: skip
    return {"channel": False, "message": f"domain {info.name} has no {lv.AGENT_CHANNEL} channel: fix it with "
            f"{AGENT_FIX.format(name=row.name)}; {crash}"}  # fmt: skip


def enable_agent(ctx: Context, name: str) -> JsonDict:
    """Add the guest agent channel to a libvirt VM's persistent definition (idempotent)."""
    from vmvault.connectors.libvirt import domain as lv

    with ctx.catalog.read() as s:
        row = repos.get_vm(s, name)
        s.expunge(row)
    if row.kind != KIND_LIBVIRT:
        raise InvalidInput(
            f"VM '{name}' is not a libvirt domain: vmvault cannot add a guest agent channel to it",
            hint="give the QEMU process a virtserialport named org.qemu.guest_agent.0 and add the VM with "
            "--guest-agent SOCKET (docs/running-vms.md)",
        )
    definition = row.definition or {}
    conn = lv.connect(str(definition.get("connect") or lv.DEFAULT_URI))
    try:
        dom = lv.lookup(conn, str(definition.get("domain")), definition.get("uuid"))
        added = lv.add_agent_channel(dom)
        running = bool(dom.isActive())
        live = lv.inspect(dom).agent_channel
    finally:
        conn.close()
    if live:
        effect = "the running domain has the channel"
    elif running:
        effect = "effective at the next boot (shut the domain down and start it; a reboot inside the guest is not one)"
    else:
        effect = "effective when the domain next starts"
    return {"vm": name, "domain": definition.get("domain"), "added": added, "effect": effect,
            "note": "install and start qemu-guest-agent inside the guest too"}  # fmt: skip


# ---- leftovers of a killed vmvault (service start) -----------------------------------------------------------


def reconcile_leftovers(ctx: Context) -> list[str]:
    """Abort vmvault's leftover backup jobs on libvirt domains, remove scratch files and failed checkpoints.

    Run at `vmvault serve` start, before any job runs. A failed checkpoint is a vmvault checkpoint
    of the VM that is not the checkpoint of its latest point (read from the vault; when the vault
    cannot be opened the checkpoints are left to the next backup, which merges them away).
    Returns what was done, one line each.
    """
    from vmvault.connectors.libvirt import domain as lv
    from vmvault.service.jobs import Operation

    with ctx.catalog.read() as s:  # a VM with a live Backup job (another process's) is that job's business
        rows = [r for r in repos.list_vms(s) if r.kind == KIND_LIBVIRT]
        rows = [r for r in rows if repos.running_job_for_vm(s, r.name, Operation.BACKUP) is None]
        s.expunge_all()
    done: list[str] = []
    for row in rows:
        definition = row.definition or {}
        try:
            conn = lv.connect(str(definition.get("connect") or lv.DEFAULT_URI))
        except lv.LibvirtError as exc:
            log.warning("leftovers of VM %s not reconciled: %s", row.name, exc.message)
            continue
        try:
            dom = lv.lookup(conn, str(definition.get("domain")), definition.get("uuid"))
            done += _reconcile(ctx, row, dom)
        except lv.LibvirtError as exc:
            log.warning("leftovers of VM %s not reconciled: %s", row.name, exc.message)
        finally:
            conn.close()
    for line in done:
        log.info("reconciled: %s", line)
    return done


def _reconcile(ctx: Context, row: VmRow, dom: Any) -> list[str]:
    from vmvault.connectors.libvirt import domain as lv
    from vmvault.connectors.workfiles import run_dir

    tag = row.id.replace("-", "")[:8]
    work = ctx.settings.home / "scratch" / tag
    done = []
    if lv.leftover_job(dom, work) == "vmvault":
        with contextlib.suppress(lv.LibvirtError):
            lv.abort_leftover_job(dom, work)
            done.append(f"aborted the backup job a killed vmvault left on domain {dom.name()} (VM {row.name})")
    sockets = run_dir(ctx.settings.home, row.id)
    files = sorted(work.glob("scratch-*.qcow2")) + [p for p in [sockets / "backup.sock"] if p.exists()]
    for path in files:
        path.unlink(missing_ok=True)
        done.append(f"removed {path}")
    for directory in (work, sockets):
        with contextlib.suppress(OSError):
            directory.rmdir()
    keep = _latest_checkpoint(ctx, row)
    if keep is not False:
        prefix = f"{lv.CHECKPOINT_PREFIX}{tag}-"
        for name in lv.checkpoint_names(dom):
            if name.startswith(prefix) and name != keep:
                try:
                    lv.delete_checkpoint(dom, name, metadata_only=not dom.isActive())
                    done.append(f"deleted failed checkpoint {name} of domain {dom.name()} (VM {row.name})")
                except lv.LibvirtError as exc:
                    log.warning("could not delete checkpoint %s: %s", name, exc.message)
    return done


def _latest_checkpoint(ctx: Context, row: VmRow) -> str | bool | None:
    """The checkpoint of the VM's latest point (None: no point or none recorded; False: cannot tell)."""
    from vmvault.errors import VmvaultError
    from vmvault.service.vaultio import opened_vault, read_manifest_or_none

    with ctx.catalog.read() as s:
        latest = repos.latest_recovery_point(s, row.id)
        vault = repos.vault_by_id(s, latest.vault_id) if latest is not None else None
        s.expunge_all()
    if latest is None or vault is None:
        return None
    try:
        with opened_vault(ctx, vault) as opened:
            manifest = read_manifest_or_none(opened, latest.id)
    except (VmvaultError, OSError) as exc:
        log.warning("checkpoints of VM %s left alone: %s", row.name, exc)
        return False
    if manifest is None:
        return False
    name = (manifest.vm_definition or {}).get("checkpoint")
    return str(name) if name else None


def reconcile_at_start(ctx: Context) -> None:
    """reconcile_leftovers for `vmvault serve` start: never keeps the service from starting."""
    try:
        reconcile_leftovers(ctx)
    except Exception:  # logged; the next backup of each domain reconciles again
        log.warning("reconciling leftovers of libvirt backups failed", exc_info=True)

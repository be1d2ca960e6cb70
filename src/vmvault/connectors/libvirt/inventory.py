"""libvirt domains as `vm add --libvirt`, `vm list`, `item show`, `vm enable-agent`, `doctor` and the
service's start (leftovers of a killed vmvault) see them."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from vmvault.connectors.contract import JsonDict, LeftoverVm
from vmvault.connectors.libvirt import domain as lv
from vmvault.connectors.libvirt.domain import definition_of
from vmvault.connectors.workfiles import run_dir, tag
from vmvault.errors import InvalidInput

log = logging.getLogger("vmvault")

AGENT_FIX = "vmvault vm enable-agent {name}, effective at next boot"
STATUS_TIMEOUT_S = 1  # vm list stays fast: one guest-ping per running domain, this long at most
AGENT_TIMEOUT_S = 3  # doctor
MIN_LIBVIRT_BACKUP = (7, 2)  # pull backups with checkpoints for QEMU domains
PASS, WARN, FAIL = "pass", "warn", "fail"


def uri_of(definition: JsonDict) -> str:
    return str(definition.get("connect") or lv.DEFAULT_URI)


def describe(where: JsonDict, known: list[JsonDict]) -> tuple[list[JsonDict], JsonDict]:
    """The domain where["domain"] at where["connect"]: its disk records (the XML's <driver type>) and definition."""
    uri, domain = uri_of(where), str(where["domain"])
    conn = lv.connect(uri)
    try:
        info = lv.inspect(lv.lookup(conn, domain))
    finally:
        conn.close()
    if not info.disks:
        raise InvalidInput(f"domain '{domain}' has no writable file disk to back up")
    if any(d.get("uuid") == info.uuid for d in known):
        raise InvalidInput(f"domain '{domain}' ({info.uuid}) is already added", hint="see it with: vmvault vm list")
    disks = [{"name": d.name, "path": d.path, "format": d.format} for d in info.disks]
    return disks, definition_of(uri, info)


def statuses(definitions: list[JsonDict]) -> list[JsonDict]:
    """Power state, disks (targets) and agent reachability of domains (one connection per URI)."""
    out: list[JsonDict] = [{} for _ in definitions]
    by_uri: dict[str, list[int]] = {}
    for i, definition in enumerate(definitions):
        by_uri.setdefault(uri_of(definition), []).append(i)
    for uri, group in by_uri.items():
        try:
            conn = lv.connect(uri)
        except lv.LibvirtError:
            for i in group:
                out[i] = {"powerState": "unknown", "agent": f"unknown (libvirt at {uri} not reachable)"}
            continue
        try:
            for i in group:
                out[i] = _status(conn, definitions[i])
        finally:
            conn.close()
    return out


def _status(conn: Any, definition: JsonDict) -> JsonDict:
    try:
        dom = lv.lookup(conn, str(definition.get("domain")), definition.get("uuid"))
        info = lv.inspect(dom)
    except lv.LibvirtError:
        return {"powerState": "undefined", "agent": "unknown (the domain is gone from libvirt)"}
    return {"powerState": info.state, "disks": [{"name": d.name, "path": d.path} for d in info.disks],
            "agent": _agent_state(dom, info)}  # fmt: skip


def _agent_state(dom: Any, info: Any) -> str:
    if not info.agent_channel:
        pending = info.running and lv.has_agent_channel(lv.persistent_xml(dom))
        return "no channel (added, effective at next boot)" if pending else "no channel"
    if not info.running:
        return "channel (domain not running)"
    return "answers" if lv.agent_answers(dom, STATUS_TIMEOUT_S) else "channel, no answer"


def agent_advice(vm_name: str, definition: JsonDict) -> JsonDict:
    """What item show says about a domain's guest agent: channel present, and the fix when not."""
    try:
        conn = lv.connect(uri_of(definition))
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
            f"{AGENT_FIX.format(name=vm_name)}; {crash}"}  # fmt: skip


def enable_agent(vm_name: str, definition: JsonDict) -> JsonDict:
    """Add the guest agent channel to the domain's persistent definition (idempotent)."""
    conn = lv.connect(uri_of(definition))
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
    return {"vm": vm_name, "domain": definition.get("domain"), "added": added, "effect": effect,
            "note": "install and start qemu-guest-agent inside the guest too"}  # fmt: skip


# ---- leftovers of a killed vmvault (service start) -----------------------------------------------------------


def reconcile(home: str, vms: list[LeftoverVm]) -> list[str]:
    """Abort vmvault's leftover backup jobs on domains, remove scratch files and failed checkpoints.

    A failed checkpoint is a vmvault checkpoint of the VM that is not the checkpoint of its latest
    point (vm.latest; when that point could not be read the checkpoints are left to the next
    backup, which merges them away). Returns what was done, one line each.
    """
    done: list[str] = []
    for vm in vms:
        try:
            conn = lv.connect(uri_of(vm.definition))
        except lv.LibvirtError as exc:
            log.warning("leftovers of VM %s not reconciled: %s", vm.name, exc.message)
            continue
        try:
            dom = lv.lookup(conn, str(vm.definition.get("domain")), vm.definition.get("uuid"))
            done += _reconcile(home, vm, dom)
        except lv.LibvirtError as exc:
            log.warning("leftovers of VM %s not reconciled: %s", vm.name, exc.message)
        finally:
            conn.close()
    return done


def _reconcile(home: str, vm: LeftoverVm, dom: Any) -> list[str]:
    short = tag(vm.vm_id)
    work = Path(home) / "scratch" / short
    done = []
    if lv.leftover_job(dom, work) == "vmvault":
        with contextlib.suppress(lv.LibvirtError):
            lv.abort_leftover_job(dom, work)
            done.append(f"aborted the backup job a killed vmvault left on domain {dom.name()} (VM {vm.name})")
    sockets = run_dir(home, vm.vm_id)
    files = sorted(work.glob("scratch-*.qcow2")) + [p for p in [sockets / "backup.sock"] if p.exists()]
    for path in files:
        path.unlink(missing_ok=True)
        done.append(f"removed {path}")
    for directory in (work, sockets):
        with contextlib.suppress(OSError):
            directory.rmdir()
    if vm.latest_known:
        keep = vm.latest.definition.get("checkpoint") if vm.latest is not None else None
        prefix = f"{lv.CHECKPOINT_PREFIX}{short}-"
        for name in lv.checkpoint_names(dom):
            if name.startswith(prefix) and name != keep:
                try:
                    lv.delete_checkpoint(dom, name, metadata_only=not dom.isActive())
                    done.append(f"deleted failed checkpoint {name} of domain {dom.name()} (VM {vm.name})")
                except lv.LibvirtError as exc:
                    log.warning("could not delete checkpoint %s: %s", name, exc.message)
    return done


# ---- doctor ---------------------------------------------------------------------------------------------------


def doctor_host(needed: bool) -> list[JsonDict]:
    """Reachable, and what its version can do; only a failure when a libvirt VM is to be checked."""
    try:
        conn = lv.connect(lv.DEFAULT_URI)
    except lv.LibvirtError as exc:
        return [_check("libvirt", FAIL if needed else WARN, exc.message,
                       "start libvirtd (systemctl start libvirtd), or ignore this if no VM is managed by libvirt")]
    try:
        return _capabilities(conn)
    finally:
        conn.close()


def _capabilities(conn: Any) -> list[JsonDict]:
    lvmod = lv._lv()
    raw = int(conn.getLibVersion())
    version = (raw // 1_000_000, raw // 1000 % 1000, raw % 1000)
    text = ".".join(map(str, version))
    checks = [_check("libvirt", PASS, f"libvirt {text} at {conn.getURI()}")]
    has_api = hasattr(lvmod.virDomain, "backupBegin") and hasattr(lvmod.virDomain, "checkpointCreateXML")
    if not has_api or version[:2] < MIN_LIBVIRT_BACKUP:
        checks.append(_check("libvirt backup API", FAIL,
                             f"libvirt {text} (or its Python binding) lacks checkpoints and pull backups",
                             "upgrade libvirt to 7.2 or later (Debian 12: 9.0) and python3-libvirt"))  # fmt: skip
    else:
        checks.append(_check("libvirt backup API", PASS, "checkpoints and pull backups (backupBegin)"))
    if hasattr(lvmod, "VIR_DOMAIN_BACKUP_BEGIN_QUIESCE"):
        checks.append(_check("libvirt QUIESCE flag", PASS, "backupBegin freezes the guest itself (QUIESCE flag)"))
    else:
        checks.append(_check("libvirt QUIESCE flag", PASS,
                             f"libvirt {text} rejects backupBegin's QUIESCE flag: vmvault freezes the guest through "
                             "the agent around backupBegin instead (same consistency)"))  # fmt: skip
    return checks


def doctor_vm(vm_name: str, definition: JsonDict) -> list[JsonDict]:
    conn = lv.connect(uri_of(definition))
    try:
        try:
            dom = lv.lookup(conn, str(definition.get("domain")), definition.get("uuid"))
            info = lv.inspect(dom)
        except lv.LibvirtError as exc:
            return [_check(f"vm {vm_name}", FAIL, exc.message, exc.hint or "vmvault vm add again with --libvirt")]
        return [_check(f"vm {vm_name}", PASS, f"libvirt domain {info.name} is {info.state}"),
                _agent_check(vm_name, dom, info, AGENT_FIX.format(name=vm_name))]  # fmt: skip
    finally:
        conn.close()


def _agent_check(vm_name: str, dom: Any, info: Any, fix: str) -> JsonDict:
    label = f"vm {vm_name} guest agent"
    if not info.agent_channel:
        if lv.has_agent_channel(lv.persistent_xml(dom)):
            return _check(label, FAIL, f"domain {info.name}: the {lv.AGENT_CHANNEL} channel is defined but takes "
                          "effect at its next boot; backups are CrashConsistent until then",
                          "shut the domain down and start it")  # fmt: skip
        return _check(label, FAIL, f"domain {info.name} has no {lv.AGENT_CHANNEL} channel: backups are "
                      "CrashConsistent", f"{fix}; install qemu-guest-agent in the guest")  # fmt: skip
    if not info.running:
        return _check(label, PASS, f"domain {info.name} has the {lv.AGENT_CHANNEL} channel (not running now)")
    if lv.agent_answers(dom, AGENT_TIMEOUT_S):
        return _check(label, PASS, f"the guest agent of domain {info.name} answers")
    return _check(label, FAIL, f"domain {info.name} has the channel but its guest agent does not answer",
                  "install and start qemu-guest-agent inside the guest (systemctl enable --now qemu-guest-agent)")


def _check(name: str, status: str, detail: str, fix: str | None = None) -> JsonDict:
    return {"name": name, "status": status, "detail": detail, "fix": fix}

"""File recovery on an agent's host: the FileRecoveryMount / FileRecoveryUnmount jobs of its VMs
(the server's side: service/hostfiles.py).

The agent runs the same recovery code as a server (service/files.py, recovery/session.py): a
session owner serving the point read-only from the vault's storage (opened with this host's key),
FUSE block files, loop devices and read-only mounts. The session's state lives in the agent's
own home catalog (SQLite, never the server's): the detached owner process reads its expiry there
and ends the session at expiry on its own, whether the agent runs or not. The agent reports its
sessions to the server (the end of a job, every heartbeat, its registration after reconciling).

The server is not trusted with this host's files: the mount point it names must be an absolute,
normalised path that resolves (symlinks followed) inside one of the agent's --allow-restores
folders; the names it sends (VM, point, disks, session ids) are checked before any path is made
of them.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from vmvault.catalog import repos
from vmvault.catalog.clock import from_iso, utc_now
from vmvault.catalog.models import FileRecoverySessionRow, VaultRow
from vmvault.errors import InvalidInput, PathNotAllowed
from vmvault.service.context import Context
from vmvault.service.paths import PathPolicy
from vmvault.service.views import JsonDict

log = logging.getLogger("vmvault")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SESSION_ID = re.compile(r"^[0-9a-f]{6,32}$")
REPORT_ENDED_S = 600.0  # sessions ended this recently are still reported (a lost heartbeat is made up)


def _name(what: str, raw: object) -> str:
    """A name from the server that becomes part of a path here: plain, no '/', no '..'."""
    text = str(raw)
    if not _NAME.fullmatch(text) or text in (".", ".."):
        raise InvalidInput(f"the server sent an invalid {what} name {text[:80]!r}", hint="upgrade the server")
    return text


def checked_mountpoint(raw: object, paths: PathPolicy | None, vm_name: str) -> Path:
    """The mount point the server named, as a path of this host inside its allowed folders."""
    from vmvault.service.paths import Rule

    text = str(raw)
    if not text.startswith("/") or "\0" in text or len(text) > 4096 or os.path.normpath(text) != text:
        raise InvalidInput(f"mount point '{text[:200]}' of VM '{vm_name}' is not a normalised absolute path",
                           hint="give it from /, as the VM's host sees it, without '..', '.' or '//'")  # fmt: skip
    if paths is None:
        return Path(text)
    try:
        return paths.check(Rule.RESTORES, text)  # resolved: a symlink out of the folder is refused
    except PathNotAllowed as exc:
        raise PathNotAllowed(
            f"mount point {text}: {exc.message} on host of VM '{vm_name}'",
            hint="mount under one of this host's allowed folders, or allow its folder on this host: vmvault agent "
            "run --allow-restores DIR (or allow-restores in the agent's HOME/settings.toml)",
        ) from None


def _vault_row(ctx: Context, info: JsonDict) -> VaultRow:
    """The vault as this host knows it (vault import), else the server's record of where it lies."""
    uuid = str(info["uuid"])
    with ctx.catalog.read() as s:
        for row in repos.list_vaults(s):
            if row.uuid == uuid:
                s.expunge(row)
                return VaultRow(id=row.id, name=row.name, uuid=uuid, storage_dir=str(info["storage"]))
    return VaultRow(id=0, name=str(info["name"]), uuid=uuid, storage_dir=str(info["storage"]))


def mount(ctx: Context, package: JsonDict, paths: PathPolicy | None) -> JsonDict:
    """Mount the package's point here (or extend its session); its report for the server."""
    from vmvault.recovery.session import DEFAULT_DURATION, MAX_DURATION
    from vmvault.service import files

    vm, asked = package["vm"], package["files"]
    vm_name = _name("VM", vm["name"])
    rp_id = _name("recovery point", asked["recoveryPoint"])
    disks = [_name("disk", d) for d in asked.get("disks") or []]
    seconds = int(asked.get("durationS") or 0)
    span = timedelta(seconds=seconds) if 0 < seconds <= MAX_DURATION.total_seconds() else DEFAULT_DURATION
    target = files.Target(str(vm["id"]), vm_name, rp_id, _vault_row(ctx, package["vault"]), disks)
    raw = asked.get("mountpoint")
    # No mount point given: this agent's own default (its home's mounts/), not a path of the server's.
    wanted = checked_mountpoint(raw, paths, vm_name) if raw else files.default_mountpoint(ctx, target)
    files.reap(ctx)
    row = files._mount(ctx, target, wanted, span)
    log.info("session %s: point %s of %s mounted on %s until %s", row.id, rp_id, vm_name, row.mountpoint,
             row.expires)  # fmt: skip
    return report(row)


def unmount(ctx: Context, package: JsonDict) -> list[JsonDict]:
    """End the sessions the server names (those of this host); their reports."""
    from vmvault.recovery import session

    ended = []
    for raw in package["files"].get("sessions") or []:
        sid = str(raw)
        if not _SESSION_ID.fullmatch(sid):
            raise InvalidInput(f"the server sent an invalid session id {sid[:80]!r}", hint="upgrade the server")
        row = session.get_row(ctx, sid)
        if row is None:  # not (or no longer) here: ended as far as this host goes
            ended.append({"id": sid, "state": session.ENDED, "endReason": "Unmounted"})
            continue
        if row.state != session.ENDED:
            session.stop_session(ctx, row)
        ended.append(report(session.get_row(ctx, sid) or row))
    return ended


def report(row: FileRecoverySessionRow) -> JsonDict:
    """A session as the server records it (service/hostfiles.py checks every field)."""
    return {"id": row.id, "recoveryPoint": row.rp_id, "state": row.state, "mountpoint": row.mountpoint,
            "expires": row.expires, "ended": row.ended, "endReason": row.end_reason,
            "volumes": list(row.volumes or [])}  # fmt: skip


def reports(ctx: Context) -> list[JsonDict]:
    """This host's live sessions and those ended lately (a report the server missed is made up)."""
    with ctx.catalog.read() as s:
        rows = list(repos.list_file_sessions(s, limit=500))
    now = utc_now()
    return [report(r) for r in rows
            if r.ended is None or (now - from_iso(r.ended)).total_seconds() < REPORT_ENDED_S]  # fmt: skip


def reconcile(ctx: Context) -> list[str]:
    """At the agent's start, before claiming: end the sessions whose owner died (umount, loop
    detach, FUSE unmount, as `files` does on a server) and clear orphaned run directories."""
    from vmvault.service import files

    try:
        ended = files.reap(ctx)
    except Exception:  # logged; never keeps the agent from starting (the next files job reaps again)
        log.warning("reconciling leftover file-recovery sessions on this host failed", exc_info=True)
        return []
    for sid in ended:
        log.info("reconciled: file-recovery session %s (its owner had died) unmounted", sid)
    return ended


def end_sessions(ctx: Context, ids: list[Any]) -> None:
    """Sessions the server ended (agent_lost while this agent was cut off): unmount them here too."""
    from vmvault.recovery import session

    for raw in ids:
        sid = str(raw)
        row = session.get_row(ctx, sid) if _SESSION_ID.fullmatch(sid) else None
        if row is not None and row.state != session.ENDED:
            log.warning("session %s ended on the server: unmounting it", sid)
            session.stop_session(ctx, row)

"""File recovery of a VM of another host (`vm add --host`): the server's side.

`files mount` / `files unmount` of such a VM queue a FileRecoveryMount / FileRecoveryUnmount job
for the VM's host; its agent claims it and runs the same recovery code there (service/agentfiles.py:
the session owner serving the point read-only, FUSE and loop mounts, opened with that host's key).
The agent has no catalog access: it reports its sessions through its REST routes (the end of a
job, every heartbeat, its registration) and the server keeps a row per session in
file_recovery_sessions with details["agentHost"], so `files list`, the API and the portal show
where it is mounted. Those rows are never torn down here (their mounts are on the other host):
the agent ends them (unmount job, expiry, its restart), or the server marks them Ended
`agent_lost` when the agent stops heartbeating. Every report is untrusted and checked.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import from_iso, now_iso
from vmvault.catalog.models import FileRecoverySessionRow, JobRow
from vmvault.errors import AlreadyExists, InvalidInput, NotFound, VmvaultError
from vmvault.service.context import Context
from vmvault.service.jobs import JobOutcome, Operation, create_job, show_job
from vmvault.service.views import JsonDict

AGENT_KEY = "agentHost"  # a session row's details: the host whose agent serves and mounts it
FILE_OPERATIONS = (Operation.FILE_RECOVERY_MOUNT, Operation.FILE_RECOVERY_UNMOUNT)
AGENT_LOST = "agent_lost"
AGENT_RESTARTED = "AgentRestarted"
_SESSION_ID = re.compile(r"^[0-9a-f]{6,32}$")
_STATES = ("Starting", "Active", "Ended")
MAX_VOLUMES = 256


def host_of(row: FileRecoverySessionRow) -> str | None:
    """The host whose agent runs the session; None for a session of this server."""
    value = (row.details or {}).get(AGENT_KEY)
    return str(value) if value else None


# ---- queue ---------------------------------------------------------------------------------------


def queue_mount(
    ctx: Context, vm_name: str, rp_id: str, host: str, mountpoint: str | None, duration: str | None
) -> JobOutcome[JsonDict]:
    """Queue the FileRecoveryMount job for the agent of the VM's host; returned InProgress (follow_mount).

    The mount point is a path on that host, checked there against its agent's allowed folders."""
    from vmvault.recovery.session import parse_duration
    from vmvault.service.files import _target
    from vmvault.service.hostvms import host_path, refuse_secondary

    refuse_secondary(vm_name, host, "mount")
    target = _target(ctx, vm_name, rp_id)  # checked now: bad input queues nothing
    span = parse_duration(duration)
    wanted = host_path(vm_name, str(mountpoint), what="mount point") if mountpoint else None
    wanted = _check_existing(ctx, target.rp_id, vm_name, host, wanted)
    record = {"mode": "files", "recoveryPoint": target.rp_id, "mountpoint": wanted, "host": host,
              "durationS": int(span.total_seconds())}  # fmt: skip
    job = create_job(ctx, Operation.FILE_RECOVERY_MOUNT, vm=vm_name, vault=target.vault.name, queued=True,
                     details={"restore": record})  # fmt: skip
    return JobOutcome(job=show_job(ctx, job.id))


def _check_existing(ctx: Context, rp_id: str, vm_name: str, host: str, wanted: str | None) -> str | None:
    """One mount point per point: mounting it again (same place, or none given) extends its session.
    A session this server serves with nothing mounted (a recovery script's) is not in the way."""
    with ctx.catalog.read() as s:
        live = [r for r in repos.live_file_sessions(s, rp_id=rp_id) if host_of(r) is not None or r.mountpoint]
    if not live:
        return wanted
    current = live[0]
    where = host_of(current) or "this server"
    if host_of(current) != host or (wanted is not None and current.mountpoint and current.mountpoint != wanted):
        raise AlreadyExists(
            f"recovery point '{rp_id}' is already mounted on {current.mountpoint} on host {where} "
            f"(session {current.id})",
            hint="use that mount point (mounting again there extends it), or unmount first: "
            f"vmvault files unmount {vm_name} --session {current.id}",
        )
    return wanted or current.mountpoint


def queue_unmount(ctx: Context, vm_name: str, host: str, session_id: str | None) -> JobOutcome[list[JsonDict]]:
    """Queue the FileRecoveryUnmount job of the VM's sessions on its host (or one); returned InProgress."""
    with ctx.catalog.read() as s:
        vm = repos.get_vm(s, vm_name)
        rows = [r for r in repos.live_file_sessions(s, vm_id=vm.id) if host_of(r) == host]
        if session_id is not None:
            rows = [r for r in rows if r.id == session_id]
            if not rows:
                raise NotFound(f"no live file-recovery session '{session_id}' for VM '{vm_name}' on host {host}",
                               hint=f"list them with: vmvault files list {vm_name}")  # fmt: skip
        vaults = sorted({repos.vault_by_id(s, r.vault_id).name for r in rows})
    if not rows:
        raise NotFound(f"VM '{vm_name}' has no mounted recovery point on host {host}", hint="see: vmvault files list")
    details = {"sessions": [r.id for r in rows], "host": host}
    job = create_job(ctx, Operation.FILE_RECOVERY_UNMOUNT, vm=vm_name, vault=", ".join(vaults), queued=True,
                     details=details)  # fmt: skip
    return JobOutcome(job=show_job(ctx, job.id))


def job_host(ctx: Context, job_id: str) -> str:
    with ctx.catalog.read() as s:
        details = repos.get_job(s, job_id).details or {}
    return str(details.get("host") or (details.get("restore") or {}).get("host") or "?")


def follow(ctx: Context, job_id: str, cancel: Any = None) -> JobOutcome[Any]:
    """Wait for a queued mount/unmount to end; result: the session (mount) or the ended sessions (unmount)."""
    from vmvault.service.files import session_view
    from vmvault.service.jobs import Status, wait_for_job

    job = wait_for_job(ctx, job_id, cancel=cancel)
    if job["status"] != Status.COMPLETED:
        return JobOutcome(job=job)
    with ctx.catalog.read() as s:
        row = repos.get_job(s, job_id)
        details = row.details or {}
        ids = details.get("sessions") or [((details.get("restore") or {}).get("session"))]
        found = [repos.find_file_session(s, str(i)) for i in ids if i]
        views = [session_view(r) for r in found if r is not None]
    if row.operation == Operation.FILE_RECOVERY_MOUNT:
        return JobOutcome(job=job, result=views[0] if views else None)
    return JobOutcome(job=job, result=views)


# ---- work packages -------------------------------------------------------------------------------


def package(ctx: Context, job: JobRow) -> JsonDict:
    """What the agent needs to mount or unmount; no secret (its host key opens the vault)."""
    from vmvault.service.files import _target

    details = job.details or {}
    with ctx.catalog.read() as s:
        vm = repos.get_vm(s, job.vm or "")
        vm_package = {"id": vm.id, "name": vm.name, "kind": vm.kind}
    base = {"jobId": job.id, "operation": job.operation, "details": details, "vm": vm_package}
    if job.operation == Operation.FILE_RECOVERY_UNMOUNT:
        return {**base, "files": {"sessions": list(details.get("sessions") or [])}}
    record = details.get("restore") or {}
    target = _target(ctx, vm.name, str(record.get("recoveryPoint") or ""))  # still usable?
    vault = target.vault
    return {**base, "vault": {"name": vault.name, "uuid": vault.uuid, "storage": vault.storage_dir},
            "files": {"recoveryPoint": target.rp_id, "mountpoint": record.get("mountpoint"),
                      "durationS": int(record.get("durationS") or 0), "disks": target.disks}}  # fmt: skip


# ---- the agent's reports -------------------------------------------------------------------------


def finish(ctx: Context, host: str, job: JobRow, reports: object) -> None:
    """A mount or unmount the agent completed: its sessions recorded (in the caller's transaction)."""
    sessions = _reports(reports)
    with ctx.catalog.write() as s:
        if job.operation == Operation.FILE_RECOVERY_MOUNT:
            _record_mount(s, host, job, sessions)
        else:
            _record_unmount(s, host, job, sessions)


def _record_mount(s: Session, host: str, job: JobRow, sessions: list[JsonDict]) -> None:
    record = dict((job.details or {}).get("restore") or {})
    if len(sessions) != 1 or sessions[0]["rp"] != record.get("recoveryPoint"):
        raise InvalidInput(f"the agent of host {host} reported no session of mount job {job.id}",
                           hint="upgrade the agent")  # fmt: skip
    report = sessions[0]
    row = repos.find_file_session(s, report["id"])
    if row is not None and host_of(row) != host:
        raise InvalidInput(f"session id {report['id']} from the agent of host {host} is taken",
                           hint="mount again (a new session id)")  # fmt: skip
    if row is None:
        vm = repos.get_vm(s, job.vm or "")
        vault = repos.get_vault(s, job.vault or "")
        row = FileRecoverySessionRow(id=report["id"], vm_id=vm.id, vm_name=vm.name, rp_id=report["rp"],
                                     vault_id=vault.id, state=report["state"], created=now_iso(),
                                     expires=report["expires"], run_dir="", volumes=[],
                                     details={AGENT_KEY: host, "host": host}, owner_pid=0,
                                     owner_boot_id="")  # fmt: skip
        repos.add_file_session(s, row)
    _apply(s, row, report)
    repos.update_job_details(s, job.id, {**(job.details or {}), "restore": {**record, "session": row.id,
                                                                           "mountpoint": report["mountpoint"]}})


def _record_unmount(s: Session, host: str, job: JobRow, sessions: list[JsonDict]) -> None:
    asked = {str(i) for i in (job.details or {}).get("sessions") or []}
    by_id = {r["id"]: r for r in sessions if r["id"] in asked}
    for sid in asked:
        row = repos.find_file_session(s, sid)
        if row is None or host_of(row) != host or row.state == "Ended":
            continue
        report = by_id.get(sid) or {"state": "Ended", "endReason": "Unmounted"}
        if report["state"] != "Ended":
            raise InvalidInput(f"the agent of host {host} did not end session {sid}", hint="run files unmount again")
        _apply(s, row, report)


def sync(ctx: Context, host: str, reports: object, *, complete: bool = False) -> list[str]:
    """The agent's word on its sessions (heartbeat; complete=True at registration: every live one,
    and those its start-up reconcile just ended).

    Updates the rows of this host it names; with complete, a live row it does not name ended
    (AgentRestarted). Returns the sessions the agent still serves that ended here (it stops them)."""
    sessions = {r["id"]: r for r in _reports(reports)}
    if not sessions and not complete:
        return []
    with ctx.catalog.read() as s:  # most heartbeats change nothing: no write transaction for them
        stop, changed = _compare(s, host, sessions)
        if not changed and not (complete and any(r.id not in sessions for r in _live_of(s, host))):
            return stop
    with ctx.catalog.write() as s:
        for sid, report in sessions.items():
            row = repos.find_file_session(s, sid)
            if row is not None and host_of(row) == host and row.state != "Ended":
                _apply(s, row, report)
        if complete:
            why = f"the agent of host '{host}' restarted and no longer serves this session"
            for row in _live_of(s, host):
                if row.id not in sessions:
                    _end(s, row, AGENT_RESTARTED, why)
    return stop


def _compare(s: Session, host: str, sessions: dict[str, JsonDict]) -> tuple[list[str], bool]:
    """(the reported sessions that ended here but not there, whether any row of this host changes)."""
    stop, changed = [], False
    for sid, report in sessions.items():
        row = repos.find_file_session(s, sid)
        if row is None or host_of(row) != host:
            continue  # a mount whose job end is not recorded yet: its finish records it
        if row.state == "Ended":
            if report["state"] != "Ended":
                stop.append(sid)
            continue
        values = _values(row, report)
        changed = changed or any(getattr(row, k) != v for k, v in values.items() if k not in ("ended",))
    return stop, changed


def end_lost(s: Session, host: str, why: str) -> list[str]:
    """The agent of host is lost: its live sessions end `agent_lost` (nothing can be reached there)."""
    ended = []
    for row in _live_of(s, host):
        _end(s, row, AGENT_LOST, f"{why}; its mounts on host {host} are no longer tracked")
        ended.append(row.id)
    return ended


def live_hosts(s: Session) -> set[str]:
    return {h for h in (host_of(r) for r in repos.live_file_sessions(s)) if h}


def _live_of(s: Session, host: str) -> list[FileRecoverySessionRow]:
    return [r for r in repos.live_file_sessions(s) if host_of(r) == host]


def _end(s: Session, row: FileRecoverySessionRow, reason: str, message: str) -> None:
    volumes = [{**v, "status": "unmounted" if v.get("status") == "mounted" else v.get("status")}
               for v in row.volumes or []]  # fmt: skip
    repos.update_file_session(s, row.id, state="Ended", ended=now_iso(), end_reason=reason, volumes=volumes,
                              details={**(row.details or {}), "endMessage": message})  # fmt: skip


def _apply(s: Session, row: FileRecoverySessionRow, report: JsonDict) -> None:
    repos.update_file_session(s, row.id, **_values(row, report))


def _values(row: FileRecoverySessionRow, report: JsonDict) -> dict[str, Any]:
    """The row's columns as the report has them."""
    values: dict[str, Any] = {"state": report["state"], "expires": report["expires"] or row.expires,
                              "volumes": report["volumes"], "mountpoint": report["mountpoint"] or row.mountpoint}
    if report["state"] == "Ended":
        values.update(ended=report.get("ended") or now_iso(), end_reason=report.get("endReason") or "Unmounted")
    else:  # live (again: a point mounted anew after its agent was lost extends the session it still had)
        values.update(ended=None, end_reason=None)
    if report.get("volumes") is None:
        values.pop("volumes")
    return values


def _reports(raw: object) -> list[JsonDict]:
    """The agent's session reports, checked: a hex id, a known state, an absolute mount point,
    ISO times, bounded volume records; anything else refused."""
    if not isinstance(raw, list) or len(raw) > 1000:
        raise InvalidInput("the agent's file-recovery sessions are not a list", hint="upgrade the agent")
    return [_report(r) for r in raw]


def _report(raw: object) -> JsonDict:
    bad = InvalidInput("a file-recovery session report from the agent is malformed", hint="upgrade the agent")
    if not isinstance(raw, dict):
        raise bad
    sid, state, rp = raw.get("id"), raw.get("state"), raw.get("recoveryPoint")
    if not isinstance(sid, str) or not _SESSION_ID.fullmatch(sid) or state not in _STATES:
        raise bad
    mountpoint = raw.get("mountpoint")
    if mountpoint is not None and not _absolute(mountpoint):
        raise bad
    times = {k: raw.get(k) for k in ("expires", "ended")}
    for value in times.values():
        if value is not None and not _iso(value):
            raise bad
    volumes = raw.get("volumes")
    return {"id": sid, "state": state, "rp": str(rp)[:32] if rp else None, "mountpoint": mountpoint,
            "expires": times["expires"], "ended": times["ended"],
            "endReason": str(raw.get("endReason") or "")[:32] or None,
            "volumes": _volumes(volumes, mountpoint) if volumes is not None else None}  # fmt: skip


def _volumes(raw: object, mountpoint: object) -> list[JsonDict]:
    if not isinstance(raw, list) or len(raw) > MAX_VOLUMES:
        raise InvalidInput("the agent's volume list is malformed", hint="upgrade the agent")
    kept = []
    for v in raw:
        if not isinstance(v, dict):
            continue
        path = v.get("path") or None
        if path is not None and not (_absolute(path) and isinstance(mountpoint, str)
                                     and PurePosixPath(path).parent == PurePosixPath(mountpoint)):  # fmt: skip
            raise InvalidInput("the agent reported a volume outside its mount point", hint="upgrade the agent")
        part = v.get("partition")
        kept.append({"disk": str(v.get("disk") or "")[:128], "path": path,
                     "partition": part if isinstance(part, int) and not isinstance(part, bool) else None,
                     **{k: str(v.get(k) or "")[:256] for k in ("fstype", "status", "driver", "reason")},
                     "size": v.get("size") if isinstance(v.get("size"), int) else None})  # fmt: skip
    return kept


def _absolute(value: object) -> bool:
    if not isinstance(value, str) or len(value) > 4096 or any(ord(c) < 32 for c in value):
        return False
    path = PurePosixPath(value)
    return path.is_absolute() and ".." not in path.parts


def _iso(value: object) -> bool:
    if not isinstance(value, str) or len(value) > 40:
        return False
    try:
        from_iso(value)
    except (ValueError, TypeError, VmvaultError):
        return False
    return True


def remote_session_error(row: FileRecoverySessionRow, vm_name: str) -> InvalidInput:
    """Browse/download through the server of a session mounted on another host: where to look instead."""
    host = host_of(row)
    return InvalidInput(
        f"recovery point '{row.rp_id}' of VM '{vm_name}' is mounted on host {host} at {row.mountpoint} "
        f"(session {row.id}), not on this server",
        hint=f"browse and copy its files on host {host}, under {row.mountpoint}",
    )

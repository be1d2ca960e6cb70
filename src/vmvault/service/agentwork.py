"""The server's side of the agents (`vmvault agent run` on hypervisor hosts), behind /api/v1/agents.

An agent talks only to the REST API (no database credentials on hypervisor hosts): it registers
its host, beats a heartbeat, claims the queued Backup, Restore (restore disks) and
FileRecoveryMount/Unmount (files mount/unmount: service/hostfiles.py) jobs of the VMs whose
`vms.host` names its host (FOR UPDATE SKIP LOCKED, as the servers' workers), reports
progress and the connector's bookkeeping (BackupPort.save_vm / save_disk), and ends the job. It
writes the vault's data straight to the vault's storage; on success the server records the point
by reading its manifest from the vault (the manifest is the truth, as when reconcile adopts a
published point), never from the agent's word.

A job an agent runs carries details["agentHost"]; the server's pid/boot rules (jobs.reap_dead_jobs)
leave it alone. The leader ends it Failed `agent_lost` once the host's heartbeat is older than the
lease (VMVAULT_AGENT_LEASE_S, default hosts.HOST_LEASE_S), and a re-registering agent (a restart)
ends the jobs of its previous run the same way.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso, seconds_between
from vmvault.catalog.models import HostRow, JobRow, VmRow
from vmvault.errors import Busy, IntegrityError, InvalidInput, NotFound, VmvaultError
from vmvault.service import hostfiles, hostinstant, hosts
from vmvault.service.context import Context
from vmvault.service.jobs import Operation, Status, _notify_deliver, _notify_enqueue, restore_record, show_job
from vmvault.service.views import JsonDict

log = logging.getLogger("vmvault")

# What agents and this server speak over /api/v1/agents. 2: an agent runs file-recovery mounts,
# restores as a new VM, replace-disks and instant restores (an agent of 1 would mistake their jobs
# for a plain restore of disks, so it is refused at registration, with the fix).
API_VERSION = 2
SPOKEN_API_VERSIONS = (2,)
HEARTBEAT_S = 3.0  # an agent's heartbeat period (told at registration)
AGENT_KEY = "agentHost"  # job details: the host whose agent runs the job
MAX_BOOKKEEPING = 256 * 1024  # bytes of JSON in one save_vm/save_disk: a definition (a domain XML), not a disk


class AgentVersionMismatch(InvalidInput):
    code = "agent_version_mismatch"
    http_status = 409


def lease_s() -> float:
    """How long an agent may stay silent before its host is Offline and its jobs `agent_lost`."""
    raw = os.environ.get("VMVAULT_AGENT_LEASE_S", "")
    try:
        value = float(raw) if raw else hosts.HOST_LEASE_S
    except ValueError:
        value = hosts.HOST_LEASE_S
    return max(2.0, value)


# ---- register and heartbeat ---------------------------------------------------------------------


def check_api_version(agent_version: object, vmvault_version: str) -> None:
    """Refuse an agent whose API version this server does not speak, naming both and the fix."""
    if agent_version in SPOKEN_API_VERSIONS:
        return
    spoken = ", ".join(str(v) for v in SPOKEN_API_VERSIONS)
    raise AgentVersionMismatch(
        f"this agent speaks agent API version {agent_version!s} (vmvault {vmvault_version}); this server "
        f"(vmvault {hosts.version()}) speaks agent API version {spoken}",
        hint=f"install the server's vmvault version ({hosts.version()}) on the agent's host and restart "
        "vmvault agent run",
    )


def register(ctx: Context, host: str, body: JsonDict) -> JsonDict:
    """Record (or refresh) the agent's host; its previous run's jobs end `agent_lost`."""
    version = str(body.get("version") or "unknown")[:32]
    check_api_version(body.get("apiVersion"), version)
    now = now_iso()
    with ctx.catalog.write() as s:
        row = s.get(HostRow, host)
        if row is not None and row.role == hosts.SERVER:
            raise InvalidInput(
                f"host '{host}' is registered as a server of this deployment, not as an agent",
                hint="give the agent its own host name: vmvault agent run --host NAME",
            )
        if row is None:
            row = HostRow(name=host, role=hosts.AGENT, registered=now, details={})
            s.add(row)
        row.version, row.boot_id, row.last_heartbeat = version, str(body.get("bootId") or "")[:64], now
        row.details = {"apiVersion": API_VERSION, "pid": _int(body.get("pid")),
                       "hypervisors": _hypervisors(body.get("hypervisors"))}  # fmt: skip
        lost = _end_lost(s, host, f"the agent of host '{host}' restarted while it ran this job")
        follow_running_domains(s, host, row.details["hypervisors"])
        vms = [_leftover(r) for r in s.scalars(select(VmRow).where(VmRow.host == host)).all()]
    _notify_all(ctx, lost)
    if body.get("fileSessions") is not None:  # its live file-recovery sessions after its start-up reconcile
        hostfiles.sync(ctx, host, body.get("fileSessions"), complete=True)
    # A few heartbeats fit in one lease: one late beat on a loaded host does not lose the agent.
    beat = min(HEARTBEAT_S, lease_s() / 4)
    return {"host": host, "apiVersion": API_VERSION, "heartbeatSeconds": beat, "leaseSeconds": lease_s(),
            "vms": vms}  # fmt: skip


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31 else 0


def _hypervisors(value: object) -> JsonDict:
    """What the agent found (libvirt URI, QMP sockets, libvirt domains): kept for `host show`, bounded."""
    if not isinstance(value, dict):
        return {}
    kept: JsonDict = {}
    if isinstance(value.get("libvirtUri"), str):
        kept["libvirtUri"] = value["libvirtUri"][:512]
    if isinstance(value.get("qmpSockets"), list):
        kept["qmpSockets"] = [str(x)[:512] for x in value["qmpSockets"][:1000]]
    if isinstance(value.get("libvirtDomains"), list):
        kept["libvirtDomains"] = [{k: str(d.get(k) or "")[:256] for k in ("name", "uuid", "state")}
                                  for d in value["libvirtDomains"][:1000] if isinstance(d, dict)]  # fmt: skip
    return kept


def _leftover(row: VmRow) -> JsonDict:
    """A VM of the host as the agent's start-up reconcile needs it."""
    return {"id": row.id, "name": row.name, "kind": row.kind, "definition": dict(row.definition or {})}


def heartbeat(
    ctx: Context, host: str, running: list[str], sessions: object = None, hypervisors: object = None
) -> JsonDict:
    """The agent is alive; its running jobs' heartbeats too. Answers which of them to cancel, and
    which of the file-recovery sessions it reported (sessions) ended here (it ends them).

    hypervisors (sent now and then): what the agent finds now; libvirt VMs follow their running domain."""
    if hypervisors is not None:
        _refresh_hypervisors(ctx, host, _hypervisors(hypervisors))
    with ctx.catalog.update() as s:
        row = s.get(HostRow, host)
        if row is None or row.role != hosts.AGENT:
            raise NotFound(f"agent host '{host}' is not registered", hint="restart vmvault agent run (it registers)")
        row.last_heartbeat = now_iso()
        mine = [j for j in _agent_jobs(s, host) if j.id in running]
        repos.touch_jobs(s, [j.id for j in mine])
        cancel = [j.id for j in mine if j.cancel_requested]
        gone = [j for j in running if j not in {m.id for m in mine}]
        orphans = [j.id for j in _agent_jobs(s, host) if j.id not in running and _claimed_long_ago(j)]
    if orphans:
        _end_orphans(ctx, host, orphans)
    answer: JsonDict = {"cancel": cancel + gone}  # a job no longer its own (ended agent_lost, cancelled): stop it
    if sessions is not None:
        try:
            answer["endSessions"] = hostfiles.sync(ctx, host, sessions)
        except VmvaultError as exc:  # a bad report never keeps cancels from reaching the agent
            log.warning("agent of host %s: its file-recovery sessions not recorded: %s", host, exc)
    return answer


# ---- a libvirt VM is backed up by the host where its domain runs ------------------------------


def _refresh_hypervisors(ctx: Context, host: str, found: JsonDict) -> None:
    with ctx.catalog.write() as s:
        row = s.get(HostRow, host)
        if row is None or row.role != hosts.AGENT:
            return  # the heartbeat below says so
        row.details = {**(row.details or {}), "hypervisors": found}
        follow_running_domains(s, host, found)


def follow_running_domains(s: Session, host: str, found: JsonDict) -> list[str]:
    """The libvirt VMs of other agent hosts whose domain runs on `host` (a live migration; on a cluster
    every host may define it) move to `host`: its agent runs their next jobs. A VM stays where its own
    host's agent, Online, reports the domain running too (the one where it runs wins; when two claim
    it, it does not move), and while a job of it runs. Matched by the domain's UUID once known, else
    by its name."""
    from vmvault.service.vms import KIND_LIBVIRT

    running = [d for d in found.get("libvirtDomains") or [] if d.get("state") == "running"]
    if not running:
        return []
    moved = []
    for vm in s.scalars(select(VmRow).where(VmRow.kind == KIND_LIBVIRT, VmRow.host.is_not(None),
                                            VmRow.host != host)).all():  # fmt: skip
        if any(_same_domain(vm, d) for d in running) and _may_follow(s, vm):
            log.info("VM %s: its libvirt domain runs on host %s now (was %s): its jobs go there", vm.name, host,
                     vm.host)  # fmt: skip
            vm.host = host
            moved.append(vm.name)
    return moved


def _same_domain(vm: VmRow, domain: JsonDict) -> bool:
    uuid = str((vm.definition or {}).get("uuid") or "")
    if uuid:
        return domain.get("uuid") == uuid
    return bool(domain.get("name")) and domain.get("name") == (vm.definition or {}).get("domain")


def _may_follow(s: Session, vm: VmRow) -> bool:
    """Its own host is an agent that does not report the domain running now, and no job of it runs."""
    own = s.get(HostRow, vm.host or "")
    if own is None or own.role != hosts.AGENT:
        return False  # a server's VM, or a host not registered yet: it stays
    if hosts.state_of(own) == hosts.ONLINE:
        found = (own.details or {}).get("hypervisors") or {}
        if any(d.get("state") == "running" and _same_domain(vm, d) for d in found.get("libvirtDomains") or []):
            return False
    busy = s.scalars(select(JobRow.id).where(JobRow.vm == vm.name, JobRow.status == Status.IN_PROGRESS,
                                             JobRow.owner_pid > 0)).first()  # fmt: skip
    return busy is None


def _claimed_long_ago(job: JobRow) -> bool:
    """Claimed longer than a lease ago: a claim in flight is not yet in the agent's running list."""
    claimed = str((job.details or {}).get("claimedAt") or job.start_time)
    return seconds_between(claimed, now_iso()) > lease_s()


def _end_orphans(ctx: Context, host: str, job_ids: list[str]) -> None:
    """Jobs the agent no longer runs though it is alive (its report of their end was lost): they end
    agent_lost, so the VM is free; a point it published is adopted by reconcile (the manifest is the truth)."""
    ended = []
    with ctx.catalog.write() as s:
        for job in _agent_jobs(s, host):
            if job.id in job_ids:
                why = f"the agent of host '{host}' no longer runs this job (the report of its end was lost)"
                repos.finish_job(s, job.id, Status.FAILED, error=lost_error(job, why))
                hostinstant.drop_copy(s, job, host)  # its agent stops and removes the copy
                _notify_enqueue(s, job.id)
                ended.append(job.id)
    _notify_all(ctx, ended)


def _agent_jobs(s: Session, host: str) -> list[JobRow]:
    return [j for j in repos.running_jobs(s) if (j.details or {}).get(AGENT_KEY) == host and j.owner_pid > 0]


# ---- agent_lost ---------------------------------------------------------------------------------


def lost_error(row: JobRow, why: str) -> JsonDict:
    host = (row.details or {}).get(AGENT_KEY)
    check = f"check vmvault agent run on host {host} (vmvault host show {host})"
    if row.operation in hostfiles.FILE_OPERATIONS:
        return {
            "code": "agent_lost",
            "message": f"{why}; the {row.operation} did not finish on host {host}",
            "recommendedAction": f"{check}, then see vmvault files list {row.vm} and mount or unmount again",
        }
    if row.operation == Operation.RESTORE and restore_record(row).get("mode") == "replace":
        return _lost_replace(row, why, check)
    if row.operation == Operation.RESTORE and hostinstant.is_instant(row):
        return hostinstant.lost_error(row, why, host)
    if row.operation == Operation.RESTORE:
        record = restore_record(row)
        again = (f"vmvault restore vm {row.vm} --rp {record.get('recoveryPoint')} --name {record.get('newVm')} "
                 f"--target-dir {record.get('targetDir')}" if record.get("mode") == "vm" else
                 f"vmvault restore disks {row.vm} --rp {record.get('recoveryPoint')} --target-dir "
                 f"{record.get('targetDir')} --force")  # fmt: skip
        return {
            "code": "agent_lost",
            "message": f"{why}; the restore did not finish (its partial files in {record.get('targetDir')} on "
            f"host {host} are not usable)",
            "recommendedAction": f"{check}, then run the restore again: {again}",
        }
    return {
        "code": "agent_lost",
        "message": f"{why}; no recovery point was created",
        "recommendedAction": f"{check}, then run the backup again: vmvault backup now {row.vm} (the next scheduled "
        "backup also runs normally)",
    }


def _lost_replace(row: JobRow, why: str, check: str) -> JsonDict:
    """A replace-disks whose agent was lost: which disks to look at, and how to run it again."""
    record = restore_record(row)
    host = (row.details or {}).get(AGENT_KEY)
    disks = ", ".join(str(p) for p in record.get("paths") or [])
    return {
        "code": "agent_lost",
        "message": f"{why}; the disks of VM '{row.vm}' on host {host} ({disks}) may not have been replaced: an "
        "original moved aside is beside its disk as .NAME.vmvault-original-*, the new images in .vmvault-replace-*",
        "recommendedAction": f"{check}; put back any original left aside, remove the .vmvault-replace-* folders, "
        f"then run it again: vmvault restore replace-disks {row.vm} --rp {record.get('recoveryPoint')}",
    }


def _end_lost(s: Session, host: str, why: str) -> list[str]:
    ended = []
    for job in _agent_jobs(s, host):
        repos.finish_job(s, job.id, Status.FAILED, error=lost_error(job, why))
        hostinstant.drop_copy(s, job, host)  # its agent stops and removes the copy (at once, or at its restart)
        _notify_enqueue(s, job.id)
        ended.append(job.id)
    return ended


def _notify_all(ctx: Context, job_ids: list[str]) -> None:
    for job_id in job_ids:
        log.warning("job %s: agent_lost", job_id)
        _notify_deliver(ctx, job_id)


def fail_lost_agents(ctx: Context) -> list[str]:
    """End Failed `agent_lost` the running jobs of agents silent for longer than the lease (the leader runs it)."""
    lease, now = lease_s(), now_iso()
    with ctx.catalog.read() as s:
        silent = [r.name for r in s.scalars(select(HostRow).where(HostRow.role == hosts.AGENT)).all()
                  if seconds_between(r.last_heartbeat, now) > lease]  # fmt: skip
        mounted = hostfiles.live_hosts(s)
        if not silent or not any(_agent_jobs(s, h) or h in mounted for h in silent):
            return []
    ended: list[str] = []
    with ctx.catalog.write() as s:
        for host in silent:
            row = s.get(HostRow, host)
            if row is None or seconds_between(row.last_heartbeat, now_iso()) <= lease:
                continue  # it came back meanwhile
            why = f"the agent of host '{host}' stopped heartbeating at {row.last_heartbeat} (lease {lease:.0f} s)"
            ended += _end_lost(s, host, why)
            hostfiles.end_lost(s, host, why)
    _notify_all(ctx, ended)
    return ended


# ---- claim --------------------------------------------------------------------------------------


# The jobs agents run (restore disks: a Restore job; files mount/unmount: service/hostfiles.py).
AGENT_OPERATIONS = (Operation.BACKUP, Operation.RESTORE, Operation.FILE_RECOVERY_MOUNT, Operation.FILE_RECOVERY_UNMOUNT)


def claim(ctx: Context, host: str, pid: int) -> JsonDict | None:
    """Claim the oldest queued Backup or Restore job of a VM of this host for its agent: its work
    package, or None."""
    from vmvault.service.backups import plan_backup

    while True:
        job = _claim_row(ctx, host, pid)
        if job is None:
            return None
        if job.operation in hostfiles.FILE_OPERATIONS:
            package = _files_package_or_end(ctx, job)
            if package is None:
                continue
            return package
        if job.operation == Operation.RESTORE:
            package = _restore_package_or_end(ctx, job, host)
            if package is None:
                continue
            return package
        details = job.details or {}
        try:
            plan = plan_backup(ctx, job.vm or "", str(details.get("retainUntil") or ""))
        except VmvaultError as exc:  # the VM or its protection changed since the job was queued
            from vmvault.service.jobs import end_job

            end_job(ctx, job.id, Status.FAILED, exc)
            continue
        from vmvault.service.reconcile import reconcile_named

        # As before a server's own backup: a point an agent published but could not report (a lost
        # finish, agent_lost) is adopted now, and the new backup's base is the catalog's latest.
        reconcile_named(ctx, plan.vault, f"before backup job {job.id} of VM {plan.vm_name} (agent of host {host})")
        return _work_package(ctx, job, plan)


def _claim_row(ctx: Context, host: str, pid: int) -> JobRow | None:
    with ctx.catalog.read() as s:  # idle agents look without taking SQLite's write lock
        if not repos.queued_jobs(s, AGENT_OPERATIONS, host=host):
            return None
    with ctx.catalog.update() as s:
        job = repos.lock_next_queued(s, AGENT_OPERATIONS, host=host)
        if job is None:
            return None
        row = s.get(HostRow, host)
        boot = row.boot_id if row is not None else ""
        details = {**(job.details or {}), AGENT_KEY: host, "host": host, "claimedAt": now_iso()}
        if not repos.claim_job(s, job.id, _int(pid) or 1, boot, details):
            return None
        s.refresh(job)
        s.expunge(job)
        return job


def _work_package(ctx: Context, job: JobRow, plan: Any) -> JsonDict:
    """What the agent needs to run the backup; nothing secret (no passphrase: its host key opens the vault)."""
    from vmvault.service.backups import ON_DEMAND, backup_details
    from vmvault.service.quiesce import budget_for

    details = job.details or {}
    if not details.get("tasks"):
        details = {**details, **backup_details(plan, str(details.get("trigger") or ON_DEMAND))}
        with ctx.catalog.update() as s:
            repos.update_job_details(s, job.id, details)
    with ctx.catalog.read() as s:
        previous = repos.latest_recovery_point(s, plan.vm_id, plan.vault.id)
        latest = repos.latest_recovery_point(s, plan.vm_id)
    budget = budget_for(ctx, plan)
    return {
        "jobId": job.id,
        "details": details,
        "vm": _vm_package(ctx, plan),
        "retainUntil": plan.retain_until,
        "vault": {"name": plan.vault.name, "uuid": plan.vault.uuid, "storage": plan.vault.storage_dir},
        "previousPoint": previous.id if previous else None,
        "pointTimeFloor": latest.time if latest else None,
        "budget": {"freezeS": budget.freeze_s, "frozenS": budget.frozen_s, "crashOnly": budget.crash_only},
    }


def _restore_package_or_end(ctx: Context, job: JobRow, host: str) -> JsonDict | None:
    """A claimed Restore job's work package; None when its point or VM went meanwhile (the job ends Failed)."""
    from vmvault.service.jobs import end_job

    try:
        return _restore_package(ctx, job, host)
    except VmvaultError as exc:
        end_job(ctx, job.id, Status.FAILED, exc)
        return None


def _files_package_or_end(ctx: Context, job: JobRow) -> JsonDict | None:
    """A claimed file-recovery job's work package; None when its point or VM went meanwhile (Failed)."""
    from vmvault.service.jobs import end_job

    try:
        return hostfiles.package(ctx, job)
    except VmvaultError as exc:
        end_job(ctx, job.id, Status.FAILED, exc)
        return None


def _restore_package(ctx: Context, job: JobRow, host: str) -> JsonDict:
    """What the agent needs to restore the point's disks on its host: the point, the target, the file
    names to write, and the disks of its host's VMs (a restore never overwrites one). No secret."""
    from vmvault.service.restores import _point_files

    record = restore_record(job)
    if record.get("mode") == "vm":
        return _new_vm_package(ctx, job, host, record)
    if record.get("mode") == "replace":
        return _replace_package(ctx, job, host, record)
    vm_name, fmt = job.vm or "", record.get("format")
    disks = record.get("disks")
    vault, files = _point_files(ctx, vm_name, str(record.get("recoveryPoint") or ""), fmt, disks)
    with ctx.catalog.read() as s:
        vm = repos.get_vm(s, vm_name)
        vm_package = {"id": vm.id, "name": vm.name, "kind": vm.kind}
    owned = _host_disks(ctx, host)
    return {
        "jobId": job.id,
        "operation": Operation.RESTORE,
        "details": job.details or {},
        "vm": vm_package,
        "vault": {"name": vault.name, "uuid": vault.uuid, "storage": vault.storage_dir},
        "restore": {"recoveryPoint": record.get("recoveryPoint"), "targetDir": record.get("targetDir"),
                    "format": fmt, "force": bool(record.get("overwrite")), "disks": disks, "files": files},
        "hostDisks": owned,
    }  # fmt: skip


def _new_vm_package(ctx: Context, job: JobRow, host: str, record: JsonDict) -> JsonDict:
    """What the agent needs to restore the point as a new VM of its host: the source VM's kind and
    definition, the point, the new name, the target and the disk files to write. No secret."""
    from vmvault.service.restore_vm import checked_request

    vm_name, fmt = job.vm or "", record.get("format")
    vm, point, vault = checked_request(ctx, vm_name, str(record.get("recoveryPoint") or ""),
                                       str(record.get("newVm") or ""), fmt)  # fmt: skip
    files = [f"{d['name']}.{fmt or d.get('sourceFormat') or 'raw'}" for d in point.disks]
    needed = sum(int(d.get("storedBytes") or d.get("size") or 0) for d in point.disks)
    return {
        "jobId": job.id,
        "operation": Operation.RESTORE,
        "details": job.details or {},
        "vm": {"id": vm.id, "name": vm.name, "kind": vm.kind, "definition": dict(vm.definition or {})},
        "vault": {"name": vault.name, "uuid": vault.uuid, "storage": vault.storage_dir},
        "restore": {"mode": "vm", "recoveryPoint": point.id, "newVm": record.get("newVm"),
                    "targetDir": record.get("targetDir"), "format": fmt, "start": bool(record.get("start")),
                    "files": files, "bytes": needed, "instant": bool(record.get("instant"))},
        "hostDisks": _host_disks(ctx, host),
    }  # fmt: skip


def _replace_package(ctx: Context, job: JobRow, host: str, record: JsonDict) -> JsonDict:
    """What the agent needs to replace the disks of a VM of its host with the point's: the point, the
    VM (kind, definition: the connector checks it is stopped) and its disks as the catalog has them
    now, and the disks of its host's VMs. No secret. The agent checks every path against its own
    allowed disk roots (restore_vm.plan_replace_on_host)."""
    from vmvault.service.restore_vm import replace_package

    package = replace_package(ctx, job.vm or "", str(record.get("recoveryPoint") or ""))
    # The disks as sent now (the VM's disks may have changed since it was queued): what a Completed end records.
    paths = [str(d["path"]) for d in package["restore"]["disks"]]
    details = {**(job.details or {}), "restore": {**record, "paths": paths}}
    with ctx.catalog.update() as s:
        repos.update_job_details(s, job.id, details)
    return {"jobId": job.id, "operation": Operation.RESTORE, "details": details, **package,
            "hostDisks": _host_disks(ctx, host)}  # fmt: skip


def _host_disks(ctx: Context, host: str) -> list[JsonDict]:
    with ctx.catalog.read() as s:
        return [{"vm": r.name, "paths": [str(d.get("path") or "") for d in r.disks or []]}
                for r in s.scalars(select(VmRow).where(VmRow.host == host)).all()]  # fmt: skip


def _vm_package(ctx: Context, plan: Any) -> JsonDict:
    with ctx.catalog.read() as s:
        row = repos.find_vm_by_id(s, plan.vm_id)
        kind = row.kind if row is not None else ""
    return {"id": plan.vm_id, "name": plan.vm_name, "kind": kind, "disks": plan.disks, "definition": plan.definition}


# ---- reports while the job runs -----------------------------------------------------------------


def _own_job(s: Session, host: str, job_id: str) -> JobRow:
    """The job, if this host's agent runs it; Busy when it ended meanwhile (the agent then stops it)."""
    row = repos.find_job(s, job_id)
    if row is None or (row.details or {}).get(AGENT_KEY) != host:
        raise NotFound(f"job '{job_id}' is not run by the agent of host '{host}'", hint="claim jobs with /claim")
    if row.status != Status.IN_PROGRESS:
        raise Busy(
            f"job '{job_id}' already ended {row.status} ({(row.error or {}).get('code', '')})",
            hint="stop running it; its VM's next backup runs normally",
        )
    return row


def progress(ctx: Context, host: str, job_id: str, values: JsonDict, details: JsonDict | None) -> JsonDict:
    """The job's progress (and its details: tasks per disk, quiesce figures); answers whether to cancel."""
    from vmvault.service.jobs import _merge_details

    with ctx.catalog.update() as s:
        row = _own_job(s, host, job_id)
        repos.update_job_progress(s, job_id, _progress_values(values))
        if details:
            _merge_details(s, job_id, _agent_details(details))
        return {"cancel": bool(row.cancel_requested)}


def _progress_values(values: JsonDict) -> JsonDict:
    from vmvault.service.views import empty_progress

    clean = empty_progress()
    for key, default in clean.items():
        value = values.get(key, default)
        if isinstance(default, (int, float)) and isinstance(value, (int, float)) and not isinstance(value, bool):
            clean[key] = value
        elif isinstance(default, str) and isinstance(value, str):
            clean[key] = value[:256]
    return clean


def _agent_details(details: JsonDict) -> JsonDict:
    """Only the keys an agent reports; never the ones the server owns (agentHost, recoveryPoint, trigger...)."""
    return {k: v for k, v in details.items() if k in ("tasks", "quiesce", "storageRetries")}


def save_vm(ctx: Context, host: str, job_id: str, updates: JsonDict, disks: list[JsonDict] | None) -> None:
    """The connector's bookkeeping of the VM (its definition; its disk records), as BackupPort.save_vm."""
    from vmvault.service.vms import save_definition

    _bounded(updates, disks)
    with ctx.catalog.read() as s:
        vm_id = _vm_of(s, _own_job(s, host, job_id), host)
    save_definition(ctx, vm_id, updates, disks)


def save_disk(ctx: Context, host: str, job_id: str, name: str, values: JsonDict) -> None:
    from vmvault.service.backups import save_disk as save

    _bounded(values, None)
    with ctx.catalog.read() as s:
        vm_id = _vm_of(s, _own_job(s, host, job_id), host)
    save(ctx, vm_id, name, values)


def _bounded(values: JsonDict, disks: list[JsonDict] | None) -> None:
    """An agent's bookkeeping: bounded, and disk records that name a disk (name, path, format as strings)."""
    import json

    for disk in disks or []:
        if not all(isinstance(disk.get(k), str) for k in ("name", "path")) or not isinstance(
            disk.get("format"), (str, type(None))
        ):
            raise InvalidInput("a disk record from the agent lacks its name, path or format", hint="upgrade the agent")

    if len(json.dumps([values, disks], default=str)) > MAX_BOOKKEEPING:
        raise InvalidInput("the agent's VM bookkeeping is too large", hint=f"at most {MAX_BOOKKEEPING} bytes of JSON")


def _vm_of(s: Session, job: JobRow, host: str) -> str:
    vm = repos.get_vm(s, job.vm or "")
    if vm.host != host:
        raise InvalidInput(f"VM '{vm.name}' no longer belongs to host '{host}'", hint="stop running its job")
    return vm.id


# ---- the end of a job ---------------------------------------------------------------------------


def finish(ctx: Context, host: str, job_id: str, body: JsonDict) -> JsonDict:
    """End the agent's job: Completed with the point it published (read back from the vault), or
    Failed/Cancelled with its error. A point that does not check out fails the job (nothing recorded)."""
    status = str(body.get("status") or "")
    details = body.get("details") if isinstance(body.get("details"), dict) else None
    progress_values = _progress_values(body.get("progress") or {}) if isinstance(body.get("progress"), dict) else None
    operation, mode = _queued_as(ctx, job_id) if status == Status.COMPLETED else ("", "")
    if status == Status.COMPLETED and operation == Operation.RESTORE:
        if mode == "replace":
            return _finish_replace(ctx, host, job_id, progress_values)
        if body.get("newVm") is not None:
            return _finish_new_vm(ctx, host, job_id, body, progress_values)
        return _finish_restore(ctx, host, job_id, body.get("files"), progress_values)
    if status == Status.COMPLETED and _lost_backup(ctx, host, job_id):
        return _adopt_late_point(ctx, host, job_id, str(body.get("recoveryPoint") or ""), body)
    if status == Status.COMPLETED and operation in hostfiles.FILE_OPERATIONS:
        return _finish_files(ctx, host, job_id, body.get("sessions"))
    if status == Status.COMPLETED:
        return _finish_completed(ctx, host, job_id, str(body.get("recoveryPoint") or ""), body, details)
    if status not in (Status.FAILED, Status.CANCELLED):
        raise InvalidInput(f"unknown job status '{status}'", hint="Completed, Failed or Cancelled")
    error = _error_of(body.get("error"), status)
    with ctx.catalog.write() as s:
        _own_job(s, host, job_id)
        repos.finish_job(s, job_id, status, error=error, progress=progress_values)
        _merge_agent_details(s, job_id, details)
        _notify_enqueue(s, job_id)
    _notify_deliver(ctx, job_id)
    return show_job(ctx, job_id)


def _queued_as(ctx: Context, job_id: str) -> tuple[str, str]:
    """The job's operation and, for a Restore, the kind the server queued (disks, vm, replace): its
    record says, not the agent. ("", "") for an unknown job."""
    with ctx.catalog.read() as s:
        row = repos.find_job(s, job_id)
        return (row.operation, str(restore_record(row).get("mode") or "")) if row is not None else ("", "")


def _finish_replace(ctx: Context, host: str, job_id: str, progress_values: JsonDict | None) -> JsonDict:
    """A replace-disks the agent completed (every disk swapped, or none: its swap is all or nothing):
    the disks the server named recorded as replaced, and the VM's changed-block tracking forgotten
    (the new images carry none; the agent dropped the connector's own: checkpoints, bitmaps)."""
    from vmvault.service.restore_vm import forget_tracking

    with ctx.catalog.write() as s:
        job = _own_job(s, host, job_id)
        record = restore_record(job)
        vm_id = _vm_of(s, job, host)
        details = {**(job.details or {}), "restore": {**record, "replaced": list(record.get("paths") or [])}}
        repos.update_job_details(s, job_id, details)
    forget_tracking(ctx, vm_id)
    with ctx.catalog.write() as s:
        _own_job(s, host, job_id)
        repos.finish_job(s, job_id, Status.COMPLETED, progress={**(progress_values or {}), "percent": 100.0})
        _notify_enqueue(s, job_id)
    _notify_deliver(ctx, job_id)
    return show_job(ctx, job_id)


MAX_FILES = 1024


def _finish_restore(ctx: Context, host: str, job_id: str, files: object, progress_values: JsonDict | None) -> JsonDict:
    """A restore the agent completed: the files it wrote (each in the job's target directory) recorded
    in extendedInfo.restore, as a local restore records them."""
    from pathlib import PurePosixPath

    with ctx.catalog.write() as s:
        job = _own_job(s, host, job_id)
        record = restore_record(job)
        target = PurePosixPath(str(record.get("targetDir") or "/nonexistent"))
        written = files if isinstance(files, list) else []
        if len(written) > MAX_FILES or not all(
            _in_target(f, target) for f in written
        ):
            raise InvalidInput(f"the agent reported files outside {target} for restore job {job_id}",
                               hint="upgrade the agent")  # fmt: skip
        details = {**(job.details or {}), "restore": {**record, "files": list(written)}}
        repos.update_job_details(s, job_id, details)
        repos.finish_job(s, job_id, Status.COMPLETED, progress={**(progress_values or {}), "percent": 100.0})
        _notify_enqueue(s, job_id)
    _notify_deliver(ctx, job_id)
    return show_job(ctx, job_id)


MAX_DEFINITION_BYTES = 256 << 10


def _finish_new_vm(ctx: Context, host: str, job_id: str, body: JsonDict, progress_values: JsonDict | None) -> JsonDict:
    """A restore as a new VM the agent completed: the copy it defined on its host, checked and
    registered here as a VM of that host; a copy this catalog cannot take (its name taken
    meanwhile) fails the job naming the files left on the host."""
    from vmvault.service.jobs import add_restore_record, end_job
    from vmvault.service.restore_vm import NEW_VM_RESULT, register_new_vm

    with ctx.catalog.read() as s:
        job = _own_job(s, host, job_id)
        record = restore_record(job)
        source = repos.get_vm(s, job.vm or "")
        kind = source.kind
    report = body.get("newVm")
    new_vm = _checked_new_vm(report, record, kind, job_id)
    try:
        row = register_new_vm(ctx, str(record.get("newVm")), new_vm, host=host)
    except VmvaultError as exc:
        left = ", ".join(new_vm.files + [str(d.get("path")) for d in new_vm.disks])
        end_job(ctx, job_id, Status.FAILED, InvalidInput(
            f"{exc.message}; the copy the agent made stays on host '{host}': {left}",
            hint=f"remove those files (and the domain, for libvirt) on host '{host}', then restore again"))  # fmt: skip
        return show_job(ctx, job_id)
    view = {**new_vm.view, "name": row.name, "id": row.id, "started": bool((report or {}).get("started"))}
    add_restore_record(ctx, job_id, {k: view[k] for k in NEW_VM_RESULT if k in view})
    return _finish_restore(ctx, host, job_id, body.get("files"), progress_values)


def _in_target(path: object, target: Any, *, no_dots: bool = False) -> bool:
    """An agent's word on a file it wrote: a path string directly in the job's target directory
    (no_dots: without '..' anywhere, for the files of a new VM)."""
    from pathlib import PurePosixPath

    return (isinstance(path, str) and len(path) < 4096 and PurePosixPath(path).parent == target
            and not (no_dots and ".." in path))  # fmt: skip


def _checked_new_vm(report: object, record: JsonDict, kind: str, job_id: str) -> Any:
    """The agent's account of the copy it made: its kind is the source's, every file in the target."""
    from pathlib import PurePosixPath

    from vmvault.connectors.contract import NewVm

    target = PurePosixPath(str(record.get("targetDir") or "/nonexistent"))
    raw = report if isinstance(report, dict) else {}
    disks = raw.get("disks") if isinstance(raw.get("disks"), list) else None
    files = raw.get("files") if isinstance(raw.get("files"), list) else None
    definition, view = raw.get("definition"), raw.get("view")

    fine = (
        raw.get("kind") == kind and disks is not None and files is not None
        and isinstance(definition, dict) and isinstance(view, dict)
        and len(disks) <= MAX_FILES and len(files) <= MAX_FILES
        and all(isinstance(d, dict) and _in_target(d.get("path"), target, no_dots=True) for d in disks)
        and all(_in_target(f, target, no_dots=True) for f in files)
        and len(json.dumps(definition)) + len(json.dumps(view)) < MAX_DEFINITION_BYTES
    )  # fmt: skip
    if not fine:
        raise InvalidInput(f"the agent reported a new VM that is not a {kind} VM in {target} for restore job {job_id}",
                           hint="upgrade the agent")  # fmt: skip
    assert disks is not None and files is not None and isinstance(definition, dict) and isinstance(view, dict)
    return NewVm(kind, disks, definition, [str(f) for f in files], view, {})


def _finish_files(ctx: Context, host: str, job_id: str, sessions: object) -> JsonDict:
    """A mount or unmount the agent completed: its sessions recorded, then the job Completed."""
    with ctx.catalog.read() as s:
        job = _own_job(s, host, job_id)
        s.expunge(job)
    hostfiles.finish(ctx, host, job, sessions)
    with ctx.catalog.write() as s:
        _own_job(s, host, job_id)
        repos.finish_job(s, job_id, Status.COMPLETED, progress={**_progress_values({}), "percent": 100.0})
        _notify_enqueue(s, job_id)
    _notify_deliver(ctx, job_id)
    return show_job(ctx, job_id)


def _error_of(value: object, status: str) -> JsonDict:
    raw = value if isinstance(value, dict) else {}
    code = str(raw.get("code") or ("cancelled" if status == Status.CANCELLED else "agent_error"))[:64]
    message = str(raw.get("message") or "the agent reported no reason")[:2000]
    hint = raw.get("recommendedAction")
    return {"code": code, "message": message, "recommendedAction": str(hint)[:1000] if hint else None}


def _merge_agent_details(s: Session, job_id: str, details: JsonDict | None) -> None:
    from vmvault.service.jobs import _merge_details

    if details:
        _merge_details(s, job_id, _agent_details(details))


def _finish_completed(
    ctx: Context, host: str, job_id: str, rp_id: str, body: JsonDict, details: JsonDict | None
) -> JsonDict:
    from vmvault.service.backups import SCHEDULED, record_point
    from vmvault.service.jobs import warnings_error

    with ctx.catalog.read() as s:
        job = _own_job(s, host, job_id)
        vm_id = _vm_of(s, job, host)
        vault = repos.get_vault(s, job.vault or "")
        scheduled = (job.details or {}).get("trigger") == SCHEDULED
        s.expunge_all()
    manifest = _published_manifest(ctx, vault, rp_id, vm_id, job_id)
    warnings = [_warning(w) for w in body.get("warnings") or [] if isinstance(w, dict)][:100]
    final = {**(_progress_values(body.get("progress") or {}) if isinstance(body.get("progress"), dict) else {}),
             "percent": 100.0}  # fmt: skip
    with ctx.catalog.write() as s:
        _own_job(s, host, job_id)
        record_point(ctx, s, job_id, vm_id, vault.id, manifest, scheduled)
        status = Status.COMPLETED_WITH_WARNINGS if warnings else Status.COMPLETED
        repos.finish_job(s, job_id, status, progress=final, error=warnings_error(warnings))
        _merge_agent_details(s, job_id, details)
        _notify_enqueue(s, job_id)
    _notify_deliver(ctx, job_id)
    from vmvault.service.vaultsettings import save

    save(ctx, vault)  # the VM's definition and retain-until as of this backup, as a local backup does
    return show_job(ctx, job_id)


# ---- the late end of a job the server had failed agent_lost ----------------------------------


def _lost_backup(ctx: Context, host: str, job_id: str) -> bool:
    """This host's Backup job that ended agent_lost (or whose lost point was adopted already)."""
    with ctx.catalog.read() as s:
        row = repos.find_job(s, job_id)
        if row is None or row.operation != Operation.BACKUP or (row.details or {}).get(AGENT_KEY) != host:
            return False
        ended_ok = row.status in (Status.COMPLETED, Status.COMPLETED_WITH_WARNINGS)
        adopted = ended_ok and bool((row.details or {}).get("reconciled"))
        return adopted or (row.status == Status.FAILED and (row.error or {}).get("code") == "agent_lost")


def _adopt_late_point(ctx: Context, host: str, job_id: str, rp_id: str, body: JsonDict) -> JsonDict:
    """An agent cut off from the server reports a backup it completed after the server failed the job
    `agent_lost`: the point it published is adopted by the crash rule (service/reconcile.py): its
    manifest, read back from the vault, names this job and VM and the vault's record chain records
    it. A point the vault does not hold is never recorded (NotFound); one that does not check out is
    not adopted (IntegrityError naming why); the job stays as it ended."""
    from vmvault.service.reconcile import adopt_reported_point
    from vmvault.service.vaultsettings import save

    with ctx.catalog.read() as s:
        job = repos.get_job(s, job_id)
        vault = repos.get_vault(s, job.vault or "")
        vm = repos.get_vm(s, job.vm or "")
        done = (job.details or {}).get("recoveryPoint")
        s.expunge_all()
    if done and done == rp_id:  # adopted already (reconcile before another backup, a server's start)
        return show_job(ctx, job_id)
    manifest = _published_manifest(ctx, vault, rp_id, vm.id, job_id)
    note = (f"the agent of host '{host}' reported this job's end at {now_iso()}, after the server had failed it "
            "agent_lost; the recovery point it published was adopted (read back from the vault)")  # fmt: skip
    why = adopt_reported_point(ctx, vault, manifest.rp_id, note)
    if why is not None:
        raise IntegrityError(
            f"recovery point '{rp_id}' of job '{job_id}' in vault '{vault.name}' was not adopted: {why}",
            hint=f"run vmvault vault verify {vault.name}, then the backup again: vmvault backup now {vm.name}",
        )
    _late_warnings(ctx, job_id, body)
    log.info("job %s: point %s of host %s adopted after agent_lost", job_id, rp_id, host)
    with ctx.catalog.write() as s:
        _notify_enqueue(s, job_id)
    _notify_deliver(ctx, job_id)
    save(ctx, vault)
    return show_job(ctx, job_id)


def _late_warnings(ctx: Context, job_id: str, body: JsonDict) -> None:
    """The warnings and details the agent reports with a late end, as a timely end records them."""
    from vmvault.service.jobs import warnings_error

    warnings = [_warning(w) for w in body.get("warnings") or [] if isinstance(w, dict)][:100]
    details = body.get("details") if isinstance(body.get("details"), dict) else None
    raw = body.get("progress") if isinstance(body.get("progress"), dict) else {}
    with ctx.catalog.write() as s:
        status = Status.COMPLETED_WITH_WARNINGS if warnings else Status.COMPLETED
        final = {**_progress_values(raw or {}), "percent": 100.0}
        repos.finish_job(s, job_id, status, error=warnings_error(warnings), progress=final)
        _merge_agent_details(s, job_id, details)


def _warning(raw: JsonDict) -> JsonDict:
    hint = raw.get("recommendedAction")
    return {"code": str(raw.get("code") or "warning")[:64], "message": str(raw.get("message") or "")[:2000],
            "recommendedAction": str(hint)[:1000] if hint else None}  # fmt: skip


def _published_manifest(ctx: Context, vault: Any, rp_id: str, vm_id: str, job_id: str) -> Any:
    """The point's manifest as the vault holds it, checked to be this job's point of this VM."""
    from vmvault.service.vaultio import opened_vault, read_manifest_or_none

    if not rp_id or len(rp_id) > 64:
        raise InvalidInput("a Completed backup names its recovery point", hint="send recoveryPoint")
    with opened_vault(ctx, vault) as opened:
        manifest = read_manifest_or_none(opened, rp_id)
    if manifest is None:
        raise NotFound(f"vault '{vault.name}' has no recovery point '{rp_id}'",
                       hint="the agent's backup did not publish it; run the backup again")  # fmt: skip
    if manifest.vm_id != vm_id or manifest.job_id != job_id:
        raise IntegrityError(
            f"recovery point '{rp_id}' in vault '{vault.name}' is not the point of job '{job_id}'",
            hint="the agent reported another job's point; run the backup again",
        )
    return manifest

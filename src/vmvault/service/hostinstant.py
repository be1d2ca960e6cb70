"""The server's side of an instant restore run by the agent of the VM's host (agent: service/agentinstant.py).

`restore vm VM --instant` of a VM of another host queues a Restore job (details.restore.instant)
for that host's agent, which runs service/instant_restore.py there (export, overlays, VM, live
copy). What the owner writes to the catalog on a server (instant_restore.CatalogBooks) arrives
here over POST /api/v1/agents/{host}/jobs/{id}/instant, checked as every word of an agent is:
the job's state (only the keys an instant restore reports, its disks in the job's target
directory), its error while InProgress, the new VM (agentwork._checked_new_vm: the source's kind,
every file in the target; registered as a VM of that host) and its removal (only the VM this job
registered). The job ends through /finish as any agent job (its final disks checked in the target).
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.models import JobRow
from vmvault.errors import InvalidInput
from vmvault.service.context import Context
from vmvault.service.jobs import restore_record
from vmvault.service.views import JsonDict

# What an agent may write into details.restore (the others are the server's: mode, recoveryPoint,
# newVm, targetDir, format, host, instant, name, id, files).
STATE_KEYS = ("state", "vmRunning", "disks", "exportSocket", "exportPid", "exportClosed", "exportLeftRunning",
              "domain", "started", "definitionFile", "launchScript", "uuid")  # fmt: skip
MAX_STATE_BYTES = 64 << 10


def is_instant(row: JobRow) -> bool:
    return bool(restore_record(row).get("instant"))


def report(ctx: Context, host: str, job_id: str, body: JsonDict) -> JsonDict:
    """One report of the agent's instant restore: restore (its state), error (set or clear), newVm
    (register it), unregister. Answers the new VM's catalog name and id when it was registered, and
    whether to cancel."""
    from vmvault.service.agentwork import _own_job

    with ctx.catalog.read() as s:
        job = _own_job(s, host, job_id)
        if not is_instant(job):
            raise InvalidInput(f"job '{job_id}' is not an instant restore", hint="upgrade the agent")
        record = restore_record(job)
        kind = repos.get_vm(s, job.vm or "").kind
    answer: JsonDict = {}
    if body.get("newVm") is not None:
        answer = _register(ctx, host, job_id, record, kind, body["newVm"])
    if body.get("unregister"):
        _unregister(ctx, host, job_id)
    if isinstance(body.get("restore"), dict) or "error" in body:
        with ctx.catalog.write() as s:
            row = _own_job(s, host, job_id)
            if isinstance(body.get("restore"), dict):
                _note(s, row, record, body["restore"])
            if "error" in body:
                row.error = _error(body.get("error"))
    with ctx.catalog.read() as s:
        answer["cancel"] = bool(_own_job(s, host, job_id).cancel_requested)
    return answer


def _note(s: Session, row: JobRow, record: JsonDict, state: JsonDict) -> None:
    kept = {k: v for k, v in state.items() if k in STATE_KEYS}
    target = PurePosixPath(str(record.get("targetDir") or "/nonexistent"))
    disks = kept.get("disks")
    if disks is not None and not (isinstance(disks, list) and all(_in_target(d, target) for d in disks)):
        raise InvalidInput(f"the agent reported disks outside {target} for restore job {row.id}",
                           hint="upgrade the agent")  # fmt: skip
    if len(json.dumps(kept, default=str)) > MAX_STATE_BYTES:
        raise InvalidInput("the agent's instant-restore state is too large", hint="upgrade the agent")
    current = restore_record(row)
    repos.update_job_details(s, row.id, {**(row.details or {}), "restore": {**current, **kept}})


def _in_target(path: object, target: PurePosixPath) -> bool:
    from vmvault.service.agentwork import _in_target as in_target

    return in_target(path, target, no_dots=True)


def _error(value: object) -> JsonDict | None:
    from vmvault.service.agentwork import _error_of

    if value is None:
        return None
    return _error_of(value, "InProgress")


def _register(ctx: Context, host: str, job_id: str, record: JsonDict, kind: str, raw: object) -> JsonDict:
    """The new VM the agent defined on its host, checked and registered as a VM of that host."""
    from vmvault.service.agentwork import _checked_new_vm
    from vmvault.service.restore_vm import register_new_vm

    new_vm = _checked_new_vm(raw, record, kind, job_id)
    row = register_new_vm(ctx, str(record.get("newVm")), new_vm, host=host)
    with ctx.catalog.write() as s:
        job = repos.get_job(s, job_id)
        current = restore_record(job)
        repos.update_job_details(s, job_id, {**(job.details or {}),
                                             "restore": {**current, "name": row.name, "id": row.id}})  # fmt: skip
    return {"name": row.name, "id": row.id}


def _unregister(ctx: Context, host: str, job_id: str) -> None:
    with ctx.catalog.write() as s:
        job = repos.get_job(s, job_id)
        drop_copy(s, job, host)


def drop_copy(s: Session, job: JobRow, host: str) -> None:
    """Remove the VM this instant-restore job registered (its copy is gone: stopped and removed on
    the host, by the agent's teardown or its start-up reconcile after a kill)."""
    record = restore_record(job)
    vm_id = str(record.get("id") or "")
    if not is_instant(job) or not vm_id or record.get("state") == "Completed":
        return  # a completed copy is whole: it stays (only the report of its end was lost)
    row = repos.find_vm_by_id(s, vm_id)
    if row is not None and row.host == host:
        s.delete(row)


def lost_error(row: JobRow, why: str, host: Any) -> JsonDict:
    """agent_lost for an instant restore: the agent stops and removes the copy (at once, or at its restart)."""
    record = restore_record(row)
    again = (f"vmvault restore vm {row.vm} --rp {record.get('recoveryPoint')} --name {record.get('newVm')} "
             f"--target-dir {record.get('targetDir')} --instant")  # fmt: skip
    return {
        "code": "agent_lost",
        "message": f"{why}; the instant restore did not finish: its VM '{record.get('newVm')}' on host {host} "
        "is stopped and its copy removed by the agent (at once, or when it starts again)",
        "recommendedAction": f"check vmvault agent run on host {host} (vmvault host show {host}), then run the "
        f"restore again: {again}",
    }

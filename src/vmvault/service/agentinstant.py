"""The agent's side of an instant restore of a VM of its host (the server's side: service/hostinstant.py).

`restore vm VM --instant` of a VM of another host is a Restore job its host's agent claims and
runs with the code a server runs (service/instant_restore.py InstantRestore: the block export of
the point as a child process, qcow2 overlays backed by it, the VM defined by its connector and
booted, the live copy, the export stopped at the end), its catalog writes going to the server
over REST (RemoteInstantBooks). The target is checked as for any restore on the agent (its
--allow-restores roots, the disks of its host's VMs, files in the way) before anything is made.

The job runs in a worker thread of the agent, not in a detached owner process as on a server: a
server's command must return while the copy goes on, and nothing else of it lives on, whereas the
agent is the long-lived process on its host already; its heartbeat carries the job's liveness and
brings its cancel (`job cancel` on any server), and its token stays in one process. The job holds
one of the agent's --max-jobs slots until the copy is done. Stopping the agent (SIGTERM) cancels
it like any job: the VM is stopped and the copy removed (it still needs the export, which dies with
the agent). A killed agent leaves its journal (HOME/instant/JOB.json: the VM's handle, the
export's pid, the files made); at its next start, before registering, it stops that VM and export
and removes the copy (reconcile), and the server, which ends the job agent_lost, forgets the VM
the job registered. A copy is never adopted: its export died with the agent that ran it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from vmvault.errors import InvalidInput, VmvaultError
from vmvault.service.jobs import Status
from vmvault.service.paths import PathPolicy
from vmvault.service.views import JsonDict
from vmvault.settings import Settings

log = logging.getLogger("vmvault")

JOURNALS = "instant"  # HOME/instant/JOB.json


def journals(settings: Settings) -> Path:
    return Path(settings.home) / JOURNALS


def reconcile(settings: Settings) -> list[str]:
    """Before registering: stop and remove what the instant restores of a killed agent left."""
    from vmvault.service.instant_restore import reconcile_journals

    done = reconcile_journals(journals(settings))
    for line in done:
        log.info("reconciled: %s", line)
    return done


class RemoteInstantBooks:
    """instant_restore.InstantBooks over the agent API (POST /jobs/{id}/instant).

    A server that does not answer is asked again with backoff (call_until_answered) until it does or
    the agent stops: the VM's state must reach the command that waits for it. A server that ended
    the job meanwhile (agent_lost, not found) stops it here: the copy is then torn down."""

    def __init__(self, client: Any, job_id: str, stopper: Any, life: Any) -> None:
        self.client, self.job_id, self.stopper, self.life = client, job_id, stopper, life

    @property
    def path(self) -> str:
        return f"/jobs/{self.job_id}/instant"

    def note(self, restore: JsonDict) -> None:
        self._call({"restore": restore}, "reporting its state")

    def set_error(self, error: JsonDict | None) -> None:
        self._call({"error": error}, "reporting its error")

    def register(self, vm: Any) -> JsonDict:
        from vmvault.service.agentrun import call_until_answered

        report = {"kind": vm.kind, "disks": vm.disks, "definition": vm.definition, "files": vm.files,
                  "view": vm.view}  # fmt: skip
        answer = call_until_answered(self.client, self.path, {"newVm": report}, self.life, self.job_id,
                                     "registering the new VM")  # fmt: skip
        return {"name": str(answer["name"]), "id": str(answer["id"])}

    def unregister(self) -> None:
        with contextlib.suppress(VmvaultError):  # ended there already: the server forgot the VM then
            self._call({"unregister": True}, "removing the new VM")

    def _call(self, body: JsonDict, what: str) -> None:
        from vmvault.service.agentrun import ServerUnreachable, call_until_answered

        try:
            answer = call_until_answered(self.client, self.path, body, self.life, self.job_id, what)
        except ServerUnreachable:
            raise
        except VmvaultError as exc:
            if exc.code in ("busy", "not_found"):
                self.stopper.stop(f"the server ended job {self.job_id}")
            log.warning("job %s: %s refused: %s", self.job_id, what, exc)
            return
        if answer and answer.get("cancel"):
            self.stopper.stop("the job was cancelled")


def run_instant_package(
    settings: Settings, client: Any, package: JsonDict, cancel: Any, paths: PathPolicy | None, life: Any = None
) -> str:
    """Run one claimed instant restore of a VM of this host, to the end of its copy; report how it ended."""
    from vmvault.service.agentrun import AgentRun, _finish, _report_failure, _restore_target, _sendable
    from vmvault.service.instant_restore import InstantRestore
    from vmvault.service.restore_vm import plan_on_host

    job_id = str(package["jobId"])
    run = AgentRun(client, job_id, cancel, package.get("details"), life)
    try:
        target, recheck = _restore_target(package, paths)
        plan = plan_on_host(package, target)
        _prepare_target(plan, recheck)
        books = RemoteInstantBooks(client, job_id, cancel, run.life)
        InstantRestore(settings, books, plan, run, journal=journals(settings) / f"{job_id}.json").run()
    except Exception as exc:
        return _report_failure(client, run, exc)
    disks = [str(d) for d in ((run.details or {}).get("restore") or {}).get("disks") or []]
    _finish(run, {"status": Status.COMPLETED, "files": disks, "progress": run.last,
                  "details": _sendable(run.details)})  # fmt: skip
    log.info("job %s: instant restore of %s as %s done: %s", job_id, plan.vm_name, plan.new_name, ", ".join(disks))
    return Status.COMPLETED


def _prepare_target(plan: Any, recheck: Any) -> None:
    """The target made (shared with the VM's hypervisor) and checked again; its run directory empty."""
    from vmvault.connectors.registry import connector_for
    from vmvault.connectors.workfiles import copy_run_dir
    from vmvault.service.restore_vm import make_target_dir

    run_dir = copy_run_dir(plan.target_dir, plan.new_name)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise InvalidInput(f"files are in the way of the restored VM '{plan.new_name}': {run_dir}",
                           hint="remove them, or choose another --target-dir")  # fmt: skip
    # Every folder made on the way opened to the VM's QEMU, which opens the overlays (the same
    # making as InstantRestore's own, which then finds it made).
    make_target_dir(connector_for(plan.kind), plan.target_dir)
    recheck(plan.target_dir)

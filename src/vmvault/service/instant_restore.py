"""Instant restore: a new VM that runs at once on the vault's block export, then moves to local disks.

`vmvault restore vm VM --rp ID --name NEW --instant` (docs/restore.md, "Instant restore"). The
command plans and refuses like a normal restore as a new VM, records a queued Restore job and
starts the job's **owner**, a detached process (`python -m vmvault.service.instant_restore HOME
JOB`) that claims the job and drives it to its end, so nothing has to keep running after the
command returns:

1. it starts the block export of the point (recovery/nbdserver.py, a child of the owner) on a unix
   socket in the new VM's run directory;
2. through the VM's connector it creates a qcow2 overlay per disk whose backing file is the
   export, defines and registers the VM like restore_vm does (new name, UUID, MACs, paths), its
   disks stopping the VM on an I/O error, and boots it; the command returns once the guest agent
   answers, the job still InProgress;
3. the connector's live copy (connectors/*/live_copy.py: block-stream over QMP, libvirt's block
   pull) copies every disk; the owner reports bytes copied / total as the job's progress;
4. when every stream has completed (no disk has a backing file any more) it stops the export and
   ends the job Completed with the final disk paths (details `restore`, shown by `job show`).

An export that dies pauses the VM on its next read of data not yet copied (status io-error; the
guest gets no error) and pauses the streams. The job says so (its `error` while InProgress) and the
owner restarts the export every VMVAULT_INSTANT_RETRY_S seconds (10); once it answers, the VM
continues and the streams resume. A VM that stops before the copy is complete is finished offline
(`qemu-img rebase -b ""` against the export). `vmvault job cancel`, and a start that fails, stop
the VM and the export and remove the copy (its writes are lost: a copy still needing the vault is
useless without it), so the restore can simply be run again.

A VM of another host (`vm add --host`): the job is queued for that host's agent instead, which
runs InstantRestore there in a worker thread (service/agentinstant.py); what it writes to the
catalog goes through InstantBooks (CatalogBooks here, the agent API there), and the command waits
for the VM the same way (wait_until_running).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vmvault.catalog import repos
from vmvault.connectors.contract import CopyDisk, LiveCopy, NewVm
from vmvault.connectors.registry import connector_for
from vmvault.connectors.workfiles import BOOT_TIMEOUT, copy_run_dir
from vmvault.engine.progress import Progress
from vmvault.errors import Cancelled, InvalidInput, StorageError, VmvaultError
from vmvault.proc import boot_id
from vmvault.service.context import Context
from vmvault.service.jobs import (
    JobOutcome,
    Operation,
    ProgressCallback,
    Status,
    cancel_job,
    create_job,
    end_job,
    owner_fields,
    run_job,
    show_job,
)
from vmvault.service.restore_vm import VmRestorePlan, _written, make_target_dir, plan_new_vm, register_new_vm
from vmvault.service.views import JsonDict
from vmvault.settings import Settings

log = logging.getLogger("vmvault.instant")

RETRY_S = float(os.environ.get("VMVAULT_INSTANT_RETRY_S", "10"))
EXPORT_START_TIMEOUT_S = 60.0
POLL_S = 1.0
EXPORT_SOCKET = "vault.sock"


# ---- the command's side --------------------------------------------------------------------------


def restore_instant(
    ctx: Context,
    vm_name: str,
    rp_id: str,
    new_name: str,
    *,
    target_dir: str | Path | None = None,
    fmt: str | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> JobOutcome[JsonDict]:
    """Start an instant restore; returns once the new VM runs (the job goes on in its owner process)."""
    if fmt not in (None, "qcow2"):
        raise InvalidInput(
            "an instant restore writes qcow2 disks (an overlay on the vault's export)",
            hint="leave out --format, or drop --instant to restore raw disks",
        )
    plan = plan_new_vm(ctx, vm_name, rp_id, new_name, target_dir, "qcow2", True)
    run_dir = copy_run_dir(plan.target_dir, new_name)  # the export's socket (and the copy's, for a plain QEMU)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise InvalidInput(
            f"files are in the way of the restored VM '{new_name}': {run_dir}",
            hint="remove them, or choose another --target-dir",
        )
    details = {"instantPlan": _plan_dict(plan), "restore": {"vm": new_name, "instant": True, "state": "Starting"}}
    job = create_job(ctx, Operation.RESTORE, vm=vm_name, vault=plan.vault.name, queued=True, details=details)
    proc = _spawn_owner(ctx, job.id, plan)
    return _wait_until_running(ctx, job.id, proc, cancel or threading.Event())


def _plan_dict(plan: VmRestorePlan) -> JsonDict:
    return {"vm": plan.vm_name, "rp": plan.rp_id, "name": plan.new_name, "vault": plan.vault.name,
            "targetDir": str(plan.target_dir), "disks": [str(p) for p in plan.disk_files],
            "kind": plan.kind}  # fmt: skip


def owner_log(target_dir: Path, new_name: str) -> Path:
    return target_dir / f"{new_name}-instant.log"


def _spawn_owner(ctx: Context, job_id: str, plan: VmRestorePlan) -> subprocess.Popen[bytes]:
    if not plan.target_dir.exists():
        plan.target_dir.mkdir(parents=True)
        connector_for(plan.kind).share_with_vm(str(plan.target_dir), 0o710)  # the VM's QEMU opens the overlays
    env = dict(os.environ)
    if ctx.settings.passphrase:
        env["VMVAULT_PASSPHRASE"] = ctx.settings.passphrase
    env["VMVAULT_PASSPHRASE_CHECK"] = "strict" if ctx.settings.strict_passphrase else "lenient"
    with open(owner_log(plan.target_dir, plan.new_name), "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vmvault.service.instant_restore", str(ctx.settings.home), job_id],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True, env=env,
        )  # fmt: skip


def _wait_until_running(
    ctx: Context, job_id: str, proc: subprocess.Popen[bytes] | None, cancel: threading.Event
) -> JobOutcome[JsonDict]:
    """Wait until the owner reports the VM running (or the job ended); the job goes on afterwards.

    proc: the owner process this command started (None: the agent of the VM's host runs the job)."""
    deadline = time.monotonic() + BOOT_TIMEOUT + 2 * EXPORT_START_TIMEOUT_S
    asked = False
    while time.monotonic() < deadline:
        with ctx.catalog.read() as s:
            row = repos.get_job(s, job_id)
            status, owner, state = row.status, row.owner_pid, dict((row.details or {}).get("restore") or {})
        if status != Status.IN_PROGRESS or state.get("vmRunning"):
            job = show_job(ctx, job_id)
            return JobOutcome(job=job, result=state, error=_job_error(job))
        if proc is not None and owner <= 0 and proc.poll() is not None:  # died before it claimed the job
            where = owner_log(Path(_plan_of(ctx, job_id)["targetDir"]), str(state.get("vm")))
            error = StorageError(f"the instant restore's owner process exited ({proc.returncode}) before it started",
                                 hint=f"see {where}")  # fmt: skip
            job = end_job(ctx, job_id, Status.FAILED, error)
            return JobOutcome(job=job, error=error)
        if cancel.is_set() and not asked:
            asked = True
            with contextlib.suppress(InvalidInput):
                cancel_job(ctx, job_id)
        time.sleep(0.3)
    job = show_job(ctx, job_id)
    return JobOutcome(job=job, result=None, error=_job_error(job))


def wait_until_running(ctx: Context, job_id: str, cancel: threading.Event | None) -> JobOutcome[JsonDict]:
    """An instant restore queued for the agent of the VM's host: back once the new VM runs there."""
    return _wait_until_running(ctx, job_id, None, cancel or threading.Event())


def _job_error(job: JsonDict) -> VmvaultError | None:
    error = job.get("error") or None
    if job["status"] not in Status.ENDED_BADLY or not error:
        return None
    return VmvaultError(str(error.get("message")), hint=error.get("recommendedAction"), code=error.get("code"))


def _plan_of(ctx: Context, job_id: str) -> JsonDict:
    with ctx.catalog.read() as s:
        plan: JsonDict = dict((repos.get_job(s, job_id).details or {}).get("instantPlan") or {})
    return plan


# ---- the owner process ----------------------------------------------------------------------------


def owner_main(home: str, job_id: str) -> int:
    from vmvault.service.context import context
    from vmvault.settings import load_settings

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s instant-restore[{os.getpid()}] %(message)s")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with context(load_settings(home)) as ctx:
        with ctx.catalog.write() as s:
            row = repos.get_job(s, job_id)
            details = {**(row.details or {}), **owner_fields()}
            if not repos.claim_job(s, job_id, os.getpid(), boot_id(), details):
                log.error("job %s is not waiting for an owner", job_id)
                return 1
        with ctx.catalog.read() as s:
            row = repos.get_job(s, job_id)
            s.expunge(row)
        plan_dict = dict((row.details or {})["instantPlan"])
        plan = _plan_from(ctx, plan_dict)
        books = CatalogBooks(ctx, job_id, plan.new_name)
        outcome = run_job(ctx, row, lambda job: InstantRestore(ctx.settings, books, plan, job).run())
        log.info("job %s ended %s", job_id, outcome.job["status"])
        return 1 if outcome.failed else 0


def _plan_from(ctx: Context, d: JsonDict) -> VmRestorePlan:
    """The plan as the command recorded it; the source VM's definition read again (its kind's connector)."""
    with ctx.catalog.read() as s:
        vault = repos.get_vault(s, str(d["vault"]))
        source = repos.find_vm(s, str(d["vm"]))
        definition = dict(source.definition or {}) if source is not None else {}
        s.expunge_all()
    return VmRestorePlan(str(d["vm"]), str(d["rp"]), str(d["name"]), vault, Path(d["targetDir"]), "qcow2", True,
                         [Path(p) for p in d["disks"]], str(d.get("kind") or "qmp"), definition)  # fmt: skip


class InstantBooks(Protocol):
    """What an instant restore writes to the catalog while it runs: this process's catalog
    (CatalogBooks, a server's or a CLI's owner process), or the server's REST API on the agent of
    the VM's host (service/agentinstant.py), which has no catalog access."""

    def note(self, restore: JsonDict) -> None:
        """The job's details.restore now (state, vmRunning, disks ...): the command waits for vmRunning."""
        ...

    def set_error(self, error: JsonDict | None) -> None:
        """The job's error while it is still InProgress (a lost export), or None once it is over."""
        ...

    def register(self, vm: NewVm) -> JsonDict:
        """The new VM recorded in the catalog before it boots; its catalog name and id."""
        ...

    def unregister(self) -> None:
        """The new VM removed from the catalog again (the copy was stopped and removed)."""
        ...


class CatalogBooks:
    """InstantBooks on this process's catalog."""

    def __init__(self, ctx: Context, job_id: str, new_name: str) -> None:
        self.ctx, self.job_id, self.new_name = ctx, job_id, new_name
        self.registered: str | None = None  # the id of the VM this job registered (never another of its name)

    def note(self, restore: JsonDict) -> None:
        with self.ctx.catalog.write() as s:
            row = repos.get_job(s, self.job_id)
            details = {**(row.details or {}), "restore": json.loads(json.dumps(restore))}
            repos.update_job_details(s, self.job_id, details)

    def set_error(self, error: JsonDict | None) -> None:
        with self.ctx.catalog.write() as s:
            row = repos.get_job(s, self.job_id)
            row.error = error

    def register(self, vm: NewVm) -> JsonDict:
        row = register_new_vm(self.ctx, self.new_name, vm)
        self.registered = row.id
        return {"name": row.name, "id": row.id}

    def unregister(self) -> None:
        if self.registered is None:
            return  # its registration was refused (the name taken meanwhile): that VM is another's
        with self.ctx.catalog.write() as s:
            row = repos.find_vm_by_id(s, self.registered)
            if row is not None:
                s.delete(row)


@dataclass
class InstantRestore:
    """The owner's work: export, overlays, VM (the connector's), copy, switch-over.

    The same code runs in a server's (or CLI's) owner process and on the agent of the VM's host;
    books is where it records the job's state and the new VM. journal (an agent's): a file that
    names what runs (the VM's handle, the export's pid, the files made), so that an agent killed
    mid-copy stops and removes them at its next start (reconcile_journals)."""

    settings: Settings
    books: InstantBooks
    plan: VmRestorePlan
    job: Any  # jobs.JobRun, or agentrun.AgentRun on an agent: cancel, details, progress(), job_id
    journal: Path | None = None
    disks: list[CopyDisk] = field(default_factory=list)
    vm: NewVm | None = None
    live: LiveCopy | None = None
    export: subprocess.Popen[bytes] | None = None
    lost_since: float | None = None  # when the export was found dead (retry clock)
    created: list[Path] = field(default_factory=list)
    copied: dict[str, int] = field(default_factory=dict)  # bytes streamed so far, by disk

    @property
    def connector(self) -> Any:
        return connector_for(self.plan.kind)

    @property
    def run_dir(self) -> Path:
        return copy_run_dir(self.plan.target_dir, self.plan.new_name)

    @property
    def socket(self) -> Path:
        return self.run_dir / EXPORT_SOCKET

    def run(self) -> JsonDict:
        try:
            return self._run()
        finally:
            if self.live is not None:
                self.live.close()

    def _run(self) -> JsonDict:
        try:
            view = self._start()
        except BaseException:
            self._teardown("StartFailed")  # nothing of the copy is left behind: the restore can be run again
            raise
        self._note(state="Copying", vmRunning=True, **view)
        try:
            self._copy()
        except Cancelled:
            self._teardown("Cancelled")
            raise
        except BaseException:
            self._failed_while_copying()
            raise
        self._stop_export()
        for leftover in self.run_dir.glob("export.*"):
            leftover.unlink(missing_ok=True)
        assert self.live is not None
        self.live.check_local(self.disks)
        self._note(state="Completed", exportClosed=True)
        self._forget()
        return view

    def _failed_while_copying(self) -> None:
        """A VM that runs on the export keeps it (stopping it would pause the VM for good); else it stops."""
        if self.live is None or not self.live.active():
            self._stop_export()
            self._note(state="Failed", vmRunning=False)
            return
        self._note(state="Failed", exportLeftRunning=True)
        log.error("the copy failed; VM %s still runs on the export (pid %s)", self.plan.new_name,
                  self.export.pid if self.export else "?")  # fmt: skip

    # ---- start: export, overlays, VM ------------------------------------------------------------
    def _start(self) -> JsonDict:
        connector, request = self.connector, self.plan.request()
        make_target_dir(connector, self.plan.target_dir)
        self.run_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
        connector.share_with_vm(str(self.run_dir), 0o710)  # the VM's QEMU connects to the export's socket in it
        manifest = self._manifest()
        definition = dict(manifest.vm_definition or {})
        connector.check_point(request, definition)
        self._start_export()
        for d in manifest.disks:
            path = self.plan.target_dir / f"{d.name}.qcow2"
            disk = connector.overlay(definition, d.name, d.size, str(path), str(self.socket))
            self.created.append(path)
            self.disks.append(disk)
        self._journal()
        written = _written(manifest, [Path(d.path) for d in self.disks])
        self.vm = connector.create_new_vm(request, definition, [d.name for d in manifest.disks], written,
                                          instant=True)  # fmt: skip
        self.created += [Path(f) for f in self.vm.files]
        self.live = connector.live_copy(self.vm)
        self._journal()
        row = self.books.register(self.vm)
        booting = {"domain": self.plan.new_name} if "domain" in self.vm.view else {}
        self._note(state="Booting", disks=[d.path for d in self.disks], exportSocket=str(self.socket), **booting)
        connector.start_new_vm(self.vm)
        log.info("VM %s runs on the export of point %s", self.plan.new_name, self.plan.rp_id)
        return {"name": row["name"], "id": row["id"], **self.vm.view, "started": True, "instant": True}

    def _manifest(self) -> Any:
        from vmvault.service.vaultio import opened_vault_at

        with opened_vault_at(self.settings, self.plan.vault) as vault:
            vault.sync_index()
            return vault.read_manifest(self.plan.rp_id)

    # ---- the export ------------------------------------------------------------------------------
    def _start_export(self) -> None:
        config_file, ready = self.run_dir / "export.json", self.run_dir / "export.ready"
        ready.unlink(missing_ok=True)
        ready.with_suffix(".error").unlink(missing_ok=True)
        config = {"home": str(self.settings.home), "storage_dir": self.plan.vault.storage_dir,
                  "vault_uuid": self.plan.vault.uuid, "rp_id": self.plan.rp_id, "unix": str(self.socket),
                  "ready": str(ready), "pin_seconds": 7 * 24 * 3600}  # fmt: skip
        config_file.write_text(json.dumps(config, indent=1))
        with open(owner_log(self.plan.target_dir, self.plan.new_name), "ab") as out:
            command = [sys.executable, "-m", "vmvault.recovery.nbdserver", str(config_file)]
            self.export = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, close_fds=True)
        deadline = time.monotonic() + EXPORT_START_TIMEOUT_S
        while not ready.exists():
            if self.export.poll() is not None or time.monotonic() > deadline:
                self._stop_export()
                why = "did not become ready"
                with contextlib.suppress(OSError, ValueError):
                    why = str(json.loads(ready.with_suffix(".error").read_text())["message"])
                raise StorageError(f"the block export of recovery point {self.plan.rp_id} failed: {why}",
                                   hint="check the vault's storage (vmvault vault verify NAME) and retry")  # fmt: skip
            time.sleep(0.05)
        self._note(exportPid=self.export.pid)
        self._journal()
        self.connector.share_with_vm(str(self.socket), 0o660)  # the VM's QEMU connects (again after a restart)

    def _stop_export(self) -> None:
        proc, self.export = self.export, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.socket.unlink(missing_ok=True)

    def _watch_export(self) -> bool:
        """True while the export serves; restarts a dead one every RETRY_S seconds (the job says so)."""
        if self.export is not None and self.export.poll() is None:
            return True
        now = time.monotonic()
        if self.lost_since is None:
            code = self.export.returncode if self.export is not None else None
            self.lost_since = now
            self._problem(f"the block export of recovery point {self.plan.rp_id} stopped (exit code {code})")
            return False
        if now - self.lost_since < RETRY_S:
            return False
        try:
            self._start_export()
        except StorageError as exc:
            self.lost_since = now
            self._problem(exc.message)
            return False
        log.info("the export runs again (pid %s)", self.export.pid if self.export else "?")
        self.lost_since = None
        self._clear_problem()
        return True

    def _problem(self, what: str) -> None:
        """The job's error while it is InProgress: what happened, that nothing is lost, and the fix."""
        log.warning("%s", what)
        error = {
            "code": "export_lost",
            "message": f"{what}; VM '{self.plan.new_name}' pauses (io-error) when it reads data not copied yet, "
            "so its guest gets no I/O error, and the copy to local disks waits; nothing written is lost",
            "recommendedAction": f"vmvault restarts the export every {RETRY_S:g} s by itself and then resumes the "
            f"VM and the copy; make sure the vault's storage ({self.plan.vault.storage_dir}) is reachable "
            f"(see {owner_log(self.plan.target_dir, self.plan.new_name)})",
        }
        self._set_error(error)
        self._note(state="ExportLost")

    def _clear_problem(self) -> None:
        self._set_error(None)
        self._note(state="Copying")

    def _set_error(self, error: JsonDict | None) -> None:
        self.books.set_error(error)

    # ---- the copy ----------------------------------------------------------------------------------
    def _copy(self) -> None:
        """Copy every disk into its overlay until none has a backing file (or finish offline)."""
        assert self.live is not None
        while not all(d.done for d in self.disks):
            if self.job.cancel.is_set():
                what = self.live.cancelled
                raise Cancelled(f"the instant restore of VM '{self.plan.new_name}' was cancelled: {what}")
            self.live.tick(self.disks, self.copied, self._watch_export())
            self._report()
            if not all(d.done for d in self.disks):
                time.sleep(POLL_S)
        self.live.finished(self.disks)

    def _report(self) -> None:
        done = sum(d.size if d.done else self.copied.get(d.name, 0) for d in self.disks)
        current = next((d.name for d in self.disks if not d.done), "")
        self.job.progress(Progress(sum(d.size for d in self.disks), done, done, current))

    # ---- bookkeeping ------------------------------------------------------------------------------
    def _note(self, **fields: Any) -> None:
        """Update details.restore now (the command waits for vmRunning; `job show` prints it)."""
        details = self.job.details if self.job.details is not None else {}
        details["restore"] = {**(details.get("restore") or {}), **fields}
        self.job.details = details
        self.books.note(details["restore"])

    def _journal(self) -> None:
        """What runs now, for an agent's start-up reconcile (reconcile_journals)."""
        if self.journal is None:
            return
        state = {"jobId": self.job.job_id, "vm": asdict(self.vm) if self.vm is not None else None,
                 "exportPid": self.export.pid if self.export is not None else 0,
                 "created": [str(p) for p in self.created], "runDir": str(self.run_dir)}  # fmt: skip
        self.journal.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.journal.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.journal)

    def _forget(self) -> None:
        if self.journal is not None:
            self.journal.unlink(missing_ok=True)

    def _remove_created(self) -> None:
        for path in self.created:
            path.unlink(missing_ok=True)

    def _teardown(self, state: str) -> None:
        """Stop the VM and the export, remove the copy: a copy that still needs the vault is no use alone."""
        if self.live is not None:
            self.live.stop()
        elif self.vm is not None:
            self.connector.remove_new_vm(self.vm)
        self._stop_export()
        self._remove_created()
        for leftover in (*self.run_dir.glob("*.sock"), *self.run_dir.glob("export.*")):
            leftover.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.run_dir.rmdir()
        self._note(state=state, vmRunning=False)
        self.books.unregister()
        self._forget()


# ---- what a killed agent left running (service/agentinstant.py) ---------------------------------


def reconcile_journals(folder: Path) -> list[str]:
    """Stop and remove what the instant restores of a killed process left (their journals in folder):
    the VM, the export, the copy. A copy that still needs the export is no use alone, and its job
    ended agent_lost on the server, so it is not adopted."""
    done = []
    for journal in sorted(folder.glob("*.json")):
        try:
            state = json.loads(journal.read_text())
            _undo(state)
            done.append(f"instant restore job {state.get('jobId')}: its VM, export and copy stopped and removed")
        except Exception:  # logged; never keeps the agent from starting
            log.warning("reconciling the instant restore of %s failed", journal, exc_info=True)
        journal.unlink(missing_ok=True)
    return done


def _undo(state: JsonDict) -> None:
    raw = state.get("vm")
    if isinstance(raw, dict):
        vm = NewVm(**raw)
        connector = connector_for(vm.kind)
        try:
            live = connector.live_copy(vm)
            try:
                live.stop()
            finally:
                live.close()
        except VmvaultError:  # not running any more (a libvirt domain gone): its definition, if any
            with contextlib.suppress(VmvaultError):
                connector.remove_new_vm(vm)
    run_dir = Path(str(state.get("runDir") or "/nonexistent"))
    _stop_export_pid(int(state.get("exportPid") or 0), run_dir)
    for path in state.get("created") or []:
        Path(str(path)).unlink(missing_ok=True)
    for leftover in (*run_dir.glob("*.sock"), *run_dir.glob("export.*")):
        leftover.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()


def _stop_export_pid(pid: int, run_dir: Path) -> None:
    """SIGTERM the export process of this run directory (only if that pid is still it)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if pid > 0 else []
    except OSError:
        return
    if b"vmvault.recovery.nbdserver" not in cmdline or str(run_dir / "export.json").encode() not in cmdline:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        sys.exit(owner_main(sys.argv[1], sys.argv[2]))
    sys.stderr.write("usage: python -m vmvault.service.instant_restore HOME JOB_ID\n")
    sys.exit(64)

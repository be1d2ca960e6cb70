"""`vmvault agent run`: the agent on a hypervisor host (the server's side: service/agentwork.py).

The agent talks only to the server's REST API with a BackupAgent token bound to its host (never to
the catalog). It registers, reconciles what a killed agent left on its VMs (connectors' reconcile,
qemu-nbd work directories, file-recovery sessions whose owner died) before claiming anything, beats
a heartbeat in a thread, claims up to max_jobs Backup, Restore and FileRecoveryMount/Unmount jobs
of its host's VMs and runs each with the same code a server runs (backups.run_backup_into,
restores.restore_into, files._mount: service/agentfiles.py): the catalog's part goes through RemoteBooks
(REST), the vault is opened
from its storage URL with this host's key (the host unlocked the vault once with its passphrase)
and written straight to its storage. SIGTERM/SIGINT: claim nothing more, cancel the running jobs
(they end Cancelled, no point), exit 0.

Cut off from the server (ServerUnreachable: no connection, a timeout, a 502/503/504 from a proxy):
at start the agent registers again with bounded exponential backoff and jitter (Backoff) until the
server answers or SIGTERM; a refused token or API version exits at once (a human must act). While
it runs, the running jobs go on (they write straight to the vault's storage): progress reports and
claims wait on the backoff, heartbeats go on at their period (an outage logged once per backoff
step), and the VM's bookkeeping and the report of a job's end are asked again until the server
answers or the agent stops; a heartbeat that gets through wakes them (Waker). A server that failed
the job `agent_lost` meanwhile adopts the point the vault holds (agentwork.finish: the manifest is
the truth).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmvault.catalog.models import VaultRow
from vmvault.errors import Cancelled, InvalidInput, NotFound, VmvaultError
from vmvault.proc import boot_id
from vmvault.service.agentwork import API_VERSION
from vmvault.service.context import Context
from vmvault.service.jobs import PROGRESS_INTERVAL_S, Status, as_vmvault_error, end_tasks, track_tasks
from vmvault.service.paths import PathPolicy
from vmvault.service.restores import partial_tag
from vmvault.service.vaultio import opened_vault_at
from vmvault.service.views import JsonDict, empty_progress
from vmvault.service.worker import StopEvent, install_stop_signals, restore_signals
from vmvault.settings import Settings

log = logging.getLogger("vmvault")

TIMEOUT_S = 60.0
CLAIM_POLL_S = 1.0
DOMAINS_REFRESH_S = 30.0  # how often heartbeats carry the libvirt domains found (their states)
DEFAULT_MAX_JOBS = 2


PROGRESS_TIMEOUT_S = 10.0  # a progress report never holds a backup for long (it is only a report)
BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 30.0
PROXY_STATUSES = (502, 503, 504)  # a proxy or load balancer in front of a server that does not answer


class ServerUnreachable(VmvaultError):
    code = "server_unreachable"
    exit_code = 69
    http_status = 502


@dataclass
class Backoff:
    """Bounded exponential backoff with jitter: about 1 s, 2 s, 4 s ... up to 30 s between tries.

    Each delay is drawn from [base/2, base] so that many agents cut off by one outage do not all
    come back in the same second."""

    first_s: float = BACKOFF_FIRST_S
    max_s: float = BACKOFF_MAX_S
    failures: int = 0

    def next_delay(self) -> float:
        base = min(self.max_s, self.first_s * 2 ** min(self.failures, 16))
        self.failures += 1
        return random.uniform(base / 2, base)

    def reset(self) -> bool:
        """Forget the failures; True when there were some (the caller logs that the server is back)."""
        had, self.failures = self.failures > 0, 0
        return had


def check_server_url(url: str) -> str:
    """https://, or plain http:// to a loopback address only (a token must not cross a network in clear)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url.rstrip("/")
    if parts.scheme != "http" or not parts.hostname:
        raise InvalidInput(f"--server '{url}' is not an http(s) URL", hint="e.g. --server https://backup.example:8443")
    if not _loopback(parts.hostname):
        raise InvalidInput(
            f"--server '{url}' is plain http:// to {parts.hostname}, not a loopback address: the agent's token "
            "would cross the network in clear",
            hint=f"use https://{parts.netloc} (serve --tls-cert F --tls-key F on the server)",
        )
    return url.rstrip("/")


def _loopback(hostname: str) -> bool:
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | None) -> str:
    """The agent's token: the file's first line, else VMVAULT_TOKEN (never an argument: argv is public)."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as exc:
            raise InvalidInput(
                f"cannot read --token-file {token_file}: {exc.strerror}", hint="give a readable file"
            ) from None
    else:
        token = os.environ.get("VMVAULT_TOKEN", "").strip()
    if not token:
        raise InvalidInput(
            "vmvault agent run needs its token in VMVAULT_TOKEN or --token-file",
            hint="make one on the server: vmvault token create --role BackupAgent --host NAME",
        )
    return token


class Waker:
    """What the agent's retries wait on: they wake early when the agent stops or the server answers again
    (its heartbeat got through), so a report held back by an outage goes out within a heartbeat."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._answers = 0  # how many times the server came back
        self.stopped = False

    def wait(self, timeout: float) -> bool:
        """Wait up to timeout seconds; True when the agent is stopping."""
        with self._cond:
            seen = self._answers
            self._cond.wait_for(lambda: self.stopped or self._answers != seen, timeout)
            return self.stopped

    def server_back(self) -> None:
        with self._cond:
            self._answers += 1
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self._cond.notify_all()


# ---- the REST client ----------------------------------------------------------------------------


@dataclass
class AgentClient:
    server: str
    host: str
    token: str = field(repr=False)

    def call(self, path: str, body: JsonDict, timeout: float = TIMEOUT_S) -> Any:
        """POST /api/v1/agents/{host}{path}; the decoded answer (None for 204); the server's error raised
        (ServerUnreachable when no vmvault server answered)."""
        url = f"{self.server}/api/v1/agents/{urllib.parse.quote(self.host, safe='')}{path}"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
            "Accept": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise _api_error(exc, self.server) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ServerUnreachable(
                f"cannot reach the vmvault server at {self.server}: {getattr(exc, 'reason', exc)}",
                hint="check --server URL and that vmvault serve runs there",
            ) from None
        return json.loads(raw) if raw else None


def _api_error(exc: urllib.error.HTTPError, server: str) -> VmvaultError:
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if exc.code in PROXY_STATUSES and not body.get("code"):  # a proxy's page, not vmvault's answer
        return ServerUnreachable(f"the vmvault server at {server} does not answer (HTTP {exc.code} from a proxy)",
                                 hint="check that vmvault serve runs behind the proxy")  # fmt: skip
    code = str(body.get("code") or "internal_error")
    message = str(body.get("message") or f"the server answered {exc.code}")
    for cls in _subclasses(VmvaultError):
        if cls.code == code:
            return cls(message, hint=body.get("hint"), code=code)
    return VmvaultError(message, hint=body.get("hint"), code=code)


def _subclasses(cls: type[VmvaultError]) -> list[type[VmvaultError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


# ---- a job's catalog side and run side, over REST ----------------------------------------------


class RemoteBooks:
    """backups.BackupBooks over the agent API: the server's catalog, through its REST API."""

    def __init__(
        self, client: AgentClient, job_id: str, previous: str | None, floor: str | None, life: Waker | None = None
    ) -> None:
        self.client, self.job_id, self.previous, self.floor = client, job_id, previous, floor
        self.life = life or Waker()

    def previous_point_id(self) -> str | None:
        return self.previous

    def next_point_time(self) -> str:
        from vmvault.catalog.clock import later_than

        return later_than(self.floor)

    def save_vm(self, updates: dict[str, Any], disks: list[dict[str, Any]] | None = None) -> None:
        self._call(f"/jobs/{self.job_id}/vm", {"updates": updates, "disks": disks})

    def save_disk(self, name: str, values: dict[str, Any]) -> None:
        self._call(f"/jobs/{self.job_id}/disk", {"name": name, "values": values})

    def _call(self, path: str, body: JsonDict) -> None:
        """The connector's bookkeeping (a checkpoint or bitmap of the new chain) must not be lost to an
        outage: asked again with backoff until the server answers; raised only if the agent stops."""
        call_until_answered(self.client, path, body, self.life, self.job_id, "recording the VM's bookkeeping")


class AgentRun:
    """backups.BackupRun on the agent: progress (tasks per disk) sent to the server at most once a second."""

    def __init__(
        self, client: AgentClient, job_id: str, cancel: StopEvent, details: JsonDict | None,
        life: Waker | None = None,
    ) -> None:  # fmt: skip
        self.client, self.job_id, self.stopper = client, job_id, cancel
        self.life = life or Waker()  # stopped with the agent: no more retries of the end report
        self.backoff = Backoff()
        self._quiet_until = 0.0  # the server was unreachable: no progress report before then
        self.cancel: threading.Event = cancel  # with the reason of a stop (backups._cancel_reason reads it)
        self.details: JsonDict | None = json.loads(json.dumps(details)) if details else {}
        self.warnings: list[JsonDict] = []
        self.last: JsonDict = empty_progress()
        self._sent = time.monotonic()
        self._lock = threading.Lock()

    def progress(self, progress: Any) -> None:
        from vmvault.service.jobs import progress_dict

        with self._lock:
            previous, self.last = self.last, progress_dict(progress)
            track_tasks(self.details, previous, self.last, progress)
            now = time.monotonic()
            if now - self._sent < PROGRESS_INTERVAL_S or now < self._quiet_until:
                return
            self._sent = now
            body = {"progress": dict(self.last), "details": _sendable(self.details)}
        try:
            answer = self.client.call(f"/jobs/{self.job_id}/progress", body, timeout=PROGRESS_TIMEOUT_S)
        except ServerUnreachable as exc:  # the job goes on: it writes straight to the vault's storage
            delay = self.backoff.next_delay()
            self._quiet_until = time.monotonic() + delay
            log.warning("job %s: progress not reported (%s); the job goes on, next report in %.0f s",
                        self.job_id, exc.message, delay)  # fmt: skip
            return
        except VmvaultError as exc:  # the server decides: a job it ended (agent_lost) is stopped here
            if exc.code == "busy" or exc.code == "not_found":
                self.stopper.stop(f"the server ended job {self.job_id}")
            log.warning("job %s: progress not recorded: %s", self.job_id, exc)
            return
        if self.backoff.reset():
            log.info("job %s: the server answers again", self.job_id)
        if answer and answer.get("cancel"):
            self.stopper.stop("the job was cancelled")


def _sendable(details: JsonDict | None) -> JsonDict:
    return {k: v for k, v in (details or {}).items() if k in ("tasks", "quiesce", "storageRetries")}


# ---- the agent ----------------------------------------------------------------------------------


@dataclass
class Agent:
    settings: Settings
    client: AgentClient
    max_jobs: int = DEFAULT_MAX_JOBS
    paths: PathPolicy | None = None  # where the server may point this agent (agent run --allow-disks)
    running: dict[str, StopEvent] = field(default_factory=dict)
    heartbeat_s: float = 3.0
    local: Context | None = None  # this home's own catalog: the file-recovery sessions of this host
    _stop: StopEvent = field(default_factory=StopEvent)
    waker: Waker = field(default_factory=Waker)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, on_ready: Any = None) -> int:
        if self.max_jobs < 1:
            raise InvalidInput(f"--max-jobs must be at least 1 (got {self.max_jobs})", hint="e.g. --max-jobs 2")
        from vmvault.service import agentfiles, agentinstant
        from vmvault.service.context import open_context

        self.local = open_context(self.settings)
        previous = install_stop_signals(self.request_stop, "the agent")  # also while it waits for the server
        try:
            agentfiles.reconcile(self.local)  # before registering: the server learns the live ones
            agentinstant.reconcile(self.settings)  # a killed agent's instant restores: stopped, removed
            answer = self._register_until_answered()
            if answer is None:
                log.info("stopping before the server answered: %s", self._stop.reason)
                return 0
            self.heartbeat_s = float(answer.get("heartbeatSeconds") or self.heartbeat_s)
            log.info("agent of host %s registered with %s", self.client.host, self.client.server)
            reconcile_leftovers(self.settings, list(answer.get("vms") or []))
            return self._serve(on_ready)
        finally:
            restore_signals(previous)
            self.local.close()

    def _serve(self, on_ready: Any) -> int:
        beat = threading.Thread(target=self._heartbeat_loop, name="vmvault-agent-heartbeat", daemon=True)
        beat.start()
        if on_ready is not None:
            on_ready(self)
        self._claim_loop()
        log.info("stopping: %s", self._stop.reason)
        with self._lock:
            for event in self.running.values():
                event.stop(self._stop.reason)
        for thread in list(self._threads):
            thread.join(120.0)
        return 0

    def request_stop(self, reason: str) -> None:
        self._stop.stop(reason)
        self.waker.stop()

    def _register_until_answered(self) -> JsonDict | None:
        """Register; a server that does not answer is asked again with backoff until it does or the agent
        is stopped (None). A refusal (token, API version, host name) is raised: it needs a human."""
        backoff = Backoff()
        while True:
            try:
                answer: JsonDict = self.client.call("/register", self._registration())
                return answer
            except VmvaultError as exc:
                if not isinstance(exc, ServerUnreachable) and exc.http_status < 500:
                    raise  # refused (token, API version, host name): a human must act
                delay = backoff.next_delay()  # unreachable, or in trouble (its catalog down): it may answer later
                log.warning("registering with the server failed (%s); try %d, next in %.1f s",
                            exc.message, backoff.failures, delay)  # fmt: skip
            if self._stop.wait(delay):
                return None

    def _registration(self) -> JsonDict:
        from vmvault.service.agentfiles import reports
        from vmvault.service.hosts import version

        # Its file-recovery sessions after reconciling (live, and those just ended): the complete list.
        return {"version": version(), "apiVersion": API_VERSION, "bootId": boot_id(), "pid": os.getpid(),
                "hypervisors": hypervisors_found(),
                "fileSessions": reports(self.local) if self.local else None}  # fmt: skip

    def _claim_loop(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            with self._lock:
                free = self.max_jobs - len(self.running)
            package, wait = None, CLAIM_POLL_S
            if free > 0:
                try:
                    package = self.client.call("/claim", {"pid": os.getpid()}).get("package")
                    if backoff.reset():
                        log.info("the server at %s answers again", self.client.server)
                except ServerUnreachable as exc:  # running jobs go on; claims wait for the server
                    wait = backoff.next_delay()
                    log.warning("claiming a job failed (%s); next try in %.1f s", exc.message, wait)
                except VmvaultError as exc:
                    log.warning("claiming a job failed: %s", exc)
            if package is None:
                if wait > CLAIM_POLL_S:  # the server did not answer: wait for the next try, or for it to answer
                    self.waker.wait(wait)
                else:
                    self._stop.wait(wait)
                continue
            self._start(package)

    def _start(self, package: JsonDict) -> None:
        job_id = str(package["jobId"])
        cancel = StopEvent()
        with self._lock:
            self.running[job_id] = cancel
        thread = threading.Thread(target=self._run_job, args=(package, cancel), name=f"vmvault-agent-{job_id[:8]}",
                                  daemon=True)  # fmt: skip
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _run_job(self, package: JsonDict, cancel: StopEvent) -> None:
        from vmvault.logs import job_context

        job_id = str(package["jobId"])
        try:
            with job_context(job_id, str(package["vm"]["name"])):
                run_package(self.settings, self.client, package, cancel, self.paths, self.local, life=self.waker)
        except Exception:
            log.exception("job %s crashed the agent's worker", job_id)
        finally:
            with self._lock:
                self.running.pop(job_id, None)

    def _heartbeat_loop(self) -> None:
        quiet, next_log = Backoff(), 0.0  # an outage is logged once per backoff step, not every beat
        looked = time.monotonic()
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                running = list(self.running)
            body: JsonDict = {"running": running}
            if time.monotonic() - looked >= DOMAINS_REFRESH_S:  # a live migration moves a domain between hosts
                looked = time.monotonic()
                body["hypervisors"] = hypervisors_found() or None
            try:
                body["fileSessions"] = self._sessions()
                answer = self.client.call("/heartbeat", body)
            except NotFound:  # the host was removed while this agent was away: register it again
                self._register_again()
                continue
            except ServerUnreachable as exc:  # the running jobs go on; beats go on at their period
                if time.monotonic() >= next_log:
                    next_log = time.monotonic() + quiet.next_delay()
                    log.warning("heartbeat failed (%s); running jobs go on", exc.message)
                continue
            except VmvaultError as exc:
                log.warning("heartbeat failed: %s", exc)
                continue
            if quiet.reset():
                next_log = 0.0
                log.info("heartbeat: the server at %s answers again", self.client.server)
                self.waker.server_back()  # held-back reports and claims go out now
            with self._lock:
                for job_id in answer.get("cancel") or []:
                    if job_id in self.running:
                        self.running[job_id].stop("the job was cancelled or ended by the server")
            if answer.get("endSessions") and self.local is not None:
                from vmvault.service.agentfiles import end_sessions

                # Unmounting may take a while: never in the way of the next heartbeat.
                threading.Thread(target=end_sessions, args=(self.local, list(answer["endSessions"])),
                                 name="vmvault-agent-unmount", daemon=True).start()  # fmt: skip

    def _sessions(self) -> list[JsonDict] | None:
        from vmvault.service.agentfiles import reports

        if self.local is None:
            return None
        try:
            return reports(self.local)
        except Exception:  # the local catalog busy: the next heartbeat reports them
            log.warning("listing this host's file-recovery sessions failed", exc_info=True)
            return None

    def _register_again(self) -> None:
        try:
            self.client.call("/register", self._registration())
            log.info("agent of host %s registered again", self.client.host)
        except VmvaultError as exc:
            log.warning("registering again failed: %s", exc)



def run_package(
    settings: Settings, client: AgentClient, package: JsonDict, cancel: StopEvent, paths: PathPolicy | None = None,
    local: Context | None = None, life: Waker | None = None,
) -> str:  # fmt: skip
    """Run one claimed Backup (or Restore) job with the server's engine and connector code; report how it ended.

    paths: the host's allowed disk roots; a work package naming a disk image or a QMP socket outside
    them fails (the server is not trusted to read any file of this host into a vault). life: set when
    the agent stops (the report of the job's end is retried until the server answers or then)."""
    from vmvault.service.backups import BackupPlan, run_backup_into

    if package.get("operation") == "Restore":
        return run_restore_package(settings, client, package, cancel, paths, life)
    if package.get("operation") in ("FileRecoveryMount", "FileRecoveryUnmount"):
        return run_files_package(settings, client, package, cancel, paths, local, life)
    from vmvault.service.vaultio import opened_vault_at

    job_id, vm = str(package["jobId"]), package["vm"]
    vault_info = package["vault"]
    vault_row = VaultRow(name=str(vault_info["name"]), uuid=str(vault_info["uuid"]),
                         storage_dir=str(vault_info["storage"]))  # fmt: skip
    plan = BackupPlan(str(vm["id"]), str(vm["name"]), vault_row, list(vm["disks"]), dict(vm["definition"]),
                      str(package["retainUntil"]))  # fmt: skip
    run = AgentRun(client, job_id, cancel, package.get("details"), life)
    books = RemoteBooks(client, job_id, package.get("previousPoint"), package.get("pointTimeFloor"), life)
    try:
        if paths is not None:
            _check_paths(paths, plan)
        plan = _described(plan, str(vm.get("kind") or ""), books)
        with opened_vault_at(settings, vault_row) as vault:
            manifest = run_backup_into(vault, plan, job_id, run, books, _budget(package), str(settings.home))
    except Exception as exc:
        return _report_failure(client, run, exc)
    end_tasks(run.details, Status.COMPLETED)
    _finish(run, {"status": Status.COMPLETED, "recoveryPoint": manifest.rp_id, "warnings": run.warnings,
                             "progress": run.last, "details": _sendable(run.details)})  # fmt: skip
    log.info("job %s: backup of %s published point %s", job_id, plan.vm_name, manifest.rp_id)
    return Status.COMPLETED


def run_restore_package(
    settings: Settings, client: AgentClient, package: JsonDict, cancel: StopEvent, paths: PathPolicy | None,
    life: Waker | None = None,
) -> str:  # fmt: skip
    """Run one claimed Restore job (restore disks of a VM of this host) with the same code as a local
    restore (restores.restore_into); the files are written here, in this host's allowed restore roots."""
    from vmvault.service.restores import restore_into

    if package["restore"].get("mode") == "vm" and package["restore"].get("instant"):
        from vmvault.service.agentinstant import run_instant_package

        return run_instant_package(settings, client, package, cancel, paths, life)
    if package["restore"].get("mode") == "vm":
        return run_new_vm_package(settings, client, package, cancel, paths, life)
    if package["restore"].get("mode") == "replace":
        return run_replace_package(settings, client, package, cancel, paths, life)
    job_id = str(package["jobId"])
    run = AgentRun(client, job_id, cancel, package.get("details"), life)
    try:
        plan, recheck = _restore_plan(package, paths)
        # Partial files are not recorded on the server (its reaper would look for them on its own host).
        with opened_vault_at(settings, plan.vault) as vault:
            written = restore_into(vault, plan, run, recheck, lambda _d: partial_tag(job_id))
    except Exception as exc:
        return _report_failure(client, run, exc)
    _finish(run, {"status": Status.COMPLETED, "files": [str(p) for p in written], "progress": run.last,
                  "details": _sendable(run.details)})  # fmt: skip
    log.info("job %s: restored %s into %s", job_id, package["vm"]["name"], plan.target_dir)
    return Status.COMPLETED


def run_new_vm_package(
    settings: Settings, client: AgentClient, package: JsonDict, cancel: StopEvent, paths: PathPolicy | None,
    life: Waker | None = None,
) -> str:  # fmt: skip
    """Run one claimed restore as a new VM of this host with the same code as a server's
    (restore_vm.build_new_vm): disks in this host's allowed restore roots, the copy defined on this
    host's hypervisor; the server registers it (as a VM of this host) when it reads the report."""
    from vmvault.service.restore_vm import build_new_vm, plan_on_host, start_if_asked

    job_id = str(package["jobId"])
    run = AgentRun(client, job_id, cancel, package.get("details"), life)
    try:
        target, recheck = _restore_target(package, paths)
        plan = plan_on_host(package, target)
        with opened_vault_at(settings, plan.vault) as vault:
            view, new_vm = build_new_vm(vault, plan, run, recheck, lambda _d: partial_tag(job_id),
                                        lambda vm: {**vm.view, "started": False})  # fmt: skip
        view = start_if_asked(plan, new_vm, view)
    except Exception as exc:
        return _report_failure(client, run, exc)
    report = {"kind": new_vm.kind, "disks": new_vm.disks, "definition": new_vm.definition, "files": new_vm.files,
              "view": new_vm.view, "started": bool(view.get("started"))}  # fmt: skip
    written = [str(p) for p in plan.disk_files] + list(new_vm.files)
    _finish(run, {"status": Status.COMPLETED, "newVm": report, "files": written, "progress": run.last,
                  "details": _sendable(run.details)})  # fmt: skip
    log.info("job %s: restored %s as new VM %s in %s", job_id, plan.vm_name, plan.new_name, plan.target_dir)
    return Status.COMPLETED


def run_replace_package(
    settings: Settings, client: AgentClient, package: JsonDict, cancel: StopEvent, paths: PathPolicy | None,
    life: Waker | None = None,
) -> str:  # fmt: skip
    """Run one claimed replace-disks of a VM of this host with the same code as a server's
    (restore_vm.swap_point_disks): only disks in this host's allowed disk roots (plan_replace_on_host),
    the new images staged beside them; then the connector forgets its tracking here (checkpoints)."""
    from vmvault.connectors.registry import connector_for
    from vmvault.service.restore_vm import plan_replace_on_host, point_disks_into, swap_point_disks

    job_id, vm = str(package["jobId"]), package["vm"]
    run = AgentRun(client, job_id, cancel, package.get("details"), life)
    try:
        plan, recheck = plan_replace_on_host(package, paths)
        with opened_vault_at(settings, plan.vault) as vault:

            def restore_one(stage: Path, fmt: str, name: str) -> tuple[Any, list[Path]]:
                return point_disks_into(vault, plan.rp_id, stage, fmt, [name], run, None,
                                        lambda _d: partial_tag(job_id))  # fmt: skip

            replaced = swap_point_disks(plan, restore_one, recheck)
        connector_for(str(vm["kind"])).disks_replaced(plan.vm_id, dict(vm.get("definition") or {}))
    except Exception as exc:
        return _report_failure(client, run, exc)
    _finish(run, {"status": Status.COMPLETED, "progress": run.last, "details": _sendable(run.details)})
    log.info("job %s: replaced the disks of %s with point %s: %s", job_id, plan.vm_name, plan.rp_id,
             ", ".join(replaced))  # fmt: skip
    return Status.COMPLETED


def run_files_package(
    settings: Settings, client: AgentClient, package: JsonDict, cancel: StopEvent, paths: PathPolicy | None,
    local: Context | None, life: Waker | None = None,
) -> str:  # fmt: skip
    """Run one claimed FileRecoveryMount/Unmount job here (service/agentfiles.py), in this home's own
    catalog; the sessions are reported to the server with the job's end."""
    from vmvault.service import agentfiles
    from vmvault.service.context import open_context

    job_id = str(package["jobId"])
    run = AgentRun(client, job_id, cancel, package.get("details"), life)
    ctx = local or open_context(settings)
    try:
        if package["operation"] == "FileRecoveryMount":
            sessions = [agentfiles.mount(ctx, package, paths)]
        else:
            sessions = agentfiles.unmount(ctx, package)
    except Exception as exc:
        return _report_failure(client, run, exc)
    finally:
        if local is None:
            ctx.close()
    _finish(run, {"status": Status.COMPLETED, "sessions": sessions})
    log.info("job %s: %s of %s done", job_id, package["operation"], package["vm"]["name"])
    return Status.COMPLETED


def _restore_target(package: JsonDict, paths: PathPolicy | None) -> tuple[Path, Any]:
    """The restore's target on this host, checked against this host's restore roots and the disks of
    its VMs (before anything is written), and the recheck just before writing."""
    from vmvault.errors import PathNotAllowed
    from vmvault.service.paths import Rule, disk_owners, recheck_dir_in
    from vmvault.service.restores import check_target_on_host

    asked, vm_name = package["restore"], str(package["vm"]["name"])
    target = Path(str(asked["targetDir"]))
    if paths is not None:
        try:
            target = paths.check(Rule.RESTORES, target)
        except PathNotAllowed as exc:
            raise PathNotAllowed(
                f"{exc.message} on host of VM '{vm_name}'",
                hint="restore under one of this host's restore roots, or allow its folder on this host: vmvault "
                "agent run --allow-restores DIR (or allow-restores in the agent's HOME/settings.toml)",
            ) from None
    owners = disk_owners((str(d.get("vm")), [str(p) for p in d.get("paths") or []])
                         for d in package.get("hostDisks") or [])  # fmt: skip
    check_target_on_host(target, [str(f) for f in asked.get("files") or []], bool(asked.get("force")), owners)
    return target, lambda d: recheck_dir_in(paths, Rule.RESTORES, d)


def _restore_plan(package: JsonDict, paths: PathPolicy | None) -> tuple[Any, Any]:
    """The restore's plan on this host, its target checked (_restore_target), and the recheck."""
    from vmvault.service.restores import RestorePlan

    target, recheck = _restore_target(package, paths)
    asked, vm_name = package["restore"], str(package["vm"]["name"])
    disks, fmt = asked.get("disks"), asked.get("format")
    info = package["vault"]
    row = VaultRow(name=str(info["name"]), uuid=str(info["uuid"]), storage_dir=str(info["storage"]))
    plan = RestorePlan(vm_name, str(asked["recoveryPoint"]), row, target, str(fmt) if fmt else None,
                       bool(asked.get("force")), [str(d) for d in disks] if disks else None)  # fmt: skip
    return plan, recheck


def _check_paths(paths: PathPolicy, plan: Any) -> None:
    """Disk images and QMP sockets named by the server lie in this host's allowed disk roots."""
    from vmvault.errors import PathNotAllowed
    from vmvault.service.paths import Rule

    named = [str(d.get("path") or "") for d in plan.disks if d.get("path")]
    named += [str(plan.definition[k]) for k in ("qmp", "guestAgent") if plan.definition.get(k)]
    for path in named:
        try:
            paths.check(Rule.DISKS, path)
        except PathNotAllowed as exc:
            raise PathNotAllowed(
                f"{exc.message} on host of VM '{plan.vm_name}'",
                hint="allow its folder on this host: vmvault agent run --allow-disks DIR (or allow-disks in the "
                "agent's HOME/settings.toml)",
            ) from None


def _described(plan: Any, kind: str, books: RemoteBooks) -> Any:
    """A VM added with `vm add --host --qmp|--libvirt`: described here, on its host, before its first backup."""
    from dataclasses import replace

    from vmvault.service.backups import _check_disks
    from vmvault.service.hostvms import DESCRIBE_ON_HOST, described_on_host

    if not plan.definition.get(DESCRIBE_ON_HOST):
        return plan
    disks, definition = described_on_host(plan.definition, kind, books.save_vm)
    disks = [{**d, "name": str(d["name"]), "path": str(d.get("path") or "")} for d in disks]
    _check_disks(plan.vm_name, disks)
    return replace(plan, disks=disks, definition=definition)


def _report_failure(client: AgentClient, run: AgentRun, exc: Exception) -> str:
    """How a job's work ended without success, reported once: Cancelled, or Failed with its error."""
    if isinstance(exc, Cancelled):
        return _report_end(client, run, Status.CANCELLED, exc)
    if not isinstance(exc, VmvaultError):
        log.debug("job %s failed unexpectedly", run.job_id, exc_info=True)
    return _report_end(client, run, Status.FAILED, as_vmvault_error(exc))


def _report_end(client: AgentClient, run: AgentRun, status: str, exc: VmvaultError) -> str:
    end_tasks(run.details, status)
    log.warning("job %s ended %s: %s", run.job_id, status, exc)
    _finish(run, {"status": status, "error": exc.to_dict(), "progress": run.last,
                                 "details": _sendable(run.details)})  # fmt: skip
    return status


def _finish(run: AgentRun, body: JsonDict) -> None:
    """Report the job's end. A server that does not answer is asked again with backoff until it does or
    the agent stops (a point already published is then recorded, or adopted by a server that failed
    the job `agent_lost` meanwhile); any other refusal (the job ended there) is logged."""
    try:
        call_until_answered(run.client, f"/jobs/{run.job_id}/finish", body, run.life, run.job_id,
                            f"reporting its end ({body.get('status')})")  # fmt: skip
    except ServerUnreachable:
        log.warning("job %s: the agent stopped before the server heard of the job's end; a point it "
                    "published is adopted by the server at the next contact", run.job_id)  # fmt: skip
    except VmvaultError as exc:  # ended there already (cancelled, refused): nothing to redo
        log.warning("job %s: its end was not recorded: %s", run.job_id, exc)


def call_until_answered(client: AgentClient, path: str, body: JsonDict, life: Waker, job_id: str, what: str) -> Any:
    """POST path until the server answers, with backoff; its answer. ServerUnreachable is raised only
    when the agent stops meanwhile; any other refusal at once."""
    backoff = Backoff()
    while True:
        try:
            return client.call(path, body)
        except ServerUnreachable as exc:
            delay = backoff.next_delay()
            log.warning("job %s: %s failed (%s); try %d, next in %.1f s", job_id, what, exc.message,
                        backoff.failures, delay)  # fmt: skip
            if life.wait(delay):
                raise


def _budget(package: JsonDict) -> Any:
    from vmvault.connectors.contract import Budget

    raw = package.get("budget") or {}
    return Budget(freeze_s=float(raw.get("freezeS") or 10.0), frozen_s=float(raw.get("frozenS") or 10.0),
                  crash_only=bool(raw.get("crashOnly")))  # fmt: skip


# ---- start-up: what this host has -------------------------------------------------------------


LIBVIRT_SOCKET = "/run/libvirt/libvirt-sock"
LIBVIRT_URI = "qemu:///system"  # connectors/libvirt/domain.py DEFAULT_URI (not imported: no libvirt binding needed)
DISCOVER_TIMEOUT_S = 10.0


def hypervisors_found() -> JsonDict:
    """What the agent finds on its host, for `host show` and `vm discover --host`: libvirt (when its
    socket is there) and its domains."""
    if not os.path.exists(LIBVIRT_SOCKET):
        return {}
    return {"libvirtUri": LIBVIRT_URI, "libvirtDomains": _libvirt_domains(LIBVIRT_URI)}


def _libvirt_domains(uri: str) -> list[JsonDict]:
    """The domains at uri (name, uuid, state); bounded in time: a stuck libvirtd never holds the start."""
    from vmvault.connectors.registry import connector_for
    from vmvault.service.vms import KIND_LIBVIRT

    found: list[JsonDict] = []

    def probe() -> None:
        try:
            domains = connector_for(KIND_LIBVIRT).discover(uri)
            found.extend({k: d.get(k) for k in ("name", "uuid", "state")} for d in domains)
        except Exception as exc:  # no libvirt python binding, libvirtd refusing: nothing found
            log.info("libvirt domains at %s not listed: %s", uri, exc)

    thread = threading.Thread(target=probe, name="vmvault-agent-discover", daemon=True)
    thread.start()
    thread.join(DISCOVER_TIMEOUT_S)
    return list(found) if not thread.is_alive() else []


def reconcile_leftovers(settings: Settings, vms: list[JsonDict]) -> list[str]:
    """Before claiming: undo what a killed agent left on this host's VMs (as `serve` does at its start).

    Checkpoints are left alone (latest_known False: the agent does not read the server's points at
    start); fleece overlays, libvirt backup jobs and scratch files are the connectors' to remove, and
    the qemu-nbd work directories of dead processes are removed.
    """
    from vmvault.connectors.contract import LeftoverVm
    from vmvault.connectors.registry import connector_for, images

    done: list[str] = []
    try:
        images().remove_dead_work_dirs()
        for kind in dict.fromkeys(str(v.get("kind")) for v in vms):
            connector = connector_for(kind)
            if connector.capabilities().changed_blocks != "checkpoints":
                continue
            leftovers = [LeftoverVm(str(v["id"]), str(v["name"]), dict(v.get("definition") or {}), None, False)
                         for v in vms if v.get("kind") == kind]  # fmt: skip
            done += connector.reconcile(str(settings.home), leftovers)
    except Exception:  # logged; never keeps the agent from starting (the next backup reconciles again)
        log.warning("reconciling leftovers of backups on this host's VMs failed", exc_info=True)
    for line in done:
        log.info("reconciled: %s", line)
    return done

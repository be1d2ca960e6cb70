"""`vmvault serve`: the scheduler, a pool of workers and a small status endpoint in one process.

- Workers claim queued jobs (owner_pid 0) by a conditional update in a BEGIN IMMEDIATE
  transaction (PostgreSQL: SELECT ... FOR UPDATE SKIP LOCKED, and LISTEN/NOTIFY wakes them:
  service/wakeup.py), so a job is run by exactly one process; they record their pid, boot id and
  process start time, and beat the job's heartbeat while it runs.
- One `serve` per home: it holds an exclusive flock on HOME/serve.lock for its whole life and
  writes its pid and address there. `backup now` queues to it while the lock is held; a killed
  service releases the lock with its last file descriptor, and its running jobs are failed by the
  next process that opens the catalog (jobs.reap_dead_jobs).
- A maintenance thread runs the Retention job (and garbage collection after it) once a day.
- Several serves on one PostgreSQL catalog: only the leader (service/leader.py) schedules and
  runs maintenance; all serve the API and run jobs.
- SIGTERM (or SIGINT): the scheduler stops, no new job is claimed, running jobs are cancelled
  (they end Cancelled and leave no recovery point), then the process exits 0. Queued jobs
  stay queued for the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import JobRow
from vmvault.errors import Busy, InvalidInput
from vmvault.logs import job_context
from vmvault.proc import boot_id
from vmvault.service import hosts
from vmvault.service.context import Context
from vmvault.service.jobs import Operation, owner_fields
from vmvault.service.leader import Leadership
from vmvault.service.paths import PathPolicy
from vmvault.service.tls import TlsFiles
from vmvault.service.wakeup import Wakeup
from vmvault.settings import DEFAULT_LISTEN, DEFAULT_WORKERS, Settings

log = logging.getLogger("vmvault")

POLL_S = 0.5
QUEUED_OPERATIONS = (Operation.BACKUP,)


class StopEvent(threading.Event):
    """A cancel event that says why it was set (shown in the Cancelled job's error)."""

    reason: str = ""

    def stop(self, reason: str) -> None:
        self.reason = reason
        self.set()


# ---- one service per home -----------------------------------------------------------------------


def service_info(settings: Settings) -> dict[str, Any] | None:
    """The running `vmvault serve` of this home ({pid, listen, ...}), or None."""
    path = settings.serve_lock_path
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info: dict[str, Any] = json.loads(f.read() or "{}")
            except ValueError:
                info = {}
            return info
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def service_running(ctx: Context) -> bool:
    """A `vmvault serve` will run queued jobs: this home's (serve.lock), or on a shared PostgreSQL
    catalog any Online server host (service/hosts.py), wherever it runs."""
    if service_info(ctx.settings) is not None:
        return True
    return ctx.catalog.shared and hosts.server_online(ctx)


@contextlib.contextmanager
def service_lock(settings: Settings, info: dict[str, Any]) -> Iterator[TextIO]:
    """Hold HOME/serve.lock for the life of the service; Busy if another service holds it."""
    settings.home.mkdir(parents=True, exist_ok=True)
    f = open(settings.serve_lock_path, "a+", encoding="utf-8")  # noqa: SIM115 (closed below)
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = service_info(settings) or {}
            raise Busy(
                f"vmvault serve is already running for {settings.home} (pid {other.get('pid', '?')})",
                hint="stop it first (kill -TERM PID), or give this one another --home",
            ) from None
        write_lock_info(f, info)
        yield f
    finally:
        f.close()


def write_lock_info(f: TextIO, info: dict[str, Any]) -> None:
    f.seek(0)
    f.truncate()
    f.write(json.dumps(info))
    f.flush()


# ---- workers ------------------------------------------------------------------------------------


@dataclass
class WorkerPool:
    """N threads, each running one claimed job at a time."""

    ctx: Context
    workers: int = DEFAULT_WORKERS
    poll_s: float = POLL_S
    running: dict[str, StopEvent] = field(default_factory=dict)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    wakeup: Wakeup | None = None

    def start(self) -> None:
        self.wakeup = Wakeup(self.ctx.catalog, self.poll_s)
        self.wakeup.start()
        for i in range(self.workers):
            thread = threading.Thread(target=self._loop, name=f"vmvault-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, reason: str, timeout: float = 120.0) -> None:
        """Claim nothing more, cancel what runs, wait for the workers to record how their jobs ended."""
        self._stopping.set()
        with self._lock:
            for event in self.running.values():
                event.stop(reason)
        if self.wakeup is not None:
            self.wakeup.stop()
        for thread in self._threads:
            thread.join(timeout)

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self.running)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                job = claim_next(self.ctx)
            except Exception:
                log.exception("claiming a job failed")
                job = None
            if job is None:
                if self.wakeup is not None:
                    self.wakeup.wait(self._stopping)
                else:
                    self._stopping.wait(self.poll_s)
                continue
            self._run(job)

    def _run_logged(self, job: JobRow, cancel: StopEvent) -> None:
        from vmvault.service import backups

        log.info("job %s: %s of %s started", job.id, job.operation, job.vm)
        try:
            outcome = backups.run_claimed_backup(self.ctx, job, cancel=cancel)
            log.info("job %s: %s of %s ended %s", job.id, job.operation, job.vm, outcome.job["status"])
        except Exception:
            log.exception("job %s crashed the worker", job.id)

    def _run(self, job: JobRow) -> None:

        cancel = StopEvent()
        with self._lock:
            self.running[job.id] = cancel
            if self._stopping.is_set():
                cancel.stop("the service was stopping")
        try:
            with job_context(job.id, job.vm):  # every line of the job names it (--log-format json)
                self._run_logged(job, cancel)
        finally:
            with self._lock:
                self.running.pop(job.id, None)


def claim_next(ctx: Context) -> JobRow | None:
    """Claim the oldest queued job for this process; None when there is none.

    A read first (idle workers take no write lock), then one short transaction: lock the oldest
    queued row (PostgreSQL: FOR UPDATE SKIP LOCKED, so the workers of several servers never wait
    for or take the same job; SQLite: BEGIN IMMEDIATE), then record this process as its owner.
    catalog.update() does not take the catalog-wide write lock.
    """
    here = hosts.local_host_name()  # never the jobs of VMs of another host: that host's agent runs them
    with ctx.catalog.read() as s:  # idle workers look without taking SQLite's write lock
        if not repos.queued_jobs(s, QUEUED_OPERATIONS, server=here):
            return None
    with ctx.catalog.update() as s:
        job = repos.lock_next_queued(s, QUEUED_OPERATIONS, server=here)
        if job is None:
            return None
        details = {**(job.details or {}), **owner_fields(), "claimedAt": now_iso()}
        if not repos.claim_job(s, job.id, os.getpid(), boot_id(), details):
            return None  # ended (cancelled) between the two statements: try again next round
        s.refresh(job)
        return job


# ---- status endpoint ----------------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int] | None:
    """HOST:PORT (PORT 0 = any free port), or "none" for no endpoint."""
    if listen.lower() in ("none", "off", ""):
        return None
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidInput(f"'{listen}' is not HOST:PORT", hint="e.g. --listen 127.0.0.1:8080 (port 0: any free port)")
    return host or "127.0.0.1", int(port)


class _StatusHandler(BaseHTTPRequestHandler):
    server: _StatusServer

    def do_GET(self) -> None:
        if self.path.rstrip("/") not in ("/healthz", ""):
            self.send_error(404, "only GET /healthz is served (the API comes later)")
            return
        data = json.dumps({"status": "ok"}).encode()  # no tokens here: up or down, no pid, home or jobs
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("status endpoint: " + format, *args)


class _StatusServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: Service) -> None:
        super().__init__(address, _StatusHandler)
        self.service = service

    def status(self) -> dict[str, Any]:
        return self.service.status()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# ---- the service --------------------------------------------------------------------------------


@dataclass
class Service:
    ctx: Context
    workers: int = DEFAULT_WORKERS
    listen: str = DEFAULT_LISTEN
    tick_s: float = 1.0
    retention_every_s: float = 24 * 3600.0  # 0: never run the Retention job from the service
    started: str = field(default_factory=now_iso)
    address: str | None = None
    pool: WorkerPool | None = None
    api: bool = True  # serve the REST API on the endpoint (else only GET /healthz)
    paths: PathPolicy | None = None  # allowed roots of API paths (None: HOME/settings.toml or the defaults)
    metrics_listen: str | None = None  # HOST:PORT of an open GET /metrics (serve --metrics-address)
    metrics_address: str | None = None
    verify_days: int = 0  # scheduled verification period in days (serve --verify-every); 0: off
    min_free_percent: float | None = None  # vault free-space alerts below this % (serve --space-alert-below)
    leadership: Leadership | None = None  # who schedules (service/leader.py); set by run()
    tls: TlsFiles | None = None  # HTTPS for the API and portal (serve --tls-cert/--tls-key), checked before run()
    schedule_jitter_s: float = 0.0  # one slot's scheduled starts spread over these seconds (serve --schedule-jitter)
    _stop: StopEvent = field(default_factory=StopEvent)

    def status(self) -> dict[str, Any]:
        with self.ctx.catalog.read() as s:
            queued = len(repos.queued_jobs(s, QUEUED_OPERATIONS))
        return {
            "status": "ok",
            "pid": os.getpid(),
            "home": str(self.ctx.settings.home),
            "started": self.started,
            "workers": self.workers,
            "leader": self.leadership.is_leader if self.leadership is not None else False,
            "runningJobs": self.pool.running_ids() if self.pool is not None else [],
            "queuedJobs": queued,
        }

    def _http_server(self, endpoint: tuple[str, int]) -> Any:
        """The REST API (vmvault.api, uvicorn) with GET /healthz; only the status endpoint with api=False."""
        if not self.api:
            if self.tls is not None:
                raise InvalidInput("--tls-cert needs the API endpoint", hint="leave out --tls-cert/--tls-key")
            return _StatusServer(endpoint, self)
        from vmvault.api.server import ApiServer

        return ApiServer(endpoint, self.ctx, self.status, self.paths, self.tls)

    def _metrics_server(self) -> Any:
        """prometheus_client's own HTTP server on --metrics-address (no token: the admin chose who reaches it)."""
        endpoint = parse_listen(self.metrics_listen) if self.metrics_listen else None
        if endpoint is None:
            return None
        from prometheus_client import start_http_server

        from vmvault.service.metrics import registry_for

        host, port = endpoint
        try:
            server, _thread = start_http_server(port, addr=host, registry=registry_for(self.ctx))
        except OSError as exc:
            raise Busy(
                f"cannot serve metrics on {host}:{port}: {exc.strerror}", hint="choose another --metrics-address"
            ) from None
        bound = server.server_address
        self.metrics_address = f"http://{bound[0]!s}:{bound[1]}"
        return server

    def request_stop(self, reason: str) -> None:
        self._stop.stop(reason)

    def run(self, on_ready: Any = None) -> int:
        """Serve until SIGTERM/SIGINT (or request_stop); returns the exit code."""
        from vmvault.service.replication import Replicator
        from vmvault.service.scheduler import Maintenance, Scheduler

        if self.workers < 1:
            raise InvalidInput(f"--workers must be at least 1 (got {self.workers})", hint="e.g. --workers 2")
        endpoint = parse_listen(self.listen)
        info = {"pid": os.getpid(), "bootId": boot_id(), "started": self.started, "workers": self.workers}
        with service_lock(self.ctx.settings, info) as lock_file:
            http = self._http_server(endpoint) if endpoint else None
            if http is not None:
                host, port = http.server_address[:2]
                scheme = "https" if self.tls is not None else "http"
                self.address = f"{scheme}://{_url_host(str(host))}:{port}"
                threading.Thread(target=http.serve_forever, name="vmvault-http", daemon=True).start()
            metrics_http = self._metrics_server()
            info = {**info, "listen": self.address}
            pool = self.pool = WorkerPool(self.ctx, self.workers)
            leadership = self.leadership = Leadership(
                self.ctx.catalog, on_change=lambda leader: write_lock_info(lock_file, {**info, "leader": leader})
            )
            write_lock_info(lock_file, {**info, "leader": leadership.is_leader})
            scheduler = Scheduler(
                self.ctx,
                self.tick_s,
                self.min_free_percent,
                leadership,
                heartbeat=lambda: hosts.heartbeat_server(self.ctx, self.address),
                jitter_s=self.schedule_jitter_s,
            )
            maintenance = Maintenance(
                self.ctx, self.retention_every_s, verify_days=self.verify_days, leadership=leadership
            )
            # GRS vaults, every VMVAULT_GRS_INTERVAL seconds; each vault under its own lease, so
            # several servers on one catalog never replicate a vault twice at once.
            replicator = Replicator(self.ctx)
            previous = install_stop_signals(self.request_stop, "the service")
            try:
                from vmvault.service.reconcile import reconcile_all, reconcile_vms_at_start

                reconcile_vms_at_start(self.ctx)  # leftovers of a killed vmvault's backups on VMs, before any job runs

                reconcile_all(self.ctx, "at the start of vmvault serve")  # points and jobs a crash left half-recorded
                pool.start()
                scheduler.start()
                maintenance.start()
                replicator.start()
                if on_ready is not None:
                    on_ready(self)
                self._stop.wait()
                log.info("stopping: %s", self._stop.reason)
                scheduler.stop()
                maintenance.stop()
                replicator.stop()
                pool.stop(self._stop.reason)
            finally:
                restore_signals(previous)
                if http is not None:
                    http.shutdown()
                    http.server_close()
                if metrics_http is not None:
                    metrics_http.shutdown()
                    metrics_http.server_close()
        return 0


def install_stop_signals(request_stop: Callable[[str], None], who: str) -> dict[int, Any]:
    """SIGTERM and SIGINT ask `who` (the service, the agent) to stop, saying which signal; the old handlers.

    Only the main thread may set handlers (a test running a Service in a thread gets none).
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        name = signal.Signals(sig).name
        previous[sig] = signal.signal(sig, lambda *_a, n=name: request_stop(f"{who} was stopped ({n})"))
    return previous


def restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)

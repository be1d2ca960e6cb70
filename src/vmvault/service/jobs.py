"""Jobs: every long operation is a row that says who runs it, how far it got and how it ended.

A job row is created InProgress with the owner's pid and boot id, its progress is written at most
once a second, and it ends Completed / Failed / Cancelled with an error {code, message,
recommendedAction}. A job whose owner died is failed the next time anyone opens the catalog.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import DatabaseError, IntegrityError
from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import JobRow
from vmvault.errors import Busy, Cancelled, InternalError, InvalidInput, VmvaultError
from vmvault.proc import boot_id, pid_alive, process_start_ticks
from vmvault.service.context import Context
from vmvault.service.views import JsonDict, empty_progress, job_view

log = logging.getLogger("vmvault")

T = TypeVar("T")
ProgressCallback = Callable[[Any], None]  # receives vmvault.engine.progress.Progress

PROGRESS_INTERVAL_S = 1.0
# A shared (PostgreSQL) catalog: a job owned by a process of another machine is dead when its
# heartbeat (beaten every CancelWatcher.HEARTBEAT_S) is older than this lease.
JOB_LEASE_S = 60.0


class Operation:
    BACKUP = "Backup"
    CONFIGURE_BACKUP = "ConfigureBackup"
    RESTORE = "Restore"
    DISABLE_BACKUP = "DisableBackup"
    DELETE_BACKUP_DATA = "DeleteBackupData"
    VERIFY = "Verify"
    GARBAGE_COLLECT = "GarbageCollect"
    RETENTION = "Retention"
    FILE_RECOVERY_MOUNT = "FileRecoveryMount"
    FILE_RECOVERY_UNMOUNT = "FileRecoveryUnmount"
    UNDELETE = "Undelete"  # Azure's name for undoing a soft delete (before #15: recorded as ConfigureBackup)
    ALL = (
        BACKUP,
        CONFIGURE_BACKUP,
        RESTORE,
        DISABLE_BACKUP,
        DELETE_BACKUP_DATA,
        VERIFY,
        GARBAGE_COLLECT,
        RETENTION,
        FILE_RECOVERY_MOUNT,
        FILE_RECOVERY_UNMOUNT,
        UNDELETE,
    )


class Status:
    IN_PROGRESS = "InProgress"
    COMPLETED = "Completed"
    COMPLETED_WITH_WARNINGS = "CompletedWithWarnings"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    CANCELLING = "Cancelling"  # shown, not stored: InProgress with cancel_requested (list_jobs)
    ALL = (IN_PROGRESS, COMPLETED, COMPLETED_WITH_WARNINGS, FAILED, CANCELLED)
    ENDED_BADLY = (FAILED, CANCELLED)


# ---- process identity ---------------------------------------------------------------------------


def owner_fields() -> JsonDict:
    """What a job's details record about the process that runs it (besides pid and boot id), and
    its host (job show/list name the host that ran the job)."""
    from vmvault.service.hosts import local_host_name

    return {"ownerStart": process_start_ticks(os.getpid()), "host": local_host_name()}


def owner_is_dead(row: JobRow, current_boot: str, lease_s: float | None = None) -> bool:
    """lease_s None: SQLite, one machine. Else the catalog is shared: another boot id is another
    machine (or this one before a reboot), judged by its heartbeat lease."""
    if row.owner_pid <= 0:
        return False  # queued: no process owns it yet (a worker of `vmvault serve` will claim it)
    if (row.details or {}).get("agentHost"):
        return False  # an agent's job: its host's heartbeat lease decides (service/agentwork.py, agent_lost)
    if row.owner_boot_id and current_boot and row.owner_boot_id != current_boot:
        if lease_s is not None:
            return heartbeat_age(row) > lease_s
        return True  # the machine rebooted since: the owner cannot be running
    if row.owner_pid == os.getpid():
        return False
    if not pid_alive(row.owner_pid):
        return True
    started = (row.details or {}).get("ownerStart")
    now_started = process_start_ticks(row.owner_pid)
    return started is not None and now_started is not None and started != now_started  # pid reused


def heartbeat_age(row: JobRow) -> float:
    from vmvault.catalog.clock import from_iso, utc_now

    try:
        return (utc_now() - from_iso(row.heartbeat)).total_seconds()
    except ValueError:
        return float("inf")


# ---- dead jobs ----------------------------------------------------------------------------------


def dead_job_error(row: JobRow) -> JsonDict:
    if row.operation == Operation.BACKUP:
        outcome, action = "no recovery point was created", f"run the backup again: vmvault backup now {row.vm}"
    else:
        outcome, action = f"the {row.operation} did not finish", "run the operation again"
    return {
        "code": "process_died",
        "message": f"the process running this job died (pid {row.owner_pid}); {outcome}",
        "recommendedAction": action,
    }


def reap_dead_jobs(ctx: Context) -> int:
    """Mark Failed every InProgress job whose owner process is gone; cheap when there are none."""
    current = boot_id()
    lease = JOB_LEASE_S if ctx.catalog.shared else None
    with ctx.catalog.read() as s:
        if not any(owner_is_dead(r, current, lease) for r in repos.running_jobs(s)):
            return 0
    reaped = 0
    with ctx.catalog.write() as s:
        for row in repos.running_jobs(s):
            if owner_is_dead(row, current, lease):
                repos.finish_job(s, row.id, Status.FAILED, error=dead_job_error(row))
                remove_partial_files(row.details)
                _notify_enqueue(s, row.id)
                reaped += 1
    if reaped:
        from vmvault.connectors.registry import images

        images().remove_dead_work_dirs()  # the work directories (sockets) of the dead processes
    return reaped


def remove_partial_files(details: JsonDict | None) -> int:
    """The partial files a dead restore recorded (service/restores.record_partial_files)."""
    where = (details or {}).get("partialFiles")
    if not isinstance(where, dict):
        return 0
    pattern = str(where.get("pattern") or "")
    # Only the exact shape record_partial_files writes: never a pattern that could match more.
    if not re.fullmatch(r"\.\*\.vmvault-partial-j[0-9a-f]{1,16}\*", pattern):
        return 0
    removed = 0
    for path in Path(str(where.get("dir") or "/nonexistent")).glob(pattern):
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed


def _notify_enqueue(s: Session, job_id: str) -> None:
    from vmvault.service import notify

    notify.enqueue_for_job(s, job_id)


def _notify_deliver(ctx: Context, job_id: str) -> None:
    from vmvault.service import notify

    try:
        notify.deliver_pending(ctx, job_id=job_id)
    except Exception:  # a notification must never change how a job ended; serve retries it
        log.warning("could not deliver the notifications of job %s", job_id, exc_info=True)


# ---- running a job ------------------------------------------------------------------------------


def progress_dict(progress: Any) -> JsonDict:
    return {
        "percent": round(float(progress.percent), 2),
        "bytesRead": int(progress.bytes_read),
        "bytesWritten": int(progress.bytes_written),
    }


def as_vmvault_error(exc: Exception) -> VmvaultError:
    """A VmvaultError as is; anything else as an InternalError naming the exception."""
    if isinstance(exc, VmvaultError):
        return exc
    return InternalError(
        f"unexpected error: {type(exc).__name__}: {exc}",
        hint="rerun with VMVAULT_DEBUG=1 to see the traceback, and report it",
    )


def create_job(
    ctx: Context,
    operation: str,
    *,
    vm: str | None,
    vault: str | None,
    exclusive: bool = False,
    queued: bool = False,
    details: JsonDict | None = None,
) -> JobRow:
    """Insert an InProgress job; with exclusive, refuse if one of the same kind runs for this VM.

    A queued job has no owner (pid 0) until a worker of `vmvault serve` claims it. One Backup per
    VM at a time is also enforced by a unique index, whichever process inserts it.
    """
    now = now_iso()
    details = _with_restore_record(operation, details)
    row = JobRow(
        id=str(uuid.uuid4()),
        operation=operation,
        status=Status.IN_PROGRESS,
        vm=vm,
        vault=vault,
        start_time=now,
        end_time=None,
        progress=empty_progress(),
        error=None,
        owner_pid=0 if queued else os.getpid(),
        owner_boot_id="" if queued else boot_id(),
        heartbeat=now,
        cancel_requested=False,
        details={**(details or {}), **({} if queued else owner_fields())},
    )
    try:
        with ctx.catalog.write() as s:
            if exclusive and vm is not None:
                _refuse_if_running(s, operation, vm)
            repos.add_job(s, row)
    except IntegrityError:  # the unique index: another process inserted its backup first
        with ctx.catalog.read() as s:
            _refuse_if_running(s, operation, vm or "")
        raise
    listener = getattr(_created_listener, "callback", None)
    if listener is not None:
        listener(row.id)
    return row


_created_listener = threading.local()


# ---- what a restore did (extendedInfo.restore) ---------------------------------------------------
# The restore and file-recovery use cases create their job deep inside (restore_vm,
# instant restore, files.mount); the caller that knows the request says what to record around the call.

_RESTORE_RECORD: contextvars.ContextVar[JsonDict | None] = contextvars.ContextVar("restore_record", default=None)
RECORDED_OPERATIONS = (Operation.RESTORE, Operation.FILE_RECOVERY_MOUNT)


@contextlib.contextmanager
def recording_restore(fields: JsonDict) -> Iterator[None]:
    """Jobs of RECORDED_OPERATIONS created in this block get details["restore"] = fields (plus their own)."""
    token = _RESTORE_RECORD.set(fields)
    try:
        yield
    finally:
        _RESTORE_RECORD.reset(token)


def _with_restore_record(operation: str, details: JsonDict | None) -> JsonDict | None:
    record = _RESTORE_RECORD.get()
    if record is None or operation not in RECORDED_OPERATIONS:
        return details
    own = (details or {}).get("restore") or {}
    return {**(details or {}), "restore": {**record, **own}}


def restore_record(row: JobRow) -> JsonDict:
    """A job's details["restore"] (a copy; empty when it has none)."""
    return dict((row.details or {}).get("restore") or {})


def add_restore_record(ctx: Context, job_id: str, fields: JsonDict) -> None:
    """Add what the restore produced (files, the new VM) to its job's details["restore"]."""
    with ctx.catalog.write() as s:
        row = repos.get_job(s, job_id)
        details = dict(row.details or {})
        details["restore"] = {**(details.get("restore") or {}), **fields}
        repos.update_job_details(s, job_id, details)


@contextlib.contextmanager
def on_job_created(callback: Callable[[str], None]) -> Iterator[None]:
    """Call callback(job_id) when this thread records a job (the API returns it while the job runs on)."""
    previous = getattr(_created_listener, "callback", None)
    _created_listener.callback = callback
    try:
        yield
    finally:
        _created_listener.callback = previous


def _refuse_if_running(s: Session, operation: str, vm: str) -> None:
    running = repos.running_job_for_vm(s, vm, operation)
    if running is not None:
        who = f"pid {running.owner_pid}" if running.owner_pid > 0 else "queued for vmvault serve"
        raise Busy(
            f"a {operation} job for VM '{vm}' is already running (job {running.id}, {who})",
            hint=f"wait for it to end: vmvault job wait {running.id} (or stop it: vmvault job cancel {running.id})",
        )


def record_completed_job(s: Session, operation: str, *, vm: str | None, vault: str | None) -> JobRow:
    """A job that is done as soon as it is recorded (ConfigureBackup), inside the caller's transaction."""
    now = now_iso()
    row = JobRow(
        id=str(uuid.uuid4()),
        operation=operation,
        status=Status.COMPLETED,
        vm=vm,
        vault=vault,
        start_time=now,
        end_time=now,
        progress={"percent": 100.0, "bytesRead": 0, "bytesWritten": 0},
        error=None,
        owner_pid=os.getpid(),
        owner_boot_id=boot_id(),
        heartbeat=now,
    )
    return repos.add_job(s, row)


@dataclass
class JobRun:
    """The running side of a job: throttled progress reporting plus the cancel flag."""

    ctx: Context
    job_id: str
    on_progress: ProgressCallback | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    last: JsonDict = field(default_factory=empty_progress)
    details: JsonDict | None = None  # the job row's details; "tasks" (one per disk) follow progress
    warnings: list[JsonDict] = field(default_factory=list)  # {code, message, recommendedAction}: CompletedWithWarnings
    _written_at: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def progress(self, progress: Any) -> None:
        """Engine callback: forward to the UI, write to the catalog at most once a second."""
        if self.on_progress is not None:
            self.on_progress(progress)
        with self._lock:
            previous = self.last
            self.last = progress_dict(progress)
            self._track_tasks(previous, progress)
            now = time.monotonic()
            if now - self._written_at < PROGRESS_INTERVAL_S:
                return
            self._written_at = now
            snapshot = dict(self.last)
            details = _copy_details(self.details)
        try:
            with self.ctx.catalog.update() as s:  # its own row only: no catalog-wide write lock
                repos.update_job_progress(s, self.job_id, snapshot)
                if details is not None:  # merged: a key another writer added (partialFiles) stays
                    _merge_details(s, self.job_id, details)
        except DatabaseError:  # a busy catalog must not fail the backup; the next update retries
            log.warning("could not record the progress of job %s", self.job_id, exc_info=True)

    def _track_tasks(self, previous: JsonDict, progress: Any) -> None:
        track_tasks(self.details, previous, self.last, progress)

    def end_tasks(self, status: str) -> None:
        end_tasks(self.details, status)


def track_tasks(details: JsonDict | None, previous: JsonDict, last: JsonDict, progress: Any) -> None:
    """Credit the bytes read since the last report to the disk being read (details["tasks"])."""
    tasks = (details or {}).get("tasks")
    disk = str(getattr(progress, "current_disk", "") or "")
    if not tasks or not disk:
        return
    now = now_iso()
    for task in tasks:
        if task["disk"] == disk:
            task["status"] = Status.IN_PROGRESS
            task["startTime"] = task.get("startTime") or now
            task["bytesRead"] += max(0, last["bytesRead"] - previous["bytesRead"])
            task["bytesWritten"] += max(0, last["bytesWritten"] - previous["bytesWritten"])
        elif task["status"] == Status.IN_PROGRESS:
            task["status"], task["endTime"] = Status.COMPLETED, now


def end_tasks(details: JsonDict | None, status: str) -> None:
    """The tasks of a job that ended with this status."""
    now = now_iso()
    for task in (details or {}).get("tasks") or []:
        if task["status"] == Status.IN_PROGRESS or (status == Status.COMPLETED and task["status"] != status):
            task["status"], task["endTime"] = status, now
        elif task["status"] == "NotStarted" and status != Status.COMPLETED:
            task["status"] = Status.CANCELLED if status == Status.CANCELLED else "NotStarted"


def _copy_details(details: JsonDict | None) -> JsonDict | None:
    if details is None:
        return None
    copy = dict(details)
    if "tasks" in copy:
        copy["tasks"] = [dict(t) for t in copy["tasks"]]
    return copy


def disk_tasks(disks: Sequence[str]) -> list[JsonDict]:
    """details["tasks"] of a job that reads these disks: one task per disk, progress filled in as it runs."""
    return [
        {"disk": d, "status": "NotStarted", "bytesRead": 0, "bytesWritten": 0, "startTime": None, "endTime": None}
        for d in disks
    ]


@dataclass
class JobOutcome(Generic[T]):
    job: JsonDict
    result: T | None = None
    error: VmvaultError | None = None

    @property
    def failed(self) -> bool:
        """Failed or Cancelled; the job may be a service view or (the CLI against a server) a resource."""
        status = (self.job.get("properties") or self.job)["status"]
        return status in Status.ENDED_BADLY


def run_job(
    ctx: Context,
    row: JobRow,
    work: Callable[[JobRun], T],
    *,
    record: Callable[[Session, T], None] | None = None,
    failure: Callable[[T], VmvaultError | None] | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> JobOutcome[T]:
    """Run work for an InProgress job and end the job with what happened.

    record(session, result) runs in the same transaction that marks the job Completed.
    failure(result) may turn a result into a failure (verify found problems).
    KeyboardInterrupt ends the job Cancelled and is re-raised.
    """
    from vmvault.logs import job_context

    run = JobRun(ctx, row.id, on_progress, cancel or threading.Event(), details=_copy_details(row.details))
    watcher = CancelWatcher(ctx, row.id, run.cancel)
    watcher.start()
    try:
        with job_context(row.id, row.vm):  # every line logged by the job names it (--log-format json)
            result = _work_watched(work, run, watcher)
    except Cancelled as exc:
        return _end(ctx, run, Status.CANCELLED, exc)
    except VmvaultError as exc:
        return _end(ctx, run, Status.FAILED, exc)
    except Exception as exc:
        log.debug("job %s failed unexpectedly", row.id, exc_info=True)
        return _end(ctx, run, Status.FAILED, as_vmvault_error(exc))
    except BaseException:
        _end(ctx, run, Status.CANCELLED, Cancelled(f"{row.operation} job {row.id} was interrupted"))
        raise
    problem = failure(result) if failure else None
    if problem is not None:
        outcome = _end(ctx, run, Status.FAILED, problem)
        outcome.result = result
        return outcome
    return _complete(ctx, run, result, record)


def _work_watched(work: Callable[[JobRun], T], run: JobRun, watcher: CancelWatcher) -> T:
    try:
        return work(run)
    finally:
        watcher.stop()


class CancelWatcher:
    """Polls the job row's cancel flag (set by `vmvault job cancel` from any process) and beats its heartbeat."""

    POLL_S = 1.0
    HEARTBEAT_S = 10.0

    def __init__(self, ctx: Context, job_id: str, cancel: threading.Event) -> None:
        self.ctx, self.job_id, self.cancel = ctx, job_id, cancel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"vmvault-cancel-{job_id[:8]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        beat = time.monotonic()
        while not self._stop.wait(self.POLL_S):
            try:
                with self.ctx.catalog.read() as s:
                    if repos.job_cancel_requested(s, self.job_id):
                        self.cancel.set()
                if time.monotonic() - beat >= self.HEARTBEAT_S:
                    beat = time.monotonic()
                    with self.ctx.catalog.update() as s:
                        repos.touch_jobs(s, [self.job_id])
            except DatabaseError:
                log.debug("cancel watcher of job %s: catalog busy", self.job_id, exc_info=True)


def _complete(ctx: Context, run: JobRun, result: T, record: Callable[[Session, T], None] | None) -> JobOutcome[T]:
    final = {**run.last, "percent": 100.0}
    run.end_tasks(Status.COMPLETED)
    try:
        with ctx.catalog.write() as s:
            if record is not None:
                record(s, result)
            status = Status.COMPLETED_WITH_WARNINGS if run.warnings else Status.COMPLETED
            repos.finish_job(s, run.job_id, status, progress=final, error=warnings_error(run.warnings))
            if run.details is not None:
                _merge_details(s, run.job_id, run.details)
            _notify_enqueue(s, run.job_id)
    except Exception as exc:
        log.debug("recording job %s failed", run.job_id, exc_info=True)
        return _end(ctx, run, Status.FAILED, as_vmvault_error(exc))
    _notify_deliver(ctx, run.job_id)
    return JobOutcome(job=show_job(ctx, run.job_id), result=result)


def warnings_error(warnings: list[JsonDict]) -> JsonDict | None:
    """A CompletedWithWarnings job's `error`: the first warning's code, every message, all the warnings."""
    if not warnings:
        return None
    hint = next((w.get("recommendedAction") for w in warnings if w.get("recommendedAction")), None)
    message = "; ".join(str(w["message"]) for w in warnings)
    return {"code": warnings[0]["code"], "message": message, "recommendedAction": hint, "warnings": warnings}


def _merge_details(s: Session, job_id: str, details: JsonDict) -> None:
    """Write the run's details over the row's (keys another writer added in between, e.g. the point id, stay)."""
    row = repos.find_job(s, job_id)
    current = dict(row.details or {}) if row is not None else {}
    repos.update_job_details(s, job_id, {**current, **details})


def _end(ctx: Context, run: JobRun, status: str, exc: VmvaultError) -> JobOutcome[Any]:
    run.end_tasks(status)
    with ctx.catalog.write() as s:
        repos.finish_job(s, run.job_id, status, error=exc.to_dict(), progress=run.last)
        if run.details is not None:
            _merge_details(s, run.job_id, run.details)
        _notify_enqueue(s, run.job_id)
    _notify_deliver(ctx, run.job_id)
    return JobOutcome(job=show_job(ctx, run.job_id), error=exc)


def end_job(ctx: Context, job_id: str, status: str, error: VmvaultError | None = None) -> JsonDict:
    """End a job that never ran its work (a queued job cancelled, or one whose plan failed); notifies."""
    with ctx.catalog.write() as s:
        repos.finish_job(s, job_id, status, error=error.to_dict() if error else None)
        _notify_enqueue(s, job_id)
    _notify_deliver(ctx, job_id)
    return show_job(ctx, job_id)


# ---- queries ------------------------------------------------------------------------------------


def show_job(ctx: Context, job_id: str) -> JsonDict:
    with ctx.catalog.read() as s:
        return job_view(repos.get_job(s, job_id))


def list_jobs(
    ctx: Context,
    *,
    vm: str | None = None,
    status: str | None = None,
    operation: str | None = None,
    limit: int = 0,
    since: str | None = None,
    vault: str | None = None,
) -> list[JsonDict]:
    """Jobs, newest first (of one vault if given); since is a date (YYYY-MM-DD, UTC) or an ISO 8601 instant.

    Cancelling (Azure's status of a job asked to stop and still running) is an InProgress job
    with its cancel flag set: the catalog keeps InProgress, which the one-backup-per-VM index needs.
    """
    rows, _ = list_jobs_page(ctx, vm=vm, status=status, operation=operation, since=since, vault=vault, limit=limit)
    return rows


def list_jobs_page(
    ctx: Context,
    *,
    vm: str | None = None,
    status: str | None = None,
    operation: str | None = None,
    since: str | None = None,
    vault: str | None = None,
    limit: int = 0,
    offset: int = 0,
    top: int = 0,
) -> tuple[list[JsonDict], bool]:
    """One page of list_jobs: the jobs offset..offset+top (top 0: all) of the first limit (0: all), and
    whether more follow. The catalog reads that page only (LIMIT/OFFSET in the SQL), so the API's
    job list costs the same with 100 or 100,000 jobs in the catalog."""
    status = _known(status, (*Status.ALL, Status.CANCELLING), "status")
    operation = _known(operation, Operation.ALL, "operation")
    start = _since(since) if since else None
    stored = Status.IN_PROGRESS if status == Status.CANCELLING else status
    if offset >= 1 << 62:
        return [], False  # past any catalog's end (and past SQL's 64-bit OFFSET: a $skipToken has 20 digits)
    want = top + 1 if top > 0 else 0  # one more than the page: is there a next one?
    if limit > 0:
        want = min(want, limit - offset) if want else max(limit - offset, 0)
        if want <= 0:
            return [], False
    with ctx.catalog.read() as s:
        rows: Sequence[JobRow] = repos.list_jobs(
            s, vm=vm, status=stored, operation=operation, limit=want, since=start, vault=vault,
            cancelling=stored != status, offset=offset,
        )  # fmt: skip
        more = top > 0 and len(rows) > top
        return [job_view(r) for r in rows[: top or None]], more


def _known(value: str | None, allowed: Sequence[str], what: str) -> str | None:
    """Azure's spelling of a status or operation, matched case-insensitively."""
    if value is None:
        return None
    for known in allowed:
        if known.lower() == value.lower():
            return known
    raise InvalidInput(f"unknown {what} '{value}'", hint=f"use one of: {', '.join(allowed)}")


def _since(text: str) -> str:
    from datetime import UTC, datetime

    from vmvault.catalog.clock import to_iso

    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            f"invalid date '{text}'", hint="give --since YYYY-MM-DD (UTC) or an ISO 8601 time, e.g. 2026-01-31T08:00Z"
        ) from None
    return to_iso(moment if moment.tzinfo else moment.replace(tzinfo=UTC))


# ---- job show / wait / cancel (0002) ------------------------------------------------------------


def describe_job(ctx: Context, job_id: str) -> JsonDict:
    """A job as `job show` prints it: the job plus extendedInfo (tasks per disk, rate, owner, trigger)."""
    with ctx.catalog.read() as s:
        row = repos.get_job(s, job_id)
        return {**job_view(row), "extendedInfo": extended_info(row)}


def extended_info(row: JobRow) -> JsonDict:
    from vmvault.catalog.clock import seconds_between

    details = dict(row.details or {})
    progress = row.progress or {}
    began = str(details.get("claimedAt") or row.start_time)
    elapsed = seconds_between(began, row.end_time)
    bytes_read = int(progress.get("bytesRead", 0))
    tasks = [
        {
            "taskId": f"Transfer data to vault ({t['disk']})",
            "disk": t["disk"],
            "status": t["status"],
            "bytesRead": t["bytesRead"],
            "bytesWritten": t["bytesWritten"],
            "startTime": t.get("startTime"),
            "endTime": t.get("endTime"),
        }
        for t in details.get("tasks") or []
    ]
    queued = row.status == Status.IN_PROGRESS and row.owner_pid <= 0
    return {
        "trigger": details.get("trigger"),
        "policy": details.get("policy"),
        "scheduledFor": details.get("scheduledFor"),
        "plannedStart": details.get("plannedStart"),  # scheduledFor + this VM's jitter (service/scheduler.py)
        "retainUntil": details.get("retainUntil"),
        "recoveryPoint": details.get("recoveryPoint"),
        "restore": details.get("restore"),  # a restore as a new VM: its disks, state (instant restore)
        "quiesce": details.get("quiesce"),  # a live backup: consistency, attempts, freeze/frozen/snapshot/thaw seconds
        "reconciled": details.get("reconciled"),  # corrected after its process died (service/reconcile.py)
        # Object storage: attempts repeated after throttling or transient errors (vault/backends/retry.py).
        "storageRetries": details.get("storageRetries"),
        "queued": queued,
        "cancelRequested": bool(row.cancel_requested),
        "owner": None if row.owner_pid <= 0 else {"pid": row.owner_pid, "bootId": row.owner_boot_id},
        "heartbeat": row.heartbeat,
        "rateBytesPerSecond": int(bytes_read / elapsed) if elapsed > 0 and not queued else 0,
        "tasksList": tasks,
    }


def wait_for_job(
    ctx: Context,
    job_id: str,
    *,
    timeout: float | None = None,
    on_progress: Callable[[Any], None] | None = None,
    cancel: threading.Event | None = None,
    poll_s: float = 0.5,
) -> JsonDict:
    """Wait until the job ends; returns it. Busy (code "timeout") after timeout seconds.

    A set cancel event asks the job to stop (once) and goes on waiting for it to end. A job
    whose owner died is failed while waiting (reap_dead_jobs).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    asked = False
    last_reap = 0.0
    while True:
        if time.monotonic() - last_reap >= 2.0:
            last_reap = time.monotonic()
            reap_dead_jobs(ctx)
        if cancel is not None and cancel.is_set() and not asked:
            asked = True
            with contextlib.suppress(InvalidInput):  # it ended meanwhile
                cancel_job(ctx, job_id)
        with ctx.catalog.read() as s:
            row = repos.get_job(s, job_id)
            view = job_view(row)
        if row.status != Status.IN_PROGRESS:
            return view
        if on_progress is not None:
            on_progress(_progress_of(row))
        if deadline is not None and time.monotonic() >= deadline:
            raise Busy(
                f"job {row.id} is still {row.status} after {timeout:g} s",
                hint=f"wait longer: vmvault job wait {row.id} --timeout SECONDS",
                code="timeout",
            )
        time.sleep(poll_s)


@dataclass
class _JobProgress:
    """What a progress display reads (like engine.progress.Progress)."""

    total_bytes: int
    bytes_read: int
    bytes_written: int
    current_disk: str


def _progress_of(row: JobRow) -> _JobProgress:
    p = row.progress or {}
    read, percent = int(p.get("bytesRead", 0)), float(p.get("percent", 0.0))
    total = int(read * 100 / percent) if percent > 0 else 0
    current = next((t["disk"] for t in (row.details or {}).get("tasks") or [] if t["status"] == Status.IN_PROGRESS), "")
    return _JobProgress(total, read, int(p.get("bytesWritten", 0)), current)


def cancel_job(ctx: Context, job_id: str) -> JsonDict:
    """Stop a job: a queued one ends Cancelled at once, a running one is asked to stop (its owner polls the flag)."""
    with ctx.catalog.write() as s:
        row = repos.lock_job(s, job_id)  # a worker of another server may be claiming it right now
        if row.status != Status.IN_PROGRESS:
            raise InvalidInput(
                f"job {row.id} already ended ({row.status})", hint=f"see it with: vmvault job show {row.id}"
            )
        queued = row.owner_pid <= 0
        if queued:
            error = Cancelled(f"{row.operation} job {row.id} was cancelled before it started")
            repos.finish_job(s, row.id, Status.CANCELLED, error=error.to_dict())
            _notify_enqueue(s, row.id)
        else:
            repos.request_job_cancel(s, row.id)
        full_id = row.id
    if queued:
        _notify_deliver(ctx, full_id)
    return describe_job(ctx, full_id)

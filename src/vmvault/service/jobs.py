"""Jobs: every long operation is a row that says who runs it, how far it got and how it ended.

A job row is created InProgress with the owner's pid and boot id, its progress is written at most
once a second, and it ends Completed / Failed / Cancelled with an error {code, message,
recommendedAction}. A job whose owner died is failed the next time anyone opens the catalog.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import JobRow
from vmvault.errors import Busy, Cancelled, InternalError, VmvaultError
from vmvault.service.context import Context
from vmvault.service.views import JsonDict, empty_progress, job_view

log = logging.getLogger("vmvault")

T = TypeVar("T")
ProgressCallback = Callable[[Any], None]  # receives vmvault.engine.progress.Progress

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
PROGRESS_INTERVAL_S = 1.0


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
    )


class Status:
    IN_PROGRESS = "InProgress"
    COMPLETED = "Completed"
    COMPLETED_WITH_WARNINGS = "CompletedWithWarnings"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    ALL = (IN_PROGRESS, COMPLETED, COMPLETED_WITH_WARNINGS, FAILED, CANCELLED)
    ENDED_BADLY = (FAILED, CANCELLED)


# ---- process identity ---------------------------------------------------------------------------


def boot_id() -> str:
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """True when pid names a live (non-zombie) process on this boot."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def owner_is_dead(row: JobRow, current_boot: str) -> bool:
    if row.owner_boot_id and current_boot and row.owner_boot_id != current_boot:
        return True  # the machine rebooted since: the owner cannot be running
    if row.owner_pid == os.getpid():
        return False
    return not pid_alive(row.owner_pid)


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
    with ctx.catalog.read() as s:
        if not any(owner_is_dead(r, current) for r in repos.running_jobs(s)):
            return 0
    reaped = 0
    with ctx.catalog.write() as s:
        for row in repos.running_jobs(s):
            if owner_is_dead(row, current):
                repos.finish_job(s, row.id, Status.FAILED, error=dead_job_error(row))
                reaped += 1
    return reaped


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


def create_job(ctx: Context, operation: str, *, vm: str | None, vault: str | None, exclusive: bool = False) -> JobRow:
    """Insert an InProgress job; with exclusive, refuse if one of the same kind runs for this VM."""
    now = now_iso()
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
        owner_pid=os.getpid(),
        owner_boot_id=boot_id(),
        heartbeat=now,
    )
    with ctx.catalog.write() as s:
        if exclusive and vm is not None:
            _refuse_if_running(s, operation, vm)
        repos.add_job(s, row)
    return row


def _refuse_if_running(s: Session, operation: str, vm: str) -> None:
    running = repos.running_job_for_vm(s, vm, operation)
    if running is not None:
        raise Busy(
            f"a {operation} job for VM '{vm}' is already running (job {running.id}, pid {running.owner_pid})",
            hint=f"wait for it to end: vmvault job show {running.id}",
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
    _written_at: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def progress(self, progress: Any) -> None:
        """Engine callback: forward to the UI, write to the catalog at most once a second."""
        if self.on_progress is not None:
            self.on_progress(progress)
        with self._lock:
            self.last = progress_dict(progress)
            now = time.monotonic()
            if now - self._written_at < PROGRESS_INTERVAL_S:
                return
            self._written_at = now
            snapshot = dict(self.last)
        try:
            with self.ctx.catalog.write() as s:
                repos.update_job_progress(s, self.job_id, snapshot)
        except DatabaseError:  # a busy catalog must not fail the backup; the next update retries
            log.warning("could not record the progress of job %s", self.job_id, exc_info=True)


@dataclass
class JobOutcome(Generic[T]):
    job: JsonDict
    result: T | None = None
    error: VmvaultError | None = None

    @property
    def failed(self) -> bool:
        return self.job["status"] in Status.ENDED_BADLY


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
    run = JobRun(ctx, row.id, on_progress, cancel or threading.Event())
    try:
        result = work(run)
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


def _complete(ctx: Context, run: JobRun, result: T, record: Callable[[Session, T], None] | None) -> JobOutcome[T]:
    final = {**run.last, "percent": 100.0}
    try:
        with ctx.catalog.write() as s:
            if record is not None:
                record(s, result)
            repos.finish_job(s, run.job_id, Status.COMPLETED, progress=final)
    except Exception as exc:
        log.debug("recording job %s failed", run.job_id, exc_info=True)
        return _end(ctx, run, Status.FAILED, as_vmvault_error(exc))
    return JobOutcome(job=show_job(ctx, run.job_id), result=result)


def _end(ctx: Context, run: JobRun, status: str, exc: VmvaultError) -> JobOutcome[Any]:
    with ctx.catalog.write() as s:
        repos.finish_job(s, run.job_id, status, error=exc.to_dict(), progress=run.last)
    return JobOutcome(job=show_job(ctx, run.job_id), error=exc)


# ---- queries ------------------------------------------------------------------------------------


def show_job(ctx: Context, job_id: str) -> JsonDict:
    with ctx.catalog.read() as s:
        return job_view(repos.get_job(s, job_id))


def list_jobs(
    ctx: Context, *, vm: str | None = None, status: str | None = None, operation: str | None = None, limit: int = 0
) -> list[JsonDict]:
    with ctx.catalog.read() as s:
        rows: Sequence[JobRow] = repos.list_jobs(s, vm=vm, status=status, operation=operation, limit=limit)
        return [job_view(r) for r in rows]

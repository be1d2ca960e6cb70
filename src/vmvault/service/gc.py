"""Garbage collection of a vault as a GarbageCollect job (the work is vault/gc.py's).

It runs on demand (`vmvault vault gc V`) and after every Retention job that deleted points. The
mark runs beside backups; the sweep waits for the vault lock exclusive, i.e. for running backups,
restores and verifies to end (at most lock_timeout), and new ones wait for the sweep.
"""

from __future__ import annotations

import threading
from typing import Any

from vmvault.catalog import repos
from vmvault.engine.progress import Progress
from vmvault.service.context import Context
from vmvault.service.jobs import JobOutcome, JobRun, Operation, ProgressCallback, create_job, run_job
from vmvault.service.vaultio import opened_vault
from vmvault.service.views import JsonDict
from vmvault.vault.gc import DEFAULT_GRACE_SECONDS, DEFAULT_REPACK_THRESHOLD, GcReport, collect_garbage
from vmvault.vault.journal import discard_journal, read_journals

DEFAULT_LOCK_TIMEOUT_S = 6 * 3600.0


def garbage_collect(
    ctx: Context,
    vault_name: str,
    *,
    grace_seconds: float | None = None,
    repack_threshold: float = DEFAULT_REPACK_THRESHOLD,
    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT_S,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> JobOutcome[JsonDict]:
    """Collect a vault's garbage as a GarbageCollect job; result: the report (bytes freed, packs, ...)."""
    from vmvault.errors import InvalidInput

    grace = DEFAULT_GRACE_SECONDS if grace_seconds is None else grace_seconds
    if grace < 0:
        raise InvalidInput(f"grace of {grace} seconds is negative", hint="give --grace 0 or more seconds")
    if not 0 < repack_threshold <= 1:
        raise InvalidInput(f"repack threshold {repack_threshold} is not in (0, 1]")
    with ctx.catalog.read() as s:
        row = repos.get_vault(s, vault_name)
    job = create_job(ctx, Operation.GARBAGE_COLLECT, vm=None, vault=vault_name)

    def work(run: JobRun) -> JsonDict:
        progress = _Progress(run)
        with opened_vault(ctx, row) as vault:
            # Deleting what no manifest references is only safe while the manifests are all there.
            vault.refuse_if_tampered("garbage collection")
            report = collect_garbage(
                vault,
                grace_seconds=grace,
                repack_threshold=repack_threshold,
                lock_timeout=lock_timeout,
                on_progress=progress,
                cancel=run.cancel,
                dead_packs=dead_job_packs(ctx, vault, vault_name),
            )
            forget_journals(ctx, vault)
        result = report_view(vault_name, grace, report)
        run.details = {**(run.details or {}), "garbageCollection": result}
        return result

    return run_job(ctx, job, work, on_progress=on_progress, cancel=cancel)


class _Progress:
    """vault/gc's (phase, done, total) as the engine's Progress the job machinery records."""

    def __init__(self, run: JobRun) -> None:
        self.run = run

    def __call__(self, phase: str, done: int, total: int) -> None:
        # mark: 0-50 %, sweep: 50-100 % (packs); "bytes" here count points and packs.
        base = 0 if phase == "mark" else total
        state: Any = Progress(total_bytes=2 * max(total, 1), bytes_read=base + done, message=phase)
        self.run.progress(state)


def report_view(vault_name: str, grace: float, report: GcReport) -> JsonDict:
    return {
        "vault": vault_name,
        "graceSeconds": grace,
        "pointsMarked": report.points,
        "pins": report.pins,
        "stalePinsRemoved": report.stale_pins_removed,
        "liveTreeBlobs": report.tree_blobs_live,
        "liveChunks": report.chunks_live,
        "packsChecked": report.packs_checked,
        "packsDeleted": report.packs_deleted,
        "packsRepacked": report.packs_repacked,
        "packsWritten": report.packs_written,
        "packsTooYoung": report.packs_too_young,
        "packsPinned": report.packs_pinned,
        "orphanPacksDeleted": report.orphan_packs_deleted,
        "packsReindexed": report.packs_reindexed,
        "packsUnreadableKept": report.packs_unreadable_kept,
        "temporariesDeleted": report.temporaries_deleted,
        "blobsDeleted": report.blobs_deleted,
        "bytesBefore": report.bytes_before,
        "bytesAfter": report.bytes_after,
        "bytesFreed": report.bytes_freed,
        "lockWaitSeconds": report.lock_wait_seconds,
        "problems": list(report.problems),
    }


def dead_job_packs(ctx: Context, vault: Any, vault_name: str) -> set[str]:
    """The packs of this vault's backup jobs that ended Failed or Cancelled (their process died,
    or they gave up, e.g. on a full disk), as each job's pack journal names them (vault/journal.py,
    written before each pack): unreferenced, they need not wait for the grace window, which
    protects *running* writers. A pack of a running job, of a job that succeeded, of a job this
    catalog does not know (another host's) or of no journal at all is not in the set."""
    dead: set[str] = set()
    journals = read_journals(vault)
    with ctx.catalog.read() as s:
        for job_id, packs in journals.items():
            job = repos.find_job(s, job_id)
            if job is not None and _ended_badly(job, vault_name):
                dead |= packs
    return dead


def _ended_badly(job: Any, vault_name: str) -> bool:
    return job.operation == "Backup" and job.vault == vault_name and job.status in ("Failed", "Cancelled")


def forget_journals(ctx: Context, vault: Any) -> None:
    """After a sweep: the journals of finished jobs are not needed any more (a dead job's
    unreferenced packs are gone; what a later point references ages as usual), nor those of jobs
    this catalog does not know (never exempted). Journals of running jobs stay."""
    with ctx.catalog.read() as s:
        finished = [
            job_id
            for job_id in read_journals(vault)
            if (job := repos.find_job(s, job_id)) is None or job.end_time is not None
        ]
    for job_id in finished:
        discard_journal(vault, job_id)

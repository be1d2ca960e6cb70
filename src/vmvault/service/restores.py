"""Restores: write a recovery point's disks as image files (a Restore job); a new VM through restore_vm,
with the job recording what was asked and what was written (extendedInfo.restore)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vmvault.catalog import repos
from vmvault.catalog.models import VaultRow
from vmvault.errors import InvalidInput, NotFound, StorageError
from vmvault.service.context import Context
from vmvault.service.jobs import (
    JobOutcome,
    JobRun,
    Operation,
    ProgressCallback,
    add_restore_record,
    create_job,
    recording_restore,
    run_job,
)
from vmvault.service.paths import Rule, allowed, recheck_dir, refuse_owned, refuse_registered
from vmvault.service.softdelete import resolve_point, usable_point
from vmvault.service.vaultio import check_readable, opened_vault
from vmvault.service.views import JsonDict

FORMATS = ("raw", "qcow2")
RESTORE_PIN_TTL_S = 24 * 3600.0  # for other hosts; on this host the pin lasts while this process does


@dataclass(frozen=True)
class RestorePlan:
    vm_name: str
    rp_id: str
    vault: VaultRow
    target_dir: Path
    fmt: str | None
    force: bool
    disks: list[str] | None


def restore_disks(
    ctx: Context,
    vm_name: str,
    rp_id: str,
    target_dir: str | Path,
    *,
    fmt: str | None = None,
    force: bool = False,
    disks: list[str] | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> JobOutcome[list[Path]]:
    """Restore the disks of a recovery point into target_dir as <disk>.raw|.qcow2; result: the files written."""
    from vmvault.service.hostvms import host_elsewhere

    rp_id = resolve_point(ctx, vm_name, rp_id)
    host = host_elsewhere(ctx, vm_name)
    if host is not None:  # a VM of another host (vm add --host): its agent writes the files there
        return queue_on_host(ctx, vm_name, rp_id, host, str(target_dir), fmt, force, disks)
    plan = plan_restore(ctx, vm_name, rp_id, allowed(ctx, Rule.RESTORES, target_dir), fmt, force, disks)
    record = {"mode": "disks", "recoveryPoint": rp_id, "targetDir": str(plan.target_dir), "disks": disks,
              "format": fmt, "overwrite": force}  # fmt: skip
    job = create_job(ctx, Operation.RESTORE, vm=vm_name, vault=plan.vault.name, details={"restore": record})

    def work(run: JobRun) -> list[Path]:
        paths = _run_restore(ctx, plan, run)
        run.details = {**(run.details or {}), "restore": {**record, "files": [str(p) for p in paths]}}
        return paths

    return run_job(ctx, job, work, on_progress=on_progress, cancel=cancel)


def restore_as_new_vm(
    ctx: Context,
    vm_name: str,
    rp_id: str,
    new_name: str,
    *,
    target_dir: str | None = None,
    fmt: str | None = None,
    start: bool = False,
    instant: bool = False,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> JobOutcome[Any]:
    """restore_vm.restore_vm, with its job recording the request and, once done, the new VM's files."""
    from vmvault.service import restore_vm

    rp_id = resolve_point(ctx, vm_name, rp_id)
    record = {"mode": "vm", "recoveryPoint": rp_id, "newVm": new_name, "targetDir": target_dir, "format": fmt,
              "start": start, "instant": instant}  # fmt: skip
    with recording_restore(record):
        outcome = restore_vm.restore_vm(
            ctx, vm_name, rp_id, new_name, target_dir=target_dir, fmt=fmt, start=start, instant=instant,
            on_progress=on_progress, cancel=cancel,
        )  # fmt: skip
    result = outcome.result if isinstance(outcome.result, dict) else {}
    kept = ("disks", "definitionFile", "launchScript", "started", "uuid")
    produced: JsonDict = {k: result[k] for k in kept if k in result}
    job_id = outcome.job.get("id")
    if produced and job_id:
        add_restore_record(ctx, str(job_id), produced)
    return outcome


def plan_restore(
    ctx: Context, vm_name: str, rp_id: str, target: Path, fmt: str | None, force: bool, disks: list[str] | None
) -> RestorePlan:
    vault, files = _point_files(ctx, vm_name, rp_id, fmt, disks)
    _check_target(ctx, target, files, force)
    return RestorePlan(vm_name, rp_id, vault, target, fmt, force, disks)


def _point_files(
    ctx: Context, vm_name: str, rp_id: str, fmt: str | None, disks: list[str] | None
) -> tuple[VaultRow, list[str]]:
    """The point's vault and the names of the files a restore of it writes (the disks, the template)."""
    from vmvault.connectors.registry import connector_for

    if fmt is not None and fmt not in FORMATS:
        raise InvalidInput(f"unknown disk format '{fmt}'", hint="use --format raw or --format qcow2")
    with ctx.catalog.read() as s:
        vm, point = usable_point(s, vm_name, rp_id)
        vault = repos.vault_by_id(s, point.vault_id)
        check_readable(vault)  # --from-secondary on an LRS vault: refused before any job or directory
        point_disks = [(str(d["name"]), str(d.get("sourceFormat") or "raw")) for d in point.disks]
        # the file from which the VM can be defined again, beside its disks (its kind's: restore_vm.py)
        template = connector_for(vm.kind).template_name(vm_name)
    chosen = _choose_disks(vm_name, rp_id, point_disks, disks)
    files = [f"{name}.{fmt or source}" for name, source in chosen]
    return vault, files + ([template] if template else [])


# ---- a VM of another host: its agent restores (service/agentrun.py, service/agentwork.py) ---------


def queue_on_host(
    ctx: Context, vm_name: str, rp_id: str, host: str, target_dir: str, fmt: str | None, force: bool,
    disks: list[str] | None,
) -> JobOutcome[list[Path]]:  # fmt: skip
    """Queue the Restore job for the agent of the VM's host; returned InProgress (follow_restore).

    target_dir is a path on that host: checked there, against its agent's --allow-restores roots."""
    from vmvault.service.hostvms import host_path, refuse_secondary
    from vmvault.service.jobs import show_job

    refuse_secondary(vm_name, host, "restore")
    target = host_path(vm_name, target_dir, what="target directory")
    vault, _files = _point_files(ctx, vm_name, rp_id, fmt, disks)  # checked now: bad input queues nothing
    record = {"mode": "disks", "recoveryPoint": rp_id, "targetDir": target, "disks": disks, "format": fmt,
              "overwrite": force, "host": host}  # fmt: skip
    job = create_job(ctx, Operation.RESTORE, vm=vm_name, vault=vault.name, queued=True, details={"restore": record})
    return JobOutcome(job=show_job(ctx, job.id))


def follow_restore(
    ctx: Context, job_id: str, *, on_progress: ProgressCallback | None = None, cancel: threading.Event | None = None
) -> JobOutcome[list[Path]]:
    """Wait for a restore its VM's host's agent runs, to its end; result: the files written there."""
    job, record = followed(ctx, job_id, on_progress, cancel)
    return JobOutcome(job=job, result=[Path(str(f)) for f in record.get("files") or []])


def followed(
    ctx: Context, job_id: str, on_progress: ProgressCallback | None, cancel: threading.Event | None
) -> tuple[JsonDict, JsonDict]:
    """A queued restore's job, waited for to its end, and what it recorded (extendedInfo.restore)."""
    from vmvault.service.jobs import describe_job, wait_for_job

    job = wait_for_job(ctx, job_id, on_progress=on_progress, cancel=cancel)
    return job, describe_job(ctx, job_id)["extendedInfo"].get("restore") or {}


def check_target_on_host(target: Path, files: list[str], force: bool, owners: dict[Path, list[str]]) -> None:
    """On the agent, before writing: as _check_target, with the disks of its host's VMs (from the server)."""
    for name in files:
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise InvalidInput(f"the server named a restored file {name!r}", hint="upgrade the server and the agent")
    _check_target_files(target, files, force, lambda paths: refuse_owned(owners, paths))


def _choose_disks(
    vm_name: str, rp_id: str, point_disks: list[tuple[str, str]], wanted: list[str] | None
) -> list[tuple[str, str]]:
    if wanted is None:
        return point_disks
    names = [name for name, _ in point_disks]
    for name in wanted:
        if name not in names:
            raise NotFound(
                f"disk '{name}' not found in recovery point '{rp_id}' of VM '{vm_name}'",
                hint=f"the point has disks: {', '.join(names)}",
            )
    return [d for d in point_disks if d[0] in wanted]


def _check_target(ctx: Context, target: Path, files: list[str], force: bool) -> None:
    _check_target_files(target, files, force, lambda paths: refuse_registered(ctx, paths))


def _check_target_files(target: Path, files: list[str], force: bool, refuse: Callable[[list[Path]], None]) -> None:
    if target.exists() and not target.is_dir():
        raise InvalidInput(f"target {target} is not a directory", hint="pass a directory to --target-dir")
    refuse([target / name for name in files])
    existing = [name for name in files if (target / name).exists()]
    if existing and not force:
        raise InvalidInput(
            f"target directory {target} already holds {', '.join(existing)}",
            hint="choose another --target-dir, or pass --force to overwrite",
        )


def _run_restore(ctx: Context, plan: RestorePlan, run: JobRun) -> list[Path]:
    with opened_vault(ctx, plan.vault) as vault:
        return restore_into(vault, plan, run, lambda d: recheck_dir(ctx, Rule.RESTORES, d),
                            lambda d: record_partial_files(ctx, run, d))  # fmt: skip


class RestoreRun(Protocol):
    """What restore_into needs of its job: a JobRun here, an agentrun.AgentRun on an agent."""

    job_id: str
    cancel: threading.Event

    def progress(self, progress: Any) -> None: ...


def restore_into(
    vault: Any, plan: RestorePlan, run: RestoreRun, recheck: Callable[[Path], None], mark_partial: Callable[[Path], str]
) -> list[Path]:
    """Write the point's disks (and the template) into plan.target_dir: the one restore code of a
    server, a CLI and an agent. recheck refuses a target swapped for a symlink since its check;
    mark_partial records where partial files go (their tag)."""
    from vmvault.engine.restore import run_restore
    from vmvault.service.restore_vm import convert_image, write_disks_template
    from vmvault.vault.lock import pinned, shared

    try:
        plan.target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot create target directory {plan.target_dir}: {exc.strerror}",
            hint="pass a --target-dir you can write to",
        ) from exc
    recheck(plan.target_dir)
    # The vault lock, shared, while we read: no garbage collection sweeps meanwhile; and a pin, so
    # retention leaves the point alone until we are done (vault/lock.py, docs/design.md).
    with shared(vault, cancel=run.cancel):
        vault.sync_index()  # packs a sweep deleted before we had the lock
        manifest: Any = vault.read_manifest(plan.rp_id)
        tag = mark_partial(plan.target_dir)
        with pinned(vault, manifest, f"restore job {run.job_id}", RESTORE_PIN_TTL_S, required=False):
            paths: list[Path] = run_restore(
                vault,
                manifest,
                plan.target_dir,
                fmt=plan.fmt,
                force=plan.force,
                disks=plan.disks,
                on_progress=run.progress,
                cancel=run.cancel,
                partial_tag=tag,
                convert=convert_image,
            )
        template = write_disks_template(plan.target_dir, manifest, [Path(p) for p in paths], plan.vm_name, plan.force)
    return [Path(p) for p in paths] + ([template] if template is not None else [])


def partial_tag(job_id: str) -> str:
    """The tag in the names of a restore job's partial files."""
    return "j" + job_id.replace("-", "")[:16]


def record_partial_files(ctx: Context, run: JobRun, target_dir: Path) -> str:
    """Record, before writing, where this restore's partial files go: if its process dies, the
    next command that reaps the job deletes them (jobs.remove_partial_files). Also in the run's
    own copy of the details, which its progress reports write back: else the first report erased
    the record and a restore killed after it left its partial files (issue 18 kill sweep)."""
    tag = partial_tag(run.job_id)
    where = {"dir": str(target_dir), "pattern": f".*.vmvault-partial-{tag}*"}
    with ctx.catalog.write() as s:
        current = repos.get_job(s, run.job_id)
        repos.update_job_details(s, run.job_id, {**(current.details or {}), "partialFiles": where})
        run.details = {**(run.details or current.details or {}), "partialFiles": where}
    return tag

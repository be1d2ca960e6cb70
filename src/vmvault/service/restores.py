"""Restores: write a recovery point's disks as image files (a Restore job)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmvault.catalog import repos
from vmvault.catalog.models import VaultRow
from vmvault.errors import InvalidInput, NotFound, StorageError
from vmvault.service.context import Context
from vmvault.service.jobs import JobOutcome, JobRun, Operation, ProgressCallback, create_job, run_job
from vmvault.service.paths import Rule, allowed, recheck_dir, refuse_registered
from vmvault.service.softdelete import usable_point
from vmvault.service.vaultio import opened_vault

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
    plan = plan_restore(ctx, vm_name, rp_id, allowed(ctx, Rule.RESTORES, target_dir), fmt, force, disks)
    job = create_job(ctx, Operation.RESTORE, vm=vm_name, vault=plan.vault.name)

    def work(run: JobRun) -> list[Path]:
        return _run_restore(ctx, plan, run)

    return run_job(ctx, job, work, on_progress=on_progress, cancel=cancel)


def plan_restore(
    ctx: Context, vm_name: str, rp_id: str, target: Path, fmt: str | None, force: bool, disks: list[str] | None
) -> RestorePlan:
    from vmvault.connectors.registry import connector_for

    if fmt is not None and fmt not in FORMATS:
        raise InvalidInput(f"unknown disk format '{fmt}'", hint="use --format raw or --format qcow2")
    with ctx.catalog.read() as s:
        vm, point = usable_point(s, vm_name, rp_id)
        vault = repos.vault_by_id(s, point.vault_id)
        point_disks = [(str(d["name"]), str(d.get("sourceFormat") or "raw")) for d in point.disks]
        # the file from which the VM can be defined again, beside its disks (its kind's: restore_vm.py)
        template = connector_for(vm.kind).template_name(vm_name)
    chosen = _choose_disks(vm_name, rp_id, point_disks, disks)
    files = [f"{name}.{fmt or source}" for name, source in chosen]
    _check_target(ctx, target, files + ([template] if template else []), force)
    return RestorePlan(vm_name, rp_id, vault, target, fmt, force, disks)


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
    if target.exists() and not target.is_dir():
        raise InvalidInput(f"target {target} is not a directory", hint="pass a directory to --target-dir")
    refuse_registered(ctx, [target / name for name in files])
    existing = [name for name in files if (target / name).exists()]
    if existing and not force:
        raise InvalidInput(
            f"target directory {target} already holds {', '.join(existing)}",
            hint="choose another --target-dir, or pass --force to overwrite",
        )


def _run_restore(ctx: Context, plan: RestorePlan, run: JobRun) -> list[Path]:
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
    recheck_dir(ctx, Rule.RESTORES, plan.target_dir)
    # The vault lock, shared, while we read: no garbage collection sweeps meanwhile; and a pin, so
    # retention leaves the point alone until we are done (vault/lock.py, docs/design.md).
    with opened_vault(ctx, plan.vault) as vault, shared(vault, cancel=run.cancel):
        vault.sync_index()  # packs a sweep deleted before we had the lock
        manifest: Any = vault.read_manifest(plan.rp_id)
        tag = record_partial_files(ctx, run.job_id, plan.target_dir)
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


def record_partial_files(ctx: Context, job_id: str, target_dir: Path) -> str:
    """Record, before writing, where this restore's partial files go: if its process dies, the
    next command that reaps the job deletes them (jobs.remove_partial_files)."""
    tag = "j" + job_id.replace("-", "")[:16]
    with ctx.catalog.write() as s:
        current = repos.get_job(s, job_id)
        where = {"dir": str(target_dir), "pattern": f".*.vmvault-partial-{tag}*"}
        repos.update_job_details(s, job_id, {**(current.details or {}), "partialFiles": where})
    return tag

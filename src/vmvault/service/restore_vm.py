"""Restore a recovery point as a new VM, write the template beside restored disks, replace a VM's disks.

docs/restore.md. Every operation is a Restore job; everything refused is refused before the job
starts, changing nothing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import VaultRow, VmRow
from vmvault.connectors.contract import Connector
from vmvault.errors import InvalidInput, PathNotAllowed, StorageError
from vmvault.service.context import Context
from vmvault.service.jobs import JobOutcome, JobRun, Operation, ProgressCallback, create_job, run_job
from vmvault.service.paths import DEFAULT_RESTORES, PathPolicy, Rule, allowed, recheck_dir, refuse_registered
from vmvault.service.softdelete import resolve_point, usable_point
from vmvault.service.validate import absolute, check_name
from vmvault.service.vaultio import check_readable
from vmvault.service.views import JsonDict
from vmvault.settings import Settings

FORMATS = ("raw", "qcow2")
SPACE_MARGIN = 64 << 20
RESTORE_PIN_TTL_S = 24 * 3600.0
TEST_FAIL_AFTER_SWAP = "VMVAULT_TEST_FAIL_AFTER_SWAP"  # test-only: fail replace-disks after the first swap


def connector_of(definition: JsonDict | None) -> Any:
    """The connector of a VM's (or a point's) kind (connectors/registry.py)."""
    from vmvault.connectors.registry import connector_for

    return connector_for((definition or {}).get("kind"))


# ---- the template beside restored disks (restore disks) ----------------------------------------------------


def write_disks_template(
    target_dir: Path, manifest: Any, written: list[Path], vm_name: str, force: bool = False
) -> Path | None:
    """The file from which the point's VM can be defined again, beside its restored disks (None: none).

    Its kind is the point's: a plain QEMU VM's JSON template, a libvirt domain's XML.
    """
    definition = dict(manifest.vm_definition or {})
    in_point = [d.name for d in manifest.disks]
    out = connector_of(definition).disks_template(
        str(target_dir), definition, vm_name, manifest.rp_id, in_point, _written(manifest, written), force=force
    )
    return Path(out) if out is not None else None


def convert_image(raw: Path, dest: Path) -> None:
    """A restored raw image as qcow2, by the disk-image connector's tools (the engine writes raw)."""
    from vmvault.connectors.registry import images

    images().convert_to_qcow2(str(raw), str(dest))


def _written(manifest: Any, paths: list[Path]) -> list[Any]:
    """The restored disks as a connector reads them: name, path, format and the point's size."""
    from vmvault.connectors.contract import WrittenDisk

    sizes = {d.name: d.size for d in manifest.disks}
    return [WrittenDisk(p.stem, str(p), p.suffix.lstrip("."), sizes.get(p.stem, 0)) for p in paths]


# ---- restore vm ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmRestorePlan:
    vm_name: str
    rp_id: str
    new_name: str
    vault: VaultRow
    target_dir: Path
    fmt: str | None
    start: bool
    disk_files: list[Path]
    kind: str  # the source VM's: its connector makes the copy
    source_definition: JsonDict

    def request(self) -> Any:
        from vmvault.connectors.contract import NewVmRequest

        return NewVmRequest(self.vm_name, self.rp_id, self.new_name, str(self.target_dir), self.source_definition)


def restore_vm(
    ctx: Context,
    vm_name: str,
    rp_id: str,
    new_name: str,
    *,
    target_dir: str | Path | None = None,
    fmt: str | None = None,
    start: bool = False,
    instant: bool = False,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> JobOutcome[JsonDict]:
    """Restore a point as a new VM of the source VM's kind (defined, registered; started with start)."""
    from vmvault.service.hostvms import host_elsewhere

    host = host_elsewhere(ctx, vm_name)
    if host is not None:  # a VM of another host (vm add --host): its agent makes the copy there
        return queue_new_vm_on_host(ctx, vm_name, rp_id, new_name, host, target_dir, fmt, start, instant, cancel)
    if target_dir is not None:  # API/portal callers: inside the allowed restore roots, resolved (service/paths.py)
        target_dir = allowed(ctx, Rule.RESTORES, target_dir)
    if instant:  # runs at once on the vault's export, copied in the background (service/instant_restore.py)
        from vmvault.service.instant_restore import restore_instant

        return restore_instant(ctx, vm_name, rp_id, new_name, target_dir=target_dir, fmt=fmt, cancel=cancel)
    plan = plan_new_vm(ctx, vm_name, rp_id, new_name, target_dir, fmt, start)
    job = create_job(ctx, Operation.RESTORE, vm=vm_name, vault=plan.vault.name)

    def work(run: JobRun) -> JsonDict:
        return _run_vm_restore(ctx, plan, run)

    return run_job(ctx, job, work, on_progress=on_progress, cancel=cancel)


# ---- a VM of another host: its agent restores it as a new VM there (service/agentrun.py) -----------


def queue_new_vm_on_host(
    ctx: Context, vm_name: str, rp_id: str, new_name: str, host: str, target_dir: str | Path | None,
    fmt: str | None, start: bool, instant: bool, cancel: threading.Event | None = None,
) -> JobOutcome[JsonDict]:  # fmt: skip
    """Queue the Restore job for the agent of the VM's host; returned InProgress (follow_new_vm; an
    instant restore once its VM runs there, the job going on with the copy).

    target_dir is a path on that host (default /var/lib/vmvault-restores/vms/NEW), checked there
    against its agent's --allow-restores roots; the copy is a VM of that host."""
    from vmvault.service.hostvms import host_path, refuse_secondary
    from vmvault.service.jobs import show_job

    if instant and fmt not in (None, "qcow2"):
        raise InvalidInput(
            "an instant restore writes qcow2 disks (an overlay on the vault's export)",
            hint="leave out --format, or drop --instant to restore raw disks",
        )
    fmt = "qcow2" if instant else fmt
    refuse_secondary(vm_name, host, "restore")
    _vm, _point_row, vault = checked_request(ctx, vm_name, rp_id, new_name, fmt)
    raw = str(target_dir) if target_dir is not None else f"{DEFAULT_RESTORES[0]}/vms/{new_name}"
    target = host_path(vm_name, raw, what="target directory")
    record = {"mode": "vm", "recoveryPoint": rp_id, "newVm": new_name, "targetDir": target, "format": fmt,
              "start": start or instant, "instant": instant, "host": host}  # fmt: skip
    job = create_job(ctx, Operation.RESTORE, vm=vm_name, vault=vault.name, queued=True, details={"restore": record})
    if instant:  # its agent runs it there (service/agentinstant.py): back once the new VM runs, as locally
        from vmvault.service.instant_restore import wait_until_running

        return wait_until_running(ctx, job.id, cancel)
    return JobOutcome(job=show_job(ctx, job.id))


NEW_VM_RESULT = ("name", "id", "disks", "definitionFile", "launchScript", "started", "uuid")


def follow_new_vm(
    ctx: Context, job_id: str, *, on_progress: ProgressCallback | None = None, cancel: threading.Event | None = None
) -> JobOutcome[JsonDict]:
    """Wait for a restore as a new VM its VM's host's agent runs, to its end; result: the new VM."""
    from vmvault.service.restores import followed

    job, record = followed(ctx, job_id, on_progress, cancel)
    return JobOutcome(job=job, result={k: record[k] for k in NEW_VM_RESULT if k in record} or None)


def plan_on_host(package: JsonDict, target: Path) -> VmRestorePlan:
    """On the agent: the plan of a claimed restore as a new VM, refused as plan_new_vm refuses
    (the connector's own refusals, files in the way, space), before anything is written."""
    from vmvault.connectors.registry import connector_for

    asked, vm = package["restore"], package["vm"]
    fmt = str(asked["format"]) if asked.get("format") else None
    if fmt is not None and fmt not in FORMATS:
        raise InvalidInput(f"the server asked for disk format {fmt!r}", hint="upgrade the server and the agent")
    new_name = str(asked["newVm"])
    check_name("VM", new_name)
    info = package["vault"]
    vault = VaultRow(name=str(info["name"]), uuid=str(info["uuid"]), storage_dir=str(info["storage"]))
    disk_files = [target / str(f) for f in asked.get("files") or []]
    plan = VmRestorePlan(str(vm["name"]), str(asked["recoveryPoint"]), new_name, vault, target, fmt,
                         bool(asked.get("start")), disk_files, str(vm["kind"]),
                         dict(vm.get("definition") or {}))  # fmt: skip
    connector = connector_for(plan.kind)
    connector.refuse_new_vm(plan.request())
    in_the_way = connector.in_the_way(plan.request())
    if in_the_way:
        raise InvalidInput(f"files are in the way of the restored VM '{new_name}': {', '.join(in_the_way)}",
                           hint="remove them, or choose another --target-dir")  # fmt: skip
    _check_space(target, int(asked.get("bytes") or 0))
    return plan


def _point(ctx: Context, vm_name: str, rp_id: str) -> tuple[VmRow, Any, VaultRow]:
    with ctx.catalog.read() as s:
        vm, point = usable_point(s, vm_name, rp_id)
        vault = repos.vault_by_id(s, point.vault_id)
        check_readable(vault)  # --from-secondary on an LRS vault: refused before any job or directory
        s.expunge_all()
    return vm, point, vault


def checked_request(
    ctx: Context, vm_name: str, rp_id: str, new_name: str, fmt: str | None
) -> tuple[VmRow, Any, VaultRow]:
    """What every restore as a new VM refuses first: a bad format or name, a name taken, a point
    that is unknown, soft deleted or failed verification."""
    from vmvault.service.vms import _refuse_taken

    if fmt is not None and fmt not in FORMATS:
        raise InvalidInput(f"unknown disk format '{fmt}'", hint="use --format raw or --format qcow2")
    check_name("VM", new_name)
    _refuse_taken(ctx, new_name)
    return _point(ctx, vm_name, rp_id)


def default_target(settings: Settings, shared: bool, new_name: str) -> Path:
    """A new VM's directory without --target-dir. A kind whose VMs' files another user opens (shared:
    libvirt's QEMU as libvirt-qemu) restores beside the home, never in it: the home is 0700."""
    return (settings.restores_dir if shared else settings.home) / "vms" / new_name


def make_target_dir(connector: Connector, target_dir: Path) -> bool:
    """Create a new VM's directory and its missing parents, each opened to the VM's hypervisor user
    (share_with_vm 0710): under `serve`'s systemd UMask=0077 a parent made 0700 would stop
    libvirt's QEMU. Directories that exist keep their mode (vmvault never loosens one).
    True: target_dir itself was made here (a failed restore removes it again)."""
    missing: list[Path] = []
    probe = target_dir
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        connector.share_with_vm(str(directory), 0o710)
    return bool(missing)


def plan_new_vm(
    ctx: Context, vm_name: str, rp_id: str, new_name: str, target: str | Path | None, fmt: str | None, start: bool
) -> VmRestorePlan:
    """Everything refused before the job: the request, what the connector refuses, files in the way, space."""
    from vmvault.connectors.registry import connector_for

    vm, point, vault = checked_request(ctx, vm_name, rp_id, new_name, fmt)
    connector = connector_for(vm.kind)
    shared = connector.capabilities().shared_target
    target_dir = absolute(target) if target is not None else default_target(ctx.settings, shared, new_name)
    disks = [(str(d["name"]), str(d.get("sourceFormat") or "raw")) for d in point.disks]
    disk_files = [target_dir / f"{name}.{fmt or source}" for name, source in disks]
    plan = VmRestorePlan(vm_name, rp_id, new_name, vault, target_dir, fmt, start, disk_files, vm.kind,
                         dict(vm.definition or {}))  # fmt: skip
    connector.refuse_new_vm(plan.request())
    if target_dir.exists() and not target_dir.is_dir():
        raise InvalidInput(f"target {target_dir} is not a directory", hint="pass a directory to --target-dir")
    in_the_way = [str(p) for p in disk_files if p.exists()] + connector.in_the_way(plan.request())
    if in_the_way:
        raise InvalidInput(
            f"files are in the way of the restored VM '{new_name}': {', '.join(in_the_way)}",
            hint="remove them, or choose another --target-dir",
        )
    _check_space(target_dir, sum(int(d.get("storedBytes") or d.get("size") or 0) for d in point.disks))
    return plan


def _check_space(target_dir: Path, needed: int) -> None:
    probe = target_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + SPACE_MARGIN:
        raise StorageError(
            f"not enough free space in {probe}: the restore needs {needed + SPACE_MARGIN} bytes "
            f"({needed} of disk data and a 64 MiB margin), {free} are free",
            hint="free space there, or choose another --target-dir",
        )


def _run_vm_restore(ctx: Context, plan: VmRestorePlan, run: JobRun) -> JsonDict:
    """The point's disks, then the copy defined by the connector and registered in this catalog."""
    from vmvault.service.restores import record_partial_files
    from vmvault.service.vaultio import opened_vault

    def register(new_vm: Any) -> JsonDict:
        row = register_new_vm(ctx, plan.new_name, new_vm)
        return {"name": row.name, "id": row.id, **new_vm.view, "started": False}

    with opened_vault(ctx, plan.vault) as vault:
        view, new_vm = build_new_vm(vault, plan, run, lambda d: recheck_dir(ctx, Rule.RESTORES, d),
                                    lambda d: record_partial_files(ctx, run, d), register)  # fmt: skip
    return start_if_asked(plan, new_vm, view)


def build_new_vm(
    vault: Any, plan: VmRestorePlan, run: Any, recheck: Any, mark_partial: Any, register: Any
) -> tuple[JsonDict, Any]:
    """The point's disks, then the copy the connector defines, then register(new_vm) (this catalog;
    on an agent, the server records it at the job's end); a failure undoes it all. The one code of a
    server, a CLI and an agent (service/agentrun.py)."""
    from vmvault.connectors.registry import connector_for

    connector = connector_for(plan.kind)
    request = plan.request()
    created: list[Path] = []
    new_vm = None
    made_dir = False
    try:
        made_dir = make_target_dir(connector, plan.target_dir)  # its hypervisor must reach the disks it is handed
        recheck(plan.target_dir)

        def check(m: Any) -> None:  # before any disk is written
            connector.check_point(request, dict(m.vm_definition or {}))

        manifest, paths = point_disks_into(vault, plan.rp_id, plan.target_dir, plan.fmt, None, run, check,
                                           mark_partial)  # fmt: skip
        created += paths
        in_point = [d.name for d in manifest.disks]
        new_vm = connector.create_new_vm(request, dict(manifest.vm_definition), in_point, _written(manifest, paths))
        created += [Path(f) for f in new_vm.files]
        view: JsonDict = register(new_vm)
    except BaseException:
        if new_vm is not None:
            connector.remove_new_vm(new_vm)
        for path in created:
            path.unlink(missing_ok=True)
        if made_dir:
            with contextlib.suppress(OSError):
                plan.target_dir.rmdir()
        raise
    return view, new_vm


def start_if_asked(plan: VmRestorePlan, new_vm: Any, view: JsonDict) -> JsonDict:
    from vmvault.connectors.registry import connector_for

    if plan.start:
        connector_for(plan.kind).start_new_vm(new_vm)
        view["started"] = True
    return view


def _restore_point_disks(
    ctx: Context, vault_row: VaultRow, rp_id: str, target: Path, fmt: str | None, disks: list[str] | None,
    run: JobRun, check: Any = None,
) -> tuple[Any, list[Path]]:  # fmt: skip
    from vmvault.service.restores import record_partial_files
    from vmvault.service.vaultio import opened_vault

    with opened_vault(ctx, vault_row) as vault:
        return point_disks_into(vault, rp_id, target, fmt, disks, run, check,
                                lambda d: record_partial_files(ctx, run, d))  # fmt: skip


def point_disks_into(
    vault: Any, rp_id: str, target: Path, fmt: str | None, disks: list[str] | None, run: Any, check: Any,
    mark_partial: Any,
) -> tuple[Any, list[Path]]:  # fmt: skip
    """The point's disks (or some) written into target, under the vault's shared lock and a pin."""
    from vmvault.engine.restore import run_restore
    from vmvault.vault.lock import pinned, shared

    with shared(vault, cancel=run.cancel):
        vault.sync_index()
        manifest: Any = vault.read_manifest(rp_id)
        if check is not None:
            check(manifest)
        tag = mark_partial(target)  # a killed restore's partial files are found again
        with pinned(vault, manifest, f"restore job {run.job_id}", RESTORE_PIN_TTL_S, required=False):
            paths = run_restore(vault, manifest, target, fmt=fmt, disks=disks, on_progress=run.progress,
                                cancel=run.cancel, partial_tag=tag, convert=convert_image)  # fmt: skip
    return manifest, [Path(p) for p in paths]


def register_new_vm(ctx: Context, name: str, vm: Any, host: str | None = None) -> VmRow:
    """The copy a connector defined, in the catalog (its kind, disk records and definition; host: a
    copy an agent made on its host)."""
    from vmvault.service.vms import _refuse_taken_in

    row = VmRow(id=str(uuid.uuid4()), name=name, kind=vm.kind, disks=vm.disks, definition=vm.definition,
                created=now_iso(), host=host)  # fmt: skip
    with ctx.catalog.write() as s:
        _refuse_taken_in(s, name)
        repos.add_vm(s, row)
    return row


# ---- replace disks ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplacePlan:
    vm_name: str
    vm_id: str
    rp_id: str
    vault: VaultRow
    disks: list[tuple[str, Path, str]]  # (name, current path, format)


def replace_disks(
    ctx: Context,
    vm_name: str,
    rp_id: str,
    *,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> JobOutcome[JsonDict]:
    """Overwrite a stopped VM's disks with the point's: all restored and verified first, then swapped."""
    from vmvault.service.hostvms import host_elsewhere

    rp_id = resolve_point(ctx, vm_name, rp_id)  # "latest" from every face (CLI, API, portal)
    host = host_elsewhere(ctx, vm_name)
    if host is not None:  # a VM of another host (vm add --host): its agent swaps its disks there
        return queue_replace_on_host(ctx, vm_name, rp_id, host)
    plan = _plan_replace(ctx, vm_name, rp_id)
    job = create_job(ctx, Operation.RESTORE, vm=vm_name, vault=plan.vault.name)

    def work(run: JobRun) -> JsonDict:
        return _run_replace(ctx, plan, run)

    return run_job(ctx, job, work, on_progress=on_progress, cancel=cancel)


def _plan_replace(ctx: Context, vm_name: str, rp_id: str) -> ReplacePlan:
    from vmvault.connectors.registry import images

    vm, point, vault = _point(ctx, vm_name, rp_id)
    _refuse_running(vm)
    chosen: list[tuple[str, Path, str]] = []
    sizes = []
    for name, raw, fmt, needed in replaced_disks(vm, point, rp_id):
        path = _replaceable(ctx, vm.name, Path(raw))
        images().refuse_locked(str(path))
        chosen.append((name, path, fmt))
        sizes.append((path, needed))
    for path, needed in sizes:
        _check_space(path.parent, needed)
    return ReplacePlan(vm_name, vm.id, rp_id, vault, chosen)


def replaced_disks(vm: VmRow, point: Any, rp_id: str) -> list[tuple[str, str, str, int]]:
    """The point's disks the VM has: (name, the VM's path, its recorded format, bytes to restore);
    refused when the VM lacks one of them."""
    from vmvault.service.vms import recorded_format

    current = {str(d["name"]): str(d["path"]) for d in vm.disks or []}
    missing = [str(d["name"]) for d in point.disks if str(d["name"]) not in current]
    if missing or not point.disks:
        raise InvalidInput(
            f"VM '{vm.name}' has no disk {', '.join(missing) or 'in common with'} of recovery point '{rp_id}'",
            hint="restore the point's disks with: vmvault restore disks",
        )
    # The format is never guessed from the image, whose header the guest wrote.
    return [(str(d["name"]), current[str(d["name"])], recorded_format(vm, str(d["name"])),
             int(d.get("storedBytes") or d.get("size") or 0)) for d in point.disks]  # fmt: skip


def _replaceable(ctx: Context, vm_name: str, path: Path) -> Path:
    """A disk replace-disks may overwrite: not another VM's too; for API callers, in the allowed disk roots."""
    refuse_registered(ctx, [path], allow_vm=vm_name)
    if ctx.paths is not None:
        ctx.paths.check(Rule.DISKS, path)
    return path


def _refuse_running(vm: VmRow) -> None:
    from vmvault.connectors.registry import connector_for

    connector_for(vm.kind).refuse_running(vm.name, dict(vm.definition or {}))


def _run_replace(ctx: Context, plan: ReplacePlan, run: JobRun) -> JsonDict:
    def restore_one(stage: Path, fmt: str, name: str) -> tuple[Any, list[Path]]:
        return _restore_point_disks(ctx, plan.vault, plan.rp_id, stage, fmt, [name], run)

    replaced = swap_point_disks(plan, restore_one, lambda _path: None)
    _reset_tracking(ctx, plan.vm_id)
    return {"vm": plan.vm_name, "point": plan.rp_id, "replaced": replaced}


def swap_point_disks(plan: ReplacePlan, restore_one: Any, recheck: Any) -> list[str]:
    """The point's disks restored and verified in a hidden stage directory beside each disk, then
    swapped in, each original kept beside it until every swap is done; any failure puts every
    original back. The one code of a server and an agent (service/agentrun.py); restore_one(stage,
    fmt, name) writes one disk of the point into stage; recheck(path) is called on every path just
    before it is created or renamed (an agent: still where its allowed roots said)."""
    from vmvault.connectors.registry import images

    tag = secrets.token_hex(4)
    staged: list[tuple[str, Path, Path]] = []  # (name, current, new)
    stages: list[Path] = []
    swapped: list[tuple[Path, Path]] = []  # (current, kept original)
    try:
        for name, path, fmt in plan.disks:
            stage = path.parent / f".vmvault-replace-{tag}"
            if stage not in stages:
                recheck(stage)
                stage.mkdir(mode=0o700)
                stages.append(stage)
            manifest, (new,) = restore_one(stage, fmt, name)
            size = next(d.size for d in manifest.disks if d.name == name)
            images().check_restored(str(new), fmt, size)
            images().drop_tracking(str(new))
            staged.append((name, path, new))
        for i, (_name, path, new) in enumerate(staged):
            kept = path.parent / f".{path.name}.vmvault-original-{tag}"
            recheck(path)
            recheck(kept)
            os.rename(path, kept)
            swapped.append((path, kept))
            os.rename(new, path)
            if i == 0 and os.environ.get(TEST_FAIL_AFTER_SWAP):
                raise StorageError(f"{TEST_FAIL_AFTER_SWAP}: injected failure after the first swap")
    except BaseException:
        for path, kept in reversed(swapped):
            os.replace(kept, path)  # every original back
        for stage in stages:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    for _path, kept in swapped:
        kept.unlink()
    for stage in stages:
        shutil.rmtree(stage, ignore_errors=True)
    return [str(p) for _n, p, _new in staged]


def _reset_tracking(ctx: Context, vm_id: str) -> None:
    """The new images carry no changed-block tracking: the catalog forgets it, the connector its own (checkpoints)."""
    from vmvault.connectors.registry import connector_for

    kind, definition = forget_tracking(ctx, vm_id)
    if definition is not None:
        connector_for(kind).disks_replaced(vm_id, definition)


def forget_tracking(ctx: Context, vm_id: str) -> tuple[str | None, JsonDict | None]:
    """The catalog's part of _reset_tracking (on a VM of another host, its agent does the connector's):
    the VM's kind and definition, None when it went."""
    with ctx.catalog.write() as s:
        row = repos.find_vm_by_id(s, vm_id)
        if row is not None and row.definition:
            row.definition = {**row.definition, "tracking": None}
        return (row.kind, dict(row.definition or {})) if row is not None else (None, None)


# ---- replace disks of a VM of another host: its agent swaps them there (service/agentrun.py) -----


def queue_replace_on_host(ctx: Context, vm_name: str, rp_id: str, host: str) -> JobOutcome[JsonDict]:
    """Queue the replace-disks job for the agent of the VM's host; returned InProgress (follow_replace).

    What the catalog can refuse is refused now (the point unusable, a disk of the point the VM lacks);
    the VM stopped, its images not held open, in the agent's allowed disk roots and the space beside
    them are checked there, before anything is written."""
    from vmvault.service.hostvms import host_path, refuse_secondary
    from vmvault.service.jobs import show_job

    refuse_secondary(vm_name, host, "replace its disks")
    vm, point, vault = _point(ctx, vm_name, rp_id)
    chosen = replaced_disks(vm, point, rp_id)
    paths = [host_path(vm_name, raw) for _name, raw, _fmt, _needed in chosen]
    record = {"mode": "replace", "recoveryPoint": rp_id, "disks": [name for name, *_ in chosen], "paths": paths,
              "host": host}  # fmt: skip
    job = create_job(ctx, Operation.RESTORE, vm=vm_name, vault=vault.name, queued=True, details={"restore": record})
    return JobOutcome(job=show_job(ctx, job.id))


def follow_replace(
    ctx: Context, job_id: str, *, on_progress: ProgressCallback | None = None, cancel: threading.Event | None = None
) -> JobOutcome[JsonDict]:
    """Wait for a replace-disks its VM's host's agent runs, to its end; result as replace_disks's."""
    from vmvault.service.restores import followed

    job, record = followed(ctx, job_id, on_progress, cancel)
    done = job["status"] == "Completed"
    result = {"vm": job.get("vm"), "point": record.get("recoveryPoint"), "replaced": record.get("replaced") or []}
    return JobOutcome(job=job, result=result if done else None)


def replace_package(ctx: Context, vm_name: str, rp_id: str) -> JsonDict:
    """On the server, when the agent claims the job: the point (still usable) and the VM's disks it
    replaces, as the catalog has them now. No secret."""
    vm, point, vault = _point(ctx, vm_name, rp_id)
    disks = [{"name": name, "path": path, "format": fmt, "bytes": needed}
             for name, path, fmt, needed in replaced_disks(vm, point, rp_id)]  # fmt: skip
    return {
        "vm": {"id": vm.id, "name": vm.name, "kind": vm.kind, "definition": dict(vm.definition or {})},
        "vault": {"name": vault.name, "uuid": vault.uuid, "storage": vault.storage_dir},
        "restore": {"mode": "replace", "recoveryPoint": point.id, "disks": disks},
    }


def plan_replace_on_host(package: JsonDict, paths: PathPolicy | None) -> tuple[ReplacePlan, Any]:
    """On the agent: the plan of a claimed replace-disks, refused before anything is written, and the
    recheck of each path just before it is written. The server (or whoever holds its token) does
    not choose which files of this host are overwritten: every disk (resolved, symlinks followed)
    and the folder of its stage and kept original lie in this host's allowed disk roots, and is an
    image file, not a disk of another VM of this host; then as on a server: the VM stopped, its images
    not held open, the space for the new image beside it."""
    from vmvault.connectors.registry import connector_for, images
    from vmvault.service.paths import disk_owners, refuse_owned

    asked, vm = package["restore"], package["vm"]
    vm_name, definition = str(vm["name"]), dict(vm.get("definition") or {})
    owners = disk_owners((str(d.get("vm")), [str(p) for p in d.get("paths") or []])
                         for d in package.get("hostDisks") or [])  # fmt: skip
    chosen: list[tuple[str, Path, str]] = []
    sizes: list[tuple[Path, int]] = []
    for disk in asked.get("disks") or []:
        path = _disk_on_host(paths, vm_name, str(disk.get("path") or ""))
        refuse_owned(owners, [path], allow_vm=vm_name)
        fmt = str(disk.get("format") or "")
        if fmt not in FORMATS:
            raise InvalidInput(f"the server asked for disk format {fmt!r}", hint="upgrade the server and the agent")
        chosen.append((str(disk["name"]), path, fmt))
        sizes.append((path, int(disk.get("bytes") or 0)))
    if not chosen:
        raise InvalidInput(f"the server named no disk of VM '{vm_name}' to replace", hint="upgrade the server")
    for key in ("qmp", "guestAgent"):  # refuse_running talks to the VM's sockets: this host's allowed ones only
        if definition.get(key):
            _in_disk_roots(paths, vm_name, str(definition[key]))
    connector_for(str(vm["kind"])).refuse_running(vm_name, definition)
    for _name, path, _fmt in chosen:
        images().refuse_locked(str(path))
    for path, needed in sizes:
        _check_space(path.parent, needed)
    info = package["vault"]
    vault = VaultRow(name=str(info["name"]), uuid=str(info["uuid"]), storage_dir=str(info["storage"]))
    plan = ReplacePlan(vm_name, str(vm["id"]), str(asked["recoveryPoint"]), vault, chosen)
    return plan, lambda path: _still_in_disk_roots(paths, vm_name, path)


def _in_disk_roots(paths: PathPolicy | None, vm_name: str, raw: str) -> Path:
    """raw resolved, in this agent's allowed disk roots (--allow-disks), or PathNotAllowed naming the fix."""
    hint = ("allow its folder on this host: vmvault agent run --allow-disks DIR (or allow-disks in the agent's "
            "HOME/settings.toml)")  # fmt: skip
    if paths is None:
        raise PathNotAllowed(f"disk path {raw} of VM '{vm_name}': this agent has no allowed disk roots", hint=hint)
    try:
        return paths.check(Rule.DISKS, raw)
    except PathNotAllowed as exc:
        raise PathNotAllowed(f"{exc.message} on host of VM '{vm_name}'", hint=hint) from None


def _disk_on_host(paths: PathPolicy | None, vm_name: str, raw: str) -> Path:
    """A disk replace-disks may swap on this host: an image file, resolved, whose folder (where its new
    image is staged and its original kept) is in the allowed disk roots too."""
    path = _in_disk_roots(paths, vm_name, raw)
    if path.is_symlink() or not path.is_file():  # a block device (an LVM link), a folder, nothing
        raise InvalidInput(
            f"disk {raw} of VM '{vm_name}' is not an image file on this host ({path})",
            hint="replace-disks swaps image files; restore the point's disks with vmvault restore disks and copy "
            "them onto the device while the VM is stopped",
        )
    _in_disk_roots(paths, vm_name, str(path.parent))
    return path


def _still_in_disk_roots(paths: PathPolicy | None, vm_name: str, path: Path) -> None:
    """Just before a path is created or renamed: it still resolves to itself in the allowed roots (no
    symlink swapped in on the way)."""
    if _in_disk_roots(paths, vm_name, str(path)) != path:
        assert paths is not None
        raise paths.outside_error(Rule.DISKS, str(path), Path(os.path.realpath(path)))

"""Restore a recovery point as a new VM, write the template beside restored disks, replace a VM's disks.

docs/restore.md. Every operation is a Restore job; everything refused is refused before the job
starts, changing nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import VaultRow, VmRow
from vmvault.errors import HypervisorError, IntegrityError, InvalidInput, StorageError, VmRunning
from vmvault.service.context import Context
from vmvault.service.jobs import JobOutcome, JobRun, Operation, ProgressCallback, create_job, run_job
from vmvault.service.paths import Rule, allowed, recheck_dir, refuse_registered
from vmvault.service.softdelete import usable_point
from vmvault.service.validate import absolute, check_name
from vmvault.service.views import JsonDict

FORMATS = ("raw", "qcow2")
SPACE_MARGIN = 64 << 20
BOOT_TIMEOUT = float(os.environ.get("VMVAULT_RESTORE_BOOT_TIMEOUT", "300"))
RESTORE_PIN_TTL_S = 24 * 3600.0
TEST_FAIL_AFTER_SWAP = "VMVAULT_TEST_FAIL_AFTER_SWAP"  # test-only: fail replace-disks after the first swap


def template_file(target_dir: Path, vm_name: str) -> Path:
    return target_dir / f"{vm_name}-template.json"


# ---- the template beside restored disks (restore disks) ----------------------------------------------------


def write_disks_template(
    target_dir: Path, manifest: Any, written: list[Path], vm_name: str, force: bool = False
) -> Path | None:
    """Write <vm>-template.json in target_dir for a plain QEMU VM's point (None: a disk-only VM, no template)."""
    from vmvault.connectors.qemu.template import DiskTarget, build_template, has_definition

    definition = dict(manifest.vm_definition or {})
    if definition.get("kind") == "libvirt" and definition.get("domainXml"):  # domain XML (service/restore_libvirt.py)
        from vmvault.service.restore_libvirt import write_domain_template

        return write_domain_template(target_dir, manifest, written, vm_name, force)
    if not has_definition(definition):
        return None
    sizes = {d.name: d.size for d in manifest.disks}
    targets = [DiskTarget(p.stem, p, p.suffix.lstrip("."), sizes.get(p.stem, 0)) for p in written]
    chosen = {t.name for t in targets}
    excluded = [d.name for d in manifest.disks if d.name not in chosen]
    name = f"{vm_name}-restored"
    template = build_template(
        definition, source_vm=vm_name, rp_id=manifest.rp_id, name=name, disks=targets, excluded=excluded,
        run_dir=_run_dir(target_dir, name), log_dir=target_dir,
    )  # fmt: skip
    out = template_file(target_dir, vm_name)
    _write_new(out, json.dumps(template, indent=2) + "\n", force=force)
    return out


def _write_new(path: Path, text: str, *, force: bool = False, mode: int = 0o644) -> None:
    tmp = path.parent / f".{path.name}.vmvault-partial-{secrets.token_hex(4)}"
    tmp.write_text(text)
    tmp.chmod(mode)
    if not force and path.exists():
        tmp.unlink()
        raise InvalidInput(f"{path} is in the way", hint="remove it or choose another target directory")
    os.replace(tmp, path)


def _run_dir(anchor: Path, name: str) -> Path:
    """A short directory for the copy's unix sockets (108-byte limit)."""
    key = hashlib.sha256(f"{anchor}\0{name}".encode()).hexdigest()[:12]
    base = (
        Path("/run/vmvault/vms")
        if os.access("/run", os.W_OK)
        else Path(tempfile.gettempdir()) / f"vmvault-{os.getuid()}"
    )
    return base / key


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
    extra_files: list[Path]


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
    """Restore a point of a plain QEMU VM as a new VM (defined, registered; started with start)."""
    from vmvault.service import restore_libvirt

    if target_dir is not None:  # API/portal callers: inside the allowed restore roots, resolved (service/paths.py)
        target_dir = allowed(ctx, Rule.RESTORES, target_dir)
    if instant:  # runs at once on the vault's export, copied in the background (service/instant_restore.py)
        from vmvault.service.instant_restore import restore_instant

        return restore_instant(ctx, vm_name, rp_id, new_name, target_dir=target_dir, fmt=fmt, cancel=cancel)
    if restore_libvirt.is_libvirt_vm(ctx, vm_name):  # a new libvirt domain (service/restore_libvirt.py)
        return restore_libvirt.restore_vm(ctx, vm_name, rp_id, new_name, target_dir=target_dir, fmt=fmt, start=start,
                                          on_progress=on_progress, cancel=cancel)  # fmt: skip
    plan = _plan_vm(ctx, vm_name, rp_id, new_name, target_dir, fmt, start)
    job = create_job(ctx, Operation.RESTORE, vm=vm_name, vault=plan.vault.name)

    def work(run: JobRun) -> JsonDict:
        return _run_vm_restore(ctx, plan, run)

    return run_job(ctx, job, work, on_progress=on_progress, cancel=cancel)


def _point(ctx: Context, vm_name: str, rp_id: str) -> tuple[VmRow, Any, VaultRow]:
    with ctx.catalog.read() as s:
        vm, point = usable_point(s, vm_name, rp_id)
        vault = repos.vault_by_id(s, point.vault_id)
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


def _plan_vm(
    ctx: Context, vm_name: str, rp_id: str, new_name: str, target: str | Path | None, fmt: str | None, start: bool
) -> VmRestorePlan:
    vm, point, vault = checked_request(ctx, vm_name, rp_id, new_name, fmt)
    if vm.kind != "qmp":
        raise InvalidInput(
            f"VM '{vm_name}' has no VM definition: use restore disks",
            hint=f"vmvault restore disks {vm_name} --rp {rp_id} --target-dir DIR",
        )
    target_dir = absolute(target) if target is not None else ctx.settings.home / "vms" / new_name
    if target_dir.exists() and not target_dir.is_dir():
        raise InvalidInput(f"target {target_dir} is not a directory", hint="pass a directory to --target-dir")
    disks = [(str(d["name"]), str(d.get("sourceFormat") or "raw")) for d in point.disks]
    disk_files = [target_dir / f"{name}.{fmt or source}" for name, source in disks]
    extra = [target_dir / f"{new_name}.json", target_dir / f"{new_name}.sh", target_dir / f"{new_name}-serial.log",
             target_dir / f"{new_name}.pid", target_dir / f"{new_name}-qemu.log"]  # fmt: skip
    in_the_way = [str(p) for p in disk_files + extra if p.exists()]
    run_dir = _run_dir(target_dir, new_name)
    if run_dir.exists() and any(run_dir.iterdir()):
        in_the_way.append(str(run_dir))
    if in_the_way:
        raise InvalidInput(
            f"files are in the way of the restored VM '{new_name}': {', '.join(in_the_way)}",
            hint="remove them, or choose another --target-dir",
        )
    _check_space(target_dir, sum(int(d.get("storedBytes") or d.get("size") or 0) for d in point.disks))
    return VmRestorePlan(vm_name, rp_id, new_name, vault, target_dir, fmt, start, disk_files, extra)


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
    from vmvault.connectors.qemu.template import DiskTarget, build_template, refuse_without_definition

    created: list[Path] = []
    made_dir = not plan.target_dir.exists()
    try:
        plan.target_dir.mkdir(parents=True, exist_ok=True)
        recheck_dir(ctx, Rule.RESTORES, plan.target_dir)

        def check(m: Any) -> None:
            refuse_without_definition(m.vm_definition, plan.vm_name)

        manifest, paths = _restore_point_disks(
            ctx, plan.vault, plan.rp_id, plan.target_dir, plan.fmt, None, run, check=check
        )
        created += paths
        sizes = {d.name: d.size for d in manifest.disks}
        targets = [DiskTarget(p.stem, p, p.suffix.lstrip("."), sizes.get(p.stem, 0)) for p in paths]
        run_dir = _run_dir(plan.target_dir, plan.new_name)
        template = build_template(
            dict(manifest.vm_definition), source_vm=plan.vm_name, rp_id=plan.rp_id, name=plan.new_name,
            disks=targets, excluded=[], run_dir=run_dir, log_dir=plan.target_dir,
        )  # fmt: skip
        definition_file, script = plan.target_dir / f"{plan.new_name}.json", plan.target_dir / f"{plan.new_name}.sh"
        _write_new(definition_file, json.dumps(template, indent=2) + "\n")
        created.append(definition_file)
        _write_new(script, _launch_script(template, run_dir), mode=0o755)
        created.append(script)
        row = _register(ctx, plan, template, definition_file, script, manifest)
        view: JsonDict = {"name": row.name, "id": row.id, "uuid": template["uuid"], "macs": template["macs"],
                          "disks": [str(p) for p in paths], "definitionFile": str(definition_file),
                          "launchScript": str(script), "started": False}  # fmt: skip
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        if made_dir:
            with contextlib.suppress(OSError):
                plan.target_dir.rmdir()
        raise
    if plan.start:
        start_vm(template, script, plan.target_dir / f"{plan.new_name}-qemu.log")
        view["started"] = True
    return view


def _restore_point_disks(
    ctx: Context, vault_row: VaultRow, rp_id: str, target: Path, fmt: str | None, disks: list[str] | None,
    run: JobRun, check: Any = None,
) -> tuple[Any, list[Path]]:  # fmt: skip
    from vmvault.engine.restore import run_restore
    from vmvault.service.vaultio import opened_vault
    from vmvault.vault.lock import pinned, shared

    with opened_vault(ctx, vault_row) as vault, shared(vault, cancel=run.cancel):
        vault.sync_index()
        manifest: Any = vault.read_manifest(rp_id)
        if check is not None:
            check(manifest)
        with pinned(vault, manifest, f"restore job {run.job_id}", RESTORE_PIN_TTL_S, required=False):
            paths = run_restore(vault, manifest, target, fmt=fmt, disks=disks, on_progress=run.progress,
                                cancel=run.cancel)  # fmt: skip
    return manifest, [Path(p) for p in paths]


def _launch_script(template: JsonDict, run_dir: Path) -> str:
    cmd = " \\\n  ".join(shlex.quote(a) for a in template["qemu"]["cmdline"])
    return (
        "#!/bin/sh\n"
        f"# vmvault: VM {template['name']} restored from {template['sourceVm']} point {template['sourcePoint']}\n"
        f"mkdir -p -m 700 {shlex.quote(str(run_dir))}\n"
        f"exec {cmd}\n"
    )


def _register(ctx: Context, plan: VmRestorePlan, template: JsonDict, definition_file: Path, script: Path,
              manifest: Any) -> VmRow:  # fmt: skip
    from vmvault.service.vms import _refuse_taken_in

    old = dict(manifest.vm_definition)
    old_disks = {str(d.get("name")): d for d in old.get("disks") or []}
    disks = [{**{k: v for k, v in old_disks.get(d["name"], {}).items() if k in ("node", "device")},
              "name": d["name"], "path": d["path"], "format": d["format"], "virtualSize": d["virtualSize"]}
             for d in template["disks"]]  # fmt: skip
    definition: JsonDict = {
        "kind": "qmp",
        "qmp": template["sockets"]["qmp"],
        "guestAgent": template["sockets"]["guestAgent"],
        "disks": disks,
        "machine": template["machine"],
        "qemu": template["qemu"],
        "restoredFrom": {"vm": plan.vm_name, "point": plan.rp_id},
        "definitionFile": str(definition_file),
        "launchScript": str(script),
    }
    row = VmRow(
        id=str(uuid.uuid4()), name=plan.new_name, kind="qmp",
        disks=[{"name": d["name"], "path": d["path"], "format": d["format"],
                **({"chain": []} if d["format"] == "qcow2" else {})} for d in disks],  # written by vmvault
        definition=definition, created=now_iso(),
    )  # fmt: skip
    with ctx.catalog.write() as s:
        _refuse_taken_in(s, plan.new_name)
        repos.add_vm(s, row)
    return row


def start_vm(template: JsonDict, script: Path, log: Path, timeout: float = BOOT_TIMEOUT) -> None:
    """Run the launch script detached and wait until the guest agent answers (or QMP says running)."""
    from vmvault.connectors.guest_agent import GuestAgent
    from vmvault.connectors.qemu.qmp import QmpClient

    with open(log, "ab") as out:
        proc = subprocess.Popen(["/bin/sh", str(script)], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)  # fmt: skip
    agent, qmp = template["sockets"].get("guestAgent"), template["sockets"].get("qmp")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise HypervisorError(f"QEMU of the restored VM {template['name']} exited ({proc.returncode}): {tail}",
                                  hint=f"see {log}")  # fmt: skip
        with contextlib.suppress(Exception):
            if agent:
                with GuestAgent(agent).connect(timeout=2):
                    return
            elif qmp:
                with QmpClient(qmp).connect(greeting_timeout=2) as client:
                    if client.query_status().get("running"):
                        return
        time.sleep(0.5)
    raise HypervisorError(
        f"the restored VM {template['name']} started, but its guest agent did not answer within {timeout:.0f} s",
        hint=f"it is still running; see its serial log {template.get('serialLog')}",
    )


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
    plan = _plan_replace(ctx, vm_name, rp_id)
    job = create_job(ctx, Operation.RESTORE, vm=vm_name, vault=plan.vault.name)

    def work(run: JobRun) -> JsonDict:
        return _run_replace(ctx, plan, run)

    return run_job(ctx, job, work, on_progress=on_progress, cancel=cancel)


def _plan_replace(ctx: Context, vm_name: str, rp_id: str) -> ReplacePlan:
    from vmvault.service.vms import recorded_format

    vm, point, vault = _point(ctx, vm_name, rp_id)
    _refuse_running(vm)
    current = {str(d["name"]): _replaceable(ctx, vm.name, Path(str(d["path"]))) for d in vm.disks or []}
    chosen: list[tuple[str, Path, str]] = []
    missing = []
    for d in point.disks:
        name = str(d["name"])
        if name not in current:
            missing.append(name)
            continue
        path = current[name]
        fmt = recorded_format(vm, name)  # never guessed from the image, whose header the guest wrote
        _refuse_locked(path)
        chosen.append((name, path, fmt))
    if missing or not chosen:
        raise InvalidInput(
            f"VM '{vm_name}' has no disk {', '.join(missing) or 'in common with'} of recovery point '{rp_id}'",
            hint="restore the point's disks with: vmvault restore disks",
        )
    for name, path, _fmt in chosen:
        _check_space(path.parent, int(next(int(d.get("storedBytes") or d.get("size") or 0)
                                            for d in point.disks if d["name"] == name)))  # fmt: skip
    return ReplacePlan(vm_name, vm.id, rp_id, vault, chosen)


def _refuse_locked(path: Path) -> None:
    """VmRunning when a QEMU holds the image (it takes QEMU's own lock for a moment)."""
    from vmvault.connectors.diskimage.imagelock import ImageLock
    from vmvault.connectors.diskimage.images import existing_image

    if existing_image(path).is_file():
        with ImageLock(path):
            pass


def _replaceable(ctx: Context, vm_name: str, path: Path) -> Path:
    """A disk replace-disks may overwrite: not another VM's too; for API callers, in the allowed disk roots."""
    refuse_registered(ctx, [path], allow_vm=vm_name)
    if ctx.paths is not None:
        ctx.paths.check(Rule.DISKS, path)
    return path


def _refuse_running(vm: VmRow) -> None:
    from vmvault.connectors.qemu.qmp import QemuNotRunning, QmpClient

    if vm.kind == "libvirt":  # service/restore_libvirt.py
        from vmvault.service.restore_libvirt import refuse_running_domain

        return refuse_running_domain(vm)
    socket = (vm.definition or {}).get("qmp") if vm.kind == "qmp" else None
    if not socket:
        return
    try:
        with QmpClient(str(socket)).connect(greeting_timeout=5):
            pass
    except QemuNotRunning:
        return
    except HypervisorError:
        pass  # busy socket: someone else talks to a running QEMU
    raise VmRunning(
        f"VM '{vm.name}' is running: its disks can only be replaced while it is stopped",
        hint="shut the VM down, then run restore replace-disks again",
    )


def _run_replace(ctx: Context, plan: ReplacePlan, run: JobRun) -> JsonDict:
    tag = secrets.token_hex(4)
    staged: list[tuple[str, Path, Path]] = []  # (name, current, new)
    stages: list[Path] = []
    swapped: list[tuple[Path, Path]] = []  # (current, kept original)
    try:
        for name, path, fmt in plan.disks:
            stage = path.parent / f".vmvault-replace-{tag}"
            if stage not in stages:
                stage.mkdir(mode=0o700)
                stages.append(stage)
            manifest, (new,) = _restore_point_disks(ctx, plan.vault, plan.rp_id, stage, fmt, [name], run)
            size = next(d.size for d in manifest.disks if d.name == name)
            _verify_image(new, fmt, size)
            _drop_vmvault_bitmaps(new)
            staged.append((name, path, new))
        for i, (_name, path, new) in enumerate(staged):
            kept = path.parent / f".{path.name}.vmvault-original-{tag}"
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
    _reset_tracking(ctx, plan.vm_id)
    return {"vm": plan.vm_name, "point": plan.rp_id, "replaced": [str(p) for _n, p, _new in staged]}


def _verify_image(path: Path, fmt: str, size: int) -> None:
    proc = subprocess.run(["qemu-img", "info", "--output=json", "-f", fmt, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise IntegrityError(f"the restored disk {path} does not open as {fmt}: {proc.stderr.strip()}")
    info = json.loads(proc.stdout)
    if int(info.get("virtual-size", -1)) != size:
        raise IntegrityError(f"the restored disk {path} has size {info.get('virtual-size')}, the point {size}")
    if fmt == "qcow2":
        check = subprocess.run(["qemu-img", "check", "-q", "-f", fmt, str(path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise IntegrityError(f"qemu-img check of the restored disk {path} failed: {check.stderr.strip()}")


def _drop_vmvault_bitmaps(path: Path) -> None:
    """Remove vmvault's bitmaps (vmv-*) from a qcow2: the next backup must not trust them."""
    proc = subprocess.run(["qemu-img", "info", "-f", "qcow2", "--output=json", str(path)], capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        return
    data = ((json.loads(proc.stdout).get("format-specific") or {}).get("data")) or {}
    for bitmap in data.get("bitmaps") or []:
        name = str(bitmap.get("name") or "")
        if name.startswith("vmv-"):
            subprocess.run(["qemu-img", "bitmap", "--remove", "-f", "qcow2", str(path), name], check=True,
                           capture_output=True)  # fmt: skip


def _reset_tracking(ctx: Context, vm_id: str) -> None:
    with ctx.catalog.write() as s:
        row = repos.find_vm_by_id(s, vm_id)
        if row is not None and row.definition:
            row.definition = {**row.definition, "tracking": None}
        libvirt = dict(row.definition or {}) if row is not None and row.kind == "libvirt" else None
    if libvirt is not None:  # its checkpoints' bitmaps went with the old images (service/restore_libvirt.py)
        from vmvault.service.restore_libvirt import reset_checkpoints

        reset_checkpoints(vm_id, libvirt)

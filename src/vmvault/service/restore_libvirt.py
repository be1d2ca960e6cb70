"""Restore a libvirt VM's point as a NEW libvirt domain, and the domain XML template of `restore disks`.

docs/restore.md (libvirt). The point's stored domain XML is rewritten by connectors/libvirt/template.py
(new name, UUID, MACs, paths inside the target directory, no runtime state) and defined with
defineXML; `--start` boots it and waits for its guest agent (through libvirt). Everything refused
is refused before the job starts; a failed job removes what it wrote and undefines what it defined.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import VaultRow, VmRow
from vmvault.errors import AlreadyExists, HypervisorError, InvalidInput
from vmvault.service.context import Context
from vmvault.service.jobs import JobOutcome, JobRun, Operation, ProgressCallback, create_job, run_job
from vmvault.service.validate import absolute
from vmvault.service.views import JsonDict

KIND_LIBVIRT = "libvirt"


def template_name(vm_name: str) -> str:
    return f"{vm_name}-domain.xml"


def is_libvirt_vm(ctx: Context, vm_name: str) -> bool:
    with ctx.catalog.read() as s:
        row = repos.find_vm(s, vm_name)
        return row is not None and row.kind == KIND_LIBVIRT


# ---- restore disks: the template ------------------------------------------------------------------------------


def write_domain_template(target_dir: Path, manifest: Any, written: list[Path], vm_name: str, force: bool) -> Path:
    """<vm>-domain.xml in target_dir: the point's domain pointing only at the restored disks (others left out)."""
    from vmvault.connectors.libvirt.template import RestoredFile, copy_domain_xml
    from vmvault.service.restore_vm import _write_new

    xml = str((manifest.vm_definition or {}).get("domainXml") or "")
    copy = copy_domain_xml(
        xml,
        name=f"{vm_name}-restored",
        disks=[RestoredFile(p.stem, p, p.suffix.lstrip(".")) for p in written],
        target_dir=target_dir,
        in_point={d.name for d in manifest.disks},
        source=f"restored from VM {vm_name} point {manifest.rp_id}; define it with: virsh define FILE",
    )
    out = target_dir / template_name(vm_name)
    _write_new(out, copy.xml, force=force)
    return out


# ---- restore vm ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LibvirtRestorePlan:
    vm_name: str
    rp_id: str
    new_name: str
    vault: VaultRow
    uri: str
    target_dir: Path
    fmt: str | None
    start: bool


def restore_vm(
    ctx: Context,
    vm_name: str,
    rp_id: str,
    new_name: str,
    *,
    target_dir: str | Path | None = None,
    fmt: str | None = None,
    start: bool = False,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> JobOutcome[JsonDict]:
    """Restore a libvirt VM's point as a new domain (defined, added to vmvault; booted with start)."""
    plan = _plan(ctx, vm_name, rp_id, new_name, target_dir, fmt, start)
    job = create_job(ctx, Operation.RESTORE, vm=vm_name, vault=plan.vault.name)

    def work(run: JobRun) -> JsonDict:
        return _run(ctx, plan, run)

    return run_job(ctx, job, work, on_progress=on_progress, cancel=cancel)


def _plan(
    ctx: Context, vm_name: str, rp_id: str, new_name: str, target: str | Path | None, fmt: str | None, start: bool
) -> LibvirtRestorePlan:
    from vmvault.connectors.libvirt import domain as lv
    from vmvault.service.restore_vm import _check_space, checked_request

    vm, point, vault = checked_request(ctx, vm_name, rp_id, new_name, fmt)
    uri = str((vm.definition or {}).get("connect") or lv.DEFAULT_URI)
    conn = lv.connect(uri)
    try:
        if lv.domain_named(conn, new_name) is not None:
            raise AlreadyExists(
                f"libvirt already has a domain named '{new_name}'", hint="choose another --name (virsh list --all)"
            )
    finally:
        conn.close()
    target_dir = absolute(target) if target is not None else ctx.settings.home / "vms" / new_name
    if target_dir.exists() and not target_dir.is_dir():
        raise InvalidInput(f"target {target_dir} is not a directory", hint="pass a directory to --target-dir")
    files = [target_dir / f"{d['name']}.{fmt or d.get('sourceFormat') or 'raw'}" for d in point.disks]
    files.append(target_dir / f"{new_name}.xml")
    _refuse_in_the_way(new_name, files + _predicted_files(vm, new_name, target_dir))
    _check_space(target_dir, sum(int(d.get("storedBytes") or d.get("size") or 0) for d in point.disks))
    return LibvirtRestorePlan(vm_name, rp_id, new_name, vault, uri, target_dir, fmt, start)


def _predicted_files(vm: VmRow, new_name: str, target_dir: Path) -> list[Path]:
    """The logs and NVRAM the copy will use, as the VM's current XML says (the point's is checked again)."""
    from vmvault.connectors.libvirt.template import copy_domain_xml

    xml = str((vm.definition or {}).get("domainXml") or "")
    if not xml:
        return []
    return copy_domain_xml(xml, name=new_name, disks=[], target_dir=target_dir, in_point=set()).files


def _refuse_in_the_way(new_name: str, files: list[Path]) -> None:
    in_the_way = [str(p) for p in files if p.exists()]
    if in_the_way:
        raise InvalidInput(
            f"files are in the way of the restored VM '{new_name}': {', '.join(in_the_way)}",
            hint="remove them, or choose another --target-dir",
        )


def _run(ctx: Context, plan: LibvirtRestorePlan, run: JobRun) -> JsonDict:
    from vmvault.connectors.libvirt import domain as lv
    from vmvault.connectors.libvirt.template import RestoredFile, copy_domain_xml
    from vmvault.service.restore_vm import _restore_point_disks, _write_new

    created: list[Path] = []
    made_dir = not plan.target_dir.exists()
    conn = lv.connect(plan.uri)
    dom: Any = None
    try:
        plan.target_dir.mkdir(parents=True, exist_ok=True)

        def check(manifest: Any) -> None:  # before any disk is written
            xml = str((manifest.vm_definition or {}).get("domainXml") or "")
            if not xml:
                raise InvalidInput(f"recovery point '{plan.rp_id}' holds no domain XML: use restore disks")
            probe = copy_domain_xml(xml, name=plan.new_name, disks=[], target_dir=plan.target_dir, in_point=set())
            _refuse_in_the_way(plan.new_name, probe.files)

        manifest, paths = _restore_point_disks(
            ctx, plan.vault, plan.rp_id, plan.target_dir, plan.fmt, None, run, check=check
        )
        created += paths
        copy = copy_domain_xml(
            str(manifest.vm_definition["domainXml"]),
            name=plan.new_name,
            disks=[RestoredFile(p.stem, p, p.suffix.lstrip(".")) for p in paths],
            target_dir=plan.target_dir,
            in_point={d.name for d in manifest.disks},
            source=f"restored from VM {plan.vm_name} point {plan.rp_id}",
        )
        definition_file = plan.target_dir / f"{plan.new_name}.xml"
        _write_new(definition_file, copy.xml)
        created.append(definition_file)
        dom = _define(conn, plan.new_name, copy.xml)
        row = _register(ctx, plan, dom, definition_file)
        view: JsonDict = {"name": row.name, "id": row.id, "domain": plan.new_name, "uuid": copy.uuid,
                          "macs": copy.macs, "disks": [str(p) for p in paths], "leftOut": copy.left_out,
                          "definitionFile": str(definition_file), "started": False}  # fmt: skip
    except BaseException:
        if dom is not None:
            _undefine(dom)
        for path in created:
            path.unlink(missing_ok=True)
        if made_dir:
            with contextlib.suppress(OSError):
                plan.target_dir.rmdir()
        conn.close()
        raise
    try:
        if plan.start:
            start_domain(dom)
            view["started"] = True
    finally:
        conn.close()
    return view


def _define(conn: Any, name: str, xml: str) -> Any:
    from vmvault.connectors.libvirt import domain as lv

    lvmod = lv._lv()
    if lv.domain_named(conn, name) is not None:  # defined by someone else while the disks were written
        raise AlreadyExists(f"libvirt already has a domain named '{name}'", hint="choose another --name")
    try:
        return conn.defineXML(xml)
    except lvmod.libvirtError as exc:
        raise HypervisorError(f"libvirt refused the restored domain {name}: {exc}",
                              hint="see the XML beside the restored disks") from exc  # fmt: skip


def _undefine(dom: Any) -> None:
    from vmvault.connectors.libvirt import domain as lv

    lvmod = lv._lv()
    with contextlib.suppress(lvmod.libvirtError):
        if dom.isActive():
            dom.destroy()
    flags = lvmod.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | lvmod.VIR_DOMAIN_UNDEFINE_NVRAM
    with contextlib.suppress(lvmod.libvirtError):
        dom.undefineFlags(flags)


def _register(ctx: Context, plan: LibvirtRestorePlan, dom: Any, definition_file: Path) -> VmRow:
    from vmvault.connectors.libvirt import domain as lv
    from vmvault.connectors.libvirt.connector import definition_of as _definition
    from vmvault.service.vms import _refuse_taken_in

    info = lv.inspect(dom)
    definition = {**_definition(plan.uri, info), "restoredFrom": {"vm": plan.vm_name, "point": plan.rp_id},
                  "definitionFile": str(definition_file)}  # fmt: skip
    row = VmRow(
        id=str(uuid.uuid4()), name=plan.new_name, kind=KIND_LIBVIRT,
        disks=[{"name": d.name, "path": d.path, "format": d.format} for d in info.disks], definition=definition,
        created=now_iso(),
    )  # fmt: skip
    with ctx.catalog.write() as s:
        _refuse_taken_in(s, plan.new_name)
        repos.add_vm(s, row)
    return row


def start_domain(dom: Any, timeout: float | None = None) -> None:
    """Boot the domain and wait until its guest agent answers (through libvirt)."""
    from vmvault.connectors.libvirt import domain as lv
    from vmvault.service.restore_vm import BOOT_TIMEOUT

    timeout = BOOT_TIMEOUT if timeout is None else timeout
    lvmod = lv._lv()
    try:
        dom.create()
    except lvmod.libvirtError as exc:
        raise HypervisorError(f"libvirt could not start the restored domain {dom.name()}: {exc}",
                              hint=f"see /var/log/libvirt/qemu/{dom.name()}.log") from exc  # fmt: skip
    if not lv.inspect(dom).agent_channel:
        return  # nothing to wait for: no agent channel (vmvault vm enable-agent adds one)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not dom.isActive():
            raise HypervisorError(f"the restored domain {dom.name()} stopped while booting",
                                  hint=f"see /var/log/libvirt/qemu/{dom.name()}.log")  # fmt: skip
        if lv.agent_answers(dom, 2):
            return
        time.sleep(0.5)
    raise HypervisorError(
        f"the restored domain {dom.name()} started, but its guest agent did not answer within {timeout:.0f} s",
        hint="it is still running; is qemu-guest-agent installed and enabled in the guest?",
    )


# ---- replace disks of a libvirt VM ---------------------------------------------------------------------------


def refuse_running_domain(vm: VmRow) -> None:
    """restore replace-disks: the domain must be shut off (not running, not paused)."""
    from vmvault.connectors.libvirt import domain as lv
    from vmvault.errors import VmRunning

    definition = vm.definition or {}
    conn = lv.connect(str(definition.get("connect") or lv.DEFAULT_URI))
    try:
        dom = lv.lookup(conn, str(definition.get("domain")), definition.get("uuid"))
        active = bool(dom.isActive())
    finally:
        conn.close()
    if active:
        raise VmRunning(
            f"VM '{vm.name}' (libvirt domain {definition.get('domain')}) is running: its disks can only be replaced "
            "while it is shut off",
            hint=f"virsh shutdown {definition.get('domain')}, then run restore replace-disks again",
        )


def reset_checkpoints(vm_id: str, definition: JsonDict) -> list[str]:
    """After replace-disks: the new images carry no bitmaps, so vmvault's checkpoints go (metadata only)."""
    from vmvault.connectors.libvirt import domain as lv

    conn = lv.connect(str(definition.get("connect") or lv.DEFAULT_URI))
    try:
        dom = lv.lookup(conn, str(definition.get("domain")), definition.get("uuid"))
        prefix = f"{lv.CHECKPOINT_PREFIX}{vm_id.replace('-', '')[:8]}-"
        return lv.drop_checkpoints(dom, prefix, metadata_only=True)
    finally:
        conn.close()

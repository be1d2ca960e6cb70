"""A libvirt VM's point as a NEW libvirt domain, and the domain XML beside `restore disks` (docs/restore.md).

The point's stored domain XML is rewritten by connectors/libvirt/template.py (new name, UUID, MACs,
paths inside the target directory, no runtime state) and defined with defineXML; starting it waits
for its guest agent (through libvirt).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from vmvault.connectors.contract import JsonDict, NewVm, NewVmRequest, WrittenDisk
from vmvault.connectors.libvirt import domain as lv
from vmvault.connectors.libvirt.domain import KIND_LIBVIRT, definition_of
from vmvault.connectors.libvirt.template import RestoredFile, copy_domain_xml, stop_on_errors
from vmvault.connectors.workfiles import BOOT_TIMEOUT, write_new
from vmvault.errors import AlreadyExists, HypervisorError, InvalidInput, VmRunning


def template_name(vm_name: str) -> str:
    return f"{vm_name}-domain.xml"


def uri_of(definition: JsonDict) -> str:
    return str(definition.get("connect") or lv.DEFAULT_URI)


@contextlib.contextmanager
def _connected(uri: str) -> Any:
    conn = lv.connect(uri)
    try:
        yield conn
    finally:
        conn.close()


def refuse_new_vm(request: NewVmRequest) -> None:
    with _connected(uri_of(request.source_definition)) as conn:
        if lv.domain_named(conn, request.new_name) is not None:
            raise AlreadyExists(
                f"libvirt already has a domain named '{request.new_name}'",
                hint="choose another --name (virsh list --all)",
            )


def in_the_way(request: NewVmRequest) -> list[str]:
    """The domain's XML file, and the logs and NVRAM the copy will use as the VM's current XML says."""
    target_dir = Path(request.target_dir)
    files = [target_dir / f"{request.new_name}.xml"]
    xml = str(request.source_definition.get("domainXml") or "")
    if xml:  # the point's XML is checked again before any disk is written
        files += copy_domain_xml(xml, name=request.new_name, disks=[], target_dir=target_dir, in_point=set()).files
    return [str(p) for p in files if p.exists()]


def refuse_in_the_way(new_name: str, files: list[Path]) -> None:
    found = [str(p) for p in files if p.exists()]
    if found:
        raise InvalidInput(
            f"files are in the way of the restored VM '{new_name}': {', '.join(found)}",
            hint="remove them, or choose another --target-dir",
        )


def check_point(request: NewVmRequest, definition: JsonDict) -> None:
    xml = str(definition.get("domainXml") or "")
    if not xml:
        raise InvalidInput(f"recovery point '{request.rp_id}' holds no domain XML: use restore disks")
    target_dir = Path(request.target_dir)
    probe = copy_domain_xml(xml, name=request.new_name, disks=[], target_dir=target_dir, in_point=set())
    refuse_in_the_way(request.new_name, probe.files)


def create_new_vm(
    request: NewVmRequest, definition: JsonDict, in_point: list[str], disks: list[WrittenDisk], *, instant: bool
) -> NewVm:
    """Define the new domain from the point's XML; undefined again if anything after defineXML fails."""
    target_dir, name = Path(request.target_dir), request.new_name
    what = "instant restore of" if instant else "restored from"
    copy = copy_domain_xml(
        str(definition["domainXml"]),
        name=name,
        disks=[RestoredFile(d.name, Path(d.path), d.format) for d in disks],
        target_dir=target_dir,
        in_point=set(in_point),
        source=f"{what} VM {request.source_vm} point {request.rp_id}",
    )
    files: list[str] = []
    text = copy.xml
    if instant:
        refuse_in_the_way(name, copy.files)
        files += [str(p) for p in copy.files]  # serial logs libvirt will write: removed with the copy
        text = stop_on_errors(copy.xml, [d.name for d in disks])
    definition_file = target_dir / f"{name}.xml"
    uri = uri_of(request.source_definition)
    write_new(definition_file, text)
    files.append(str(definition_file))
    with _connected(uri) as conn:
        dom = _define(conn, name, text)
        try:
            info = lv.inspect(dom)
        except BaseException:
            undefine(dom)
            raise
    record = {**definition_of(uri, info), "restoredFrom": {"vm": request.source_vm, "point": request.rp_id},
              "definitionFile": str(definition_file)}  # fmt: skip
    view: JsonDict = {"domain": name, "uuid": copy.uuid, "macs": copy.macs, "disks": [d.path for d in disks]}
    if not instant:
        view["leftOut"] = copy.left_out
    view["definitionFile"] = str(definition_file)
    disk_records = [{"name": d.name, "path": d.path, "format": d.format} for d in info.disks]
    return NewVm(KIND_LIBVIRT, disk_records, record, files, view, {"uri": uri, "domain": name, "uuid": info.uuid})


@contextlib.contextmanager
def domain_of(vm: NewVm) -> Any:
    """The new domain (and its connection, closed at the end of the block)."""
    with _connected(str(vm.handle["uri"])) as conn:
        yield lv.lookup(conn, str(vm.handle["domain"]), vm.handle.get("uuid"))


def _define(conn: Any, name: str, xml: str) -> Any:
    lvmod = lv._lv()
    if lv.domain_named(conn, name) is not None:  # defined by someone else while the disks were written
        raise AlreadyExists(f"libvirt already has a domain named '{name}'", hint="choose another --name")
    try:
        return conn.defineXML(xml)
    except lvmod.libvirtError as exc:
        raise HypervisorError(f"libvirt refused the restored domain {name}: {exc}",
                              hint="see the XML beside the restored disks") from exc  # fmt: skip


def undefine(dom: Any) -> None:
    lvmod = lv._lv()
    with contextlib.suppress(lvmod.libvirtError):
        if dom.isActive():
            dom.destroy()
    flags = lvmod.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | lvmod.VIR_DOMAIN_UNDEFINE_NVRAM
    with contextlib.suppress(lvmod.libvirtError):
        dom.undefineFlags(flags)


def start_domain(dom: Any, timeout: float | None = None) -> None:
    """Boot the domain and wait until its guest agent answers (through libvirt)."""
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


def disks_template(target_dir: Path, definition: JsonDict, source_vm: str, rp_id: str, in_point: list[str],
                   written: list[WrittenDisk], force: bool) -> Path | None:  # fmt: skip
    """<vm>-domain.xml in target_dir: the point's domain pointing only at the restored disks (others left out)."""
    xml = str(definition.get("domainXml") or "")
    if not xml:
        return None
    copy = copy_domain_xml(
        xml,
        name=f"{source_vm}-restored",
        disks=[RestoredFile(d.name, Path(d.path), d.format) for d in written],
        target_dir=target_dir,
        in_point=set(in_point),
        source=f"restored from VM {source_vm} point {rp_id}; define it with: virsh define FILE",
    )
    out = target_dir / template_name(source_vm)
    write_new(out, copy.xml, force=force)
    return out


def refuse_running(vm_name: str, definition: JsonDict) -> None:
    """restore replace-disks: the domain must be shut off (not running, not paused)."""
    with _connected(uri_of(definition)) as conn:
        dom = lv.lookup(conn, str(definition.get("domain")), definition.get("uuid"))
        active = bool(dom.isActive())
    if active:
        raise VmRunning(
            f"VM '{vm_name}' (libvirt domain {definition.get('domain')}) is running: its disks can only be replaced "
            "while it is shut off",
            hint=f"virsh shutdown {definition.get('domain')}, then run restore replace-disks again",
        )


def reset_checkpoints(vm_id: str, definition: JsonDict) -> list[str]:
    """After replace-disks: the new images carry no bitmaps, so vmvault's checkpoints go (metadata only)."""
    with _connected(uri_of(definition)) as conn:
        dom = lv.lookup(conn, str(definition.get("domain")), definition.get("uuid"))
        prefix = f"{lv.CHECKPOINT_PREFIX}{vm_id.replace('-', '')[:8]}-"
        return lv.drop_checkpoints(dom, prefix, metadata_only=True)

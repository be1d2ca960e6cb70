"""libvirt-managed domains: inspect them, pull backups with checkpoints, the guest agent through libvirt.

Only libvirt's own APIs touch a domain (docs/libvirt.md): `backupBegin` in pull mode with a scratch
file per disk and a new checkpoint, the NBD export read with libnbd (`qemu:dirty-bitmap:backup-<disk>`
for incrementals), `abortJob`; checkpoints are created and deleted through the checkpoint API only
(never QMP bitmap commands or `qemu-img bitmap` on the images). The guest agent channel belongs to
libvirt, so agent commands go through `virDomainQemuAgentCommand`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmvault.connectors.guest_agent import AgentError, AgentUnavailable, GuestAgent
from vmvault.engine.nbd import NbdReader
from vmvault.errors import HypervisorError

log = logging.getLogger("vmvault")

JsonDict = dict[str, Any]
DEFAULT_URI = "qemu:///system"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
CHECKPOINT_PREFIX = "vmv-"

try:  # Debian's python3-libvirt, visible in vmvault's venv (system site-packages)
    import libvirt as _libvirt
    import libvirt_qemu as _libvirt_qemu
except ImportError:  # pragma: no cover - set-up problem, reported on use
    _libvirt = None
    _libvirt_qemu = None


class LibvirtError(HypervisorError):
    code = "libvirt_error"


def _lv() -> Any:
    if _libvirt is None:
        raise LibvirtError("the libvirt Python binding is missing",
                           hint="apt-get install python3-libvirt and use vmvault's .venv (make run)")  # fmt: skip
    return _libvirt


def connect(uri: str = DEFAULT_URI) -> Any:
    lv = _lv()
    lv.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not also printed on stderr
    try:
        return lv.open(uri)
    except lv.libvirtError as exc:
        raise LibvirtError(f"cannot connect to libvirt at {uri}: {exc}", hint="is libvirtd running?") from exc


def lookup(conn: Any, name: str, uuid: str | None = None) -> Any:
    """The domain by UUID when known (it survives a rename), else by name."""
    lv = _lv()
    if uuid:
        try:
            return conn.lookupByUUIDString(uuid)
        except lv.libvirtError:
            pass
    try:
        return conn.lookupByName(name)
    except lv.libvirtError as exc:
        raise LibvirtError(f"libvirt has no domain '{name}': {exc}", hint="see them with: vmvault vm discover") from exc


# ---- what a domain is ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainDisk:
    name: str  # the target (vda)
    path: str
    format: str  # driver type: qcow2, raw


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    state: str  # running | paused | shut off | ...
    disks: list[DomainDisk]
    agent_channel: bool
    xml: str

    @property
    def running(self) -> bool:
        return self.state == "running"

    def to_dict(self) -> JsonDict:
        return {
            "name": self.name,
            "uuid": self.uuid,
            "state": self.state,
            "disks": [{"name": d.name, "path": d.path, "format": d.format} for d in self.disks],
            "agentChannel": self.agent_channel,
        }


_STATES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down", 5: "shut off", 6: "crashed",
           7: "suspended"}  # fmt: skip


def domain_state(dom: Any) -> str:
    state, _reason = dom.state()
    return _STATES.get(int(state), "unknown")


def inspect(dom: Any) -> DomainInfo:
    """The domain's writable file disks (by target), agent channel and persistent XML."""
    xml = dom.XMLDesc(0)
    root = ET.fromstring(xml)
    disks = []
    for disk in root.findall("./devices/disk"):
        if disk.get("device", "disk") != "disk" or disk.find("readonly") is not None:
            continue
        source, target, driver = disk.find("source"), disk.find("target"), disk.find("driver")
        path = source.get("file") if source is not None else None
        if target is None or not path:
            continue
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        disks.append(DomainDisk(str(target.get("dev")), path, fmt))
    targets = [c.find("target") for c in root.findall("./devices/channel")]
    agent = any(t is not None and t.get("name") == AGENT_CHANNEL for t in targets)
    return DomainInfo(dom.name(), dom.UUIDString(), domain_state(dom), disks, agent, xml)


def persistent_xml(dom: Any) -> str:
    """The definition the domain boots with next time (for a running domain, not its live XML)."""
    return str(dom.XMLDesc(_lv().VIR_DOMAIN_XML_INACTIVE))


def has_agent_channel(xml: str) -> bool:
    root = ET.fromstring(xml)
    return any(t.get("name") == AGENT_CHANNEL for t in root.findall("./devices/channel/target"))


def add_agent_channel(dom: Any) -> bool:
    """Add the guest agent's channel to the persistent definition (False: it is already there).

    defineXML of the inactive XML, so a running domain gets it at its next boot; libvirt picks the
    socket's path (a unix channel without one).
    """
    lv = _lv()
    if not dom.isPersistent():  # defineXML would turn a transient domain into a persistent one
        raise LibvirtError(
            f"domain {dom.name()} is transient: it has no persistent definition to add the channel to",
            hint="add the channel where the domain is created (its XML), or define it persistently first",
        )
    xml = persistent_xml(dom)
    if has_agent_channel(xml):
        return False
    root = ET.fromstring(xml)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    channel = ET.SubElement(devices, "channel", {"type": "unix"})
    ET.SubElement(channel, "source", {"mode": "bind"})
    ET.SubElement(channel, "target", {"type": "virtio", "name": AGENT_CHANNEL})
    try:
        dom.connect().defineXML(ET.tostring(root, encoding="unicode"))
    except lv.libvirtError as exc:
        raise LibvirtError(f"libvirt refused the agent channel for domain {dom.name()}: {exc}") from exc
    return True


def agent_answers(dom: Any, timeout: int = 1) -> bool:
    """guest-ping through libvirt within timeout seconds."""
    try:
        LibvirtAgent(dom, timeout=timeout).execute("guest-ping", timeout=timeout)
    except (AgentError, HypervisorError):
        return False
    return True


def domain_named(conn: Any, name: str) -> Any | None:
    lv = _lv()
    try:
        return conn.lookupByName(name)
    except lv.libvirtError:
        return None


# ---- checkpoints ------------------------------------------------------------------------------------


def checkpoint_names(dom: Any) -> list[str]:
    return [c.getName() for c in dom.listAllCheckpoints(0)]


def has_checkpoint(dom: Any, name: str) -> bool:
    return name in checkpoint_names(dom)


def delete_checkpoint(dom: Any, name: str, *, metadata_only: bool = False) -> None:
    """Delete a checkpoint (libvirt merges its bitmap into its parent); metadata_only leaves the images alone."""
    lv = _lv()
    flags = lv.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0
    try:
        dom.checkpointLookupByName(name).delete(flags)
    except lv.libvirtError as exc:
        if exc.get_error_code() != lv.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            raise LibvirtError(f"cannot delete checkpoint {name} of {dom.name()}: {exc}") from exc


def drop_checkpoints(dom: Any, prefix: str = CHECKPOINT_PREFIX, *, metadata_only: bool = True) -> list[str]:
    """Remove vmvault's checkpoints (children first); returns their names.

    metadata_only (stale checkpoints): only libvirt's metadata, the images are not touched. Otherwise
    a proper delete (libvirt merges or removes the bitmaps), falling back to metadata only when
    libvirt cannot (a bitmap gone or inconsistent).
    """
    names = [n for n in checkpoint_names(dom) if n.startswith(prefix)]
    for name in reversed(names):
        try:
            delete_checkpoint(dom, name, metadata_only=metadata_only)
        except LibvirtError:
            with contextlib.suppress(LibvirtError):
                delete_checkpoint(dom, name, metadata_only=True)
    for name in names:  # listAllCheckpoints' order is not a topological one: whatever is left
        delete_checkpoint(dom, name, metadata_only=True)  # (a no-op for deleted ones)
    return names


def image_bitmaps(path: str) -> dict[str, list[str]]:
    """The qcow2 image's persistent bitmaps and their flags (`qemu-img info -U`, read only)."""
    cmd = ["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", path]  # only qcow2 disks get here
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {}
    info = json.loads(proc.stdout)
    bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {str(b.get("name")): [str(f) for f in b.get("flags", [])] for b in bitmaps}


def shutoff_reason(dom: Any) -> str:
    """Why a stopped domain stopped: shutdown, destroyed, crashed, ..."""
    lv = _lv()
    state, reason = dom.state()
    if state != lv.VIR_DOMAIN_SHUTOFF:
        return ""
    names = {lv.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shutdown", lv.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
             lv.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed", lv.VIR_DOMAIN_SHUTOFF_FAILED: "failed",
             lv.VIR_DOMAIN_SHUTOFF_SAVED: "saved", lv.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated",
             lv.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "from snapshot"}  # fmt: skip
    return names.get(reason, "unknown")


def stale_reason(dom: Any, disks: list[DomainDisk], checkpoint: str) -> str | None:
    """Why a stopped domain's checkpoint cannot be trusted (None: a clean stop, every disk has its bitmap, consistent).

    After `virsh destroy` (SIGTERM, then SIGKILL after a while) or a crash QEMU may not have saved
    its bitmaps: such a stop is not trusted even when the images' bitmaps look consistent.
    """
    why = shutoff_reason(dom)
    if why in ("destroyed", "crashed", "failed", "unknown"):
        return f"the domain stopped {why}: QEMU may have ended without saving checkpoint {checkpoint}'s bitmaps"
    for disk in disks:
        if disk.format != "qcow2":
            return f"disk {disk.name} is {disk.format}: it cannot carry checkpoints"
        flags = image_bitmaps(disk.path).get(checkpoint)
        if flags is None:
            return f"disk {disk.name} has no bitmap for checkpoint {checkpoint}"
        if "in-use" in flags:
            return (
                f"the bitmap of checkpoint {checkpoint} on disk {disk.name} is inconsistent "
                "(QEMU stopped without saving it: virsh destroy or a host crash)"
            )
    return None


# ---- the guest agent through libvirt --------------------------------------------------------------------


class LibvirtAgent(GuestAgent):
    """GuestAgent's commands sent through virDomainQemuAgentCommand (libvirt owns the agent channel)."""

    def __init__(self, dom: Any, timeout: float = 30.0) -> None:
        super().__init__(f"libvirt:{dom.name()}", timeout)
        self.dom = dom

    def connect(self, timeout: float = 5.0, *, check_frozen: bool = True) -> GuestAgent:
        try:
            self.execute("guest-ping", timeout=timeout)
        except AgentError as exc:
            raise AgentUnavailable(str(exc)) from exc
        return self

    def close(self) -> None:
        return None

    def __enter__(self) -> GuestAgent:
        return self

    def execute(self, command: str, arguments: JsonDict | None = None, timeout: float | None = None) -> Any:
        lv = _lv()
        request: JsonDict = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            wait = max(1, int(timeout or self.timeout))
            reply = _libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(request), wait, 0)
        except lv.libvirtError as exc:
            code = exc.get_error_code()
            if code in (lv.VIR_ERR_AGENT_UNRESPONSIVE, lv.VIR_ERR_OPERATION_INVALID, lv.VIR_ERR_ARGUMENT_UNSUPPORTED,
                        lv.VIR_ERR_AGENT_UNSYNCED, lv.VIR_ERR_OPERATION_TIMEOUT):  # fmt: skip
                raise AgentUnavailable(f"the guest agent of {self.dom.name()} did not answer {command}: {exc}") from exc
            raise AgentError(command, str(code), str(exc)) from exc
        if reply is None:
            return None
        try:
            message = json.loads(reply)
        except ValueError as exc:
            raise AgentUnavailable(f"the guest agent of {self.dom.name()} sent a garbled reply to {command}") from exc
        if "error" in message:
            err = message["error"]
            raise AgentError(command, str(err.get("class", "")), str(err.get("desc", "")))
        return message.get("return")


# ---- pull-mode backups -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedLibvirtDisk:
    name: str
    uri: str
    size: int
    format: str
    path: str
    changed_extents: list[tuple[int, int]] | None


class PullBackup:
    """One backup job: begin (all disks at one instant, a new checkpoint), export, abort; scratch files removed."""

    def __init__(self, dom: Any, disks: list[DomainDisk], work_dir: Path, socket_path: Path) -> None:
        self.dom, self.disks, self.work_dir, self.socket = dom, disks, work_dir, socket_path
        self.started = False

    def scratch(self, disk: DomainDisk) -> Path:
        return self.work_dir / f"scratch-{disk.name}.qcow2"

    def backup_xml(self, incremental: str | None) -> str:
        inc = f"<incremental>{incremental}</incremental>" if incremental else ""
        disks = "".join(
            f"<disk name='{d.name}' backup='yes' type='file'><scratch file='{self.scratch(d)}'/></disk>"
            for d in self.disks
        )
        return (f"<domainbackup mode='pull'>{inc}<server transport='unix' socket='{self.socket}'/>"
                f"<disks>{disks}</disks></domainbackup>")  # fmt: skip

    @staticmethod
    def checkpoint_xml(name: str, disks: list[DomainDisk], all_disks: list[DomainDisk]) -> str:
        wanted = {d.name for d in disks}
        parts = "".join(
            f"<disk name='{d.name}' checkpoint='{'bitmap' if d.name in wanted else 'no'}'/>" for d in all_disks
        )
        return f"<domaincheckpoint><name>{name}</name><disks>{parts}</disks></domaincheckpoint>"

    def begin(self, incremental: str | None, checkpoint_xml: str | None) -> None:
        """backupBegin; a quiesce is vmvault's (connectors/consistency.py: its budgets and thaw guard) around it.

        Not libvirt's QUIESCE flag: 9.0 refuses it, and its freeze call has no budget of ours.
        """
        lv = _lv()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.dom.backupBegin(self.backup_xml(incremental), checkpoint_xml, 0)
        except lv.libvirtError as exc:
            self.cleanup_files()
            raise LibvirtError(f"libvirt refused the backup of {self.dom.name()}: {exc}") from exc
        self.started = True

    def export(self, incremental: bool) -> list[ExportedLibvirtDisk]:
        root = ET.fromstring(self.dom.backupGetXMLDesc(0))
        by_name = {d.get("name"): d for d in root.findall("./disks/disk")}
        out = []
        for disk in self.disks:
            node = by_name.get(disk.name)
            export = (node.get("exportname") if node is not None else None) or disk.name
            bitmap = node.get("exportbitmap") if node is not None else None
            uri = f"nbd+unix:///{export}?socket={self.socket}"
            reader = NbdReader(uri, meta_contexts=(f"qemu:dirty-bitmap:{bitmap}",) if incremental and bitmap else ())
            try:
                size = reader.size
                changed = None
                if incremental and bitmap:
                    ctx = f"qemu:dirty-bitmap:{bitmap}"
                    changed = [(off, length) for off, length, flags in reader.extents(ctx) if flags & 1]
            finally:
                reader.close()
            out.append(ExportedLibvirtDisk(disk.name, uri, size, disk.format, disk.path, changed))
        return out

    def abort(self) -> None:
        lv = _lv()
        if self.started:
            try:
                self.dom.abortJob()
            except lv.libvirtError as exc:
                if self.dom.isActive():
                    log.warning("abortJob on %s: %s", self.dom.name(), exc)
            self.started = False
        self.cleanup_files()

    def cleanup_files(self) -> None:
        for disk in self.disks:
            self.scratch(disk).unlink(missing_ok=True)
        self.socket.unlink(missing_ok=True)


def leftover_job(dom: Any, work_dir: Path) -> str | None:
    """Whose the running domain's backup job is: "vmvault" (its scratch files are under work_dir), "other", None."""
    lv = _lv()
    if not dom.isActive():
        return None
    try:
        xml = dom.backupGetXMLDesc(0)
    except lv.libvirtError:
        return None
    return "vmvault" if str(work_dir) in xml else "other"


def abort_leftover_job(dom: Any, work_dir: Path) -> bool:
    """A backup job a killed vmvault left (its scratch files are under work_dir): abort it (True when there was one).

    Another tool's backup job is not touched: the backup is refused instead.
    """
    lv = _lv()
    owner = leftover_job(dom, work_dir)
    if owner is None:
        return False
    if owner == "other":
        raise LibvirtError(
            f"domain {dom.name()} is running another tool's backup job",
            hint="wait for it to end (virsh domjobinfo), then run the backup again",
        )
    try:
        dom.abortJob()
    except lv.libvirtError:
        return False
    return True


KIND_LIBVIRT = "libvirt"  # the catalog's kind of a libvirt domain


def definition_of(uri: str, info: DomainInfo) -> JsonDict:
    """A domain's catalog definition: where libvirt is, the domain, its disks and its XML."""
    return {
        "kind": KIND_LIBVIRT,
        "connect": uri,
        "domain": info.name,
        "uuid": info.uuid,
        "disks": [{"name": d.name, "path": d.path, "format": d.format} for d in info.disks],
        "agentChannel": info.agent_channel,
        "domainXml": info.xml,
    }

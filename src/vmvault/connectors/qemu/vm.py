"""A running QEMU seen through QMP: its disks, its definition (the restore template), its identity.

Disks are the block devices with media (query-block), named after their node name, else their
device name. A qemu-storage-daemon has no devices: its writable exports stand for the disks
(the guest-less stand-in the tests and the benchmark use).

The definition combines the QEMU command line (/proc/<pid>/cmdline of the socket's peer) with what
QMP reports (name, UUID, CPUs, memory, NICs, disks).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmvault.connectors.qemu.qmp import QmpClient, QmpError
from vmvault.errors import HypervisorError, VmvaultError
from vmvault.proc import process_cmdline, process_start_ticks

JsonDict = dict[str, Any]
MIN_QEMU = (5, 2)  # block-export-add with dirty bitmaps


@dataclass(frozen=True)
class QemuDisk:
    name: str  # the disk's name in recovery points
    node: str  # the block node the device reads (bitmaps and the backup job live here)
    device: str  # device name or qdev path ("" for a storage daemon's export)
    path: str  # image file name
    format: str  # the node's driver: qcow2, raw, ...
    virtual_size: int
    actual_size: int  # allocated bytes of the image file

    @property
    def persistent_bitmaps(self) -> bool:
        """Only qcow2 stores bitmaps; any other format's bitmap lives as long as the QEMU process."""
        return self.format == "qcow2"

    def to_dict(self) -> JsonDict:
        return {
            "name": self.name,
            "path": self.path,
            "format": self.format,
            "virtualSize": self.virtual_size,
            "node": self.node,
            "device": self.device,
        }


@dataclass(frozen=True)
class QemuIdentity:
    """Which QEMU process: a restarted QEMU has another pid or start time."""

    pid: int | None
    start: int | None

    def to_dict(self) -> JsonDict:
        return {"pid": self.pid, "start": self.start}

    @classmethod
    def from_dict(cls, data: Any) -> QemuIdentity | None:
        if not isinstance(data, dict):
            return None
        return cls(data.get("pid"), data.get("start"))


@dataclass(frozen=True)
class QemuVm:
    identity: QemuIdentity
    running: bool
    status: str
    disks: list[QemuDisk]
    definition: JsonDict


def inspect_vm(qmp: QmpClient) -> QemuVm:
    version = qmp.query_version()
    q = version.get("qemu", {})
    if (int(q.get("major", 0)), int(q.get("minor", 0))) < MIN_QEMU:
        raise HypervisorError(
            f"QEMU {q.get('major')}.{q.get('minor')} is too old for live backups (5.2 or later is needed)",
            hint="upgrade QEMU, or stop the VM and back it up offline",
        )
    pid = qmp.peer_pid()
    identity = QemuIdentity(pid, process_start_ticks(pid) if pid else None)
    running, status = _run_state(qmp)
    disks = list_disks(qmp)
    cmdline = process_cmdline(pid) if pid else []
    definition: JsonDict = {
        "disks": [d.to_dict() for d in disks],
        "machine": _machine(qmp),
        "qemu": {
            "version": f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}",
            "package": version.get("package", ""),
            "pid": pid,
            "binary": cmdline[0] if cmdline else "",
            "cmdline": cmdline,
        },
    }
    return QemuVm(identity, running, status, disks, definition)


def _run_state(qmp: QmpClient) -> tuple[bool, str]:
    try:
        status = qmp.query_status()
    except QmpError as exc:
        if exc.error_class == "CommandNotFound":
            return True, "storage-daemon"  # qemu-storage-daemon: no guest, always serving
        raise
    return bool(status.get("running")), str(status.get("status", ""))


def _optional(call: Any) -> Any:
    with contextlib.suppress(QmpError):
        return call()
    return None


def _machine(qmp: QmpClient) -> JsonDict:
    name = _optional(qmp.query_name) or {}
    uuid = _optional(qmp.query_uuid) or {}
    cpus = _optional(qmp.query_cpus_fast)
    memory = _optional(qmp.query_memory_size_summary) or {}
    nics = _optional(qmp.query_rx_filter) or []
    return {
        "name": name.get("name"),
        "uuid": uuid.get("UUID"),
        "cpus": len(cpus) if cpus is not None else None,
        "memoryBytes": memory.get("base-memory"),
        "nics": [{"name": n.get("name"), "mac": n.get("main-mac")} for n in nics],
    }


def list_disks(qmp: QmpClient) -> list[QemuDisk]:
    nodes = {n["node-name"]: n for n in qmp.query_named_block_nodes() if n.get("node-name")}
    disks: list[QemuDisk] = []
    devices = qmp.query_block()
    for entry in devices:
        inserted = entry.get("inserted")
        if not inserted or inserted.get("ro"):
            continue  # empty drives, CD-ROMs and other read-only media
        node = str(inserted.get("node-name") or "")
        device = str(entry.get("device") or entry.get("qdev") or "")
        disks.append(_disk(_disk_name(node, device), node, device, nodes.get(node) or inserted))
    if not devices:
        for export in qmp.query_block_exports():  # a storage daemon: its exports are its disks
            node = str(export.get("node-name") or "")
            info = nodes.get(node)
            if info and not info.get("ro") and not str(export.get("id", "")).startswith("vmv-"):
                disks.append(_disk(node, node, "", info))
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        raise HypervisorError(f"two disks of this QEMU have the same name: {names}")
    return disks


def _disk_name(node: str, device: str) -> str:
    if node and not node.startswith("#"):
        return node
    if device.startswith("/machine/peripheral/"):
        return device.split("/")[3]  # /machine/peripheral/<id>/virtio-backend
    return device or node


def _disk(name: str, node: str, device: str, info: JsonDict) -> QemuDisk:
    image = info.get("image") or {}
    return QemuDisk(
        name=name,
        node=node,
        device=device,
        path=str(info.get("file") or image.get("filename") or ""),
        format=str(info.get("drv") or image.get("format") or ""),
        virtual_size=int(image.get("virtual-size", 0)),
        actual_size=int(image.get("actual-size", 0)),
    )


def dirty_bitmaps(qmp: QmpClient) -> dict[str, dict[str, JsonDict]]:
    """{node: {bitmap name: its state}} (anonymous bitmaps of running jobs left out)."""
    found: dict[str, dict[str, JsonDict]] = {}
    for node in qmp.query_named_block_nodes():
        for bitmap in node.get("dirty-bitmaps") or []:
            if bitmap.get("name"):
                found.setdefault(node["node-name"], {})[bitmap["name"]] = bitmap
    return found


# ---- the catalog's record of such a VM ------------------------------------------------------------

KIND_QMP = "qmp"
INTERNAL = ("tracking", "agent")  # kept in the catalog, never in a recovery point


def manifest_definition(definition: JsonDict) -> JsonDict:
    """The VM's definition as a recovery point keeps it: without the connector's internal state."""
    return {k: v for k, v in definition.items() if k not in INTERNAL}


def qmp_disk_record(disk: Any) -> JsonDict:
    """A running QEMU's disk: the format its QEMU opens it with, and its qcow2 chain when readable.

    Read offline when the QEMU is stopped, with exactly this format (and chain, checked).
    """
    from vmvault.connectors.diskimage.diskformat import FORMATS, chain_to_record, read_chain

    fmt = disk.format if disk.format in FORMATS else "raw" if disk.format in ("file", "host_device") else "unknown"
    record: JsonDict = {"name": disk.name, "path": disk.path, "format": fmt}
    if fmt == "qcow2":
        with contextlib.suppress(VmvaultError, OSError):  # left unrecorded: the first offline read asks to confirm
            record["chain"] = chain_to_record(read_chain(Path(disk.path), fmt))
    return record

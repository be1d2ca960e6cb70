"""The restore template of a libvirt domain: a point's domain XML made into a NEW domain's XML.

The domain XML stored in every libvirt recovery point (docs/libvirt.md) is rewritten for a copy
(docs/restore.md):
- a new name and UUID; a new MAC on every `<interface>` (added where none was set);
- the restored disks' `<source file>` inside the target directory, driver type the restored
  format, no `<backingStore>` (a restored image is flat); every other disk (not in the point, or
  not selected) is left out, with an XML comment saying so; CD-ROMs keep the drive, not the medium;
- serial and console `type='file'` sources and `<log file>` under the target directory; unix
  channel sockets without a path (libvirt makes one per domain, the guest agent's included);
- NVRAM under the target directory (libvirt fills it from the firmware's template at first start),
  a TPM emulator's state follows the new UUID; graphics ports automatic;
- what only a running domain has (`id`, device aliases, `vnetN` targets, pty paths, dynamic
  security labels) dropped. Checkpoint metadata is not part of the domain XML: none is carried over.
"""

from __future__ import annotations

import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from vmvault.connectors.qemu.cmdline import new_mac

AGENT_CHANNEL = "org.qemu.guest_agent.0"
NOT_IN_POINT = "not in the recovery point (excluded from backup)"
NOT_SELECTED = "not selected for this restore"


@dataclass(frozen=True)
class RestoredFile:
    target: str  # the disk's target (vda)
    path: Path
    fmt: str  # qcow2 | raw


@dataclass
class DomainCopy:
    """The rewritten XML and what it was given."""

    xml: str
    name: str
    uuid: str
    macs: list[str]
    disks: dict[str, str]  # target -> path
    left_out: dict[str, str]  # target -> why
    files: list[Path] = field(default_factory=list)  # serial logs, NVRAM: must not be in the way


def copy_domain_xml(
    xml: str,
    *,
    name: str,
    disks: list[RestoredFile],
    target_dir: Path,
    in_point: set[str],
    source: str = "",
) -> DomainCopy:
    """The XML of a new domain `name` using `disks` only (files under target_dir); in_point: the point's disks."""
    root = ET.fromstring(xml)
    new_uuid = str(uuidlib.uuid4())
    _identity(root, name, new_uuid)
    copy = DomainCopy("", name, new_uuid, [], {}, {})
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    _disks(devices, {d.target: d for d in disks}, in_point, copy)
    _interfaces(devices, copy)
    _char_devices(devices, target_dir, name, copy)
    _graphics(devices)
    _nvram(root, target_dir, name, copy)
    _tpm(devices)
    _runtime_only(root)
    if source:
        root.insert(0, ET.Comment(f" vmvault: {source} "))
    ET.indent(root, space="  ")
    copy.xml = ET.tostring(root, encoding="unicode") + "\n"
    return copy


def _identity(root: ET.Element, name: str, new_uuid: str) -> None:
    root.attrib.pop("id", None)
    for tag, value in (("name", name), ("uuid", new_uuid)):
        node = root.find(tag)
        if node is None:
            node = ET.Element(tag)
            root.insert(0 if tag == "name" else 1, node)
        node.text = value
    for node in root.findall("genid"):  # a VM generation id belongs to one VM
        root.remove(node)


def _disks(devices: ET.Element, restored: dict[str, RestoredFile], in_point: set[str], copy: DomainCopy) -> None:
    for disk in list(devices):
        if disk.tag != "disk":
            continue
        target = disk.find("target")
        dev = str(target.get("dev")) if target is not None else ""
        chosen = restored.get(dev)
        if disk.get("device", "disk") in ("cdrom", "floppy") and chosen is None:
            for node in disk.findall("source") + disk.findall("backingStore"):
                disk.remove(node)  # keep the drive, not the original's medium
            continue
        if chosen is None:
            why = NOT_SELECTED if dev in in_point else NOT_IN_POINT
            copy.left_out[dev] = why
            index = list(devices).index(disk)
            devices.remove(disk)
            devices.insert(index, ET.Comment(f" vmvault: disk {dev} left out: {why} "))
            continue
        disk.set("type", "file")
        for node in disk.findall("source") + disk.findall("backingStore"):
            disk.remove(node)
        source = ET.Element("source", {"file": str(chosen.path)})
        driver = disk.find("driver")
        if driver is None:
            driver = ET.Element("driver", {"name": "qemu"})
            disk.insert(0, driver)
        driver.set("type", chosen.fmt)
        disk.insert(list(disk).index(driver) + 1, source)
        copy.disks[dev] = str(chosen.path)


def _interfaces(devices: ET.Element, copy: DomainCopy) -> None:
    for nic in devices.findall("interface"):
        mac = nic.find("mac")
        if mac is None:
            mac = ET.Element("mac")
            nic.insert(0, mac)
        mac.set("address", new_mac())
        copy.macs.append(str(mac.get("address")))
        target = nic.find("target")
        if target is not None and target.get("managed") != "no":
            nic.remove(target)  # vnetN: the running original's tap device


def _char_devices(devices: ET.Element, target_dir: Path, name: str, copy: DomainCopy) -> None:
    """Files under target_dir (the same file for a serial and its console twin); sockets libvirt names."""
    renamed: dict[str, Path] = {}

    def new_file(old: str, kind: str) -> str:
        if old not in renamed:
            suffix = "" if not renamed else f"-{len(renamed)}"
            renamed[old] = target_dir / f"{name}-{kind}{suffix}.log"
            copy.files.append(renamed[old])
        return str(renamed[old])

    for dev in list(devices):
        if dev.tag not in ("serial", "console", "channel", "parallel"):
            continue
        source = dev.find("source")
        kind = dev.get("type")
        if kind == "file" and source is not None and source.get("path"):
            source.set("path", new_file(str(source.get("path")), dev.tag if dev.tag != "console" else "serial"))
        elif kind == "pty" and source is not None:
            dev.remove(source)  # /dev/pts/N of the running original
        elif kind == "unix" and source is not None:
            target = dev.find("target")
            if target is not None:
                target.attrib.pop("state", None)  # connected/disconnected: the running original's agent
            if dev.tag == "channel" and target is not None and target.get("type") == "virtio":
                source.attrib.pop("path", None)  # libvirt makes a per-domain path (the agent's too)
            else:
                dev.remove(source)
                dev.set("type", "null")  # a socket of the original's: not shared with the copy
        log = dev.find("log")
        if log is not None and log.get("file"):
            log.set("file", new_file(str(log.get("file")), "chardev"))


def _graphics(devices: ET.Element) -> None:
    for graphics in devices.findall("graphics"):
        for attr in ("port", "tlsPort", "websocket"):
            graphics.attrib.pop(attr, None)
        if graphics.get("type") in ("vnc", "spice"):
            graphics.set("autoport", "yes")


def _nvram(root: ET.Element, target_dir: Path, name: str, copy: DomainCopy) -> None:
    nvram = root.find("os/nvram")
    if nvram is not None:
        path = target_dir / f"{name}_VARS.fd"
        nvram.text = str(path)  # created from the firmware's template at the first start
        copy.files.append(path)


def _tpm(devices: ET.Element) -> None:
    for backend in devices.findall("tpm/backend"):
        for source in backend.findall("source"):
            backend.remove(source)  # the emulator's state directory follows the new UUID


def _runtime_only(root: ET.Element) -> None:
    for parent in root.iter():
        for child in list(parent):
            if child.tag == "alias" and not str(child.get("name", "")).startswith("ua-"):
                parent.remove(child)
    for seclabel in root.findall("seclabel"):
        if seclabel.get("type") == "dynamic":
            for child in list(seclabel):
                if child.tag in ("label", "imagelabel"):
                    seclabel.remove(child)


def domain_paths(xml: str) -> list[str]:
    """Every file path a domain XML names in its devices and os (disks, char devices, logs, NVRAM)."""
    root = ET.fromstring(xml)
    found = [str(s.get("file")) for s in root.iter("source") if s.get("file")]
    found += [str(s.get("path")) for s in root.iter("source") if s.get("path")]
    found += [str(n.get("file")) for n in root.iter("log") if n.get("file")]
    found += [str(n.text) for n in root.iter("nvram") if n.text]
    return found


def stop_on_errors(xml: str, targets: list[str]) -> str:
    """The XML with `error_policy='stop' rerror_policy='stop'` on the `<driver>` of these disk targets.

    Instant restore: a disk whose backing (the vault's export) vanishes pauses the domain (paused,
    I/O error) instead of handing the guest an I/O error.
    """
    root = ET.fromstring(xml)
    for disk in root.iter("disk"):
        target = disk.find("target")
        if target is None or target.get("dev") not in targets:
            continue
        driver = disk.find("driver")
        if driver is None:
            driver = ET.Element("driver", {"name": "qemu"})
            disk.insert(0, driver)
        driver.set("error_policy", "stop")
        driver.set("rerror_policy", "stop")
    return ET.tostring(root, encoding="unicode") + "\n"


def without_backing_stores(xml: str) -> str | None:
    """The XML without any disk's `<backingStore>` (None if it has none): a pulled disk is flat."""
    root = ET.fromstring(xml)
    found = False
    for disk in root.iter("disk"):
        for node in disk.findall("backingStore"):
            disk.remove(node)
            found = True
    return ET.tostring(root, encoding="unicode") + "\n" if found else None

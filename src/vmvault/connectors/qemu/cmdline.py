"""Rewrite a plain QEMU VM's command line (from a recovery point's definition) for a restored copy.

The command line recorded at backup time (/proc/<pid>/cmdline) is the template. A copy gets:
- its disks' image files replaced (`-blockdev driver=file,filename=…`, `-drive file=…`), the format
  node's driver set to the restored format, and the disks left out of the restore removed together
  with their file node and their `-device …,drive=NODE`;
- a new name (`-name`), UUID (`-uuid`, added when absent) and a new MAC on every NIC (`-nic`, and
  `-device` NICs: given a `mac=` when they had none, since QEMU's default MAC is the same for all);
- new paths for its unix sockets (`-qmp unix:`, `-chardev socket,path=`, `-monitor unix:`), its
  serial/file character devices (`-serial file:`, `-chardev file,path=`) and `-pidfile`.
Everything else (kernel, firmware, CPU, memory, devices) is kept as it was.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

NIC_MODELS = ("virtio-net-pci", "virtio-net-device", "virtio-net", "e1000", "e1000e", "rtl8139", "vmxnet3", "ne2k_pci")


@dataclass(frozen=True)
class RestoredDisk:
    node: str  # the format node (the disk's name in QMP terms)
    old_path: str
    new_path: str
    fmt: str


@dataclass
class CopyIdentity:
    name: str
    uuid: str
    run_dir: Path  # unix sockets (keep it short: 108-byte limit)
    log_dir: Path  # serial logs, pid file
    macs: list[str] = field(default_factory=list)  # filled in as NICs are found
    sockets: dict[str, str] = field(default_factory=dict)  # old socket path -> new


def new_mac() -> str:
    """A random locally administered unicast MAC in QEMU's 52:54:00 prefix."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def _split(value: str) -> list[str]:
    """QEMU's key=value list (',,' escapes a comma)."""
    parts: list[str] = []
    current = ""
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "," and value[i + 1 : i + 2] == ",":
            current += ",,"
            i += 2
            continue
        if ch == ",":
            parts.append(current)
            current = ""
        else:
            current += ch
        i += 1
    parts.append(current)
    return parts


def _opts(value: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for part in _split(value):
        key, sep, val = part.partition("=")
        out.append((key, val if sep else None))
    return out


def _join(opts: list[tuple[str, str | None]]) -> str:
    return ",".join(k if v is None else f"{k}={v}" for k, v in opts)


def _get(opts: list[tuple[str, str | None]], key: str) -> str | None:
    for k, v in opts:
        if k == key:
            return v
    return None


def _set(opts: list[tuple[str, str | None]], key: str, value: str) -> list[tuple[str, str | None]]:
    if any(k == key for k, _ in opts):
        return [(k, value if k == key else v) for k, v in opts]
    return [*opts, (key, value)]


def _pairs(cmdline: list[str]) -> list[tuple[str, str | None]]:
    """(option, value) pairs; an option whose next word starts with '-' (or nothing) has no value."""
    pairs: list[tuple[str, str | None]] = []
    i = 1
    while i < len(cmdline):
        word = cmdline[i]
        if word.startswith("-") and i + 1 < len(cmdline) and not _is_flag(word, cmdline[i + 1]):
            pairs.append((word, cmdline[i + 1]))
            i += 2
        else:
            pairs.append((word, None))
            i += 1
    return pairs


_FLAGS = {"-nodefaults", "-no-user-config", "-no-reboot", "-no-shutdown", "-daemonize", "-S", "-snapshot",
          "-enable-kvm", "-nographic", "-no-hpet", "-no-acpi", "-full-screen", "-s"}  # fmt: skip


def _is_flag(option: str, following: str) -> bool:
    return "-" + option.lstrip("-") in _FLAGS or following.startswith("-")


def disk_nodes(cmdline: list[str]) -> dict[str, str]:
    """{format node: its file node} for `-blockdev driver=FMT,node-name=N,file=F` options."""
    found: dict[str, str] = {}
    for opt, value in _pairs(cmdline):
        if opt.lstrip("-") == "blockdev" and value and not value.startswith("{"):
            o = _opts(value)
            node, child = _get(o, "node-name"), _get(o, "file")
            if node and child:
                found[node] = child
    return found


def rewrite(cmdline: list[str], disks: list[RestoredDisk], drop: list[str], ident: CopyIdentity) -> list[str]:
    """The command line of a copy: restored disks in, dropped disks (format node names) out, new identity."""
    if not cmdline:
        raise ValueError("no QEMU command line in the definition")
    files = disk_nodes(cmdline)
    dropped_nodes = set(drop) | {files[n] for n in drop if n in files}
    by_path = {d.old_path: d for d in disks}
    by_node = {d.node: d for d in disks}
    out = [cmdline[0]]
    saw_uuid = False
    for opt, value in _pairs(cmdline):
        name = opt.lstrip("-")
        if value is None:
            if name != "daemonize":
                out.append(opt)
            continue
        if name == "blockdev" and not value.startswith("{"):
            o = _opts(value)
            if _get(o, "node-name") in dropped_nodes:
                continue
            path = _get(o, "filename")
            if path is not None and path in by_path:
                o = _set(o, "filename", by_path[path].new_path)
            node = _get(o, "node-name")
            if node in by_node and _get(o, "driver") in ("raw", "qcow2"):
                o = _set(o, "driver", by_node[node].fmt)
            value = _join(o)
        elif name == "drive":
            o = _opts(value)
            path = _get(o, "file")
            if path is not None and path in by_path:
                o = _set(_set(o, "file", by_path[path].new_path), "format", by_path[path].fmt)
            elif _get(o, "id") in dropped_nodes or (path and path not in by_path and _get(o, "media") != "cdrom"):
                continue  # a disk left out of the restore
            value = _join(o)
        elif name == "device":
            o = _opts(value)
            if _get(o, "drive") in dropped_nodes:
                continue
            if o and (o[0][0] in NIC_MODELS or _get(o, "netdev") is not None):
                mac = new_mac()
                ident.macs.append(mac)
                o = _set(o, "mac", mac)
            value = _join(o)
        elif name == "nic":
            o = _opts(value)
            if o and o[0][0] != "none":
                mac = new_mac()
                ident.macs.append(mac)
                o = _set(o, "mac", mac)
            value = _join(o)
        elif name == "name":
            o = _opts(value)
            o = [("guest", ident.name) if k == "guest" else (k, v) for k, v in o]
            if o and o[0][1] is None:
                o[0] = (ident.name, None)
            value = _join(o)
        elif name == "uuid":
            saw_uuid = True
            value = ident.uuid
        elif name in ("qmp", "monitor") and value.startswith("unix:"):
            path, _, rest = value[5:].partition(",")
            value = f"unix:{_socket(ident, path)}" + (f",{rest}" if rest else "")
        elif name == "chardev":
            o = _opts(value)
            path = _get(o, "path")
            if path is not None and o and o[0][0] == "socket":
                o = _set(o, "path", _socket(ident, path))
            elif path is not None:
                o = _set(o, "path", str(ident.log_dir / f"{ident.name}-{Path(path).name}"))
            value = _join(o)
        elif name == "serial" and value.startswith("file:"):
            value = "file:" + str(ident.log_dir / f"{ident.name}-serial.log")
        elif name == "pidfile":
            value = str(ident.log_dir / f"{ident.name}.pid")
        out += [opt, value]
    if not saw_uuid:
        out += ["-uuid", ident.uuid]
    if not any(o.lstrip("-") == "name" for o, _ in _pairs(cmdline)):
        out += ["-name", ident.name]
    if not any(o.lstrip("-") == "pidfile" for o, _ in _pairs(cmdline)):
        out += ["-pidfile", str(ident.log_dir / f"{ident.name}.pid")]
    return out


def _socket(ident: CopyIdentity, old: str) -> str:
    if old not in ident.sockets:
        ident.sockets[old] = str(ident.run_dir / Path(old).name)
    return ident.sockets[old]

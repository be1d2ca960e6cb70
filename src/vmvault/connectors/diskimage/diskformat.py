"""A disk's format and backing chain: recorded once at `vm add`, never guessed again from its content.

A guest controls every byte of a raw disk, including its first sectors. If anything later asks QEMU
to guess the format (`qemu-img info`/`qemu-nbd` without `-f`), a guest that wrote a qcow2 header
with a backing file `/etc/shadow` into its raw disk turns the next backup into a copy of that host
file. So the format is chosen at `vm add` (the user's `--format`, the domain XML's `<driver type>`,
or guessed once and shown), stored in the catalog, and every later open names it explicitly.

For qcow2 images the backing chain is recorded at `vm add` too (each file and its format) and
checked against the image headers before every backup; the headers are read here in Python, so
checking a chain never makes QEMU open a file the header names. Refused at any time: a `json:` or
protocol backing name, a backing file that is not a regular file, a backing file without a
recorded format (QEMU would guess it), an external data file, a chain longer than MAX_CHAIN.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmvault.errors import InvalidInput, NotFound

__all__ = [
    "FORMATS",
    "BackingFile",
    "Qcow2Header",
    "blockdev_json",
    "chain_from_record",
    "chain_to_record",
    "check_chain",
    "read_chain",
    "read_qcow2_header",
]

FORMATS = ("raw", "qcow2")
UNKNOWN = "unknown"  # a disk added before formats were recorded (migration 0007); refused until set
MAX_CHAIN = 16
QCOW2_MAGIC = b"QFI\xfb"
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_DATA_FILE = 0x44415441
_INCOMPAT_DATA_FILE = 1 << 2
_MAX_HEADER = 2 * 1024 * 1024  # a cluster at most; extensions live in the first cluster


@dataclass(frozen=True)
class BackingFile:
    path: str  # absolute, symlinks resolved: the file vmvault opens
    format: str  # raw | qcow2


@dataclass(frozen=True)
class Qcow2Header:
    virtual_size: int
    backing_name: str | None  # as written in the header
    backing_format: str | None
    data_file: bool


def read_qcow2_header(path: Path) -> Qcow2Header | None:
    """The qcow2 header of a file, or None when it does not start with the qcow2 magic."""
    with open(path, "rb") as f:
        head = f.read(104)
        if len(head) < 72 or head[:4] != QCOW2_MAGIC:
            return None
        version, backing_off, backing_len, _bits, size = struct.unpack_from(">IQIIQ", head, 4)
        incompat, header_len = 0, 72
        if version >= 3 and len(head) >= 104:
            incompat = struct.unpack_from(">Q", head, 72)[0]
            header_len = struct.unpack_from(">I", head, 100)[0]
        backing_name = _read_at(f, backing_off, backing_len).decode("utf-8", "replace") if backing_off else None
        extensions = _extensions(f, header_len)
    fmt = extensions.get(_EXT_BACKING_FORMAT)
    return Qcow2Header(
        virtual_size=size,
        backing_name=backing_name,
        backing_format=fmt.decode("utf-8", "replace") if fmt is not None else None,
        data_file=bool(incompat & _INCOMPAT_DATA_FILE) or _EXT_DATA_FILE in extensions,
    )


def _read_at(f: Any, offset: int, length: int) -> bytes:
    if length > 4096 or offset > _MAX_HEADER:
        raise InvalidInput(f"qcow2 header of {f.name} names an implausible backing file ({length} bytes at {offset})")
    f.seek(offset)
    return bytes(f.read(length))


def _extensions(f: Any, start: int) -> dict[int, bytes]:
    """Header extensions: (type, length, data padded to 8) from the end of the header to type 0."""
    found: dict[int, bytes] = {}
    if start < 72 or start > 4096:
        return found
    f.seek(start)
    area = f.read(65536)
    pos = 0
    while pos + 8 <= len(area):
        kind, length = struct.unpack_from(">II", area, pos)
        if kind == 0:
            break
        found[kind] = bytes(area[pos + 8 : pos + 8 + length])
        pos += 8 + (length + 7) // 8 * 8
    return found


def _backing_path(image: Path, name: str) -> Path:
    """The file QEMU would open for this backing name; refuses names that are not plain files."""
    if name.startswith("json:") or ":" in name.split("/", 1)[0]:
        raise InvalidInput(
            f"qcow2 image {image} names backing file '{name[:120]}', a json: or protocol name",
            hint="vmvault follows only plain backing files: rebase the image on a file (qemu-img rebase)",
            code="disk_chain_refused",
        )
    path = Path(name) if name.startswith("/") else image.parent / name
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise NotFound(f"backing file {path} of {image} cannot be opened: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise InvalidInput(
            f"backing file {path} of {image} is not a regular file",
            hint="a backing file must be a plain image file",
            code="disk_chain_refused",
        )
    return Path(os.path.realpath(path))


def read_chain(path: Path, fmt: str) -> list[BackingFile]:
    """The backing chain below an image opened as `fmt`, read from the headers (QEMU opens nothing)."""
    chain: list[BackingFile] = []
    image, image_fmt = Path(path), fmt
    while image_fmt == "qcow2":
        header = read_qcow2_header(image)
        if header is None:
            raise InvalidInput(f"{image} is not a qcow2 image (no qcow2 header)", hint="give its format with --format")
        if header.data_file:
            raise InvalidInput(
                f"qcow2 image {image} uses an external data file",
                hint="vmvault backs up self-contained qcow2 images: qemu-img convert it to one",
                code="disk_chain_refused",
            )
        if not header.backing_name:
            break
        backing = _backing_path(image, header.backing_name)
        if header.backing_format not in FORMATS:
            raise InvalidInput(
                f"qcow2 image {image} does not record the format of its backing file {backing}"
                if header.backing_format is None
                else f"backing file {backing} of {image} is {header.backing_format}; vmvault reads raw and qcow2",
                hint=f"record it (if it is right): qemu-img rebase -u -F qcow2 -b {backing} {image}",
                code="disk_chain_refused",
            )
        if len(chain) >= MAX_CHAIN or any(b.path == str(backing) for b in chain) or backing == Path(path):
            raise InvalidInput(f"backing chain of {path} loops or exceeds {MAX_CHAIN}", code="disk_chain_refused")
        chain.append(BackingFile(str(backing), header.backing_format))
        image, image_fmt = backing, header.backing_format
    return chain


def check_chain(path: Path, fmt: str, recorded: list[BackingFile]) -> None:
    """Refuses, naming the file, a chain that differs from the one recorded at `vm add`."""
    now = read_chain(path, fmt)
    if now == recorded:
        return
    for i in range(max(len(now), len(recorded))):
        was = recorded[i] if i < len(recorded) else None
        got = now[i] if i < len(now) else None
        if was != got:
            above = str(path) if i == 0 else (recorded[i - 1].path if i - 1 < len(recorded) else "?")
            raise InvalidInput(
                f"the backing chain of disk {path} changed since vm add: {above} now names "
                f"{_describe(got)}, recorded {_describe(was)}",
                hint="if the change is yours, record the chain: vmvault vm set-format VM --disk NAME --format qcow2",
                code="disk_chain_changed",
            )


def _describe(b: BackingFile | None) -> str:
    return "no backing file" if b is None else f"{b.path} ({b.format})"


def chain_to_record(chain: list[BackingFile]) -> list[dict[str, str]]:
    return [{"path": b.path, "format": b.format} for b in chain]


def chain_from_record(record: Any) -> list[BackingFile] | None:
    """The recorded chain, or None when none was recorded (a disk added before 0007)."""
    if record is None:
        return None
    return [BackingFile(str(b["path"]), str(b["format"])) for b in record]


def blockdev_json(path: Path, fmt: str, chain: list[BackingFile]) -> str:
    """A `json:` file name for the image with exactly this chain: every node's driver is explicit.

    QEMU opens what it describes, whatever the headers say: the last qcow2 gets `"backing": null`.
    """
    nodes = [BackingFile(str(path), fmt), *chain]
    tree: dict[str, Any] | None = None
    for node in reversed(nodes):
        protocol = "host_device" if stat.S_ISBLK(os.stat(node.path).st_mode) else "file"  # LVM volumes
        child: dict[str, Any] = {"driver": node.format, "file": {"driver": protocol, "filename": node.path}}
        if node.format == "qcow2":
            child["backing"] = tree
        tree = child
    return "json:" + json.dumps(tree, separators=(",", ":"))

"""Recovery point manifests: the truth about a point, published last.

A manifest is a sealed JSON document (see docs/format.md, "Manifests"). The catalog is only an
index of these; `vault import` rebuilds it from them.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_VERSION = 1

# A manifest is evidence, not instructions (docs/security.md): an imported vault's author
# chooses every byte of it. Names become catalog names and file names under a restore's target
# directory, so they are checked here, on every read, with the rule user input follows
# (service/validate.py NAME_RE for VM names).
VM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DISK_NAME_RE = re.compile(r"^[A-Za-z0-9_][^/\\\x00-\x1f\x7f]{0,127}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class UntrustedName(ValueError):
    """A name or path in an authenticated document that user input could not have given.

    Not damage (the document authenticates): whoever holds the vault's keys wrote it so."""


@dataclass(frozen=True)
class DiskEntry:
    """One disk of a recovery point."""

    name: str  # disk0..N for image-given VMs, the target name (vda) for libvirt VMs
    size: int  # virtual size in bytes
    source_format: str  # "raw" or "qcow2": the default restore format
    index_root: str  # hex ID of the disk index root object (docs/format.md, "Disk index")
    stored_bytes: int = 0  # non-zero bytes of the disk at this point (protected-instance size)
    source_path: str = ""  # where the disk was read from (informational)


@dataclass(frozen=True)
class RecoveryPointManifest:
    rp_id: str
    vm_name: str
    vm_id: str
    time: str  # ISO 8601 UTC with microseconds; strictly increasing per VM
    consistency: str  # AppConsistent | FileSystemConsistent | CrashConsistent
    retain_until: str  # ISO 8601 date (UTC) after which the point may be deleted
    disks: tuple[DiskEntry, ...]
    vm_definition: dict[str, Any] = field(default_factory=dict)
    job_id: str = ""
    version: int = MANIFEST_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RecoveryPointManifest:
        raw = json.loads(data)
        if raw.get("version") != MANIFEST_VERSION:
            raise ValueError(f"unsupported manifest version {raw.get('version')!r}")
        raw["disks"] = tuple(DiskEntry(**d) for d in raw["disks"])
        manifest = cls(**raw)
        manifest.check_names()
        return manifest

    def check_names(self) -> None:
        """Raise UntrustedName naming the first name or path that user input could not have given."""
        if not isinstance(self.vm_name, str) or not VM_NAME_RE.fullmatch(self.vm_name):
            raise UntrustedName(f"invalid VM name {self.vm_name!r}")
        for label, value in (("point id", self.rp_id), ("VM id", self.vm_id)):
            if not isinstance(value, str) or not _ID_RE.fullmatch(value):
                raise UntrustedName(f"invalid {label} {value!r}")
        if not isinstance(self.job_id, str) or (self.job_id and not _ID_RE.fullmatch(self.job_id)):
            raise UntrustedName(f"invalid job id {self.job_id!r}")
        names = [d.name for d in self.disks]
        if len(set(names)) != len(names):
            raise UntrustedName(f"disk names repeat: {names!r}")
        for disk in self.disks:
            _check_disk(disk)

    def disk(self, name: str) -> DiskEntry:
        for d in self.disks:
            if d.name == name:
                return d
        raise KeyError(name)


def _check_disk(disk: DiskEntry) -> None:
    check_disk_name(disk.name)
    # Informational (where the disk was read from; QEMU may name it "json:{...}" or "nbd://..."),
    # but `vault import` makes it an imported VM's disk path: no control characters, no "..".
    check_disk_path(disk.source_path, "disk source path")
    if not isinstance(disk.size, int) or disk.size < 0 or disk.source_format not in ("raw", "qcow2"):
        raise ValueError(f"disk {disk.name!r}: invalid size or format")  # damage or a newer format: not a name


def check_disk_name(name: Any) -> str:
    """A disk name as a file name under a restore's target: no '/', '\\', control characters, no leading '.'."""
    if not isinstance(name, str) or not _DISK_NAME_RE.fullmatch(name):
        raise UntrustedName(f"invalid disk name {name!r}")
    return name


def check_disk_path(path: Any, label: str = "disk path") -> str:
    """A disk path read from a vault: no control characters, no '..' component."""
    if not isinstance(path, str) or _CONTROL_RE.search(path) or ".." in path.split("/"):
        raise UntrustedName(f"invalid {label} {path!r}")
    return path

"""Recovery point manifests: the truth about a point, published last.

A manifest is a sealed JSON document (see docs/format.md, "Manifests"). The catalog is only an
index of these; `vault import` rebuilds it from them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST_VERSION = 1


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
        return cls(**raw)

    def disk(self, name: str) -> DiskEntry:
        for d in self.disks:
            if d.name == name:
                return d
        raise KeyError(name)

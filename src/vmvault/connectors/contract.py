"""The connector contract: what every kind of VM implements, and the port it reports through.

A connector knows one hypervisor (docs/design.md, "Connectors"); the service knows none. Inputs are
serializable (the VM's catalog records, the previous point's bookkeeping, a budget): an agent on
another host could receive them as JSON, run the same connector and report over the REST API.
Effects on the catalog go through a port (`BackupPort`); the connector never opens the catalog or
a vault.

A backup, as the service runs it (service/backups.py)::

    with connector.open_point(request, port) as point:    # quiesce, snapshot, export
        engine.backup_exported(vault, spec(point), point.disks, previous, cancel=point.cancel)
    # leaving the block finishes the point (bitmaps, checkpoints kept), or aborts it on an error
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmvault.engine.backup import ExportedDisk
from vmvault.engine.consistency import Budget, Note, Quiesce

JsonDict = dict[str, Any]
CRASH_CONSISTENT = "CrashConsistent"


@dataclass(frozen=True)
class PreviousPoint:
    """The VM's latest point in the vault: what changed-block tracking counts from.

    definition: that point's vm_definition, with the bookkeeping the connector put there (a
    libvirt checkpoint's name, say).
    """

    rp_id: str
    time: str
    definition: JsonDict = field(default_factory=dict)


@dataclass(frozen=True)
class BackupRequest:
    """One backup's inputs, all serializable.

    disks: the catalog's disk records to back up (name, path, format, chain), excluded ones left
    out; definition: the VM's catalog definition (its kind's own keys); home: the host's vmvault
    home, where work files (fleece overlays, scratch images, sockets) go.
    """

    vm_id: str
    vm_name: str
    disks: list[JsonDict]
    definition: JsonDict
    previous: PreviousPoint | None
    budget: Budget
    home: str


@dataclass(frozen=True)
class OpenPoint:
    """A point in time, exported: the engine reads `disks` (URIs, changed extents or None = unknown).

    cancel: set when reading must stop (the job's cancel, or the connector's own reason);
    read_hint: the fix named beside the engine's changed-block warnings.
    """

    rp_id: str
    time: str
    consistency: str
    definition: JsonDict  # the manifest's vm_definition
    disks: list[ExportedDisk]
    cancel: threading.Event
    read_hint: str = "nothing to do: the next backup uses the bitmap"


@dataclass(frozen=True)
class Capabilities:
    """What a kind of VM can do here (registration, `doctor`)."""

    kind: str
    changed_blocks: str  # "bitmaps", "checkpoints" or "none"
    backup_api: str  # how a running VM's point is taken: "fleecing", "libvirt-pull" or "offline"
    quiesce: bool  # can freeze the guest through its agent
    live_restore: bool  # can run a VM from an export (instant restore)


class BackupPort(Protocol):
    """How a connector reports a backup's effects; the service writes them to the catalog and the job."""

    @property
    def cancel(self) -> threading.Event: ...

    def new_point(self) -> tuple[str, str]:
        """The new point's id and time (UTC, later than the VM's last point): asked right after the instant."""
        ...

    def warn(self, note: Note) -> None:
        """A job warning (reported when the point is published)."""
        ...

    def quiesced(self, q: Quiesce, snapshot_s: float | None) -> None:
        """The quiesce's outcome and figures (the job's `quiesce` details)."""
        ...

    def save_vm(self, updates: JsonDict, disks: list[JsonDict] | None = None) -> None:
        """Bookkeeping kept with the VM (its definition's keys: tracking, agent state; its disk records)."""
        ...

    def save_disk(self, name: str, values: JsonDict) -> None:
        """Values recorded on one disk record (a qcow2 chain read for the first time)."""
        ...


class Connector(Protocol):
    """One kind of VM. Registered in connectors/__init__.py under the kind the catalog records."""

    kind: str

    def capabilities(self) -> Capabilities: ...

    def discover(self, where: str | None = None) -> list[JsonDict]:
        """VMs this host can see that could be added (empty where the kind has no inventory)."""
        ...

    def open_point(self, request: BackupRequest, port: BackupPort) -> AbstractContextManager[OpenPoint]:
        """Quiesce as the policy and guest allow, take the point in time, export each disk.

        Leaving the block normally finishes the point (bookkeeping saved through the port);
        leaving it with an exception aborts it (nothing kept that the next backup would trust).
        """
        ...


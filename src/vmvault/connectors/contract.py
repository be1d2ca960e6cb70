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

JsonDict = dict[str, Any]

# A point's consistency, in Azure's words (what counts as which: connectors/consistency.py)
APP_CONSISTENT = "AppConsistent"
FILE_SYSTEM_CONSISTENT = "FileSystemConsistent"
CRASH_CONSISTENT = "CrashConsistent"
DEFAULT_FREEZE_BUDGET_S = 60.0  # the freeze call with the guest's fsfreeze hooks (a database checkpoints)
DEFAULT_FROZEN_WINDOW_S = 10.0  # frozen file systems: the snapshot only (VSS itself holds writes at most 10 s)
RECOVER_EXTRA_S = 60.0  # after a freeze timed out: how much longer than the budget to wait for the agent
# agent_status where vmvault does not track a guest agent's state (its words since `vm add --qmp` came)
NOT_APPLICABLE: JsonDict = {"state": "NotApplicable", "message": "the VM is backed up from its disk images (offline)",
                            "recommendedAction": None}  # fmt: skip


def no_channel(vm_name: str) -> Exception:
    """enable_agent where vmvault cannot add a channel: the QEMU process is the admin's."""
    from vmvault.errors import InvalidInput

    return InvalidInput(
        f"VM '{vm_name}' is not a libvirt domain: vmvault cannot add a guest agent channel to it",
        hint="give the QEMU process a virtserialport named org.qemu.guest_agent.0 and add the VM with "
        "--guest-agent SOCKET (docs/running-vms.md)",
    )


@dataclass(frozen=True)
class Note:
    """Something the job reports as a warning: a stable code, a message, and the fix."""

    code: str
    message: str
    hint: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "recommendedAction": self.hint}


@dataclass(frozen=True)
class Budget:
    """How long a quiesce may take (docs/running-vms.md, "Quiesce budget").

    freeze_s: the guest-fsfreeze-freeze call, the guest's fsfreeze hooks included (a database's
    checkpoint takes tens of seconds); frozen_s: how long file systems stay frozen, which is the
    snapshot (QMP transaction / backupBegin) only; recover_s: after a freeze call timed out, how long
    vmvault waits for the agent to answer again to thaw the late freeze.
    """

    freeze_s: float = DEFAULT_FREEZE_BUDGET_S
    frozen_s: float = DEFAULT_FROZEN_WINDOW_S
    crash_only: bool = False  # the policy says OnlyCrashConsistent: no quiesce at all

    @property
    def recover_s(self) -> float:
        return self.freeze_s + RECOVER_EXTRA_S


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
    shared_target: bool = False  # its VMs' files are opened by another user than vmvault's: restored outside the home


@dataclass(frozen=True)
class NewVmRequest:
    """A restore as a new VM: the source VM (its catalog definition), the point, the new name and directory."""

    source_vm: str
    rp_id: str
    new_name: str
    target_dir: str
    source_definition: JsonDict = field(default_factory=dict)


@dataclass(frozen=True)
class WrittenDisk:
    """A disk the engine restored from the point (a qcow2 overlay on the vault's export, for an instant restore)."""

    name: str
    path: str
    format: str
    virtual_size: int


@dataclass(frozen=True)
class NewVm:
    """A VM a connector defined from a point: what the catalog records of it, and how to reach it again.

    files: what the connector wrote (removed again if the restore fails); view: what `restore vm`
    reports besides the catalog's name and id; handle: what start_new_vm and remove_new_vm need.
    """

    kind: str
    disks: list[JsonDict]
    definition: JsonDict
    files: list[str]
    view: JsonDict
    handle: JsonDict


@dataclass
class CopyDisk:
    """A disk of an instant restore: a local qcow2 overlay on the vault's export, copied local while the VM runs.

    node: the name the hypervisor copies it by (QEMU's format node, libvirt's target).
    """

    name: str
    node: str
    path: str  # the overlay, then the final disk
    size: int
    done: bool = False


class LiveCopy(Protocol):
    """A VM of an instant restore, running on its overlays: the copy to local disks, as the owner drives it."""

    cancelled: str  # what a cancel removed, in the job's error

    def tick(self, disks: list[CopyDisk], copied: dict[str, int], serving: bool) -> None:
        """One look at the copy: start, resume or restart it (`serving`: the export answers); mark disks done."""
        ...

    def finished(self, disks: list[CopyDisk]) -> None:
        """Every disk is local: nothing of the VM's definition may name the export any more."""
        ...

    def check_local(self, disks: list[CopyDisk]) -> None:
        """IntegrityError when a disk still has a backing file."""
        ...

    def active(self) -> bool:
        """Whether the VM runs (a failed copy leaves the export up for a VM that still needs it)."""
        ...

    def stop(self) -> None:
        """Stop the VM and remove its definition: a copy that still needs the export is no use alone."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LeftoverVm:
    """A VM whose leftovers of a killed vmvault are to be reconciled (service start).

    latest: the bookkeeping of its latest point (None: no point); latest_known False: that point
    could not be read (its vault did not open), so nothing it would keep may be removed.
    """

    vm_id: str
    name: str
    definition: JsonDict
    latest: PreviousPoint | None
    latest_known: bool = True


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

    def quiesced(self, q: Any, snapshot_s: float | None) -> None:
        """The quiesce's outcome and figures (the job's `quiesce` details): a connectors.consistency.Quiesce."""
        ...

    def save_vm(self, updates: JsonDict, disks: list[JsonDict] | None = None) -> None:
        """Bookkeeping kept with the VM (its definition's keys: tracking, agent state; its disk records)."""
        ...

    def save_disk(self, name: str, values: JsonDict) -> None:
        """Values recorded on one disk record (a qcow2 chain read for the first time)."""
        ...


class ImageTools(Protocol):
    """What every kind's disk images share (connectors/diskimage): opened, checked and converted by QEMU's tools."""

    def refuse_locked(self, path: str) -> None:
        """VmRunning when a QEMU holds the image."""
        ...

    def check_restored(self, path: str, fmt: str, size: int) -> None:
        """IntegrityError unless a restored image opens as fmt, with the point's size, and checks clean."""
        ...

    def drop_tracking(self, path: str) -> None:
        """Remove vmvault's changed-block bitmaps from a restored qcow2 (the next backup must not trust them)."""
        ...

    def convert_to_qcow2(self, raw: str, dest: str) -> None: ...

    def remove_dead_work_dirs(self) -> int:
        """Work directories of exports whose vmvault was killed."""
        ...


class Inventory(Protocol):
    """What vmvault knows of a kind's VMs outside a backup or a restore: add, list, agent, doctor, leftovers."""

    kind: str

    def capabilities(self) -> Capabilities: ...

    def discover(self, where: str | None = None) -> list[JsonDict]:
        """VMs this host can see that could be added (empty where the kind has no inventory)."""
        ...

    def describe(self, where: JsonDict, known: list[JsonDict]) -> tuple[list[JsonDict], JsonDict]:
        """`vm add`: the VM `where` names (sockets, a domain, image paths) as the catalog keeps it.

        Returns its disk records and definition; known: the definitions of this kind's VMs already added.
        """
        ...

    def status(self, definitions: list[JsonDict]) -> list[JsonDict]:
        """`vm list`: power state and guest agent reachability, one dict per definition (fast: short timeouts)."""
        ...

    def agent_status(self, definition: JsonDict, *, live: bool) -> tuple[JsonDict, JsonDict | None]:
        """The guest agent's state (Azure's words); with live, probed now: also the probe to keep (else None)."""
        ...

    def agent_advice(self, vm_name: str, definition: JsonDict) -> JsonDict | None:
        """`item show`: whether a point can be quiesced, and the fix when not (None: nothing to say)."""
        ...

    def enable_agent(self, vm_name: str, definition: JsonDict) -> JsonDict:
        """Give the VM a guest agent channel (InvalidInput where vmvault cannot)."""
        ...

    def reconcile(self, home: str, vms: list[LeftoverVm]) -> list[str]:
        """Service start: undo what a killed vmvault left on this kind's VMs; one line per thing done."""
        ...

    def doctor_host(self, home: str | None, disks: list[JsonDict], needed: bool) -> list[JsonDict]:
        """`doctor`: what this host offers the kind; disks: the records of its VMs (needed: it has some)."""
        ...

    def doctor_vm(self, vm_name: str, definition: JsonDict, disks: list[JsonDict]) -> list[JsonDict]:
        """`doctor`: one VM of the kind, reachable and able to be backed up."""
        ...



class PointInTime(Protocol):
    """A backup's side of the hypervisor."""

    def open_point(self, request: BackupRequest, port: BackupPort) -> AbstractContextManager[OpenPoint]:
        """Quiesce as the policy and guest allow, take the point in time, export each disk.

        Leaving the block normally finishes the point (bookkeeping saved through the port);
        leaving it with an exception aborts it (nothing kept that the next backup would trust).
        """
        ...



class NewVms(Protocol):
    """A restore's side of the hypervisor: a point as a new VM (instant too), a VM's disks replaced."""

    def refuse_new_vm(self, request: NewVmRequest) -> None:
        """Refuse before the job when this kind cannot make the copy (no definition, a name the hypervisor has)."""
        ...

    def in_the_way(self, request: NewVmRequest) -> list[str]:
        """The files of the copy besides its disks that exist already (a restore never overwrites)."""
        ...

    def check_point(self, request: NewVmRequest, definition: JsonDict) -> None:
        """Refuse the point's definition (read from the vault) before any disk is written."""
        ...

    def create_new_vm(
        self, request: NewVmRequest, definition: JsonDict, in_point: list[str], disks: list[WrittenDisk],
        *, instant: bool = False,
    ) -> NewVm:  # fmt: skip
        """Define the copy: new name, UUID, MACs, paths in the target directory (instant: stop on I/O errors)."""
        ...

    def share_with_vm(self, path: str, mode: int) -> None:
        """Open a directory or socket vmvault made for a new VM to the hypervisor's processes (its user's group)."""
        ...

    def start_new_vm(self, vm: NewVm) -> None:
        """Boot the copy and wait until its guest agent answers."""
        ...

    def remove_new_vm(self, vm: NewVm) -> None:
        """Undo create_new_vm (a restore that failed after it)."""
        ...

    def disks_template(
        self, target_dir: str, definition: JsonDict, source_vm: str, rp_id: str, in_point: list[str],
        written: list[WrittenDisk], *, force: bool = False,
    ) -> str | None:  # fmt: skip
        """`restore disks`: the file beside the disks from which the VM can be defined again (None: no such file)."""
        ...

    def overlay(self, definition: JsonDict, name: str, size: int, path: str, export_socket: str) -> CopyDisk:
        """Instant restore: a qcow2 overlay at `path` on the disk `name` of the vault's export."""
        ...

    def live_copy(self, vm: NewVm) -> LiveCopy:
        """Instant restore: the running copy `vm` (created with instant=True and started)."""
        ...

    def template_name(self, source_vm: str) -> str | None:
        """The name of the file disks_template writes (None: this kind writes none)."""
        ...

    def refuse_running(self, vm_name: str, definition: JsonDict) -> None:
        """`restore replace-disks`: VmRunning unless the VM is stopped."""
        ...

    def disks_replaced(self, vm_id: str, definition: JsonDict) -> None:
        """After replace-disks: the new images carry no tracking (bitmaps, checkpoints): forget it."""
        ...


class Connector(Inventory, PointInTime, NewVms, Protocol):
    """One kind of VM, registered in connectors/registry.py under the kind the catalog records."""

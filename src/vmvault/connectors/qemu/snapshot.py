"""Point-in-time snapshots of a running QEMU's disks, with persistent dirty bitmaps (QEMU >= 5.2).

One backup, all disks at one instant (see docs/running-vms.md):

    prepare    fleece overlay per disk (qcow2, backing = the disk's node), decide which bitmaps to trust
    snapshot   ONE `transaction`: per disk, add the next bitmap, disable the previous one, and start
               `blockdev-backup sync=none` into the fleece (copy-before-write: the fleece now shows
               the disk as it was at this instant while the guest keeps writing)
    export     one NBD server, a read-only export of each fleece, with the previous bitmap
    finish     export-del -> BLOCK_EXPORT_DELETED -> job-cancel -> BLOCK_JOB_CANCELLED -> blockdev-del
               -> remove the fleece file; then on success drop the consumed bitmap, on failure merge
               it into the new one so no change is lost.

Everything vmvault creates inside QEMU is named `vmv-<vm tag>-...`, so leftovers of a killed run
are found and removed (`reconcile`) before the next one. A bitmap says "what changed since point
R"; `Tracking` records which bitmap, which point, and which QEMU process, and is kept by the caller.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmvault.connectors.qemu.qmp import (
    QmpClient,
    QmpError,
    bitmap_add_action,
    bitmap_disable_action,
    blockdev_backup_action,
)
from vmvault.connectors.qemu.vm import QemuDisk, QemuIdentity, dirty_bitmaps
from vmvault.engine.nbd import NbdReader
from vmvault.errors import HypervisorError

log = logging.getLogger("vmvault")

JsonDict = dict[str, Any]
PREFIX = "vmv-"
EVENT_TIMEOUT = 60.0
FLEECE_MARGIN = 256 << 20  # free space kept beyond the disks' allocated size
FLEECE_LOW_WATER = 64 << 20  # below this during a backup the fleece may soon fail guest writes
_VOLATILE_FS = {"tmpfs", "ramfs", "devtmpfs"}


class FleeceSpaceError(HypervisorError):
    code = "fleece_space"


# ---- names and tracking state ---------------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    """Every QEMU object vmvault creates for one VM."""

    tag: str  # short and stable per VM

    def fleece_node(self, i: int) -> str:
        return f"{PREFIX}{self.tag}-f{i}"

    def job(self, i: int) -> str:
        return f"{PREFIX}{self.tag}-j{i}"

    def export(self, i: int) -> str:
        return f"{PREFIX}{self.tag}-e{i}"

    def bitmap(self, chain: str, generation: int) -> str:
        return f"{PREFIX}{self.tag}-{chain}-{generation}"

    @property
    def bitmap_prefix(self) -> str:
        return f"{PREFIX}{self.tag}-"


@dataclass(frozen=True)
class TrackedDisk:
    bitmap: str
    size: int
    persistent: bool


@dataclass(frozen=True)
class Tracking:
    """Bitmap `disks[d].bitmap` holds every change to disk d since point `rp_id` (taken at `rp_time`)."""

    chain: str
    generation: int
    rp_id: str
    rp_time: str
    qemu: QemuIdentity | None
    disks: dict[str, TrackedDisk]

    def to_dict(self) -> JsonDict:
        return {
            "chain": self.chain,
            "generation": self.generation,
            "rpId": self.rp_id,
            "rpTime": self.rp_time,
            "qemu": self.qemu.to_dict() if self.qemu else None,
            "disks": {
                n: {"bitmap": d.bitmap, "size": d.size, "persistent": d.persistent} for n, d in self.disks.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Any) -> Tracking | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(
                chain=str(data["chain"]),
                generation=int(data["generation"]),
                rp_id=str(data["rpId"]),
                rp_time=str(data["rpTime"]),
                qemu=QemuIdentity.from_dict(data.get("qemu")),
                disks={
                    str(n): TrackedDisk(str(d["bitmap"]), int(d["size"]), bool(d["persistent"]))
                    for n, d in dict(data["disks"]).items()
                },
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class BasePoint:
    """The previous recovery point the engine compares with."""

    rp_id: str
    time: str


@dataclass
class DiskPlan:
    index: int
    disk: QemuDisk
    new_bitmap: str
    old_bitmap: str | None  # trusted: every change since the base point, exported with the fleece
    reason: str | None  # why tracking is not used this time (None: used, or nothing to compare with)
    fleece: Path


@dataclass(frozen=True)
class SnapshotDisk:
    """One disk's frozen view, as exported: what the engine reads."""

    name: str
    uri: str
    size: int
    format: str
    path: str
    changed_extents: list[tuple[int, int]] | None


# ---- the session ----------------------------------------------------------------------------------


@dataclass
class SnapshotSession:
    qmp: QmpClient
    disks: list[QemuDisk]
    names: Names
    run_dir: Path  # short path: the NBD socket lives here
    fleece_dir: Path  # on a real disk: fleece overlays grow with guest writes during the backup
    plans: list[DiskPlan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chain: str = ""
    generation: int = 0
    snapshotted: bool = False
    _nodes: list[str] = field(default_factory=list)
    _jobs: list[str] = field(default_factory=list)
    _exports: list[str] = field(default_factory=list)
    _nbd: bool = False

    @property
    def nbd_socket(self) -> Path:
        return self.run_dir / "nbd.sock"

    # ---- before: leftovers, space, plan ------------------------------------------------------------
    def clear_leftovers(self) -> None:
        """Remove what a killed run left in QEMU and on disk (before the disks are listed: a leftover
        backup job's filter node sits on top of its disk until cancelled)."""
        for export in self.qmp.query_block_exports():
            if str(export.get("id", "")).startswith(PREFIX):
                self._note(f"removed leftover NBD export {export['id']} of an interrupted backup")
                self._del_export(export["id"])
        for job in self.qmp.query_block_jobs():
            if str(job.get("device", "")).startswith(PREFIX):
                self._note(f"cancelled leftover block job {job['device']} of an interrupted backup")
                self._cancel_job(job["device"])
        for node in self.qmp.query_named_block_nodes():
            name = str(node.get("node-name") or "")
            if name.startswith(PREFIX):
                self._note(f"removed leftover fleece node {name} of an interrupted backup")
                self.qmp.blockdev_del(name)
        for path in self.fleece_dir.glob(f"{self.names.bitmap_prefix}*.qcow2"):
            path.unlink(missing_ok=True)
        if self.nbd_socket.exists():
            with contextlib.suppress(QmpError):
                self.qmp.nbd_server_stop()
            self.nbd_socket.unlink(missing_ok=True)

    def reconcile_bitmaps(self, tracking: Tracking | None) -> None:
        """Fold the bitmaps of a run killed after its transaction back into the chain; drop strays."""
        bitmaps = dirty_bitmaps(self.qmp)
        for disk in self.disks:
            ours = {n: b for n, b in bitmaps.get(disk.node, {}).items() if n.startswith(self.names.bitmap_prefix)}
            tracked = tracking.disks.get(disk.name) if tracking else None
            current = ours.pop(tracked.bitmap, None) if tracked else None
            leftovers = [n for n, b in ours.items() if not b.get("busy")]
            if (
                tracked is not None
                and current is not None
                and leftovers
                and not any(b.get("inconsistent") for b in (current, *ours.values()))
            ):
                # A run was killed after its transaction: current (disabled) + leftovers = all changes since R.
                if not current.get("recording"):
                    self.qmp.block_dirty_bitmap_enable(disk.node, tracked.bitmap)
                self.qmp.block_dirty_bitmap_merge(disk.node, tracked.bitmap, leftovers)
                self._note(f"disk {disk.name}: merged bitmap(s) {', '.join(leftovers)} of an interrupted backup")
            for name in leftovers:
                self.qmp.block_dirty_bitmap_remove(disk.node, name)

    def check_fleece_space(self) -> None:
        """The fleece must hold every block the guest overwrites during the backup: refuse to start short."""
        self.fleece_dir.mkdir(parents=True, exist_ok=True)
        fs = filesystem_type(self.fleece_dir)
        if fs in _VOLATILE_FS:
            raise FleeceSpaceError(
                f"the fleece directory {self.fleece_dir} is on {fs}: overlays would fill memory",
                hint="put vmvault's home (VMVAULT_HOME) on a disk-backed file system",
            )
        needed = sum(d.actual_size for d in self.disks) + FLEECE_MARGIN
        free = self.fleece_free()
        if free < needed:
            raise FleeceSpaceError(
                f"only {free >> 20} MiB free for fleece overlays in {self.fleece_dir}; the disks' allocated size "
                f"plus a margin needs {needed >> 20} MiB (a full overlay would break the guest's writes)",
                hint="free space on that file system, or move vmvault's home (VMVAULT_HOME)",
            )

    def fleece_free(self) -> int:
        st = os.statvfs(self.fleece_dir)
        return st.f_bavail * st.f_frsize

    def prepare(self, tracking: Tracking | None, base: BasePoint | None, identity: QemuIdentity) -> list[DiskPlan]:
        """Decide per disk whether its bitmap can be trusted; create the fleece overlays."""
        bitmaps = dirty_bitmaps(self.qmp)
        reasons: dict[str, str | None] = {}
        for disk in self.disks:
            reasons[disk.name] = _distrust(disk, tracking, base, identity, bitmaps.get(disk.node, {}))
        trusted = tracking is not None and all(reasons[d.name] is None and d.name in tracking.disks for d in self.disks)
        if tracking is not None and trusted:
            self.chain, self.generation = tracking.chain, tracking.generation + 1
        else:  # a new chain under fresh names: nothing of the old one is reused by mistake
            self.chain, self.generation = secrets.token_hex(3), 1
        for i, disk in enumerate(self.disks):
            tracked = tracking.disks.get(disk.name) if tracking else None
            reason = reasons[disk.name]
            old = tracked.bitmap if tracked and reason is None and base is not None else None
            if tracked and old is None and tracked.bitmap in bitmaps.get(disk.node, {}):
                self.qmp.block_dirty_bitmap_remove(disk.node, tracked.bitmap)
            fleece = self.fleece_dir / f"{self.names.bitmap_prefix}{i}.qcow2"
            self.plans.append(DiskPlan(i, disk, self.names.bitmap(self.chain, self.generation), old, reason, fleece))
        for plan in self.plans:
            self._add_fleece(plan)
        return self.plans

    def _add_fleece(self, plan: DiskPlan) -> None:
        proc = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(plan.fleece), str(plan.disk.virtual_size)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise HypervisorError(f"cannot create the fleece overlay {plan.fleece}: {proc.stderr.strip()}")
        node = self.names.fleece_node(plan.index)
        self.qmp.blockdev_add(
            {
                "driver": "qcow2",
                "node-name": node,
                "file": {"driver": "file", "filename": str(plan.fleece)},
                "backing": plan.disk.node,
                "discard": "unmap",
            }
        )
        self._nodes.append(node)

    # ---- the instant -------------------------------------------------------------------------------
    def snapshot(self) -> None:
        """All disks at one instant: ONE transaction (call it while the guest is frozen)."""
        actions = []
        for plan in self.plans:
            disk = plan.disk
            actions.append(bitmap_add_action(disk.node, plan.new_bitmap, persistent=disk.persistent_bitmaps))
            if plan.old_bitmap:
                actions.append(bitmap_disable_action(disk.node, plan.old_bitmap))
            job = self.names.job(plan.index)
            actions.append(blockdev_backup_action(job, disk.node, self.names.fleece_node(plan.index)))
        self.qmp.transaction(actions)
        self.snapshotted = True
        self._jobs = [self.names.job(p.index) for p in self.plans]

    def undo_snapshot(self) -> None:
        """Undo the instant before a retry (it outlasted the frozen window): cancel the backup jobs, drop the
        fleece overlays, put each disk's bitmaps back as they were (the new one folded into the old), new overlays."""
        self.teardown()
        for plan in self.plans:
            node = plan.disk.node
            if plan.old_bitmap:
                self.qmp.block_dirty_bitmap_enable(node, plan.old_bitmap)
                self.qmp.block_dirty_bitmap_merge(node, plan.old_bitmap, [plan.new_bitmap])
            self.qmp.block_dirty_bitmap_remove(node, plan.new_bitmap)
        self.snapshotted = False
        for plan in self.plans:
            self._add_fleece(plan)

    # ---- reading -----------------------------------------------------------------------------------
    def export(self) -> list[SnapshotDisk]:
        """NBD exports of the frozen views; changed extents from the trusted bitmaps."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._start_nbd()
        out = []
        for plan in self.plans:
            export_id = self.names.export(plan.index)
            bitmaps = [plan.old_bitmap] if plan.old_bitmap else []
            self.qmp.block_export_add(export_id, self.names.fleece_node(plan.index), plan.disk.name, bitmaps)
            self._exports.append(export_id)
            uri = f"nbd+unix:///{plan.disk.name}?socket={self.nbd_socket}"
            changed = _dirty_extents(uri, plan.old_bitmap) if plan.old_bitmap else None
            disk = plan.disk
            out.append(SnapshotDisk(disk.name, uri, disk.virtual_size, disk.format, disk.path, changed))
        return out

    def _start_nbd(self) -> None:
        try:
            self.qmp.nbd_server_start(str(self.nbd_socket))
        except QmpError as exc:
            if "already running" not in exc.desc:
                raise
            raise HypervisorError(
                "QEMU's NBD server is already in use by another tool (QEMU has only one); vmvault needs it "
                "for the backup's exports",
                hint="stop the other tool's exports (nbd-server-stop) and run the backup again",
            ) from exc
        self._nbd = True

    # ---- after -------------------------------------------------------------------------------------
    def finish(
        self, ok: bool, tracking: Tracking | None, point: BasePoint | None, identity: QemuIdentity
    ) -> Tracking | None:
        """Tear down in order, then settle the bitmaps; returns the tracking state to keep."""
        self.teardown()
        if not self.snapshotted:
            return tracking
        if ok:
            assert point is not None
            for plan in self.plans:
                if plan.old_bitmap:
                    self.qmp.block_dirty_bitmap_remove(plan.disk.node, plan.old_bitmap)
            disks = {p.disk.name: _tracked(p) for p in self.plans}
            return Tracking(self.chain, self.generation, point.rp_id, point.time, identity, disks)
        # Failed or cancelled: the new bitmaps record since this instant; fold the old ones in so no
        # change is lost. A disk without a trusted old bitmap cannot say what changed since R.
        kept = {}
        for plan in self.plans:
            if plan.old_bitmap:
                self.qmp.block_dirty_bitmap_merge(plan.disk.node, plan.new_bitmap, [plan.old_bitmap])
                self.qmp.block_dirty_bitmap_remove(plan.disk.node, plan.old_bitmap)
                kept[plan.disk.name] = _tracked(plan)
        if tracking is None or not kept:
            return None
        return Tracking(self.chain, self.generation, tracking.rp_id, tracking.rp_time, identity, kept)

    def teardown(self) -> None:
        """export-del -> wait -> job-cancel -> wait -> blockdev-del -> remove file; NBD server off."""
        while self._exports:
            self._del_export(self._exports.pop())
        while self._jobs:
            self._cancel_job(self._jobs.pop())
        while self._nodes:
            self.qmp.blockdev_del(self._nodes.pop())
        for plan in self.plans:
            plan.fleece.unlink(missing_ok=True)
        if self._nbd:
            self.qmp.nbd_server_stop()
            self._nbd = False
        self.nbd_socket.unlink(missing_ok=True)

    def _del_export(self, export_id: str) -> None:
        self.qmp.block_export_del(export_id, hard=True)
        self.qmp.wait_event("BLOCK_EXPORT_DELETED", lambda d: d.get("id") == export_id, EVENT_TIMEOUT)

    def _cancel_job(self, job_id: str) -> None:
        try:
            self.qmp.block_job_cancel(job_id, force=True)
        except QmpError as exc:
            if exc.error_class == "DeviceNotActive":
                return  # already gone
            raise
        self.qmp.wait_event("BLOCK_JOB_CANCELLED", lambda d: d.get("device") == job_id, EVENT_TIMEOUT)

    def _note(self, message: str) -> None:
        log.info(message)
        self.notes.append(message)


def _tracked(plan: DiskPlan) -> TrackedDisk:
    return TrackedDisk(plan.new_bitmap, plan.disk.virtual_size, plan.disk.persistent_bitmaps)


def _distrust(
    disk: QemuDisk,
    tracking: Tracking | None,
    base: BasePoint | None,
    identity: QemuIdentity,
    bitmaps: dict[str, JsonDict],
) -> str | None:
    """Why this disk's bitmap cannot say what changed since the base point (None: it can, or no need)."""
    if tracking is None or base is None:
        return None  # nothing tracked yet, or nothing to compare with: a plain first read
    tracked = tracking.disks.get(disk.name)
    if tracked is None:
        return "the disk has no bitmap yet (it is new, or the last backup of it failed)"
    if base.time < tracking.rp_time:
        return f"the bitmap counts from point {tracking.rp_id}, which is newer than the latest point {base.rp_id}"
    state = bitmaps.get(tracked.bitmap)
    if state is None:
        if tracking.qemu is not None and tracking.qemu != identity:
            why = f"QEMU was restarted since the last backup (pid {tracking.qemu.pid} -> {identity.pid})"
            if not tracked.persistent:
                return f"{why} and a {disk.format} disk's bitmap lives only in QEMU's memory"
            return (f"{why} and bitmap {tracked.bitmap} did not survive (QEMU was killed or crashed, or the VM "
                    "was live-migrated from another host: its bitmaps stay there)")  # fmt: skip
        return (f"bitmap {tracked.bitmap} is missing (deleted, or the VM was live-migrated from another host: "
                "its bitmaps stay there)")  # fmt: skip
    if state.get("inconsistent"):
        return f"bitmap {tracked.bitmap} is inconsistent: QEMU stopped without saving it (killed or crashed)"
    if not state.get("recording"):
        return f"bitmap {tracked.bitmap} was disabled by someone else"
    if state.get("busy"):
        return f"bitmap {tracked.bitmap} is in use by another job"
    if tracked.size != disk.virtual_size:
        return f"the disk was resized from {tracked.size} to {disk.virtual_size} bytes"
    return None


def _dirty_extents(uri: str, bitmap: str) -> list[tuple[int, int]]:
    context = f"qemu:dirty-bitmap:{bitmap}"
    reader = NbdReader(uri, meta_contexts=(context,))
    try:
        return [(off, length) for off, length, flags in reader.extents(context) if flags & 1]
    finally:
        reader.close()


def filesystem_type(path: Path) -> str:
    """The type of the file system holding path (longest mount point prefix in /proc/self/mounts)."""
    best, fstype = "", ""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, parts[2]
    except OSError:
        return ""
    return fstype

"""The plain-QEMU connector: a VM whose QEMU vmvault drives over QMP (docs/running-vms.md).

A point of a running VM:
  reconcile leftovers -> check fleece space -> plan (which bitmaps to trust) -> pre-script ->
  freeze -> ONE QMP transaction -> thaw -> post-script -> NBD export -> [the engine reads changed
  blocks, or everything + hash comparison when tracking cannot be trusted] -> tear down -> settle bitmaps.
A VM whose QEMU is not running is read offline by the disk-image connector: CrashConsistent.

What the connector keeps about such a VM lives in its catalog definition (saved through the port):
the sockets, the last seen definition, the changed-block tracking state ("tracking") and the last
agent probe ("agent"); neither of the last two goes into recovery points.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from vmvault.catalog.clock import now_iso
from vmvault.connectors.consistency import Quiesce, snapshot_in_window
from vmvault.connectors.contract import (
    BackupPort,
    BackupRequest,
    Capabilities,
    CopyDisk,
    JsonDict,
    LeftoverVm,
    LiveCopy,
    NewVm,
    NewVmRequest,
    Note,
    OpenPoint,
    WrittenDisk,
    no_channel,
)
from vmvault.connectors.diskimage.connector import DiskImageConnector
from vmvault.connectors.qemu import restore as restoring
from vmvault.connectors.qemu.qmp import QemuNotRunning, QmpClient
from vmvault.connectors.qemu.quiesce import quiesced
from vmvault.connectors.qemu.snapshot import (
    FLEECE_LOW_WATER,
    BasePoint,
    FleeceSpaceError,
    Names,
    SnapshotSession,
    Tracking,
)
from vmvault.connectors.qemu.vm import KIND_QMP, QemuVm, inspect_vm, manifest_definition, qmp_disk_record
from vmvault.connectors.workfiles import TEST_HOLD_FROZEN, TEST_HOLD_SNAPSHOT, run_dir, tag, test_hold
from vmvault.engine.backup import ExportedDisk
from vmvault.errors import Cancelled

log = logging.getLogger("vmvault")



class QemuConnector:
    kind = KIND_QMP

    def capabilities(self) -> Capabilities:
        return Capabilities(self.kind, changed_blocks="bitmaps", backup_api="fleecing", quiesce=True, live_restore=True)

    def discover(self, where: str | None = None) -> list[JsonDict]:
        return []  # a plain QEMU is named by its QMP socket at `vm add --qmp`

    @contextlib.contextmanager
    def open_point(self, request: BackupRequest, port: BackupPort) -> Iterator[OpenPoint]:
        try:
            qmp = QmpClient(request.definition["qmp"]).connect()
        except QemuNotRunning:
            log.info("VM %s: QEMU is not running, reading its images offline", request.vm_name)
            offline = replace(request, definition=manifest_definition(request.definition))
            with DiskImageConnector().open_point(offline, port) as point:
                yield point
            return
        with qmp:
            name = tag(request.vm_id)
            fleece = Path(request.home) / "fleece" / name
            session = SnapshotSession(qmp, [], Names(name), run_dir(request.home, request.vm_id), fleece)
            session.clear_leftovers()
            vm = inspect_vm(qmp)
            with _LivePoint(request, port, vm, session).open() as point:
                yield point


    # ---- restore as a new VM, replace disks (connectors/contract.py) ----------------------------------
    def refuse_new_vm(self, request: NewVmRequest) -> None:
        restoring.refuse_new_vm(request, request.source_definition.get("kind"))

    def in_the_way(self, request: NewVmRequest) -> list[str]:
        return restoring.in_the_way(request)

    def check_point(self, request: NewVmRequest, definition: JsonDict) -> None:
        restoring.check_point(request, definition)

    def create_new_vm(
        self, request: NewVmRequest, definition: JsonDict, in_point: list[str], disks: list[WrittenDisk],
        *, instant: bool = False,
    ) -> NewVm:  # fmt: skip
        return restoring.create_new_vm(request, definition, disks, instant_copy=instant)

    def share_with_vm(self, path: str, mode: int) -> None:
        pass  # vmvault starts the copy's QEMU itself, as its own user

    def start_new_vm(self, vm: NewVm) -> None:
        restoring.start_vm(vm.handle["template"], Path(vm.handle["script"]), Path(vm.handle["log"]))

    def remove_new_vm(self, vm: NewVm) -> None:
        pass  # nothing runs and nothing is defined outside its files (removed by the service)

    def disks_template(
        self, target_dir: str, definition: JsonDict, source_vm: str, rp_id: str, in_point: list[str],
        written: list[WrittenDisk], *, force: bool = False,
    ) -> str | None:  # fmt: skip
        out = restoring.disks_template(Path(target_dir), definition, source_vm, rp_id, in_point, written, force)
        return str(out) if out is not None else None

    def overlay(self, definition: JsonDict, name: str, size: int, path: str, export_socket: str) -> CopyDisk:
        from vmvault.connectors.qemu.live_copy import overlay

        return overlay(definition, name, size, path, export_socket)

    def live_copy(self, vm: NewVm) -> LiveCopy:
        from vmvault.connectors.qemu.live_copy import QemuLiveCopy

        return QemuLiveCopy(vm)

    def template_name(self, source_vm: str) -> str | None:
        return restoring.template_file(Path("."), source_vm).name

    def refuse_running(self, vm_name: str, definition: JsonDict) -> None:
        restoring.refuse_running(vm_name, definition)

    def disks_replaced(self, vm_id: str, definition: JsonDict) -> None:
        pass  # the tracking state goes with the catalog's definition; the images' vmv-* bitmaps are dropped

    # ---- inventory: vm add, vm list, item show, doctor, service start (connectors/contract.py) ---------
    def describe(self, where: JsonDict, known: list[JsonDict]) -> tuple[list[JsonDict], JsonDict]:
        from vmvault.connectors.qemu import inventory

        return inventory.describe(where)

    def status(self, definitions: list[JsonDict]) -> list[JsonDict]:
        from vmvault.connectors.qemu import inventory

        return [inventory.status(d) for d in definitions]

    def agent_status(self, definition: JsonDict, *, live: bool) -> tuple[JsonDict, JsonDict | None]:
        from vmvault.connectors.qemu import inventory

        return inventory.agent_status(definition, live=live)

    def agent_advice(self, vm_name: str, definition: JsonDict) -> JsonDict | None:
        return None  # item show reports the agent's state from the last backup (agent_status)

    def enable_agent(self, vm_name: str, definition: JsonDict) -> JsonDict:
        raise no_channel(vm_name)

    def reconcile(self, home: str, vms: list[LeftoverVm]) -> list[str]:
        return []  # each backup reconciles its own leftovers first (SnapshotSession.clear_leftovers)

    def doctor_host(self, home: str | None, disks: list[JsonDict], needed: bool) -> list[JsonDict]:
        from vmvault.connectors.qemu import inventory

        return inventory.fleece_space(Path(home), disks) if home is not None else []

    def doctor_vm(self, vm_name: str, definition: JsonDict, disks: list[JsonDict]) -> list[JsonDict]:
        from vmvault.connectors.qemu import inventory

        return inventory.doctor_vm(vm_name, definition)


class _LivePoint:
    def __init__(self, request: BackupRequest, port: BackupPort, vm: QemuVm, session: SnapshotSession) -> None:
        self.request, self.port, self.vm, self.session = request, port, vm, session

    @contextlib.contextmanager
    def open(self) -> Iterator[OpenPoint]:
        request, session = self.request, self.session
        session.disks = self._disks()
        tracking = Tracking.from_dict(request.definition.get("tracking"))
        previous = request.previous
        base = BasePoint(previous.rp_id, previous.time) if previous is not None else None
        session.reconcile_bitmaps(tracking)
        session.check_fleece_space()
        ok, point, quiesce = False, None, None
        try:
            for p in session.prepare(tracking, base, self.vm.identity):
                if p.reason:
                    message = f"disk {p.disk.name}: changed-block tracking not used ({p.reason}); reading all "
                    message += "data and comparing hashes with the latest point (only changed chunks are stored); "
                    message += "a new chain starts"
                    self.port.warn(Note("cbt_fallback", message, "none: the next backup uses the new bitmap"))
            quiesce = self._snapshot()
            rp_id, point_time = self.port.new_point()  # the instant just taken
            point = BasePoint(rp_id, point_time)
            exported = [
                ExportedDisk(d.name, d.uri, d.size, d.format, d.path, changed_extents=d.changed_extents)
                for d in session.export()
            ]
            definition = {**manifest_definition(request.definition), **self.vm.definition}
            with _SpaceWatch(session, self.port.cancel) as watch:
                try:
                    yield OpenPoint(rp_id, point_time, quiesce.consistency, definition, exported, watch.cancel)
                except Cancelled as exc:
                    if watch.low:
                        raise FleeceSpaceError(
                            f"the backup was stopped: free space for fleece overlays in {session.fleece_dir} fell "
                            "below 64 MiB (the guest's writes would have failed); no recovery point was created",
                            hint="free space on that file system, or move vmvault's home",
                        ) from exc
                    raise
            ok = True
        finally:
            new_tracking = self._finish(ok, tracking, point)
            self._save(new_tracking, quiesce, ok)
            with contextlib.suppress(OSError):
                session.run_dir.rmdir()
        for note in session.notes:
            self.port.warn(Note("leftovers_reconciled", note))

    def _disks(self) -> list[Any]:
        """The disks QEMU has now, less the ones the protection excludes (request.disks is what remains)."""
        known = {str(d.get("name")) for d in self.request.definition.get("disks") or []}
        wanted = {d["name"] for d in self.request.disks}
        return [d for d in self.vm.disks if d.name in wanted or d.name not in known]

    def _snapshot(self) -> Quiesce:
        """Quiesce and take the instant; one that outlasted the frozen window is undone and retried once."""
        agent = self.request.definition.get("guestAgent")
        guest = self.vm.status != "storage-daemon"
        running, budget = self.vm.running, self.request.budget

        def take() -> None:
            self.session.snapshot()
            test_hold(TEST_HOLD_FROZEN)

        def attempt() -> contextlib.AbstractContextManager[Quiesce]:
            return quiesced(agent, running=running, guest=guest, budget=budget)

        quiesce, snapshot_s = snapshot_in_window(attempt, take, self.session.undo_snapshot)
        self.port.quiesced(quiesce, snapshot_s)
        for note in quiesce.notes:
            self.port.warn(note)
        test_hold(TEST_HOLD_SNAPSHOT)
        return quiesce

    def _finish(self, ok: bool, tracking: Tracking | None, point: BasePoint | None) -> Tracking | None:
        try:
            return self.session.finish(ok, tracking, point, self.vm.identity)
        except Exception:
            if ok:
                raise
            log.warning("tearing the snapshot of %s down failed", self.request.vm_name, exc_info=True)
            return None  # the next backup reconciles the leftovers and starts a new chain

    def _save(self, tracking: Tracking | None, quiesce: Quiesce | None, ok: bool) -> None:
        """Keep the tracking state, the definition and the agent's state (a failure's reason stays the error)."""
        updates: JsonDict = {**self.vm.definition, "tracking": tracking.to_dict() if tracking else None}
        if quiesce is not None:
            probe = quiesce.probe.to_dict() if quiesce.probe else {}
            updates["agent"] = {"state": quiesce.agent_state, "checked": now_iso(), **probe}
        disks = [qmp_disk_record(d) for d in self.vm.disks]  # as QEMU runs them now (its admin's choice)
        try:
            self.port.save_vm(updates, disks)
        except Exception:
            if ok:
                raise
            log.warning("could not record the tracking state of %s", self.request.vm_name, exc_info=True)


class _SpaceWatch:
    """Stops the read (through `cancel`) when the job is cancelled or the fleece file system runs low."""

    def __init__(self, session: SnapshotSession, outer: threading.Event) -> None:
        self.session, self.low_water = session, FLEECE_LOW_WATER
        self.cancel = _EitherEvent(outer)
        self.low = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vmvault-fleece-watch", daemon=True)

    def __enter__(self) -> _SpaceWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            if self.session.fleece_free() < self.low_water:
                self.low = True
                self.cancel.set()


class _EitherEvent(threading.Event):
    """Set when itself or `outer` (the job's cancel flag, with its `reason`) is set."""

    def __init__(self, outer: threading.Event) -> None:
        super().__init__()
        self.outer = outer

    def is_set(self) -> bool:
        return super().is_set() or self.outer.is_set()

    @property
    def reason(self) -> str:
        return str(getattr(self.outer, "reason", "") or "")

"""Running QEMU VMs driven over QMP: add them, back them up live, report their guest agent.

A backup of a running VM (docs/running-vms.md):
  reconcile leftovers -> check fleece space -> plan (which bitmaps to trust) -> pre-script ->
  freeze -> ONE QMP transaction -> thaw -> post-script -> NBD export -> engine reads changed blocks
  (or everything + hash comparison when tracking cannot be trusted) -> tear down -> settle bitmaps.
A VM whose QEMU is not running is read offline (its images, holding QEMU's lock): CrashConsistent.

What vmvault keeps about such a VM lives in the catalog's existing JSON columns: `vms.definition`
holds the sockets, the last seen definition, the changed-block tracking state ("tracking") and the
last agent probe ("agent"); neither of the last two goes into recovery points.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import VmRow
from vmvault.errors import Cancelled, InvalidInput, VmvaultError
from vmvault.service.context import Context
from vmvault.service.validate import absolute, check_name
from vmvault.service.views import JsonDict

log = logging.getLogger("vmvault")

KIND_QMP = "qmp"
_INTERNAL = ("tracking", "agent")  # kept in the catalog, never in a recovery point
_TEST_HOLD_FROZEN = "VMVAULT_TEST_HOLD_FROZEN"  # test-only: seconds to hold the guest frozen after the snapshot
_TEST_HOLD_SNAPSHOT = "VMVAULT_TEST_HOLD_SNAPSHOT"  # test-only: seconds to wait after the thaw, before reading


# ---- vm add --qmp ----------------------------------------------------------------------------------


def add_qmp_vm(ctx: Context, name: str, qmp_socket: str | Path, agent_socket: str | Path | None = None) -> JsonDict:
    """Add a running QEMU VM: its disks and definition come from QMP (the VM must be running)."""
    from vmvault.connectors.qemu.qmp import QmpClient
    from vmvault.connectors.qemu.vm import inspect_vm
    from vmvault.service.vms import _refuse_taken, _refuse_taken_in, _view

    check_name("VM", name)
    qmp_path = absolute(qmp_socket)
    agent_path = absolute(agent_socket) if agent_socket else None
    if agent_path is not None and agent_path == qmp_path:
        raise InvalidInput("the QMP socket and the guest agent socket are the same file", hint="give each its socket")
    _refuse_taken(ctx, name)
    with QmpClient(qmp_path).connect() as qmp:
        vm = inspect_vm(qmp)
    if not vm.disks:
        raise InvalidInput(f"the QEMU behind {qmp_path} has no writable disk to back up")
    definition: JsonDict = {
        "kind": KIND_QMP,
        "qmp": str(qmp_path),
        "guestAgent": str(agent_path) if agent_path else None,
        **vm.definition,
        "agent": _probe_now(str(agent_path) if agent_path else None, vm.running),
    }
    row = VmRow(
        id=str(uuid.uuid4()),
        name=name,
        kind=KIND_QMP,
        disks=[qmp_disk_record(d) for d in vm.disks],
        definition=definition,
        created=now_iso(),
    )
    with ctx.catalog.write() as s:
        _refuse_taken_in(s, name)
        repos.add_vm(s, row)
        return _view(s, row)


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


# ---- the guest agent's state (for `item show`) ---------------------------------------------------------


def agent_status(ctx: Context, vm_name: str, *, live: bool = False) -> JsonDict:
    """The VM's guest agent as Azure reports its VM extension: state, version, what it allows, and the fix.

    Without live, the state found by the last backup (or `vm add`); with live, probed now.
    """
    from vmvault.engine.consistency import INSTALL_AGENT_HINT

    with ctx.catalog.read() as s:
        row = repos.get_vm(s, vm_name)
        definition = dict(row.definition or {})
    if definition.get("kind") != KIND_QMP:
        return {"state": "NotApplicable", "message": "the VM is backed up from its disk images (offline)",
                "recommendedAction": None}  # fmt: skip
    socket = definition.get("guestAgent")
    probe = dict(definition.get("agent") or {})
    if live:
        probe = _probe_now(socket, running=True)
        _save_definition(ctx, row.id, {"agent": probe})
    state = str(probe.get("state") or ("NotConfigured" if not socket else "Unknown"))
    fixes = {
        "NotConfigured": INSTALL_AGENT_HINT,
        "NotReachable": "start qemu-guest-agent in the guest and check the VM's org.qemu.guest_agent.0 port "
        f"on {socket}",
        "Limited": "allow guest-exec and guest-fsfreeze-* in the agent's configuration (its --block-rpcs / "
        "--allow-rpcs options)",
        "Unknown": f"run a backup, or check now with agent_status(live=True), to probe the agent on {socket}",
    }
    return {
        "state": state,
        "socket": socket,
        "version": probe.get("version"),
        "os": probe.get("os"),
        "guestExec": probe.get("guestExec"),
        "fsFreeze": probe.get("fsFreeze"),
        "lastChecked": probe.get("checked"),
        "recommendedAction": fixes.get(state),
    }


def _probe_now(socket: str | None, running: bool) -> JsonDict:
    from vmvault.connectors.guest_agent import GuestAgent
    from vmvault.engine.consistency import probe_agent
    from vmvault.errors import HypervisorError

    if not socket:
        return {"state": "NotConfigured", "checked": now_iso()}
    if not running:
        return {"state": "Unknown", "checked": now_iso()}
    try:
        with GuestAgent(socket).connect() as agent:
            probe = probe_agent(agent)
    except HypervisorError:
        return {"state": "NotReachable", "checked": now_iso()}
    state = "Ready" if probe.exec_allowed and probe.freeze_allowed else "Limited"
    return {"state": state, "checked": now_iso(), **probe.to_dict()}


# ---- backups -------------------------------------------------------------------------------------------


def run_qmp_backup(ctx: Context, plan: Any, job_id: str, run: Any) -> Any:
    """Back up a running QMP VM; returns the manifest, or None when its QEMU is not running."""
    from vmvault.connectors.qemu.qmp import QemuNotRunning, QmpClient
    from vmvault.connectors.qemu.snapshot import Names, SnapshotSession
    from vmvault.connectors.qemu.vm import inspect_vm

    try:
        qmp = QmpClient(plan.definition["qmp"]).connect()
    except QemuNotRunning:
        log.info("VM %s: QEMU is not running, reading its images offline", plan.vm_name)
        return None
    with qmp:
        tag = _tag(plan.vm_id)
        session = SnapshotSession(qmp, [], Names(tag), _run_dir(ctx, plan.vm_id), ctx.settings.home / "fleece" / tag)
        session.clear_leftovers()
        vm = inspect_vm(qmp)
        return _LiveBackup(ctx, plan, job_id, run, vm, session).run()


def stopped_vm_plan(plan: Any) -> Any:
    """The plan for reading a stopped QMP VM's images offline (definition without internal state)."""
    return replace(plan, definition=manifest_definition(plan.definition))


def manifest_definition(definition: JsonDict) -> JsonDict:
    return {k: v for k, v in definition.items() if k not in _INTERNAL}


class _LiveBackup:
    def __init__(self, ctx: Context, plan: Any, job_id: str, run: Any, vm: Any, session: Any) -> None:
        self.ctx, self.plan, self.job_id, self.job_run, self.vm = ctx, plan, job_id, run, vm
        self.session = session
        self.warnings: list[Any] = []

    def run(self) -> Any:
        from vmvault.connectors.qemu.snapshot import BasePoint, Tracking
        from vmvault.engine.consistency import Note
        from vmvault.service.backups import _cancel_reason, _next_point_time, _previous_manifest, new_rp_id
        from vmvault.service.vaultio import opened_vault

        plan, session = self.plan, self.session
        session.disks = self._disks()
        tracking = Tracking.from_dict(plan.definition.get("tracking"))
        with opened_vault(self.ctx, plan.vault) as vault, _cancel_reason(self.job_run, plan.vm_name):
            previous = _previous_manifest(self.ctx, vault, plan)
            base = BasePoint(previous.rp_id, previous.time) if previous is not None else None
            session.reconcile_bitmaps(tracking)
            session.check_fleece_space()
            manifest, point, quiesce = None, None, None
            try:
                for p in session.prepare(tracking, base, self.vm.identity):
                    if p.reason:
                        message = f"disk {p.disk.name}: changed-block tracking not used ({p.reason}); reading all "
                        message += "data and comparing hashes"
                        self.warnings.append(Note("cbt_fallback", message, "none: the next backup uses the new bitmap"))
                quiesce = self._snapshot()
                point = BasePoint(new_rp_id(), _next_point_time(self.ctx, plan.vm_id))  # the instant just taken
                manifest = self._read(vault, previous, point.rp_id, point.time, quiesce.consistency)
            finally:
                ok = manifest is not None
                new_tracking = self._finish(ok, tracking, point)
                self._save(new_tracking, quiesce, ok)
                with contextlib.suppress(OSError):
                    session.run_dir.rmdir()
        for note in session.notes:
            self.warnings.append(Note("leftovers_reconciled", note))
        self._report()
        return manifest

    def _disks(self) -> list[Any]:
        """The disks QEMU has now, less the ones the protection excludes (plan.disks is what remains)."""
        known = {str(d.get("name")) for d in self.plan.definition.get("disks") or []}
        wanted = {d["name"] for d in self.plan.disks}
        return [d for d in self.vm.disks if d.name in wanted or d.name not in known]

    def _snapshot(self) -> Any:
        from vmvault.engine.consistency import quiesced
        from vmvault.service.quiesce import budget_for, record

        agent = self.plan.definition.get("guestAgent")
        guest = self.vm.status != "storage-daemon"
        budget = budget_for(self.ctx, self.plan)
        with quiesced(agent, running=self.vm.running, guest=guest, budget=budget) as quiesce:
            started = time.monotonic()
            self.session.snapshot()
            snapshot_s = time.monotonic() - started
            _test_hold(_TEST_HOLD_FROZEN)
        record(self.job_run, quiesce, snapshot_s)
        self.warnings.extend(quiesce.notes)
        _test_hold(_TEST_HOLD_SNAPSHOT)
        return quiesce

    def _read(self, vault: Any, previous: Any, rp_id: str, point_time: str, consistency: str) -> Any:
        from vmvault.connectors.qemu.snapshot import FleeceSpaceError
        from vmvault.engine.backup import ExportedDisk, PointSpec, backup_exported
        from vmvault.engine.consistency import Note

        exported = [
            ExportedDisk(d.name, d.uri, d.size, d.format, d.path, changed_extents=d.changed_extents)
            for d in self.session.export()
        ]
        with _SpaceWatch(self.session, self.job_run.cancel) as watch:
            try:
                manifest, stats = backup_exported(
                    vault,
                    PointSpec(
                        vm_name=self.plan.vm_name,
                        vm_id=self.plan.vm_id,
                        rp_id=rp_id,
                        time=point_time,
                        retain_until=self.plan.retain_until,
                        consistency=consistency,
                        vm_definition={**manifest_definition(self.plan.definition), **self.vm.definition},
                        job_id=self.job_id,
                    ),
                    exported,
                    previous,
                    on_progress=self.job_run.progress,
                    cancel=watch.cancel,
                )
            except Cancelled as exc:
                if watch.low:
                    raise FleeceSpaceError(
                        f"the backup was stopped: free space for fleece overlays in {self.session.fleece_dir} fell "
                        "below 64 MiB (the guest's writes would have failed); no recovery point was created",
                        hint="free space on that file system, or move vmvault's home",
                    ) from exc
                raise
        for disk in stats:
            for warning in disk.warnings:
                self.warnings.append(Note("cbt_fallback", warning, "nothing to do: the next backup uses the bitmap"))
        return manifest

    def _finish(self, ok: bool, tracking: Any, point: Any) -> Any:
        try:
            return self.session.finish(ok, tracking, point, self.vm.identity)
        except Exception:
            if ok:
                raise
            log.warning("tearing the snapshot of %s down failed", self.plan.vm_name, exc_info=True)
            return None  # the next backup reconciles the leftovers and starts a new chain

    def _save(self, tracking: Any, quiesce: Any, ok: bool) -> None:
        """Keep the tracking state, the definition and the agent's state (a failure's reason stays the error)."""
        updates: JsonDict = {**self.vm.definition, "tracking": tracking.to_dict() if tracking else None}
        if quiesce is not None:
            probe = quiesce.probe.to_dict() if quiesce.probe else {}
            updates["agent"] = {"state": quiesce.agent_state, "checked": now_iso(), **probe}
        disks = [qmp_disk_record(d) for d in self.vm.disks]  # as QEMU runs them now (its admin's choice)
        try:
            _save_definition(self.ctx, self.plan.vm_id, updates, disks)
        except Exception:
            if ok:
                raise
            log.warning("could not record the tracking state of %s", self.plan.vm_name, exc_info=True)

    def _report(self) -> None:
        for note in self.warnings:
            log.warning("%s", note.message)
            self.job_run.warnings.append(note.to_dict())


class _SpaceWatch:
    """Stops the read (through `cancel`) when the job is cancelled or the fleece file system runs low."""

    def __init__(self, session: Any, outer: threading.Event) -> None:
        from vmvault.connectors.qemu.snapshot import FLEECE_LOW_WATER

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


# ---- helpers ----------------------------------------------------------------------------------------------


def _tag(vm_id: str) -> str:
    return vm_id.replace("-", "")[:8]


def _run_dir(ctx: Context, vm_id: str) -> Path:
    """A short directory for unix sockets (108-byte limit), private to this home and VM."""
    key = hashlib.sha256(f"{ctx.settings.home}\0{vm_id}".encode()).hexdigest()[:12]
    base = (
        Path("/run/vmvault") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir()) / f"vmvault-{os.getuid()}"
    )
    return base / key  # created by the export, removed again when the backup ends


def _save_definition(ctx: Context, vm_id: str, updates: JsonDict, disks: list[JsonDict] | None = None) -> None:
    with ctx.catalog.write() as s:
        row = repos.find_vm_by_id(s, vm_id)
        if row is None:
            return
        row.definition = {**(row.definition or {}), **updates}  # a new dict: the JSON column sees the change
        if disks is not None:  # a disk still at the same path and format keeps the chain recorded for it
            kept = {(d.get("name"), d.get("path"), d.get("format")): d for d in row.disks or []}
            row.disks = [kept.get((d["name"], d["path"], d["format"]), d) for d in disks]


def _test_hold(variable: str) -> None:
    # Test-only hooks (docs/running-vms.md): let a test act at an exact moment of a live backup.
    seconds = float(os.environ.get(variable) or 0)
    if seconds > 0:
        print(f"vmvault-test: {variable}: holding {seconds:g} s", file=sys.stderr, flush=True)
        time.sleep(seconds)

"""The libvirt connector: domains, checkpoints and the backup API (docs/libvirt.md).

A point of a running domain:
  abort a leftover job -> pre-script (agent through libvirt) -> backupBegin (pull, scratch per disk,
  a new checkpoint, QUIESCE when the agent allows freezing) -> post-script -> [the engine reads the
  NBD exports: changed extents from `qemu:dirty-bitmap:backup-<disk>` for an incremental] -> abortJob.
A stopped domain's images are read offline holding their lock: CrashConsistent. Stale checkpoints
(after `virsh destroy` or a host crash) are dropped (metadata only) and a new chain starts.
Every point's manifest holds the domain XML and the point's checkpoint (`vm_definition`), the
bookkeeping the next backup reads back from the previous point.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmvault.connectors.consistency import INSTALL_AGENT_HINT, Guest, Quiesce, quiesced, snapshot_in_window
from vmvault.connectors.contract import (
    CRASH_CONSISTENT,
    NOT_APPLICABLE,
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
)
from vmvault.connectors.diskimage.connector import DiskSource, exported_images
from vmvault.connectors.libvirt import domain as lv
from vmvault.connectors.libvirt.domain import KIND_LIBVIRT, definition_of
from vmvault.connectors.workfiles import TEST_HOLD_SNAPSHOT, run_dir, tag, test_hold
from vmvault.engine.backup import ExportedDisk
from vmvault.errors import InvalidInput

log = logging.getLogger("vmvault")

AGENT_CHANNEL_NAME = "org.qemu.guest_agent.0"
READ_HINT = "nothing to do: the next backup uses the checkpoint"


class LibvirtConnector:
    kind = KIND_LIBVIRT

    def capabilities(self) -> Capabilities:
        return Capabilities(self.kind, changed_blocks="checkpoints", backup_api="libvirt-pull", quiesce=True,
                            live_restore=True, shared_target=True)  # fmt: skip

    def discover(self, where: str | None = None) -> list[JsonDict]:
        """The domains at `where` (a libvirt URI), as `vm discover` lists them."""
        uri = where or lv.DEFAULT_URI
        conn = lv.connect(uri)
        try:
            found = [lv.inspect(d) for d in conn.listAllDomains(0)]
        finally:
            conn.close()
        return [{**d.to_dict(), "connect": uri} for d in sorted(found, key=lambda d: d.name)]

    @contextlib.contextmanager
    def open_point(self, request: BackupRequest, port: BackupPort) -> Iterator[OpenPoint]:
        conn = lv.connect(str(request.definition.get("connect") or lv.DEFAULT_URI))
        try:
            dom = lv.lookup(conn, str(request.definition["domain"]), request.definition.get("uuid"))
            info = lv.inspect(dom)
            wanted = {d["name"] for d in request.disks}
            disks = [d for d in info.disks if d.name in wanted]
            if not disks:
                raise InvalidInput(f"domain '{info.name}' no longer has disk(s) {', '.join(sorted(wanted))}")
            point = _Point(request, port, dom, info, disks)
            with point.live() if dom.isActive() else point.offline() as opened:
                yield opened
        finally:
            conn.close()


    # ---- restore as a new VM, replace disks (connectors/contract.py) ----------------------------------
    def refuse_new_vm(self, request: NewVmRequest) -> None:
        from vmvault.connectors.libvirt import restore as restoring

        restoring.refuse_new_vm(request)

    def in_the_way(self, request: NewVmRequest) -> list[str]:
        from vmvault.connectors.libvirt import restore as restoring

        return restoring.in_the_way(request)

    def check_point(self, request: NewVmRequest, definition: JsonDict) -> None:
        from vmvault.connectors.libvirt import restore as restoring

        restoring.check_point(request, definition)

    def create_new_vm(
        self, request: NewVmRequest, definition: JsonDict, in_point: list[str], disks: list[WrittenDisk],
        *, instant: bool = False,
    ) -> NewVm:  # fmt: skip
        from vmvault.connectors.libvirt import restore as restoring

        return restoring.create_new_vm(request, definition, in_point, disks, instant=instant)

    def share_with_vm(self, path: str, mode: int) -> None:
        from vmvault.connectors.libvirt.qemu_user import open_to_qemu

        open_to_qemu(Path(path), mode)  # QEMU runs as libvirt-qemu (connectors/libvirt/qemu_user.py)

    def start_new_vm(self, vm: NewVm) -> None:
        from vmvault.connectors.libvirt import restore as restoring

        with restoring.domain_of(vm) as dom:
            restoring.start_domain(dom)

    def remove_new_vm(self, vm: NewVm) -> None:
        from vmvault.connectors.libvirt import restore as restoring

        with restoring.domain_of(vm) as dom:
            restoring.undefine(dom)

    def disks_template(
        self, target_dir: str, definition: JsonDict, source_vm: str, rp_id: str, in_point: list[str],
        written: list[WrittenDisk], *, force: bool = False,
    ) -> str | None:  # fmt: skip
        from vmvault.connectors.libvirt import restore as restoring

        out = restoring.disks_template(Path(target_dir), definition, source_vm, rp_id, in_point, written, force)
        return str(out) if out is not None else None

    def overlay(self, definition: JsonDict, name: str, size: int, path: str, export_socket: str) -> CopyDisk:
        from vmvault.connectors.libvirt.live_copy import overlay

        return overlay(definition, name, size, path, export_socket)

    def live_copy(self, vm: NewVm) -> LiveCopy:
        from vmvault.connectors.libvirt.live_copy import LibvirtLiveCopy

        return LibvirtLiveCopy(vm)

    def template_name(self, source_vm: str) -> str | None:
        from vmvault.connectors.libvirt import restore as restoring

        return restoring.template_name(source_vm)

    def refuse_running(self, vm_name: str, definition: JsonDict) -> None:
        from vmvault.connectors.libvirt import restore as restoring

        restoring.refuse_running(vm_name, definition)

    def disks_replaced(self, vm_id: str, definition: JsonDict) -> None:
        from vmvault.connectors.libvirt import restore as restoring

        restoring.reset_checkpoints(vm_id, definition)  # its checkpoints' bitmaps went with the old images

    # ---- inventory: vm add, vm list, item show, doctor, service start (connectors/contract.py) ---------
    def describe(self, where: JsonDict, known: list[JsonDict]) -> tuple[list[JsonDict], JsonDict]:
        from vmvault.connectors.libvirt import inventory

        return inventory.describe(where, known)

    def status(self, definitions: list[JsonDict]) -> list[JsonDict]:
        from vmvault.connectors.libvirt import inventory

        return inventory.statuses(definitions)

    def agent_status(self, definition: JsonDict, *, live: bool) -> tuple[JsonDict, JsonDict | None]:
        return NOT_APPLICABLE, None  # item show asks agent_advice instead

    def agent_advice(self, vm_name: str, definition: JsonDict) -> JsonDict | None:
        from vmvault.connectors.libvirt import inventory

        return inventory.agent_advice(vm_name, definition)

    def enable_agent(self, vm_name: str, definition: JsonDict) -> JsonDict:
        from vmvault.connectors.libvirt import inventory

        return inventory.enable_agent(vm_name, definition)

    def reconcile(self, home: str, vms: list[LeftoverVm]) -> list[str]:
        from vmvault.connectors.libvirt import inventory

        return inventory.reconcile(home, vms)

    def doctor_host(self, home: str | None, disks: list[JsonDict], needed: bool) -> list[JsonDict]:
        from vmvault.connectors.libvirt import inventory

        return inventory.doctor_host(needed)

    def doctor_vm(self, vm_name: str, definition: JsonDict, disks: list[JsonDict]) -> list[JsonDict]:
        from vmvault.connectors.libvirt import inventory

        return inventory.doctor_vm(vm_name, definition)


class _Point:
    def __init__(self, request: BackupRequest, port: BackupPort, dom: Any, info: Any, disks: list[Any]) -> None:
        self.request, self.port = request, port
        self.dom, self.info, self.disks = dom, info, disks
        self.tag = tag(request.vm_id)
        self.scratch = Path(request.home) / "scratch" / self.tag

    def note(self, code: str, message: str, hint: str | None = None) -> None:
        self.port.warn(Note(code, message, hint))

    def definition(self, checkpoint: str | None) -> JsonDict:
        return {**definition_of(str(self.request.definition.get("connect")), self.info), "checkpoint": checkpoint}

    def _raw_disks(self) -> list[str]:
        return [d.name for d in self.disks if d.format != "qcow2"]

    def _previous_checkpoint(self) -> Any:
        previous = self.request.previous
        return previous.definition.get("checkpoint") if previous is not None else None

    # ---- a running domain ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def live(self) -> Iterator[OpenPoint]:
        if lv.abort_leftover_job(self.dom, self.scratch):
            self.note("leftovers_reconciled", f"a backup job left on domain {self.info.name} was aborted")
        leftover = sorted(self.scratch.glob("scratch-*.qcow2"))
        for path in leftover:  # a killed vmvault's scratch files (its job is aborted above)
            path.unlink(missing_ok=True)
        if leftover:
            self.note("leftovers_reconciled", f"removed scratch files of a killed backup: {len(leftover)}")
        raw = self._raw_disks()
        incremental: str | None = None
        if raw:
            self.note("cbt_unavailable", f"disk(s) {', '.join(raw)} are raw and cannot carry checkpoints: "
                      "reading all data and comparing hashes", "convert the disks to qcow2")  # fmt: skip
        else:
            incremental = self._trusted_checkpoint()
        with self._pull(incremental, checkpoint=None if raw else self._new_name()) as point:
            yield point

    def _new_name(self) -> str:
        return f"{lv.CHECKPOINT_PREFIX}{self.tag}-{secrets.token_hex(4)}"

    def _trusted_checkpoint(self) -> str | None:
        name = self._previous_checkpoint()
        if not name:
            return None
        if lv.has_checkpoint(self.dom, str(name)):
            return str(name)
        self._fall_back(f"checkpoint {name} of the latest point is not on this host: deleted, or the domain was "
                        "live-migrated from another host, where it stays", stale=False)  # fmt: skip
        return None

    def _fall_back(self, why: str, *, stale: bool = True) -> None:
        dropped = lv.drop_checkpoints(self.dom, f"{lv.CHECKPOINT_PREFIX}{self.tag}-", metadata_only=stale)
        message = (f"changed-block tracking not used ({why}); reading all data and comparing hashes with the latest "
                   "point (only changed chunks are stored); a new chain starts")  # fmt: skip
        if dropped:
            what = "stale checkpoint metadata" if stale else "checkpoints"
            message += f" (dropped {what}: {', '.join(dropped)})"
        self.note("cbt_fallback", message, "none: the next backup uses the new checkpoint")

    @contextlib.contextmanager
    def _pull(self, incremental: str | None, checkpoint: str | None) -> Iterator[OpenPoint]:
        work = self.scratch
        pull = lv.PullBackup(self.dom, self.disks, work, run_dir(self.request.home, self.request.vm_id) / "backup.sock")
        cp_xml = lv.PullBackup.checkpoint_xml(checkpoint, self.disks, self.info.disks) if checkpoint else None
        ok = False

        def take() -> None:
            nonlocal incremental
            try:
                pull.begin(incremental, cp_xml)
            except lv.LibvirtError as exc:
                if not incremental:
                    raise
                self._fall_back(f"libvirt refused an incremental from checkpoint {incremental}: {exc.message}")
                incremental = None
                pull.begin(incremental, cp_xml)

        def undo() -> None:  # the attempt outlasted the frozen window: its job and checkpoint go before the retry
            pull.abort()
            if checkpoint and lv.has_checkpoint(self.dom, checkpoint):
                lv.delete_checkpoint(self.dom, checkpoint)  # its bitmap is merged back into its parent's

        try:
            q, snapshot_s = snapshot_in_window(lambda: _quiesced(self), take, undo)
            for note in q.notes:  # after the retry: an undone attempt's notes are not doubled
                self.port.warn(note)
            self.port.quiesced(q, snapshot_s)
            test_hold(TEST_HOLD_SNAPSHOT)  # test-only hook (docs/running-vms.md): after the instant, before reading
            exported = [
                ExportedDisk(d.name, d.uri, d.size, d.format, d.path, changed_extents=d.changed_extents)
                for d in pull.export(incremental is not None)
            ]
            rp_id, point_time = self.port.new_point()
            definition = self.definition(checkpoint)
            yield OpenPoint(rp_id, point_time, q.consistency, definition, exported, self.port.cancel, READ_HINT)
            ok = True
        finally:
            pull.abort()
            with contextlib.suppress(OSError):
                pull.socket.parent.rmdir()
            with contextlib.suppress(OSError):
                work.rmdir()
            if not ok and checkpoint and lv.has_checkpoint(self.dom, checkpoint):
                try:
                    lv.delete_checkpoint(self.dom, checkpoint)  # a failed run's checkpoint: merged into its parent
                except lv.LibvirtError:
                    log.warning("could not delete checkpoint %s of %s", checkpoint, self.info.name, exc_info=True)
        if checkpoint:  # the older checkpoints are no longer needed: merge them away
            for name in lv.checkpoint_names(self.dom):
                if name.startswith(f"{lv.CHECKPOINT_PREFIX}{self.tag}-") and name != checkpoint:
                    with contextlib.suppress(lv.LibvirtError):
                        lv.delete_checkpoint(self.dom, name)

    # ---- a stopped domain ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def offline(self) -> Iterator[OpenPoint]:
        carry: str | None = None
        name = self._previous_checkpoint()
        raw = self._raw_disks()
        if raw:
            self.note("cbt_unavailable", f"disk(s) {', '.join(raw)} are raw and cannot carry checkpoints: "
                      "reading all data and comparing hashes", "convert the disks to qcow2")  # fmt: skip
        elif name:
            if not lv.has_checkpoint(self.dom, str(name)):
                self._fall_back(f"checkpoint {name} of the latest point is not on this host: deleted, or the domain "
                                "was live-migrated from another host, where it stays")  # fmt: skip
            elif (why := lv.stale_reason(self.dom, self.disks, str(name))) is not None:
                self._fall_back(why)
            else:
                carry = str(name)  # the domain is off: the bitmap still covers everything since that point
        self.note("vm_stopped", f"domain {self.info.name} is not running: its images were read offline, "
                  "the point is crash-consistent")  # fmt: skip
        rp_id, point_time = self.port.new_point()
        sources = [DiskSource(d.name, Path(d.path), d.format) for d in self.disks]  # the XML's <driver type>
        with exported_images(self.request.vm_name, sources) as exported:
            yield OpenPoint(rp_id, point_time, CRASH_CONSISTENT, self.definition(carry), exported, self.port.cancel,
                            READ_HINT)  # fmt: skip


@contextlib.contextmanager
def _quiesced(p: _Point) -> Iterator[Quiesce]:
    """Pre-script, freeze (within the VM's budget), yield (the caller's backupBegin), thaw, post-script.

    The caller reports q.notes (after snapshot_in_window's retry, so the notes of an undone attempt are not doubled).

    The policy's sequence, budgets and thaw guard (connectors/consistency.py), with the agent reached
    through libvirt (virDomainQemuAgentCommand) and the guard thawing through libvirt too.
    """
    try:
        state = lv.domain_state(p.dom)
        target = f"libvirt:{p.dom.connect().getURI()}#{p.dom.UUIDString()}"
    except Exception as exc:  # libvirt.libvirtError: a named error, not internal_error
        raise lv.LibvirtError(f"cannot ask libvirt about domain {p.info.name}: {exc}") from exc
    dom = p.dom
    missing = f"domain {p.info.name} has no {AGENT_CHANNEL_NAME} channel: the point is crash-consistent"
    guest = Guest(
        (lambda: lv.LibvirtAgent(dom)) if p.info.agent_channel else None,
        target,
        running=state == "running",
        paused=Note("vm_paused", "the domain is paused: the point is crash-consistent"),
        no_agent=Note("agent_not_configured", missing, INSTALL_AGENT_HINT),
    )
    with quiesced(guest, p.request.budget) as q:
        yield q

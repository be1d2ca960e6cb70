"""Instant restore of a libvirt VM: a new domain that runs at once on the vault's export, then is pulled local.

The libvirt side of instant_restore.py (docs/restore.md, "Instant restore"; docs/libvirt.md). The
command and the owner process are those of instant_restore.py; only what touches the VM differs,
and nothing here speaks QMP to the domain (libvirt owns its monitor):

- the new domain is the point's stored domain XML rewritten like `restore vm` does
  (connectors/libvirt/template.py: new name, UUID, MACs, paths), its disks the local qcow2 overlays
  whose header names the NBD export (nbd+unix) as backing: libvirt 9.0 reads that chain from the
  header itself (a network `<backingStore>`, protocol nbd, unix transport, in the live XML);
  every `<driver>` gets `error_policy='stop' rerror_policy='stop'`;
- the copy is libvirt's block pull (virDomainBlockPull, block-stream underneath) per disk, its
  progress from blockJobInfo. A pull that fails (the export died) is gone from libvirt: it is
  started again once the export serves again, and a domain paused by an I/O error is resumed;
- when no disk has a backing file any more the export stops; the persistent XML never named the
  export (and is redefined without a `<backingStore>` should one have got in).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmvault.connectors.qemu import instant
from vmvault.errors import InvalidInput
from vmvault.service.context import Context
from vmvault.service.instant_restore import STREAM_SPEED, Disk, InstantRestore
from vmvault.service.restore_vm import VmRestorePlan, _run_dir, _write_new
from vmvault.service.views import JsonDict

log = logging.getLogger("vmvault.instant")
PULL_BACKOFF_S = 3.0


def plan_libvirt(
    ctx: Context, vm_name: str, rp_id: str, new_name: str, target: str | Path | None
) -> tuple[VmRestorePlan, str]:
    """The checks of `restore vm` for a libvirt VM (name free in vmvault and libvirt, files, space); the URI."""
    from vmvault.service.restore_libvirt import _plan, _refuse_in_the_way
    from vmvault.service.restore_vm import checked_request

    lp = _plan(ctx, vm_name, rp_id, new_name, target, "qcow2", True)  # the disks' and the XML's paths included
    _vm, point, _vault = checked_request(ctx, vm_name, rp_id, new_name, "qcow2")
    disks = [lp.target_dir / f"{d['name']}.qcow2" for d in point.disks]
    definition = lp.target_dir / f"{new_name}.xml"
    run_dir = _run_dir(lp.target_dir, new_name)
    if run_dir.exists() and any(run_dir.iterdir()):
        _refuse_in_the_way(new_name, [run_dir])
    return VmRestorePlan(vm_name, rp_id, new_name, lp.vault, lp.target_dir, "qcow2", True, disks, [definition]), lp.uri


@dataclass
class LibvirtInstantRestore(InstantRestore):
    """InstantRestore with the VM a libvirt domain: define + start, block pull, destroy + undefine."""

    uri: str = ""
    conn: Any = None
    dom: Any = None
    pulling: set[str] = field(default_factory=set)  # disks with a pull started and not seen failed
    pull_after: float = 0.0  # no pull starts before (monotonic): the NBD client is still reconnecting

    def run(self) -> JsonDict:
        try:
            return super().run()
        finally:
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    self.conn.close()

    # ---- start: export, overlays, domain ----------------------------------------------------------
    def _start(self) -> JsonDict:
        from vmvault.connectors.libvirt import domain as lv
        from vmvault.connectors.libvirt.template import RestoredFile, copy_domain_xml, stop_on_errors
        from vmvault.service import restore_libvirt as rl

        self.plan.target_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
        manifest = self._manifest()
        xml = str((manifest.vm_definition or {}).get("domainXml") or "")
        if not xml:
            raise InvalidInput(f"recovery point '{self.plan.rp_id}' holds no domain XML: use restore disks")
        self._start_export()
        for d in manifest.disks:
            path = self.plan.target_dir / f"{d.name}.qcow2"
            instant.create_overlay(path, self.socket, d.name, d.size)
            self.created.append(path)
            self.disks.append(Disk(d.name, d.name, path, d.size))  # node: the disk's target (vda), libvirt's name
        copy = copy_domain_xml(xml, name=self.plan.new_name, target_dir=self.plan.target_dir,
                               disks=[RestoredFile(d.name, d.path, "qcow2") for d in self.disks],
                               in_point={d.name for d in manifest.disks},
                               source=f"instant restore of VM {self.plan.vm_name} point {self.plan.rp_id}")  # fmt: skip
        rl._refuse_in_the_way(self.plan.new_name, copy.files)
        self.created += copy.files  # serial logs libvirt will write: removed with the copy
        definition = self.plan.extra_files[0]
        text = stop_on_errors(copy.xml, [d.name for d in self.disks])
        _write_new(definition, text)
        self.created.append(definition)
        self.conn = lv.connect(self.uri)
        self.dom = rl._define(self.conn, self.plan.new_name, text)
        lplan = rl.LibvirtRestorePlan(self.plan.vm_name, self.plan.rp_id, self.plan.new_name, self.plan.vault,
                                      self.uri, self.plan.target_dir, "qcow2", True)  # fmt: skip
        row = rl._register(self.ctx, lplan, self.dom, definition)
        self._note(state="Booting", disks=[str(d.path) for d in self.disks], exportSocket=str(self.socket),
                   domain=self.plan.new_name)  # fmt: skip
        rl.start_domain(self.dom)
        log.info("domain %s runs on the export of point %s", self.plan.new_name, self.plan.rp_id)
        return {"name": row.name, "id": row.id, "domain": self.plan.new_name, "uuid": copy.uuid, "macs": copy.macs,
                "disks": [str(d.path) for d in self.disks], "definitionFile": str(definition), "started": True,
                "instant": True}  # fmt: skip

    # ---- the copy: block pull ---------------------------------------------------------------------
    CANCELLED = "the domain was destroyed and undefined, with its disks (they still needed the vault's export)"

    def _copy_tick(self, serving: bool) -> None:
        """One look at the block pulls through libvirt (never QMP on a libvirt domain)."""
        try:
            if self.dom.isActive():
                self._pull_tick(serving)
            elif serving:
                self._finish_offline()
        except self._libvirt_error() as exc:  # a busy or restarting libvirtd: the next tick asks again
            log.warning("talking to libvirt about %s failed (%s); retrying", self.plan.new_name, exc)

    def _copied(self) -> None:
        self._flat_persistent_xml()

    def _libvirt_error(self) -> type[Exception]:
        from vmvault.connectors.libvirt import domain as lv

        error: type[Exception] = lv._lv().libvirtError
        return error

    def _pull_tick(self, serving: bool) -> None:
        from vmvault.connectors.libvirt import domain as lv

        lvmod = lv._lv()
        now = time.monotonic()
        if serving:  # after a lost export: the domain first (its retried reads reconnect), then the pulls
            state, reason = self.dom.state()
            if state == lvmod.VIR_DOMAIN_PAUSED and reason == lvmod.VIR_DOMAIN_PAUSED_IOERROR:
                self.dom.resume()
                log.info("domain %s resumed after the export came back", self.plan.new_name)
                self.pull_after = now + PULL_BACKOFF_S  # QEMU's NBD client may not have reconnected yet
        waiting: list[Disk] = []
        busy = False
        for disk in self.disks:
            if disk.done:
                continue
            info = self.dom.blockJobInfo(disk.node, 0)
            if info:
                busy = True
                end = int(info.get("end") or 0)
                pulled = int(disk.size * int(info.get("cur") or 0) / end) if end else 0
                # a pull started again counts from 0 (skipping what is local): the job's progress does not go back
                self.copied[disk.name] = max(pulled, self.copied.get(disk.name, 0))
            elif instant.image_backing(disk.path) is None:  # the pull completed: QEMU rewrote the header
                log.info("pulling %s completed", disk.name)
                disk.done = True
            elif disk.name in self.pulling:  # it failed: libvirt forgets failed jobs; QEMU's NBD client
                # reconnects with a back-off of its own (up to 16 s): a pull started meanwhile fails at once
                self.pulling.discard(disk.name)
                self.pull_after = now + PULL_BACKOFF_S
                waiting.append(disk)
            else:
                waiting.append(disk)
        # One pull at a time: when a pull completes, libvirt runs query-named-block-nodes, and QEMU 7.2
        # segfaults in it (bdrv_refresh_filename) if another stream's copy-on-read filter is being dropped
        if waiting and not busy and serving and now >= self.pull_after:
            self._start_pull(waiting[0])

    def _start_pull(self, disk: Disk) -> None:
        from vmvault.connectors.libvirt import domain as lv

        lvmod = lv._lv()
        flags = lvmod.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES if STREAM_SPEED > 0 else 0
        try:
            self.dom.blockPull(disk.node, STREAM_SPEED if STREAM_SPEED > 0 else 0, flags)
            self.pulling.add(disk.name)
            log.info("pulling %s into %s", disk.name, disk.path)
        except lvmod.libvirtError as exc:  # e.g. the export not reconnected yet: the next tick tries again
            log.warning("block pull of %s did not start: %s", disk.name, exc)

    def _flat_persistent_xml(self) -> None:
        """The persistent definition must not name the export: redefine it without a backingStore if it does."""
        from vmvault.connectors.libvirt import domain as lv
        from vmvault.connectors.libvirt.template import without_backing_stores

        flat = without_backing_stores(lv.persistent_xml(self.dom))
        if flat is not None:
            self.conn.defineXML(flat)

    # ---- failures and teardown ----------------------------------------------------------------------
    def _failed_while_copying(self) -> None:
        """A domain that runs on the export keeps it (stopping it would pause the domain for good)."""
        active = False
        with contextlib.suppress(Exception):
            active = bool(self.dom is not None and self.dom.isActive())
        if not active:
            self._stop_export()
            self._note(state="Failed", vmRunning=False)
            return
        self._note(state="Failed", exportLeftRunning=True)
        log.error("the copy failed; domain %s still runs on the export (pid %s)", self.plan.new_name,
                  self.export.pid if self.export else "?")  # fmt: skip

    def _teardown(self, state: str) -> None:
        """Destroy and undefine the domain, stop the export, remove the copy: it still needed the vault."""
        from vmvault.catalog import repos
        from vmvault.service.restore_libvirt import _undefine

        if self.dom is not None:
            _undefine(self.dom)
        self._stop_export()
        self._remove_created()
        for leftover in self.run_dir.glob("export.*"):
            leftover.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.run_dir.rmdir()
        self._note(state=state, vmRunning=False)
        with self.ctx.catalog.write() as s:
            row = repos.find_vm(s, self.plan.new_name)
            if row is not None:
                s.delete(row)

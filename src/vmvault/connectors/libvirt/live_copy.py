"""Instant restore of a libvirt VM: a new domain on overlays of the vault's export, pulled local (docs/libvirt.md).

Nothing here speaks QMP to the domain (libvirt owns its monitor):
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
from pathlib import Path

from vmvault.connectors.contract import CopyDisk, JsonDict, NewVm
from vmvault.connectors.libvirt import domain as lv
from vmvault.connectors.libvirt.restore import undefine
from vmvault.connectors.libvirt.template import without_backing_stores
from vmvault.connectors.qemu import instant
from vmvault.connectors.qemu.live_copy import STREAM_SPEED

log = logging.getLogger("vmvault.instant")
PULL_BACKOFF_S = 3.0


def overlay(definition: JsonDict, name: str, size: int, path: str, export_socket: str) -> CopyDisk:
    """A qcow2 overlay on the export's disk `name`; pulled by the disk's target (vda), libvirt's name for it."""
    instant.create_overlay(Path(path), Path(export_socket), name, size)
    return CopyDisk(name, name, path, size)


class LibvirtLiveCopy:
    cancelled = "the domain was destroyed and undefined, with its disks (they still needed the vault's export)"

    def __init__(self, vm: NewVm) -> None:
        self.name = str(vm.handle["domain"])
        self.conn = lv.connect(str(vm.handle["uri"]))
        self.dom = lv.lookup(self.conn, self.name, vm.handle.get("uuid"))
        self.pulling: set[str] = set()  # disks with a pull started and not seen failed
        self.pull_after = 0.0  # no pull starts before (monotonic): the NBD client is still reconnecting

    def tick(self, disks: list[CopyDisk], copied: dict[str, int], serving: bool) -> None:
        """One look at the block pulls through libvirt (never QMP on a libvirt domain)."""
        try:
            if self.dom.isActive():
                self._pull_tick(disks, copied, serving)
            elif serving:
                log.info("VM %s is not running: copying the rest of its disks offline", self.name)
                instant.finish_offline(disks)
        except lv._lv().libvirtError as exc:  # a busy or restarting libvirtd: the next tick asks again
            log.warning("talking to libvirt about %s failed (%s); retrying", self.name, exc)

    def _pull_tick(self, disks: list[CopyDisk], copied: dict[str, int], serving: bool) -> None:
        lvmod = lv._lv()
        now = time.monotonic()
        if serving:  # after a lost export: the domain first (its retried reads reconnect), then the pulls
            state, reason = self.dom.state()
            if state == lvmod.VIR_DOMAIN_PAUSED and reason == lvmod.VIR_DOMAIN_PAUSED_IOERROR:
                self.dom.resume()
                log.info("domain %s resumed after the export came back", self.name)
                self.pull_after = now + PULL_BACKOFF_S  # QEMU's NBD client may not have reconnected yet
        waiting: list[CopyDisk] = []
        busy = False
        for disk in disks:
            if disk.done:
                continue
            info = self.dom.blockJobInfo(disk.node, 0)
            if info:
                busy = True
                end = int(info.get("end") or 0)
                pulled = int(disk.size * int(info.get("cur") or 0) / end) if end else 0
                # a pull started again counts from 0 (skipping what is local): the job's progress does not go back
                copied[disk.name] = max(pulled, copied.get(disk.name, 0))
            elif instant.image_backing(Path(disk.path)) is None:  # the pull completed: QEMU rewrote the header
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

    def _start_pull(self, disk: CopyDisk) -> None:
        lvmod = lv._lv()
        flags = lvmod.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES if STREAM_SPEED > 0 else 0
        try:
            self.dom.blockPull(disk.node, STREAM_SPEED if STREAM_SPEED > 0 else 0, flags)
            self.pulling.add(disk.name)
            log.info("pulling %s into %s", disk.name, disk.path)
        except lvmod.libvirtError as exc:  # e.g. the export not reconnected yet: the next tick tries again
            log.warning("block pull of %s did not start: %s", disk.name, exc)

    def finished(self, disks: list[CopyDisk]) -> None:
        """The persistent definition must not name the export: redefine it without a backingStore if it does."""
        flat = without_backing_stores(lv.persistent_xml(self.dom))
        if flat is not None:
            self.conn.defineXML(flat)

    def check_local(self, disks: list[CopyDisk]) -> None:
        instant.check_local(disks)

    def active(self) -> bool:
        with contextlib.suppress(Exception):
            return bool(self.dom.isActive())
        return False

    def stop(self) -> None:
        undefine(self.dom)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()

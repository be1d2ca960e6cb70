"""Instant restore of a plain QEMU VM: its disks streamed local with block-stream over QMP (docs/restore.md)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from vmvault.connectors.contract import CopyDisk, JsonDict, NewVm
from vmvault.connectors.qemu import instant
from vmvault.connectors.qemu.qmp import QemuNotRunning, QmpClient
from vmvault.connectors.qemu.restore import extra_files
from vmvault.errors import Busy, HypervisorError, VmvaultError

log = logging.getLogger("vmvault.instant")

STREAM_SPEED = int(os.environ.get("VMVAULT_INSTANT_STREAM_SPEED", "0"))  # bytes/s, 0 = as fast as it goes


def overlay(definition: JsonDict, name: str, size: int, path: str, export_socket: str) -> CopyDisk:
    """A qcow2 overlay on the export's disk `name`; streamed by the disk's format node in QEMU."""
    instant.create_overlay(Path(path), Path(export_socket), name, size)
    known = {str(d.get("name")): d for d in definition.get("disks") or []}
    return CopyDisk(name, str((known.get(name) or {}).get("node") or name), path, size)


class QemuLiveCopy:
    cancelled = "the VM was stopped and removed, with its disks (they still needed the vault's export)"

    def __init__(self, vm: NewVm) -> None:
        self.template: JsonDict = dict(vm.handle["template"])
        self.name = str(self.template["name"])

    @property
    def qmp(self) -> str:
        return str(self.template["sockets"]["qmp"])

    def tick(self, disks: list[CopyDisk], copied: dict[str, int], serving: bool) -> None:
        """One look at the streams over QMP: start, dismiss, resume."""
        try:
            with QmpClient(self.qmp).connect() as qmp:
                self._tick(qmp, disks, copied, serving)
        except QemuNotRunning:
            if serving:
                log.info("VM %s is not running: copying the rest of its disks offline", self.name)
                instant.finish_offline(disks)
        except (OSError, HypervisorError, Busy):  # a QMP hiccup or a busy socket: the next tick asks again
            log.warning("talking to VM %s failed; retrying", self.name, exc_info=True)

    def _tick(self, qmp: QmpClient, disks: list[CopyDisk], copied: dict[str, int], serving: bool) -> None:
        jobs = instant.stream_jobs(qmp)
        for disk in disks:
            job_id = instant.stream_job_id(disk.node)
            state = jobs.get(job_id)
            if disk.done:
                continue
            if state is None and serving:
                instant.start_stream(qmp, disk.node, STREAM_SPEED)  # first start, or again after a failed one
            elif state is not None and state.status == "concluded":
                log.info("streaming %s ended: %s", disk.name, state)
                instant.dismiss_job(qmp, job_id)
                if state.error:
                    log.warning("streaming %s failed: %s; starting it again", disk.name, state.error)
                else:
                    # the image header, not query-named-block-nodes: QEMU 7.2 crashed on that query here
                    disk.done = instant.image_backing(Path(disk.path)) is None
            elif state is not None:
                copied[disk.name] = state.done
        if serving:  # after a lost export: the VM first (its retried reads reconnect), then the copy
            if instant.resume_after_io_error(qmp):
                log.info("VM %s resumed after the export came back", self.name)
            for job_id in instant.paused_streams(qmp):
                log.info("resuming %s", job_id)
                instant.resume_job(qmp, job_id)

    def finished(self, disks: list[CopyDisk]) -> None:
        pass  # the command line names the overlays only: nothing refers to the export

    def check_local(self, disks: list[CopyDisk]) -> None:
        instant.check_local(disks)

    def active(self) -> bool:
        try:
            with QmpClient(self.qmp).connect(greeting_timeout=5):
                return True
        except VmvaultError:
            return False

    def stop(self) -> None:
        """Quit QEMU, wait for it to go, remove its logs (in the way of a new attempt)."""
        with contextlib.suppress(VmvaultError, OSError), QmpClient(self.qmp).connect() as client:
            client.quit()
        pid_file = Path(str(self.template.get("pidFile") or ""))
        deadline = time.monotonic() + 30
        while pid_file.name and pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_file.name:  # beside it: the serial log and QEMU's log (connectors/qemu/restore.py extra_files)
            for path in extra_files(pid_file.parent, self.name)[2:]:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        pass

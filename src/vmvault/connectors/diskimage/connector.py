"""The disk-image connector: a stopped VM's images, read offline through qemu-nbd under QEMU's image lock.

A point of such a VM is CrashConsistent (nothing runs to quiesce) and has no changed-block
tracking: the engine reads everything allocated and compares hashes with the previous point.
The other connectors use `exported_images` for their own stopped VMs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
    OpenPoint,
    WrittenDisk,
    no_channel,
)
from vmvault.connectors.diskimage.diskformat import BackingFile, chain_from_record, read_chain
from vmvault.connectors.diskimage.imagelock import ImageLock
from vmvault.connectors.diskimage.images import NbdImageExport, check_registered_disk, disk_info
from vmvault.engine.backup import WORKERS, ExportedDisk
from vmvault.engine.rawfile import file_uri
from vmvault.errors import InvalidInput

log = logging.getLogger("vmvault")

KIND_DISKS = "disks"


@dataclass(frozen=True)
class DiskSource:
    """A stopped VM's disk image, read offline through qemu-nbd, opened as its recorded format.

    chain: the qcow2 backing chain recorded at `vm add` (checked before reading); None for disks
    whose chain is re-read each time under the same rules (libvirt domains: their XML decides).
    """

    name: str
    path: Path
    format: str
    chain: list[BackingFile] | None = None


class DiskImageConnector:
    kind = KIND_DISKS

    def capabilities(self) -> Capabilities:
        return Capabilities(self.kind, changed_blocks="none", backup_api="offline", quiesce=False, live_restore=False)

    def discover(self, where: str | None = None) -> list[JsonDict]:
        return []  # images are named by their paths at `vm add`: there is nothing to list

    @contextlib.contextmanager
    def open_point(self, request: BackupRequest, port: BackupPort) -> Iterator[OpenPoint]:
        sources = [disk_source(request.vm_name, d, port) for d in request.disks]
        rp_id, time = port.new_point()
        with exported_images(request.vm_name, sources) as disks:
            yield OpenPoint(rp_id, time, CRASH_CONSISTENT, request.definition, disks, port.cancel)


    # ---- restore as a new VM, replace disks (connectors/contract.py) ----------------------------------
    def refuse_new_vm(self, request: NewVmRequest) -> None:
        raise InvalidInput(
            f"VM '{request.source_vm}' has no VM definition: use restore disks",
            hint=f"vmvault restore disks {request.source_vm} --rp {request.rp_id} --target-dir DIR",
        )

    def in_the_way(self, request: NewVmRequest) -> list[str]:
        return []

    def check_point(self, request: NewVmRequest, definition: JsonDict) -> None:
        self.refuse_new_vm(request)

    def create_new_vm(
        self, request: NewVmRequest, definition: JsonDict, in_point: list[str], disks: list[WrittenDisk],
        *, instant: bool = False,
    ) -> NewVm:  # fmt: skip
        self.refuse_new_vm(request)
        raise AssertionError("unreachable")

    def share_with_vm(self, path: str, mode: int) -> None:
        pass

    def start_new_vm(self, vm: NewVm) -> None:
        pass

    def remove_new_vm(self, vm: NewVm) -> None:
        pass

    def disks_template(
        self, target_dir: str, definition: JsonDict, source_vm: str, rp_id: str, in_point: list[str],
        written: list[WrittenDisk], *, force: bool = False,
    ) -> str | None:  # fmt: skip
        return None  # the disks are all there is: nothing to define a VM from

    def overlay(self, definition: JsonDict, name: str, size: int, path: str, export_socket: str) -> CopyDisk:
        raise AssertionError("a VM of disk images is never created (refuse_new_vm)")

    def live_copy(self, vm: NewVm) -> LiveCopy:
        raise AssertionError("a VM of disk images is never created (refuse_new_vm)")

    def template_name(self, source_vm: str) -> str | None:
        return None

    def refuse_running(self, vm_name: str, definition: JsonDict) -> None:
        pass  # an image a running QEMU holds is refused by its lock (refuse_locked)

    def disks_replaced(self, vm_id: str, definition: JsonDict) -> None:
        pass

    # ---- inventory: vm add, vm list, item show, doctor, service start (connectors/contract.py) ---------
    def describe(self, where: JsonDict, known: list[JsonDict]) -> tuple[list[JsonDict], JsonDict]:
        from vmvault.connectors.diskimage import inventory

        return inventory.describe(where)

    def status(self, definitions: list[JsonDict]) -> list[JsonDict]:
        return [{"powerState": "unknown", "agent": "n/a (disk images)"} for _ in definitions]

    def agent_status(self, definition: JsonDict, *, live: bool) -> tuple[JsonDict, JsonDict | None]:
        return NOT_APPLICABLE, None

    def agent_advice(self, vm_name: str, definition: JsonDict) -> JsonDict | None:
        return None

    def enable_agent(self, vm_name: str, definition: JsonDict) -> JsonDict:
        raise no_channel(vm_name)

    def reconcile(self, home: str, vms: list[LeftoverVm]) -> list[str]:
        return []  # qemu-nbd work directories of killed exports: ImageTools.remove_dead_work_dirs

    def doctor_host(self, home: str | None, disks: list[JsonDict], needed: bool) -> list[JsonDict]:
        return []  # qemu-img, qemu-nbd: doctor's tools checks

    def doctor_vm(self, vm_name: str, definition: JsonDict, disks: list[JsonDict]) -> list[JsonDict]:
        from vmvault.connectors.diskimage import inventory

        return inventory.doctor_vm(vm_name, disks)

    # ---- image tools (connectors/contract.py ImageTools) ----------------------------------------------
    def refuse_locked(self, path: str) -> None:
        from vmvault.connectors.diskimage.images import refuse_locked

        refuse_locked(Path(path))

    def check_restored(self, path: str, fmt: str, size: int) -> None:
        from vmvault.connectors.diskimage.images import verify_image

        verify_image(Path(path), fmt, size)

    def drop_tracking(self, path: str) -> None:
        from vmvault.connectors.diskimage.images import drop_vmvault_bitmaps

        drop_vmvault_bitmaps(Path(path))

    def convert_to_qcow2(self, raw: str, dest: str) -> None:
        from vmvault.connectors.diskimage.images import convert_to_qcow2

        convert_to_qcow2(Path(raw), Path(dest))

    def remove_dead_work_dirs(self) -> int:
        from vmvault.connectors.diskimage.images import remove_dead_work_dirs

        return remove_dead_work_dirs()


def _checked_on_host(name: str, path: Path, port: BackupPort) -> DiskSource:
    """A disk added for another host (`vm add --host`): its format is guessed and its chain read here,
    on its host, at its first backup, under `vm add`'s rules, and recorded for good."""
    from vmvault.connectors.diskimage import inventory

    record = inventory.disk_record(name, inventory.inspect(path, None))
    port.save_disk(name, {"format": record["format"], "chain": record.get("chain", []), "checkOnHost": False})
    return DiskSource(name, path, str(record["format"]), chain_from_record(record.get("chain")) or [])


def disk_source(vm_name: str, disk: JsonDict, port: BackupPort) -> DiskSource:
    """The disk as recorded at `vm add`: its format, and for qcow2 the backing chain checked before reading.

    A qcow2 disk recorded before chains were (catalog migration 0007) gets its chain recorded now
    when it has no backing file; one that has a backing file is refused until an admin confirms it.
    """
    name, path, fmt = str(disk["name"]), Path(str(disk["path"])), str(disk.get("format") or "unknown")
    check_registered_disk(path)  # not a symlink swapped in since `vm add`
    if disk.get("format") is None and disk.get("checkOnHost"):
        return _checked_on_host(name, path, port)
    if fmt != "qcow2" or "chain" in disk:
        return DiskSource(name, path, fmt, chain_from_record(disk.get("chain")) or [])
    chain = read_chain(path, fmt)
    if chain:
        raise InvalidInput(
            f"disk {name} ({path}) of VM '{vm_name}' is a qcow2 image with backing file {chain[0].path}, "
            "added before vmvault recorded backing chains: confirm that chain before it is read",
            hint=f"if {path} is a qcow2 image you made: vmvault vm set-format {vm_name} --disk {name} --format qcow2; "
            f"if the VM uses it as a raw disk: --format raw",
            code="disk_chain_unconfirmed",
        )
    port.save_disk(name, {"chain": []})
    log.warning("disk %s of VM %s: qcow2 without backing file, recorded now (first backup since 0007)", name, vm_name)
    return DiskSource(name, path, fmt, [])


@contextlib.contextmanager
def exported_images(vm_name: str, disks: list[DiskSource]) -> Iterator[list[ExportedDisk]]:
    """Export a stopped VM's images for reading, holding every image's lock until the block ends."""
    if not disks:
        raise InvalidInput(f"VM {vm_name} has no disks to back up")
    with contextlib.ExitStack() as stack:
        exported = []
        for src in disks:
            registered = src.chain is not None  # recorded at `vm add` (libvirt domains: their XML decides)
            if registered:
                check_registered_disk(src.path)
            info = disk_info(src.path, src.format, src.chain)
            if info.format == "raw" and info.path.is_file():
                # Raw files are read directly, under QEMU's image lock (what qemu-nbd would hold), through
                # the lock's own descriptor: a registered disk swapped for a symlink after the check is not read.
                lock = stack.enter_context(ImageLock(info.path, nofollow=registered))
                uri = file_uri(lock.fd_path if registered else info.path)
            else:
                uri = stack.enter_context(NbdImageExport(info, connections=WORKERS + 2)).uri
            exported.append(ExportedDisk(src.name, uri, info.virtual_size, info.format, str(info.path)))
        yield exported

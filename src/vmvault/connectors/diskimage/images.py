"""Stopped VMs: disk images read through QEMU's own tools, holding QEMU's image lock.

`qemu-img info` and a read-only `qemu-nbd` take the same locks as QEMU: while vmvault reads an
image a VM cannot start on it (it fails to get the write lock), and an image held by a running
QEMU is refused instead of read torn.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from vmvault.connectors.diskimage.diskformat import FORMATS, BackingFile, blockdev_json, check_chain, read_chain
from vmvault.connectors.diskimage.imagelock import ImageLock
from vmvault.errors import HypervisorError, InvalidInput, NotFound, VmRunning

_RUNNING_HINT = "stop the VM first, or add it as a running VM with --libvirt or --qmp"


@dataclass(frozen=True)
class DiskInfo:
    path: Path
    format: str  # raw | qcow2
    virtual_size: int
    actual_size: int
    chain: tuple[BackingFile, ...] = ()  # qcow2: the backing files below it, each with its format

    @property
    def open_name(self) -> str:
        """What QEMU tools open: a `json:` description naming every node's driver (never probed)."""
        return blockdev_json(self.path, self.format, list(self.chain))


def probe_format(path: Path) -> str:
    """Guess an image's format: ONLY at `vm add` without --format, shown to the user and stored.

    `qemu-img info` without --backing-chain opens no backing file; the caller refuses a guessed
    qcow2 that names one (service/vms.py).
    """
    path = existing_image(path)
    proc = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        _raise_for_qemu_error(path, proc.stderr)
    fmt = json.loads(proc.stdout).get("format")
    if fmt not in FORMATS:
        raise InvalidInput(
            f"{path} is a {fmt} image; vmvault reads raw and qcow2",
            hint=f"convert it: qemu-img convert -O qcow2 {path} {path}.qcow2",
        )
    return str(fmt)


def disk_info(path: Path, fmt: str, chain: list[BackingFile] | None = None) -> DiskInfo:
    """Size and chain of an image opened as `fmt` (its recorded format), never guessed from its content.

    chain: the backing chain recorded at `vm add`, checked against the headers (a change is refused,
    naming the file); None reads the chain from the headers under the same rules (diskformat.py).
    """
    path = existing_image(path)
    if fmt not in FORMATS:
        raise InvalidInput(
            f"the format of disk {path} is not recorded ({fmt})",
            hint="record it: vmvault vm set-format VM --disk NAME --format raw|qcow2",
            code="disk_format_unknown",
        )
    if fmt == "qcow2":
        if chain is None:
            chain = read_chain(path, fmt)
        else:
            check_chain(path, fmt, chain)
    # Size of the image itself: no backing file is opened (its chain is checked above, in Python).
    proc = subprocess.run(["qemu-img", "info", "--output=json", blockdev_json(path, fmt, [])], capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        _raise_for_qemu_error(path, proc.stderr)
    info = json.loads(proc.stdout)
    if fmt == "raw":
        _refuse_non_image(path, int(info["virtual-size"]))
    if path.is_file():
        with ImageLock(path):  # raises VmRunning when a running QEMU writes to the image
            pass
    return DiskInfo(path, fmt, int(info["virtual-size"]), int(info.get("actual-size", 0)), tuple(chain or ()))


def existing_image(path: Path) -> Path:
    path = Path(path).absolute()
    if not path.exists():
        raise NotFound(f"disk image {path} does not exist", hint="check the path of --disk")
    if not path.is_file() and not path.is_block_device():
        raise InvalidInput(f"{path} is not a disk image (not a file)")
    return path


def check_registered_disk(path: Path) -> None:
    """A disk recorded at `vm add`, checked again before each backup reads it.

    Its path was a regular file or a block device when it was added; if it has since become a
    symlink to something else (a host secret swapped in by whoever can write the disk's folder),
    vmvault must not follow it. A symlink is accepted only onto a block device (LVM's /dev/VG/LV
    links point at /dev/dm-N); the node is opened with O_NOFOLLOW to check its type.
    """
    path = Path(path).absolute()
    if path.is_symlink():
        if Path(os.path.realpath(path)).is_block_device():
            return
        raise InvalidInput(
            f"disk {path} has become a symlink (to {os.readlink(path)}) since the VM was added; "
            "vmvault does not follow it",
            hint=f"put the disk image itself at {path}, or re-add the VM with the image's real path",
            code="disk_path_changed",
        )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFound(f"disk image {path} does not exist", hint="check the VM's disk path") from None
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if not stat.S_ISREG(mode) and not stat.S_ISBLK(mode):
        raise InvalidInput(
            f"disk {path} is no longer a regular file or block device",
            hint=f"put the disk image itself at {path}, or re-add the VM with the image's real path",
            code="disk_path_changed",
        )


def _refuse_non_image(path: Path, size: int) -> None:
    """Any file is a valid raw image to QEMU; refuse the ones that plainly are not disks."""
    if size == 0:
        raise InvalidInput(f"{path} is empty, not a disk image")
    with open(path, "rb") as f:
        head = f.read(65536)
    if b"\0" not in head:
        raise InvalidInput(
            f"{path} is not a disk image (it looks like a text or data file)",
            hint="give the VM's disk image file (raw or qcow2)",
        )


def _raise_for_qemu_error(path: Path, stderr: str) -> None:
    if re.search(r"(?<!b)lock", stderr.lower()):  # "Failed to get shared 'write' lock", not "Block format"
        raise VmRunning(
            f"VM is running: add it with --libvirt or --qmp (disk {path} is locked by a running QEMU)",
            hint=_RUNNING_HINT,
        )
    raise InvalidInput(f"{path} is not a readable disk image: {stderr.strip().splitlines()[-1] if stderr else ''}")


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: if vmvault is killed, qemu-nbd goes too and releases the image lock.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)


WORK_ROOT = "/tmp"
WORK_PREFIX = "vmv-"


def remove_dead_work_dirs() -> int:
    """Work directories (an export's socket) of vmvault processes that died: /tmp/vmv-<pid>-*."""
    from vmvault.proc import pid_alive

    removed = 0
    for path in Path(WORK_ROOT).glob(f"{WORK_PREFIX}*-*"):
        pid = path.name[len(WORK_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and path.is_dir() and not path.is_symlink() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


class NbdImageExport:
    """A read-only qemu-nbd export of one image on a private unix socket."""

    def __init__(self, info: DiskInfo, connections: int = 4) -> None:
        self.info = info
        self._connections = connections
        # Named after this process: a killed one's directory is found and removed (remove_dead_work_dirs).
        self._dir = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=WORK_ROOT))
        self.socket = self._dir / "nbd.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: ImageLock | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.socket}"

    def __enter__(self) -> NbdImageExport:
        if self.info.path.is_file():
            self._lock = ImageLock(self.info.path).__enter__()
        cmd = [
            "qemu-nbd",
            "--read-only",
            "--persistent",
            f"--shared={self._connections}",
            f"--socket={self.socket}",
            "--export-name=disk",
            "--cache=writeback",
            self.info.open_name,  # every driver named: the image's content chooses nothing
        ]
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + 30
        # The socket file appears at bind(), a moment before listen(): wait until it accepts.
        while not _accepts(self.socket):
            if self._proc.poll() is not None:
                stderr = self._proc.stderr.read().decode() if self._proc.stderr else ""
                self._cleanup()
                _raise_for_qemu_error(self.info.path, stderr)
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise HypervisorError(f"qemu-nbd did not start for {self.info.path}")
            time.sleep(0.005)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None
        if self._proc is not None and self._proc.stderr:
            self._proc.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def _accepts(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def convert_to_qcow2(src_raw: Path, dest: Path) -> None:
    # Created 0600 first: qemu-img keeps an existing file's mode, so guest data is never world-readable.
    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    proc = subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src_raw), str(dest)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise HypervisorError(f"qemu-img convert to {dest} failed: {proc.stderr.strip()}")


def os_supports_sparse(path: Path) -> bool:
    return hasattr(os, "SEEK_HOLE")


def refuse_locked(path: Path) -> None:
    """VmRunning when a QEMU holds the image (it takes QEMU's own lock for a moment)."""
    if existing_image(path).is_file():
        with ImageLock(path):
            pass


def verify_image(path: Path, fmt: str, size: int) -> None:
    """IntegrityError unless a restored image opens as fmt, has the point's size and (qcow2) checks clean."""
    from vmvault.errors import IntegrityError

    proc = subprocess.run(["qemu-img", "info", "--output=json", "-f", fmt, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise IntegrityError(f"the restored disk {path} does not open as {fmt}: {proc.stderr.strip()}")
    info = json.loads(proc.stdout)
    if int(info.get("virtual-size", -1)) != size:
        raise IntegrityError(f"the restored disk {path} has size {info.get('virtual-size')}, the point {size}")
    if fmt == "qcow2":
        check = subprocess.run(["qemu-img", "check", "-q", "-f", fmt, str(path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise IntegrityError(f"qemu-img check of the restored disk {path} failed: {check.stderr.strip()}")


def drop_vmvault_bitmaps(path: Path) -> None:
    """Remove vmvault's bitmaps (vmv-*) from a qcow2: the next backup must not trust them."""
    proc = subprocess.run(["qemu-img", "info", "-f", "qcow2", "--output=json", str(path)], capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode != 0:
        return
    data = ((json.loads(proc.stdout).get("format-specific") or {}).get("data")) or {}
    for bitmap in data.get("bitmaps") or []:
        name = str(bitmap.get("name") or "")
        if name.startswith("vmv-"):
            subprocess.run(["qemu-img", "bitmap", "--remove", "-f", "qcow2", str(path), name], check=True,
                           capture_output=True)  # fmt: skip

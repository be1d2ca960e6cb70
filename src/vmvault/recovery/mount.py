"""Mount a disk image's file systems read-only, and take every such mount down again.

Standard library plus util-linux (losetup, mount, umount) only: the recovery script embeds this file
verbatim, so the vmvault host and the machine that runs the script mount the same way.

- Partition tables (GPT, MBR with extended/logical partitions) are parsed here; a disk with a
  file system and no table is mounted whole.
- File systems are recognised by their magic numbers. Each partition gets its own read-only loop
  device (`losetup -r -o START --sizelimit SIZE`), mounted `ro,nosuid,nodev,noexec` on
  DIR/<disk>-part<N> (DIR/<disk> for a whole disk): ext2/3/4 with `noload` (no journal replay),
  XFS `norecovery,nouuid`, Btrfs `rescue=nologreplay`; NTFS through ntfs-3g (FUSE) or the kernel's
  ntfs3; FAT through the kernel's vfat or, where it is missing, fusefat (FUSE). Encrypted (LUKS),
  LVM, swap and unknown partitions are listed with the reason they were skipped.
- `cleanup()` finds what is left by looking at the system, not at records, so it also clears what
  a crashed process left: mounts under the mount directory -> loop devices backed by files under
  the FUSE directory -> FUSE mounts under it (the export is closed by the caller afterwards).
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SECTOR = 512
BASE_OPTIONS = "ro,nosuid,nodev,noexec"
ESP_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
BIOS_BOOT_GUID = "21686148-6449-6e6f-744e-656564454649"
LVM_GUID = "e6d6d379-f507-44c2-a23c-238f2a3df928"
EXTENDED_TYPES = (0x05, 0x0F, 0x85)
LVM_MBR_TYPE = 0x8E

Log = Callable[[str], None]


@dataclass
class Partition:
    number: int  # 1-based; 0 = the whole disk (no partition table)
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type: str  # GPT type GUID, or MBR type as "0x83"
    name: str = ""  # GPT partition name


@dataclass
class Volume:
    """One partition of one disk and what became of it."""

    disk: str
    partition: int
    start: int
    size: int
    fstype: str = ""
    path: str = ""  # where it is mounted
    device: str = ""  # its loop device
    driver: str = ""  # kernel | ntfs-3g | fusefat
    status: str = "skipped"  # mounted | skipped | failed
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- partition tables ------------------------------------------------------------------------


def _guid(raw: bytes) -> str:
    a, b, c = struct.unpack_from("<IHH", raw)
    return f"{a:08x}-{b:04x}-{c:04x}-{raw[8:10].hex()}-{raw[10:16].hex()}"


def _read(f: Any, offset: int, length: int) -> bytes:
    f.seek(offset)
    data: bytes = f.read(length)
    return data


def _gpt_at(f: Any, header_offset: int, disk_size: int) -> list[Partition] | None:
    head = _read(f, header_offset, SECTOR)
    if head[:8] != b"EFI PART":
        return None
    header_size, header_crc = struct.unpack_from("<II", head, 12)
    if not 92 <= header_size <= SECTOR:
        return None
    check = head[:16] + b"\0\0\0\0" + head[20:header_size]
    if zlib.crc32(check) != header_crc:
        return None
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", head, 72)
    if entry_size < 128 or count > 1024:
        return None
    table = _read(f, entries_lba * SECTOR, count * entry_size)
    if zlib.crc32(table) != entries_crc:
        return None
    parts = []
    for i in range(count):
        entry = table[i * entry_size : (i + 1) * entry_size]
        if entry[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        name = entry[56:128].decode("utf-16-le", "replace").rstrip("\0")
        start, size = first * SECTOR, (last - first + 1) * SECTOR
        if last >= first and start + size <= disk_size:
            parts.append(Partition(i + 1, start, size, _guid(entry[:16]), name))
    return parts


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int]]:
    """(type, first LBA, sectors) of the four slots, empty ones left out."""
    found = []
    for i in range(4):
        _status, ptype, lba, count = struct.unpack_from("<B3xB3xII", sector, 446 + 16 * i)
        if ptype and count:
            found.append((ptype, lba, count))
    return found


def _mbr(f: Any, disk_size: int) -> list[Partition]:
    sector = _read(f, 0, SECTOR)
    parts: list[Partition] = []
    for slot in range(4):
        _status, ptype, lba, count = struct.unpack_from("<B3xB3xII", sector, 446 + 16 * slot)
        if not ptype or not count:
            continue
        if ptype in EXTENDED_TYPES:
            parts += _logical(f, lba, disk_size)
        elif (lba + count) * SECTOR <= disk_size:
            parts.append(Partition(slot + 1, lba * SECTOR, count * SECTOR, f"0x{ptype:02x}"))
    return parts


def _logical(f: Any, ext_start: int, disk_size: int) -> list[Partition]:
    """Walk the chain of extended boot records; logical partitions are numbered from 5."""
    parts: list[Partition] = []
    ebr, seen = ext_start, set()
    while ebr not in seen and len(parts) < 128 and ebr * SECTOR < disk_size:
        seen.add(ebr)
        sector = _read(f, ebr * SECTOR, SECTOR)
        if sector[510:512] != b"\x55\xaa":
            break
        entries = _mbr_entries(sector)
        nxt = None
        for ptype, lba, count in entries:
            if ptype in EXTENDED_TYPES:
                nxt = ext_start + lba
            elif (ebr + lba + count) * SECTOR <= disk_size:
                parts.append(Partition(5 + len(parts), (ebr + lba) * SECTOR, count * SECTOR, f"0x{ptype:02x}"))
        if nxt is None:
            break
        ebr = nxt
    return parts


def read_partitions(path: str, disk_size: int | None = None) -> tuple[str, list[Partition]]:
    """("gpt" | "mbr" | "none", partitions); "none" with one whole-disk entry when no table is found."""
    with open(path, "rb") as f:
        size = disk_size if disk_size is not None else f.seek(0, os.SEEK_END)
        for header in (SECTOR, 4096):  # CRC-checked, so tried first
            parts = _gpt_at(f, header, size)
            if parts is not None:
                return "gpt", parts
        backup = _gpt_at(f, size - SECTOR, size) if size >= 2 * SECTOR else None
        if backup is not None:
            return "gpt", backup
        # A FAT or NTFS boot sector also ends in 55 AA: a file system at sector 0 wins over "MBR".
        if not detect_fs(f, 0) and _looks_like_mbr(_read(f, 0, SECTOR)):
            return "mbr", _mbr(f, size)
    return "none", [Partition(0, 0, size, "", "")]


def _looks_like_mbr(sector: bytes) -> bool:
    if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa":
        return False
    return all(sector[446 + 16 * i] in (0, 0x80) for i in range(4)) and bool(_mbr_entries(sector))


# ---- file systems ----------------------------------------------------------------------------


def detect_fs(f: Any, start: int) -> str:
    """The file system at byte `start` of an open image, by magic number ("" = unknown)."""
    head = _read(f, start, 4096)
    if len(head) < 1024:
        return ""
    if head[:6] == b"LUKS\xba\xbe":
        return "crypto_LUKS"
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[3:11] == b"EXFAT   ":
        return "exfat"
    if head[:4] == b"XFSB":
        return "xfs"
    if head[512:520] == b"LABELONE" and head[536:544] == b"LVM2 001":
        return "LVM2_member"
    if head[510:512] == b"\x55\xaa" and (head[54:59] in (b"FAT12", b"FAT16") or head[82:87] == b"FAT32"):
        return "vfat"
    if head[1080:1082] == b"\x53\xef":
        return "ext4"
    if head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap"
    if _read(f, start + 65536 + 64, 8) == b"_BHRfS_M":
        return "btrfs"
    return ""


SKIP_REASONS = {
    "crypto_LUKS": "encrypted (LUKS) volume: vmvault cannot open it without its key",
    "LVM2_member": "LVM physical volume: logical volumes are not mapped yet (no device-mapper here)",
    "swap": "swap space holds no files",
}


def _fs_filesystems() -> set[str]:
    try:
        text = Path("/proc/filesystems").read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in text.splitlines() if line.strip()}


def mount_plans(fstype: str) -> list[tuple[str, list[str]]]:
    """Ways to mount a file system, best first: (driver, argv template with {dev} and {dir})."""
    kernel = _fs_filesystems()
    opts = {
        "ext4": f"{BASE_OPTIONS},noload",
        "xfs": f"{BASE_OPTIONS},norecovery,nouuid",
        "btrfs": f"{BASE_OPTIONS},rescue=nologreplay",
    }
    if fstype in opts:
        return [("kernel", ["mount", "-t", fstype, "-o", opts[fstype], "{dev}", "{dir}"])]
    if fstype == "ntfs":
        return [
            ("ntfs-3g", ["ntfs-3g", "-o", BASE_OPTIONS, "{dev}", "{dir}"]),
            ("kernel", ["mount", "-t", "ntfs3", "-o", BASE_OPTIONS, "{dev}", "{dir}"]),
        ]
    if fstype == "vfat":
        plans = [
            ("kernel", ["mount", "-t", "vfat", "-o", f"{BASE_OPTIONS},utf8", "{dev}", "{dir}"]),
            ("fusefat", ["fusefat", "-o", BASE_OPTIONS, "{dev}", "{dir}"]),
        ]
        return plans if "vfat" in kernel else plans[::-1]
    if fstype == "exfat":
        return [("kernel", ["mount", "-t", "exfat", "-o", BASE_OPTIONS, "{dev}", "{dir}"])]
    return []


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def _attach_loop(image: str, part: Partition) -> str:
    argv = [
        "losetup",
        "--read-only",
        "--find",
        "--show",
        "--offset",
        str(part.start),
        "--sizelimit",
        str(part.size),
        image,
    ]
    r = _run(argv)
    if r.returncode != 0:
        raise OSError(f"losetup failed: {r.stderr.strip()}")
    return r.stdout.strip()


def _detach_loop(device: str) -> None:
    _run(["losetup", "--detach", device])


def volume_dir_name(disk: str, number: int) -> str:
    return disk if number == 0 else f"{disk}-part{number}"


def mount_disk(image: str, disk: str, target: Path, log: Log, disk_size: int | None = None) -> list[Volume]:
    """Mount every recognised file system of one disk under target; returns one Volume per partition."""
    scheme, parts = read_partitions(image, disk_size)
    log(f"{disk}: {scheme} partition table, {len(parts)} partition(s)")
    volumes = []
    with open(image, "rb") as f:
        for part in parts:
            volume = Volume(disk, part.number, part.start, part.size, fstype=detect_fs(f, part.start))
            _mount_volume(image, part, volume, target, log)
            volumes.append(volume)
    return volumes


def _skip_reason(part: Partition, fstype: str) -> str:
    if part.type == BIOS_BOOT_GUID:
        return "BIOS boot partition holds no files"
    if fstype in SKIP_REASONS:
        return SKIP_REASONS[fstype]
    if part.type in (LVM_GUID, f"0x{LVM_MBR_TYPE:02x}") and not fstype:
        return SKIP_REASONS["LVM2_member"]
    if not fstype:
        return "no file system vmvault recognises"
    if not mount_plans(fstype):
        return f"no driver for {fstype} file systems"
    return ""


def _mount_volume(image: str, part: Partition, volume: Volume, target: Path, log: Log) -> None:
    reason = _skip_reason(part, volume.fstype)
    if reason:
        volume.reason = reason
        log(f"{volume.disk} partition {part.number}: skipped ({reason})")
        return
    directory = target / volume_dir_name(volume.disk, part.number)
    try:
        volume.device = _attach_loop(image, part)
    except OSError as exc:
        volume.status, volume.reason = "failed", str(exc)
        return
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    errors = []
    for driver, template in mount_plans(volume.fstype):
        argv = [a.replace("{dev}", volume.device).replace("{dir}", str(directory)) for a in template]
        try:
            r = _run(argv)
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"{driver}: {exc}")
            continue
        if r.returncode == 0:
            volume.status, volume.driver, volume.path = "mounted", driver, str(directory)
            log(f"{volume.disk} partition {part.number}: {volume.fstype} mounted on {directory} ({driver})")
            return
        errors.append(f"{driver}: {(r.stderr or r.stdout).strip() or f'exit {r.returncode}'}")
    volume.status, volume.reason = "failed", "; ".join(errors)
    log(f"{volume.disk} partition {part.number}: {volume.fstype} could not be mounted: {volume.reason}")
    _detach_loop(volume.device)
    volume.device = ""
    with contextlib.suppress(OSError):
        directory.rmdir()


# ---- FUSE block files --------------------------------------------------------------------------


def start_nbdfuse(uri: str, fuse_dir: Path, log_file: Any, timeout: float = 30) -> subprocess.Popen[bytes]:
    """Run nbdfuse (read-only) so fuse_dir/disk is the export as a file; returns once it is there."""
    fuse_dir.mkdir(parents=True, exist_ok=True)
    pidfile = fuse_dir.with_name(fuse_dir.name + ".pid")
    pidfile.unlink(missing_ok=True)
    proc = subprocess.Popen(
        ["nbdfuse", "-r", "-P", str(pidfile), str(fuse_dir / "disk"), uri],
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=log_file,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while not pidfile.exists():
        if proc.poll() is not None:
            raise OSError(f"nbdfuse exited with code {proc.returncode} before the export was ready")
        if time.monotonic() > deadline:
            proc.kill()
            raise OSError("nbdfuse did not become ready in time")
        time.sleep(0.02)
    return proc


# ---- what is mounted -------------------------------------------------------------------------


def _unescape(field_: str) -> str:
    return field_.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


@dataclass
class MountEntry:
    mountpoint: str
    fstype: str
    source: str


def mounts() -> list[MountEntry]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        parts, rest = left.split(), right.split()
        if len(parts) >= 5 and len(rest) >= 2:
            found.append(MountEntry(_unescape(parts[4]), rest[0], _unescape(rest[1])))
    return found


def _under(path: str, root: Path) -> bool:
    r = str(root).rstrip("/")
    return path == r or path.startswith(r + "/")


def loops_backed_by(roots: list[Path]) -> list[str]:
    """Loop devices whose backing file lies under one of roots (or is one of them)."""
    found = []
    for sysdir in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (sysdir / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        backing = backing.removesuffix(" (deleted)")
        if any(_under(backing, root) for root in roots):
            found.append(f"/dev/{sysdir.name}")
    return found


@dataclass
class Cleanup:
    unmounted: list[str] = field(default_factory=list)
    detached: list[str] = field(default_factory=list)
    fuse_unmounted: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _umount(path: str, fuse: bool) -> str:
    """'' on success, else the error; falls back to a lazy unmount so nothing stays in the way."""
    first = _run(["fusermount3", "-u", path] if fuse else ["umount", path])
    if first.returncode == 0:
        return ""
    lazy = _run(["umount", "-l", path])
    if lazy.returncode == 0:
        return ""
    return (first.stderr or lazy.stderr).strip() or "umount failed"


def cleanup(mount_roots: list[Path], fuse_roots: list[Path], log: Log) -> Cleanup:
    """umount -> loop detach -> FUSE unmount, for everything under the given directories."""
    done = Cleanup()

    def in_fuse(path: str) -> bool:
        return any(_under(path, r) for r in fuse_roots)

    # 1. file systems mounted under the mount directories, or from our loop devices, deepest first
    loops = set(loops_backed_by(fuse_roots))
    targets = [m.mountpoint for m in mounts() if any(_under(m.mountpoint, r) for r in mount_roots) or m.source in loops]
    for path in sorted((p for p in targets if not in_fuse(p)), key=lambda p: p.count("/"), reverse=True):
        _record(done.unmounted, done.problems, path, _umount(path, fuse=False), "umount")
    # 2. loop devices over the FUSE files
    for device in loops_backed_by(fuse_roots):
        r = _run(["losetup", "--detach", device])
        _record(done.detached, done.problems, device, "" if r.returncode == 0 else r.stderr.strip(), "losetup -d")
    # 3. the FUSE block files themselves (their nbdfuse processes exit with them)
    fuse_mounts = [m.mountpoint for m in mounts() if in_fuse(m.mountpoint)]
    for path in sorted(fuse_mounts, key=lambda p: p.count("/"), reverse=True):
        _record(done.fuse_unmounted, done.problems, path, _umount(path, fuse=True), "fusermount3 -u")
    for path in done.unmounted + done.detached + done.fuse_unmounted:
        log(f"released {path}")
    for problem in done.problems:
        log(f"cleanup problem: {problem}")
    return done


def _record(ok: list[str], problems: list[str], item: str, error: str, what: str) -> None:
    if error:
        problems.append(f"{what} {item}: {error}")
    else:
        ok.append(item)


def remove_volume_dirs(root: Path, disks: list[str]) -> None:
    """rmdir the (now empty) DIR/<disk> and DIR/<disk>-part<N> directories; mounted ones stay."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        name = entry.name
        if any(name == d or (name.startswith(f"{d}-part") and name[len(d) + 5 :].isdigit()) for d in disks):
            with contextlib.suppress(OSError):
                entry.rmdir()

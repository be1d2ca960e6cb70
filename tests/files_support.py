"""File-recovery test support: guest disk images with known files, and host-state probes.

`build_disks()` makes (and caches) two raw disks:

- disk0, GPT: ext4, XFS, NTFS, FAT32 and a partition of random bytes (no file system), each file
  system holding the same known files: a file larger than a chunk (64 KiB), a sparse file, an
  empty file, non-ASCII and 200-character names, nested directories, and `changed.txt`, whose
  content differs between version 1 and 2 of the disk (on ext4 and FAT). The ext4 one also holds
  hostile links: `evil -> /etc/shadow`, `etclink -> /etc`, `up -> ../../..`.
- disk1, MBR: a FAT16 primary partition and an ext4 logical partition inside an extended one.

Images are built without mounting where tools allow (mke2fs -d, mkfs.fat + mcopy); XFS and NTFS
are filled through a loop mount and ntfs-3g (root). XFS needs TEST_DIR set to go below 300 MB.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from helpers import CACHE_DIR

MiB = 1 << 20
LONG_NAME = "L" * 200 + ".txt"
UNICODE_NAME = "Grüße \u2013 ünïcödé \u2713.txt"  # en dash, check mark
SHADOW_LINK = "evil"

# disk0 partitions: (number, fs, size MiB, GPT type code, name)
DISK0 = [
    (1, "ext4", 24, "8300", "root"),
    (2, "xfs", 32, "8300", "data"),
    (3, "ntfs", 16, "0700", "win"),
    (4, "vfat", 40, "ef00", "esp"),
    (5, "", 4, "8300", "junk"),
]
DISK1_FAT_MIB, DISK1_EXT_MIB = 16, 16


def _run(*argv: str, env: dict[str, str] | None = None) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, env={**os.environ, **(env or {})})


def file_set(fs: str, version: int) -> dict[str, bytes | None]:
    """Relative path -> content (None = the sparse file, written with holes)."""
    rnd = random.Random(f"{fs}-big")
    files: dict[str, bytes | None] = {
        "small.txt": f"hello from {fs}\n".encode(),
        "big.bin": rnd.randbytes(MiB + 12345),
        "sparse.bin": None,
        "empty": b"",
        UNICODE_NAME: "ünïcödé content\n".encode(),
        LONG_NAME: b"a long name\n",
        "Some Directory/Nested dir/deep file.txt": f"deep in {fs}\n".encode(),
        "changed.txt": f"{fs} version {version}\n".encode() if fs in ("ext4", "vfat") else b"never changes\n",
    }
    if fs == "ext4":
        files["a/inside.txt"] = b"inside a\n"
    return files


SPARSE_SIZE = 8 * MiB
SPARSE_AT = 3 * MiB + 5
SPARSE_DATA = b"island in a sea of zeros"


def _sparse_content() -> bytes:
    buf = bytearray(SPARSE_SIZE)
    buf[SPARSE_AT : SPARSE_AT + len(SPARSE_DATA)] = SPARSE_DATA
    return bytes(buf)


def expected_digests(fs: str, version: int) -> dict[str, str]:
    out = {}
    for rel, content in file_set(fs, version).items():
        data = _sparse_content() if content is None else content
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def stage_tree(root: Path, fs: str, version: int) -> Path:
    root.mkdir(parents=True)
    for rel, content in file_set(fs, version).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            with open(path, "wb") as f:
                f.truncate(SPARSE_SIZE)
                f.seek(SPARSE_AT)
                f.write(SPARSE_DATA)
        else:
            path.write_bytes(content)
    if fs == "ext4":
        os.symlink("/etc/shadow", root / SHADOW_LINK)
        os.symlink("/etc", root / "etclink")
        os.symlink("../../..", root / "up")
    return root


def _fs_image(work: Path, fs: str, mib: int, version: int, tag: str = "d0") -> Path:
    image = work / f"{tag}-{fs}-v{version}.img"
    tree = stage_tree(work / f"tree-{tag}-{fs}-v{version}", fs, version) if fs else None
    with open(image, "wb") as f:
        f.truncate(mib * MiB)
    if fs == "ext4":
        _run("mke2fs", "-q", "-F", "-t", "ext4", "-L", "root", "-d", str(tree), str(image))
    elif fs == "vfat":
        _run("mkfs.fat", "-F", "32" if mib >= 33 else "16", "-n", "ESP", str(image))
        _run(
            "mcopy",
            "-s",
            "-i",
            str(image),
            *[str(p) for p in sorted(tree.iterdir())],
            "::/",
            env={"MTOOLS_SKIP_CHECK": "1"},
        )
    elif fs == "xfs":
        small_ok = {"TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}  # allow < 300 MB
        _run("mkfs.xfs", "-q", "-f", "-L", "data", str(image), env=small_ok)
        _fill_mounted(image, tree, ["mount", "-o", "loop", str(image)], work)
    elif fs == "ntfs":
        _run("mkntfs", "-F", "-Q", "-q", "-L", "win", str(image))
        _fill_mounted(image, tree, ["ntfs-3g", str(image)], work)
    else:
        with open(image, "r+b") as f:
            f.write(random.Random("junk").randbytes(mib * MiB))
    return image


def _fill_mounted(image: Path, tree: Path | None, mount_argv: list[str], work: Path) -> None:
    assert tree is not None
    target = Path(tempfile.mkdtemp(dir=work))
    _run(*mount_argv, str(target))
    try:
        _run("cp", "-a", "--sparse=always", f"{tree}/.", str(target))
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(target)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
    target.rmdir()


def _copy_into(disk: Path, image: Path, offset: int) -> None:
    _run(
        "dd",
        f"if={image}",
        f"of={disk}",
        "bs=1M",
        f"seek={offset}",
        "oflag=seek_bytes",
        "conv=notrunc,sparse",
        "status=none",
    )


def _gpt_disk(path: Path, parts: list[tuple[Path, int, str, str]]) -> list[int]:
    total = 1 + sum(p[1] for p in parts) + 1
    with open(path, "wb") as f:
        f.truncate(total * MiB)
    argv = ["sgdisk", "-Z"]
    start = 2048
    offsets = []
    for n, (_img, mib, code, name) in enumerate(parts, 1):
        end = start + mib * 2048 - 1
        argv += ["-n", f"{n}:{start}:{end}", "-t", f"{n}:{code}", "-c", f"{n}:{name}"]
        offsets.append(start * 512)
        start = end + 1
    _run(*argv, str(path))
    for (img, _mib, _code, _name), offset in zip(parts, offsets, strict=True):
        _copy_into(path, img, offset)
    return offsets


def _mbr_entry(ptype: int, lba: int, count: int) -> bytes:
    return struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", lba, count)


def _mbr_disk(path: Path, fat: Path, ext: Path) -> None:
    """p1 FAT16 (type 0x0e), p2 extended (0x05) holding p5 ext4 (0x83) behind one EBR."""
    fat_lba, fat_n = 2048, DISK1_FAT_MIB * 2048
    ext_lba = fat_lba + fat_n
    ebr_gap = 2048
    log_n = DISK1_EXT_MIB * 2048
    ext_n = ebr_gap + log_n
    total = (ext_lba + ext_n + 2048) * 512
    with open(path, "wb") as f:
        f.truncate(total)
        mbr = bytearray(512)
        mbr[446:462] = _mbr_entry(0x0E, fat_lba, fat_n)
        mbr[462:478] = _mbr_entry(0x05, ext_lba, ext_n)
        mbr[510:512] = b"\x55\xaa"
        f.seek(0)
        f.write(mbr)
        ebr = bytearray(512)
        ebr[446:462] = _mbr_entry(0x83, ebr_gap, log_n)  # relative to this EBR
        ebr[510:512] = b"\x55\xaa"
        f.seek(ext_lba * 512)
        f.write(ebr)
    _copy_into(path, fat, fat_lba * 512)
    _copy_into(path, ext, (ext_lba + ebr_gap) * 512)


def _builder_key() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def build_disks() -> dict[str, Any]:
    """{'disk0_v1', 'disk0_v2', 'disk1': Path} cached in CACHE_DIR (build under a lock)."""
    key = f"files-{_builder_key()}"
    final = CACHE_DIR / key
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "done").exists():
            shutil.rmtree(final, ignore_errors=True)
            work = Path(tempfile.mkdtemp(dir=CACHE_DIR, prefix=f"{key}.tmp-"))
            try:
                _build(work)
                (work / "done").write_text("ok")
                os.rename(work, final)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
    return {"disk0_v1": final / "disk0-v1.raw", "disk0_v2": final / "disk0-v2.raw", "disk1": final / "disk1.raw"}


def _build(work: Path) -> None:
    images = {}
    for _n, fs, mib, _code, _name in DISK0:
        images[fs] = _fs_image(work, fs, mib, 1)
    for version in (1, 2):
        parts = []
        for _n, fs, mib, code, name in DISK0:
            img = _fs_image(work, fs, mib, 2) if version == 2 and fs in ("ext4", "vfat") else images[fs]
            parts.append((img, mib, code, name))
        _gpt_disk(work / f"disk0-v{version}.raw", parts)
    fat, ext = _fs_image(work, "vfat", DISK1_FAT_MIB, 1, "d1"), _fs_image(work, "ext4", DISK1_EXT_MIB, 1, "d1")
    _mbr_disk(work / "disk1.raw", fat, ext)
    for leftover in work.iterdir():
        if leftover.is_dir():
            shutil.rmtree(leftover)
        elif leftover.suffix == ".img":
            leftover.unlink()
    (work / "layout.json").write_text(json.dumps({"disk0": DISK0}))


# ---------------------------------------------------------------------------------------------
# What a session leaves on the host
# ---------------------------------------------------------------------------------------------


def _mountinfo() -> list[tuple[str, str, str, str]]:
    """(mount point, per-mount options, fs type, source) of every mount."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        out.append((f[4].replace("\\040", " "), f[5], r[0], r[1]))
    return out


def mounts_under(root: Path) -> list[tuple[str, str, str, str]]:
    r = str(root)
    return [m for m in _mountinfo() if m[0] == r or m[0].startswith(r + "/")]


def loops_under(root: Path) -> list[str]:
    found = []
    for sysdir in Path("/sys/block").glob("loop*"):
        try:
            backing = (sysdir / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(str(root)):
            found.append(sysdir.name)
    return found


def processes_mentioning(*needles: str) -> list[str]:
    """Live (non-zombie) processes whose command line contains any needle."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X") and any(n in cmd for n in needles):
            found.append(f"{proc.name}: {cmd[:160]}")
    return found


def listening(unix_path: str | None, tcp_address: str | None) -> list[str]:
    found = []
    if unix_path and unix_path in Path("/proc/net/unix").read_text():
        found.append(f"unix socket {unix_path}")
    if tcp_address:
        port = int(tcp_address.rsplit(":", 1)[1])
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A = LISTEN
                    found.append(f"TCP listener on port {port}")
    return found


def session_leftovers(home: Path, session: dict[str, Any]) -> list[str]:
    """Everything a session could leave behind: mounts, loops, FUSE/export processes, sockets."""
    run_dir = home / "run" / "files" / session["id"]
    left = [f"mount {m[0]}" for root in (Path(session["mountpoint"] or run_dir), run_dir) for m in mounts_under(root)]
    left += [f"loop {name}" for name in loops_under(run_dir)]
    needles = [str(run_dir), session["id"]] + ([str(session["mountpoint"])] if session["mountpoint"] else [])
    left += processes_mentioning(*needles)
    left += listening(session["export"]["unixSocket"], session["export"]["tlsAddress"])
    if run_dir.exists():
        left.append(f"run directory {run_dir}")
    return left


def wait_until_clean(home: Path, session: dict[str, Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    left = session_leftovers(home, session)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = session_leftovers(home, session)
    assert not left, f"session {session['id']} left: {left}"


def digests_under(root: Path, case_insensitive: bool = False) -> dict[str, str]:
    """sha256 of every regular file under root (symlinks not followed), by relative path."""
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            rel = path.relative_to(root).as_posix()
            out[rel.lower() if case_insensitive else rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------
# A protected VM with two recovery points
# ---------------------------------------------------------------------------------------------


class TwoPoints:
    """vm1 (disk0 GPT, disk1 MBR) in vault v1: point 1 has disk0 version 1, point 2 version 2."""

    def __init__(self, work: Path) -> None:
        from helpers import HostKeyCli, copy_image

        disks = build_disks()
        self.work = work
        self.disk0 = copy_image(disks["disk0_v1"], work / "disk0.raw")
        self.disk1 = copy_image(disks["disk1"], work / "disk1.raw")
        self.vault_dir = work / "vault"
        self.cli = HostKeyCli(home=work / "home")  # not about passphrases: skip their check (scrypt)
        self.home = self.cli.home
        self.cli.vault_create("v1", self.vault_dir)
        self.cli.ok("vm", "add", "vm1", "--disk", str(self.disk0), "--disk", str(self.disk1))
        self.cli.ok("protection", "enable", "vm1", "--vault", "v1")
        self.points = [self._backup()]
        copy_image(disks["disk0_v2"], self.disk0)
        self.points.append(self._backup())
        self.sources = {"disk0": [disks["disk0_v1"], disks["disk0_v2"]], "disk1": [disks["disk1"]] * 2}

    def _backup(self) -> str:
        from helpers import rp_id

        self.cli.ok("backup", "now", "vm1")
        return rp_id(self.cli.points("vm1")[-1])

    def mount(self, point: int, *extra: str) -> dict[str, Any]:
        data: dict[str, Any] = self.cli.ok("files", "mount", "vm1", "--rp", self.points[point], *extra).json()
        return data

    def unmount_all(self) -> None:
        self.cli.run("files", "unmount", "vm1")


FS_OF = {"ext4": "ext4", "xfs": "xfs", "ntfs": "ntfs", "vfat": "vfat"}


def check_volume_files(path: Path, fs: str, version: int) -> None:
    """Every known file of the volume reads back with its hash (FAT names compared without case)."""
    fat = fs == "vfat"
    expected = {(k.lower() if fat else k): v for k, v in expected_digests(fs, version).items()}
    actual = digests_under(path, case_insensitive=fat)
    wrong = {k: (v, actual.get(k)) for k, v in expected.items() if actual.get(k) != v}
    assert not wrong, f"{fs} volume {path}: files differ or are missing: {sorted(wrong)}"
    extra = set(actual) - set(expected) - ({"esp"} if fat else set())  # fusefat shows the FAT label as a file
    assert not extra, f"{fs} volume {path}: unexpected files {sorted(extra)}"

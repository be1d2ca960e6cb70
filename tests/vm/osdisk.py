"""A test guest that boots from an ext4 OS disk (vmv.root=/dev/vda), for restore tests.

The initramfs of vm/guest.py with an /init that mounts the disk named by vmv.root= and switch_roots
to it; the OS disk holds the same tree as the initramfs. Built per test module into its workdir
(a few seconds, no root mounts). Booting from the disk proves a restored OS disk works: the
initramfs alone does not count.
"""

from __future__ import annotations

import gzip
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vm.guest import GuestImage, build_guest
from vm.machine import Disk

MiB = 1 << 20

# /init of an initramfs that switch_roots to the ext4 disk named by vmv.root= (tests/vm/guest.py's /init
# stays in RAM); the disk holds the same tree as the initramfs.
SWITCH_ROOT_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules.order); do /bin/busybox insmod /lib/modules/$m.ko; done
root=$(/bin/busybox sed -n 's/.*vmv.root=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
if [ -n "$root" ]; then
  i=0; while [ ! -b "$root" ] && [ $i -lt 50 ]; do /bin/busybox sleep 0.1; i=$((i+1)); done
  /bin/busybox mkdir -p /newroot
  if /bin/busybox mount -t ext4 "$root" /newroot; then
    /bin/busybox mount --move /dev /newroot/dev
    /bin/busybox mount --move /proc /newroot/proc
    /bin/busybox mount --move /sys /newroot/sys
    exec /bin/busybox switch_root /newroot /sbin/init
  fi
fi
exec /sbin/init
"""


# ---- an OS disk built from the test guest's initramfs -------------------------------------------------


def _cpio_entries(data: bytes) -> Iterator[tuple[str, int, bytes, bytes]]:
    """(name, mode, header+name bytes, file data) of a newc archive, trailer included."""
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 110]
        assert header[:6] in (b"070701", b"070702"), "not a newc cpio archive"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110 : name_end - 1].decode()
        data_start = (name_end + 3) & ~3
        body = data[data_start : data_start + size]
        yield name, mode, data[pos:data_start], body
        pos = (data_start + size + 3) & ~3
        if name == "TRAILER!!!":
            return


def _newc(name: str, mode: int, body: bytes) -> bytes:
    fields = [0, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(f"{v:08x}".encode() for v in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + body + b"\0" * (-len(body) % 4)


@dataclass(frozen=True)
class OsImage:
    image: GuestImage  # the test kernel with an initramfs that switch_roots
    root: Path  # raw ext4 image of the OS disk (copied per guest)


def os_image(workdir: Path) -> OsImage:
    base = build_guest()
    archive = gzip.decompress(base.initrd.read_bytes())
    tree = workdir / "osroot"
    out = bytearray()
    for name, mode, head, body in _cpio_entries(archive):
        if name == "init":
            out += _newc("init", 0o100755, SWITCH_ROOT_INIT.encode())
            body = SWITCH_ROOT_INIT.encode()
        else:
            out += head + body + b"\0" * (-len(body) % 4)
        if name in (".", "TRAILER!!!"):
            continue
        path = tree / name
        kind = mode & 0o170000
        if kind == 0o040000:
            path.mkdir(parents=True, exist_ok=True)
        elif kind == 0o120000:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(body.decode())
        elif kind == 0o100000:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
            path.chmod(mode & 0o7777)
    initrd = workdir / "initrd-switchroot.img"
    initrd.write_bytes(gzip.compress(bytes(out), compresslevel=1))
    raw = workdir / "osroot.raw"
    subprocess.run(["truncate", "-s", str(96 * MiB), str(raw)], check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    "-L", "os0", "-d", str(tree), str(raw)], check=True)  # fmt: skip
    return OsImage(GuestImage(base.vmlinux, initrd, base.key + "-switchroot"), raw)


def os_disk(workdir: Path, image: OsImage, name: str = "os0") -> Disk:
    out = workdir / f"{name}.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image.root), str(out)], check=True)
    return Disk(name, out, "qcow2")


def boot_args() -> list[str]:
    return ["-append", "console=ttyS0 quiet panic=-1 vmv.root=/dev/vda"]

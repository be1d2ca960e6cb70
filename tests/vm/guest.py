"""Build the tiny test guest from Debian packages (see docs/testing.md, "Test guests").

kernel (linux-image-*-amd64) + busybox-static + qemu-guest-agent in a gzip'd initramfs, plus the
uncompressed vmlinux (QEMU boots it through PVH, skipping the in-guest decompressor under TCG).
No root mounts, no chroot: `apt-get download`, `dpkg -x`, Python. Built once into a cache keyed on
the package versions (and this file), never committed. Build as root: about 10 s.

Inside the guest: /init loads the virtio/ext4 modules and runs busybox init; rc.sysinit links
/dev/virtio-ports/* and mounts every virtio disk with an ext4 file system at /mnt/<serial>
(noatime); qemu-ga runs on org.qemu.guest_agent.0 when the VM has that port.
"""

from __future__ import annotations

import fcntl
import hashlib
import lzma
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("VMVAULT_GUEST_CACHE", "/var/tmp/vmvault-guest-cache"))
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "virtio_rng", "crc32c_generic", "ext4")
# Host libraries qemu-ga needs are copied from the host: same Debian release as the guest packages.

INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules.order); do /bin/busybox insmod /lib/modules/$m.ko; done
exec /sbin/init
"""

INITTAB = """::sysinit:/etc/rc.sysinit
::respawn:/sbin/start-qga
::shutdown:/bin/sync
"""

RC_SYSINIT = """#!/bin/sh
mkdir -p /dev/virtio-ports /tmp /run /var/log /mnt
ln -sf /run /var/run
i=0
while [ -d /sys/class/virtio-ports ] && [ -z "$(ls /sys/class/virtio-ports)" ] && [ $i -lt 20 ]; do
  sleep 0.1; i=$((i+1))
done
for p in /sys/class/virtio-ports/vport*; do
  [ -e "$p/name" ] && ln -sf ../${p##*/} /dev/virtio-ports/$(cat $p/name)
done
for b in /sys/block/vd*; do
  [ -e "$b" ] || continue
  d=${b##*/}; s=$(cat $b/serial 2>/dev/null); [ -n "$s" ] || s=$d
  mkdir -p /mnt/$s
  mount -t ext4 -o noatime /dev/$d /mnt/$s 2>/dev/null || rmdir /mnt/$s
done
echo "vmv: sysinit done $(cut -d' ' -f1 /proc/uptime)" > /dev/console
"""

START_QGA = """#!/bin/sh
# No agent port (a VM started without it): idle instead of respawning in a loop.
[ -e /dev/virtio-ports/org.qemu.guest_agent.0 ] || exec sleep 100000
exec /usr/sbin/qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \\
  -F/etc/qemu/fsfreeze-hook -l /var/log/qemu-ga.log
"""

SHUTDOWN = """#!/bin/sh
# qemu-ga's guest-shutdown execs `shutdown -h -P +0 ...`; busybox has no shutdown applet.
case " $* " in *" -r "*) exec reboot -f ;; *) exec poweroff -f ;; esac
"""


@dataclass(frozen=True)
class GuestImage:
    vmlinux: Path
    initrd: Path
    key: str


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _kernel_package() -> str:
    try:
        out = _run(["apt-cache", "depends", "linux-image-amd64"])
    except RuntimeError:
        out = ""
    found = re.findall(r"Depends: (linux-image-[0-9][^\s]*)", out)
    if not found:  # a fresh machine: no package lists yet
        _run(["apt-get", "update", "-q"])
        found = re.findall(r"Depends: (linux-image-[0-9][^\s]*)", _run(["apt-cache", "depends", "linux-image-amd64"]))
    if not found:
        raise RuntimeError("apt-cache knows no linux-image-*-amd64 package (is this Debian with its mirrors?)")
    return found[0]


def _candidate(package: str) -> str:
    out = _run(["apt-cache", "policy", package])
    match = re.search(r"Candidate: (\S+)", out)
    if not match or match.group(1) == "(none)":
        raise RuntimeError(f"no installable version of {package} (apt-cache policy {package})")
    return match.group(1)


def build_guest() -> GuestImage:
    """The cached guest image, built first if needed (safe against concurrent builders)."""
    packages = [_kernel_package(), "busybox-static", "qemu-guest-agent"]
    recipe = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]
    key_src = " ".join(f"{p}={_candidate(p)}" for p in packages) + f" recipe={recipe}"
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    out = CACHE / key
    image = GuestImage(out / "vmlinux", out / "initrd.img", key)
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image.vmlinux.exists() and image.initrd.exists():
            return image
        work = CACHE / f"build-{key}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            _build(work, packages)
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            (out / "packages.txt").write_text(key_src + "\n")
            os.replace(work / "vmlinux", image.vmlinux)
            os.replace(work / "initrd.img", image.initrd)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return image


def _build(work: Path, packages: list[str]) -> None:
    debs = work / "debs"
    debs.mkdir()
    _run(["apt-get", "download", "-q", *packages], cwd=debs)
    staging = work / "staging"
    staging.mkdir()
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(staging)])
    root = work / "root"
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc/qemu", "proc", "sys", "dev", "run", "tmp", "mnt",
              "var/log", "lib/modules"):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    busybox = staging / "bin" / "busybox"
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in _run([str(busybox), "--list-full"]).split():
        target = root / applet
        if not target.exists() and not target.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to("/bin/busybox")
    _install_agent(staging, root)
    _install_modules(staging, root)
    for path, text in (("init", INIT), ("etc/inittab", INITTAB), ("etc/rc.sysinit", RC_SYSINIT),
                       ("sbin/start-qga", START_QGA), ("sbin/shutdown", SHUTDOWN)):  # fmt: skip
        target = root / path
        target.unlink(missing_ok=True)
        target.write_text(text)
        target.chmod(0o755)
    with open(work / "initrd.img", "wb") as initrd:
        files = _run(["find", "."], cwd=root)
        cpio = subprocess.run([str(busybox), "cpio", "-o", "-H", "newc"], cwd=root, input=files.encode(),
                              capture_output=True, check=True)  # fmt: skip
        initrd.write(subprocess.run(["gzip", "-1"], input=cpio.stdout, capture_output=True, check=True).stdout)
    (work / "vmlinux").write_bytes(_vmlinux(next((staging / "boot").glob("vmlinuz-*"))))


def _install_agent(staging: Path, root: Path) -> None:
    qga = staging / "usr" / "sbin" / "qemu-ga"
    shutil.copy2(qga, root / "usr" / "sbin" / "qemu-ga")
    shutil.copy2(staging / "etc" / "qemu" / "fsfreeze-hook", root / "etc" / "qemu" / "fsfreeze-hook")
    (root / "etc" / "qemu" / "fsfreeze-hook.d").mkdir(exist_ok=True)
    for line in _run(["ldd", str(qga)]).splitlines():
        match = re.search(r"(/\S+) \(0x", line)
        if not match:
            continue
        lib = Path(match.group(1))
        dest = root / lib.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), dest)


def _modinfo(ko: bytes, key: str) -> list[str]:
    return [m.decode() for m in re.findall(rb"(?:^|\0)" + key.encode() + rb"=([^\0]*)", ko)]


def _install_modules(staging: Path, root: Path) -> None:
    found: dict[str, Path] = {}
    for ko in (staging / "lib" / "modules").rglob("*.ko*"):
        found[ko.name.split(".ko")[0].replace("-", "_")] = ko
    order: list[str] = []

    def add(name: str) -> None:
        if name in order or not name:
            return
        data = _module_bytes(found[name])
        for dep in ",".join(_modinfo(data, "depends")).split(","):
            add(dep.strip().replace("-", "_"))
        order.append(name)
        (root / "lib" / "modules" / f"{name}.ko").write_bytes(data)

    for wanted in WANTED_MODULES:
        if wanted in found:
            add(wanted)
    (root / "etc" / "modules.order").write_text("\n".join(order) + "\n")


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    return data


def _vmlinux(bzimage: Path) -> bytes:
    """The ELF kernel inside a bzImage's XZ payload (QEMU boots it via its PVH note)."""
    data = bzimage.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise RuntimeError(f"{bzimage} has no XZ payload")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elf = decompressor.decompress(data[start:])
    if not elf.startswith(b"\x7fELF"):
        raise RuntimeError(f"the payload of {bzimage} is not an ELF kernel")
    return elf

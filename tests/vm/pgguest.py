"""A Debian guest running PostgreSQL 15, for app-consistency tests.

debootstrap --variant=minbase with postgresql-15 and qemu-guest-agent into an ext4 OS disk, booted
with the tiny guest's kernel and the switch_root initramfs of vm/osdisk.py (vmv.root=/dev/vda). No
systemd: /sbin/init below mounts what PostgreSQL needs, starts qemu-ga (with Debian's fsfreeze hook,
which runs /etc/qemu/fsfreeze-hook.d/*) and the `main` cluster, and idles as PID 1.

The image is built once into /var/tmp/vmvault-pg-guest-cache/<key>, key = hash of this file and the
kernel/initramfs key; built under a file lock into a scratch directory and renamed into place.
A first build takes about a minute or two (network); later runs reuse it.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vm.guest import build_guest
from vm.machine import Disk

CACHE = Path(os.environ.get("VMVAULT_PG_GUEST_CACHE", "/var/tmp/vmvault-pg-guest-cache"))
SUITE = "bookworm"
PACKAGES = ("postgresql-15", "qemu-guest-agent", "procps", "util-linux")
DISK_SIZE = "1536M"
PGDATA = "/var/lib/postgresql/15/main"
PGCONF = "/etc/postgresql/15/main/postgresql.conf"

INIT = """#!/bin/sh
# PID 1 of the PostgreSQL test guest (tests/vm/pgguest.py): no systemd, no udev.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -o remount,rw /
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/virtio-ports
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/postgresql && chown postgres:postgres /run/postgresql && chmod 2775 /run/postgresql
hostname pgguest
i=0
while [ -z "$(ls /sys/class/virtio-ports 2>/dev/null)" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
for p in /sys/class/virtio-ports/vport*; do
  [ -e "$p/name" ] && ln -sf ../${p##*/} /dev/virtio-ports/$(cat $p/name)
done
/usr/sbin/qemu-ga -d -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \\
  -F/etc/qemu/fsfreeze-hook -l /var/log/qemu-ga.log
# A restored disk carries the running server's postmaster.pid; its PID may belong to another process
# in this boot, and PostgreSQL then refuses to start ("Is another postmaster running?"). Nothing runs
# PostgreSQL yet: drop a lock whose PID is not a postgres process (Debian's pg_ctlcluster does the same).
pid=$(head -n 1 @PGDATA@/postmaster.pid 2>/dev/null)
if [ -n "$pid" ] && [ "$(cat /proc/$pid/comm 2>/dev/null)" != postgres ]; then
  rm -f @PGDATA@/postmaster.pid && echo "vmv: removed stale postmaster.pid (PID $pid)" > /dev/console
fi
su postgres -c "/usr/lib/postgresql/15/bin/pg_ctl -D @PGDATA@ -o '-c config_file=@PGCONF@' \\
  -l /var/log/postgresql/pg.log -w -t 600 start" \\
  && echo "vmv: postgres up $(cut -d' ' -f1 /proc/uptime)" > /dev/console \\
  || echo "vmv: postgres failed" > /dev/console
echo "vmv: sysinit done $(cut -d' ' -f1 /proc/uptime)" > /dev/console
while :; do sleep 3600; done
""".replace("@PGDATA@", PGDATA).replace("@PGCONF@", PGCONF)

SHUTDOWN = """#!/bin/sh
# qemu-ga's guest-shutdown runs `shutdown -h -P +0 ...`: stop PostgreSQL cleanly, then power off.
su postgres -c "/usr/lib/postgresql/15/bin/pg_ctl -D @PGDATA@ -m fast -w stop" >/dev/null 2>&1
sync
echo o > /proc/sysrq-trigger
""".replace("@PGDATA@", PGDATA)

# The test's freeze hook: CHECKPOINT, record what is committed, then sleep as long as
# /etc/vmv-hook-sleep says (a big database's checkpoint takes that long).
APP_HOOK = """#!/bin/sh
case "$1" in
  freeze)
    su postgres -c "psql -Atq -c CHECKPOINT" || exit 1
    su postgres -c "psql -Atq -d app -c 'select count(*), coalesce(max(id), 0) from t'" > /var/lib/vmv-before-freeze.tmp
    mv /var/lib/vmv-before-freeze.tmp /var/lib/vmv-before-freeze
    echo "freeze $(date +%s.%N)" >> /var/log/vmv-hook.log
    sleep "$(cat /etc/vmv-hook-sleep 2>/dev/null || echo 0)"
    echo "freeze-done $(date +%s.%N)" >> /var/log/vmv-hook.log ;;
  thaw)
    echo "thaw $(date +%s.%N)" >> /var/log/vmv-hook.log ;;
esac
exit 0
"""

PG_SETTINGS = """
# tests/vm/pgguest.py: small memory, unix socket only
listen_addresses = ''
shared_buffers = 32MB
max_connections = 20
"""


@dataclass(frozen=True)
class PgImage:
    vmlinux: Path
    initrd: Path
    root: Path  # qcow2 OS disk (copy it per test)
    key: str
    build_seconds: float  # 0 when taken from the cache


def _mirror() -> str:
    for source in Path("/etc/apt/sources.list.d").glob("*.sources"):
        for line in source.read_text().splitlines():
            if line.startswith("URIs:") and "debian" in line and "security" not in line:
                return line.split()[1]
    return "http://deb.debian.org/debian"


def _recipe_key(base_key: str) -> str:
    """A hash of what goes into the image: edits elsewhere in this file do not rebuild it."""
    parts = [
        SUITE,
        *PACKAGES,
        DISK_SIZE,
        INIT,
        SHUTDOWN,
        APP_HOOK,
        PG_SETTINGS,
        inspect.getsource(_build_root),
        base_key,
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build_pg_guest() -> PgImage:
    """The cached PostgreSQL guest, built first if needed (safe against concurrent builders)."""
    from vm.osdisk import os_image

    base = build_guest()
    recipe = _recipe_key(base.key)
    out = CACHE / recipe
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "root.qcow2").exists():
            started = time.monotonic()
            work = Path(tempfile.mkdtemp(prefix=f"build-{recipe}-", dir=CACHE))
            try:
                switch_root = os_image(work)  # the tiny guest's initramfs, with an /init that switch_roots
                shutil.copy2(switch_root.image.initrd, work / "initrd.img")
                shutil.copy2(base.vmlinux, work / "vmlinux")
                _build_root(work)
                (work / "build-seconds").write_text(f"{time.monotonic() - started:.1f}\n")
                for leftover in ("osroot", "osroot.raw", "initrd-switchroot.img", "root", "root.raw"):
                    path = work / leftover
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                work.chmod(0o755)  # mkdtemp's 0700: QEMU may run as another user (libvirt-qemu)
                shutil.rmtree(out, ignore_errors=True)
                os.replace(work, out)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            return PgImage(out / "vmlinux", out / "initrd.img", out / "root.qcow2", recipe,
                           time.monotonic() - started)  # fmt: skip
    return PgImage(out / "vmlinux", out / "initrd.img", out / "root.qcow2", recipe, 0.0)


def _build_root(work: Path) -> None:
    root = work / "root"
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root),
                    _mirror()], check=True, capture_output=True)  # fmt: skip
    files = {
        "sbin/init": (INIT, 0o755),
        "sbin/shutdown": (SHUTDOWN, 0o755),
        "etc/qemu/fsfreeze-hook.d/50-postgres": (APP_HOOK, 0o755),
        "etc/fstab": ("/dev/vda / ext4 rw,noatime 0 1\n", 0o644),
    }
    for rel, (text, mode) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.write_text(text)
        path.chmod(mode)
    with open(root / PGCONF.lstrip("/"), "a") as conf:
        conf.write(PG_SETTINGS)
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    for lists in (root / "var/lib/apt/lists").glob("*_Packages"):
        lists.unlink()
    raw = work / "root.raw"
    subprocess.run(["truncate", "-s", DISK_SIZE, str(raw)], check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    "-L", "pgroot", "-d", str(root), str(raw)], check=True, capture_output=True)  # fmt: skip
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(work / "root.qcow2")],
                   check=True)  # fmt: skip


def pg_disk(workdir: Path, image: PgImage, name: str = "os0") -> Disk:
    """A private copy of the cached OS disk."""
    out = workdir / f"{name}.qcow2"
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(image.root), str(out)], check=True)
    return Disk(name, out, "qcow2")


if __name__ == "__main__":  # build (or find) the image: python -m vm.pgguest (from tests/)
    image = build_pg_guest()
    print(image)

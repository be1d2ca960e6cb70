"""`vmvault doctor`: checks the host (and its VMs and vaults) and says what to fix.

Each check yields a Check: pass, warn (works, but worse: e.g. crash-consistent backups) or fail
(a backup or restore would fail), with the fix for anything but pass. Nothing is changed on the
host, in a VM or in a vault (the writability probe creates and deletes one file).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

from sqlalchemy import select

from vmvault.catalog import repos
from vmvault.catalog.models import VaultRow, VmRow
from vmvault.connectors.registry import CONNECTORS
from vmvault.service.context import Context
from vmvault.service.views import JsonDict

PASS, WARN, FAIL = "pass", "warn", "fail"
TOOL_TIMEOUT_S = 20
MIN_QEMU = (7, 2)  # the release vmvault is tested on (fleecing with snapshot-access, bitmaps over NBD)
GiB = 1 << 30
_VERSION_RE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")
_TOOLS = (
    ("qemu-img", "qemu-utils", True),
    ("qemu-nbd", "qemu-utils", True),
    ("qemu-storage-daemon", "qemu-system-x86", True),
    ("qemu-system-x86_64", "qemu-system-x86", False),  # only for running QEMU VMs / instant restore
)


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str | None = None


def run_doctor(ctx: Context | None, vm: str | None = None, extra: list[Check] | None = None) -> JsonDict:
    """All checks (with vm: that VM's instead of every VM's); ok is False when any check failed.

    ctx None: the host's checks only (doctor --server runs on a host without the catalog);
    extra: checks made by the caller (the clock skew against the server).
    """
    checks: list[Check] = []
    vms: list[VmRow] = []
    vaults: list[VaultRow] = []
    if ctx is not None:
        with ctx.catalog.read() as s:
            vms = [repos.get_vm(s, vm)] if vm is not None else list(repos.list_vms(s))
            vaults = list(s.scalars(select(VaultRow)).all())
            for row in [*vms, *vaults]:
                s.expunge(row)
    for name, group in (("qemu", _tools), ("libnbd", _libnbd), ("fuse", _fuse), ("loop", _loop)):
        checks.extend(_guard(name, group))
    home = str(ctx.settings.home) if ctx is not None else None
    for kind in CONNECTORS:  # libvirt reachable with its backup API; space for QEMU's fleece overlays (with a home)
        checks.extend(_guard(kind, partial(_host, kind, home, vms)))
    for row in vms:
        checks.extend(_vm(row))
    for vault in vaults:
        checks.extend(_vault(vault))
    checks.extend(extra or [])
    failed = [c.name for c in checks if c.status == FAIL]
    return {"ok": not failed, "failed": failed, "checks": [asdict(c) for c in checks]}


def _guard(name: str, fn: Callable[[], Iterator[Check]]) -> list[Check]:
    """A check that crashes is reported as failed, not as a traceback that hides the others."""
    try:
        return list(fn())
    except Exception as exc:
        return [Check(name, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}", "report it")]


def version_of(text: str) -> tuple[int, ...] | None:
    match = _VERSION_RE.search(text)
    return tuple(int(g) for g in match.groups() if g is not None) if match else None


# ---- host tools -----------------------------------------------------------------------------------


def _tools() -> Iterator[Check]:
    for tool, package, required in _TOOLS:
        path = shutil.which(tool)
        if path is None:
            status = FAIL if required else WARN
            yield Check(tool, status, f"{tool} is not installed", f"apt-get install {package}")
            continue
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
        line = (proc.stdout or proc.stderr).splitlines()[0] if (proc.stdout or proc.stderr) else ""
        found = version_of(line)
        if found is None:
            yield Check(tool, FAIL, f"{path} --version printed no version: {line!r}", f"reinstall {package}")
        elif found[:2] < MIN_QEMU:
            yield Check(
                tool,
                FAIL,
                f"{tool} {'.'.join(map(str, found))} is older than QEMU {'.'.join(map(str, MIN_QEMU))}",
                f"upgrade {package} (Debian 12 or later)",
            )
        else:
            yield Check(tool, PASS, f"{tool} {'.'.join(map(str, found))} ({path})")


def _libnbd() -> Iterator[Check]:
    try:
        import nbd

        version = str(nbd.NBD().get_version())
    except ImportError:
        yield Check(
            "libnbd",
            FAIL,
            "the Python binding of libnbd (module nbd) is not importable",
            "apt-get install python3-libnbd, and run vmvault from its .venv (system site-packages); "
            "never pip install nbd (an unrelated package)",
        )
        return
    yield Check("libnbd", PASS, f"libnbd {version}")


def _fuse() -> Iterator[Check]:
    dev = Path("/dev/fuse")
    if not dev.exists():
        yield Check(
            "fuse",
            FAIL,
            "/dev/fuse is missing: file recovery cannot mount recovery points",
            "modprobe fuse (or give the container --device /dev/fuse)",
        )
        return
    try:
        os.close(os.open(dev, os.O_RDWR))
    except OSError as exc:
        yield Check(
            "fuse",
            FAIL,
            f"/dev/fuse cannot be opened: {exc.strerror}",
            "run vmvault as root, or allow /dev/fuse (DeviceAllow=/dev/fuse rw in its unit)",
        )
        return
    helper = shutil.which("fusermount3") or shutil.which("fusermount")
    if helper is None:
        yield Check("fuse", WARN, "/dev/fuse works but fusermount3 is missing", "apt-get install fuse3")
        return
    yield Check("fuse", PASS, f"/dev/fuse opens; {helper}")


def _loop() -> Iterator[Check]:
    control = Path("/dev/loop-control")
    if not control.exists():
        yield Check(
            "loop",
            FAIL,
            "/dev/loop-control is missing: file recovery cannot mount disk images",
            "modprobe loop (or give the container the loop devices)",
        )
        return
    loops = sorted(p.name for p in Path("/dev").glob("loop[0-9]*"))
    yield Check("loop", PASS, f"/dev/loop-control and {len(loops)} loop device(s)")


# ---- what each kind of VM needs (connectors/*: doctor_host, doctor_vm) ----------------------------------------


def _host(kind: str, home: str | None, vms: list[VmRow]) -> Iterator[Check]:
    """A kind's host checks; a failure only where a VM of that kind is to be checked (else a warning)."""
    from vmvault.connectors.registry import connector_for

    mine = [v for v in vms if v.kind == kind]
    disks = [d for v in mine for d in v.disks or []]
    for check in connector_for(kind).doctor_host(home, disks, needed=bool(mine)):
        yield Check(**check)


def _vm(row: VmRow) -> list[Check]:
    from vmvault.connectors.registry import connector_for

    def checks() -> Iterator[Check]:
        found = connector_for(row.kind).doctor_vm(row.name, dict(row.definition or {}), list(row.disks or []))
        for check in found:
            yield Check(**check)

    return _guard(f"vm {row.name}", checks)


# ---- vaults and local space ---------------------------------------------------------------------


def _object_vault(row: VaultRow, label: str) -> Iterator[Check]:
    """An azure:// or s3:// vault: its credentials, its config object, a create and delete of a probe."""
    from vmvault.errors import VmvaultError
    from vmvault.vault.backends import open_backend

    probe = f"locks/doctor-{uuid.uuid4().hex}"  # under locks/: verify expects nothing else there
    try:
        backend = open_backend(row.storage_dir)
        backend.stat("config")
        backend.put_if_absent(probe, b"vmvault doctor\n")
        backend.delete(probe)
    except VmvaultError as exc:
        yield Check(label, FAIL, f"{row.storage_dir}: {exc.message}", exc.hint or "check the store and its credentials")
        return
    yield Check(label, PASS, f"{row.storage_dir} is reachable and writable")


def _vault(row: VaultRow) -> Iterator[Check]:
    label = f"vault {row.name} storage"
    if "://" in row.storage_dir:
        yield from _object_vault(row, label)
        return
    storage = Path(row.storage_dir)
    if not storage.is_dir():
        yield Check(
            label,
            FAIL,
            f"{storage} is not reachable (missing or not a directory)",
            "mount the vault's storage there again (it was created or imported at that path)",
        )
        return
    probe = storage / f".vmvault-doctor-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"vmvault doctor\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        yield Check(
            label,
            FAIL,
            f"{storage} is not writable: {exc.strerror}",
            f"remount {storage} read-write (mount -o remount,rw), clear its immutable flag (chattr -i), "
            "or give vmvault write access; backups into this vault fail until then",
        )
        return
    st = os.statvfs(storage)
    free = st.f_bavail * st.f_frsize
    if free < GiB:
        yield Check(
            label,
            WARN,
            f"{storage} is writable but has only {free >> 20} MiB free",
            "free space there, or run: vmvault retention run; vmvault vault gc",
        )
        return
    yield Check(label, PASS, f"{storage} is writable, {free / GiB:.1f} GiB free")


# ---- clock ----------------------------------------------------------------------------------------

MAX_SKEW_S = 60.0  # schedules, job times and token expiry compare this host's clock with the server's


def clock_skew_check(server: str, server_date: datetime | None, local: datetime) -> Check:
    """From the server's HTTP Date header (whole seconds): fail beyond MAX_SKEW_S."""
    if server_date is None:
        return Check("clock skew", WARN, f"{server} sent no Date header: skew unknown", "check NTP on both hosts")
    skew = (local - server_date).total_seconds()
    detail = f"this host's clock is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} {server}"
    if abs(skew) > MAX_SKEW_S:
        return Check("clock skew", FAIL, detail, "synchronise both clocks with NTP (timedatectl set-ntp true; chrony)")
    return Check("clock skew", PASS, detail)

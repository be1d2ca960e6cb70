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
from pathlib import Path
from typing import Any

from sqlalchemy import select

from vmvault.catalog import repos
from vmvault.catalog.models import VaultRow, VmRow
from vmvault.service.context import Context
from vmvault.service.views import JsonDict

PASS, WARN, FAIL = "pass", "warn", "fail"
TOOL_TIMEOUT_S = 20
AGENT_TIMEOUT_S = 3
MIN_QEMU = (7, 2)  # the release vmvault is tested on (fleecing with snapshot-access, bitmaps over NBD)
MIN_LIBVIRT_BACKUP = (7, 2)  # pull backups with checkpoints for QEMU domains
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
    checks.extend(_guard("libvirt", lambda: _libvirt(any(v.kind == "libvirt" for v in vms))))
    for row in vms:
        checks.extend(_vm(row))
    for vault in vaults:
        checks.extend(_vault(vault))
    if ctx is not None:
        home = ctx.settings.home
        checks.extend(_guard("fleece space", lambda: _fleece(home, vms)))
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


# ---- libvirt ------------------------------------------------------------------------------------


def _libvirt(needed: bool) -> Iterator[Check]:
    """Reachable, and what its version can do; only a failure when a libvirt VM is to be checked."""
    from vmvault.connectors.libvirt import domain as lv

    status_if_down = FAIL if needed else WARN
    try:
        conn = lv.connect(lv.DEFAULT_URI)
    except lv.LibvirtError as exc:
        yield Check(
            "libvirt",
            status_if_down,
            exc.message,
            "start libvirtd (systemctl start libvirtd), or ignore this if no VM is managed by libvirt",
        )
        return
    try:
        yield from _libvirt_capabilities(conn)
    finally:
        conn.close()


def _libvirt_capabilities(conn: Any) -> Iterator[Check]:
    import libvirt

    raw = int(conn.getLibVersion())
    version = (raw // 1_000_000, raw // 1000 % 1000, raw % 1000)
    text = ".".join(map(str, version))
    yield Check("libvirt", PASS, f"libvirt {text} at {conn.getURI()}")
    has_api = hasattr(libvirt.virDomain, "backupBegin") and hasattr(libvirt.virDomain, "checkpointCreateXML")
    if not has_api or version[:2] < MIN_LIBVIRT_BACKUP:
        yield Check(
            "libvirt backup API",
            FAIL,
            f"libvirt {text} (or its Python binding) lacks checkpoints and pull backups",
            "upgrade libvirt to 7.2 or later (Debian 12: 9.0) and python3-libvirt",
        )
    else:
        yield Check("libvirt backup API", PASS, "checkpoints and pull backups (backupBegin)")
    if hasattr(libvirt, "VIR_DOMAIN_BACKUP_BEGIN_QUIESCE"):
        yield Check("libvirt QUIESCE flag", PASS, "backupBegin freezes the guest itself (QUIESCE flag)")
    else:
        yield Check(
            "libvirt QUIESCE flag",
            PASS,
            f"libvirt {text} rejects backupBegin's QUIESCE flag: vmvault "
            "freezes the guest through the agent around backupBegin instead (same consistency)",
        )


# ---- VMs ----------------------------------------------------------------------------------------


def _vm(row: VmRow) -> list[Check]:
    name = f"vm {row.name}"
    if row.kind == "libvirt":
        return _guard(name, lambda: _libvirt_vm(row))
    if row.kind == "qmp":
        return _guard(name, lambda: _qmp_vm(row))
    return _guard(name, lambda: _disks(row))


def _disks(row: VmRow) -> Iterator[Check]:
    from vmvault.connectors.diskimage.diskformat import chain_from_record
    from vmvault.connectors.diskimage.images import disk_info
    from vmvault.errors import VmvaultError

    for disk in row.disks:
        label = f"vm {row.name} disk {disk.get('name')}"
        path = Path(str(disk.get("path")))
        try:
            # Opened as recorded at `vm add` (never guessed from the content); the chain is checked too.
            chain = chain_from_record(disk["chain"]) if "chain" in disk else None
            info = disk_info(path, str(disk.get("format")), chain)
        except VmvaultError as exc:
            yield Check(label, FAIL, exc.message, exc.hint)
            continue
        yield Check(label, PASS, f"{path}: {info.format}, {info.virtual_size} bytes, not locked")


def _qmp_vm(row: VmRow) -> Iterator[Check]:
    from vmvault.connectors.guest_agent import GuestAgent
    from vmvault.connectors.qemu.qmp import QemuNotRunning, QmpClient
    from vmvault.errors import HypervisorError

    definition = row.definition or {}
    try:
        with QmpClient(str(definition.get("qmp"))).connect(greeting_timeout=AGENT_TIMEOUT_S) as client:
            client.query_status()
    except QemuNotRunning:
        yield Check(
            f"vm {row.name}",
            WARN,
            f"QEMU is not running (QMP socket {definition.get('qmp')})",
            "start the VM before its backup, or back up its disks offline",
        )
        return
    yield Check(f"vm {row.name}", PASS, f"QMP answers at {definition.get('qmp')}")
    agent = definition.get("guestAgent")
    if not agent:
        yield Check(
            f"vm {row.name} guest agent",
            WARN,
            "no guest agent channel: backups are CrashConsistent",
            f"give QEMU a virtserialport named org.qemu.guest_agent.0 and re-add the VM with "
            f"vmvault vm add {row.name} --qmp SOCKET --guest-agent AGENT_SOCKET",
        )
        return
    try:
        with GuestAgent(str(agent), timeout=AGENT_TIMEOUT_S).connect(timeout=AGENT_TIMEOUT_S):
            pass
    except (HypervisorError, OSError) as exc:
        yield Check(
            f"vm {row.name} guest agent",
            FAIL,
            f"the guest agent at {agent} does not answer: {exc}",
            "install and start qemu-guest-agent inside the guest",
        )
        return
    yield Check(f"vm {row.name} guest agent", PASS, f"the guest agent answers at {agent}")


def _libvirt_vm(row: VmRow) -> Iterator[Check]:
    from vmvault.connectors.libvirt import domain as lv
    from vmvault.service.libvirt_vms import AGENT_FIX

    definition = row.definition or {}
    uri = str(definition.get("connect") or lv.DEFAULT_URI)
    conn = lv.connect(uri)
    try:
        try:
            dom = lv.lookup(conn, str(definition.get("domain")), definition.get("uuid"))
            info = lv.inspect(dom)
        except lv.LibvirtError as exc:
            yield Check(f"vm {row.name}", FAIL, exc.message, exc.hint or "vmvault vm add again with --libvirt")
            return
        yield Check(f"vm {row.name}", PASS, f"libvirt domain {info.name} is {info.state}")
        yield _agent_check(row, dom, info, AGENT_FIX.format(name=row.name))
    finally:
        conn.close()


def _agent_check(row: VmRow, dom: Any, info: Any, fix: str) -> Check:
    from vmvault.connectors.libvirt import domain as lv

    label = f"vm {row.name} guest agent"
    if not info.agent_channel:
        if lv.has_agent_channel(lv.persistent_xml(dom)):
            return Check(
                label,
                FAIL,
                f"domain {info.name}: the {lv.AGENT_CHANNEL} channel is defined but takes "
                "effect at its next boot; backups are CrashConsistent until then",
                "shut the domain down and start it",
            )
        return Check(
            label,
            FAIL,
            f"domain {info.name} has no {lv.AGENT_CHANNEL} channel: backups are CrashConsistent",
            f"{fix}; install qemu-guest-agent in the guest",
        )
    if not info.running:
        return Check(label, PASS, f"domain {info.name} has the {lv.AGENT_CHANNEL} channel (not running now)")
    if lv.agent_answers(dom, AGENT_TIMEOUT_S):
        return Check(label, PASS, f"the guest agent of domain {info.name} answers")
    return Check(
        label,
        FAIL,
        f"domain {info.name} has the channel but its guest agent does not answer",
        "install and start qemu-guest-agent inside the guest (systemctl enable --now qemu-guest-agent)",
    )


# ---- vaults and local space ---------------------------------------------------------------------


def _vault(row: VaultRow) -> Iterator[Check]:
    label = f"vault {row.name} storage"
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


def _fleece(where: Path, vms: list[VmRow]) -> Iterator[Check]:
    """Running QEMU VMs are backed up through fleece overlays under HOME/fleece: they need real disk space."""
    from vmvault.connectors.qemu.snapshot import FLEECE_MARGIN, filesystem_type

    fs = filesystem_type(where)
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    needed = FLEECE_MARGIN + sum(_allocated(d) for v in vms if v.kind == "qmp" for d in v.disks)
    if fs in ("tmpfs", "ramfs"):
        yield Check(
            "fleece space",
            WARN,
            f"{where} is on {fs}: fleece overlays of live backups would fill memory",
            "put VMVAULT_HOME on a disk-backed file system",
        )
    elif free < needed:
        yield Check(
            "fleece space",
            FAIL,
            f"{free >> 20} MiB free in {where}; live backups of the running QEMU VMs "
            f"need up to {needed >> 20} MiB for fleece overlays",
            f"free space in {where} or move VMVAULT_HOME",
        )
    else:
        yield Check("fleece space", PASS, f"{free / GiB:.1f} GiB free in {where} ({fs}) for fleece overlays")


def _allocated(disk: dict[str, Any]) -> int:
    try:
        return os.stat(str(disk.get("path"))).st_blocks * 512
    except OSError:
        return 0


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

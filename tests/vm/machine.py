"""Real QEMU guests and qemu-storage-daemons for tests.

Guests boot the tiny image of vm/guest.py under TCG (KVM only where /proc/cpuinfo shows vmx or svm;
VMVAULT_TEST_ACCEL overrides), with two QMP sockets (one for the test, one for vmvault: QEMU serves
one client per socket) and, optionally, a guest agent channel. Sockets live under a short path,
/run/vmvault-test/<id>/ (108-byte limit, no '='). Timeouts are generous: TCG varies by +-30 %.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vm.guest import GuestImage, build_guest
from vmvault.connectors.guest_agent import ExecResult, GuestAgent, freeze_lock_path
from vmvault.connectors.qemu.qmp import QmpClient

MiB = 1 << 20
BOOT_TIMEOUT = float(os.environ.get("VMVAULT_TEST_BOOT_TIMEOUT", "180"))


def accelerator() -> str:
    forced = os.environ.get("VMVAULT_TEST_ACCEL")
    if forced:
        return forced
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    return "kvm" if (" vmx" in flags or " svm" in flags) and os.path.exists("/dev/kvm") else "tcg"


def socket_dir() -> Path:
    base = Path("/run/vmvault-test") if os.access("/run", os.W_OK) else Path("/tmp/vmvault-test")
    path = base / secrets.token_hex(4)
    path.mkdir(parents=True, mode=0o700)
    return path


# ---- disks ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Disk:
    name: str  # node name and serial: mounted in the guest at /mnt/<name> when it holds ext4
    path: Path
    format: str


def ext4_disk(workdir: Path, name: str, size: int, fmt: str = "qcow2") -> Disk:
    """An ext4 disk made on the host, fully initialised (no lazy init writing behind the tests' back)."""
    raw = workdir / f"{name}.raw"
    subprocess.run(["truncate", "-s", str(size), str(raw)], check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    "-L", name, str(raw)], check=True)  # fmt: skip
    return _as(raw, workdir, name, fmt)


def blank_disk(workdir: Path, name: str, size: int, fmt: str = "qcow2") -> Disk:
    raw = workdir / f"{name}.raw"
    subprocess.run(["truncate", "-s", str(size), str(raw)], check=True)
    return _as(raw, workdir, name, fmt)


def _as(raw: Path, workdir: Path, name: str, fmt: str) -> Disk:
    if fmt == "raw":
        return Disk(name, raw, "raw")
    out = workdir / f"{name}.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True)
    raw.unlink()
    return Disk(name, out, "qcow2")


def read_live(disk: Disk, out: Path) -> Path:
    """The disk's current content as raw (`qemu-img convert -U`: readable while QEMU holds it)."""
    subprocess.run(["qemu-img", "convert", "-U", "-f", disk.format, "-O", "raw", str(disk.path), str(out)], check=True)
    return out


# ---- a guest --------------------------------------------------------------------------------------------


@dataclass
class Guest:
    workdir: Path
    disks: list[Disk]
    agent: bool = True
    memory_mib: int = 256
    extra: list[str] = field(default_factory=list)  # more QEMU arguments
    image: GuestImage | None = None
    sockets: Path = field(default_factory=socket_dir)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def qmp_socket(self) -> Path:
        """The test's own QMP socket."""
        return self.sockets / "qmp.sock"

    @property
    def vmvault_qmp(self) -> Path:
        """The QMP socket given to vmvault (vm add --qmp)."""
        return self.sockets / "vmv.sock"

    @property
    def agent_socket(self) -> Path:
        return self.sockets / "qga.sock"

    @property
    def console(self) -> Path:
        return self.workdir / "console.log"

    def command(self) -> list[str]:
        image = self.image or build_guest()
        self.image = image
        cmd = [
            "qemu-system-x86_64", "-M", "q35", "-accel", accelerator(), "-cpu", "max", "-smp", "1",
            "-m", str(self.memory_mib), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(image.vmlinux), "-initrd", str(image.initrd),
            "-append", "console=ttyS0 quiet panic=-1",
            "-serial", f"file:{self.console}",
            "-device", "virtio-rng-pci",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-qmp", f"unix:{self.vmvault_qmp},server=on,wait=off",
        ]  # fmt: skip
        if self.agent:
            cmd += ["-chardev", f"socket,path={self.agent_socket},server=on,wait=off,id=qga0",
                    "-device", "virtio-serial-pci",
                    "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]  # fmt: skip
        cmd += self.extra
        for d in self.disks:
            cmd += ["-blockdev", f"driver=file,node-name={d.name}-file,filename={d.path}",
                    "-blockdev", f"driver={d.format},node-name={d.name},file={d.name}-file",
                    "-device", f"virtio-blk-pci,drive={d.name},id=vd-{d.name},serial={d.name}"]  # fmt: skip
        return cmd

    def start(self) -> Guest:
        self.console.unlink(missing_ok=True)
        with open(self.workdir / "qemu.stderr", "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
            )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if self.agent:
                with contextlib.suppress(Exception), GuestAgent(self.agent_socket).connect(timeout=2):
                    return
            elif self.console.exists() and "sysinit done" in self.console.read_text(errors="replace"):
                return
            time.sleep(0.3)
        raise AssertionError(f"the guest did not come up within {timeout:.0f} s; console:\n{self.console_tail()}")

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            stderr = (self.workdir / "qemu.stderr").read_text(errors="replace")[-2000:]
            raise AssertionError(f"QEMU exited ({self.proc.returncode}): {stderr}\nconsole:\n{self.console_tail()}")

    def console_tail(self) -> str:
        return self.console.read_text(errors="replace")[-3000:] if self.console.exists() else ""

    # ---- talking to it ------------------------------------------------------------------------------
    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        with QmpClient(self.qmp_socket).connect() as qmp:
            return qmp.execute(command, arguments)

    def sh(self, script: str, timeout: float = 120, check: bool = True) -> ExecResult:
        """Run a shell script in the guest through the agent (a new connection: vmvault needs the socket too)."""
        with GuestAgent(self.agent_socket).connect(timeout=30) as agent:
            result = agent.run("/bin/sh", ["-c", script], timeout=timeout)
        if check:
            assert result.ok, f"guest command failed: {script!r}: {result}"
        return result

    def write_file(self, path: str, data: bytes, mode: str = "644") -> None:
        with GuestAgent(self.agent_socket).connect(timeout=30) as agent:
            script = f'mkdir -p "$(dirname {path})" && cat > {path} && chmod {mode} {path}'
            result = agent.run("/bin/sh", ["-c", script], input_data=data, timeout=60)
        assert result.ok, f"writing {path} in the guest failed: {result}"

    def freeze_status(self) -> str:
        with GuestAgent(self.agent_socket).connect(timeout=30, check_frozen=False) as agent:
            return agent.guest_fsfreeze_status()

    # ---- stopping ---------------------------------------------------------------------------------------
    def quit(self) -> None:
        """Clean stop (QMP quit: QEMU writes persistent bitmaps back to the qcow2)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.qmp("quit")
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill9()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def close(self) -> None:
        self.quit()
        lock = freeze_lock_path(self.agent_socket)  # vmvault's thaw guard lock for this (throw-away) socket
        lock.unlink(missing_ok=True)
        lock.with_suffix(".log").unlink(missing_ok=True)
        shutil.rmtree(self.sockets, ignore_errors=True)


# ---- qemu-storage-daemon: a guest-less stand-in -----------------------------------------------------------


@dataclass
class StorageDaemon:
    """Disks served by qemu-storage-daemon: QMP like a VM, and a writable FUSE export per disk as 'the guest'."""

    workdir: Path
    disks: list[Disk]
    sockets: Path = field(default_factory=socket_dir)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def qmp_socket(self) -> Path:
        return self.sockets / "qmp.sock"

    @property
    def vmvault_qmp(self) -> Path:
        return self.sockets / "vmv.sock"

    def live(self, disk: Disk) -> Path:
        """The disk's guest view: write here and the dirty bitmaps see it."""
        return self.workdir / f"{disk.name}.live"

    def start(self) -> StorageDaemon:
        cmd = [
            "qemu-storage-daemon",
            "--chardev",
            f"socket,id=mon0,path={self.qmp_socket},server=on,wait=off",
            "--monitor",
            "chardev=mon0",
            "--chardev",
            f"socket,id=mon1,path={self.vmvault_qmp},server=on,wait=off",
            "--monitor",
            "chardev=mon1",
        ]
        for d in self.disks:
            self.live(d).touch()
            cmd += [
                "--blockdev",
                f"driver=file,node-name={d.name}-file,filename={d.path}",
                "--blockdev",
                f"driver={d.format},node-name={d.name},file={d.name}-file",
                "--export",
                f"type=fuse,id=rw-{d.name},node-name={d.name},mountpoint={self.live(d)},writable=on",
            ]
        with open(self.workdir / "qsd.stderr", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"qemu-storage-daemon exited: {(self.workdir / 'qsd.stderr').read_text()}")
            with contextlib.suppress(Exception), QmpClient(self.qmp_socket).connect(greeting_timeout=1) as qmp:
                if len(qmp.query_block_exports()) == len(self.disks):
                    return self
            time.sleep(0.05)
        raise AssertionError("qemu-storage-daemon did not come up")

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        with QmpClient(self.qmp_socket).connect() as qmp:
            return qmp.execute(command, arguments)

    def write(self, disk: Disk, writes: list[tuple[int, bytes]]) -> None:
        """pwrite each (offset, data) through the daemon, then fsync."""
        fd = os.open(self.live(disk), os.O_WRONLY)
        try:
            for offset, data in writes:
                os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def quit(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.qmp("quit")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill9()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
            for d in self.disks:  # a killed daemon leaves its FUSE mounts behind
                subprocess.run(["fusermount3", "-u", "-z", str(self.live(d))], capture_output=True)

    def close(self) -> None:
        self.quit()
        shutil.rmtree(self.sockets, ignore_errors=True)

"""libvirt for the tests: install it and start libvirtd idempotently.

- apt packages (--no-install-recommends) only when one is missing;
- the build-time `libvirt-qemu` user and group and the directories libvirtd needs;
- an /etc/libvirt/qemu.conf only when there is none (an existing one is never overwritten);
- a running libvirtd is reused; otherwise `libvirtd -d` (and `virtlogd -d` when it exists).

Use the `libvirtd` session fixture (re-exported by the tests' conftest through `pytest_plugins`, or
imported by a test module): it yields the connection URI, or skips when libvirt cannot be set up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

URI = "qemu:///system"
APT_PACKAGES = ("libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients", "python3-libvirt")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
MINIMAL_QEMU_CONF = """\
# Written by vmvault's test set-up (tests/vm/libvirtd.py) because none existed.
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
namespaces = [ ]
remember_owner = 0
"""


def _installed(package: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout.startswith("install ok installed")


def install_packages() -> None:
    missing = [p for p in APT_PACKAGES if not _installed(p)]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                   check=True, capture_output=True, env=env)  # fmt: skip


def _ensure_user() -> None:
    if subprocess.run(["getent", "group", "libvirt-qemu"], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "-r", "libvirt-qemu"], check=True, capture_output=True)
    if subprocess.run(["getent", "passwd", "libvirt-qemu"], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-r", "-g", "libvirt-qemu", "-d", "/var/lib/libvirt", "-s", "/usr/sbin/nologin",
                        "libvirt-qemu"], check=True, capture_output=True)  # fmt: skip


def _answers() -> bool:
    proc = subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, timeout=30)
    return proc.returncode == 0


def ensure_libvirtd() -> str:
    """Install and start libvirtd unless it already answers; returns the URI."""
    install_packages()
    if shutil.which("virsh") and _answers():
        return URI
    for d in ("/var/log/libvirt/qemu", "/var/lib/libvirt/qemu", "/run/libvirt"):
        Path(d).mkdir(parents=True, exist_ok=True)
    _ensure_user()
    if not QEMU_CONF.exists():
        QEMU_CONF.parent.mkdir(parents=True, exist_ok=True)
        QEMU_CONF.write_text(MINIMAL_QEMU_CONF)
    if shutil.which("virtlogd") and subprocess.run(["pgrep", "-x", "virtlogd"], capture_output=True).returncode != 0:
        subprocess.run(["virtlogd", "-d"], capture_output=True)
    # -d, never -l (TCP listen); a concurrent session may win the race to start it: then just wait for it
    subprocess.run(["libvirtd", "-d"], capture_output=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(subprocess.TimeoutExpired):
            if _answers():
                return URI
        time.sleep(0.3)
    raise RuntimeError("libvirtd did not answer within 30 s (see /var/log/libvirt/libvirtd.log)")


@pytest.fixture(scope="session")
def libvirtd() -> str:
    if os.geteuid() != 0:
        pytest.skip("libvirt tests need root (they start libvirtd)")
    try:
        return ensure_libvirtd()
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        pytest.skip(f"libvirt could not be set up: {exc}")


def leftovers(domain: str) -> Iterator[str]:
    """What a test may not leave behind for a domain name: the domain itself, its checkpoint metadata."""
    proc = subprocess.run(["virsh", "-c", URI, "dominfo", domain], capture_output=True)
    if proc.returncode == 0:
        yield f"domain {domain}"
    if Path(f"/var/lib/libvirt/qemu/checkpoint/{domain}").exists() and any(
        Path(f"/var/lib/libvirt/qemu/checkpoint/{domain}").iterdir()
    ):
        yield f"checkpoint metadata of {domain}"


# ---- a test domain: the tiny guest of vm/guest.py under libvirt (TCG) -------------------------------------


def domain_xml(
    name: str,
    workdir: Path,
    disks: list[Any],
    *,
    agent: bool = True,
    memory_mib: int = 256,
    image: Any = None,
    cmdline: str = "",
    nic: bool = False,
) -> str:
    """image: a GuestImage (default build_guest()); cmdline: appended to the kernel's; nic: a user-mode NIC."""
    from vm.guest import build_guest

    image = image or build_guest()
    devices = []
    for i, d in enumerate(disks):
        devices.append(
            f"<disk type='file' device='disk'><driver name='qemu' type='{d.format}'/><source file='{d.path}'/>"
            f"<target dev='vd{chr(ord('a') + i)}' bus='virtio'/><serial>{d.name}</serial></disk>"
        )
    if agent:
        devices.append(
            f"<channel type='unix'><source mode='bind' path='{workdir / 'qga.sock'}'/>"
            "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
        )
    if nic:
        devices.append("<interface type='user'><mac address='52:54:00:aa:bb:02'/><model type='virtio'/></interface>")
    devices.append(f"<serial type='file'><source path='{workdir / 'console.log'}'/><target port='0'/></serial>")
    devices.append("<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>")
    devices.append("<memballoon model='none'/>")
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>{image.vmlinux}</kernel><initrd>{image.initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 {cmdline}</cmdline></os>
  <features><acpi/></features>
  <cpu mode='maximum'/>
  <on_reboot>destroy</on_reboot>
  <devices>{"".join(devices)}</devices>
</domain>"""


@dataclass
class Domain:
    """A libvirt domain for one test module; `close()` destroys and undefines it with its checkpoint metadata."""

    name: str
    workdir: Path
    disks: list[Any]
    agent: bool = True
    image: Any = None  # a GuestImage (default: the tiny guest)
    cmdline: str = ""
    nic: bool = False
    memory_mib: int = 256

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, check=check, timeout=120)

    def define(self) -> Domain:
        xml = self.workdir / f"{self.name}.xml"
        xml.write_text(domain_xml(self.name, self.workdir, self.disks, agent=self.agent, image=self.image,
                                  cmdline=self.cmdline, nic=self.nic, memory_mib=self.memory_mib))  # fmt: skip
        self.virsh("define", str(xml))
        return self

    def start(self) -> Domain:
        (self.workdir / "console.log").unlink(missing_ok=True)
        self.virsh("start", self.name)
        self.wait_ready()
        return self

    def dom(self) -> Any:
        from vmvault.connectors.libvirt.domain import connect

        return connect(URI).lookupByName(self.name)

    def agent_client(self) -> Any:
        from vmvault.connectors.libvirt.domain import LibvirtAgent

        return LibvirtAgent(self.dom())

    def wait_ready(self, timeout: float = 180) -> None:
        from vmvault.errors import HypervisorError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(HypervisorError, Exception):
                if self.agent:
                    self.agent_client().connect(timeout=2)
                    return
                console = self.workdir / "console.log"
                if console.exists() and "sysinit done" in console.read_text(errors="replace"):
                    return
            time.sleep(0.5)
        raise AssertionError(f"domain {self.name} did not come up within {timeout:.0f} s")

    def sh(self, script: str, timeout: float = 120) -> Any:
        result = self.agent_client().run("/bin/sh", ["-c", script], timeout=timeout)
        assert result.ok, f"guest command failed: {script!r}: {result}"
        return result

    def write_file(self, path: str, data: bytes, mode: str = "644") -> None:
        script = f'mkdir -p "$(dirname {path})" && cat > {path} && chmod {mode} {path}'
        result = self.agent_client().run("/bin/sh", ["-c", script], input_data=data, timeout=60)
        assert result.ok, f"writing {path} in the guest failed: {result}"

    def checkpoints(self) -> list[str]:
        out = self.virsh("checkpoint-list", self.name, "--name", check=False).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def job_type(self) -> str:
        out = self.virsh("domjobinfo", self.name, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Job type:"):
                return line.split(":", 1)[1].strip()
        return "None"

    def close(self) -> None:
        self.virsh("destroy", self.name, check=False)
        self.virsh("undefine", self.name, "--checkpoints-metadata", check=False)
        left = list(leftovers(self.name))
        assert not left, f"left behind: {left}"


# ---- a second libvirtd with Debian's default qemu.conf: QEMU runs as libvirt-qemu ----------------------

_PRIVATE_DIRS = ("/run/libvirt", "/etc/libvirt/qemu", "/var/lib/libvirt/qemu", "/var/log/libvirt")
_START_DEFAULT = """set -e
mount --make-rprivate /
{binds}
{kvm}
mkdir -p /var/log/libvirt/qemu
virtlogd -d -p {base}/virtlogd.pid
exec libvirtd -p {base}/libvirtd.pid
"""


def _kvm_for_libvirt_qemu(base: Path) -> str:
    """Shell lines that let libvirt-qemu open /dev/kvm in the private namespace, as on a Debian host.

    Debian's /dev/kvm is root:kvm 0660 and libvirt-qemu is in the group kvm; here it is root 0600.
    Without access, libvirtd's cached QEMU capabilities (probed with KVM) never validate for
    libvirt-qemu: every lookup probes QEMU again (about 4 s per binary), about 85 s per define or
    start. The test domains are type 'qemu' (TCG) either way.
    """
    kvm = Path("/dev/kvm")
    if not kvm.is_char_device():
        return ""
    rdev = kvm.stat().st_rdev
    node = base / "kvm"
    return (f"mknod -m 0660 {node} c {os.major(rdev)} {os.minor(rdev)}\n"
            f"chgrp libvirt-qemu {node}\nmount --bind {node} /dev/kvm")  # fmt: skip


@contextlib.contextmanager
def debian_default_libvirtd(base: Path) -> Iterator[str]:
    """libvirtd + virtlogd with an all-default qemu.conf (Debian ships it fully commented out: QEMU as
    libvirt-qemu, dynamic_ownership=1), in a private mount namespace so the shared libvirtd and its
    domains are untouched; yields its URI. The daemons end with the context."""
    ensure_libvirtd()  # packages and the libvirt-qemu user
    base.mkdir(parents=True, exist_ok=True)
    binds = []
    for i, d in enumerate(_PRIVATE_DIRS):
        (base / f"d{i}").mkdir(exist_ok=True)
        binds.append(f"mount --bind {base}/d{i} {d}")
    (base / "qemu.conf").write_text("# Debian's default: every setting commented out\n")
    binds.append(f"mount --bind {base}/qemu.conf {QEMU_CONF}")
    script = base / "start.sh"
    script.write_text(_START_DEFAULT.format(binds="\n".join(binds), base=base, kvm=_kvm_for_libvirt_qemu(base)))
    log = open(base / "libvirtd.out", "wb")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(["unshare", "-m", "sh", str(script)], stdout=log, stderr=log, start_new_session=True)
    uri = f"qemu:///system?socket={base}/d0/libvirt-sock"
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["virsh", "-c", uri, "version"], capture_output=True).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (base / "libvirtd.out").read_text()
            time.sleep(0.3)
        yield uri
    finally:
        proc.terminate()
        proc.wait(30)
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((base / "virtlogd.pid").read_text()), 15)
        log.close()
        shutil.rmtree(base, ignore_errors=True)

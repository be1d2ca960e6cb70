"""Restored libvirt domains under Debian's default qemu.conf: QEMU runs as `libvirt-qemu` (issue 14, item 5).

The shared test libvirtd runs QEMU as root, which hides every permission problem. Here a second
libvirtd (tests/vm/libvirtd.py, its own mount namespace) runs with an all-default qemu.conf: QEMU as
libvirt-qemu, dynamic_ownership=1. A VM backed up offline is restored with `restore vm` twice, with the
default target directory (HOME-restores, never inside vmvault's 0700 home): a full restore that must
boot from its restored disk, and an instant restore whose QEMU must cross the export's run directory
and connect to its NBD socket. On the old layout both fail with "Permission denied" when libvirt starts
the domain.

The home is a folder of its own under /var/tmp, 0700 as `serve` makes /var/lib/vmvault, and the
restores run under a umask of 0077 (the systemd unit's): the outcome does not depend on the mode of
this machine's /var/lib/vmvault (the old default target, /var/lib/vmvault/restores, lay in it and
failed once `make run` had made it 0700), and the test never writes there.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import Cli, HostKeyCli, crossable_dir, rp_id
from vm.libvirtd import debian_default_libvirtd, domain_xml, libvirtd  # noqa: F401  (the session fixture)
from vm.live import latest_point
from vm.machine import ext4_disk

pytestmark = pytest.mark.slow
MiB = 1 << 20


@pytest.fixture(scope="module")
def uri(libvirtd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: F811
    if subprocess.run(["id", "libvirt-qemu"], capture_output=True).returncode != 0:
        pytest.skip("no libvirt-qemu user")
    with debian_default_libvirtd(Path(f"/run/vmv-lvq-{secrets.token_hex(3)}")) as u:
        yield u


def _virsh(uri: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, check=check, timeout=120)


@pytest.fixture
def base() -> Iterator[Path]:
    """The home's parent: a folder libvirt-qemu may cross (pytest's tmp_path lies in a 0700 one)."""
    with crossable_dir("vmvq-") as path:
        yield path


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@contextlib.contextmanager
def _copy(uri: str, cli: Cli, name: str) -> Iterator[None]:
    try:
        yield
    finally:
        for job in cli.ok("job", "list").json():
            if job["properties"]["status"] == "InProgress":
                cli.run("job", "cancel", job["name"])
                cli.run("job", "wait", job["name"], "--timeout", "60", timeout=90)
        _virsh(uri, "destroy", name, check=False)
        _virsh(uri, "undefine", name, "--checkpoints-metadata", check=False)


def _agent_and_disk(uri: str, name: str) -> str:
    """Waits for the copy's guest agent; returns the guest's mounts (its restored disk must be there)."""
    from vmvault.connectors.libvirt.domain import LibvirtAgent, connect

    deadline = time.monotonic() + 240
    while True:
        with contextlib.suppress(Exception):
            agent = LibvirtAgent(connect(uri).lookupByName(name))
            agent.connect(timeout=2)
            return str(agent.run("/bin/sh", ["-c", "cat /proc/mounts"], timeout=60).stdout)
        assert time.monotonic() < deadline, f"the guest of {name} did not come up"
        time.sleep(1)


def test_restored_domains_start_with_qemu_as_libvirt_qemu(uri: str, tmp_path: Path, base: Path) -> None:
    cli = HostKeyCli(home=base / "vmvault")
    restores = base / "vmvault-restores" / "vms"  # the default target of `restore vm` for libvirt VMs
    original = f"vmvq-{secrets.token_hex(3)}"
    disk = ext4_disk(tmp_path, "data0", 32 * MiB)
    (tmp_path / "orig.xml").write_text(domain_xml(original, tmp_path, [disk]))
    _virsh(uri, "define", str(tmp_path / "orig.xml"))
    try:
        cli.ok("vm", "add", "orig", "--libvirt", original, "--connect", uri)
        cli.vault_create("v1", tmp_path / "vault")
        assert cli.protection_enable("orig", "v1").ok
        cli.ok("backup", "now", "--vm", "orig", timeout=600)  # offline: the original never starts
        rp = rp_id(latest_point(cli, "orig"))

        for how in ("full", "instant"):
            name = f"vmvq{how[0]}-{secrets.token_hex(3)}"
            with _copy(uri, cli, name):
                flags = ["--start"] if how == "full" else ["--instant"]
                with _umask(0o077):
                    r = cli.run("restore", "vm", "orig", "--rp", rp, "--name", name, *flags, timeout=600)
                # old layout: "Cannot access storage file '<home>/vms/NAME/vda.qcow2' (as uid:999, gid:995):
                # Permission denied"
                assert r.ok, str(r)
                assert " /mnt/data0 ext4 " in _agent_and_disk(uri, name), f"{how}: the restored disk is not mounted"
                assert stat.S_IMODE(cli.home.stat().st_mode) == 0o700, "the home must stay private"
                target = restores / name
                mode = target.stat().st_mode
                assert not mode & (stat.S_IROTH | stat.S_IXOTH), f"{target} is open to other users: {oct(mode)}"
                for f in target.glob("*.qcow2"):
                    assert not f.stat().st_mode & 0o077, f"{f} is readable by others: {oct(f.stat().st_mode)}"
    finally:
        _virsh(uri, "undefine", original, check=False)

"""Restore a libvirt VM's point as a NEW libvirt domain, and restore disks with a domain XML template.

One domain for the module, booting from its ext4 OS disk (vmv.root=/dev/vda, the OS-disk guest of
tests/test_restore_vm.py) with a data disk and a NIC; backed up live once. Every domain a test defines
is destroyed and undefined with its checkpoint metadata and NVRAM in a finalizer, which asserts that
nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, HostKeyCli, rp_id  # HostKeyCli: not about passphrases (no scrypt)

try:  # the OS-disk guest builder (moving from tests/test_restore_vm.py into tests/vm/osdisk.py)
    from vm.osdisk import os_disk, os_image
except ImportError:
    from test_restore_vm import os_disk, os_image  # type: ignore[no-redef]
from vm.libvirtd import URI, Domain, leftovers, libvirtd  # noqa: F401  (the session fixture)
from vm.live import backup, latest_point, warning_codes
from vm.machine import ext4_disk

MiB = 1 << 20
VM = "lvorig"


@dataclass
class Lab:
    workdir: Path
    domain: Domain
    cli: Cli
    rp: str

    def original_paths(self) -> list[str]:
        return [str(d.path) for d in self.domain.disks] + [str(self.domain.workdir / "qga.sock"),
                                                           str(self.domain.workdir / "console.log")]  # fmt: skip


@pytest.fixture(scope="module")
def lab(libvirtd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:  # noqa: F811
    workdir = tmp_path_factory.mktemp("lvrestore")
    image = os_image(workdir)
    disks = [os_disk(workdir, image), ext4_disk(workdir, "data0", 32 * MiB)]
    domain = Domain(f"vmvrs-{secrets.token_hex(4)}", workdir, disks, image=image.image, cmdline="vmv.root=/dev/vda",
                    nic=True).define()  # fmt: skip
    try:
        domain.start()
        root = domain.sh("grep ' / ' /proc/mounts").stdout
        assert root.startswith("/dev/vda / ext4"), f"the domain did not boot from its OS disk: {root!r}"
        # /run on tmpfs as in any distribution: qemu-ga's "frozen" marker (written to its state dir while the
        # backup freezes the guest) must not land on the OS disk, or a copy's agent starts out frozen
        domain.sh("mount -t tmpfs -o mode=755 tmpfs /run")
        cli = HostKeyCli(home=workdir / "home")
        cli.ok("vm", "add", VM, "--libvirt", domain.name)
        cli.vault_create("v1", workdir / "vault")
        assert cli.protection_enable(VM, "v1").ok
        domain.sh("echo before > /only-on-os-disk && sync")
        backup(cli, VM)
        domain.sh("echo after > /written-after && sync")
        yield Lab(workdir, domain, cli, rp_id(latest_point(cli, VM)))
    finally:
        domain.close()


@contextlib.contextmanager
def defined(name: str) -> Iterator[Domain]:
    """A domain vmvault (or the test) defines under name: destroyed and undefined at the end, nothing left."""
    dom = Domain(name, Path("/nonexistent"), [])
    try:
        yield dom
    finally:
        dom.virsh("destroy", name, check=False)
        dom.virsh("undefine", name, "--checkpoints-metadata", "--nvram", check=False)
        left = list(leftovers(name))
        assert not left, f"left behind: {left}"


def _monitor(dom: Domain, command: str) -> Any:
    out = dom.virsh("qemu-monitor-command", dom.name, json.dumps({"execute": command})).stdout
    return json.loads(out)["return"]


def _macs(xml: str) -> set[str]:
    return {str(m.get("address")) for m in ET.fromstring(xml).iter("mac")}


def _wait_agent(dom: Domain, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            dom.agent_client().connect(timeout=2)
            return
        assert time.monotonic() < deadline, f"the agent of {dom.name} did not answer"
        time.sleep(0.5)


# ---- restore vm -------------------------------------------------------------------------------------------


def test_a_restored_domain_boots_from_its_restored_os_disk(lab: Lab) -> None:
    name, target = f"vmvcopy-{secrets.token_hex(3)}", lab.workdir / "copy1"
    with defined(name) as copy:
        r = lab.cli.run("restore", "vm", VM, "--rp", lab.rp, "--name", name, "--target-dir", str(target), "--start",
                        timeout=600)  # fmt: skip
        assert r.ok and r.json()["properties"]["status"] == "Completed", str(r)
        assert copy.dom().isActive()
        # booted from the restored OS disk, holding what the point held and nothing after
        assert copy.sh("grep ' / ' /proc/mounts").stdout.startswith("/dev/vda / ext4")
        assert copy.sh("cat /only-on-os-disk").stdout == "before\n"
        assert not copy.agent_client().run("/bin/sh", ["-c", "cat /written-after"]).ok, "a later file is in the copy"
        # a new identity, as QEMU sees it; the original runs on untouched
        assert _monitor(copy, "query-uuid")["UUID"] != _monitor(lab.domain, "query-uuid")["UUID"]
        copy_macs = {n["main-mac"] for n in _monitor(copy, "query-rx-filter")}
        orig_macs = {n["main-mac"] for n in _monitor(lab.domain, "query-rx-filter")}
        assert copy_macs and orig_macs and not copy_macs & orig_macs, (copy_macs, orig_macs)
        assert lab.domain.sh("cat /written-after").stdout == "after\n"
        # its files are its own: disks in the target directory, no path of the original's
        xml = copy.virsh("dumpxml", "--inactive", name).stdout
        for path in lab.original_paths():
            assert path not in xml, f"the copy uses {path} of the original"
        sources = [str(s.get("file")) for s in ET.fromstring(xml).iter("source") if s.get("file")]
        assert sorted(sources) == [str(target / "vda.qcow2"), str(target / "vdb.qcow2")], sources
        assert copy.checkpoints() == [], "checkpoint metadata was carried over"
        # vmvault knows it, and vm list sees both running with their agents answering
        listed = {v["name"]: v for v in lab.cli.ok("vm", "list").json()}
        assert listed[name]["kind"] == "libvirt" and listed[name]["powerState"] == "running", listed[name]
        assert listed[name]["agent"] == "answers" and listed[VM]["agent"] == "answers", listed
        assert listed[name]["protection"] == "not protected"


def test_restore_vm_refusals_change_nothing(lab: Lab, tmp_path: Path) -> None:
    before = sorted(v["name"] for v in lab.cli.ok("vm", "list").json())
    # a vmvault VM of that name
    r = lab.cli.fails("restore", "vm", VM, "--rp", lab.rp, "--name", VM, "--target-dir", str(tmp_path / "a"))
    assert "already exists" in r.output
    # a libvirt domain of that name (not a vmvault VM)
    r = lab.cli.fails("restore", "vm", VM, "--rp", lab.rp, "--name", lab.domain.name, "--target-dir",
                      str(tmp_path / "a"))  # fmt: skip
    assert f"libvirt already has a domain named '{lab.domain.name}'" in r.output, r.output
    assert not (tmp_path / "a").exists()
    # files in the way
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "vda.qcow2").write_text("mine")
    name = f"vmvcopy-{secrets.token_hex(3)}"
    with defined(name) as copy:
        r = lab.cli.fails("restore", "vm", VM, "--rp", lab.rp, "--name", name, "--target-dir", str(tmp_path / "b"))
        assert "in the way" in r.output and "vda.qcow2" in r.output, r.output
        assert copy.virsh("dominfo", name, check=False).returncode != 0, "a refused restore defined a domain"
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["vda.qcow2"]
    assert (tmp_path / "b" / "vda.qcow2").read_text() == "mine"
    assert sorted(v["name"] for v in lab.cli.ok("vm", "list").json()) == before


# ---- restore disks + the domain XML template ------------------------------------------------------------------


def test_restore_disks_writes_domain_xml_that_boots_without_the_original_disks(lab: Lab) -> None:
    target = lab.workdir / "disks-os-only"
    r = lab.cli.ok("restore", "disks", VM, "--rp", lab.rp, "--target-dir", str(target), "--disk", "vda")
    assert r.json()["properties"]["status"] == "Completed"
    assert sorted(p.name for p in target.iterdir()) == [f"{VM}-domain.xml", "vda.qcow2"]
    text = (target / f"{VM}-domain.xml").read_text()
    for path in lab.original_paths():
        assert path not in text, f"the template still names {path} of the original domain"
    assert "disk vdb left out: not selected for this restore" in text, text
    root = ET.fromstring(text)
    sources = [str(s.get("file")) for s in root.iter("source") if s.get("file")]
    assert sources == [str(target / "vda.qcow2")], sources
    assert not _macs(text) & _macs(lab.domain.virsh("dumpxml", lab.domain.name).stdout)
    # the template boots as it is, with the original's disks out of reach
    name = f"vmvtpl-{secrets.token_hex(3)}"
    root.find("name").text = name  # type: ignore[union-attr]
    (target / "mine.xml").write_text(ET.tostring(root, encoding="unicode"))
    hidden = [(d.path, d.path.with_name(d.path.name + ".hidden")) for d in lab.domain.disks]
    with defined(name) as copy:
        for path, away in hidden:
            path.rename(away)  # the running original keeps its open files
        try:
            copy.virsh("define", str(target / "mine.xml"))
            copy.virsh("start", name)
            _wait_agent(copy)
            assert copy.sh("grep ' / ' /proc/mounts").stdout.startswith("/dev/vda / ext4")
            assert copy.sh("cat /only-on-os-disk").stdout == "before\n"
        finally:
            for path, away in hidden:
                away.rename(path)


def test_restore_disks_refuses_to_overwrite_the_template(lab: Lab) -> None:
    target = lab.workdir / "disks-os-only"  # the previous test's
    r = lab.cli.fails("restore", "disks", VM, "--rp", lab.rp, "--target-dir", str(target), "--disk", "vda")
    assert f"{VM}-domain.xml" in r.output, r.output


# ---- replace disks --------------------------------------------------------------------------------------------


def test_replace_disks_brings_the_shut_off_domain_back_to_the_point(lab: Lab) -> None:
    """Last: replaces the module domain's disks."""
    assert lab.domain.checkpoints(), "the backup left no checkpoint to reset"
    r = lab.cli.fails("restore", "replace-disks", VM, "--rp", lab.rp)
    assert "is running" in r.output and f"virsh shutdown {lab.domain.name}" in r.output, r.output
    lab.domain.virsh("shutdown", lab.domain.name)
    deadline = time.monotonic() + 120
    while lab.domain.dom().isActive():
        assert time.monotonic() < deadline, "the domain did not shut down"
        time.sleep(0.5)
    r = lab.cli.ok("restore", "replace-disks", VM, "--rp", lab.rp)
    assert r.json()["properties"]["status"] == "Completed", str(r)
    assert lab.domain.checkpoints() == [], "checkpoints of the replaced images were kept"
    lab.domain.start()
    assert lab.domain.sh("grep ' / ' /proc/mounts").stdout.startswith("/dev/vda / ext4")
    assert lab.domain.sh("cat /only-on-os-disk").stdout == "before\n"
    assert not lab.domain.agent_client().run("/bin/sh", ["-c", "cat /written-after"]).ok
    job = backup(lab.cli, VM)  # a new chain: full read, compared by hash
    assert "cbt_fallback" in warning_codes(job), job
    assert len(lab.domain.checkpoints()) == 1

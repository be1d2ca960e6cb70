"""The plain QEMU restore template: command-line rewriting (no VM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmvault.connectors.qemu.cmdline import CopyIdentity, RestoredDisk, rewrite
from vmvault.connectors.qemu.template import DiskTarget, build_template, has_definition, refuse_without_definition
from vmvault.errors import InvalidInput

CMDLINE = [
    "qemu-system-x86_64", "-name", "guest=web1,debug-threads=on", "-nodefaults", "-m", "256",
    "-kernel", "/boot/vmlinux", "-append", "console=ttyS0 root=/dev/vda",
    "-serial", "file:/srv/web1/console.log",
    "-qmp", "unix:/run/web1/qmp.sock,server=on,wait=off",
    "-chardev", "socket,path=/run/web1/qga.sock,server=on,wait=off,id=qga0",
    "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    "-nic", "user,model=virtio-net-pci",
    "-netdev", "tap,id=n1,ifname=tap0", "-device", "e1000,netdev=n1,mac=52:54:00:00:00:01",
    "-blockdev", "driver=file,node-name=os0-file,filename=/srv/web1/os0.qcow2",
    "-blockdev", "driver=qcow2,node-name=os0,file=os0-file",
    "-device", "virtio-blk-pci,drive=os0,id=vd-os0",
    "-blockdev", "driver=file,node-name=data0-file,filename=/srv/web1/data0.raw",
    "-blockdev", "driver=raw,node-name=data0,file=data0-file",
    "-device", "virtio-blk-pci,drive=data0,id=vd-data0",
    "-drive", "file=/srv/web1/old.img,format=raw,if=virtio",
    "-no-reboot",
]  # fmt: skip

DEFINITION = {
    "kind": "qmp",
    "qmp": "/run/web1/qmp.sock",
    "guestAgent": "/run/web1/qga.sock",
    "disks": [
        {"name": "os0", "node": "os0", "path": "/srv/web1/os0.qcow2", "format": "qcow2", "virtualSize": 1},
        {"name": "data0", "node": "data0", "path": "/srv/web1/data0.raw", "format": "raw", "virtualSize": 2},
    ],
    "machine": {"name": "web1", "uuid": "00000000-0000-0000-0000-000000000000", "nics": []},
    "qemu": {"version": "7.2.22", "cmdline": CMDLINE},
}


def test_rewrite_gives_new_paths_identity_and_macs(tmp_path: Path) -> None:
    ident = CopyIdentity("copy", "11111111-2222-3333-4444-555555555555", tmp_path / "run", tmp_path / "logs")
    disks = [RestoredDisk("os0", "/srv/web1/os0.qcow2", str(tmp_path / "os0.raw"), "raw")]
    out = rewrite(CMDLINE, disks, ["data0"], ident)
    text = " ".join(out)
    assert "/srv/web1" not in text.replace("/srv/web1/old.img", "") and "/run/web1" not in text
    assert "/srv/web1/old.img" not in text  # a -drive disk that was not restored is left out too
    assert f"filename={tmp_path / 'os0.raw'}" in text and "driver=raw,node-name=os0," in text
    assert "data0" not in text
    assert out[out.index("-name") + 1] == "guest=copy,debug-threads=on"
    assert out[out.index("-uuid") + 1] == ident.uuid
    assert len(ident.macs) == 2 and "52:54:00:00:00:01" not in text
    assert all(f"mac={m}" in text for m in ident.macs)
    assert f"unix:{tmp_path / 'run' / 'qmp.sock'},server=on,wait=off" in out
    assert f"file:{tmp_path / 'logs' / 'copy-serial.log'}" in out
    assert out[out.index("-append") + 1] == "console=ttyS0 root=/dev/vda" and "-no-reboot" in out
    assert out[out.index("-pidfile") + 1] == str(tmp_path / "logs" / "copy.pid")


def test_template_lists_only_restored_disks_and_says_which_are_left_out(tmp_path: Path) -> None:
    t = build_template(
        DEFINITION, source_vm="web1", rp_id="rp1", name="web1-restored",
        disks=[DiskTarget("os0", tmp_path / "os0.qcow2", "qcow2", 1)], excluded=["data0"],
        run_dir=tmp_path / "run", log_dir=tmp_path,
    )  # fmt: skip
    assert [d["path"] for d in t["disks"]] == [str(tmp_path / "os0.qcow2")]
    assert t["excludedDisks"][0]["name"] == "data0" and "left out" in t["excludedDisks"][0]["reason"]
    assert t["sockets"] == {"qmp": str(tmp_path / "run" / "qmp.sock"), "guestAgent": str(tmp_path / "run" / "qga.sock")}
    assert t["uuid"] != DEFINITION["machine"]["uuid"]  # type: ignore[index]


def test_a_disk_only_vm_has_no_definition() -> None:
    assert has_definition(DEFINITION)
    assert not has_definition({"disks": [{"name": "disk0", "path": "/x.raw"}]})
    with pytest.raises(InvalidInput, match="no VM definition: use restore disks"):
        refuse_without_definition({"disks": []}, "plain")

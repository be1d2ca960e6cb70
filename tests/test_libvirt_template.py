"""The libvirt restore template on a domain XML with everything a real domain may carry (UEFI NVRAM,
VNC on a fixed port, a TPM, a CD-ROM, pty and file character devices, runtime aliases and labels):
nothing of the original's identity or files is left, and the real libvirtd accepts the copy.
Also: enable-agent refuses a transient domain (cheap libvirt checks share this module)."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from pathlib import Path

from vm.libvirtd import libvirtd  # noqa: F401  (the session fixture)
from vmvault.connectors.libvirt.template import RestoredFile, copy_domain_xml

ORIGINAL = """<domain type='qemu' id='7'>
  <name>vmvtpl-orig</name>
  <uuid>0b3c4f5e-1111-2222-3333-444455556666</uuid>
  <genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90d</genid>
  <memory unit='KiB'>262144</memory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/srv/orig/vmvtpl-orig_VARS.fd</nvram>
  </os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/srv/orig/vda.qcow2' index='2'/>
      <backingStore type='file' index='3'><format type='raw'/><source file='/srv/orig/base.raw'/></backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/orig/vdb.raw' index='1'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/orig/vdc.raw'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/orig/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='user'><mac address='52:54:00:11:22:33'/><model type='virtio'/><alias name='net0'/></interface>
    <interface type='user'><model type='virtio'/></interface>
    <serial type='file'>
      <source path='/srv/orig/console.log'/>
      <log file='/srv/orig/serial0-chardev.log' append='on'/>
      <target type='isa-serial' port='0'><model name='isa-serial'/></target>
      <alias name='serial0'/>
    </serial>
    <console type='file'><source path='/srv/orig/console.log'/><target type='serial' port='0'/></console>
    <channel type='unix'>
      <source mode='bind' path='/srv/orig/qga.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
    <channel type='pty'><source path='/dev/pts/3'/><target type='virtio' name='com.example.pty'/></channel>
    <graphics type='vnc' port='5907' autoport='no' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    TPM
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+994</label><imagelabel>+64055:+994</imagelabel>
  </seclabel>
</domain>"""
TPM = (
    "<tpm model='tpm-crb'><backend type='emulator' version='2.0'>"
    "<source type='dir' path='/srv/orig/tpm'/></backend></tpm>"
)


def _copy(target: Path, *, tpm: bool) -> object:
    return copy_domain_xml(
        ORIGINAL.replace("TPM", TPM if tpm else ""),
        name="vmvtpl-copy",
        disks=[RestoredFile("vda", target / "vda.qcow2", "qcow2"), RestoredFile("vdb", target / "vdb.raw", "raw")],
        target_dir=target,
        in_point={"vda", "vdb"},  # vdc was excluded from backup
        source="restored from VM orig point 1234",
    )


def test_the_copy_keeps_nothing_of_the_original(tmp_path: Path) -> None:
    copy = _copy(tmp_path, tpm=True)
    xml: str = copy.xml  # type: ignore[attr-defined]
    for old in ("/srv/orig", "0b3c4f5e-1111", "43dc0cf8", "52:54:00:11:22:33", "5907", "/dev/pts/3", "+64055",
                "vmvtpl-orig", "id="):  # fmt: skip
        assert old not in xml, f"{old} is still in the copy:\n{xml}"
    assert "vmvault: disk vdc left out: not in the recovery point (excluded from backup)" in xml
    root = ET.fromstring(xml)
    assert [s.get("file") for s in root.iter("source") if s.get("file")] == [str(tmp_path / "vda.qcow2"),
                                                                             str(tmp_path / "vdb.raw")]  # fmt: skip
    assert [d.get("type") for d in root.findall("./devices/disk/driver")] == ["qcow2", "raw", "raw"]
    assert root.find("./devices/disk/backingStore") is None
    macs = [m.get("address") for m in root.iter("mac")]
    assert len(macs) == 2 and len(set(macs)) == 2 and macs == copy.macs  # type: ignore[attr-defined]
    assert root.findtext("./os/nvram") == str(tmp_path / "vmvtpl-copy_VARS.fd")
    serial, console = root.find("./devices/serial/source"), root.find("./devices/console/source")
    assert serial is not None and console is not None
    assert serial.get("path") == console.get("path") == str(tmp_path / "vmvtpl-copy-serial.log")


def test_libvirt_defines_the_copy(libvirtd: str, tmp_path: Path) -> None:  # noqa: F811
    from vmvault.connectors.libvirt.domain import connect

    copy = _copy(tmp_path, tpm=False)  # (no swtpm on the test machines: libvirt refuses a TPM at define)
    conn = connect(libvirtd)
    dom = conn.defineXML(copy.xml)  # type: ignore[attr-defined]
    try:
        root = ET.fromstring(dom.XMLDesc(2))  # VIR_DOMAIN_XML_INACTIVE
        assert root.findtext("name") == "vmvtpl-copy" and root.findtext("uuid") == copy.uuid  # type: ignore[attr-defined]
        graphics = root.find("./devices/graphics")
        assert graphics is not None and graphics.get("autoport") == "yes" and graphics.get("port") == "-1"
        agent = root.find("./devices/channel/target[@name='org.qemu.guest_agent.0']")
        assert agent is not None, "the agent channel was lost"
        cdrom = root.find("./devices/disk[@device='cdrom']")
        assert cdrom is not None and cdrom.find("source") is None
    finally:
        with contextlib.suppress(Exception):
            dom.undefineFlags(4 | 16)  # NVRAM | CHECKPOINTS_METADATA
        conn.close()


def test_enable_agent_refuses_a_transient_domain(libvirtd: str, tmp_path: Path) -> None:  # noqa: F811
    """defineXML would quietly make a transient domain persistent: refused, the domain stays as it was."""
    import secrets
    import subprocess

    from helpers import HostKeyCli  # not about passphrases (no scrypt)
    from vmvault.connectors.libvirt.domain import connect

    disk = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    name = f"vmvtrans-{secrets.token_hex(3)}"
    xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><os><type>hvm</type></os>"
           f"<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>"
           "<target dev='vda' bus='virtio'/></disk></devices></domain>")  # fmt: skip
    conn = connect(libvirtd)
    dom = conn.createXML(xml, 0)  # transient: it runs, and vanishes when destroyed
    try:
        cli = HostKeyCli(home=tmp_path / "home")
        cli.ok("vm", "add", "t1", "--libvirt", name)
        r = cli.fails("vm", "enable-agent", "t1")
        assert f"domain {name} is transient" in r.output, r.output
        assert not dom.isPersistent() and "guest_agent" not in dom.XMLDesc(0)
    finally:
        with contextlib.suppress(Exception):
            dom.destroy()
        conn.close()

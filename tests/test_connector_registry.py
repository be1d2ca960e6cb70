"""connectors/registry.py imports a connector's module on first use of its kind: a command about
a disk-image VM does not load libvirt's bindings or the QEMU connector (CLI start-up), and every
listed kind still gives the connector of that kind."""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import sys
from vmvault.connectors.registry import CONNECTORS, connector_for
assert connector_for(None).kind == "disks" and connector_for("no-such-kind").kind == "disks"
others = ("libvirt", "vmvault.connectors.qemu", "vmvault.connectors.libvirt")
loaded = sorted(m for m in sys.modules if m.startswith(others))
print("loaded:", loaded)
print("kinds:", sorted((kind, CONNECTORS[kind].kind) for kind in CONNECTORS))
"""


def test_a_disk_image_vm_loads_only_its_connector_and_every_kind_resolves() -> None:
    p = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "loaded: []" in p.stdout, p.stdout
    assert "kinds: [('disks', 'disks'), ('libvirt', 'libvirt'), ('qmp', 'qmp')]" in p.stdout, p.stdout

"""The kinds of VM this build knows: the catalog's `kind` (a VM definition's "kind") -> its connector.

Adding a kind = one folder under connectors/ with a class that implements contract.Connector, and
one line here (docs/design.md, "Connectors").
"""

from __future__ import annotations

from vmvault.connectors.contract import Connector, ImageTools
from vmvault.connectors.diskimage.connector import KIND_DISKS, DiskImageConnector
from vmvault.connectors.libvirt.connector import LibvirtConnector
from vmvault.connectors.qemu.connector import QemuConnector

CONNECTORS: dict[str, Connector] = {c.kind: c for c in (DiskImageConnector(), QemuConnector(), LibvirtConnector())}


def connector_for(kind: str | None) -> Connector:
    """The connector of a VM's kind; a VM added from its images records no kind in its definition."""
    return CONNECTORS.get(kind or KIND_DISKS) or CONNECTORS[KIND_DISKS]


def images() -> ImageTools:
    """The tools every kind's disk images share (the disk-image connector's)."""
    connector = CONNECTORS[KIND_DISKS]
    assert isinstance(connector, DiskImageConnector)
    return connector

"""The kinds of VM this build knows: the catalog's `kind` (a VM definition's "kind") -> its connector.

Adding a kind = one folder under connectors/ with a class that implements contract.Connector, and
one line in _CLASSES here (docs/design.md, "Connectors").

A connector's module is imported the first time its kind is asked for: a one-shot command about
a VM of one kind (say, restoring disk images) does not load libvirt's bindings or the QEMU
connector (about 50 ms of a CLI start-up; docs/performance.md).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vmvault.connectors.contract import Connector, ImageTools

KIND_DISKS = "disks"  # a VM added from its images (connectors/diskimage)
# kind -> (module, class); the kinds are the connectors' own `kind` (checked when one is made).
_CLASSES: dict[str, tuple[str, str]] = {
    KIND_DISKS: ("vmvault.connectors.diskimage.connector", "DiskImageConnector"),
    "qmp": ("vmvault.connectors.qemu.connector", "QemuConnector"),
    "libvirt": ("vmvault.connectors.libvirt.connector", "LibvirtConnector"),
}


class _Connectors(Mapping[str, "Connector"]):
    """Every known kind's connector, each made once, on first use."""

    def __init__(self) -> None:
        self._made: dict[str, Connector] = {}
        self._lock = threading.Lock()

    def __getitem__(self, kind: str) -> Connector:
        with self._lock:
            connector = self._made.get(kind)
            if connector is None:
                module, name = _CLASSES[kind]
                connector = getattr(importlib.import_module(module), name)()
                assert connector.kind == kind, f"{module}.{name} is of kind {connector.kind}, listed as {kind}"
                self._made[kind] = connector
            return connector

    def __iter__(self) -> Iterator[str]:
        return iter(_CLASSES)

    def __len__(self) -> int:
        return len(_CLASSES)


CONNECTORS: Mapping[str, Connector] = _Connectors()


def connector_for(kind: str | None) -> Connector:
    """The connector of a VM's kind; a VM added from its images records no kind in its definition."""
    return CONNECTORS.get(kind or KIND_DISKS) or CONNECTORS[KIND_DISKS]


def images() -> ImageTools:
    """The tools every kind's disk images share (the disk-image connector's)."""
    from vmvault.connectors.diskimage.connector import DiskImageConnector

    connector = CONNECTORS[KIND_DISKS]
    assert isinstance(connector, DiskImageConnector)
    return connector

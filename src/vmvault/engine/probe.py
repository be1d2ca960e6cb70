"""Checks a disk image before it is added to a VM or backed up."""

from __future__ import annotations

from pathlib import Path

from vmvault.hypervisor.offline import DiskInfo, qemu_img_info

__all__ = ["DiskInfo", "probe_disk"]


def probe_disk(path: Path) -> DiskInfo:
    """Format and size of an image; NotFound, InvalidInput (not an image) or VmRunning (locked)."""
    return qemu_img_info(Path(path))

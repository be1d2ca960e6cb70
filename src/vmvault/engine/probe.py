"""Checks a disk image before it is added to a VM or backed up (hypervisor/diskformat.py says why)."""

from __future__ import annotations

from vmvault.hypervisor.offline import DiskInfo, disk_info, probe_format

__all__ = ["DiskInfo", "disk_info", "probe_format"]

"""Files a libvirt domain's QEMU opens as its own user (Debian: `libvirt-qemu`, dynamic_ownership=1).

libvirt chowns a domain's disk images to that user when it starts the domain, but it does not
touch their directories nor a unix socket QEMU connects to (an instant restore's NBD export). vmvault
creates those as root, so it opens them to the group only: directories 0710 (the group may cross them,
not list them) and sockets 0660, group `libvirt-qemu`. Guest data stays unreadable by any other
local user. Without that group on the host (QEMU runs as root) nothing changes.
"""

from __future__ import annotations

import grp
import os
from pathlib import Path

QEMU_GROUP = "libvirt-qemu"  # Debian's and Ubuntu's build-time group for QEMU under libvirt


def qemu_gid() -> int | None:
    try:
        return grp.getgrnam(QEMU_GROUP).gr_gid
    except KeyError:
        return None


def open_to_qemu(path: Path, mode: int) -> None:
    """Give `path` (a directory vmvault made, or a socket it serves) to QEMU's group with `mode`."""
    gid = qemu_gid()
    if gid is None or os.geteuid() != 0:
        return
    os.chown(path, -1, gid, follow_symlinks=False)
    os.chmod(path, mode)


def open_dir_to_qemu(path: Path) -> None:
    """A domain's directory (restored disks, overlays, export sockets): traversable by QEMU's group only."""
    open_to_qemu(path, 0o710)

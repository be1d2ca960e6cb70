"""Disk formats: every disk of a VM carries the format it is opened with (and, for qcow2, its chain)

Before 0007 each backup guessed the format from the image's content, which a guest controls
(connectors/diskimage/diskformat.py). The format is now recorded in `vms.disks[].format`. This migration
guesses nothing: it copies the format `vm add` stored in the VM's definition (definition.disks,
for disk-image and QMP VMs; the domain XML's <driver type> for libvirt domains), and marks
'unknown' any disk with none; backups refuse an unknown disk until `vm set-format` records it.
A qcow2 disk gets no `chain` here: its first backup records an empty chain, or refuses a chain
with a backing file until an admin confirms it (service/backups.py disk_source).

Revision ID: 0007
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0011"
branch_labels: str | None = None
depends_on: str | None = None

_FORMATS = ("raw", "qcow2")


def _with_formats(disks: list[dict[str, Any]], definition: dict[str, Any]) -> list[dict[str, Any]]:
    defined = {str(d.get("name")): d.get("format") for d in definition.get("disks") or [] if isinstance(d, dict)}
    out = []
    for disk in disks:
        if disk.get("format") in _FORMATS or not disk.get("path"):  # imported VMs have no image to open
            out.append(disk)
            continue
        fmt = defined.get(str(disk.get("name")))
        out.append({**disk, "format": fmt if fmt in _FORMATS else "unknown"})
    return out


def _decoded(value: Any, empty: Any) -> Any:
    """A JSON column read by raw SQL: text on SQLite, already decoded by psycopg on PostgreSQL."""
    if not value:
        return empty
    return json.loads(value) if isinstance(value, str | bytes) else value


def upgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, disks, definition FROM vms")).fetchall()
    for vm_id, disks_text, definition_text in rows:
        disks = _decoded(disks_text, [])
        definition = _decoded(definition_text, {})
        if not isinstance(disks, list) or not isinstance(definition, dict):
            continue
        updated = _with_formats(disks, definition)
        if updated != disks:
            conn.execute(sa.text("UPDATE vms SET disks = :d WHERE id = :i"), {"d": json.dumps(updated), "i": vm_id})


def downgrade() -> None:
    pass  # the extra keys are ignored by older code

"""Catalog tables: an index of vaults, VMs and jobs; manifests in the vaults stay the truth.

Times are stored as ISO 8601 UTC strings with microseconds (``2025-01-02T03:04:05.123456Z``):
they sort as text and round-trip exactly into manifests.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[dict[str, Any]]: JSON}


class VaultRow(Base):
    __tablename__ = "vaults"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    storage_dir: Mapped[str] = mapped_column(String)
    uuid: Mapped[str] = mapped_column(String(64), unique=True)
    redundancy: Mapped[str] = mapped_column(String(8))
    chunk_size: Mapped[int] = mapped_column(Integer)
    created: Mapped[str] = mapped_column(String(32))


class VmRow(Base):
    __tablename__ = "vms"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # "disks" | "imported"
    disks: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{name, path}]
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)
    created: Mapped[str] = mapped_column(String(32))


class ProtectedItemRow(Base):
    __tablename__ = "protected_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"), unique=True)
    vault_id: Mapped[int] = mapped_column(ForeignKey("vaults.id"))
    protection_state: Mapped[str] = mapped_column(String(32))  # IRPending | Protected
    created: Mapped[str] = mapped_column(String(32))


class RecoveryPointRow(Base):
    __tablename__ = "recovery_points"
    __table_args__ = (Index("ix_recovery_points_vm_time", "vm_id", "time"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    vm_id: Mapped[str] = mapped_column(ForeignKey("vms.id"))
    vault_id: Mapped[int] = mapped_column(ForeignKey("vaults.id"), index=True)
    time: Mapped[str] = mapped_column(String(32))
    consistency: Mapped[str] = mapped_column(String(32))
    retain_until: Mapped[str] = mapped_column(String(32))
    disks: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # [{name, size, sourceFormat}]
    job_id: Mapped[str] = mapped_column(String(64), default="")


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status", "status"), Index("ix_jobs_start_time", "start_time"))

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    operation: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32))
    vm: Mapped[str | None] = mapped_column(String(128))
    vault: Mapped[str | None] = mapped_column(String(64))
    start_time: Mapped[str] = mapped_column(String(32))
    end_time: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[dict[str, Any]] = mapped_column(JSON)  # {percent, bytesRead, bytesWritten}
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {code, message, recommendedAction}
    owner_pid: Mapped[int] = mapped_column(Integer)
    owner_boot_id: Mapped[str] = mapped_column(String(64))
    heartbeat: Mapped[str] = mapped_column(String(32))

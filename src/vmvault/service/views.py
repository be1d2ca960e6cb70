"""Catalog rows as the JSON objects every face of vmvault shows (camelCase keys)."""

from __future__ import annotations

from typing import Any

from vmvault.catalog.clock import seconds_between
from vmvault.catalog.models import JobRow, ProtectedItemRow, RecoveryPointRow, VaultRow, VmRow

JsonDict = dict[str, Any]
NOT_PROTECTED = "NotProtected"


def empty_progress() -> JsonDict:
    return {"percent": 0.0, "bytesRead": 0, "bytesWritten": 0}


def vault_view(row: VaultRow, *, protected_items: int, recovery_points: int) -> JsonDict:
    return {
        "name": row.name,
        "uuid": row.uuid,
        "storageDir": row.storage_dir,
        "redundancy": row.redundancy,
        "chunkSize": row.chunk_size,
        "created": row.created,
        "protectedItems": protected_items,
        "recoveryPoints": recovery_points,
        # GRS: where the copy is and how far behind (from the catalog: showing never touches storage)
        "secondaryStorage": row.secondary_storage,
        "replication": row.replication if row.secondary_storage else None,
    }


def vm_view(
    row: VmRow, item: ProtectedItemRow | None, vault_name: str | None, last_point: RecoveryPointRow | None
) -> JsonDict:
    return {
        "id": row.id,
        "name": row.name,
        "kind": row.kind,
        "disks": [_disk_view(d) for d in row.disks],
        "created": row.created,
        "vault": vault_name,
        "protectionState": item.protection_state if item else NOT_PROTECTED,
        "lastRecoveryPoint": last_point.time if last_point else None,
        "quiesceTimeoutSeconds": row.quiesce_timeout_s,  # None: the service's VMVAULT_QUIESCE_TIMEOUT
        "host": row.host,  # None: the server's own host (vm add without --host)
    }


def _disk_view(d: dict[str, Any]) -> JsonDict:
    """A VM's disk with the format and qcow2 chain recorded at `vm add` (what every backup opens)."""
    return {"name": d["name"], "path": d.get("path") or None, "format": d.get("format"),
            "backingChain": d.get("chain")}  # fmt: skip


def recovery_point_view(row: RecoveryPointRow, vm: str | None = None, vault: str | None = None) -> JsonDict:
    # 0003 (service/retention.py): expires = the latest expiry of the rules keeping it (ISO UTC),
    # or its retain-until date until retention has recorded one; None: no rule expires it.
    expires = row.expiry_time if (row.expiry_time or row.retention_rules) else row.retain_until
    return {
        "id": row.id,
        "vm": vm,
        "vault": vault,
        "time": row.time,
        "consistency": row.consistency,
        "expires": expires,
        "retentionRules": list(row.retention_rules or []),
        "isSoftDeleted": bool(row.soft_deleted),
        "verification": {"state": row.verify_state, "time": row.verify_time, "problem": row.verify_problem},
    }


def job_view(row: JobRow) -> JsonDict:
    progress = {**empty_progress(), **(row.progress or {})}
    return {
        "id": row.id,
        "operation": row.operation,
        "status": row.status,
        "vm": row.vm,
        "vault": row.vault,
        "startTime": row.start_time,
        "endTime": row.end_time,
        "durationSeconds": seconds_between(row.start_time, row.end_time),
        "progress": {k: progress[k] for k in ("percent", "bytesRead", "bytesWritten")},
        "error": row.error or None,
        "cancelRequested": bool(row.cancel_requested),
        "host": (row.details or {}).get("host"),  # the host that ran it (None: queued, or before hosts)
    }

"""Service views (flat camelCase dicts) as Azure Recovery Services resources: id, name, type, properties.

The one place that builds the JSON of jobs, protected items, recovery points and vaults for both
`vmvault -o json` and the REST API (docs/api.md, "Resource shape", has the same tables in words).
Each resource has a field table `(flat key, destination)`: the destination is a dotted path in
the resource ("properties.startTime"), or "" for a key this module places itself. Adding a field
to a view is one line in its table; a key missing from the table still shows, under `properties`
with its own name (vmvault-only names must not collide with Azure's).

Every function takes an object already in this shape back unchanged, so the CLI can shape what
it prints whether it came from the local service or from a server's API.
"""

from __future__ import annotations

from typing import Any

JsonDict = dict[str, Any]
Fields = tuple[tuple[str, str], ...]

JOB_TYPE = "Microsoft.RecoveryServices/vaults/backupJobs"
ITEM_TYPE = "Microsoft.RecoveryServices/vaults/backupFabrics/protectionContainers/protectedItems"
POINT_TYPE = f"{ITEM_TYPE}/recoveryPoints"
VAULT_TYPE = "Microsoft.RecoveryServices/vaults"
CANCELLING = "Cancelling"  # Azure's status of a job whose cancellation was asked and is under way
SOFT_DELETED = "SoftDeleted"  # vmvault's catalog state; Azure shows ProtectionStopped + isScheduledForDeferredDelete

JOB_FIELDS: Fields = (
    ("id", ""),
    ("vm", ""),
    ("operation", "properties.operation"),
    ("status", ""),
    ("startTime", "properties.startTime"),
    ("endTime", "properties.endTime"),
    ("durationSeconds", ""),
    ("error", ""),
    ("vault", "properties.vaultName"),
    ("progress", ""),
    ("cancelRequested", ""),
    ("host", "properties.host"),  # the host that ran it (vm add --host: its agent)
    ("deferredDeleteTimeInUTC", "properties.deferredDeleteTimeInUTC"),  # DeleteBackupData: when it is purged
    ("extendedInfo", ""),
)
# job show's extendedInfo: destinations under properties.extendedInfo.
JOB_EXTENDED_FIELDS: Fields = (
    ("tasksList", ""),
    ("trigger", "trigger"),
    ("policy", "policy"),
    ("scheduledFor", "scheduledFor"),
    ("plannedStart", "plannedStart"),
    ("retainUntil", "retainUntil"),
    ("recoveryPoint", "recoveryPoint"),
    ("restore", "restore"),
    ("queued", "queued"),
    ("cancelRequested", "cancelRequested"),
    ("owner", "owner"),
    ("heartbeat", "heartbeat"),
    ("rateBytesPerSecond", "rateBytesPerSecond"),
    ("storageRetries", "storageRetries"),
)
ITEM_FIELDS: Fields = (
    ("name", ""),
    ("vault", "properties.vaultName"),
    ("policy", ""),
    ("protectionState", ""),
    ("deferredDeleteTime", ""),
    ("healthStatus", ""),
    ("lastBackupStatus", "properties.lastBackupStatus"),
    ("lastBackupTime", "properties.lastBackupTime"),
    ("lastRecoveryPoint", "properties.lastRecoveryPoint"),
    ("recoveryPoints", "properties.extendedInfo.recoveryPointCount"),
    ("oldestRecoveryPoint", "properties.extendedInfo.oldestRecoveryPoint"),
    ("lastBackupJob", "properties.lastBackupJobId"),
    ("lastBackupError", "properties.lastBackupError"),
    ("nextScheduledBackup", "properties.nextScheduledBackup"),
    ("timeZone", "properties.timeZone"),
    ("excludedDisks", "properties.excludedDisks"),
    ("backupInProgress", "properties.backupInProgress"),
    ("protectedSince", "properties.protectedSince"),
    ("guestAgent", "properties.guestAgent"),
)
POINT_FIELDS: Fields = (
    ("id", ""),
    ("vm", ""),
    ("vault", ""),
    ("time", "properties.recoveryPointTime"),
    ("consistency", ""),
    ("expires", "properties.recoveryPointProperties.expiryTime"),
    ("retentionRules", ""),
    ("isSoftDeleted", "properties.recoveryPointProperties.isSoftDeleted"),
    ("verification", "properties.verification"),
)
VAULT_FIELDS: Fields = (
    ("name", ""),
    ("redundancy", ""),
    ("uuid", "properties.uuid"),
    ("storageDir", "properties.storageDir"),
    ("secondaryStorage", "properties.secondaryStorage"),
    ("replication", "properties.replication"),
    ("chunkSize", "properties.chunkSize"),
    ("created", "properties.created"),
    ("protectedItems", "properties.protectedItems"),
    ("recoveryPoints", "properties.recoveryPoints"),
    ("storageDeleted", "properties.storageDeleted"),
)
REDUNDANCY = {"LRS": "LocallyRedundant", "GRS": "GeoRedundant"}


def is_resource(obj: Any) -> bool:
    """Already shaped (e.g. an API answer the CLI prints as it came)."""
    return isinstance(obj, dict) and "properties" in obj and "type" in obj


def _place(resource: JsonDict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = resource
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def _apply(view: JsonDict, fields: Fields, resource: JsonDict, under: str = "properties") -> None:
    """Place the view's keys by the table; keys the table does not name go under `under` as they are."""
    named = {key for key, _ in fields}
    for key, dest in fields:
        if dest and key in view:
            _place(resource, dest if under == "properties" else f"{under}.{dest}", view[key])
    for key, value in view.items():
        if key not in named:
            _place(resource, f"{under}.{key}", value)


def iso_duration(seconds: float | None) -> str | None:
    """Seconds as ISO 8601 (PT1H2M3.5S), as Azure writes a job's duration."""
    if seconds is None:
        return None
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes = rest // 60
    secs = round(seconds - hours * 3600 - minutes * 60, 3)
    text = "PT" + (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
    return text + f"{secs:g}S"


# ---- jobs ---------------------------------------------------------------------------------------


def job_id(vault: str | None, name: str) -> str:
    return f"/vaults/{vault}/backupJobs/{name}" if vault else f"/backupJobs/{name}"


def job(view: JsonDict) -> JsonDict:
    """A job (list or show) as an AzureIaaSVMJob resource."""
    if is_resource(view):
        return view
    extended = view.get("extendedInfo") or {}
    cancel_requested = bool(view.get("cancelRequested", extended.get("cancelRequested")))
    status = CANCELLING if view.get("status") == "InProgress" and cancel_requested else view.get("status")
    resource: JsonDict = {"id": job_id(view.get("vault"), view["id"]), "name": view["id"], "type": JOB_TYPE}
    resource["properties"] = {
        "jobType": "AzureIaaSVMJob",
        "entityFriendlyName": view.get("vm") or view.get("vault"),
        "backupManagementType": "AzureIaasVM",
        "operation": view.get("operation"),
        "status": status,
    }
    _apply(view, JOB_FIELDS, resource)
    resource["properties"]["duration"] = iso_duration(view.get("durationSeconds"))
    resource["properties"]["errorDetails"] = error_details(view.get("error"))
    resource["properties"]["extendedInfo"] = _job_extended(view, extended)
    return resource


def error_details(error: JsonDict | None) -> list[JsonDict]:
    """vmvault's {code, message, recommendedAction, ...} as Azure's errorDetails list."""
    if not error:
        return []
    hint = error.get("recommendedAction") or error.get("hint")
    detail: JsonDict = {
        "errorCode": error.get("code"),
        "errorString": error.get("message"),
        "recommendations": [hint] if hint else [],
    }
    detail.update((k, v) for k, v in error.items() if k not in ("code", "message", "recommendedAction", "hint"))
    return [detail]


def error_of(job_resource: JsonDict) -> JsonDict | None:
    """The first errorDetails entry back as vmvault's {code, message, recommendedAction} (CLI errors)."""
    details = job_resource.get("properties", {}).get("errorDetails") or []
    if not details:
        return None
    first = details[0]
    hints = first.get("recommendations") or []
    return {"code": first.get("errorCode"), "message": first.get("errorString"),
            "recommendedAction": hints[0] if hints else None}  # fmt: skip


def _job_extended(view: JsonDict, extended: JsonDict) -> JsonDict:
    progress = view.get("progress") or {}
    out: JsonDict = {
        "progressPercentage": progress.get("percent", 0.0),
        "bytesRead": progress.get("bytesRead", 0),
        "bytesWritten": progress.get("bytesWritten", 0),
        "propertyBag": _property_bag(view, extended),
    }
    if extended:
        out["tasksList"] = [_task(t) for t in extended.get("tasksList") or []]
        holder: JsonDict = {"x": out}
        _apply(extended, JOB_EXTENDED_FIELDS, holder, under="x")
    return out


def _property_bag(view: JsonDict, extended: JsonDict) -> dict[str, str]:
    """Azure's propertyBag: strings only, named as the portal shows them."""
    bag = {"VM Name": view.get("vm"), "Vault Name": view.get("vault"), "Recovery Point": extended.get("recoveryPoint")}
    written = (view.get("progress") or {}).get("bytesWritten")
    if view.get("operation") == "Backup" and written:
        bag["Backup Size"] = f"{written / (1 << 20):.0f} MB"
    return {k: str(v) for k, v in bag.items() if v}


def _task(task: JsonDict) -> JsonDict:
    from vmvault.catalog.clock import seconds_between

    start, end = task.get("startTime"), task.get("endTime")
    seconds = seconds_between(start, end) if start else None
    return {**task, "duration": iso_duration(seconds)}


# ---- protected items ----------------------------------------------------------------------------


def item_id(vault: str | None, vm: str) -> str:
    return f"/vaults/{vault}/backupProtectedItems/{vm}"


def policy_id(vault: str | None, policy: str) -> str:
    return f"/vaults/{vault}/backupPolicies/{policy}"


def item(view: JsonDict) -> JsonDict:
    """A protected item as an AzureIaaSComputeVMProtectedItem resource."""
    if is_resource(view):
        return view
    vm, vault = view["name"], view.get("vault")
    state = view.get("protectionState")
    soft_deleted = state == SOFT_DELETED
    health = view.get("healthStatus")
    resource: JsonDict = {"id": item_id(vault, vm), "name": vm, "type": ITEM_TYPE}
    resource["properties"] = {
        "protectedItemType": "Microsoft.Compute/virtualMachines",
        "backupManagementType": "AzureIaasVM",
        "workloadType": "VM",
        "friendlyName": vm,
        "virtualMachineId": f"/vms/{vm}",
        "sourceResourceId": f"/vms/{vm}",
        "protectionState": "ProtectionStopped" if soft_deleted else state,
        "protectionStatus": "Unhealthy" if health == "ActionRequired" else "Healthy",
        "healthStatus": health,
        "policyId": policy_id(vault, view["policy"]) if view.get("policy") else None,
        "policyName": view.get("policy"),
        "isScheduledForDeferredDelete": soft_deleted,
        "deferredDeleteTimeInUTC": view.get("deferredDeleteTime") if soft_deleted else None,
    }
    _apply(view, ITEM_FIELDS, resource)
    resource["properties"].setdefault("extendedInfo", {}).setdefault("policyInconsistent", False)
    return resource


# ---- recovery points ----------------------------------------------------------------------------


def recovery_point(view: JsonDict) -> JsonDict:
    """A recovery point as an IaasVMRecoveryPoint resource (its name is what --rp takes)."""
    if is_resource(view):
        return view
    rules = list(view.get("retentionRules") or [])
    resource: JsonDict = {
        "id": f"{item_id(view.get('vault'), view.get('vm') or '')}/recoveryPoints/{view['id']}",
        "name": view["id"],
        "type": POINT_TYPE,
        "properties": {
            "objectType": "IaasVMRecoveryPoint",
            "recoveryPointType": view.get("consistency"),  # AppConsistent, FileSystemConsistent, CrashConsistent
            "recoveryPointTime": view.get("time"),
            "recoveryPointProperties": {"ruleName": rules[0] if rules else None},
            "retentionRules": rules,
        },
    }
    _apply(view, POINT_FIELDS, resource)
    return resource


def recovery_points(views: list[JsonDict]) -> list[JsonDict]:
    """Newest first, as Azure lists them (`--query [0].name` is the latest point)."""
    shaped = [recovery_point(v) for v in views]
    return sorted(shaped, key=lambda r: (r["properties"].get("recoveryPointTime") or "", r["name"]), reverse=True)


# ---- vaults -------------------------------------------------------------------------------------


def vault(view: JsonDict) -> JsonDict:
    """A vault as a Microsoft.RecoveryServices/vaults resource."""
    if is_resource(view):
        return view
    redundancy = view.get("redundancy")
    resource: JsonDict = {
        "id": f"/vaults/{view['name']}",
        "name": view["name"],
        "type": VAULT_TYPE,
        "location": "local",
        "sku": {"name": "RS0", "tier": "Standard"},
        "properties": {
            "provisioningState": "Succeeded",
            "redundancySettings": {
                "standardTierStorageRedundancy": REDUNDANCY.get(redundancy or "", redundancy),
                "crossRegionRestore": "Enabled" if view.get("secondaryStorage") else "Disabled",
            },
            "redundancy": redundancy,
        },
    }
    _apply(view, VAULT_FIELDS, resource)
    return resource


# ---- lists --------------------------------------------------------------------------------------


def jobs(views: list[JsonDict]) -> list[JsonDict]:
    return [job(v) for v in views]


def items(views: list[JsonDict]) -> list[JsonDict]:
    return [item(v) for v in views]


def vaults(views: list[JsonDict]) -> list[JsonDict]:
    return [vault(v) for v in views]

"""Protected items: protection, backup now, recovery points and restores of a VM."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field

from vmvault.api.auth import Permission, Scope, check_vault, require, visible
from vmvault.api.deps import Caller, Ctx, Jobs
from vmvault.api.routes.common import ROUTE_CLASS, Body
from vmvault.service import backups, items, protection, restores, softdelete

router = APIRouter(tags=["items"], route_class=ROUTE_CLASS)


class ProtectionEnable(Body):
    vault: str = Field(max_length=64)
    policy: str | None = Field(default=None, max_length=64)
    exclude_disks: list[str] = Field(default_factory=list)


class ProtectionUpdate(Body):
    policy: str | None = Field(default=None, max_length=64)
    exclude_disks: list[str] | None = Field(default=None, description="[]: back every disk up again")


class ProtectionDisable(Body):
    delete_data: bool = Field(default=False, description="Also soft delete the backup data (purged after 14 days)")


class ProtectionResume(Body):
    policy: str | None = Field(default=None, max_length=64)


class BackupNow(Body):
    retain_until: str | None = Field(default=None, max_length=32, description="YYYY-MM-DD (default: 30 days)")


class Restore(Body):
    rp: str = Field(max_length=64, description="Recovery point id")
    target_dir: str = Field(description="Directory on the server to write <disk>.raw|.qcow2 into")
    format: str | None = Field(default=None, description="raw or qcow2 (default: as backed up)")
    force: bool = False
    disks: list[str] | None = None


@router.get("/items", dependencies=[require(Permission.READ, Scope.GLOBAL)])
def list_items(ctx: Ctx, caller: Caller, vault: str | None = None) -> list[dict[str, Any]]:
    return visible(caller, items.list_items(ctx, vault))


@router.get("/items/{vm}", dependencies=[require(Permission.READ, Scope.VM)])
def show_item(vm: str, ctx: Ctx) -> dict[str, Any]:
    return items.show_item(ctx, vm)


@router.post("/items/{vm}/enable", dependencies=[require(Permission.PROTECTION_ENABLE, Scope.BODY)])
def enable_protection(vm: str, body: ProtectionEnable, ctx: Ctx, caller: Caller) -> dict[str, Any]:
    check_vault(caller, body.vault)
    return protection.enable_protection(ctx, vm, body.vault, policy=body.policy, exclude_disks=body.exclude_disks)


@router.post("/items/{vm}/update", dependencies=[require(Permission.PROTECTION_CHANGE, Scope.VM)])
def update_protection(vm: str, body: ProtectionUpdate, ctx: Ctx) -> dict[str, Any]:
    return protection.update_protection(ctx, vm, policy=body.policy, exclude_disks=body.exclude_disks)


@router.post("/items/{vm}/disable", dependencies=[require(Permission.PROTECTION_CHANGE, Scope.VM)])
def disable_protection(vm: str, body: ProtectionDisable, ctx: Ctx) -> dict[str, Any]:
    if body.delete_data:
        return softdelete.delete_backup_data(ctx, vm)
    return protection.disable_protection(ctx, vm)


@router.post("/items/{vm}/resume", dependencies=[require(Permission.PROTECTION_ENABLE, Scope.VM)])
def resume_protection(vm: str, body: ProtectionResume, ctx: Ctx) -> dict[str, Any]:
    return protection.resume_protection(ctx, vm, policy=body.policy)


@router.post("/items/{vm}/undelete", dependencies=[require(Permission.PROTECTION_CHANGE, Scope.VM)])
def undelete(vm: str, ctx: Ctx) -> dict[str, Any]:
    return softdelete.undelete(ctx, vm)


@router.post("/items/{vm}/backup", status_code=202, dependencies=[require(Permission.BACKUP, Scope.VM)])
def backup_now(vm: str, body: BackupNow, ctx: Ctx, jobs: Jobs) -> dict[str, Any]:
    return jobs.start(lambda cancel: backups.backup_now(ctx, vm, retain_until=body.retain_until, cancel=cancel))


@router.get("/items/{vm}/recoverypoints", dependencies=[require(Permission.READ, Scope.VM)])
def list_recovery_points(
    vm: str, ctx: Ctx, include_deleted: Annotated[bool, Query(alias="includeDeleted")] = False
) -> list[dict[str, Any]]:
    return backups.list_recovery_points(ctx, vm, include_deleted=include_deleted)


@router.post("/items/{vm}/restore", status_code=202, dependencies=[require(Permission.RESTORE, Scope.VM)])
def restore_disks(vm: str, body: Restore, ctx: Ctx, jobs: Jobs) -> dict[str, Any]:
    return jobs.start(
        lambda cancel: restores.restore_disks(
            ctx, vm, body.rp, body.target_dir, fmt=body.format, force=body.force, disks=body.disks, cancel=cancel
        )
    )

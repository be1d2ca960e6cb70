"""Protected items: protection, backup now, recovery points and restores of a VM."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import Field

from vmvault.api.auth import Permission, Scope, check_vault, require, visible
from vmvault.api.deps import Caller, Ctx, Jobs
from vmvault.api.routes.common import ROUTE_CLASS, Body, Pages
from vmvault.api.schemas import ACCEPTED, Job, Page, ProtectedItem, RecoveryPoint
from vmvault.service import azure_shape, backups, items, protection, restore_vm, restores, softdelete

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
    format: Literal["raw", "qcow2"] | None = Field(default=None, description="Default: as backed up")
    force: bool = False
    disks: list[str] | None = None


class RestoreVm(Body):
    rp: str = Field(max_length=64, description="Recovery point id")
    name: str = Field(max_length=128, description="Name of the new VM")
    target_dir: str | None = Field(default=None, description="Directory on the server (default: HOME/vms/NAME)")
    format: Literal["raw", "qcow2"] | None = Field(default=None, description="Default: as backed up")
    start: bool = Field(default=False, description="Boot the new VM and wait for its guest agent")
    instant: bool = Field(
        default=False, description="Boot it at once from the vault's export; its disks are copied in the background"
    )


class ReplaceDisks(Body):
    rp: str = Field(max_length=64, description="Recovery point id")


@router.get("/items", response_model=Page[ProtectedItem], dependencies=[require(Permission.READ, Scope.GLOBAL)])
def list_items(ctx: Ctx, caller: Caller, pages: Pages, vault: str | None = None) -> dict[str, Any]:
    return pages.page(visible(caller, items.list_items(ctx, vault)))


@router.get("/items/{vm}", response_model=ProtectedItem, dependencies=[require(Permission.READ, Scope.VM)])
def show_item(vm: str, ctx: Ctx) -> dict[str, Any]:
    return items.show_item(ctx, vm)


@router.post("/items/{vm}/enable", response_model=Job, dependencies=[require(Permission.PROTECTION_ENABLE, Scope.BODY)])
def enable_protection(vm: str, body: ProtectionEnable, ctx: Ctx, caller: Caller) -> dict[str, Any]:
    check_vault(caller, body.vault)
    return protection.enable_protection(ctx, vm, body.vault, policy=body.policy, exclude_disks=body.exclude_disks)


@router.post("/items/{vm}/update", response_model=Job, dependencies=[require(Permission.PROTECTION_CHANGE, Scope.VM)])
def update_protection(vm: str, body: ProtectionUpdate, ctx: Ctx) -> dict[str, Any]:
    return protection.update_protection(ctx, vm, policy=body.policy, exclude_disks=body.exclude_disks)


@router.post("/items/{vm}/disable", response_model=Job, dependencies=[require(Permission.PROTECTION_CHANGE, Scope.VM)])
def disable_protection(vm: str, body: ProtectionDisable, ctx: Ctx) -> dict[str, Any]:
    if body.delete_data:
        return softdelete.delete_backup_data(ctx, vm)
    return protection.disable_protection(ctx, vm)


@router.post("/items/{vm}/resume", response_model=Job, dependencies=[require(Permission.PROTECTION_ENABLE, Scope.VM)])
def resume_protection(vm: str, body: ProtectionResume, ctx: Ctx) -> dict[str, Any]:
    return protection.resume_protection(ctx, vm, policy=body.policy)


@router.post("/items/{vm}/undelete", response_model=Job, dependencies=[require(Permission.PROTECTION_CHANGE, Scope.VM)])
def undelete(vm: str, ctx: Ctx) -> dict[str, Any]:
    return softdelete.undelete(ctx, vm)


@router.post(
    "/items/{vm}/backup",
    response_model=Job,
    status_code=202,
    responses=ACCEPTED,
    dependencies=[require(Permission.BACKUP, Scope.VM)],
)
def backup_now(vm: str, body: BackupNow, ctx: Ctx, jobs: Jobs) -> dict[str, Any]:
    return jobs.start(lambda cancel: backups.backup_now(ctx, vm, retain_until=body.retain_until, cancel=cancel))


@router.get(
    "/items/{vm}/recoverypoints", response_model=Page[RecoveryPoint], dependencies=[require(Permission.READ, Scope.VM)]
)
def list_recovery_points(
    vm: str, ctx: Ctx, pages: Pages, include_deleted: Annotated[bool, Query(alias="includeDeleted")] = False
) -> dict[str, Any]:
    """Newest first, as Azure lists them."""
    points = backups.list_recovery_points(ctx, vm, include_deleted=include_deleted)
    return pages.page(azure_shape.recovery_points(points))


@router.post(
    "/items/{vm}/restore",
    response_model=Job,
    status_code=202,
    responses=ACCEPTED,
    dependencies=[require(Permission.RESTORE, Scope.VM)],
)
def restore_disks(vm: str, body: Restore, ctx: Ctx, jobs: Jobs) -> dict[str, Any]:
    return jobs.start(
        lambda cancel: restores.restore_disks(
            ctx, vm, body.rp, body.target_dir, fmt=body.format, force=body.force, disks=body.disks, cancel=cancel
        )
    )


@router.post(
    "/items/{vm}/restore/vm",
    response_model=Job,
    status_code=202,
    responses=ACCEPTED,
    dependencies=[require(Permission.RESTORE, Scope.VM)],
)
def restore_as_new_vm(vm: str, body: RestoreVm, ctx: Ctx, jobs: Jobs) -> dict[str, Any]:
    """Restore a point as a new VM (plain QEMU or libvirt): new name, UUID, MACs and paths."""
    return jobs.start(
        lambda cancel: restores.restore_as_new_vm(
            ctx,
            vm,
            body.rp,
            body.name,
            target_dir=body.target_dir,
            fmt=body.format,
            start=body.start,
            instant=body.instant,
            cancel=cancel,
        )
    )


@router.post(
    "/items/{vm}/restore/replace-disks",
    response_model=Job,
    status_code=202,
    responses=ACCEPTED,
    dependencies=[require(Permission.RESTORE, Scope.VM)],
)
def replace_disks(vm: str, body: ReplaceDisks, ctx: Ctx, jobs: Jobs) -> dict[str, Any]:
    """Overwrite a stopped VM's disks with the point's (all restored and verified first, then swapped)."""
    return jobs.start(lambda cancel: restore_vm.replace_disks(ctx, vm, body.rp, cancel=cancel))

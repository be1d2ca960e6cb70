"""Vaults, their usage (vault list|show|create|delete|verify, vault usage)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field

from vmvault.api.auth import Permission, Scope, require, visible
from vmvault.api.deps import Caller, Ctx, Jobs
from vmvault.api.routes.common import ROUTE_CLASS, Body, Pages
from vmvault.api.schemas import ACCEPTED, DeletedVault, Job, Page, Report, Usage, Vault
from vmvault.service import reports, usage, vaults

router = APIRouter(tags=["vaults"], route_class=ROUTE_CLASS)


class VaultCreate(Body):
    name: str = Field(max_length=64)
    storage_dir: str | None = None
    redundancy: str = "LRS"
    passphrase: str | None = Field(
        default=None, description="12+ characters, not a common password; default: the server's VMVAULT_PASSPHRASE"
    )
    time_zone: str = Field(default="UTC", max_length=64)


class VaultImport(Body):
    storage_dir: str = Field(description="The directory on the server that holds the vault")
    name: str | None = Field(
        default=None, max_length=64, description="Register it under this name (default: the directory's)"
    )
    passphrase: str | None = Field(default=None, description="Default: the server's VMVAULT_PASSPHRASE")


class VaultVerify(Body):
    rp: str | None = Field(default=None, max_length=64, description="Verify only this recovery point")


@router.get("/vaults", response_model=Page[Vault], dependencies=[require(Permission.READ, Scope.GLOBAL)])
def list_vaults(ctx: Ctx, caller: Caller, pages: Pages) -> dict[str, Any]:
    return pages.page(visible(caller, vaults.list_vaults(ctx), key="name"))


@router.post(
    "/vaults", response_model=Vault, status_code=201, dependencies=[require(Permission.VAULT_CREATE, Scope.GLOBAL)]
)
def create_vault(body: VaultCreate, ctx: Ctx) -> dict[str, Any]:
    return vaults.create_vault(
        ctx,
        body.name,
        storage_dir=body.storage_dir,
        redundancy=body.redundancy,
        passphrase=body.passphrase,
        time_zone=body.time_zone,
    )


@router.post(
    "/vaults/import",
    response_model=Vault,
    status_code=201,
    dependencies=[require(Permission.VAULT_CREATE, Scope.GLOBAL)],
)
def import_vault(body: VaultImport, ctx: Ctx) -> dict[str, Any]:
    """Register an existing vault directory; its VMs and recovery points are rebuilt from its manifests."""
    return vaults.import_vault(ctx, body.storage_dir, name=body.name, passphrase=body.passphrase)


@router.get("/vaults/{vault}", response_model=Vault, dependencies=[require(Permission.READ, Scope.VAULT)])
def show_vault(vault: str, ctx: Ctx) -> dict[str, Any]:
    return vaults.show_vault(ctx, vault)


@router.delete(
    "/vaults/{vault}", response_model=DeletedVault, dependencies=[require(Permission.VAULT_DELETE, Scope.VAULT)]
)
def delete_vault(
    vault: str, ctx: Ctx, keep_storage: Annotated[bool, Query(alias="keepStorage")] = False
) -> dict[str, Any]:
    return vaults.delete_vault(ctx, vault, keep_storage=keep_storage)


@router.post(
    "/vaults/{vault}/verify",
    response_model=Job,
    status_code=202,
    responses=ACCEPTED,
    dependencies=[require(Permission.VAULT_VERIFY, Scope.VAULT)],
)
def verify_vault(vault: str, body: VaultVerify, ctx: Ctx, jobs: Jobs) -> dict[str, Any]:
    return jobs.start(lambda cancel: vaults.verify_vault(ctx, vault, rp_id=body.rp, cancel=cancel))


@router.get("/vaults/{vault}/usage", response_model=Usage, dependencies=[require(Permission.READ, Scope.VAULT)])
def vault_usage(vault: str, ctx: Ctx) -> dict[str, Any]:
    return usage.vault_usage(ctx, vault)


@router.get("/reports", response_model=Report, dependencies=[require(Permission.READ, Scope.GLOBAL)])
def backup_report(
    ctx: Ctx, caller: Caller, days: Annotated[int, Query(ge=1, le=3660, description="The last N days.")] = 30
) -> dict[str, Any]:
    """Per protected item and per vault: success rate, data transferred, growth, durations, RPO breaches
    (the data of the portal's Reports page and of `vmvault report`); a vault-scoped token sees its vault."""
    report = reports.backup_report(ctx, days)
    report["rows"] = visible(caller, report["rows"], key="vault")
    return report

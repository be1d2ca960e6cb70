"""Backup policies of a vault (policy list|show|create|set|delete)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from vmvault.api.auth import Permission, Scope, require
from vmvault.api.deps import Ctx
from vmvault.api.routes.common import ROUTE_CLASS, Body, Pages
from vmvault.api.schemas import Page, Policy
from vmvault.service import policies

router = APIRouter(tags=["policies"], route_class=ROUTE_CLASS)


class PolicyCreate(Body):
    name: str = Field(max_length=64)
    policy: dict[str, Any] = Field(description="Azure's policy document, as `vmvault policy create` reads it")


class PolicySet(Body):
    policy: dict[str, Any] = Field(description="The new policy document")


@router.get(
    "/vaults/{vault}/policies", response_model=Page[Policy], dependencies=[require(Permission.READ, Scope.VAULT)]
)
def list_policies(vault: str, ctx: Ctx, pages: Pages) -> dict[str, Any]:
    return pages.page(policies.list_policies(ctx, vault))


@router.post(
    "/vaults/{vault}/policies",
    response_model=Policy,
    status_code=201,
    dependencies=[require(Permission.POLICY_WRITE, Scope.VAULT)],
)
def create_policy(vault: str, body: PolicyCreate, ctx: Ctx) -> dict[str, Any]:
    return policies.create_policy(ctx, vault, body.name, body.policy)


@router.get(
    "/vaults/{vault}/policies/{policy}", response_model=Policy, dependencies=[require(Permission.READ, Scope.VAULT)]
)
def show_policy(vault: str, policy: str, ctx: Ctx) -> dict[str, Any]:
    return policies.show_policy(ctx, vault, policy)


@router.put(
    "/vaults/{vault}/policies/{policy}",
    response_model=Policy,
    dependencies=[require(Permission.POLICY_WRITE, Scope.VAULT)],
)
def set_policy(vault: str, policy: str, body: PolicySet, ctx: Ctx) -> dict[str, Any]:
    return policies.set_policy(ctx, vault, policy, body.policy)


@router.delete(
    "/vaults/{vault}/policies/{policy}", status_code=204, dependencies=[require(Permission.POLICY_WRITE, Scope.VAULT)]
)
def delete_policy(vault: str, policy: str, ctx: Ctx) -> None:
    policies.delete_policy(ctx, vault, policy)

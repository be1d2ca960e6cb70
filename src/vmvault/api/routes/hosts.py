"""Hosts of the deployment (service/hosts.py): list and show (readers), remove an Offline one (Owner only)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from vmvault.api.auth import Permission, Scope, require, vault_of_vm
from vmvault.api.deps import Caller, Ctx
from vmvault.api.routes.common import ROUTE_CLASS, Pages
from vmvault.api.schemas import Host as HostView
from vmvault.api.schemas import HostDetail, Page, RemovedHost
from vmvault.service import hosts, jobs

router = APIRouter(tags=["hosts"], route_class=ROUTE_CLASS)


@router.get("/hosts", response_model=Page[HostView], dependencies=[require(Permission.READ, Scope.GLOBAL)])
def list_hosts(ctx: Ctx, pages: Pages) -> dict[str, Any]:
    return pages.page(hosts.list_hosts(ctx))


@router.get("/hosts/{name}", response_model=HostDetail, dependencies=[require(Permission.READ, Scope.GLOBAL)])
def show_host(name: str, ctx: Ctx, principal: Caller) -> dict[str, Any]:
    view = hosts.show_host(ctx, name)
    if principal.vault is not None:  # a vault-scoped token: the names of its own vault's VMs and jobs only
        view["vmNames"] = [vm for vm in view["vmNames"] if vault_of_vm(ctx, vm) == principal.vault]
        mine = {j["id"] for j in jobs.list_jobs(ctx, status="InProgress") if j["vault"] == principal.vault}
        view["runningJobIds"] = [j for j in view["runningJobIds"] if j in mine]
    return view


@router.delete("/hosts/{name}", response_model=RemovedHost, dependencies=[require(Permission.HOSTS, Scope.GLOBAL)])
def remove_host(name: str, ctx: Ctx) -> dict[str, Any]:
    return hosts.remove_host(ctx, name)

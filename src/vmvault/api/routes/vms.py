"""VMs vmvault knows (vm list|show|add|enable-agent)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from vmvault.api.auth import Permission, Scope, require, visible
from vmvault.api.deps import Caller, Ctx
from vmvault.api.routes.common import ROUTE_CLASS, Body, Pages
from vmvault.api.schemas import AgentChannel, Page, Vm, VmWithStatus
from vmvault.service import vms

router = APIRouter(tags=["vms"], route_class=ROUTE_CLASS)


class VmAdd(Body):
    name: str = Field(max_length=128)
    disks: list[str] = Field(description="Disk image paths on the server, in order: disk0, disk1, ...")
    formats: list[str] | None = Field(
        None, description="raw or qcow2, one for all disks or one per disk; without it, guessed once and recorded"
    )


@router.get("/vms", response_model=Page[VmWithStatus], dependencies=[require(Permission.READ, Scope.GLOBAL)])
def list_vms(ctx: Ctx, caller: Caller, pages: Pages) -> dict[str, Any]:
    return pages.page(visible(caller, vms.list_vms_with_status(ctx)))


@router.post("/vms", response_model=Vm, status_code=201, dependencies=[require(Permission.VM_WRITE, Scope.GLOBAL)])
def add_vm(body: VmAdd, ctx: Ctx) -> dict[str, Any]:
    return vms.add_vm(ctx, body.name, list(body.disks), body.formats)


@router.get("/vms/{vm}", response_model=Vm, dependencies=[require(Permission.READ, Scope.VM)])
def show_vm(vm: str, ctx: Ctx) -> dict[str, Any]:
    return vms.show_vm(ctx, vm)


@router.post(
    "/vms/{vm}/enable-agent", response_model=AgentChannel, dependencies=[require(Permission.VM_WRITE, Scope.VM)]
)
def enable_agent(vm: str, ctx: Ctx) -> dict[str, Any]:
    """Add the guest agent channel to a libvirt domain's definition, for its next boot."""
    from vmvault.service import agents

    return agents.enable_agent(ctx, vm)

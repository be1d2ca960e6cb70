"""VMs vmvault knows (vm list|show|add|update|enable-agent)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from vmvault.api.auth import Permission, Scope, require, visible
from vmvault.api.deps import Caller, Ctx
from vmvault.api.routes.common import ROUTE_CLASS, Body, Pages
from vmvault.api.schemas import AgentChannel, Page, Vm, VmWithStatus
from vmvault.service import vms
from vmvault.service.quiesce import MAX_TIMEOUT_S, set_quiesce_timeout

router = APIRouter(tags=["vms"], route_class=ROUTE_CLASS)


class VmAdd(Body):
    name: str = Field(max_length=128)
    disks: list[str] = Field(default_factory=list, max_length=64,
                             description="Disk image paths, in order: disk0, disk1, ... (on the server; with "
                             "host, on that host)")  # fmt: skip
    formats: list[str] | None = Field(
        None, description="raw or qcow2, one for all disks or one per disk; without it, guessed once and recorded"
    )
    host: str | None = Field(None, max_length=128, description="The VM's host: its agent runs its jobs (vm add --host)")
    qmp: str | None = Field(None, max_length=4096, description="With host: a running QEMU's QMP socket on that host")
    guest_agent: str | None = Field(None, max_length=4096, description="With qmp: its guest agent socket")
    libvirt: str | None = Field(None, max_length=256, description="With host: a libvirt domain of that host")
    connect: str | None = Field(None, max_length=512, description="With libvirt: its URI (default qemu:///system)")


class VmUpdate(Body):
    quiesce_timeout_seconds: int = Field(
        strict=True,
        ge=0,
        le=MAX_TIMEOUT_S,
        description="Seconds a live backup's freeze may take, the guest's fsfreeze hooks included (1-3600; "
        "0: the service's VMVAULT_QUIESCE_TIMEOUT, default 60)",
    )


@router.get("/vms", response_model=Page[VmWithStatus], dependencies=[require(Permission.READ, Scope.GLOBAL)])
def list_vms(ctx: Ctx, caller: Caller, pages: Pages) -> dict[str, Any]:
    return pages.page(visible(caller, vms.list_vms_with_status(ctx)))


@router.post("/vms", response_model=Vm, status_code=201, dependencies=[require(Permission.VM_WRITE, Scope.GLOBAL)])
def add_vm(body: VmAdd, ctx: Ctx) -> dict[str, Any]:
    from vmvault.service import hostvms

    if body.host is None and not (body.qmp or body.guest_agent or body.libvirt or body.connect):
        return vms.add_vm(ctx, body.name, list(body.disks), body.formats)
    return hostvms.add_vm_on_host(ctx, body.name, body.host, disks=list(body.disks), formats=body.formats,
                                  qmp=body.qmp, guest_agent=body.guest_agent, libvirt=body.libvirt,
                                  connect=body.connect)  # fmt: skip


@router.get("/vms/{vm}", response_model=Vm, dependencies=[require(Permission.READ, Scope.VM)])
def show_vm(vm: str, ctx: Ctx) -> dict[str, Any]:
    return vms.show_vm(ctx, vm)


@router.post("/vms/{vm}/update", response_model=Vm, dependencies=[require(Permission.VM_WRITE, Scope.VM)])
def update_vm(vm: str, body: VmUpdate, ctx: Ctx) -> dict[str, Any]:
    """Change a VM's settings (as `vmvault vm update`): its quiesce budget."""
    set_quiesce_timeout(ctx, vm, body.quiesce_timeout_seconds)
    return vms.show_vm(ctx, vm)


@router.post(
    "/vms/{vm}/enable-agent", response_model=AgentChannel, dependencies=[require(Permission.VM_WRITE, Scope.VM)]
)
def enable_agent(vm: str, ctx: Ctx) -> dict[str, Any]:
    """Add the guest agent channel to a libvirt domain's definition, for its next boot."""
    from vmvault.service import agents

    return agents.enable_agent(ctx, vm)

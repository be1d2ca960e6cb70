"""Add a VM in the portal: from disk images, a running plain QEMU VM (QMP socket), or a libvirt domain.

Paths come from the browser, so the service confines them to the server's allowed roots (the
context is the API's confined one); the page lists those roots so the user knows where to look.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from starlette.responses import Response

from vmvault.api.auth import Permission
from vmvault.errors import VmvaultError
from vmvault.service import vms
from vmvault.service.paths import Rule
from vmvault.web.core import PortalRoute, access, ctx_of, redirect, render, session_of

router = APIRouter(route_class=PortalRoute, include_in_schema=False)


def _page(request: Request, error: VmvaultError | None = None, tab: str = "disks", **typed: str) -> Response:
    ctx = ctx_of(request)
    domains, discovery_error = vms.discover_libvirt(ctx)
    roots = [str(r) for r in ctx.paths.roots[Rule.DISKS]] if ctx.paths is not None else []
    return render(
        request, "vm_add.html", status_code=error.http_status if error else 200, error=error, tab=tab,
        typed=typed, domains=domains, discovery_error=discovery_error, roots=roots,
    )  # fmt: skip


@router.get("/vms/add")
@access(Permission.VM_WRITE)
def add_form(request: Request) -> Response:
    return _page(request)


def _added(request: Request, view: dict[str, object]) -> Response:
    session_of(request).toast(f"VM {view['name']} added. Enable backup to protect it.")
    return redirect(f"/vms/{view['name']}")


@router.post("/vms/add/disks")
@access(Permission.VM_WRITE)
def add_disks(request: Request, name: Annotated[str, Form()] = "", disks: Annotated[str, Form()] = "") -> Response:
    paths: list[str] = [line.strip() for line in disks.splitlines() if line.strip()]
    try:
        view = vms.add_vm(ctx_of(request), name.strip(), list(paths))
    except VmvaultError as exc:
        return _page(request, exc, "disks", name=name, disks=disks)
    return _added(request, view)


@router.post("/vms/add/qemu")
@access(Permission.VM_WRITE)
def add_qemu(
    request: Request,
    name: Annotated[str, Form()] = "",
    qmp_socket: Annotated[str, Form()] = "",
    agent_socket: Annotated[str, Form()] = "",
) -> Response:
    try:
        view = vms.add_running_vm(ctx_of(request), name.strip(), qmp_socket.strip(), agent_socket.strip() or None)
    except VmvaultError as exc:
        return _page(request, exc, "qemu", name=name, qmp_socket=qmp_socket, agent_socket=agent_socket)
    return _added(request, view)


@router.post("/vms/add/libvirt")
@access(Permission.VM_WRITE)
def add_libvirt(request: Request, domain: Annotated[str, Form()] = "", name: Annotated[str, Form()] = "") -> Response:
    try:
        view = vms.add_discovered_domain(ctx_of(request), name.strip() or domain, domain)
    except VmvaultError as exc:
        return _page(request, exc, "libvirt", name=name, domain=domain)
    return _added(request, view)

"""Restore: a new VM (name, start) or the disks (plus a template for plain QEMU VMs), as a job."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from starlette.responses import Response

from vmvault.api.auth import Permission, Scope
from vmvault.errors import InvalidInput
from vmvault.service import backups, restores, vms
from vmvault.service.paths import Rule
from vmvault.web.core import PortalRoute, access, ctx_of, redirect, render, session_of
from vmvault.web.routes_vms import background

router = APIRouter(route_class=PortalRoute, include_in_schema=False)
NEW_VM_KINDS = ("qmp", "libvirt")  # VMs with a definition to create a new VM from (disk-only VMs have none)


@router.get("/vms/{vm}/restore")
@access(Permission.READ, Scope.VM)
def restore_form(request: Request, vm: str, rp: str = "") -> Response:
    ctx = ctx_of(request)
    points = [p for p in backups.list_recovery_points(ctx, vm) if not p["isSoftDeleted"]]
    view = vms.show_vm(ctx, vm)
    roots = [str(r) for r in ctx.paths.roots[Rule.RESTORES]] if ctx.paths is not None else []
    return render(
        request, "restore.html", vm=view, points=points, chosen=rp, roots=roots,
        as_new_vm=view["kind"] in NEW_VM_KINDS,
    )  # fmt: skip


@router.post("/vms/{vm}/restore")
@access(Permission.RESTORE, Scope.VM)
def restore(
    request: Request,
    vm: str,
    rp: Annotated[str, Form()] = "",
    mode: Annotated[str, Form()] = "disks",
    new_name: Annotated[str, Form()] = "",
    start: Annotated[str, Form()] = "",
    target_dir: Annotated[str, Form()] = "",
    format: Annotated[str, Form()] = "",
    overwrite: Annotated[str, Form()] = "",
) -> Response:
    ctx = ctx_of(request)
    if not rp:
        raise InvalidInput("pick a recovery point to restore", hint="choose one in the list")
    fmt = format or None
    target = target_dir.strip() or None
    if mode == "vm":
        if vms.show_vm(ctx, vm)["kind"] not in NEW_VM_KINDS:
            raise InvalidInput(
                f"VM {vm} was added from its disk images: there is no VM definition to create a new VM from",
                hint="restore its disks instead",
            )
        if not new_name.strip():
            raise InvalidInput("give the new VM a name", hint=f"e.g. {vm}-restored")
        name = new_name.strip()
        job = background(request).start(
            lambda cancel: restores.restore_as_new_vm(
                ctx, vm, rp, name, target_dir=target, fmt=fmt, start=bool(start), cancel=cancel
            )
        )
        message = f"Restore of {vm} as new VM {name} started."
    else:
        if target is None:
            raise InvalidInput("give the directory to restore the disks into", hint="an empty directory on the server")
        job = background(request).start(
            lambda cancel: restores.restore_disks(ctx, vm, rp, target, fmt=fmt, force=bool(overwrite), cancel=cancel)
        )
        message = f"Restore of {vm}'s disks into {target} started."
    session_of(request).toast(message, job=str(job["id"]))
    return redirect(f"/jobs/{job['id']}")

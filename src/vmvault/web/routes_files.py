"""File recovery: pick a point, mount/unmount (12-hour expiry), browse, download, the recovery script."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Request
from starlette.responses import FileResponse, Response, StreamingResponse

from vmvault.api.auth import Permission, Scope
from vmvault.api.headers import content_disposition
from vmvault.errors import InvalidInput, NotFound
from vmvault.service import backups, files, jobs
from vmvault.service.context import Context
from vmvault.web.core import PortalRoute, access, ctx_of, redirect, render, session_of
from vmvault.web.routes_vms import background

router = APIRouter(route_class=PortalRoute, include_in_schema=False)
_SCRIPT_RE = re.compile(r"^[A-Za-z0-9._-]+-recover\.sh$")


def scripts_dir(ctx: Context) -> Path:
    """Where the portal writes recovery scripts for download (inside the home, never user-chosen)."""
    return ctx.settings.home / "portal" / "scripts"


@router.get("/vms/{vm}/files")
@access(Permission.READ, Scope.VM)
def files_page(request: Request, vm: str) -> Response:
    ctx = ctx_of(request)
    points = [p for p in backups.list_recovery_points(ctx, vm) if not p["isSoftDeleted"]]
    sessions = files.list_sessions(ctx, vm)
    return render(request, "files.html", vm=vm, points=points, sessions=sessions, pending=_pending(ctx, vm))


def _pending(ctx: Context, vm: str) -> list[dict[str, object]]:
    """Mounts and unmounts of this VM still running: shown as "Mounting…" / "Unmounting…"."""
    kinds = (jobs.Operation.FILE_RECOVERY_MOUNT, jobs.Operation.FILE_RECOVERY_UNMOUNT)
    return [j for j in jobs.list_jobs(ctx, vm=vm, status=jobs.Status.IN_PROGRESS) if j["operation"] in kinds]


@router.get("/vms/{vm}/files/sessions")
@access(Permission.READ, Scope.VM)
def sessions_live(request: Request, vm: str) -> Response:
    """The session list alone: polled while a mount or unmount runs, so it is never stale."""
    ctx = ctx_of(request)
    sessions = files.list_sessions(ctx, vm)
    return render(request, "files_sessions.html", fragment=True, vm=vm, sessions=sessions, pending=_pending(ctx, vm))


@router.post("/vms/{vm}/files/mount")
@access(Permission.FILE_RECOVERY, Scope.VM)
def mount(request: Request, vm: str, rp: Annotated[str, Form()] = "") -> Response:
    ctx = ctx_of(request)
    if not rp:
        raise InvalidInput("pick a recovery point to mount", hint="choose one in the list")
    job = background(request).start(lambda _cancel: files.mount_point(ctx, vm, rp))
    session_of(request).toast(f"Mounting recovery point {rp} of {vm} (12 hours).", job=str(job["id"]))
    return redirect(f"/vms/{vm}/files")


@router.post("/vms/{vm}/files/unmount")
@access(Permission.FILE_RECOVERY, Scope.VM)
def unmount(request: Request, vm: str, session_id: Annotated[str, Form()] = "") -> Response:
    ctx = ctx_of(request)
    sid = session_id or None
    job = background(request).start(lambda _cancel: files.unmount(ctx, vm, session_id=sid))
    session_of(request).toast(f"Unmounting {vm}'s recovery point.", job=str(job["id"]))
    return redirect(f"/vms/{vm}/files")


@router.get("/vms/{vm}/files/browse")
@access(Permission.FILE_RECOVERY, Scope.VM)
def browse(request: Request, vm: str, session: str, path: str = "") -> Response:
    entries = files.browse(ctx_of(request), vm, path, session_id=session)
    parts = [p for p in path.split("/") if p]
    crumbs = [("/".join(parts[: i + 1]), name) for i, name in enumerate(parts)]
    return render(request, "browse.html", vm=vm, session=session, path="/".join(parts), crumbs=crumbs, entries=entries)


@router.get("/vms/{vm}/files/download")
@access(Permission.FILE_RECOVERY, Scope.VM)
def download(request: Request, vm: str, session: str, path: str) -> Response:
    # recovery/browse.py resolves the path inside the volume (no .., no symlinks, same device)
    size, blocks = files.download(ctx_of(request), vm, path, session_id=session)
    name = path.rstrip("/").rsplit("/", 1)[-1] or "download"
    return StreamingResponse(
        blocks,
        media_type="application/octet-stream",
        headers={"Content-Length": str(size), "Content-Disposition": content_disposition(name)},
    )


@router.post("/vms/{vm}/files/script")
@access(Permission.FILE_RECOVERY, Scope.VM)
def make_script(request: Request, vm: str, rp: Annotated[str, Form()] = "") -> Response:
    ctx = ctx_of(request)
    if not rp:
        raise InvalidInput("pick a recovery point for the script", hint="choose one in the list")
    out = scripts_dir(ctx)
    out.mkdir(parents=True, exist_ok=True)
    made = files.make_script(ctx, vm, rp, out=out)
    # the password is in this one response only (the server keeps its hash)
    return render(request, "script.html", vm=vm, rp=rp, made=made, name=Path(made["script"]).name)


@router.get("/vms/{vm}/files/script/{name}")
@access(Permission.FILE_RECOVERY, Scope.VM)
def script_file(request: Request, vm: str, name: str) -> Response:
    path = scripts_dir(ctx_of(request)) / name
    if not _SCRIPT_RE.fullmatch(name) or not name.startswith(f"{vm}-") or not path.is_file():
        raise NotFound(f"no recovery script '{name}' for VM '{vm}'", hint="make one on the File recovery page")
    return FileResponse(path, media_type="text/x-shellscript", filename=name)

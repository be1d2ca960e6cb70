"""File recovery: sessions of a VM's recovery points, mount/unmount, browse and download, the script."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import Field

from vmvault.api.auth import Permission, Scope, require
from vmvault.api.deps import Ctx, Jobs
from vmvault.api.headers import content_disposition
from vmvault.api.routes.common import ROUTE_CLASS, Body, Pages
from vmvault.api.schemas import ACCEPTED, BrowseEntry, FileSession, Job, Page, RecoveryScript
from vmvault.service import files

router = APIRouter(tags=["files"], route_class=ROUTE_CLASS)


class Mount(Body):
    rp: str = Field(max_length=64, description="Recovery point id")
    mountpoint: str | None = Field(
        default=None, max_length=4096,
        description="Directory to mount on (default: under the home): inside the server's allowed restore folders, "
        "or for a VM of another host a path there, inside its agent's",
    )  # fmt: skip
    duration: str | None = Field(default=None, max_length=16, description="How long it stays mounted (default 12h)")


class Script(Body):
    rp: str = Field(max_length=64, description="Recovery point id")
    duration: str | None = Field(default=None, max_length=16, description="How long the password works (default 12h)")
    address: str | None = Field(
        default=None, max_length=253, description="Host name or IP the other machine reaches this server by"
    )


class Unmount(Body):
    session_id: str | None = Field(default=None, max_length=64, description="Only this session (default: all)")


@router.get(
    "/items/{vm}/files/sessions", response_model=Page[FileSession], dependencies=[require(Permission.READ, Scope.VM)]
)
def list_sessions(
    vm: str, ctx: Ctx, pages: Pages, include_ended: Annotated[bool, Query(alias="includeEnded")] = False
) -> dict[str, Any]:
    return pages.page(files.list_sessions(ctx, vm, include_ended=include_ended))


@router.post(
    "/items/{vm}/files/mount",
    response_model=Job,
    status_code=202,
    responses=ACCEPTED,
    dependencies=[require(Permission.FILE_RECOVERY, Scope.VM)],
)
def mount(vm: str, body: Mount, ctx: Ctx, jobs: Jobs) -> dict[str, Any]:
    return jobs.start(
        lambda _cancel: files.mount_point(ctx, vm, body.rp, mountpoint=body.mountpoint, duration=body.duration)
    )


@router.post(
    "/items/{vm}/files/unmount",
    response_model=Job,
    status_code=202,
    responses=ACCEPTED,
    dependencies=[require(Permission.FILE_RECOVERY, Scope.VM)],
)
def unmount(vm: str, body: Unmount, ctx: Ctx, jobs: Jobs) -> dict[str, Any]:
    return jobs.start(lambda _cancel: files.unmount(ctx, vm, session_id=body.session_id))


@router.get(
    "/items/{vm}/files/browse",
    response_model=Page[BrowseEntry],
    dependencies=[require(Permission.FILE_RECOVERY, Scope.VM)],
)
def browse(
    vm: str,
    ctx: Ctx,
    path: str = "",
    rp: str | None = None,
    session_id: Annotated[str | None, Query(alias="sessionId")] = None,
    *,
    pages: Pages,
) -> dict[str, Any]:
    return pages.page(files.browse(ctx, vm, path, rp_id=rp, session_id=session_id))


@router.get(
    "/items/{vm}/files/download",
    dependencies=[require(Permission.FILE_RECOVERY, Scope.VM)],
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download(
    vm: str,
    path: str,
    ctx: Ctx,
    rp: str | None = None,
    session_id: Annotated[str | None, Query(alias="sessionId")] = None,
) -> StreamingResponse:
    size, blocks = files.download(ctx, vm, path, rp_id=rp, session_id=session_id)
    name = path.rstrip("/").rsplit("/", 1)[-1] or "download"
    return StreamingResponse(
        blocks,
        media_type="application/octet-stream",
        headers={"Content-Length": str(size), "Content-Disposition": content_disposition(name)},
    )


@router.post(
    "/items/{vm}/files/script",
    response_model=RecoveryScript,
    status_code=201,
    dependencies=[require(Permission.FILE_RECOVERY, Scope.VM)],
)
def make_script(vm: str, body: Script, ctx: Ctx) -> dict[str, Any]:
    """The script that mounts the point on another machine, in the answer; its password, shown once."""
    with tempfile.TemporaryDirectory(prefix="vmvault-script-") as scratch:  # the script lives in the answer only
        made = files.make_script(ctx, vm, body.rp, out=scratch, duration=body.duration, address=body.address)
        path = Path(made["script"])
        return {**made, "script": path.name, "content": path.read_text()}

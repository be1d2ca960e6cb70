"""Hosts: the servers and agents of the deployment, their state, heartbeat, version, jobs and VMs (service/hosts.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from vmvault.api.auth import Permission
from vmvault.service import hosts
from vmvault.web.core import PortalRoute, access, ctx_of, render

router = APIRouter(route_class=PortalRoute, include_in_schema=False)


@router.get("/hosts")
@access(Permission.READ)
def host_list(request: Request) -> Response:
    return render(request, "hosts.html", hosts=hosts.list_hosts(ctx_of(request)), version=hosts.version())

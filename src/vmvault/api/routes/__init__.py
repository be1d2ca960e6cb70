"""The API's routes, one module per resource; every route declares its permission (api/auth.py)."""

from __future__ import annotations

from fastapi import APIRouter

from vmvault.api.auth import AuthorizedRoute
from vmvault.api.routes import agents, files, hosts, items, jobs, notify, policies, tokens, vaults, vms
from vmvault.api.schemas import ERROR_RESPONSES


def api_router() -> APIRouter:
    router = APIRouter(prefix="/api/v1", route_class=AuthorizedRoute, responses=ERROR_RESPONSES)
    for module in (vaults, policies, notify, vms, items, jobs, files, tokens, hosts, agents):
        router.include_router(module.router)
    return router

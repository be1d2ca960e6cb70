"""The web portal: server-rendered pages at / over the same service layer and roles as the API.

The portal is its own small FastAPI app mounted on the API's app at / (so it stays out of the
API's route table and OpenAPI document). Its mount never claims the API's paths (/api/, /docs,
/openapi.json, /health...): those keep the API's own 404/405 answers.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match, Mount
from starlette.types import Scope

from vmvault.errors import NotFound, VmvaultError
from vmvault.web.core import HERE, Portal, PortalRoute, _signed_in, error_page, with_security_headers

API_PATHS = ("/api/", "/api", "/docs", "/redoc", "/openapi.json", "/health", "/healthz")


class PortalMount(Mount):
    """Mount at / that leaves the API's paths to the API."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = str(scope.get("path", ""))
        if scope.get("type") == "http" and any(path == p or path.startswith(p.rstrip("/") + "/") for p in API_PATHS):
            return Match.NONE, {}
        return super().matches(scope)


def portal_router() -> APIRouter:
    from vmvault.web import (
        routes_addvm,
        routes_auth,
        routes_dashboard,
        routes_files,
        routes_hosts,
        routes_jobs,
        routes_restore,
        routes_tokens,
        routes_vaults,
        routes_vms,
    )

    router = APIRouter(route_class=PortalRoute, include_in_schema=False)
    modules = (routes_auth, routes_dashboard, routes_addvm, routes_vms, routes_files, routes_restore, routes_jobs)
    for module in (*modules, routes_vaults, routes_hosts, routes_tokens):
        router.include_router(module.router)
    return router


def portal_app(api: FastAPI) -> FastAPI:
    """The portal app, sharing the API app's service context and background job runner."""
    app = FastAPI(title="vmvault portal", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = api.state.remote_ctx  # the API's confined context: caller paths in the allowed roots
    app.state.background = api.state.background
    app.state.portal = Portal()
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(portal_router())

    @app.exception_handler(StarletteHTTPException)
    def _not_found(request: Request, exc: StarletteHTTPException) -> Response:
        """Unknown pages (and wrong methods) as the portal's error page, not the API's JSON: inside
        the layout (menu included) when the browser is signed in."""
        found = _signed_in(request)
        if found is not None:
            request.state.portal_session, request.state.principal = found
        error: VmvaultError = NotFound(f"no page {request.url.path}", hint="start again from the Overview")
        if exc.status_code != 404:
            error = VmvaultError(str(exc.detail), hint="go back and use the page's own buttons")
            error.http_status = exc.status_code
        return with_security_headers(error_page(request, error))

    return app


def install(api: FastAPI) -> None:
    """Mount the portal on the API app (call after the API's routes are added)."""
    api.router.routes.append(PortalMount("/", app=portal_app(api), name="portal"))

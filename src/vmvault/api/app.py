"""The REST API: create_app(settings) builds the FastAPI app (under /api/v1; /health, /docs public; the portal at /)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

from vmvault.api import errors
from vmvault.api.deps import Background
from vmvault.api.routes import api_router
from vmvault.api.signin import SignInGuard
from vmvault.service.context import Context, open_context
from vmvault.service.paths import PathPolicy, build_policy
from vmvault.settings import Settings


def create_app(
    settings: Settings,
    *,
    ctx: Context | None = None,
    status: Callable[[], dict[str, Any]] | None = None,
    paths: PathPolicy | None = None,
) -> FastAPI:
    """The API app; with ctx it shares that service context (vmvault serve), else it opens its own.

    status: what GET /healthz answers (vmvault serve's status); /health answers {"status": "ok"}.
    paths: the allowed roots of the paths callers send (default: HOME/settings.toml, else the
    defaults; service/paths.py). The API and the portal always run confined.
    """
    owned = ctx is None
    policy = paths if paths is not None else build_policy(settings)
    context = ctx if ctx is not None else open_context(settings)
    runner = Background(context)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            runner.stop()
            if owned:
                context.close()

    from importlib.metadata import PackageNotFoundError, version

    try:
        app_version = version("vmvault")
    except PackageNotFoundError:
        app_version = "0"
    app = FastAPI(
        title="vmvault",
        version=app_version,
        description="Backup and recovery of KVM/QEMU VMs. Every /api/v1 call needs `Authorization: Bearer TOKEN`.",
        lifespan=lifespan,
    )
    app.state.ctx = context
    app.state.signins = SignInGuard()  # failed sign-ins per client (api/signin.py)
    app.state.remote_ctx = context.remote(policy)  # what handlers get: caller paths confined
    app.state.background = runner
    errors.install(app)

    @app.get("/health", tags=["status"])
    def health() -> dict[str, Any]:
        """Unauthenticated: up or down, nothing else (no pid, path or jobs for anonymous callers)."""
        return {"status": "ok"}

    @app.get("/healthz", tags=["status"], include_in_schema=False)
    def healthz(request: Request) -> dict[str, Any]:
        """Process details (pid, home, running jobs): any valid token."""
        from vmvault.api.auth import authenticate_request

        authenticate_request(request)
        return status() if status is not None else {"status": "ok"}

    app.include_router(api_router())
    from vmvault.api.routes import metrics as metrics_route

    metrics_route.install(app)  # GET /metrics (Prometheus), any token
    from vmvault.web import install as install_portal

    install_portal(app)  # the portal's pages at / (after the API's routes: they win on their paths)
    return app

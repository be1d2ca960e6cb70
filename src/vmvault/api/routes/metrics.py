"""GET /metrics: Prometheus text format, for any valid token (BackupReader and up).

Outside /api/v1 (Prometheus scrapes /metrics by convention); a vault-scoped token sees its
vault's series only. `serve --metrics-address` serves the same text without a token on an
address the admin chooses (service/metrics.py).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from vmvault.api.auth import ROLE_PERMISSIONS, Permission, app_ctx, authenticate_request
from vmvault.errors import Forbidden
from vmvault.service import metrics


def install(app: FastAPI) -> None:
    # Not in the OpenAPI document: text/plain for Prometheus, not a JSON resource (docs/api.md lists it).
    @app.get("/metrics", include_in_schema=False)
    async def get_metrics(request: Request) -> Response:
        principal = await run_in_threadpool(authenticate_request, request)
        if Permission.READ not in ROLE_PERMISSIONS.get(principal.role, frozenset()):
            raise Forbidden(
                f"role {principal.role} may not read metrics", hint="use any API token (BackupReader and up)"
            )
        body, content_type = await run_in_threadpool(metrics.render, app_ctx(request), principal.vault)
        return Response(content=body, media_type=content_type)

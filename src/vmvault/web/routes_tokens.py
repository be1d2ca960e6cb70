"""API tokens for Owners: mint one (role, optional vault scope, expiry; the token shown once), list, revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from starlette.responses import Response

from vmvault.api.auth import Permission
from vmvault.service import tokens, vaults
from vmvault.service.tokens import AGENT, ROLES
from vmvault.web.core import PortalRoute, access, ctx_of, principal_of, redirect, render, session_of

router = APIRouter(route_class=PortalRoute, include_in_schema=False)


def _page(request: Request, minted: str | None = None, minted_view: dict[str, object] | None = None) -> Response:
    ctx = ctx_of(request)
    return render(
        request, "tokens.html", tokens=tokens.list_tokens(ctx, include_revoked=True),
        roles=[r for r in ROLES if r != AGENT],  # an agent's token names its host: vmvault token create --host
        vaults=vaults.list_vaults(ctx), minted=minted, minted_view=minted_view, me=principal_of(request).token_id,
    )  # fmt: skip


@router.get("/tokens")
@access(Permission.TOKENS)
def token_list(request: Request) -> Response:
    return _page(request)


@router.post("/tokens")
@access(Permission.TOKENS)
def token_create(
    request: Request,
    role: Annotated[str, Form()] = "",
    name: Annotated[str, Form()] = "",
    vault: Annotated[str, Form()] = "",
    expires: Annotated[str, Form()] = "",
) -> Response:
    """The new token is in this response only (never stored, never in a redirect or a toast)."""
    view, secret = tokens.create_token(
        ctx_of(request), role, vault=vault or None, expires=expires.strip() or None, name=name.strip() or None
    )
    return _page(request, minted=secret, minted_view=view)


@router.post("/tokens/{token_id}/revoke")
@access(Permission.TOKENS)
def token_revoke(request: Request, token_id: str) -> Response:
    view = tokens.revoke_token(ctx_of(request), token_id)
    session_of(request).toast(f"Token {view['name']} ({token_id}) revoked; its sessions ended.")
    return redirect("/tokens")

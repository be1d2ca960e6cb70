"""API tokens (Owner only): list, create (the token is in the answer, once), revoke."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field

from vmvault.api.auth import Permission, Scope, require
from vmvault.api.deps import Ctx
from vmvault.api.routes.common import ROUTE_CLASS, Body, Pages
from vmvault.api.schemas import NewToken, Page, Token
from vmvault.service import tokens

router = APIRouter(tags=["tokens"], route_class=ROUTE_CLASS)


class TokenCreate(Body):
    role: str = Field(
        max_length=32, description="Owner, BackupContributor, BackupOperator, BackupReader or BackupAgent"
    )
    vault: str | None = Field(default=None, max_length=64, description="Scope it to this vault")
    expires: str | None = Field(default=None, max_length=32, description="30d, 12h, 2w or a UTC date; default never")
    name: str | None = Field(default=None, max_length=128)
    host: str | None = Field(default=None, max_length=128, description="BackupAgent: the host it is bound to")


@router.get("/tokens", response_model=Page[Token], dependencies=[require(Permission.TOKENS, Scope.GLOBAL)])
def list_tokens(
    ctx: Ctx, pages: Pages, include_revoked: Annotated[bool, Query(alias="includeRevoked")] = False
) -> dict[str, Any]:
    return pages.page(tokens.list_tokens(ctx, include_revoked=include_revoked))


@router.post(
    "/tokens", response_model=NewToken, status_code=201, dependencies=[require(Permission.TOKENS, Scope.GLOBAL)]
)
def create_token(body: TokenCreate, ctx: Ctx) -> dict[str, Any]:
    view, token = tokens.create_token(
        ctx, body.role, vault=body.vault, expires=body.expires, name=body.name, host=body.host
    )
    return {**view, "token": token}


@router.delete("/tokens/{token_id}", response_model=Token, dependencies=[require(Permission.TOKENS, Scope.GLOBAL)])
def revoke_token(token_id: str, ctx: Ctx) -> dict[str, Any]:
    return tokens.revoke_token(ctx, token_id)

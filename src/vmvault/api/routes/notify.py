"""A vault's notification targets: webhooks and e-mails told when jobs end (vault notify add|list|remove)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from vmvault.api.auth import Permission, Scope, require
from vmvault.api.deps import Ctx
from vmvault.api.routes.common import ROUTE_CLASS, Body, Pages
from vmvault.api.schemas import NotificationTarget, Page
from vmvault.service import notify

router = APIRouter(tags=["notifications"], route_class=ROUTE_CLASS)


class TargetAdd(Body):
    webhook: str | None = Field(default=None, max_length=2048, description="POST each job as JSON to this URL")
    email: str | None = Field(default=None, max_length=254, description="Or: send an e-mail to this address")
    smtp: str | None = Field(default=None, max_length=260, description="SMTP server for e-mail, HOST:PORT")
    sender: str | None = Field(default=None, max_length=254, description="From: address of the e-mails")
    events: str = Field(default="failed", max_length=16, description="failed (failed jobs only) or all")


@router.get(
    "/vaults/{vault}/notifications",
    response_model=Page[NotificationTarget],
    dependencies=[require(Permission.READ, Scope.VAULT)],
)
def list_targets(vault: str, ctx: Ctx, pages: Pages) -> dict[str, Any]:
    return pages.page(notify.list_targets(ctx, vault))


@router.post(
    "/vaults/{vault}/notifications",
    response_model=NotificationTarget,
    status_code=201,
    dependencies=[require(Permission.NOTIFY_WRITE, Scope.VAULT)],
)
def add_target(vault: str, body: TargetAdd, ctx: Ctx) -> dict[str, Any]:
    return notify.add_target(
        ctx, vault, webhook=body.webhook, email=body.email, smtp=body.smtp, sender=body.sender, events=body.events
    )


@router.delete(
    "/vaults/{vault}/notifications/{target_id}",
    status_code=204,
    dependencies=[require(Permission.NOTIFY_WRITE, Scope.VAULT)],
)
def remove_target(vault: str, target_id: int, ctx: Ctx) -> None:
    notify.remove_target(ctx, vault, target_id)

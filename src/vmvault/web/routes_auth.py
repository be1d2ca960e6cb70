"""Sign in (paste a token) and sign out."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Request
from starlette.responses import Response

from vmvault.api import signin as attempts
from vmvault.api.auth import Permission
from vmvault.errors import Forbidden
from vmvault.service.tokens import authenticate
from vmvault.web.core import PortalRoute, access, ctx_of, portal_of, redirect, render, session_of
from vmvault.web.sessions import COOKIE, SIGNIN_COOKIE, signin_csrf_ok

router = APIRouter(route_class=PortalRoute, include_in_schema=False)


def _safe_next(target: str) -> str:
    """Only a path of this site (never //host or a scheme): no open redirect after sign-in."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _signin_page(request: Request, next_url: str, error: str | None = None, status_code: int = 200) -> Response:
    nonce = secrets.token_urlsafe(24)
    response = render(request, "signin.html", status_code=status_code, signin_csrf=nonce, next=next_url, error=error)
    response.set_cookie(
        SIGNIN_COOKIE, nonce, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/signin"
    )
    return response


@router.get("/signin")
@access(None)
def signin_form(request: Request, next: str = "/") -> Response:
    return _signin_page(request, _safe_next(next))


@router.post("/signin")
@access(None)
def signin(
    request: Request,
    token: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    if not signin_csrf_ok(request.cookies.get(SIGNIN_COOKIE), csrf):
        raise Forbidden("the sign-in form's CSRF token is missing or wrong", hint="reload the sign-in page")
    guard, client = attempts.guard_of(request)
    guard.before_attempt(client)
    principal = authenticate(ctx_of(request), token.strip())
    if principal is None:
        guard.failed(client, "portal")
        return _signin_page(
            request,
            _safe_next(next),
            "The token is unknown, expired or revoked. Make one with: vmvault token create --role ROLE",
            status_code=401,
        )
    guard.succeeded(client)
    session = portal_of(request).sessions.create(token.strip())
    response = redirect(_safe_next(next))
    response.set_cookie(
        COOKIE, session.id, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/"
    )
    response.delete_cookie(SIGNIN_COOKIE, path="/signin")
    return response


@router.post("/signout")
@access(Permission.READ)
def signout(request: Request) -> Response:
    portal_of(request).sessions.drop(session_of(request).id)
    response = redirect("/signin")
    response.delete_cookie(COOKIE, path="/")
    return response

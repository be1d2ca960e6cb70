"""The portal's plumbing: who is signed in, what each page may do, CSRF, rendering and errors.

Every portal route declares its access with @access(Permission, Scope) (api/auth.py's permissions
and role table, so the portal and the API allow exactly the same things). PortalRoute then, before
the handler reads its form or looks anything up:

1. finds the session (a GET without one is sent to the sign-in page; a POST gets 403),
2. on POST, checks the form's CSRF token against the session's (403 when missing or wrong),
3. checks the role's permission and the token's vault scope (403 naming the role).

A VmvaultError raised anywhere becomes an error page showing its message and hint as they are,
with the error class's HTTP status. A route without a declaration is refused (fails closed).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse, Response

from vmvault.api.auth import ROLE_PERMISSIONS, Authorize, Permission, Scope
from vmvault.errors import Forbidden, InternalError, InvalidInput, VmvaultError
from vmvault.service.context import Context
from vmvault.service.tokens import Principal, authenticate
from vmvault.web import fmt
from vmvault.web.sessions import COOKIE, PortalSession, SessionStore

log = logging.getLogger("vmvault")
HERE = Path(__file__).resolve().parent
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Access:
    permission: Permission | None  # None: public (the sign-in page)
    scope: Scope = Scope.GLOBAL


def access(permission: Permission | None, scope: Scope = Scope.GLOBAL) -> Callable[[F], F]:
    """Declare what a portal route needs (checked by PortalRoute before the handler runs)."""

    def mark(func: F) -> F:
        func.portal_access = Access(permission, scope)  # type: ignore[attr-defined]
        return func

    return mark


class Portal:
    """State shared by the portal's routes: templates and sessions."""

    def __init__(self) -> None:
        self.sessions = SessionStore()
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        fmt.install_filters(self.templates.env)


def portal_of(request: Request) -> Portal:
    portal: Portal = request.app.state.portal
    return portal


def ctx_of(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


def session_of(request: Request) -> PortalSession:
    session: PortalSession | None = getattr(request.state, "portal_session", None)
    if session is None:  # PortalRoute sets it for every non-public route
        raise Forbidden("this page needs a signed-in session", hint="sign in at /signin")
    return session


def principal_of(request: Request) -> Principal:
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:
        raise Forbidden("this page needs a signed-in session", hint="sign in at /signin")
    return principal


def can(principal: Principal | None, permission: Permission) -> bool:
    return principal is not None and permission in ROLE_PERMISSIONS.get(principal.role, frozenset())


def render(
    request: Request, template: str, status_code: int = 200, *, fragment: bool = False, **context: Any
) -> Response:
    """A page: base context (who is signed in, CSRF token, toasts, can()) plus the page's own.

    A fragment (polled by portal.js) leaves the session's toasts for the next full page.
    """
    session: PortalSession | None = getattr(request.state, "portal_session", None)
    principal: Principal | None = getattr(request.state, "principal", None)
    base = {
        "principal": principal,
        "csrf": session.csrf if session is not None else "",
        "toasts": session.pop_toasts() if session is not None and not fragment else [],
        "can": lambda name: can(principal, Permission(name)),
        "path": request.url.path,
    }
    return portal_of(request).templates.TemplateResponse(
        request, template, {**base, **context}, status_code=status_code
    )


def secret_channel(request: Request) -> bool:
    """May this request carry a secret (a passphrase)? Over HTTPS, or from a loopback address
    (the browser runs on the server itself, so nothing crosses a network in clear)."""
    if request.url.scheme == "https":
        return True
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "testclient"  # Starlette's in-process TestClient: no network at all


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def error_page(request: Request, exc: VmvaultError) -> Response:
    back = request.headers.get("referer") or "/"
    if not back.startswith(str(request.base_url)):
        back = "/"
    return render(request, "error.html", status_code=exc.http_status, error=exc, back=back)


def _authorize(request: Request, principal: Principal, rule: Access) -> None:
    assert rule.permission is not None
    if not can(principal, rule.permission):
        raise Forbidden(
            f"role {principal.role} may not do this ({rule.permission.value})",
            hint="sign in with a token whose role allows it",
        )
    if principal.vault is not None:
        # the API's own scope rules (GLOBAL writes refused, VM/JOB/VAULT path parameters checked)
        Authorize(rule.permission, rule.scope)._check_scope(request, principal)


def _signed_in(request: Request) -> tuple[PortalSession, Principal] | None:
    portal = portal_of(request)
    session = portal.sessions.get(request.cookies.get(COOKIE))
    if session is None:
        return None
    principal = authenticate(ctx_of(request), session.token)
    if principal is None:  # revoked or expired since sign-in: the session ends with it
        portal.sessions.drop(session.id)
        return None
    return session, principal


async def _guard(request: Request, rule: Access) -> Response | None:
    """None when the request may go on; else the response to send (sign-in redirect)."""
    found = await run_in_threadpool(_signed_in, request)
    if found is None:
        if request.method == "GET":
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return redirect(f"/signin?next={quote(target, safe='')}")
        raise Forbidden("you are not signed in (or your session ended)", hint="sign in at /signin, then try again")
    session, principal = found
    request.state.portal_session = session
    request.state.principal = principal
    if request.method == "POST":
        form = await request.form()  # cached on the request: the handler's Form() parameters reuse it
        if not session.csrf_ok(form.get("csrf")):
            raise Forbidden(
                "the form's CSRF token is missing or wrong; nothing was changed",
                hint="reload the page and submit the form again",
            )
    await run_in_threadpool(_authorize, request, principal, rule)
    return None


SECURITY_HEADERS = {
    # pages hold CSRF tokens and, once, a script's password: never cached, never framed
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def with_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


class PortalRoute(APIRoute):
    """Checks session, CSRF and permission first; renders VmvaultError as an error page."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()
        rule: Access | None = getattr(self.endpoint, "portal_access", None)

        async def handler(request: Request) -> Response:
            return with_security_headers(await guarded(request))

        async def guarded(request: Request) -> Response:
            try:
                if rule is None:
                    raise Forbidden("this page declares no permission", hint="report it: every page must declare one")
                if rule.permission is not None:
                    early = await _guard(request, rule)
                    if early is not None:
                        return early
                return await original(request)
            except VmvaultError as exc:
                return error_page(request, exc)
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {}
                field = ".".join(str(p) for p in first.get("loc", ())[1:]) or "the form"
                return error_page(request, InvalidInput(f"{field}: {first.get('msg', 'invalid')}", hint="fix the form"))
            except Exception:
                log.exception("unexpected portal error on %s %s", request.method, request.url.path)
                return error_page(request, InternalError("unexpected error", hint="see the server's log"))

        return handler

"""Authorisation: every API route declares one permission and how its vault scope is found.

A route declares ``dependencies=[require(Permission.X, Scope.Y)]``. AuthorizedRoute runs that
check before FastAPI reads or validates the body and before any lookup by the handler, so a
caller without the permission gets 403 whatever it sent; a route without a declaration is refused
to everyone (fails closed).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from vmvault.api import signin
from vmvault.catalog import repos
from vmvault.errors import Forbidden, InvalidInput, Unauthorized
from vmvault.service.context import Context
from vmvault.service.tokens import AGENT, CONTRIBUTOR, OPERATOR, OWNER, READER, Principal, authenticate


class Permission(StrEnum):
    READ = "read"
    VAULT_CREATE = "vault.create"
    VAULT_DELETE = "vault.delete"
    VAULT_VERIFY = "vault.verify"
    POLICY_WRITE = "policy.write"
    NOTIFY_WRITE = "notify.write"  # a vault's notification targets
    VM_WRITE = "vm.write"
    PROTECTION_ENABLE = "protection.enable"
    PROTECTION_CHANGE = "protection.change"  # change policy/disks, disable, delete data, undelete
    BACKUP = "backup.run"
    RESTORE = "restore.run"
    FILE_RECOVERY = "files.recover"
    JOB_CANCEL = "job.cancel"
    TOKENS = "tokens.manage"
    HOSTS = "hosts.manage"  # forget a host (host remove): Owner only
    AGENT_WORK = "agent.work"  # register, heartbeat, claim and report jobs: BackupAgent only


class Scope(StrEnum):
    """Where the vault a route acts on comes from (for vault-scoped tokens)."""

    GLOBAL = "global"  # no one vault: scoped tokens may read (lists are filtered), not write
    VAULT = "vault"  # the {vault} path parameter
    VM = "vm"  # the vault protecting the {vm} path parameter
    JOB = "job"  # the vault of the {job_id} path parameter
    BODY = "body"  # the vault named in the body: the handler checks it (check_vault); with a {vm}
    # path parameter, a scoped token also needs that VM protected in its vault
    HOST = "host"  # the {host} path parameter: a BackupAgent token acts for its own host only


_OPERATOR = {
    Permission.READ, Permission.PROTECTION_ENABLE, Permission.BACKUP, Permission.RESTORE,
    Permission.FILE_RECOVERY, Permission.JOB_CANCEL,
}  # fmt: skip
_HUMAN = set(Permission) - {Permission.AGENT_WORK}  # an agent's calls are made by agents only
_CONTRIBUTOR = _HUMAN - {Permission.VAULT_DELETE, Permission.TOKENS, Permission.HOSTS}
ROLE_PERMISSIONS: dict[str, frozenset[Permission]] = {
    OWNER: frozenset(_HUMAN),
    CONTRIBUTOR: frozenset(_CONTRIBUTOR),
    OPERATOR: frozenset(_OPERATOR),
    READER: frozenset({Permission.READ}),
    AGENT: frozenset({Permission.AGENT_WORK}),  # not even READ: a stolen agent token reads nothing
}


# Documents the bearer scheme in /openapi.json (securitySchemes, and security on each operation);
# the token itself is checked by authenticate_request, which answers vmvault's own 401.
BEARER = HTTPBearer(auto_error=False, description="An API token: vmvault token create --role ROLE")


def app_ctx(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


def authenticate_request(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("this call needs a bearer token", hint="send Authorization: Bearer TOKEN")
    guard, client = signin.guard_of(request)
    guard.before_attempt(client)
    principal = authenticate(app_ctx(request), token.strip())
    if principal is None:
        guard.failed(client, "API")
        raise Unauthorized(
            "the token is unknown, expired or revoked, or the vault it is scoped to was deleted",
            hint="make a new one with: vmvault token create --role ROLE",
        )
    guard.succeeded(client)
    return principal


class Authorize:
    """The dependency a route declares: its permission and its scope."""

    def __init__(self, permission: Permission, scope: Scope) -> None:
        self.permission = permission
        self.scope = scope

    def __call__(
        self, request: Request, _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None
    ) -> Principal:
        cached: Principal | None = getattr(request.state, "principal", None)
        if cached is not None:
            return cached
        principal = authenticate_request(request)
        if self.permission not in ROLE_PERMISSIONS.get(principal.role, frozenset()):
            raise Forbidden(
                f"role {principal.role} may not do this ({self.permission.value})",
                hint="use a token with a role that allows it",
            )
        if self.scope is Scope.HOST:
            check_host(principal, str(request.path_params.get("host", "")))
        if principal.vault is not None:
            self._check_scope(request, principal)
        request.state.principal = principal
        return principal

    def _check_scope(self, request: Request, principal: Principal) -> None:
        params = request.path_params
        if self.scope is Scope.GLOBAL:
            if self.permission is not Permission.READ:
                raise _outside(principal)
        elif self.scope is Scope.VAULT:
            check_vault(principal, str(params.get("vault", "")))
        elif self.scope is Scope.VM:
            check_vault(principal, vault_of_vm(app_ctx(request), str(params.get("vm", ""))))
        elif self.scope is Scope.JOB:
            check_vault(principal, _vault_of_job(app_ctx(request), str(params.get("job_id", ""))))
        elif self.scope is Scope.BODY and "vm" in params:
            # the handler checks the body's vault; the VM must already be in the token's vault too:
            # a scoped token never pulls a VM that is unprotected or in another vault into its own
            check_vault(principal, vault_of_vm(app_ctx(request), str(params["vm"])))


def _outside(principal: Principal) -> Forbidden:
    return Forbidden(
        f"this token is limited to vault '{principal.vault}'",
        hint="use a token without a vault scope, or one scoped to the vault concerned",
    )


def check_host(principal: Principal, host: str) -> None:
    """Forbidden unless the principal is the agent of this host (its token is bound to it)."""
    if principal.host is None or principal.host != host:
        raise Forbidden(
            f"this token may not act for host '{host}'"
            + (f" (it is bound to host '{principal.host}')" if principal.host else ""),
            hint=f"run the agent of host '{host}' with its own token: vmvault token create --role BackupAgent "
            f"--host {host}",
        )


def check_vault(principal: Principal, vault: str | None) -> None:
    """Forbidden unless the principal may act on this vault (a vault-scoped token: only its own)."""
    if principal.vault is not None and vault != principal.vault:
        raise _outside(principal)


def visible(principal: Principal, rows: Iterable[dict[str, Any]], key: str = "vault") -> list[dict[str, Any]]:
    """The rows a vault-scoped token may see (all for an unscoped one)."""
    return [r for r in rows if principal.vault is None or r.get(key) == principal.vault]


def vault_of_vm(ctx: Context, vm_name: str) -> str | None:
    with ctx.catalog.read() as s:
        vm = repos.find_vm(s, vm_name)
        item = repos.protected_item(s, vm.id) if vm is not None else None
        return repos.vault_by_id(s, item.vault_id).name if item is not None else None


def _vault_of_job(ctx: Context, job_id: str) -> str | None:
    with ctx.catalog.read() as s:
        job = repos.find_job(s, job_id)
        return job.vault if job is not None else None


def require(permission: Permission, scope: Scope) -> Any:
    return Depends(Authorize(permission, scope))


def current_principal(request: Request) -> Principal:
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:  # AuthorizedRoute always sets it; refuse rather than guess
        raise Forbidden("this route declares no permission", hint="report it: every API route must declare one")
    return principal


def route_authorizer(route: APIRoute) -> Authorize | None:
    for dependency in route.dependencies:
        if isinstance(dependency.dependency, Authorize):
            return dependency.dependency
    return None


class AuthorizedRoute(APIRoute):
    """Checks the declared permission first (before the body is read); no declaration: 403 for all."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()
        authorizer = route_authorizer(self)
        known = frozenset(_query_names(self.dependant))

        async def handler(request: Request) -> Response:
            if authorizer is None:
                await run_in_threadpool(authenticate_request, request)
                raise Forbidden("this route declares no permission", hint="report it: every API route must declare one")
            await run_in_threadpool(authorizer, request)
            _refuse_unknown_query(request, known)
            return await original(request)

        return handler


def _query_names(dependant: Dependant) -> set[str]:
    """The query parameters a route takes, its dependencies' included."""
    names = {str(param.alias) for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _refuse_unknown_query(request: Request, known: frozenset[str]) -> None:
    """A misspelt query parameter is an error, not silently ignored (?includedeleted=true lists no more)."""
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise InvalidInput(
            f"unknown query parameter '{unknown[0]}'",
            hint=f"this call takes: {', '.join(sorted(known))}" if known else "this call takes no query parameter",
        )

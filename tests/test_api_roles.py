"""Roles x every API route x vault scope, enumerated from the app: a route missing from the table fails.

Allowed calls are stopped right after authorisation (the service context dependency answers 418),
so the table runs without side effects; denied calls must answer 403 whatever the body says.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, HTTPException
from fastapi.routing import APIRoute, iter_route_contexts

from api_support import Sandbox, make_ext4_image, sandbox
from vmvault.api.auth import AuthorizedRoute, Permission, Scope, require, route_authorizer
from vmvault.api.deps import service_ctx
from vmvault.catalog import repos
from vmvault.service import protection, tokens, vaults, vms

# The specification, written out independently of vmvault.api.auth.
OWNER, CONTRIBUTOR, OPERATOR, READER = "Owner", "BackupContributor", "BackupOperator", "BackupReader"
ROLES = (OWNER, CONTRIBUTOR, OPERATOR, READER)
ALL = {OWNER, CONTRIBUTOR, OPERATOR, READER}
OPERATE = {OWNER, CONTRIBUTOR, OPERATOR}
CONTRIBUTE = {OWNER, CONTRIBUTOR}
ONLY_OWNER = {OWNER}

# (method, path) -> (permission, scope, roles allowed)
TABLE: dict[tuple[str, str], tuple[Permission, Scope, set[str]]] = {
    ("GET", "/api/v1/vaults"): (Permission.READ, Scope.GLOBAL, ALL),
    ("POST", "/api/v1/vaults"): (Permission.VAULT_CREATE, Scope.GLOBAL, CONTRIBUTE),
    ("POST", "/api/v1/vaults/import"): (Permission.VAULT_CREATE, Scope.GLOBAL, CONTRIBUTE),
    ("GET", "/api/v1/vaults/{vault}"): (Permission.READ, Scope.VAULT, ALL),
    ("DELETE", "/api/v1/vaults/{vault}"): (Permission.VAULT_DELETE, Scope.VAULT, ONLY_OWNER),
    ("POST", "/api/v1/vaults/{vault}/verify"): (Permission.VAULT_VERIFY, Scope.VAULT, CONTRIBUTE),
    ("GET", "/api/v1/vaults/{vault}/usage"): (Permission.READ, Scope.VAULT, ALL),
    ("GET", "/api/v1/reports"): (Permission.READ, Scope.GLOBAL, ALL),
    ("GET", "/api/v1/vaults/{vault}/policies"): (Permission.READ, Scope.VAULT, ALL),
    ("POST", "/api/v1/vaults/{vault}/policies"): (Permission.POLICY_WRITE, Scope.VAULT, CONTRIBUTE),
    ("GET", "/api/v1/vaults/{vault}/policies/{policy}"): (Permission.READ, Scope.VAULT, ALL),
    ("PUT", "/api/v1/vaults/{vault}/policies/{policy}"): (Permission.POLICY_WRITE, Scope.VAULT, CONTRIBUTE),
    ("DELETE", "/api/v1/vaults/{vault}/policies/{policy}"): (Permission.POLICY_WRITE, Scope.VAULT, CONTRIBUTE),
    ("GET", "/api/v1/vaults/{vault}/notifications"): (Permission.READ, Scope.VAULT, ALL),
    ("POST", "/api/v1/vaults/{vault}/notifications"): (Permission.NOTIFY_WRITE, Scope.VAULT, CONTRIBUTE),
    ("DELETE", "/api/v1/vaults/{vault}/notifications/{target_id}"): (Permission.NOTIFY_WRITE, Scope.VAULT, CONTRIBUTE),
    ("GET", "/api/v1/vms"): (Permission.READ, Scope.GLOBAL, ALL),
    ("POST", "/api/v1/vms"): (Permission.VM_WRITE, Scope.GLOBAL, CONTRIBUTE),
    ("GET", "/api/v1/vms/{vm}"): (Permission.READ, Scope.VM, ALL),
    ("POST", "/api/v1/vms/{vm}/update"): (Permission.VM_WRITE, Scope.VM, CONTRIBUTE),
    ("POST", "/api/v1/vms/{vm}/enable-agent"): (Permission.VM_WRITE, Scope.VM, CONTRIBUTE),
    ("GET", "/api/v1/items"): (Permission.READ, Scope.GLOBAL, ALL),
    ("GET", "/api/v1/items/{vm}"): (Permission.READ, Scope.VM, ALL),
    ("POST", "/api/v1/items/{vm}/enable"): (Permission.PROTECTION_ENABLE, Scope.BODY, OPERATE),
    ("POST", "/api/v1/items/{vm}/update"): (Permission.PROTECTION_CHANGE, Scope.VM, CONTRIBUTE),
    ("POST", "/api/v1/items/{vm}/disable"): (Permission.PROTECTION_CHANGE, Scope.VM, CONTRIBUTE),
    ("POST", "/api/v1/items/{vm}/resume"): (Permission.PROTECTION_ENABLE, Scope.VM, OPERATE),
    ("POST", "/api/v1/items/{vm}/undelete"): (Permission.PROTECTION_CHANGE, Scope.VM, CONTRIBUTE),
    ("POST", "/api/v1/items/{vm}/backup"): (Permission.BACKUP, Scope.VM, OPERATE),
    ("GET", "/api/v1/items/{vm}/recoverypoints"): (Permission.READ, Scope.VM, ALL),
    ("POST", "/api/v1/items/{vm}/restore"): (Permission.RESTORE, Scope.VM, OPERATE),
    ("POST", "/api/v1/items/{vm}/restore/vm"): (Permission.RESTORE, Scope.VM, OPERATE),
    ("POST", "/api/v1/items/{vm}/restore/replace-disks"): (Permission.RESTORE, Scope.VM, OPERATE),
    ("GET", "/api/v1/jobs"): (Permission.READ, Scope.GLOBAL, ALL),
    ("GET", "/api/v1/jobs/{job_id}"): (Permission.READ, Scope.JOB, ALL),
    ("POST", "/api/v1/jobs/{job_id}/cancel"): (Permission.JOB_CANCEL, Scope.JOB, OPERATE),
    ("GET", "/api/v1/items/{vm}/files/sessions"): (Permission.READ, Scope.VM, ALL),
    ("POST", "/api/v1/items/{vm}/files/mount"): (Permission.FILE_RECOVERY, Scope.VM, OPERATE),
    ("POST", "/api/v1/items/{vm}/files/unmount"): (Permission.FILE_RECOVERY, Scope.VM, OPERATE),
    ("GET", "/api/v1/items/{vm}/files/browse"): (Permission.FILE_RECOVERY, Scope.VM, OPERATE),
    ("GET", "/api/v1/items/{vm}/files/download"): (Permission.FILE_RECOVERY, Scope.VM, OPERATE),
    ("POST", "/api/v1/items/{vm}/files/script"): (Permission.FILE_RECOVERY, Scope.VM, OPERATE),
    ("GET", "/api/v1/tokens"): (Permission.TOKENS, Scope.GLOBAL, ONLY_OWNER),
    ("POST", "/api/v1/tokens"): (Permission.TOKENS, Scope.GLOBAL, ONLY_OWNER),
    ("DELETE", "/api/v1/tokens/{token_id}"): (Permission.TOKENS, Scope.GLOBAL, ONLY_OWNER),
    ("GET", "/api/v1/hosts"): (Permission.READ, Scope.GLOBAL, ALL),
    ("GET", "/api/v1/hosts/{name}"): (Permission.READ, Scope.GLOBAL, ALL),
    ("DELETE", "/api/v1/hosts/{name}"): (Permission.HOSTS, Scope.GLOBAL, ONLY_OWNER),
    # Agents: a BackupAgent token bound to {host} only (test_agent_token_only_reaches_its_own_host).
    ("POST", "/api/v1/agents/{host}/register"): (Permission.AGENT_WORK, Scope.HOST, set()),
    ("POST", "/api/v1/agents/{host}/heartbeat"): (Permission.AGENT_WORK, Scope.HOST, set()),
    ("POST", "/api/v1/agents/{host}/claim"): (Permission.AGENT_WORK, Scope.HOST, set()),
    ("POST", "/api/v1/agents/{host}/jobs/{job_id}/progress"): (Permission.AGENT_WORK, Scope.HOST, set()),
    ("POST", "/api/v1/agents/{host}/jobs/{job_id}/vm"): (Permission.AGENT_WORK, Scope.HOST, set()),
    ("POST", "/api/v1/agents/{host}/jobs/{job_id}/disk"): (Permission.AGENT_WORK, Scope.HOST, set()),
    ("POST", "/api/v1/agents/{host}/jobs/{job_id}/instant"): (Permission.AGENT_WORK, Scope.HOST, set()),
    ("POST", "/api/v1/agents/{host}/jobs/{job_id}/finish"): (Permission.AGENT_WORK, Scope.HOST, set()),
}
PUBLIC = {("GET", "/health"), ("GET", "/healthz")}
ANY_TOKEN = {("GET", "/metrics")}  # outside /api/v1; checked by test_metrics_need_any_token
SCOPES = (None, "v1", "v2")  # unscoped, the vault the objects are in, another vault


def _reached() -> None:
    raise HTTPException(status_code=418, detail="authorised")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[Sandbox, dict[str, str]]]:
    """Every role test runs on both catalogs (tokens, their scopes and the objects they reach)."""
    root = tmp_path_factory.mktemp("api-roles")
    url = request.getfixturevalue("pg_server").new_database() if request.param == "postgresql" else None
    with sandbox(root / "home", catalog_url=url) as box:
        for name in ("v1", "v2"):
            vaults.create_vault(box.ctx, name)
        vms.add_vm(box.ctx, "vm1", [make_ext4_image(root / "vm1.raw", 8)])
        job = protection.enable_protection(box.ctx, "vm1", "v1")
        values = {
            "vault": "v1",
            "vm": "vm1",
            "policy": "DefaultPolicy",
            "job_id": job["id"],
            "token_id": "0" * 16,
            "target_id": "1",
            "name": "h1",
            "host": "h1",
        }
        box.app.dependency_overrides[service_ctx] = _reached
        try:
            yield box, values
        finally:
            box.app.dependency_overrides.clear()


def api_routes(box: Sandbox) -> dict[tuple[str, str], APIRoute]:
    found: dict[tuple[str, str], APIRoute] = {}
    for context in iter_route_contexts(box.app.routes):
        route = context.original_route
        if isinstance(route, APIRoute):
            for method in route.methods or ():
                found[(method, str(context.path))] = route
    return found


def test_every_route_is_in_the_table_and_declares_its_permission(world: tuple[Sandbox, dict[str, str]]) -> None:
    box, _values = world
    routes = api_routes(box)
    api = {key for key in routes if key[1].startswith("/api/")}
    assert api - TABLE.keys() == set(), "routes without an entry in the roles table"
    assert TABLE.keys() - api == set(), "table entries without a route"
    assert {key for key in routes if not key[1].startswith("/api/")} == PUBLIC | ANY_TOKEN
    for key in api:
        authorizer = route_authorizer(routes[key])
        assert authorizer is not None, f"{key} declares no permission"
        permission, scope, _roles = TABLE[key]
        assert (authorizer.permission, authorizer.scope) == (permission, scope), key
        assert isinstance(routes[key], AuthorizedRoute), key


def _expected(permission: Permission, scope: Scope, roles: set[str], role: str, vault: str | None) -> bool:
    if role not in roles:
        return False
    if vault is None:
        return True
    if scope is Scope.BODY:  # the handler checks the body's vault; the {vm} must be in the token's vault
        return vault == "v1"
    if scope is Scope.GLOBAL:
        return permission is Permission.READ
    return vault == "v1"


@pytest.mark.parametrize("vault", SCOPES, ids=lambda v: f"scope-{v or 'all'}")
@pytest.mark.parametrize("role", ROLES)
def test_role_on_every_route(world: tuple[Sandbox, dict[str, str]], role: str, vault: str | None) -> None:
    box, values = world
    token = box.token(role, vault)
    failures = []
    for (method, template), (permission, scope, roles) in sorted(TABLE.items()):
        path = template.format(**values)
        body: dict[str, Any] = {"json": {}} if method in ("POST", "PUT") else {}
        r = box.call(method, path, token, **body)
        want = 418 if _expected(permission, scope, roles, role, vault) else 403
        if r.status_code != want:
            failures.append(f"{method} {path}: {r.status_code} (want {want}) {r.text[:200]}")
        if want == 403:
            assert r.json()["code"] == "forbidden"
    assert not failures, "\n".join(failures)


def test_agent_token_only_reaches_its_own_host(world: tuple[Sandbox, dict[str, str]]) -> None:
    """A BackupAgent token bound to h1: the agent calls of h1, nothing else (not even a read), not h2's."""
    box, values = world
    _view, token = tokens.create_token(box.ctx, "BackupAgent", host="h1")
    failures = []
    for (method, template), (permission, _scope, _roles) in sorted(TABLE.items()):
        for host in ("h1", "h2"):
            path = template.format(**{**values, "host": host})
            r = box.call(method, path, token, **({"json": {}} if method in ("POST", "PUT") else {}))
            want = 418 if permission is Permission.AGENT_WORK and host == "h1" else 403
            if r.status_code != want:
                failures.append(f"{method} {path}: {r.status_code} (want {want}) {r.text[:200]}")
            if want == 403 and "{host}" in template:
                assert "h2" in r.json()["message"] and "BackupAgent --host h2" in r.json()["hint"]
    assert not failures, "\n".join(failures)


def test_metrics_need_any_token_and_a_scoped_one_sees_its_vault(world: tuple[Sandbox, dict[str, str]]) -> None:
    box, _values = world
    for token in (None, "garbage", "vmv_0123456789abcdef_" + "B" * 43):
        r = box.call("GET", "/metrics", token)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", r.text
    for role in ROLES:
        r = box.call("GET", "/metrics", box.token(role))
        assert r.status_code == 200, (role, r.text)
        assert 'vmvault_vault_recovery_points{vault="v1"}' in r.text and 'vault="v2"' in r.text, role
    scoped = box.call("GET", "/metrics", box.token(READER, "v1")).text
    assert 'vault="v1"' in scoped and 'vault="v2"' not in scoped, scoped


def test_denied_before_the_body_is_read(world: tuple[Sandbox, dict[str, str]]) -> None:
    box, values = world
    reader = box.token(READER)
    for (method, template), (_p, _s, roles) in TABLE.items():
        if method == "GET" or READER in roles:
            continue
        path = template.format(**{**values, "vm": "no-such-vm", "vault": "no-such-vault"})
        for content in (b"{", b"[1,2", b"not json"):
            r = box.call(method, path, reader, content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == 403, f"{method} {path} {content!r}: {r.status_code} {r.text}"


def test_401_without_or_with_a_forged_revoked_or_expired_token(world: tuple[Sandbox, dict[str, str]]) -> None:
    box, values = world
    owner = box.token(OWNER)
    token_id = owner.split("_")[1]
    forged = f"vmv_{token_id}_{'A' * 43}"
    revoked_view, revoked = tokens.create_token(box.ctx, OWNER)
    tokens.revoke_token(box.ctx, revoked_view["id"])
    expired_view, expired = tokens.create_token(box.ctx, OWNER, expires="1h")
    with box.ctx.catalog.write() as s:
        repos.update_api_token(s, expired_view["id"], expires="2000-01-01T00:00:00.000000Z")
    for method, template in TABLE:
        path = template.format(**values)
        for token in (None, forged, "vmv_0123456789abcdef_" + "B" * 43, "garbage", revoked, expired):
            box.app.state.signins.succeeded("testclient")  # hundreds of failures: keep them unthrottled here
            r = box.call(method, path, token, json={} if method in ("POST", "PUT") else None)
            assert r.status_code == 401, f"{method} {path} with {token!r}: {r.status_code}"
            assert r.json()["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
    assert box.call("GET", "/health", None).status_code == 200
    assert box.call("GET", "/openapi.json", None).status_code == 200
    assert box.call("GET", "/docs", None).status_code == 200


def test_a_route_without_a_declared_permission_is_refused_to_everyone(tmp_path: Path) -> None:
    with sandbox(tmp_path / "home") as box:
        router = APIRouter(prefix="/api/v1", route_class=AuthorizedRoute)

        @router.get("/undeclared")
        def undeclared() -> dict[str, str]:
            return {"leak": "yes"}

        @router.get("/declared", dependencies=[require(Permission.READ, Scope.GLOBAL)])
        def declared() -> dict[str, str]:
            return {"ok": "yes"}

        box.app.include_router(router)
        owner = box.token(OWNER)
        assert box.call("GET", "/api/v1/undeclared", owner).status_code == 403
        assert box.call("GET", "/api/v1/undeclared", None).status_code == 401
        assert box.call("GET", "/api/v1/declared", owner).json() == {"ok": "yes"}

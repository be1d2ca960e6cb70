"""The portal's access rules without a browser: every page declares its permission, sign-in is
required, CSRF is checked first, and each role is refused exactly the writes the API refuses it.

The table below lists every portal route (enumerated from the app at test time: a new page without
an entry fails). Refusals are checked on the real service: a refused POST changes nothing.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient

from api_support import Sandbox, make_ext4_image, sandbox
from vmvault.api.auth import ROLE_PERMISSIONS, Permission, Scope
from vmvault.service import jobs, protection, tokens, vaults, vms
from vmvault.service.tokens import ROLES
from vmvault.web import portal_router
from vmvault.web.core import Access, PortalRoute

P = Permission
TABLE: dict[tuple[str, str], Access] = {
    ("GET", "/signin"): Access(None),
    ("POST", "/signin"): Access(None),
    ("POST", "/signout"): Access(P.READ),
    ("GET", "/"): Access(P.READ),
    ("GET", "/vms"): Access(P.READ),
    ("GET", "/vms/{vm}"): Access(P.READ, Scope.VM),
    ("GET", "/vms/{vm}/item"): Access(P.READ, Scope.VM),
    ("GET", "/vms/{vm}/enable"): Access(P.PROTECTION_ENABLE, Scope.BODY),
    ("POST", "/vms/{vm}/enable"): Access(P.PROTECTION_ENABLE, Scope.BODY),
    ("POST", "/vms/{vm}/backup"): Access(P.BACKUP, Scope.VM),
    ("POST", "/vms/{vm}/disable"): Access(P.PROTECTION_CHANGE, Scope.VM),
    ("POST", "/vms/{vm}/resume"): Access(P.PROTECTION_ENABLE, Scope.VM),
    ("POST", "/vms/{vm}/undelete"): Access(P.PROTECTION_CHANGE, Scope.VM),
    ("GET", "/vms/{vm}/files"): Access(P.READ, Scope.VM),
    ("POST", "/vms/{vm}/files/mount"): Access(P.FILE_RECOVERY, Scope.VM),
    ("POST", "/vms/{vm}/files/unmount"): Access(P.FILE_RECOVERY, Scope.VM),
    ("GET", "/vms/{vm}/files/browse"): Access(P.FILE_RECOVERY, Scope.VM),
    ("GET", "/vms/{vm}/files/download"): Access(P.FILE_RECOVERY, Scope.VM),
    ("POST", "/vms/{vm}/files/script"): Access(P.FILE_RECOVERY, Scope.VM),
    ("GET", "/vms/{vm}/files/script/{name}"): Access(P.FILE_RECOVERY, Scope.VM),
    ("GET", "/vms/{vm}/restore"): Access(P.READ, Scope.VM),
    ("POST", "/vms/{vm}/restore"): Access(P.RESTORE, Scope.VM),
    ("GET", "/jobs"): Access(P.READ),
    ("GET", "/jobs/rows"): Access(P.READ),
    ("GET", "/jobs/{job_id}"): Access(P.READ, Scope.JOB),
    ("GET", "/jobs/{job_id}/live"): Access(P.READ, Scope.JOB),
    ("POST", "/jobs/{job_id}/cancel"): Access(P.JOB_CANCEL, Scope.JOB),
    ("GET", "/vaults"): Access(P.READ),
    ("POST", "/vaults"): Access(P.VAULT_CREATE),
    ("GET", "/vaults/new"): Access(P.VAULT_CREATE),
    ("POST", "/vaults/passphrase-check"): Access(P.VAULT_CREATE),
    ("GET", "/vaults/{vault}/recovery-sheet"): Access(P.READ, Scope.VAULT),
    ("POST", "/vaults/{vault}/recovery-sheet"): Access(P.VAULT_CREATE, Scope.VAULT),
    ("POST", "/vaults/{vault}/verify"): Access(P.VAULT_VERIFY, Scope.VAULT),
    ("POST", "/vaults/{vault}/gc"): Access(P.VAULT_VERIFY, Scope.VAULT),
    ("POST", "/vaults/{vault}/notifications"): Access(P.NOTIFY_WRITE, Scope.VAULT),
    ("POST", "/vaults/{vault}/notifications/{target_id}/delete"): Access(P.NOTIFY_WRITE, Scope.VAULT),
    ("GET", "/vms/add"): Access(P.VM_WRITE),
    ("POST", "/vms/add/disks"): Access(P.VM_WRITE),
    ("POST", "/vms/add/qemu"): Access(P.VM_WRITE),
    ("POST", "/vms/add/libvirt"): Access(P.VM_WRITE),
    ("POST", "/vms/{vm}/policy"): Access(P.PROTECTION_CHANGE, Scope.VM),
    ("GET", "/reports"): Access(P.READ),
    ("GET", "/vms/{vm}/jobs"): Access(P.READ, Scope.VM),
    ("GET", "/vms/{vm}/files/sessions"): Access(P.READ, Scope.VM),
    ("GET", "/reports.csv"): Access(P.READ),
    ("GET", "/hosts"): Access(P.READ),
    ("GET", "/tokens"): Access(P.TOKENS),
    ("POST", "/tokens"): Access(P.TOKENS),
    ("POST", "/tokens/{token_id}/revoke"): Access(P.TOKENS),
    ("GET", "/vaults/{vault}"): Access(P.READ, Scope.VAULT),
    ("GET", "/vaults/{vault}/policies/new"): Access(P.POLICY_WRITE, Scope.VAULT),
    ("POST", "/vaults/{vault}/policies/new"): Access(P.POLICY_WRITE, Scope.VAULT),
    ("GET", "/vaults/{vault}/policies/{policy}"): Access(P.READ, Scope.VAULT),
    ("POST", "/vaults/{vault}/policies/{policy}"): Access(P.POLICY_WRITE, Scope.VAULT),
    ("POST", "/vaults/{vault}/policies/{policy}/delete"): Access(P.POLICY_WRITE, Scope.VAULT),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, dict[str, str]]]:
    root = tmp_path_factory.mktemp("portal-access")
    with sandbox(root / "home") as box:
        for name in ("v1", "v2"):
            vaults.create_vault(box.ctx, name)
        vms.add_vm(box.ctx, "vm1", [make_ext4_image(root / "vm1.raw", 8)])
        job = protection.enable_protection(box.ctx, "vm1", "v1")
        values = {"vault": "v1", "vm": "vm1", "policy": "DefaultPolicy", "job_id": job["id"], "name": "x-recover.sh",
                  "target_id": "1", "token_id": "0"}
        yield box, values


def portal_routes() -> dict[tuple[str, str], APIRoute]:
    found = {}
    for context in iter_route_contexts(portal_router().routes):
        route = context.original_route
        assert isinstance(route, PortalRoute), context.path
        for method in route.methods:
            found[(method, context.path)] = route
    return found


def signed_in(box: Sandbox, token: str) -> tuple[TestClient, str]:
    """A client with a portal session of this token, and the session's CSRF token."""
    client = TestClient(box.app, raise_server_exceptions=False)
    page = client.get("/signin")
    nonce = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert nonce, page.text
    r = client.post("/signin", data={"token": token, "csrf": nonce.group(1)}, follow_redirects=False)
    assert r.status_code == 303, r.text
    page = client.get("/vms")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf, page.text
    return client, csrf.group(1)


def test_every_portal_route_is_in_the_table_and_declares_its_access() -> None:
    routes = portal_routes()
    assert routes.keys() - TABLE.keys() == set(), "portal routes without an entry in the table"
    assert TABLE.keys() - routes.keys() == set(), "table entries without a route"
    for key, route in routes.items():
        assert getattr(route.endpoint, "portal_access", None) == TABLE[key], key


def test_signed_out_pages_redirect_and_posts_are_refused(world: tuple[Sandbox, dict[str, str]]) -> None:
    box, values = world
    client = TestClient(box.app, raise_server_exceptions=False)
    for (method, template), rule in sorted(TABLE.items()):
        if rule.permission is None:
            continue
        path = template.format(**values)
        r = client.request(method, path, data={"csrf": "x"}, follow_redirects=False)
        if method == "GET":
            assert r.status_code == 303 and r.headers["location"].startswith("/signin?next="), (path, r.status_code)
        else:
            assert r.status_code == 403 and "not signed in" in r.text, (path, r.status_code)


def test_a_forged_or_revoked_token_does_not_sign_in(world: tuple[Sandbox, dict[str, str]]) -> None:
    box, _values = world
    client = TestClient(box.app, raise_server_exceptions=False)
    nonce = re.search(r'name="csrf" value="([^"]+)"', client.get("/signin").text)
    assert nonce
    forged = "vmv_0123456789abcdef_" + "A" * 43
    r = client.post("/signin", data={"token": forged, "csrf": nonce.group(1)}, follow_redirects=False)
    assert r.status_code == 401 and "unknown, expired or revoked" in r.text
    # the sign-in form itself is CSRF-protected (double submit): a foreign page cannot sign you in
    r = client.post("/signin", data={"token": forged, "csrf": "guess"}, follow_redirects=False)
    assert r.status_code == 403
    view, token = tokens.create_token(box.ctx, "BackupReader")
    signed, _csrf = signed_in(box, token)
    assert signed.get("/vms").status_code == 200
    tokens.revoke_token(box.ctx, view["id"])  # revoking the token ends its portal sessions at once
    r = signed.get("/vms", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/signin")


@pytest.mark.parametrize("role", ROLES)
def test_each_role_is_refused_the_writes_it_may_not_do(world: tuple[Sandbox, dict[str, str]], role: str) -> None:
    box, values = world
    token = tokens.create_token(box.ctx, role, host="h1")[1] if role == "BackupAgent" else box.token(role)
    client, csrf = signed_in(box, token)
    before = [j["id"] for j in jobs.list_jobs(box.ctx)]
    refused = 0
    for (method, template), rule in sorted(TABLE.items()):
        if method != "POST" or rule.permission is None or rule.permission in ROLE_PERMISSIONS[role]:
            continue
        r = client.post(template.format(**values), data={"csrf": csrf}, follow_redirects=False)
        assert r.status_code == 403, (template, r.status_code)
        assert f"role {role} may not do this ({rule.permission.value})" in r.text, template
        refused += 1
    every_write = sum(1 for (method, _t), rule in TABLE.items() if method == "POST" and rule.permission is not None)
    expected = {"Owner": 0, "BackupContributor": 2, "BackupOperator": 18, "BackupReader": 26,
                "BackupAgent": every_write}  # fmt: skip
    assert refused == expected[role]  # an agent's token (no portal rights at all) is refused every write
    assert [j["id"] for j in jobs.list_jobs(box.ctx)] == before


def test_a_vault_scoped_token_sees_only_its_vault(world: tuple[Sandbox, dict[str, str]]) -> None:
    box, _values = world
    client, csrf = signed_in(box, box.token("BackupOperator", vault="v2"))
    assert client.get("/vms/vm1").status_code == 403  # vm1 is protected by v1
    assert client.get("/vaults/v1").status_code == 403
    assert client.get("/vaults/v2").status_code == 200
    assert "v1" not in re.sub(r"<header.*?</header>", "", client.get("/vaults").text, flags=re.S)
    for page in ("/", "/reports", "/vms?bucket=never"):  # the overview's counts and the reports too
        body = re.sub(r"<header.*?</header>", "", client.get(page).text, flags=re.S)
        assert "v1" not in body and "vm1" not in body, page
    assert "No job in the last 24 hours" in client.get("/").text  # v1's jobs are not counted
    r = client.post("/vms/vm1/backup", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 403 and "limited to vault 'v2'" in html.unescape(r.text)
    # the Enable-backup form and its post keep the API's scope too: vm1 is v1's
    r = client.get("/vms/vm1/enable", follow_redirects=False)
    assert r.status_code == 403 and "limited to vault 'v2'" in html.unescape(r.text), r.status_code
    assert "vm1.raw" not in r.text  # nothing of the VM is shown
    r = client.post("/vms/vm1/enable", data={"csrf": csrf, "vault": "v2"}, follow_redirects=False)
    assert r.status_code == 403 and "limited to vault 'v2'" in html.unescape(r.text), r.status_code


def test_the_api_keeps_its_own_answers_beside_the_portal(world: tuple[Sandbox, dict[str, str]]) -> None:
    box, _values = world
    assert box.client.get("/health").json() == {"status": "ok"}
    assert box.client.get("/openapi.json").status_code == 200
    assert all(not p.startswith(("/vms", "/signin", "/jobs")) for p in box.client.get("/openapi.json").json()["paths"])
    assert box.client.get("/api/v1/vms").status_code == 401
    assert box.client.request("DELETE", "/api/v1/vms").status_code == 405
    assert box.client.get("/api/v1/nothing").json()["code"] == "not_found"


def test_enable_backup_into_a_new_vault(world: tuple[Sandbox, dict[str, str]], tmp_path: Path) -> None:
    box, _values = world
    vms.add_vm(box.ctx, "vm2", [make_ext4_image(tmp_path / "vm2.raw", 8)])
    operator, csrf = signed_in(box, box.token("BackupOperator"))
    r = operator.post("/vms/vm2/enable", data={"csrf": csrf, "vault": "__new__", "new_vault": "fresh"})
    assert r.status_code == 403 and "may not create vaults" in r.text  # an Operator picks an existing vault
    client, csrf = signed_in(box, box.token("BackupContributor"))
    r = client.post("/vms/vm2/enable", data={"csrf": csrf, "vault": "__new__", "new_vault": "fresh"})
    assert r.status_code == 200 and "Backup enabled for vm2 in vault fresh." in r.text, r.text
    assert "Initial backup pending" in r.text
    assert [p["name"] for p in vaults.list_vaults(box.ctx) if p["name"] == "fresh"] == ["fresh"]
    r = client.post("/vms/vm2/enable", data={"csrf": csrf, "vault": "v1"})
    assert r.status_code == 409 and "already protected by vault" in html.unescape(r.text)  # the service's error, as is


def test_portal_pages_are_not_cached_or_framed_and_unknown_pages_are_html(
    world: tuple[Sandbox, dict[str, str]],
) -> None:
    box, _values = world
    client, _csrf = signed_in(box, box.token("BackupReader"))
    page = client.get("/vms")
    assert page.headers["cache-control"] == "no-store" and page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    missing = client.get("/no/such/page")
    assert missing.status_code == 404 and "no page /no/such/page" in missing.text
    assert missing.headers["content-type"].startswith("text/html")

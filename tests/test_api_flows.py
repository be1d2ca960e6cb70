"""End-to-end API flows on a sandboxed home (FastAPI's TestClient), and `vmvault serve` serving the API."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from api_support import PASSPHRASE, Sandbox, make_ext4_image, sandbox
from helpers import Cli, allow_args, files_equal
from helpers import first_run_owner_token as _owner_token

API = "/api/v1"


def wait_job(box: Sandbox, token: str, job_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = box.call("GET", f"{API}/jobs/{job_id}", token).json()
        if job["properties"]["status"] != "InProgress":
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end in {timeout}s")


def test_backup_and_restore_through_the_api(tmp_path: Path, catalog_url: str | None) -> None:
    disk = make_ext4_image(tmp_path / "web1.raw", 16, {"hello.txt": b"hello from web1\n" * 100})
    with sandbox(tmp_path / "home", catalog_url=catalog_url) as box:
        owner = box.token("Owner")
        view = box.call("POST", f"{API}/tokens", owner, json={"role": "BackupContributor"})
        assert view.status_code == 201, view.text
        contributor = view.json()["token"]
        reader = box.token("BackupReader")

        r = box.call("POST", f"{API}/vaults", contributor, json={"name": "main", "passphrase": PASSPHRASE})
        assert r.status_code == 201, r.text
        operator = box.token("BackupOperator", vault="main")
        r = box.call("POST", f"{API}/vms", contributor, json={"name": "web1", "disks": [str(disk)]})
        assert r.status_code == 201, r.text
        assert r.json()["protectionState"] == "NotProtected"

        # a vault-scoped operator acts only on VMs already protected in its vault: it cannot pull an
        # unprotected VM into its vault (nor into another); an unscoped token protects it
        box.call("POST", f"{API}/vaults", contributor, json={"name": "other", "passphrase": PASSPHRASE})
        for vault in ("other", "main"):
            r = box.call("POST", f"{API}/items/web1/enable", operator, json={"vault": vault})
            assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
        r = box.call("POST", f"{API}/items/web1/enable", contributor, json={"vault": "main"})
        assert r.status_code == 200, r.text
        assert r.json()["properties"]["operation"] == "ConfigureBackup"

        item = box.call("GET", f"{API}/items/web1", reader).json()
        assert (item["id"], item["properties"]["vaultName"]) == ("/vaults/main/backupProtectedItems/web1", "main")
        policies = box.call("GET", f"{API}/vaults/main/policies", reader).json()["value"]
        assert [p["name"] for p in policies] == ["DefaultPolicy"]

        r = box.call("POST", f"{API}/items/web1/backup", operator, json={"retainUntil": "2099-01-31"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["properties"]["operation"] == "Backup" and job["properties"]["entityFriendlyName"] == "web1"
        done = wait_job(box, reader, job["name"])
        assert done["properties"]["status"] == "Completed", done

        points = box.call("GET", f"{API}/items/web1/recoverypoints", reader).json()["value"]
        assert len(points) == 1
        target = tmp_path / "restored"
        body = {"rp": points[0]["name"], "targetDir": str(target)}
        r = box.call("POST", f"{API}/items/web1/restore", operator, json=body)
        assert r.status_code == 202, r.text
        restored = wait_job(box, reader, r.json()["name"])
        assert restored["properties"]["status"] == "Completed", restored
        assert restored["properties"]["operation"] == "Restore"
        assert files_equal(target / "disk0.raw", disk)

        jobs = box.call("GET", f"{API}/jobs", operator).json()["value"]
        assert {j["properties"]["operation"] for j in jobs} >= {"Backup", "Restore", "ConfigureBackup"}
        assert all(j["properties"]["vaultName"] == "main" for j in jobs)  # the scoped token sees its vault's jobs only
        usage = box.call("GET", f"{API}/vaults/main/usage", reader)
        assert usage.status_code == 200, usage.text


def test_errors_are_json_with_code_message_hint(tmp_path: Path, catalog_url: str | None) -> None:
    with sandbox(tmp_path / "home", catalog_url=catalog_url) as box:
        owner = box.token("Owner")
        r = box.call("GET", f"{API}/vms/nope", owner)
        assert r.status_code == 404
        body = r.json()
        assert body["code"] == "not_found" and "nope" in body["message"] and body["hint"]
        r = box.call("POST", f"{API}/vaults", owner, json={"name": "bad name!", "passphrase": PASSPHRASE})
        assert r.status_code == 422 and r.json()["code"] == "invalid_input"
        r = box.call("POST", f"{API}/vaults", owner, json={"name": "x", "unknownField": 1})
        assert r.status_code == 422 and r.json()["code"] == "invalid_input" and r.json()["hint"]
        box.call("POST", f"{API}/vaults", owner, json={"name": "main", "passphrase": PASSPHRASE})
        r = box.call("POST", f"{API}/vaults", owner, json={"name": "main", "passphrase": PASSPHRASE})
        assert r.status_code == 409 and r.json()["code"] == "already_exists"
        r = box.call("POST", f"{API}/items/nope/backup", owner, json={})
        assert r.status_code == 404 and r.json()["code"] == "not_found"  # raised before any job is recorded
        assert box.call("GET", f"{API}/jobs", owner).json() == {"value": [], "nextLink": None}
        r = box.call("POST", f"{API}/tokens", owner, json={"role": "Admin"})
        assert r.status_code == 422 and "BackupReader" in r.json()["hint"]
        r = box.call("GET", f"{API}/vaults/main/policies?includedeleted=true", owner)  # a misspelt parameter
        assert r.status_code == 422 and r.json()["message"] == "unknown query parameter 'includedeleted'", r.text
        assert r.json()["hint"] == "this call takes: $skipToken, $top"  # a list's pages (Azure's)
        r = box.call("GET", f"{API}/vaults/main/policies/DefaultPolicy?includedeleted=true", owner)
        assert r.status_code == 422 and r.json()["hint"] == "this call takes no query parameter", r.text
        r = box.call("GET", f"{API}/jobs?operaton=Backup", owner)
        assert r.status_code == 422 and "operation" in r.json()["hint"], r.text


def test_a_vms_quiesce_budget_is_set_through_the_api_by_a_contributor_only(tmp_path: Path) -> None:
    disk = make_ext4_image(tmp_path / "db1.raw", 16)
    with sandbox(tmp_path / "home") as box:
        contributor, operator = box.token("BackupContributor"), box.token("BackupOperator")
        r = box.call("POST", f"{API}/vms", contributor, json={"name": "db1", "disks": [str(disk)]})
        assert r.status_code == 201, r.text

        def budget() -> object:
            return box.call("GET", f"{API}/vms/db1", operator).json()["quiesceTimeoutSeconds"]

        assert budget() is None  # the service's VMVAULT_QUIESCE_TIMEOUT
        r = box.call("POST", f"{API}/vms/db1/update", contributor, json={"quiesceTimeoutSeconds": 120})
        assert r.status_code == 200 and r.json()["quiesceTimeoutSeconds"] == 120 and r.json()["name"] == "db1", r.text
        assert budget() == 120
        r = box.call("POST", f"{API}/vms/db1/update", operator, json={"quiesceTimeoutSeconds": 5})
        assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
        # The CLI's bounds (1-3600, 0: the setting); a body from the network is untrusted: no coercion.
        for bad in (3601, -1, 10**30, "30", 30.5, True, None):
            r = box.call("POST", f"{API}/vms/db1/update", contributor, json={"quiesceTimeoutSeconds": bad})
            assert r.status_code == 422 and r.json()["code"] == "invalid_input", (bad, r.text)
        for body in ({}, {"quiesceTimeoutSeconds": 30, "frozenWindowSeconds": 1}):
            r = box.call("POST", f"{API}/vms/db1/update", contributor, json=body)
            assert r.status_code == 422 and r.json()["code"] == "invalid_input", (body, r.text)
        assert budget() == 120, "a refused update changed the VM"
        r = box.call("POST", f"{API}/vms/nope/update", contributor, json={"quiesceTimeoutSeconds": 30})
        assert r.status_code == 404 and "nope" in r.json()["message"], r.text
        r = box.call("POST", f"{API}/vms/db1/update", contributor, json={"quiesceTimeoutSeconds": 0})
        assert r.status_code == 200 and budget() is None, r.text


def test_scoped_tokens_see_only_their_vault(tmp_path: Path, catalog_url: str | None) -> None:
    with sandbox(tmp_path / "home", catalog_url=catalog_url) as box:
        owner = box.token("Owner")
        for name in ("a", "b"):
            box.call("POST", f"{API}/vaults", owner, json={"name": name, "passphrase": PASSPHRASE})
        scoped = box.token("BackupReader", vault="b")
        assert [v["name"] for v in box.call("GET", f"{API}/vaults", scoped).json()["value"]] == ["b"]
        assert box.call("GET", f"{API}/vaults/a", scoped).status_code == 403
        assert box.call("GET", f"{API}/vaults/b", scoped).status_code == 200


def _get(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@contextmanager
def served(
    cli: Cli, roots: list[Path] | None = None, extra: tuple[str, ...] = (), context: ssl.SSLContext | None = None
) -> Iterator[tuple[str, str]]:
    """`vmvault serve --port 0` on the CLI's home: yields (its address, the first-run Owner token).

    API callers may use paths under roots (default: the home's parent, and the home's vaults folder).
    extra: more serve options (--tls-cert/--tls-key: then context trusts its certificate).
    """
    allow = allow_args(*(roots if roots is not None else [cli.home.parent, cli.home / "vaults"]))
    proc = subprocess.Popen(
        cli.argv("serve", "--host", "127.0.0.1", "--port", "0", "--tick", "0.5", *allow, *extra, json_output=False),
        env=cli.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        scheme = "https" if context is not None else "http"
        assert f"listening on {scheme}://127.0.0.1:" in line, (line, proc.poll() is not None and proc.stderr.read())
        address = line.split("listening on ")[1].split()[0]
        token_line = proc.stdout.readline()
        assert token_line.startswith("first-run Owner token"), token_line
        token = _owner_token(token_line)
        assert _get(f"{address}/healthz", context=context)[0] == 401  # pid, home and jobs only for a token
        assert _get(f"{address}/healthz", token, context)[1]["pid"] == proc.pid
        yield address, token
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)  # reads its pipes while it stops: a full stderr pipe would block its logging
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    assert proc.returncode == 0


def test_serve_serves_the_api_and_prints_a_first_run_owner_token(tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home")
    cli.ok("vault", "create", "main")
    with served(cli) as (address, token):
        assert _get(f"{address}/health") == (200, {"status": "ok"})
        assert _get(f"{address}/api/v1/vaults")[0] == 401
        status, vaults = _get(f"{address}/api/v1/vaults", token)
        assert status == 200 and [v["name"] for v in vaults["value"]] == ["main"]

        listed = cli.ok("token", "list").json()
        assert [(t["name"], t["role"]) for t in listed] == [("first-run", "Owner")]
        assert listed[0]["lastUsed"] is not None
        made = cli.ok("token", "create", "--role", "backupreader", "--vault", "main", "--expires", "2d").json()
        assert made["role"] == "BackupReader" and made["vault"] == "main" and made["expires"]
        assert _get(f"{address}/api/v1/vaults/main", made["token"])[0] == 200
        assert _get(f"{address}/api/v1/tokens", made["token"])[0] == 403
        cli.ok("token", "revoke", made["id"])
        assert _get(f"{address}/api/v1/vaults/main", made["token"])[0] == 401
        assert made["token"] not in (cli.home / "catalog.db").read_bytes().decode("latin-1")


def test_token_cli_refuses_bad_input(tmp_path: Path) -> None:
    cli = Cli(home=tmp_path / "home")
    assert cli.fails("token", "create", "--role", "Admin").returncode == 64
    assert cli.fails("token", "create", "--role", "Owner", "--vault", "nope").returncode == 66
    assert cli.fails("token", "create", "--role", "Owner", "--expires", "2000-01-01").returncode == 64
    assert cli.fails("token", "revoke", "0123456789abcdef").returncode == 66
    assert cli.ok("token", "list").json() == []


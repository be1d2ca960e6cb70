"""The portal's first hour without a browser (issue 22): vault creation with a passphrase typed twice,
the recovery sheet, tokens, the dashboard and reports, what restores record, and no page naming a
CLI command or flag. A real service on a sandboxed home with no VMVAULT_PASSPHRASE; Starlette's
in-process client stands for a browser on the server itself (loopback), except where a test says
it comes from another host.
"""

from __future__ import annotations

import csv
import html
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api_support import make_ext4_image
from vmvault.api.app import create_app
from vmvault.service import backups, items, jobs, notify, protection, tokens, vaults, vms
from vmvault.service.context import Context
from vmvault.service.paths import build_policy
from vmvault.settings import Settings
from vmvault.web.wording import label, portal_fix

GOOD = "violet stapler orbit canyon"
# a CLI command ("vmvault vm add", "vault create") or a flag (--target-dir) in a rendered page
_COMMANDS = "vm|vault|backup|restore|files|job|policy|token|protection|item|recoverypoint|serve|report|host|agent"
CLI_WORDS = re.compile(rf"(?<![\w/-])--[a-z][a-z-]+|\bvmvault ({_COMMANDS})\b|VMVAULT_")


@dataclass
class World:
    ctx: Context
    client: TestClient
    csrf: str
    root: Path
    owner_id: str


def _csrf(text: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', text)
    assert found, text[:400]
    return found.group(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("portal-pages")
    settings = Settings(home=root / "home", passphrase=None)  # like `make run`: no passphrase in the environment
    allow = [str(root)]
    app = create_app(settings, paths=build_policy(settings, disks=allow, vaults=allow, restores=allow))
    with TestClient(app, raise_server_exceptions=False) as client:
        ctx: Context = app.state.ctx
        view, token = tokens.create_token(ctx, "Owner", name="admin")
        signin = client.get("/signin")
        r = client.post("/signin", data={"token": token, "csrf": _csrf(signin.text)}, follow_redirects=False)
        assert r.status_code == 303
        yield World(ctx, client, _csrf(client.get("/").text), root, view["id"])


def _page_text(response: object) -> str:
    text: str = response.text  # type: ignore[attr-defined]
    return html.unescape(re.sub(r"<[^>]+>", " ", text))


def test_the_first_vault_is_created_with_a_passphrase_typed_twice(world: World) -> None:
    c, csrf = world.client, world.csrf
    page = c.get("/")
    assert "Create a vault" in page.text and 'href="/vaults/new"' in page.text  # the overview's first steps
    form = c.get("/vaults/new").text
    assert 'name="passphrase"' in form and 'name="passphrase2"' in form and "losing it loses the backups" in form
    assert (
        "GRS"
        not in re.sub(r"<p class=\"hint\">.*?</p>", "", form, flags=re.S).split("<select")[1].split("</select>")[0]
    )
    # each refusal says why and changes nothing
    cases = [
        ({"passphrase": GOOD, "passphrase2": GOOD + "x", "understood": "1"}, "the two passphrases differ"),
        ({"passphrase": "short", "passphrase2": "short", "understood": "1"}, "too short"),
        ({"passphrase": "password1234", "passphrase2": "password1234", "understood": "1"}, "common passwords"),
        ({"passphrase": GOOD, "passphrase2": GOOD}, "confirm that you keep the passphrase safe"),
        ({}, "a passphrase is required"),
    ]
    for fields, words in cases:
        r = c.post("/vaults", data={"csrf": csrf, "name": "main", **fields})
        assert r.status_code == 422 and words in html.unescape(r.text), (fields, r.status_code)
        assert 'value="main"' in r.text  # the form keeps the name
    assert vaults.list_vaults(world.ctx) == []
    strength = c.post("/vaults/passphrase-check", data={"csrf": csrf, "passphrase": "letmein"}).json()
    assert strength["ok"] is False and "too short" in strength["message"]
    assert c.post("/vaults/passphrase-check", data={"csrf": csrf, "passphrase": GOOD}).json()["ok"] is True
    r = c.post(
        "/vaults", data={"csrf": csrf, "name": "main", "passphrase": GOOD, "passphrase2": GOOD, "understood": "1"}
    )
    assert r.status_code == 200 and "Vault main created" in r.text and "Download recovery sheet" in r.text
    assert vaults.check_vault_passphrase(world.ctx, "main", GOOD) == {"vault": "main", "passphrase": "ok"}


def test_the_passphrase_form_needs_https_or_loopback(world: World, tmp_path: Path) -> None:
    c = world.client
    remote = TestClient(c.app, raise_server_exceptions=False, client=("192.0.2.7", 5555))  # another host, plain HTTP
    remote.cookies.update(c.cookies)
    page = remote.get("/vaults/new")
    assert 'name="passphrase"' not in page.text and "not encrypted" in page.text
    r = remote.post("/vaults", data={"csrf": world.csrf, "name": "far", "passphrase": GOOD, "passphrase2": GOOD,
                                     "understood": "1"})  # fmt: skip
    assert r.status_code == 403 and "only be sent over HTTPS" in html.unescape(r.text)
    r = remote.post("/vaults/passphrase-check", data={"csrf": world.csrf, "passphrase": GOOD})
    assert r.status_code == 403
    assert "far" not in [v["name"] for v in vaults.list_vaults(world.ctx)]


def test_the_recovery_sheet_names_the_vault_and_holds_the_passphrase_only_on_request(world: World) -> None:
    c = world.client
    view = vaults.show_vault(world.ctx, "main")
    sheet = c.get("/vaults/main/recovery-sheet")
    assert sheet.headers["content-disposition"].startswith("attachment")
    assert view["uuid"] in sheet.text and view["storageDir"] in sheet.text and GOOD not in sheet.text
    wrong = c.post("/vaults/main/recovery-sheet", data={"csrf": world.csrf, "passphrase": "not the passphrase at all"})
    assert wrong.status_code != 200 and GOOD not in wrong.text
    right = c.post("/vaults/main/recovery-sheet", data={"csrf": world.csrf, "passphrase": GOOD})
    assert right.status_code == 200 and f"Passphrase:       {GOOD}" in right.text


def test_add_a_vm_in_the_portal_only_inside_the_allowed_roots(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> None:
    c, csrf = world.client, world.csrf
    empty = c.get("/vms").text
    assert 'href="/vms/add"' in empty
    page = c.get("/vms/add").text
    assert str(world.root) in page and 'id="add-libvirt"' in page
    outside = tmp_path_factory.getbasetemp().parent / "elsewhere.raw"
    r = c.post("/vms/add/disks", data={"csrf": csrf, "name": "out", "disks": str(outside)})
    assert r.status_code == 403 and "outside the allowed disk roots" in html.unescape(r.text)
    assert not CLI_WORDS.search(_page_text(r)), CLI_WORDS.search(_page_text(r))
    disk = make_ext4_image(world.root / "web1.raw", 8, {"a.txt": b"hello\n"})
    r = c.post("/vms/add/disks", data={"csrf": csrf, "name": "web1", "disks": f"{disk}\n"})
    assert r.status_code == 200 and "VM web1 added" in r.text
    assert [d["path"] for d in vms.show_vm(world.ctx, "web1")["disks"]] == [str(disk)]


def test_backup_restore_records_the_target_and_policy_undelete_resume(world: World) -> None:
    c, csrf, ctx = world.client, world.csrf, world.ctx
    r = c.post("/vms/web1/enable", data={"csrf": csrf, "vault": "main", "policy": "DefaultPolicy"})
    assert "Initial backup pending" in r.text  # labels in words
    assert backups.backup_now(ctx, "web1").error is None
    point = backups.list_recovery_points(ctx, "web1")[0]
    restore = c.get("/vms/web1/restore").text
    assert 'value="vm"' not in restore and "no VM definition" in restore  # disk-only VM: no "new VM" offered
    assert 'name="overwrite"' in restore
    target = world.root / "restored"
    r = c.post("/vms/web1/restore", data={"csrf": csrf, "rp": point["id"], "mode": "disks", "target_dir": str(target)})
    job_id = r.url.path.rsplit("/", 1)[-1]
    done = jobs.wait_for_job(ctx, job_id, timeout=120)
    assert done["status"] == "Completed", done
    record = jobs.describe_job(ctx, job_id)["extendedInfo"]["restore"]
    assert record["recoveryPoint"] == point["id"] and record["targetDir"] == str(target)
    assert record["files"] == [str(target / "disk0.raw")]
    page = c.get(f"/jobs/{job_id}").text
    assert str(target) in page and point["id"] in page
    # the same target again: refused with the portal's words, then allowed with Overwrite ticked
    again = c.post(
        "/vms/web1/restore", data={"csrf": csrf, "rp": point["id"], "mode": "disks", "target_dir": str(target)}
    )
    assert again.status_code == 422 and "tick Overwrite existing files" in html.unescape(again.text)
    assert not CLI_WORDS.search(_page_text(again))
    # change the policy
    protection_policy = {
        "name": "Hourly",
        "frequency": "Hourly",
        "interval": "4",
        "window_hours": "12",
        "time": "08:00",
    }
    r = c.post("/vaults/main/policies/new", data={"csrf": csrf, **protection_policy, "daily_days": "7"})
    assert r.status_code == 200, r.text
    r = c.post("/vms/web1/policy", data={"csrf": csrf, "policy": "Hourly"})
    assert "now follows policy Hourly" in r.text
    # stop with delete, see the purge date, undelete, resume
    r = c.post("/vms/web1/disable", data={"csrf": csrf, "delete_data": "1"})
    assert 'id="purge-date"' in r.text and "Undelete" in r.text
    r = c.post("/vms/web1/undelete", data={"csrf": csrf})
    assert "undeleted" in r.text and "Resume backup" in r.text
    r = c.post("/vms/web1/resume", data={"csrf": csrf})
    assert "Protection of web1 resumed" in r.text
    assert items.show_item(ctx, "web1")["protectionState"] in protection.ACTIVE_STATES
    assert items.show_item(ctx, "web1")["policy"] == "Hourly"


def test_dashboard_and_reports(world: World) -> None:
    c = world.client
    page = c.get("/").text
    assert re.search(r'id="count-healthy">1<', page), page
    assert 'href="/vms?bucket=healthy"' in page and 'hours=24' in page  # each count links to its list
    assert "web1" in c.get("/vms?bucket=healthy").text and "web1" not in c.get("/vms?bucket=failed").text
    assert "Restore" in c.get("/jobs?status=Completed&hours=24").text
    report = c.get("/reports?days=7")
    assert report.status_code == 200 and "web1" in report.text and "<svg" in report.text
    rows = list(csv.DictReader(io.StringIO(c.get("/reports.csv?days=7").text)))
    item = next(r for r in rows if r["scope"] == "item")
    assert (
        item["item"] == "web1" and item["vault"] == "main" and item["succeeded"] == "1" and item["successRate"] == "1.0"
    )
    assert int(item["bytesTransferred"]) > 0
    assert c.get("/reports?days=0").status_code == 422
    _view, reader = tokens.create_token(world.ctx, "BackupReader", name="reports")
    api = c.get("/api/v1/reports?days=7", headers={"Authorization": f"Bearer {reader}"}).json()
    assert [(r["scope"], r["item"], r["succeeded"]) for r in api["rows"]] == [
        (r["scope"], r["item"], int(r["succeeded"])) for r in rows
    ]  # the same data as the portal's CSV


def test_tokens_are_minted_shown_once_and_revoked(world: World) -> None:
    c, csrf = world.client, world.csrf
    r = c.post("/tokens", data={"csrf": csrf, "name": "ci", "role": "BackupReader", "vault": "main", "expires": "30d"})
    token = re.search(r'id="new-token">([^<]+)<', r.text)
    assert token and tokens.authenticate(world.ctx, token.group(1)) is not None
    listed = c.get("/tokens").text
    assert token.group(1) not in listed and "ci" in listed  # shown once
    token_id = next(t["id"] for t in tokens.list_tokens(world.ctx) if t["name"] == "ci")
    r = c.post(f"/tokens/{token_id}/revoke", data={"csrf": csrf})
    assert "revoked" in r.text and tokens.authenticate(world.ctx, token.group(1)) is None


def test_no_page_names_a_cli_command_or_flag(world: World) -> None:
    c = world.client
    pages = ["/", "/vms", "/vms/add", "/vms/web1", "/vms/web1/restore", "/vms/web1/files", "/vms/web1/enable", "/jobs",
             "/vaults", "/vaults/new", "/vaults/main", "/vaults/main/policies/DefaultPolicy", "/reports", "/tokens",
             "/hosts", "/no/such/page", "/vms/nothing", "/vaults/nothing"]  # fmt: skip
    pages += [f"/jobs/{j['id']}" for j in jobs.list_jobs(world.ctx)]
    for path in pages:
        r = c.get(path)
        found = CLI_WORDS.search(_page_text(r))
        assert found is None, (path, found.group(0) if found else None)
        assert '<link rel="icon"' in r.text and "<nav>" in r.text, path  # inside the layout, 404s too
        title = re.search(r"<title>(.*?)</title>", r.text, flags=re.S)
        assert title and "<" not in title.group(1) and "\n" not in title.group(1), path
    assert c.get("/static/favicon.svg").status_code == 200


JOB_PAGE = "open the job on the Backup jobs page"
FIXES = [
    ("choose another --target-dir, or pass --force to overwrite",
     "choose another Target directory, or tick Overwrite existing files"),
    ("set VMVAULT_PASSPHRASE or pass --passphrase-file FILE", "type the passphrase in the form"),
    ("wait for it to end: vmvault job wait 1a (or stop it: vmvault job cancel 1a)",
     f"wait for it to end: {JOB_PAGE} (or stop it: {JOB_PAGE})"),
    ("see it with: vmvault vault show main", "open the vault on the Vaults page"),
    ("give this one another --home", "correct the form on the previous page and try again"),
]  # fmt: skip


@pytest.mark.parametrize(("hint", "expected"), FIXES)
def test_service_fixes_are_worded_for_the_portal(hint: str, expected: str) -> None:
    assert portal_fix(hint) == expected


def test_labels_are_words() -> None:
    names = ("IRPending", "NotProtected", "CompletedWithWarnings", "Completed", "FileRecoveryMount")
    words = ["Initial backup pending", "Not protected", "Completed with warnings", "Completed", "File recovery mount"]
    assert [label(v) for v in names] == words


def test_late_items_come_first_by_the_shared_rpo_rule(world: World) -> None:
    """Three days on (the clock offset the scheduler's tests use), web1's daily policy is breached:
    the overview lists it first and the report marks it late, both from service/rpo.py."""
    from dataclasses import replace

    from vmvault.service import dashboard, reports, rpo

    later = replace(world.ctx, settings=replace(world.ctx.settings, clock_offset_s=3 * 86400))
    view = dashboard.overview(later)
    assert [r["vm"] for r in view["rpoBreached"]] == [r.vm for r in rpo.item_rpos(later) if r.breached] == ["web1"]
    row = next(r for r in reports.backup_report(later, 30)["rows"] if r["scope"] == "item")
    assert row["rpoBreachedNow"] is True
    assert dashboard.overview(world.ctx)["rpoBreached"] == []  # today it is on time


def test_vault_actions_and_a_qemu_socket_outside_the_roots(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> None:
    c, csrf, ctx = world.client, world.csrf, world.ctx
    r = c.post(
        "/vaults/main/notifications", data={"csrf": csrf, "kind": "webhook", "address": "https://hooks.example.com/x"}
    )
    assert r.status_code == 200 and "https://hooks.example.com/x" in r.text
    target = notify.list_targets(ctx, "main")[0]["id"]
    r = c.post("/vaults/main/notifications", data={"csrf": csrf, "kind": "email", "address": "ops@example.com"})
    assert r.status_code == 422 and "SMTP server" in html.unescape(r.text)  # the portal's field, not --smtp
    assert not CLI_WORDS.search(_page_text(r))
    c.post(f"/vaults/main/notifications/{target}/delete", data={"csrf": csrf})
    assert notify.list_targets(ctx, "main") == []
    r = c.post("/vaults/main/verify", data={"csrf": csrf})
    job_id = r.url.path.rsplit("/", 1)[-1]
    assert jobs.wait_for_job(ctx, job_id, timeout=120)["status"] == "Completed"
    outside = tmp_path_factory.getbasetemp().parent / "qmp.sock"
    r = c.post("/vms/add/qemu", data={"csrf": csrf, "name": "q1", "qmp_socket": str(outside)})
    assert r.status_code == 403 and "outside the allowed disk roots" in html.unescape(r.text)
    assert "q1" not in [v["name"] for v in vms.list_vms(ctx)]


def test_every_service_fix_reads_without_cli_words_in_the_portal() -> None:
    """Each literal hint of the service code (placeholders filled), as the portal shows it."""
    root = Path(__file__).resolve().parent.parent / "src" / "vmvault"
    hints = [
        re.sub(r"\{[^}]*\}", "x", m.group(1))
        for f in sorted(root.rglob("*.py"))
        if "/cli/" not in str(f)
        for m in re.finditer(r'hint=f?"((?:[^"\\]|\\.)*)"', f.read_text())
    ]
    assert len(hints) > 100
    worded = [portal_fix(h) or "" for h in hints]
    assert [w for w in worded if CLI_WORDS.search(w)] == []
    generic = sum(1 for w in worded if w == "correct the form on the previous page and try again")
    assert generic < len(hints) // 10  # most fixes keep their specific advice


def test_a_lagging_grs_vault_is_flagged_until_replicated(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GRS vault with a point not yet on its secondary (threshold lowered to 0 s) is listed under the
    vault problems, linked to its page; after what `vault replicate --wait` runs it is not; LRS says LRS."""
    from vmvault.service import replication

    c, ctx, root = world.client, world.ctx, world.root
    monkeypatch.setenv("VMVAULT_GRS_LAG_ALERT", "0")
    vaults.create_vault(ctx, "geo", storage_dir=root / "geo-r1", redundancy="GRS", secondary=root / "geo-r2",
                        passphrase=GOOD)  # fmt: skip
    vaults.create_vault(ctx, "near", storage_dir=root / "near", redundancy="LRS", passphrase=GOOD)
    vms.add_vm(ctx, "geo1", [make_ext4_image(root / "geo1.raw", 8)])
    protection.enable_protection(ctx, "geo1", "geo")
    assert backups.backup_now(ctx, "geo1").error is None
    page = c.get("/").text
    problems = re.search(r'<section class="card danger" id="vault-problems">(.*?)</section>', page, flags=re.S)
    assert problems and '<a href="/vaults/geo">geo</a>' in problems.group(1), page
    assert "Replication lagging" in problems.group(1) and "near" not in problems.group(1)
    row = re.search(r'<a href="/vaults/geo">geo</a>.*?</tr>', page.split('id="vaults-tile"')[1], flags=re.S)
    assert row and "Lagging" in row.group(0), page
    lrs = re.search(r'<a href="/vaults/near">near</a>.*?</tr>', page, flags=re.S)
    assert lrs and "LRS" in lrs.group(0) and "Lagging" not in lrs.group(0), page
    assert not CLI_WORDS.search(_page_text(c.get("/")))

    assert replication.replicate(ctx, "geo", wait=True)["state"] == "Healthy"  # what `vault replicate --wait` runs
    page = c.get("/").text
    assert 'id="vault-problems"' not in page and "Lagging" not in page, page
    row = re.search(r'<a href="/vaults/geo">geo</a>.*?</tr>', page, flags=re.S)
    assert row and "Healthy" in row.group(0), page


def test_hosts_page_and_each_vms_host(world: World) -> None:
    """/hosts (linked in the nav): state, heartbeat, version (another one flagged), jobs, VMs; each VM's host."""
    from datetime import timedelta

    from vmvault.catalog.clock import to_iso, utc_now
    from vmvault.catalog.models import HostRow, VmRow
    from vmvault.service import hosts

    c = world.client
    vms.add_vm(world.ctx, "onhv1", [make_ext4_image(world.root / "onhv1.raw", 8)])  # this test's own VM
    stale = to_iso(utc_now() - timedelta(seconds=hosts.HOST_LEASE_S + 5))
    hosts.heartbeat_server(world.ctx, "http://127.0.0.1:8080")
    with world.ctx.catalog.write() as s:
        s.add(HostRow(name="hv1", role="Agent", registered=stale, last_heartbeat=stale, version="0.0.1", boot_id="",
                      details={}))  # fmt: skip
        s.query(VmRow).filter_by(name="onhv1").one().host = "hv1"
    try:
        page = c.get("/hosts")
        assert page.status_code == 200 and '<a href="/hosts" class="here">Hosts</a>' in page.text
        row = re.search(r"<tr>\s*<td>hv1</td>(.*?)</tr>", page.text, flags=re.S)
        assert row, page.text
        cells = html.unescape(re.sub(r"<[^>]+>", " ", row.group(1)))
        assert "Agent" in cells and "Offline" in cells and "0.0.1" in cells and "Other version" in cells
        assert 'href="/vms?host=hv1">1<' in row.group(1)
        me = re.search(rf"<tr>\s*<td>{re.escape(hosts.local_host_name())}</td>(.*?)</tr>", page.text, flags=re.S)
        assert me and "Online" in me.group(1) and "Other version" not in me.group(1)
        assert CLI_WORDS.search(_page_text(page)) is None
        listed = c.get("/vms?host=hv1").text
        assert '<a href="/vms/onhv1">onhv1</a>' in listed and '<a href="/hosts">hv1</a>' in listed
        assert '<a href="/vms/onhv1">' not in c.get("/vms?host=elsewhere").text
        assert re.search(r'id="vm-host"><a href="/hosts">hv1</a>', c.get("/vms/onhv1").text)
        with world.ctx.catalog.write() as s:  # a VM without a host: the servers run its jobs
            s.query(VmRow).filter_by(name="onhv1").one().host = None
        assert 'id="vm-host">Server' in c.get("/vms/onhv1").text
    finally:
        with world.ctx.catalog.write() as s:
            s.delete(s.query(VmRow).filter_by(name="onhv1").one())
            for name in ("hv1", hosts.local_host_name()):
                s.delete(s.get(HostRow, name))

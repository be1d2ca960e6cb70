"""The web portal in a real browser (Debian's chromium via Playwright) against `vmvault serve`.

One server on a sandboxed home serves the module: a VM given by an ext4 disk image holding
report.bin; the flow enables backup, backs up with a retain-until date, watches the job complete
without reloading, mounts the point, downloads report.bin (same SHA-256) and unmounts. Other tests
check CSRF, the session cookie and that a Reader cannot write. Each page is screenshotted into
docs/screenshots/.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from api_support import make_ext4_image
from helpers import Cli, far_time_zone, files_equal
from portal_support import (
    VIEWPORT,
    Server,
    chromium,
    csrf_of,
    job_ids,
    require_chromium,
    screenshot,
    served,
    sha256,
    sign_in,
)

REPORT = random.Random(9).randbytes(300_000)
JOB_TIMEOUT_MS = 180_000


@dataclass
class World:
    server: Server
    cli: Cli
    reader_token: str
    disk: Path
    browser: Any
    downloads: Path
    summary: str  # DefaultPolicy's, in the vault's time zone


def _today() -> date:
    return datetime.now(UTC).date()  # retain-until dates are UTC days (the machine's zone may differ)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_chromium()
    root = tmp_path_factory.mktemp("portal")
    disk = make_ext4_image(root / "web1.raw", 24, {"report.bin": REPORT, "notes.txt": b"portal test\n"})
    # each backup pauses 3 s after publishing a data pack, so its job is seen running in the page
    cli = Cli(home=root / "home", extra_env={"VMVAULT_TEST_PAUSE_AFTER_PACK": "3"})
    # DefaultPolicy runs daily at 20:30 in the vault's time zone: keep the scheduler's own backup away
    # from the test's backups, whenever the module runs (chosen now, not when the file was imported:
    # under xdist that is up to the whole suite's length earlier).
    zone = far_time_zone()
    cli.ok("vault", "create", "main", "--timezone", zone)
    cli.ok("vm", "add", "web1", "--disk", str(disk))
    with served(cli) as server, chromium() as browser:
        reader = cli.ok("token", "create", "--role", "BackupReader", "--name", "auditor").json()["token"]
        try:
            yield World(server, cli, reader, disk, browser, root / "downloads",
                        f"Daily at 20:30 {zone}, retain 180 days")
        finally:
            cli.run("files", "unmount", "web1")  # a failed test may leave a mount or a script's export


def _page(world: World) -> Any:
    context = world.browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    context.set_default_timeout(30_000)
    return context.new_page()


def _wait_job_completed(page: Any) -> None:
    """On a job page: wait for the live status (no reload: a marker set on window survives)."""
    page.evaluate("window.__stillSamePage = true")
    page.wait_for_selector("#job-status:text-is('Completed')", timeout=JOB_TIMEOUT_MS)
    assert page.evaluate("window.__stillSamePage === true"), "the job page was reloaded"


def _follow_toast(page: Any, text: str) -> None:
    toast = page.locator(".toast").filter(has_text=text)
    toast.wait_for()
    toast.locator("a.toast-link").click()
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f-]+$"))


def test_backup_mount_and_download_in_the_browser(world: World) -> None:
    url = world.server.url
    page = _page(world)
    errors: list[str] = []  # the browser's console errors (an invalid pattern attribute logged one)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(f"{url}/vms/web1")
    page.wait_for_url(re.compile(r"/signin\?next="))
    screenshot(page, "signin")
    page.fill("input[name=token]", world.server.owner_token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/vms/web1")  # back where the user was going
    page.goto(f"{url}/vms")
    row = page.locator("table.list tr", has_text="web1")
    assert "Not protected" in row.inner_text() and "unknown" in row.inner_text()
    screenshot(page, "vms")

    # Enable backup: pick the vault and a policy shown with its summary
    page.click("text=web1")
    page.click("text=Enable backup")
    option = page.locator("#policy-select option").first
    assert option.inner_text() == f"DefaultPolicy — {world.summary}"
    screenshot(page, "enable-backup")
    page.select_option("#vault-select", "__new__")  # the new-vault name field shows, its pattern is valid
    page.fill("input[name=new_vault]", "x")
    assert page.evaluate("document.querySelector('input[name=new_vault]').checkValidity()")
    assert errors == [], errors
    page.select_option("#vault-select", "main")
    page.click("#enable-form button[type=submit]")
    page.wait_for_url(f"{url}/vms/web1")
    assert page.locator(".toast", has_text="Backup enabled for web1").is_visible()
    assert page.inner_text("#last-status") == "Initial backup pending"
    assert "No recovery points yet" in page.inner_text("main")

    # Backup now with a retain-until date from the calendar input
    retain = (_today() + timedelta(days=45)).isoformat()
    page.fill("input[name=retain_until]", retain)
    page.click("#backup-now button[type=submit]")
    page.wait_for_url(f"{url}/vms/web1")
    toast = page.locator(".toast", has_text="Backup of web1 triggered")
    assert toast.is_visible() and toast.locator("a.toast-link").is_visible()
    screenshot(page, "backup-now-toast")
    _follow_toast(page, "Backup of web1 triggered")
    assert page.inner_text("#job-status") == "In progress"
    screenshot(page, "job-running")
    _wait_job_completed(page)
    assert retain in page.inner_text("#job-live")
    screenshot(page, "job")

    page.goto(f"{url}/vms/web1")
    assert page.inner_text("#last-status") == "Completed"
    points = page.locator("#points tbody tr")
    assert points.count() == 1
    # kept through the day picked: it expires when that day ends
    expires = (date.fromisoformat(retain) + timedelta(days=1)).isoformat()
    assert f"{expires} 00:00 UTC" in points.first.inner_text()
    assert world.summary in page.inner_text("main")
    screenshot(page, "backup-item")

    # File recovery: mount the point (12 hours), browse, download, unmount
    page.click("text=File recovery")
    page.click("#mount-form button[type=submit]")
    page.wait_for_url(f"{url}/vms/web1/files")
    assert page.locator(".toast", has_text="Mounting recovery point").is_visible()
    # the session list follows the mount job without a reload: "Mounting…", then the mounted row
    page.evaluate("window.__stillSamePage = true")
    assert page.locator(".pending:has-text('Mounting…')").count() == 1 or page.locator("#sessions td.expiry").count()
    page.wait_for_selector("#sessions td.expiry", timeout=JOB_TIMEOUT_MS)
    assert page.evaluate("window.__stillSamePage === true"), "the file-recovery page was reloaded"
    expiry = datetime.strptime(page.inner_text("#sessions td.expiry"), "%Y-%m-%d %H:%M UTC").replace(tzinfo=UTC)
    left = expiry - datetime.now(UTC)
    assert timedelta(hours=11, minutes=58) < left <= timedelta(hours=12), left
    screenshot(page, "file-recovery")
    page.locator("#sessions a.volume").first.click()
    page.wait_for_selector("#entries")
    screenshot(page, "browse")
    with page.expect_download() as info:
        page.locator("#entries tr", has_text="report.bin").locator("a.download").click()
    saved = world.downloads / "report.bin"
    info.value.save_as(saved)
    assert sha256(saved.read_bytes()) == sha256(REPORT)

    page.goto(f"{url}/vms/web1/files")
    page.once("dialog", lambda dialog: dialog.accept())  # the confirmation of a destructive action
    page.click("#sessions button.danger")
    page.wait_for_url(f"{url}/vms/web1/files")
    page.evaluate("window.__stillSamePage = true")
    page.wait_for_selector("#no-sessions", timeout=JOB_TIMEOUT_MS)  # "Unmounting…", then nothing mounted
    assert page.evaluate("window.__stillSamePage === true"), "the file-recovery page was reloaded"

    # the other pages, for the record (and that they render)
    page.goto(f"{url}/jobs")
    assert page.locator("#jobs tbody tr").count() >= 4  # ConfigureBackup, Backup, mount, unmount
    screenshot(page, "jobs")
    page.goto(f"{url}/vms/web1/restore")
    screenshot(page, "restore")
    page.goto(f"{url}/vaults/main/policies/DefaultPolicy")
    screenshot(page, "policy")
    page.context.close()


def test_restore_disks_and_recovery_script(world: World, tmp_path: Path) -> None:
    url = world.server.url
    page = _page(world)
    sign_in(page, url, world.server.owner_token)
    page.goto(f"{url}/vms/web1/restore")
    page.check("input[name=mode][value=disks]")
    target = tmp_path / "restored"
    page.fill("input[name=target_dir]", str(target))
    page.click("#restore-form button[type=submit]")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f-]+$"))  # the restore's job, with its toast
    assert page.locator(".toast", has_text="Restore of web1's disks").is_visible()
    _wait_job_completed(page)
    assert files_equal(target / "disk0.raw", world.disk)

    # the recovery script for another machine: its password is shown once, the script downloads
    page.goto(f"{url}/vms/web1/files")
    page.click("#script-form button[type=submit]")
    password = page.inner_text("#script-password")
    assert len(password) >= 12
    screenshot(page, "recovery-script")
    with page.expect_download() as info:
        page.click("#script-download")
    script = tmp_path / "recover.sh"
    info.value.save_as(script)
    text = script.read_text()
    assert text.startswith("#!") and password not in text  # the script never holds the password
    for name in ("..%2F..%2Fcatalog.db", "web1-other-recover.sh"):  # only scripts the portal wrote
        r = page.request.get(f"{url}/vms/web1/files/script/{name}")
        assert r.status == 404 and "SQLite" not in r.text()
    page.goto(f"{url}/vms/web1/files")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#sessions button.danger")
    _follow_toast(page, "Unmounting")
    _wait_job_completed(page)
    page.context.close()


def test_backup_page_and_jobs_list_update_live(world: World) -> None:
    url = world.server.url
    page = _page(world)
    sign_in(page, url, world.server.owner_token)
    page.goto(f"{url}/vms/web1")
    points = page.locator("#points tbody tr").count()
    retain = (_today() + timedelta(days=20)).isoformat()
    started = page.request.post(f"{url}/vms/web1/backup", form={"csrf": csrf_of(page), "retain_until": retain})
    assert started.ok, started.text()
    page.goto(f"{url}/vms/web1")  # a backup runs: the item's facts and points refresh by themselves
    assert page.locator("#item-live[data-live]").count() == 1
    page.evaluate("window.__stillSamePage = true")
    expect(page.locator("#points tbody tr")).to_have_count(points + 1, timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#last-status")).to_have_text("Completed")
    assert page.evaluate("window.__stillSamePage === true"), "the Backup page was reloaded"

    page.goto(f"{url}/jobs?vm=web1&operation=Backup")
    before = page.locator("#jobs tbody tr[data-job]").count()
    page.evaluate("window.__stillSamePage = true")
    csrf = csrf_of(page)
    retain = (_today() + timedelta(days=10)).isoformat()
    started = page.request.post(f"{url}/vms/web1/backup", form={"csrf": csrf, "retain_until": retain})
    assert started.ok, started.text()
    expect(page.locator("#jobs tbody tr[data-job]")).to_have_count(before + 1, timeout=JOB_TIMEOUT_MS)
    newest = page.locator("#jobs tbody tr[data-job]").first
    newest.locator(".job-status:text-is('Completed')").wait_for(timeout=JOB_TIMEOUT_MS)
    assert page.evaluate("window.__stillSamePage === true"), "the jobs list was reloaded"
    page.context.close()


def test_policy_form_shows_validation_messages(world: World) -> None:
    url = world.server.url
    page = _page(world)
    sign_in(page, url, world.server.owner_token)
    page.goto(f"{url}/vaults/main/policies/new")
    page.fill("input[name=name]", "Weekly-Fri")
    page.select_option("select[name=frequency]", "Weekly")
    page.fill("input[name=time]", "21:00")
    page.fill("input[name=daily_days]", "")
    page.fill("input[name=weekly_weeks]", "12")
    page.click("#policy-form button[type=submit]")
    error = page.inner_text("#policy-error")
    assert "scheduleRunDays" in error and "at least one day" in error, error
    assert page.input_value("input[name=name]") == "Weekly-Fri"  # what was typed is kept
    screenshot(page, "policy-validation")
    page.check("input[name=days][value=Friday]")
    page.click("#policy-form button[type=submit]")
    page.wait_for_url(f"{url}/vaults/main/policies/Weekly-Fri")
    assert page.inner_text("#policy-summary").startswith("Weekly on Friday at 21:00 UTC, retain 12 weeks")
    page.goto(f"{url}/vaults/main")
    assert "Weekly-Fri" in page.inner_text("#policies")
    assert page.locator("svg.chart circle").count() >= 2  # a sample per backup of the earlier tests
    screenshot(page, "vault")
    page.context.close()


def test_csrf_is_required_and_the_cookie_is_guarded(world: World) -> None:
    url = world.server.url
    page = _page(world)
    sign_in(page, url, world.server.owner_token)
    cookie = next(c for c in page.context.cookies() if c["name"] == "vmvault_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["secure"] is False  # plain http
    assert world.server.owner_token not in cookie["value"] and "vmv_" not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # HttpOnly: scripts cannot read it

    before = job_ids(world.cli)
    retain = (_today() + timedelta(days=5)).isoformat()
    for form in ({"retain_until": retain}, {"retain_until": retain, "csrf": "forged"}):
        r = page.request.post(f"{url}/vms/web1/backup", form=form)
        assert r.status == 403, r.status
        assert "CSRF token is missing or wrong" in r.text()
    assert job_ids(world.cli) == before  # nothing was started

    # signing out ends the session on the server: the old cookie no longer works
    page.goto(f"{url}/vms")
    page.click("text=Sign out")
    page.wait_for_url(re.compile(r"/signin"))
    page.context.add_cookies([{**cookie}])
    page.goto(f"{url}/vms")
    assert "/signin" in page.url
    r = page.request.post(f"{url}/vms/web1/backup", form={"retain_until": retain, "csrf": "x"})
    assert r.status == 403 and "not signed in" in r.text()
    page.context.close()


def test_a_reader_sees_pages_but_cannot_write(world: World) -> None:
    url = world.server.url
    page = _page(world)
    sign_in(page, url, world.reader_token)
    assert "BackupReader" in page.inner_text("header")
    page.goto(f"{url}/vms/web1")
    assert page.locator("#last-status").is_visible()
    assert page.locator("#backup-now").count() == 0  # write buttons are hidden
    assert page.locator("text=Stop backup").count() == 0
    before = job_ids(world.cli)
    csrf = csrf_of(page)  # a valid CSRF token: the refusal is the role's
    r = page.request.post(f"{url}/vms/web1/backup", form={"csrf": csrf, "retain_until": "2099-01-01"})
    assert r.status == 403
    assert "role BackupReader may not do this (backup.run)" in r.text()
    page.set_content(r.text())
    screenshot(page, "reader-forbidden")
    r = page.request.post(f"{url}/vaults/main/policies/new", form={"csrf": csrf, "name": "x", "time": "10:00"})
    assert r.status == 403
    assert job_ids(world.cli) == before
    assert [p["name"] for p in world.cli.ok("policy", "list", "--vault", "main").json()].count("x") == 0
    page.context.close()

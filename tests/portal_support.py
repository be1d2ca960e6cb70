"""Helpers of the portal tests: `vmvault serve` on a free port, Debian's chromium via Playwright.

The browser is the system's /usr/bin/chromium (installed by the Makefile's APT_PACKAGES);
Playwright never downloads one here. Screenshots go to docs/screenshots/ (committed).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO_ROOT, Cli, allow_args
from helpers import first_run_owner_token as _owner_token

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
VIEWPORT = {"width": 1280, "height": 860}


def require_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (the Makefile's APT_PACKAGES installs Debian's chromium)")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Server:
    url: str
    owner_token: str
    proc: subprocess.Popen[str]


@contextmanager
def served(cli: Cli) -> Iterator[Server]:
    """`vmvault serve --port 0` (API, portal, scheduler, workers) on the CLI's sandboxed home.

    Portal users may use paths anywhere under pytest's base temporary folder (the home excluded),
    where the tests' own tmp_path folders are.
    """
    allow = allow_args(cli.home.parent.parent)
    proc = subprocess.Popen(
        cli.argv("serve", "--host", "127.0.0.1", "--port", "0", "--tick", "0.5", *allow, json_output=False),
        env=cli.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert found, f"serve did not start: {line!r}"
        token_line = proc.stdout.readline()
        assert token_line.startswith("first-run Owner token"), token_line
        yield Server(found.group(1), _owner_token(token_line), proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Debian chromium driven by Playwright's sync API (yields the Browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def sign_in(page: Any, url: str, token: str) -> None:
    page.goto(f"{url}/vms")
    assert "/signin" in page.url, page.url  # not signed in: sent to the sign-in page
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/vms")


def csrf_of(page: Any) -> str:
    value: str = page.locator("input[name=csrf]").first.get_attribute("value")
    return value


def job_ids(cli: Cli) -> set[str]:
    return {j["name"] for j in cli.ok("job", "list").json()}


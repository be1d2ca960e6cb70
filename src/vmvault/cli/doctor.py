"""`vmvault doctor` (registered on the command tree by cli/app.py)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from vmvault.cli import output
from vmvault.cli.app import app
from vmvault.cli.state import STATE, service_context


def _line(text: str) -> None:
    sys.stdout.write(text + "\n")


def _clock_skew(server: str) -> Any:
    """GET /health on the server: its Date header against this host's clock (mid-request)."""
    import urllib.error
    import urllib.request
    from datetime import UTC, datetime, timedelta
    from email.utils import parsedate_to_datetime

    from vmvault.cli.remote import ServerUnreachable
    from vmvault.service.doctor import clock_skew_check
    from vmvault.service.tls import client_context

    before = datetime.now(UTC)
    context = client_context() if server.startswith("https:") else None
    try:
        with urllib.request.urlopen(server.rstrip("/") + "/health", timeout=30, context=context) as response:
            header = response.headers.get("Date")
    except (urllib.error.URLError, OSError) as exc:
        raise ServerUnreachable(
            f"cannot reach {server}: {exc}", hint="check --server and that vmvault serve runs"
        ) from None
    after = datetime.now(UTC)
    local = before + (after - before) / 2
    try:
        server_date = parsedate_to_datetime(header) if header else None
    except (TypeError, ValueError):
        server_date = None
    # The Date header has whole seconds: the server read its clock half a second later, on average.
    return clock_skew_check(server, server_date + timedelta(seconds=0.5) if server_date else None, local)


_MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL"}


@app.command("doctor")
def doctor(
    vm: Annotated[str | None, typer.Option("--vm", help="Check this VM only (default: every VM).")] = None,
) -> None:
    """Check the host, the VMs and the vaults, and say what to fix; exit code 1 when a check fails."""
    from vmvault.cli import remote
    from vmvault.service.doctor import run_doctor

    if remote.active():  # this host's checks, and its clock against the server's (no catalog here)
        remote.refuse_option("--vm", vm is not None)
        report = run_doctor(None, extra=[_clock_skew(str(STATE.server))])
    else:
        with service_context() as ctx:
            report = run_doctor(ctx, vm)
    if STATE.json:
        output.print_json(report)
    else:
        for check in report["checks"]:
            _line(f"{_MARK.get(check['status'], check['status'])}  {check['name']}: {check['detail']}")
            if check["fix"] and check["status"] != "pass":
                _line(f"      fix: {check['fix']}")
        failed = report["failed"]
        _line("all checks passed" if not failed else f"{len(failed)} check(s) failed: {', '.join(failed)}")
    if not report["ok"]:
        raise typer.Exit(1)

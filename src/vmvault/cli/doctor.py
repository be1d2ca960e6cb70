"""`vmvault doctor` (registered on the command tree by cli/app.py)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from vmvault.cli import output
from vmvault.cli.app import app
from vmvault.cli.state import STATE, service_context


def _line(text: str) -> None:
    sys.stdout.write(text + "\n")


_MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL"}


@app.command("doctor")
def doctor(
    vm: Annotated[str | None, typer.Option("--vm", help="Check this VM only (default: every VM).")] = None,
) -> None:
    """Check the host, the VMs and the vaults, and say what to fix; exit code 1 when a check fails."""
    from vmvault.service.doctor import run_doctor

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

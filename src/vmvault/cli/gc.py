"""`vmvault vault gc` (registered on the command tree by cli/app.py)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vmvault.cli import output
from vmvault.cli.app import vault_app
from vmvault.cli.state import STATE, service_context


def end_with_result(outcome: Any, summary: Any) -> None:
    """Print the result (or the job when there is none); a failed job prints its error and exits non-zero."""
    from vmvault.cli.errors import exit_code_for
    from vmvault.service import azure_shape

    job = azure_shape.job(outcome.job)
    output.print_object(summary if summary is not None else job)
    if outcome.failed:
        error = azure_shape.error_of(job) or {"code": "internal_error", "message": "the job failed"}
        output.print_error_dict(error)
        raise typer.Exit(exit_code_for(error.get("code")))


@vault_app.command("gc")
def vault_gc(
    name: Annotated[str, typer.Argument(help="Vault name.")],
    grace: Annotated[
        float | None,
        typer.Option("--grace", help="Leave packs younger than this many seconds alone (default 86400).", min=0),
    ] = None,
    lock_timeout: Annotated[
        float,
        typer.Option(help="Give up after waiting this many seconds for running backups and restores.", min=0),
    ] = 6 * 3600.0,
) -> None:
    """Delete vault data no recovery point, soft-deleted point or pin references (a GarbageCollect job)."""
    from vmvault.cli.progress import progress_display, run_cancellable
    from vmvault.service import gc

    with service_context() as ctx, progress_display(f"gc {name}") as show:
        outcome = run_cancellable(
            lambda cancel: gc.garbage_collect(
                ctx, name, grace_seconds=grace, lock_timeout=lock_timeout, on_progress=show, cancel=cancel
            )
        )
    report = outcome.result
    if report is not None and not STATE.structured:
        report = {k: v for k, v in report.items() if k != "problems"} | {"problems": len(report["problems"])}
        for problem in outcome.result["problems"] if outcome.result else []:
            output.info(f"problem: {problem}")
    end_with_result(outcome, None if report is None else {**report, "jobId": outcome.job["id"]})

"""`vmvault retention run`, `vmvault protection undelete` (registered on the command tree by cli/app.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from vmvault.cli import output
from vmvault.cli.app import VmArgument, VmOption, _vm_name, app, protection_app
from vmvault.cli.gc import end_with_result
from vmvault.cli.state import service_context
from vmvault.service import azure_shape as shape

retention_app = typer.Typer(help="Apply retention: delete expired recovery points.", no_args_is_help=True)
app.add_typer(retention_app, name="retention")


@retention_app.command("run")
def retention_run(
    vault: Annotated[
        str | None, typer.Option("--vault", "--vault-name", help="Only this vault (default: every vault).")
    ] = None,
    gc: Annotated[
        bool, typer.Option("--gc/--no-gc", help="Collect garbage afterwards in the vaults that lost points.")
    ] = True,
) -> None:
    """Delete expired recovery points and purge soft-deleted items past their time (a Retention job)."""
    from vmvault.service import retention

    with service_context() as ctx:
        outcome = retention.apply_retention(ctx, vault, collect_garbage=gc)
    result = outcome.result
    end_with_result(outcome, None if result is None else {**result, "jobId": outcome.job["id"]})


@protection_app.command("undelete")
def protection_undelete(vm: VmArgument = None, vm_option: VmOption = None) -> None:
    """Bring back a VM whose backup data was soft deleted (it is then ProtectionStopped; resume it)."""
    from vmvault.cli import remote
    from vmvault.service import softdelete

    name = _vm_name(vm, vm_option, "protection undelete")
    if remote.active():
        output.print_object(remote.post(f"/items/{remote.q(name)}/undelete"))
        return
    with service_context() as ctx:
        output.print_object(shape.job(softdelete.undelete(ctx, name)))

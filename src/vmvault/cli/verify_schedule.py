"""`vmvault vault verify-schedule` (registered on the command tree by cli/app.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from vmvault.cli import output
from vmvault.cli.app import vault_app
from vmvault.cli.state import STATE, service_context


@vault_app.command("verify-schedule")
def vault_verify_schedule(
    name: Annotated[str, typer.Argument(help="Vault name.")],
    every: Annotated[
        int | None, typer.Option("--every", help="Days in which all its points are re-verified (0: off).")
    ] = None,
    default: Annotated[bool, typer.Option("--default", help="Follow vmvault serve --verify-every again.")] = False,
) -> None:
    """Set (or show) how often vmvault serve re-verifies this vault's recovery points, a slice a day."""
    from vmvault.errors import InvalidInput
    from vmvault.service import verify_schedule

    if every is not None and default:
        raise InvalidInput("give --every DAYS or --default, not both", hint="e.g. --every 30")
    with service_context() as ctx:
        if every is None and not default:
            view = verify_schedule.show_schedule(ctx, name)
        else:
            view = verify_schedule.set_schedule(ctx, name, None if default else every)
    if STATE.json:
        output.print_json(view)
    else:
        output.print_object(view)

"""`vmvault item list|show` (registered on the command tree by cli/app.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from vmvault.cli import output
from vmvault.cli.app import VaultFilter, VmArgument, VmOption, _vm_name, app, in_vault
from vmvault.cli.state import service_context
from vmvault.service import azure_shape as shape

ITEM_COLUMNS: tuple[output.Column, ...] = (
    "name", ("vault", "properties.vaultName"), ("policy", "properties.policyName"), "properties.protectionState",
    ("softDeleted", "properties.isScheduledForDeferredDelete"), "properties.lastBackupStatus",
    "properties.lastBackupTime", "properties.nextScheduledBackup",
    ("recoveryPoints", "properties.extendedInfo.recoveryPointCount"),
)  # fmt: skip
item_app = typer.Typer(help="Protected items: protection state, last and next backup.", no_args_is_help=True)
app.add_typer(item_app, name="item")


@item_app.command("list")
def item_list(
    vault: Annotated[str | None, typer.Option("--vault", "--vault-name", help="Only the items of this vault.")] = None,
) -> None:
    """List protected items (as az backup item list)."""
    from vmvault.cli import remote
    from vmvault.service import items

    if remote.active():
        output.print_list(remote.get_list("/items", vault=vault), ITEM_COLUMNS)
        return

    with service_context() as ctx:
        output.print_list(shape.items(items.list_items(ctx, vault)), ITEM_COLUMNS)


@item_app.command("show")
def item_show(vm: VmArgument = None, vm_option: VmOption = None, vault: VaultFilter = None) -> None:
    """Show a protected item: state, last backup status and time, last point, policy, next backup."""
    from vmvault.cli import remote
    from vmvault.service import items

    name = _vm_name(vm, vm_option, "item show")
    if remote.active():
        shown = remote.get(f"/items/{remote.q(name)}")
    else:
        with service_context() as ctx:
            shown = shape.item(items.show_item(ctx, name))
    (shown,) = in_vault([shown], vault, f"protected item '{name}'")
    output.print_object(shown)

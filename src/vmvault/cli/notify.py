"""`vmvault vault notify add|list|remove` (registered on the command tree by cli/app.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from vmvault.cli import output
from vmvault.cli.app import vault_app
from vmvault.cli.state import service_context

notify_app = typer.Typer(help="Where a vault's job notifications go (webhook, e-mail).", no_args_is_help=True)
vault_app.add_typer(notify_app, name="notify")
TARGET_COLUMNS = ("id", "kind", "address", "smtp", "events", "delivered", "pending", "failedDeliveries")
VaultArgument = Annotated[str, typer.Argument(help="Vault name.", metavar="VAULT")]


@notify_app.command("add")
def notify_add(
    vault: VaultArgument,
    webhook: Annotated[str | None, typer.Option("--webhook", help="POST each job as JSON to this URL.")] = None,
    email: Annotated[str | None, typer.Option("--email", help="Send an e-mail to this address.")] = None,
    smtp: Annotated[str | None, typer.Option("--smtp", help="SMTP server for --email, HOST:PORT.")] = None,
    sender: Annotated[str | None, typer.Option("--from", help="From: address of the e-mails.")] = None,
    on: Annotated[str, typer.Option("--on", help="failed: failed jobs (default); all: every ended job.")] = "failed",
) -> None:
    """Add a notification target to a vault."""
    from vmvault.cli import remote
    from vmvault.service import notify

    if remote.active():
        body = {"webhook": webhook, "email": email, "smtp": smtp, "sender": sender, "events": on}
        output.print_object(remote.post(f"/vaults/{remote.q(vault)}/notifications", body))
        return
    with service_context() as ctx:
        output.print_object(
            notify.add_target(ctx, vault, webhook=webhook, email=email, smtp=smtp, sender=sender, events=on)
        )


@notify_app.command("list")
def notify_list(vault: VaultArgument) -> None:
    """List a vault's notification targets and how their deliveries went."""
    from vmvault.cli import remote
    from vmvault.service import notify

    if remote.active():
        output.print_list(remote.get_list(f"/vaults/{remote.q(vault)}/notifications"), TARGET_COLUMNS)
        return
    with service_context() as ctx:
        output.print_list(notify.list_targets(ctx, vault), TARGET_COLUMNS)


@notify_app.command("remove")
def notify_remove(vault: VaultArgument, target_id: Annotated[int, typer.Argument(metavar="ID")]) -> None:
    """Remove a notification target."""
    from vmvault.cli import remote
    from vmvault.service import notify

    if remote.active():
        remote.delete(f"/vaults/{remote.q(vault)}/notifications/{target_id}")
    else:
        with service_context() as ctx:
            notify.remove_target(ctx, vault, target_id)
    output.info(f"notification target {target_id} removed from vault '{vault}'")

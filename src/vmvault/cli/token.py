"""`vmvault token create|list|revoke`: bearer tokens of the REST API (registered on the tree by cli/app.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from vmvault.cli import output
from vmvault.cli.app import app
from vmvault.cli.state import STATE, service_context

token_app = typer.Typer(help="Bearer tokens of the REST API (vmvault serve).", no_args_is_help=True)
app.add_typer(token_app, name="token")

TOKEN_COLUMNS = ("id", "name", "role", "vault", "host", "created", "expires", "revoked")


@token_app.command("create")
def token_create(
    role: Annotated[
        str, typer.Option("--role", help="Owner, BackupContributor, BackupOperator, BackupReader or BackupAgent.")
    ],
    vault: Annotated[str | None, typer.Option("--vault", "--vault-name", help="Limit it to this vault.")] = None,
    expires: Annotated[
        str | None, typer.Option("--expires", help="30d, 12h, 2w or a UTC date (YYYY-MM-DD[THH:MM]); default never.")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="A label (default: the role).")] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="BackupAgent only: the one host whose agent uses it.")
    ] = None,
) -> None:
    """Make a token and print it once (only its hash is kept)."""
    from vmvault.cli import remote
    from vmvault.service import tokens

    if remote.active():
        made = remote.post("/tokens", {"role": role, "vault": vault, "expires": expires, "name": name, "host": host})
        token = made.pop("token")
        view = made
    else:
        with service_context() as ctx:
            view, token = tokens.create_token(ctx, role, vault=vault, expires=expires, name=name, host=host)
    if STATE.structured:
        output.print_object({**view, "token": token})
        return
    output.print_object(view)
    output.info("the token (shown once; send it as Authorization: Bearer TOKEN, or set VMVAULT_TOKEN):")
    typer.echo(token)


@token_app.command("list")
def token_list(
    include_revoked: Annotated[bool, typer.Option("--include-revoked", help="Also list revoked tokens.")] = False,
) -> None:
    """List tokens (never their secrets)."""
    from vmvault.cli import remote
    from vmvault.service import tokens

    if remote.active():
        output.print_list(remote.get_list("/tokens", includeRevoked=include_revoked), TOKEN_COLUMNS)
        return
    with service_context() as ctx:
        output.print_list(tokens.list_tokens(ctx, include_revoked=include_revoked), TOKEN_COLUMNS)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(help="Token id (see: token list).", metavar="ID")]) -> None:
    """Revoke a token: it is refused from now on."""
    from vmvault.cli import remote
    from vmvault.service import tokens

    if remote.active():
        output.print_object(remote.delete(f"/tokens/{remote.q(token_id)}"))
        return
    with service_context() as ctx:
        output.print_object(tokens.revoke_token(ctx, token_id))

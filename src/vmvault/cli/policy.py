"""`vmvault policy list|show|create|set|delete` (registered on the command tree by cli/app.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vmvault.cli import output
from vmvault.cli.app import app
from vmvault.cli.state import STATE, service_context

policy_app = typer.Typer(help="Backup policies of a vault (Azure's policy JSON).", no_args_is_help=True)
app.add_typer(policy_app, name="policy")

VaultOption = Annotated[str, typer.Option("--vault", "--vault-name", help="Vault of the policy.")]
NameArgument = Annotated[str, typer.Argument(help="Policy name.", metavar="NAME")]
FileOption = Annotated[
    Path, typer.Option("--file", help='Policy JSON: {"properties": {...}} as policy show prints it, or the properties.')
]
POLICY_COLUMNS = ("name", "frequency", "days", "time", "timeZone", "retention", "protectedItems")


@policy_app.command("list")
def policy_list(vault: VaultOption) -> None:
    """List a vault's policies (-o json: each as policy show prints it)."""
    from vmvault.cli import remote
    from vmvault.service import policies

    if remote.active():
        views = remote.get_list(f"/vaults/{remote.q(vault)}/policies")
    else:
        with service_context() as ctx:
            views = policies.list_policies(ctx, vault)
    if STATE.structured:
        output.print_json(views)
    else:
        output.print_list([policies.policy_summary(v) for v in views], POLICY_COLUMNS)


@policy_app.command("show")
def policy_show(name: NameArgument, vault: VaultOption) -> None:
    """Show a policy as `az backup policy show` does (edit its JSON, then: policy set --file)."""
    from vmvault.cli import remote
    from vmvault.service import policies

    if remote.active():
        output.print_object(remote.get(f"/vaults/{remote.q(vault)}/policies/{remote.q(name)}"))
        return
    with service_context() as ctx:
        output.print_object(policies.show_policy(ctx, vault, name))


@policy_app.command("create")
def policy_create(name: NameArgument, vault: VaultOption, file: FileOption) -> None:
    """Create a policy from a JSON file; an invalid one is refused, naming the field."""
    from vmvault.cli import remote
    from vmvault.service import policies

    document = policies.read_policy_file(file)
    if remote.active():
        output.print_object(remote.post(f"/vaults/{remote.q(vault)}/policies", {"name": name, "policy": document}))
        return
    with service_context() as ctx:
        output.print_object(policies.create_policy(ctx, vault, name, document))


@policy_app.command("set")
def policy_set(name: NameArgument, vault: VaultOption, file: FileOption) -> None:
    """Replace a policy's rules; its items follow them and their points' expiry is recomputed."""
    from vmvault.cli import remote
    from vmvault.service import policies

    document = policies.read_policy_file(file)
    if remote.active():
        output.print_object(remote.put(f"/vaults/{remote.q(vault)}/policies/{remote.q(name)}", {"policy": document}))
        return
    with service_context() as ctx:
        output.print_object(policies.set_policy(ctx, vault, name, document))


@policy_app.command("delete")
def policy_delete(name: NameArgument, vault: VaultOption) -> None:
    """Delete a policy (refused while items use it)."""
    from vmvault.cli import remote
    from vmvault.service import policies

    if remote.active():
        remote.delete(f"/vaults/{remote.q(vault)}/policies/{remote.q(name)}")
    else:
        with service_context() as ctx:
            policies.delete_policy(ctx, vault, name)
    output.info(f"policy '{name}' deleted from vault '{vault}'")

"""`vmvault host list|show|remove`: the machines of the deployment and their heartbeat (registered by cli/app.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from vmvault.cli import output
from vmvault.cli.app import app
from vmvault.cli.state import service_context

host_app = typer.Typer(help="Hosts of the deployment (servers; agents later) and their state.", no_args_is_help=True)
app.add_typer(host_app, name="host")

HOST_COLUMNS = ("name", "role", "state", "lastHeartbeat", "version", "runningJobs", "vms")
HostArgument = Annotated[str, typer.Argument(help="Host name (see: host list).", metavar="NAME")]


@host_app.command("list")
def host_list() -> None:
    """List hosts: Online while their heartbeat is younger than 60 s, else Offline."""
    from vmvault.service import hosts

    with service_context() as ctx:
        output.print_list(hosts.list_hosts(ctx), HOST_COLUMNS)


@host_app.command("show")
def host_show(name: HostArgument) -> None:
    """Show a host: its state, version, address, VMs and running jobs."""
    from vmvault.service import hosts

    with service_context() as ctx:
        output.print_object(hosts.show_host(ctx, name))


@host_app.command("remove")
def host_remove(name: HostArgument) -> None:
    """Forget an Offline host that has no VMs (an Online one, or one with VMs, is refused)."""
    from vmvault.service import hosts

    with service_context() as ctx:
        output.print_object(hosts.remove_host(ctx, name))

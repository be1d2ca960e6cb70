"""`vmvault host list|show|remove`: the machines of the deployment and their heartbeat (registered by cli/app.py)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from vmvault.cli import output
from vmvault.cli.app import app
from vmvault.cli.state import STATE, service_context

host_app = typer.Typer(help="Hosts of the deployment (servers, agents) and their state.", no_args_is_help=True)
app.add_typer(host_app, name="host")

HOST_COLUMNS = ("name", "role", "state", "lastHeartbeat", "version", "runningJobs", "vms")
HostArgument = Annotated[str, typer.Argument(help="Host name (see: host list).", metavar="NAME")]


def _flag_versions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table flags a host running another vmvault version than the server (JSON keeps versionMismatch)."""
    if STATE.structured:
        return rows
    return [{**r, "version": f"{r['version']} (not the server's)"} if r.get("versionMismatch") else r for r in rows]


@host_app.command("list")
def host_list() -> None:
    """List hosts: Online while their heartbeat is younger than 60 s, else Offline; other versions flagged."""
    from vmvault.cli import remote
    from vmvault.service import hosts

    if remote.active():
        output.print_list(_flag_versions(remote.get_list("/hosts")), HOST_COLUMNS)
        return
    with service_context() as ctx:
        output.print_list(_flag_versions(hosts.list_hosts(ctx)), HOST_COLUMNS)


@host_app.command("show")
def host_show(name: HostArgument) -> None:
    """Show a host: its state, version, address, VMs and running jobs."""
    from vmvault.cli import remote
    from vmvault.service import hosts

    if remote.active():
        output.print_object(remote.get(f"/hosts/{remote.q(name)}"))
        return
    with service_context() as ctx:
        output.print_object(hosts.show_host(ctx, name))


@host_app.command("remove")
def host_remove(name: HostArgument) -> None:
    """Forget an Offline host that has no VMs (an Online one, or one with VMs, is refused)."""
    from vmvault.cli import remote
    from vmvault.service import hosts

    if remote.active():
        output.print_object(remote.delete(f"/hosts/{remote.q(name)}"))
        return
    with service_context() as ctx:
        output.print_object(hosts.remove_host(ctx, name))

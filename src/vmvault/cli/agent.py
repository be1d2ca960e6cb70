"""`vmvault agent run`: the agent of a hypervisor host (registered on the tree by cli/app.py)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Annotated

import typer

from vmvault.cli import output
from vmvault.cli.app import app
from vmvault.cli.state import STATE

agent_app = typer.Typer(help="The agent of a hypervisor host: runs the jobs of its VMs for a server.",
                        no_args_is_help=True)  # fmt: skip
app.add_typer(agent_app, name="agent")


@agent_app.command("run")
def agent_run(
    host: Annotated[str, typer.Option("--host", help="This host's name, as the VMs' --host and the token name it.")],
    max_jobs: Annotated[int, typer.Option("--max-jobs", help="Jobs run in parallel at most.")] = 2,
    token_file: Annotated[
        str | None, typer.Option("--token-file", help="File holding the BackupAgent token (else VMVAULT_TOKEN).")
    ] = None,
    allow_disks: Annotated[
        list[str] | None,
        typer.Option("--allow-disks", help="Folder the server may name disks and QMP sockets in (repeatable).",
                     metavar="DIR"),
    ] = None,
    allow_restores: Annotated[
        list[str] | None,
        typer.Option("--allow-restores", help="Folder the server may restore disks into (repeatable).",
                     metavar="DIR"),
    ] = None,
    log_format: Annotated[
        str, typer.Option("--log-format", help="Logs on stderr: text, or json (one object per line).")
    ] = "text",
) -> None:
    """Register this host with the server (--server URL), then run its VMs' jobs until SIGTERM or Ctrl-C.

    The token (a BackupAgent token bound to --host) comes from --token-file or VMVAULT_TOKEN, never
    from the command line. The server is https://, or http:// to a loopback address only. The vaults
    open with this host's key: unlock each once on this host with its passphrase (vmvault vault import).
    Disk images and QMP sockets must lie in --allow-disks folders, restores' target directories in
    --allow-restores folders (default /var/lib/vmvault-restores, docs/security.md).
    """
    from vmvault import logs
    from vmvault.errors import InvalidInput
    from vmvault.service.agentrun import Agent, AgentClient, check_server_url, read_token
    from vmvault.service.validate import check_name
    from vmvault.settings import load_settings

    if STATE.server is None:
        raise InvalidInput(
            "vmvault agent run needs the server's URL", hint="vmvault --server https://HOST:PORT agent run"
        )
    server = check_server_url(STATE.server)
    check_name("host", host)
    token = read_token(token_file)
    if log_format not in logs.FORMATS:
        raise InvalidInput(f"unknown --log-format '{log_format}'", hint="use --log-format text or --log-format json")
    logs.configure(log_format)
    from vmvault.service.paths import DEFAULT_RESTORES, build_policy

    settings = replace(load_settings(STATE.home), catalog_url=None, strict_passphrase=False)
    # No database credentials on a hypervisor host: this home's own catalog (its file-recovery
    # sessions) is SQLite, for this process and the session owners it starts alike.
    os.environ.pop("VMVAULT_CATALOG", None)
    # The server does not choose which files of this host are read or written.
    paths = build_policy(settings, disks=allow_disks, restores=allow_restores, default_restores=DEFAULT_RESTORES)
    agent = Agent(settings, AgentClient(server, host, token), max_jobs=max_jobs, paths=paths)
    code = agent.run(on_ready=lambda a: output.info(f"vmvault agent of host {host} runs jobs for {server}"))
    raise typer.Exit(code)

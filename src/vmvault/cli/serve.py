"""`vmvault serve`: the REST API, the scheduler and the workers in one process (registered by cli/app.py)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from vmvault.cli.app import app
from vmvault.cli.state import service_context
from vmvault.settings import DEFAULT_LISTEN, DEFAULT_SCHEDULE_JITTER_S, DEFAULT_WORKERS, MAX_SCHEDULE_JITTER_S


@app.command("serve")
def serve(
    workers: Annotated[int, typer.Option("--workers", help="Jobs run in parallel at most.")] = DEFAULT_WORKERS,
    host: Annotated[str | None, typer.Option("--host", help="Address the API listens on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="API port (default 8080; 0: any free port).")] = None,
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT of the API and GET /healthz (--host/--port win); none: off.")
    ] = DEFAULT_LISTEN,
    tick: Annotated[float, typer.Option("--tick", help="Seconds between two looks at the schedule.")] = 1.0,
    retention_every: Annotated[
        float, typer.Option("--retention-every", help="Hours between two Retention jobs (0: none from the service).")
    ] = 24.0,
    allow_disks: Annotated[
        list[str] | None,
        typer.Option("--allow-disks", help="Folder API/portal callers may name disks in (repeatable).", metavar="DIR"),
    ] = None,
    allow_vaults: Annotated[
        list[str] | None,
        typer.Option("--allow-vaults", help="Folder API/portal callers may put vaults in (repeatable).", metavar="DIR"),
    ] = None,
    allow_restores: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-restores", help="Folder API/portal callers may restore into (repeatable).", metavar="DIR"
        ),
    ] = None,
    metrics_address: Annotated[
        str | None,
        typer.Option("--metrics-address", help="HOST:PORT serving GET /metrics without a token (default: off)."),
    ] = None,
    verify_every: Annotated[
        int,
        typer.Option(
            "--verify-every", help="Days in which every recovery point is re-verified, a slice a day (0: off)."
        ),
    ] = 30,
    space_alert_below: Annotated[
        float,
        typer.Option("--space-alert-below", help="Alert when a vault's file system has less than this % free."),
    ] = 10.0,
    tls_cert: Annotated[
        Path | None,
        typer.Option("--tls-cert", help="PEM certificate (chain): serve the API and portal over HTTPS.", metavar="F"),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert (unencrypted).", metavar="F")
    ] = None,
    schedule_jitter: Annotated[
        float,
        typer.Option(
            "--schedule-jitter",
            help="Spread the scheduled starts of one slot over this many seconds, per VM (0: all at the slot).",
            envvar="VMVAULT_SCHEDULE_JITTER",
        ),
    ] = DEFAULT_SCHEDULE_JITTER_S,
    log_format: Annotated[
        str, typer.Option("--log-format", help="Logs on stderr: text, or json (one object per line).")
    ] = "text",
) -> None:
    """Serve the API, the scheduler and a pool of workers until SIGTERM or Ctrl-C (running jobs are cancelled).

    Paths sent by API and portal callers must lie in the allowed folders (--allow-disks, --allow-vaults,
    --allow-restores, or the same keys in HOME/settings.toml; see docs/security.md).
    """
    from vmvault.service.paths import build_policy
    from vmvault.service.tls import server_files
    from vmvault.service.worker import Service, parse_listen

    tls = server_files(tls_cert, tls_key)  # before anything starts: a bad file is one clear error
    if not 0 <= schedule_jitter <= MAX_SCHEDULE_JITTER_S:
        from vmvault.errors import InvalidInput

        raise InvalidInput(
            f"--schedule-jitter {schedule_jitter:g} is not between 0 and {MAX_SCHEDULE_JITTER_S:g} seconds",
            hint="e.g. --schedule-jitter 300 (0: every VM at the slot); more would make spread backups look missed",
        )

    if host is not None or port is not None:
        default_host, default_port = parse_listen(DEFAULT_LISTEN) or ("127.0.0.1", 8080)
        if port is not None and not 0 <= port <= 65535:
            from vmvault.errors import InvalidInput

            raise InvalidInput(f"--port {port} is not a port", hint="e.g. --port 8080 (0: any free port)")
        listen = f"{host or default_host}:{default_port if port is None else port}"
    from vmvault import logs

    if log_format not in logs.FORMATS:
        from vmvault.errors import InvalidInput

        raise InvalidInput(f"unknown --log-format '{log_format}'", hint="use --log-format text or --log-format json")
    logs.configure(log_format)
    with service_context() as ctx:
        # serve holds many vaults: the host key opens them; a passphrase that does not match one
        # is logged, not fatal (the CLI, naming one vault, refuses it).
        ctx.settings = replace(ctx.settings, strict_passphrase=False)
        paths = build_policy(ctx.settings, disks=allow_disks, vaults=allow_vaults, restores=allow_restores)
        service = Service(
            ctx, workers=workers, listen=listen, tick_s=tick, retention_every_s=retention_every * 3600, paths=paths
        )
        service.metrics_listen = metrics_address
        service.tls = tls
        service.schedule_jitter_s = schedule_jitter
        service.min_free_percent = space_alert_below
        service.verify_days = max(0, verify_every)
        code = service.run(on_ready=_announce)
    raise typer.Exit(code)


def _announce(service: Any) -> None:
    from vmvault.service.tokens import ensure_first_run_token

    where = (
        f"listening on {service.address} (portal {service.address}/, API {service.address}/api/v1, "
        f"docs {service.address}/docs, GET /healthz)"
        if service.address
        else "no API endpoint"
    )
    if service.metrics_address:
        where += f"; metrics on {service.metrics_address}/metrics (no token)"
    sys.stdout.write(
        f"vmvault serve: {where}; home {service.ctx.settings.home}; {_catalog(service)}{service.workers} worker(s); "
        f"pid {_pid()}; stop with Ctrl-C or SIGTERM\n"
    )
    token = ensure_first_run_token(service.ctx)
    if token is not None:  # never on stdout: service managers keep stdout in their logs
        path = _write_owner_token(service.ctx.settings.home, token)
        sys.stdout.write(
            f"first-run Owner token in {path} (mode 0600: read it, then delete the file; "
            "make others with: vmvault token create --role ROLE)\n"
        )
    sys.stdout.flush()


def _catalog(service: Any) -> str:
    """A PostgreSQL catalog, named without its password (the SQLite one is in the home)."""
    catalog = service.ctx.catalog
    return f"catalog {catalog.where}; " if catalog.shared else ""


def _write_owner_token(home: Any, token: str) -> str:
    """The token in a file only root can read, created fresh (never through a planted link)."""
    import os
    from pathlib import Path

    path = Path(home) / "first-run-owner-token"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return str(path)


def _pid() -> int:
    import os

    return os.getpid()

"""`vmvault serve`: the scheduler and the workers in one process (registered on the tree by cli/app.py)."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import typer

from vmvault.cli.app import app
from vmvault.cli.state import service_context
from vmvault.service.worker import DEFAULT_LISTEN, DEFAULT_WORKERS


@app.command("serve")
def serve(
    workers: Annotated[int, typer.Option("--workers", help="Jobs run in parallel at most.")] = DEFAULT_WORKERS,
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT of the status endpoint (GET /healthz); port 0: any; none: off.")
    ] = DEFAULT_LISTEN,
    tick: Annotated[float, typer.Option("--tick", help="Seconds between two looks at the schedule.")] = 1.0,
    retention_every: Annotated[
        float, typer.Option("--retention-every", help="Hours between two Retention jobs (0: none from the service).")
    ] = 24.0,
) -> None:
    """Run the scheduler and a pool of workers until SIGTERM or Ctrl-C (running jobs are cancelled cleanly)."""
    from vmvault.service.worker import Service

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("vmvault").setLevel(logging.INFO)
    with service_context() as ctx:
        service = Service(ctx, workers=workers, listen=listen, tick_s=tick, retention_every_s=retention_every * 3600)
        code = service.run(on_ready=_announce)
    raise typer.Exit(code)


def _announce(service: Any) -> None:
    where = f"listening on {service.address} (GET /healthz)" if service.address else "no status endpoint"
    sys.stdout.write(
        f"vmvault serve: {where}; home {service.ctx.settings.home}; {service.workers} worker(s); "
        f"pid {_pid()}; stop with Ctrl-C or SIGTERM\n"
    )
    sys.stdout.flush()


def _pid() -> int:
    import os

    return os.getpid()

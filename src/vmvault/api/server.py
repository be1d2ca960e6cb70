"""The API served by uvicorn in a thread of `vmvault serve` (same process as the scheduler and workers)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any

from vmvault.errors import Busy
from vmvault.service.context import Context
from vmvault.service.paths import PathPolicy
from vmvault.service.tls import TlsFiles


class ApiServer:
    """The socket is bound at once (port 0: any free port; server_address tells which); HTTPS with tls."""

    def __init__(
        self,
        endpoint: tuple[str, int],
        ctx: Context,
        status: Callable[[], dict[str, Any]],
        paths: PathPolicy | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        import uvicorn

        from vmvault.api.app import create_app

        host, port = endpoint
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise Busy(f"cannot listen on {host}:{port}: {exc.strerror}", hint="choose another --port") from None
        self._sock.listen(128)
        self.server_address: tuple[str, int] = self._sock.getsockname()[:2]
        app = create_app(ctx.settings, ctx=ctx, status=status, paths=paths)
        # HTTPS: the files were checked before anything started (service/tls.server_files).
        certs: dict[str, Any] = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)} if tls else {}
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", **certs)
        self._server = uvicorn.Server(config)
        self._done = threading.Event()

    def serve_forever(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        finally:
            self._done.set()

    def shutdown(self) -> None:
        self._server.should_exit = True
        self._done.wait(30)

    def server_close(self) -> None:
        self._sock.close()

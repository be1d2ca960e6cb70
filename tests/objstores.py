"""Real object-store servers for the tests: Azurite (Azure Blob) and moto in server mode (S3).

Both are real HTTP servers on a free local port with a temporary location, torn down after the
session; Azurite runs with --disableTelemetry and nothing reaches outside this machine. moto is
the S3 server here because it installs from PyPI with the other test tools (requirements-dev.lock)
and implements the S3 features the backend relies on (conditional create, multipart, ranges).
Azurite comes from npm (make test-deps installs it under .venv/node).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Azurite's well-known development account (public, documented by Microsoft; not a secret).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
SECOND_ACCOUNT = "secondaccount1"
SECOND_KEY = "c2Vjb25kLWFjY291bnQta2V5LWZvci10ZXN0cy1vbmx5LW5vdC1hLXNlY3JldA=="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout} s")


def azurite_command() -> str | None:
    local = REPO / ".venv" / "node" / "node_modules" / ".bin" / "azurite-blob"
    return str(local) if local.exists() else shutil.which("azurite-blob")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    where: Path
    env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def connection_string(account: str, key: str, port: int) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={account};AccountKey={key};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{account};")  # fmt: skip


def start_azurite(where: Path, port: int | None = None) -> Server:
    """Azurite's blob service with two accounts (the development one and SECOND_ACCOUNT)."""
    command = azurite_command()
    if command is None:
        raise RuntimeError("azurite is not installed: run make test-deps (npm install under .venv/node)")
    port = port or free_port()
    where.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AZURITE_ACCOUNTS": f"{DEV_ACCOUNT}:{DEV_KEY};{SECOND_ACCOUNT}:{SECOND_KEY}"}
    proc = subprocess.Popen(
        [command, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(where),
         "--disableTelemetry", "--silent", "--skipApiVersionCheck", "--loose"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    _wait_port(port, proc, "azurite")
    return Server(proc, port, where, {
        f"VMVAULT_AZURE_{DEV_ACCOUNT.upper()}": connection_string(DEV_ACCOUNT, DEV_KEY, port),
        f"VMVAULT_AZURE_{SECOND_ACCOUNT.upper()}": connection_string(SECOND_ACCOUNT, SECOND_KEY, port),
    })  # fmt: skip


def start_moto(where: Path) -> Server:
    port = free_port()
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=where, start_new_session=True,
        env={**os.environ, "MOTO_CALL_RESET_API": "false"},
    )  # fmt: skip
    _wait_port(port, proc, "moto")
    return Server(proc, port, where, {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(where / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(where / "no-aws-credentials"),
    })  # fmt: skip


def fresh_azure_url(account: str = DEV_ACCOUNT) -> str:
    """A new container (created by the backend on first write or by the caller)."""
    return f"azure://{account}/t{uuid.uuid4().hex[:24]}/vault"


def fresh_s3_url() -> str:
    return f"s3://t{uuid.uuid4().hex[:24]}/vault"


class ThrottlingProxy:
    """A small HTTP proxy in front of a store that answers 503 (Azure's "server busy", S3's
    SlowDown) or 429 to a share of requests, at random, without forwarding them: what a throttling
    store does. The others are forwarded as they are (a real server answers them)."""

    def __init__(self, upstream_port: int, share: float, seed: int = 1) -> None:
        import http.client
        import http.server
        import random
        import threading

        rng = random.Random(seed)
        lock = threading.Lock()
        proxy = self
        self.throttled = 0
        self.forwarded = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with lock:
                    throttle = rng.random() < share
                    if throttle:
                        proxy.throttled += 1
                    else:
                        proxy.forwarded += 1
                if throttle:
                    status = 503 if rng.random() < 0.7 else 429
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status, reply.reason)
                for k, v in reply.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815 (http.server names)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

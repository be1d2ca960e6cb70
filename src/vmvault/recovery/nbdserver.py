"""A read-only NBD server for recovery points, run as its own process.

Serving NBD (or FUSE) and calling losetup/mount from one process can deadlock, so the export runs
in a process of its own: `python -m vmvault.recovery.nbdserver CONFIG.json`. It listens on

- a unix socket (the directory is 0700, so only root reaches it): export names are the disk
  names (`nbd+unix:///disk0?socket=...`); the empty name means the first disk;
- optionally TCP with mandatory TLS (NBD_OPT_STARTTLS, per-session certificates from tlscert.py):
  export names are `<secret>/<disk>`, where the secret is a password minted by `vmvault files
  script` (checked against its hash and expiry in the catalog). A connection is shut down
  (ESHUTDOWN) at its password's expiry. Listing exports over TCP is refused, so names never leak.

Real clients work unchanged: `nbdinfo 'nbds://127.0.0.1:PORT/SECRET/disk0?tls-certificates=DIR'`,
qemu-img with a tls-creds-x509 object, nbdcopy, nbdfuse. The process exits on SIGTERM, removing
its socket; it never writes to the vault.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmvault.errors import VmvaultError
from vmvault.recovery import nbdproto
from vmvault.recovery.nbdproto import Choice, Export

log = logging.getLogger("vmvault.nbdserver")


@dataclass(frozen=True)
class Grant:
    """The answer to a secret: a deadline (epoch seconds) or why not."""

    deadline: float | None = None
    error: str = ""


Authorize = Callable[[str], Grant]


class NbdServer:
    """Read-only exports by name on any number of listeners; one thread per connection."""

    def __init__(self, exports: dict[str, Export], authorize: Authorize | None = None) -> None:
        self.exports = exports
        self.authorize = authorize
        self._listeners: list[socket.socket] = []
        self._unix_paths: list[Path] = []
        self._stopping = threading.Event()

    # ---- listeners ------------------------------------------------------------------------------
    def listen_unix(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(16)
        self._unix_paths.append(path)
        self._start(sock, tls=None)

    def listen_tcp(self, host: str, port: int, tls: ssl.SSLContext) -> int:
        """Listen on host:port (0 = any free port) with TLS required; returns the port."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(16)
        self._start(sock, tls=tls)
        return int(sock.getsockname()[1])

    def _start(self, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        self._listeners.append(sock)
        threading.Thread(target=self._accept_loop, args=(sock, tls), daemon=True, name="nbd-accept").start()

    def _accept_loop(self, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn, tls), daemon=True, name="nbd-conn").start()

    # ---- connections ----------------------------------------------------------------------------
    def _connection(self, conn: socket.socket, tls: ssl.SSLContext | None) -> None:
        peer: nbdproto.Sock = conn
        try:
            if tls is not None:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(60)  # the handshake must not hang forever
            lookup = self._lookup_unix if tls is None else self._lookup_tcp
            names = (lambda: list(self.exports)) if tls is None else None
            agreed = nbdproto.negotiate(conn, lookup, tls=tls, names=names)
            if agreed is None:
                return
            peer, choice = agreed
            peer.settimeout(None)
            nbdproto.serve(peer, choice, on_error=lambda exc: log.error("read failed: %s", exc))
        except (nbdproto.ProtocolError, OSError, ssl.SSLError) as exc:
            log.debug("connection ended: %s", exc)
        finally:
            with contextlib.suppress(OSError):
                peer.close()
            with contextlib.suppress(OSError):
                conn.close()

    def _lookup_unix(self, name: str) -> Choice:
        if not name and self.exports:
            name = next(iter(self.exports))
        export = self.exports.get(name)
        if export is None:
            return Choice(error=f"no export named {name!r}; exports: {', '.join(self.exports)}")
        return Choice(export=export)

    def _lookup_tcp(self, name: str) -> Choice:
        secret, _, disk = name.partition("/")
        if self.authorize is None or not secret:
            return Choice(error="access denied: give the password as <password>/<disk>", policy=True)
        grant = self.authorize(secret)
        if grant.error:
            return Choice(error=grant.error, policy=True)
        export = self.exports.get(disk)
        if export is None:
            return Choice(error=f"no disk named {disk!r}; disks: {', '.join(self.exports)}")
        return Choice(export=export, deadline=grant.deadline)

    def close(self) -> None:
        self._stopping.set()
        for sock in self._listeners:
            with contextlib.suppress(OSError):
                sock.close()
        for path in self._unix_paths:
            path.unlink(missing_ok=True)


def server_tls_context(tls_dir: Path) -> ssl.SSLContext:
    from vmvault.recovery.tlscert import CERT_FILE, KEY_FILE

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls_dir / CERT_FILE, tls_dir / KEY_FILE)
    return ctx


# ---- the process ---------------------------------------------------------------------------------


class _Pin:
    """The GC pin of the served point: taken under the shared vault lock, renewed while serving.

    Garbage collection keeps everything a valid pin reaches, even if retention deletes the point
    meanwhile; a pin is valid until it expires or this process ends (vault/lock.py).
    """

    RENEW_S = 3600.0

    def __init__(self, vault: Any, manifest: Any, purpose: str, ttl: float) -> None:
        from vmvault.vault import lock

        self._lock, self.vault, self.manifest, self.purpose, self.ttl = lock, vault, manifest, purpose, ttl
        self.pin = lock.add_pin(vault, manifest, purpose, ttl)
        self.taken = time.monotonic()

    def renew_if_due(self) -> None:
        if time.monotonic() - self.taken < self.RENEW_S:
            return
        old, self.pin = self.pin, self._lock.add_pin(self.vault, self.manifest, self.purpose, self.ttl)
        self.taken = time.monotonic()
        self._lock.remove_pin(self.vault, old.pin_id)

    def release(self) -> None:
        with contextlib.suppress(Exception):
            self._lock.remove_pin(self.vault, self.pin.pin_id)


def _open_exports(config: dict[str, Any]) -> tuple[Any, dict[str, Export], _Pin]:
    from vmvault.errors import IntegrityError
    from vmvault.recovery.reader import DiskReader
    from vmvault.vault import lock
    from vmvault.vault.store import Vault

    vault = Vault.open(str(config["storage_dir"]), Path(config["home"]), cache_name=str(config.get("cache_name") or ""))
    try:
        if vault.uuid != config["vault_uuid"]:
            raise IntegrityError(f"the vault at {config['storage_dir']} is not vault {config['vault_uuid']}")
        with lock.shared(vault, timeout=120):  # the point cannot be collected between read and pin
            manifest = vault.read_manifest(config["rp_id"])
            purpose = f"file recovery session {config.get('session') or os.getpid()}"
            pin = _Pin(vault, manifest, purpose, float(config.get("pin_seconds") or 13 * 3600))
        exports: dict[str, Export] = {d.name: DiskReader(vault, manifest.rp_id, d) for d in manifest.disks}
    except BaseException:
        vault.close()
        raise
    return vault, exports, pin


def _write_ready(path: Path, info: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def run(config: dict[str, Any]) -> int:
    """Serve until SIGTERM; writes config['ready'] (with the TCP port) once listening."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    vault, exports, pin = _open_exports(config)
    authorize: Authorize | None = None
    if config.get("session"):
        from vmvault.recovery.secrets import catalog_authorizer

        authorize = catalog_authorizer(Path(config["home"]), config["session"])
    server = NbdServer(exports, authorize)
    try:
        server.listen_unix(Path(config["unix"]))
        port = None
        if config.get("tcp_host"):
            tls = server_tls_context(Path(config["tls_dir"]))
            port = server.listen_tcp(config["tcp_host"], int(config.get("tcp_port") or 0), tls)
        _write_ready(Path(config["ready"]), {"pid": os.getpid(), "tcp_port": port, "disks": list(exports)})
        while not stop.wait(1.0):
            pin.renew_if_due()
    finally:
        server.close()
        pin.release()
        vault.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    from vmvault.memory import bound_native_heap

    bound_native_heap()  # a long-lived process serving chunks: keep its heap from fragmenting
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s nbdserver[{os.getpid()}] %(message)s")
    config = json.loads(Path(args[0]).read_text())
    error_file = Path(config["ready"]).with_suffix(".error")
    try:
        return run(config)
    except VmvaultError as exc:
        log.error("the export failed: %s", exc.message)
        error_file.write_text(json.dumps({"message": exc.message, "hint": exc.hint}))
    except Exception as exc:
        log.error("the export failed: %s", exc, exc_info=True)
        error_file.write_text(json.dumps({"message": f"{type(exc).__name__}: {exc}", "hint": None}))
    return 1


if __name__ == "__main__":
    sys.exit(main())

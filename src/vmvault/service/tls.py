"""HTTPS for the API and portal (`serve --tls-cert F --tls-key F`) and for the clients of a server.

Server side: the certificate and key files are loaded once before anything starts (no socket, no
lock, no job), so a missing, unreadable, malformed or mismatched file is one clear error naming
it; uvicorn then loads the same files. An encrypted key is refused rather than prompted for
(a service has no terminal).

Client side (`--server URL`, and agents): the system's CA store, plus the PEM file named by
VMVAULT_CA_FILE (a private CA or a self-signed server certificate). A token travels in every
request, so plain http:// is refused to anything but a loopback address.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from vmvault.errors import InvalidInput

CA_FILE_ENV = "VMVAULT_CA_FILE"
_SERVE_HINT = (
    "give a PEM certificate (chain) and its unencrypted PEM key, e.g. --tls-cert server.crt --tls-key server.key"
)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


def _readable(path: Path, option: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise InvalidInput(f"{option} {path}: no such file", hint=_SERVE_HINT) from None
    except IsADirectoryError:
        raise InvalidInput(f"{option} {path} is a folder, not a PEM file", hint=_SERVE_HINT) from None
    except PermissionError:
        raise InvalidInput(
            f"{option} {path}: permission denied", hint="make it readable by the user running vmvault serve"
        ) from None


def _no_password() -> bytes:
    raise InvalidInput("encrypted", hint="")  # turned into the real error by server_files


def server_files(cert: Path | None, key: Path | None) -> TlsFiles | None:
    """The checked pair (None: plain HTTP); InvalidInput naming the file that is wrong, and the fix."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing, given = ("--tls-key", "--tls-cert") if key is None else ("--tls-cert", "--tls-key")
        raise InvalidInput(f"{given} needs {missing} too", hint=_SERVE_HINT)
    _readable(cert, "--tls-cert")
    _readable(key, "--tls-key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except InvalidInput:
        raise InvalidInput(
            f"--tls-key {key} is encrypted (a service cannot type its passphrase)",
            hint=f"decrypt it to a file readable only by vmvault: openssl pkey -in {key} -out server.key",
        ) from None
    except ssl.SSLError as exc:
        raise InvalidInput(_load_error(cert, key, exc), hint=_SERVE_HINT) from None
    return TlsFiles(cert, key)


def _load_error(cert: Path, key: Path, exc: ssl.SSLError) -> str:
    """Which file OpenSSL refused: the pair not matching, the key, or else the certificate."""
    text = f"{exc.reason or ''} {exc}".upper()
    if "MISMATCH" in text:
        return f"--tls-key {key} is not the private key of --tls-cert {cert}"
    if not _looks_pem(cert, "CERTIFICATE"):
        return f"--tls-cert {cert} is not a PEM certificate"
    if not _looks_pem(key, "PRIVATE KEY"):
        return f"--tls-key {key} is not a PEM private key"
    return f"--tls-cert {cert} / --tls-key {key} could not be loaded: {exc.reason or exc}"


def _looks_pem(path: Path, kind: str) -> bool:
    try:
        head = path.read_bytes()[: 1 << 20]
    except OSError:
        return False
    return b"-----BEGIN " in head and kind.encode() in head


# ---- clients ------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def check_server_url(url: str, option: str = "--server") -> None:
    """http(s)://HOST[:PORT]; plain http only to a loopback address (the token would cross the network in clear)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"{option} {url} is not an http(s) URL", hint=f"e.g. {option} https://backup.example:8080")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise InvalidInput(
            f"{option} {url} would send the API token in clear to {parts.hostname}: "
            "plain http is only for a loopback address",
            hint=f"use https://{parts.netloc} (on the server: vmvault serve --tls-cert F --tls-key F; "
            f"a private CA's certificate goes in {CA_FILE_ENV})",
        )


def client_context() -> ssl.SSLContext:
    """The system's trusted CAs, plus VMVAULT_CA_FILE's (a private CA or a self-signed certificate)."""
    context = ssl.create_default_context()
    ca_file = os.environ.get(CA_FILE_ENV, "").strip()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except FileNotFoundError:
            raise InvalidInput(f"{CA_FILE_ENV}={ca_file}: no such file", hint=_CA_HINT) from None
        except (ssl.SSLError, OSError) as exc:
            raise InvalidInput(
                f"{CA_FILE_ENV}={ca_file} holds no usable PEM certificate ({getattr(exc, 'reason', None) or exc})",
                hint=_CA_HINT,
            ) from None
    return context


_CA_HINT = (
    f"set {CA_FILE_ENV} to the PEM certificate of the CA that signed the server's certificate (or to that certificate)"
)


def untrusted_hint() -> str:
    """What to do when the server's certificate is not trusted."""
    if os.environ.get(CA_FILE_ENV, "").strip():
        return f"{CA_FILE_ENV} does not hold the CA that signed this server's certificate: {_CA_HINT}"
    return _CA_HINT

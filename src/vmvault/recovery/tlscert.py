"""Per-session TLS credentials for the network export: a throwaway CA and a server certificate.

Each session gets its own CA (kept only as long as the session), which signs one server
certificate. Clients pin that CA: the recovery script embeds it, and qemu-img/nbdinfo/nbdcopy take
it as `ca-cert.pem` in a `tls-certificates` / tls-creds-x509 directory. A separate CA (rather than
one self-signed leaf) is what GnuTLS-based clients (libnbd, QEMU) verify most reliably. The server
certificate names the session (`vmvault-files-<id>`, used by the script's client whatever address
it dials), loopback, this host's names and any address the export is published under.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE = "ca-cert.pem"
CERT_FILE = "server-cert.pem"
KEY_FILE = "server-key.pem"


def session_hostname(session_id: str) -> str:
    return f"vmvault-files-{session_id}"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmvault"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _alt_names(session_id: str, addresses: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    dns = {session_hostname(session_id), "localhost", socket.gethostname(), socket.getfqdn()}
    ips = {"127.0.0.1", "::1"}
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            dns.add(address)
        else:
            ips.add(address)
    names += [x509.DNSName(d) for d in sorted(dns) if d]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in sorted(ips)]
    return names


def make_credentials(directory: Path, session_id: str, addresses: list[str], lifetime: datetime.timedelta) -> str:
    """Write ca-cert.pem, server-cert.pem and server-key.pem (0600) into directory; returns the CA PEM."""
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + lifetime + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"vmvault file recovery CA {session_id}")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(session_hostname(session_id)))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_alt_names(session_id, addresses)), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    (directory / CA_FILE).write_bytes(ca_pem)
    (directory / CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / KEY_FILE
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_pem.decode()

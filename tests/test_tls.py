"""HTTPS: `vmvault serve --tls-cert F --tls-key F` and the remote CLI trusting a private CA.

Certificates are made here with the cryptography library (a private CA, a server certificate it
signs for 127.0.0.1, and an unrelated CA): real TLS handshakes against a real `vmvault serve`.
"""

from __future__ import annotations

import ssl
import urllib.request
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from helpers import Cli
from test_api_flows import served
from vmvault.errors import InvalidInput
from vmvault.service.tls import check_server_url, server_files

Key = ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: Key, issuer: tuple[str, Key] | None, ca: bool) -> x509.Certificate:
    now = datetime.now(UTC)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = [x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Key, password: bytes | None = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ca.pem signs server.crt (127.0.0.1) for server.key; other-ca.pem is unrelated; other.key matches nothing."""
    root = tmp_path_factory.mktemp("pki")
    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    files = {
        "ca.pem": _pem(_cert("vmvault test CA", ca_key, None, ca=True)),
        "other-ca.pem": _pem(_cert("someone else's CA", other_key, None, ca=True)),
        "server.crt": _pem(_cert("127.0.0.1", server_key, ("vmvault test CA", ca_key), ca=False)),
        "server.key": _key_pem(server_key),
        "other.key": _key_pem(other_key),
        "encrypted.key": _key_pem(server_key, b"secret"),
        "junk.pem": b"not a certificate\n",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return {name: root / name for name in files}


@pytest.mark.parametrize(
    ("cert", "key", "says"),
    [
        ("missing.crt", "server.key", "--tls-cert {cert}: no such file"),
        ("server.crt", "missing.key", "--tls-key {key}: no such file"),
        ("server.crt", "other.key", "--tls-key {key} is not the private key of --tls-cert {cert}"),
        ("junk.pem", "server.key", "--tls-cert {cert} is not a PEM certificate"),
        ("server.crt", "junk.pem", "--tls-key {key} is not a PEM private key"),
        ("server.key", "server.crt", "--tls-cert {cert} is not a PEM certificate"),
        ("server.crt", "encrypted.key", "--tls-key {key} is encrypted"),
    ],
)
def test_bad_certificate_or_key_files_are_named(pki: dict[str, Path], cert: str, key: str, says: str) -> None:
    cert_path, key_path = pki["ca.pem"].parent / cert, pki["ca.pem"].parent / key
    with pytest.raises(InvalidInput) as caught:
        server_files(cert_path, key_path)
    assert says.format(cert=cert_path, key=key_path) in caught.value.message
    assert caught.value.hint  # says what to give instead


def test_serve_with_a_mismatched_key_starts_nothing(tmp_path: Path, pki: dict[str, Path]) -> None:
    cli = Cli(home=tmp_path / "home")
    r = cli.fails("serve", "--port", "0", "--tls-cert", str(pki["server.crt"]), "--tls-key", str(pki["other.key"]))
    assert f"--tls-key {pki['other.key']} is not the private key" in r.stderr
    assert not (tmp_path / "home" / "serve.lock").exists()  # no lock, no catalog, no socket
    r = cli.fails("serve", "--port", "0", "--tls-cert", str(pki["server.crt"]))
    assert "--tls-cert needs --tls-key too" in r.stderr
    # (the same up-front check for the schedule's jitter: at most half the missed-backup grace)
    r = cli.fails("serve", "--port", "0", "--schedule-jitter", "7200")
    assert "--schedule-jitter 7200 is not between 0 and 1800 seconds" in r.stderr
    assert not (tmp_path / "home" / "serve.lock").exists()


def test_plain_http_only_to_loopback() -> None:
    for fine in ("http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:8080", "https://backup.example:8080"):
        check_server_url(fine)
    with pytest.raises(InvalidInput) as caught:
        check_server_url("http://192.0.2.7:8080")
    assert "in clear" in caught.value.message and "https://192.0.2.7:8080" in (caught.value.hint or "")


def test_the_remote_cli_over_https_trusts_the_private_ca_and_refuses_another(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    cli = Cli(home=tmp_path / "home")
    cli.ok("vault", "create", "main")
    tls = ("--tls-cert", str(pki["server.crt"]), "--tls-key", str(pki["server.key"]))
    trusting = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    with served(cli, extra=tls, context=trusting) as (address, token):
        assert address.startswith("https://127.0.0.1:")
        # The portal over the same TLS: its sign-in cookie is Secure there.
        with urllib.request.urlopen(f"{address}/signin", timeout=30, context=trusting) as page:
            assert page.status == 200 and "Secure" in (page.headers.get("Set-Cookie") or "")

        def remote(**env: str) -> Cli:
            return Cli(home=tmp_path / "elsewhere", passphrase=None, extra_env={"VMVAULT_TOKEN": token, **env})

        # The private CA in VMVAULT_CA_FILE: the same answer as on the server itself.
        vaults = remote(VMVAULT_CA_FILE=str(pki["ca.pem"])).ok("--server", address, "vault", "list").json()
        assert [v["name"] for v in vaults] == ["main"]
        # Another CA, or only the system's: refused, with the fix.
        for env in ({"VMVAULT_CA_FILE": str(pki["other-ca.pem"])}, {}):
            r = remote(**env).fails("--server", address, "vault", "list")
            assert f"the vmvault server at {address} is not trusted" in r.stderr, r
            assert "VMVAULT_CA_FILE" in r.stderr
        r = remote(VMVAULT_CA_FILE=str(pki["junk.pem"])).fails("--server", address, "vault", "list")
        assert f"VMVAULT_CA_FILE={pki['junk.pem']} holds no usable PEM certificate" in r.stderr
        # The token never goes in clear over the network: refused before any connection.
        r = remote().fails("--server", "http://192.0.2.7:8080", "vault", "list")
        assert "plain http is only for a loopback address" in r.stderr and "https://192.0.2.7:8080" in r.stderr
        # A client speaking plain HTTP to the HTTPS port gets no answer from the API.
        r = remote().fails("--server", address.replace("https:", "http:"), "vault", "list")
        assert "cannot reach the vmvault server" in r.stderr

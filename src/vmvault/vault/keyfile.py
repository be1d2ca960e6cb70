"""The vault's key file (keys/passphrase, in the vault) and the host key (under $VMVAULT_HOME/keys).

The key file is kept in two copies (keys/passphrase and keys/passphrase.2, docs/format.md "Key
file"), written together and read with fallback. Each carries a plain SHA-256 "check" over its
content: it cannot stop a forger (the MAC under the master key does that) but tells accidental
damage apart from a wrong passphrase, which AES-GCM alone cannot.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from vmvault.errors import AuthenticationError, IntegrityError
from vmvault.vault import crypto

KEYFILE_NAME = "keys/passphrase"
KEYFILE_COPY = "keys/passphrase.2"
KEYFILE_NAMES = (KEYFILE_NAME, KEYFILE_COPY)
_WRAP_AAD = b"vmvault/v1/master-key/"
_UNSIGNED = ("mac", "check")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes a document's MAC covers: everything but its "mac" and "check" fields."""
    signed = {k: v for k, v in doc.items() if k not in _UNSIGNED}
    return json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()


def checksum(doc: dict[str, Any]) -> str:
    """SHA-256 over the document including its MAC (not a secret: damage detection only)."""
    body = {k: v for k, v in doc.items() if k != "check"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def make_keyfile(master: bytes, vault_uuid: str, passphrase: str) -> bytes:
    salt = os.urandom(crypto.SALT_LEN)
    kek = crypto.passphrase_key(passphrase, salt, crypto.SCRYPT_N, crypto.SCRYPT_R, crypto.SCRYPT_P)
    nonce, wrapped = crypto.wrap_key(kek, master, _WRAP_AAD + vault_uuid.encode())
    doc: dict[str, Any] = {
        "version": 1,
        "vault": vault_uuid,
        "kdf": {"name": "scrypt", "n": crypto.SCRYPT_N, "r": crypto.SCRYPT_R, "p": crypto.SCRYPT_P, "salt": _b64(salt)},
        "wrap": {"cipher": "AES-256-GCM", "nonce": _b64(nonce), "key": _b64(wrapped)},
    }
    doc["mac"] = crypto.MasterKeys(master).mac(canonical(doc))
    doc["check"] = checksum(doc)
    return json.dumps(doc, indent=1, sort_keys=True).encode()


def parse_keyfile(data: bytes, name: str = KEYFILE_NAME) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads(data)
        _ = doc["kdf"]["salt"], doc["wrap"]["key"], doc["vault"], doc["mac"]
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"vault file {name} is damaged: not a vmvault key file", hint=_DAMAGED_HINT) from exc
    if "check" in doc and doc["check"] != checksum(doc):  # key files before 2026-12 have no check
        raise IntegrityError(f"vault file {name} is damaged: its checksum does not match", hint=_DAMAGED_HINT)
    return doc


_DAMAGED_HINT = (
    "the vault still opens with this host's key or the key file's other copy; "
    "'vmvault vault change-passphrase' writes both copies anew"
)


def unlock_with_passphrase(data: bytes, passphrase: str, name: str = KEYFILE_NAME) -> bytes:
    """The master key; AuthenticationError for a wrong passphrase, IntegrityError for a damaged file."""
    doc = parse_keyfile(data, name)
    try:
        kdf, wrap = doc["kdf"], doc["wrap"]
        if kdf.get("name") != "scrypt":
            raise ValueError(f"unknown key derivation {kdf.get('name')!r}")
        crypto.check_scrypt_params(kdf["n"], kdf["r"], kdf["p"])
        kek = crypto.passphrase_key(passphrase, _unb64(kdf["salt"]), kdf["n"], kdf["r"], kdf["p"])
        master = crypto.unwrap_key(kek, _unb64(wrap["nonce"]), _unb64(wrap["key"]), _WRAP_AAD + doc["vault"].encode())
    except AuthenticationError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"vault file {name} is damaged: {exc}", hint=_DAMAGED_HINT) from exc
    if not crypto.MasterKeys(master).check_mac(canonical(doc), doc["mac"]):
        raise IntegrityError(f"vault file {name} is damaged: its MAC does not match", hint=_DAMAGED_HINT)
    return master


def check_keyfile(data: bytes, keys: crypto.MasterKeys, name: str = KEYFILE_NAME) -> None:
    """Verify the key file with the master key (used by `vault verify`, no passphrase needed)."""
    doc = parse_keyfile(data, name)
    if not keys.check_mac(canonical(doc), doc["mac"]):
        raise IntegrityError(f"vault file {name} is damaged: its MAC does not match", hint=_DAMAGED_HINT)


def unlock_copies(copies: dict[str, bytes | None], passphrase: str) -> bytes:
    """The master key from whichever copy of the key file the passphrase opens.

    AuthenticationError only when a sound copy refuses the passphrase; when every copy is
    damaged or missing, IntegrityError naming them, never "wrong passphrase". Identical copies
    cost one key derivation.
    """
    damage: list[str] = []
    refused = False
    tried: set[bytes] = set()
    for name, data in copies.items():
        if data is None:
            damage.append(f"{name} is missing")
            continue
        if data in tried:  # the same bytes as a copy tried already: the same outcome
            if damage and not refused:
                damage.append(f"vault file {name} is damaged the same way")
            continue
        tried.add(data)
        try:
            return unlock_with_passphrase(data, passphrase, name)
        except AuthenticationError:
            refused = True
        except IntegrityError as exc:
            damage.append(exc.message)
    if refused:
        raise AuthenticationError("the passphrase does not open the vault's key file")
    raise IntegrityError(
        "the vault's key file cannot be read: " + "; ".join(damage),
        hint="open the vault on a host that holds its host key and run 'vmvault vault change-passphrase' "
        "to write the key file anew",
    )


class HostKeys:
    """Master keys wrapped by this host's key, so the service unlocks vaults unattended.

    Files are mode 0600 under $VMVAULT_HOME/keys; they are never copied into the vault or catalog.
    """

    def __init__(self, home: Path) -> None:
        self.dir = home / "keys"

    def _host_key(self, create: bool) -> bytes | None:
        path = self.dir / "host.key"
        if path.exists():
            return path.read_bytes()
        if not create:
            return None
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = os.urandom(crypto.KEY_LEN)
        _write_private(path, key)
        return key

    def has(self, vault_uuid: str) -> bool:
        return (self.dir / "host.key").exists() and (self.dir / f"{vault_uuid}.json").exists()

    def load(self, vault_uuid: str) -> bytes | None:
        path = self.dir / f"{vault_uuid}.json"
        host_key = self._host_key(create=False)
        if host_key is None or not path.exists():
            return None
        doc = json.loads(path.read_bytes())
        aad = _WRAP_AAD + vault_uuid.encode()
        return crypto.unwrap_key(host_key, _unb64(doc["nonce"]), _unb64(doc["key"]), aad)

    def store(self, vault_uuid: str, master: bytes) -> None:
        host_key = self._host_key(create=True)
        assert host_key is not None
        nonce, wrapped = crypto.wrap_key(host_key, master, _WRAP_AAD + vault_uuid.encode())
        _write_private(
            self.dir / f"{vault_uuid}.json", json.dumps({"nonce": _b64(nonce), "key": _b64(wrapped)}).encode()
        )


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

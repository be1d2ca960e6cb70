"""Passwords for the network export: minted by `vmvault files script`, stored only as SHA-256.

A password is 120 random bits written as 24 lowercase base32 characters, safe inside an NBD URI
(`nbds://host:port/<password>/<disk>`). Because it is random and long, one SHA-256 is enough to
store it (no slow KDF needed, unlike a human-chosen passphrase). Each password has its own expiry;
the export refuses it afterwards and shuts down connections opened with it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets as _random
from pathlib import Path

from vmvault.catalog.clock import from_iso, utc_now
from vmvault.recovery.nbdserver import Authorize, Grant

PASSWORD_BYTES = 15


def new_password() -> str:
    return base64.b32encode(_random.token_bytes(PASSWORD_BYTES)).decode().lower()


def hash_password(password: str) -> str:
    return hashlib.sha256(password.strip().encode()).hexdigest()


def catalog_authorizer(home: Path, session_id: str) -> Authorize:
    """Check a password against the session's stored hashes and their expiry, in the catalog."""
    from vmvault.catalog import repos
    from vmvault.catalog.db import Catalog
    from vmvault.settings import catalog_url_from_env

    # The owner opened (and migrated) it already; a PostgreSQL URL comes through the environment.
    url = catalog_url_from_env()
    catalog = Catalog(url=url) if url else Catalog(home / "catalog.db")

    def authorize(password: str) -> Grant:
        digest = hash_password(password)
        with catalog.read() as s:
            rows = repos.file_secrets(s, session_id)
        match = next((r for r in rows if hmac.compare_digest(r.secret_hash, digest)), None)
        if match is None:
            return Grant(error="access denied: wrong password for this recovery session")
        expires = from_iso(match.expires)
        if expires <= utc_now():
            return Grant(
                error=f"access denied: this password expired at {match.expires}; "
                "generate a new script with 'vmvault files script'"
            )
        return Grant(deadline=expires.timestamp())

    return authorize

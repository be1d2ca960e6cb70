"""Sealed files: small authenticated, encrypted, compressed documents (manifests, pack indexes).

Layout: MAGIC (8) | salt (32) | AES-256-GCM(zstd(payload)), nonce 0 under the per-file key,
associated data = MAGIC + salt + the object's name, so a file moved to another name fails.
"""

from __future__ import annotations

import os

import zstandard
from cryptography.exceptions import InvalidTag

from vmvault.errors import IntegrityError
from vmvault.vault.crypto import SALT_LEN, MasterKeys, nonce_for

SEALED_MAGIC = b"VMVSEAL1"
_HEADER = len(SEALED_MAGIC) + SALT_LEN


def seal(keys: MasterKeys, name: str, payload: bytes) -> bytes:
    salt = os.urandom(SALT_LEN)
    header = SEALED_MAGIC + salt
    body = keys.seal_cipher(salt).encrypt(nonce_for(0), zstandard.compress(payload, 3), header + name.encode())
    return header + body


def unseal(keys: MasterKeys, name: str, data: bytes) -> bytes:
    if len(data) < _HEADER + 16 or not data.startswith(SEALED_MAGIC):
        raise IntegrityError(f"vault file {name} is damaged: bad header", hint=_HINT)
    header, body = data[:_HEADER], data[_HEADER:]
    try:
        compressed = keys.seal_cipher(header[len(SEALED_MAGIC) :]).decrypt(nonce_for(0), body, header + name.encode())
    except InvalidTag as exc:
        raise IntegrityError(f"vault file {name} is damaged: authentication failed", hint=_HINT) from exc
    return zstandard.decompress(compressed)


_HINT = "run 'vmvault vault verify' to see what is affected; restore the file from the vault's second copy if any"

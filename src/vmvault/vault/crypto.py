"""Keys and authenticated encryption (docs/format.md, "Keys" and "Encryption").

A random 32-byte master key never leaves memory in clear. Every purpose gets its own subkey
through HKDF-SHA256; every encrypted object (a pack, a sealed file) gets a fresh random salt and
therefore a fresh AES-256-GCM key, so nonces never repeat under one key and never derive from
a chunk ID.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from vmvault.errors import AuthenticationError

KEY_LEN = 32
SALT_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
ZERO_ID = bytes(32)  # the ID of an all-zero chunk: never stored, restored as a hole

SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1


def hkdf(key: bytes, info: bytes, salt: bytes | None = None, length: int = KEY_LEN) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


def passphrase_key(passphrase: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> bytes:
    return Scrypt(salt=salt, length=KEY_LEN, n=n, r=r, p=p).derive(passphrase.encode())


def wrap_key(kek: bytes, key: bytes, aad: bytes) -> tuple[bytes, bytes]:
    nonce = os.urandom(NONCE_LEN)
    return nonce, AESGCM(kek).encrypt(nonce, key, aad)


def unwrap_key(kek: bytes, nonce: bytes, wrapped: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(kek).decrypt(nonce, wrapped, aad)
    except InvalidTag as exc:
        raise AuthenticationError("the key does not unlock this vault") from exc


def nonce_for(counter: int) -> bytes:
    """A 96-bit nonce from a per-key counter (the blob's offset in its pack)."""
    return struct.pack(">IQ", 0, counter)


class MasterKeys:
    """The subkeys of one vault, derived once per process."""

    def __init__(self, master: bytes) -> None:
        self._master = master
        self.id_key = hkdf(master, b"vmvault/v1/chunk-id")
        self._pack_root = hkdf(master, b"vmvault/v1/pack")
        self._seal_root = hkdf(master, b"vmvault/v1/sealed-file")
        self._mac_key = hkdf(master, b"vmvault/v1/mac")

    @property
    def master(self) -> bytes:
        return self._master

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        """Keyed BLAKE3 of the plaintext: dedup without revealing content hashes."""
        return blake3.blake3(data, key=self.id_key).digest()

    def pack_cipher(self, salt: bytes) -> AESGCM:
        return AESGCM(hkdf(self._pack_root, b"pack", salt))

    def seal_cipher(self, salt: bytes) -> AESGCM:
        return AESGCM(hkdf(self._seal_root, b"file", salt))

    def mac(self, data: bytes) -> str:
        return hmac.new(self._mac_key, data, hashlib.sha256).hexdigest()

    def check_mac(self, data: bytes, mac: str) -> bool:
        return hmac.compare_digest(self.mac(data), mac)

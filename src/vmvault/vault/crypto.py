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
import threading

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
PACK_CIPHERS_KEPT = 256  # pack keys kept derived (per MasterKeys); the map is emptied when full

# New key files: scrypt at N=2^17, r=8 (128 MiB, ~0.35 s on one core of the test machine). Key
# files written before 2026-12 use N=2^15 and keep working; `vault change-passphrase` re-wraps.
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
# Bounds for parameters read back from a key file (a hostile vault chooses them): at most 1 GiB
# of memory and 16x the default's work; at least 2^14 (weaker ones are not ours).
SCRYPT_MIN_N = 2**14
SCRYPT_MAX_MEMORY = 1 << 30
SCRYPT_MAX_WORK = 16 * SCRYPT_N * SCRYPT_R * SCRYPT_P


def hkdf(key: bytes, info: bytes, salt: bytes | None = None, length: int = KEY_LEN) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


def check_scrypt_params(n: object, r: object, p: object) -> None:
    """Raise ValueError unless (n, r, p) are sane scrypt parameters within our bounds."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, r, p)):
        raise ValueError("scrypt parameters are not integers")
    assert isinstance(n, int) and isinstance(r, int) and isinstance(p, int)
    if n < SCRYPT_MIN_N or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise ValueError(f"scrypt parameters n={n} r={r} p={p} are out of bounds")
    if 128 * n * r > SCRYPT_MAX_MEMORY or n * r * p > SCRYPT_MAX_WORK:
        raise ValueError(f"scrypt parameters n={n} r={r} p={p} are out of bounds: more memory or work than allowed")


def passphrase_key(passphrase: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> bytes:
    check_scrypt_params(n, r, p)
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
        # A restore decodes thousands of blobs of a few packs: one HKDF per pack, not per blob.
        self._pack_ciphers: dict[bytes, AESGCM] = {}
        self._pack_ciphers_lock = threading.Lock()

    @property
    def master(self) -> bytes:
        return self._master

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        """Keyed BLAKE3 of the plaintext: dedup without revealing content hashes."""
        return blake3.blake3(data, key=self.id_key).digest()

    def pack_cipher(self, salt: bytes) -> AESGCM:
        with self._pack_ciphers_lock:
            cipher = self._pack_ciphers.get(salt)
            if cipher is None:
                if len(self._pack_ciphers) >= PACK_CIPHERS_KEPT:
                    self._pack_ciphers.clear()
                cipher = self._pack_ciphers[salt] = AESGCM(hkdf(self._pack_root, b"pack", salt))
            return cipher

    def seal_cipher(self, salt: bytes) -> AESGCM:
        return AESGCM(hkdf(self._seal_root, b"file", salt))

    def mac(self, data: bytes) -> str:
        return hmac.new(self._mac_key, data, hashlib.sha256).hexdigest()

    def check_mac(self, data: bytes, mac: str) -> bool:
        return hmac.compare_digest(self.mac(data), mac)

"""Pack files: many small encrypted blobs in one object (docs/format.md, "Packs").

Layout: PACK_MAGIC (8) | salt (32) | blob* | trailer | trailer_len (u32 LE) | PACK_END (8)
- blob i = AES-256-GCM(pack key, nonce = its offset, zstd(plain) or plain, aad = id|type|flags)
- trailer = AES-256-GCM(pack key, nonce 0, packed entries): the pack describes itself, so the
  index can be rebuilt from packs alone.
The pack key is HKDF(master, salt): one key per pack, counter nonces never repeat under it.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

import zstandard
from cryptography.exceptions import InvalidTag

from vmvault.errors import IntegrityError
from vmvault.vault.crypto import SALT_LEN, MasterKeys, nonce_for

PACK_MAGIC = b"VMVPACK1"
PACK_END = b"VMVPEND1"
HEADER_LEN = len(PACK_MAGIC) + SALT_LEN
FLAG_ZSTD = 1
TYPE_DATA = 1  # a disk chunk
TYPE_TREE = 2  # a disk-index node (root or leaf)
ENTRY = struct.Struct("<32sBBQII")  # id, type, flags, offset, stored length, plain length
TARGET_PACK_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True)
class BlobRef:
    blob_id: bytes
    type: int
    flags: int
    offset: int
    length: int
    plain_length: int

    def pack_entry(self) -> bytes:
        return ENTRY.pack(self.blob_id, self.type, self.flags, self.offset, self.length, self.plain_length)


def unpack_entries(data: bytes) -> list[BlobRef]:
    if len(data) % ENTRY.size:
        raise ValueError("entry table has a partial entry")
    return [BlobRef(*ENTRY.unpack_from(data, i)) for i in range(0, len(data), ENTRY.size)]


_local = threading.local()


def compress(plain: bytes | memoryview) -> bytes:
    cctx = getattr(_local, "cctx", None)
    if cctx is None:
        cctx = _local.cctx = zstandard.ZstdCompressor(level=3)
    result: bytes = cctx.compress(plain)
    return result


def decompress(data: bytes, plain_length: int) -> bytes:
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    result: bytes = dctx.decompress(data, max_output_size=plain_length)
    return result


PROBE = 2048


def _looks_incompressible(plain: bytes | memoryview) -> bool:
    """Two 2 KiB samples at zstd's fastest level: random data (encrypted, media) is skipped cheaply."""
    probe = getattr(_local, "probe", None)
    if probe is None:
        probe = _local.probe = zstandard.ZstdCompressor(level=1)
    middle = len(plain) // 2
    for sample in (plain[:PROBE], plain[middle : middle + PROBE]):
        if len(sample) < PROBE or len(probe.compress(sample)) < PROBE - PROBE // 16:
            return False
    return True


def encode_body(plain: bytes | memoryview) -> tuple[bytes, int]:
    """Compress when it pays; random data is stored as is (no decompression cost on restore)."""
    if _looks_incompressible(plain):
        return bytes(plain), 0
    packed = compress(plain)
    if len(packed) < len(plain) - len(plain) // 32:
        return packed, FLAG_ZSTD
    return bytes(plain), 0


def _aad(blob_id: bytes, type_: int, flags: int) -> bytes:
    return blob_id + bytes((type_, flags))


def decode_blob(keys: MasterKeys, salt: bytes, ref: BlobRef, stored: bytes | memoryview, where: str) -> bytes:
    """Decrypt, decompress and re-hash one blob; any mismatch names the blob and its pack."""
    try:
        body = keys.pack_cipher(salt).decrypt(nonce_for(ref.offset), stored, _aad(ref.blob_id, ref.type, ref.flags))
    except InvalidTag as exc:
        raise IntegrityError(
            f"chunk {ref.blob_id.hex()} in {where} at offset {ref.offset} fails authentication"
        ) from exc
    plain = decompress(body, ref.plain_length) if ref.flags & FLAG_ZSTD else body
    if len(plain) != ref.plain_length or keys.chunk_id(plain) != ref.blob_id:
        raise IntegrityError(f"chunk {ref.blob_id.hex()} in {where} does not match its ID")
    return plain


class PackBuilder:
    """Accumulates encoded blobs for one pack in a reused buffer."""

    def __init__(self, keys: MasterKeys) -> None:
        self._keys = keys
        self.salt = os.urandom(SALT_LEN)
        self._cipher = keys.pack_cipher(self.salt)
        self.buf = bytearray(PACK_MAGIC + self.salt)
        self.entries: list[BlobRef] = []
        self.ids: set[bytes] = set()

    def add(self, blob_id: bytes, type_: int, body: bytes, flags: int, plain_length: int) -> BlobRef:
        offset = len(self.buf)
        sealed = self._cipher.encrypt(nonce_for(offset), body, _aad(blob_id, type_, flags))
        self.buf += sealed
        ref = BlobRef(blob_id, type_, flags, offset, len(sealed), plain_length)
        self.entries.append(ref)
        self.ids.add(blob_id)
        return ref

    def size(self) -> int:
        return len(self.buf)

    def finish(self) -> bytearray:
        """The whole pack (the builder's own buffer: no copy of up to 16 MiB)."""
        table = b"".join(e.pack_entry() for e in self.entries)
        trailer = self._cipher.encrypt(nonce_for(0), table, PACK_MAGIC + self.salt)
        self.buf += trailer + struct.pack("<I", len(trailer)) + PACK_END
        return self.buf


def read_trailer(keys: MasterKeys, name: str, data: bytes) -> tuple[bytes, list[BlobRef]]:
    """Authenticate a whole pack's header and trailer; returns (salt, entries)."""
    if len(data) < HEADER_LEN + 12 or not data.startswith(PACK_MAGIC) or not data.endswith(PACK_END):
        raise IntegrityError(f"pack {name} is damaged: bad header or end marker")
    salt = data[len(PACK_MAGIC) : HEADER_LEN]
    (tlen,) = struct.unpack("<I", data[-12:-8])
    trailer = data[-12 - tlen : -12]
    try:
        table = keys.pack_cipher(salt).decrypt(nonce_for(0), trailer, PACK_MAGIC + salt)
    except InvalidTag as exc:
        raise IntegrityError(f"pack {name} is damaged: its table of contents fails authentication") from exc
    return salt, unpack_entries(table)


@dataclass(frozen=True)
class FetchedEnds:
    """A pack's header and trailer as a read of the whole object found them, and its length: what
    the pack's check needs, cut out so the object's bytes need not be kept for it."""

    header: bytes
    tail: bytes
    size: int

    @classmethod
    def of(cls, whole: bytes | memoryview) -> FetchedEnds:
        """Cut from a whole object; the trailer's length is the object's own word for it (the
        check compares it with the index, and authenticates it)."""
        view = memoryview(whole)
        (tlen,) = struct.unpack("<I", view[-12:-8]) if len(view) >= HEADER_LEN + 12 else (0,)
        tail_start = max(HEADER_LEN, len(view) - 12 - tlen)
        return cls(bytes(view[:HEADER_LEN]), bytes(view[tail_start:]), len(view))


PublishFn = Callable[[bytes, list[BlobRef], bytes], None]

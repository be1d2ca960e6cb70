"""The vault: an encrypted, deduplicated chunk store holding recovery points.

Write order (docs/format.md, "Publishing"): pack (atomic put) -> pack index file -> ... ->
manifest last. A crash leaves at worst unreferenced packs, which the next backup reuses and
garbage collection removes; never a partial recovery point.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import uuid as uuidlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmvault.errors import AlreadyExists, AuthenticationError, IntegrityError, InvalidInput, NotFound
from vmvault.testhooks import crash_point
from vmvault.vault import crypto, keyfile
from vmvault.vault.backends.base import Backend
from vmvault.vault.backends.local import LocalBackend
from vmvault.vault.chunkindex import ChunkIndex, Location
from vmvault.vault.crypto import TAG_LEN
from vmvault.vault.manifest import RecoveryPointManifest
from vmvault.vault.packs import (
    ENTRY,
    HEADER_LEN,
    PACK_MAGIC,
    TARGET_PACK_SIZE,
    TYPE_DATA,
    TYPE_TREE,
    BlobRef,
    PackBuilder,
    decode_blob,
    read_trailer,
)
from vmvault.vault.sealed import seal, unseal

FORMAT_VERSION = 1
CONFIG_NAME = "config"
DEFAULT_CHUNK_SIZE = 64 * 1024
LEAF_SPAN = 256  # chunks per disk-index leaf
_PACK_DIRS = {TYPE_DATA: "data", TYPE_TREE: "tree"}


def _index_payload(pack: str, salt: bytes, entries: list[BlobRef]) -> bytes:
    name = pack.encode()
    return struct.pack("<H", len(name)) + name + salt + b"".join(e.pack_entry() for e in entries)


def index_name_for(pack: str) -> str:
    """The index file of a pack: data/ab/abcd... -> index/ab/abcd... (as PackWriter names them)."""
    return "index/" + pack.split("/", 1)[1]


def _is_tmp(name: str) -> bool:
    return name.rsplit("/", 1)[-1].startswith(".tmp-")


def parse_index_payload(payload: bytes) -> tuple[str, bytes, list[BlobRef]]:
    from vmvault.vault.packs import unpack_entries

    (n,) = struct.unpack_from("<H", payload)
    pack = payload[2 : 2 + n].decode()
    salt = payload[2 + n : 2 + n + crypto.SALT_LEN]
    return pack, salt, unpack_entries(payload[2 + n + crypto.SALT_LEN :])


class PackWriter:
    """One open pack per blob type; thread-safe; publishes full packs atomically.

    Full packs are published by one background thread (write, fsync, index file) while workers
    keep filling the next pack; at most MAX_PUBLISHING packs wait, which bounds memory. An error
    in publishing is raised by the next `add` or by `flush`.
    """

    MAX_PUBLISHING = 1

    def __init__(self, vault: Vault, type_: int) -> None:
        self._vault = vault
        self._type = type_
        self._lock = threading.Lock()
        self._builder: PackBuilder | None = None
        self._publishing: deque[tuple[PackBuilder, Future[None]]] = deque()
        self._publisher = ThreadPoolExecutor(1, thread_name_prefix="vmv-publish")
        self.bytes_written = 0
        self.packs_published = 0

    def add(self, blob_id: bytes, body: bytes, flags: int, plain_length: int) -> bool:
        """Queue an encoded blob; False when it is already pending in an unpublished pack."""
        self._wait_for_room()
        with self._lock:
            if self._pending_locked(blob_id):
                return False
            if self._builder is None:
                self._builder = PackBuilder(self._vault.keys)
            self._builder.add(blob_id, self._type, body, flags, plain_length)
            if self._builder.size() >= TARGET_PACK_SIZE:
                full, self._builder = self._builder, None
                self._publishing.append((full, self._publisher.submit(self._publish, full)))
        self._reap()
        return True

    def _wait_for_room(self) -> None:
        """Block while more than MAX_PUBLISHING full packs wait to be published.

        Checked before every add, by every worker: waiting only in the worker that filled a pack
        let the others fill and queue more, and with a slow disk full packs piled up in memory
        (13 of them, 220 MiB, in a 64 GiB backup). Now at most MAX_PUBLISHING + 1 full packs and
        the one being built exist at a time.
        """
        while True:
            with self._lock:
                if len(self._publishing) <= self.MAX_PUBLISHING:
                    return
                oldest = self._publishing[0][1]
            wait_futures([oldest])
            self._reap()

    def _pending_locked(self, blob_id: bytes) -> bool:
        if self._builder is not None and blob_id in self._builder.ids:
            return True
        return any(blob_id in builder.ids for builder, _ in self._publishing)

    def pending(self, blob_id: bytes) -> bool:
        with self._lock:
            return self._pending_locked(blob_id)

    def _reap(self) -> None:
        """Forget published packs (their blobs are in the index now); raise a publishing error."""
        while True:
            with self._lock:
                if not self._publishing or not self._publishing[0][1].done():
                    return
                _builder, fut = self._publishing.popleft()
            fut.result()

    def flush(self) -> None:
        with self._lock:
            full, self._builder = self._builder, None
            if full is not None and full.entries:
                self._publishing.append((full, self._publisher.submit(self._publish, full)))
            waiting = [fut for _b, fut in self._publishing]
        try:
            for fut in waiting:
                fut.result()
        finally:
            self._reap()

    def close(self) -> None:
        self._publisher.shutdown(wait=True, cancel_futures=True)

    def _publish(self, builder: PackBuilder) -> None:
        data = builder.finish()
        pack_id = os.urandom(16).hex()
        name = f"{_PACK_DIRS[self._type]}/{pack_id[:2]}/{pack_id}"
        index_name = index_name_for(name)
        self._vault.backend.put(name, data)
        crash_point("pack:published")
        self._vault.backend.put(
            index_name, seal(self._vault.keys, index_name, _index_payload(name, builder.salt, builder.entries))
        )
        self._vault.index.add_pack(name, index_name, builder.salt, builder.entries)
        self.bytes_written += len(data)
        self.packs_published += 1
        _test_pause_after_pack(self._type)


def _test_pause_after_pack(type_: int) -> None:
    # Test-only hook (documented in docs/testing.md): lets crash tests kill a backup after a pack
    # is published without racing it.
    pause = os.environ.get("VMVAULT_TEST_PAUSE_AFTER_PACK")
    if pause and type_ == TYPE_DATA:
        time.sleep(float(pause))


class Vault:
    def __init__(
        self, backend: Backend, storage_dir: Path, home: Path, keys: crypto.MasterKeys, config: dict[str, Any]
    ):
        self.backend = backend
        self.storage_dir = storage_dir
        self.home = home
        self.keys = keys
        self.config = config
        self.uuid: str = config["uuid"]
        self.chunk_size: int = config["chunk_size"]
        self.leaf_span: int = config["leaf_span"]
        self.redundancy: str = config["redundancy"]
        self.created: str = config["created"]
        self._checked_packs: set[str] = set()
        self._checked_lock = threading.Lock()
        self.damaged_index_files: dict[str, str] = {}  # index file -> problem (see sync_index)
        self.index = ChunkIndex(home / "cache" / self.uuid / "chunks.db")
        self.sync_index()

    # ---- life cycle -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        storage_dir: Path,
        home: Path,
        passphrase: str,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        redundancy: str = "LRS",
    ) -> Vault:
        storage_dir = Path(storage_dir).absolute()
        backend = LocalBackend(storage_dir)
        if backend.exists(CONFIG_NAME):
            raise AlreadyExists(
                f"{storage_dir} already holds a vault", hint="use 'vmvault vault import' to register it"
            )
        if storage_dir.exists() and any(storage_dir.iterdir()):
            raise InvalidInput(f"{storage_dir} is not empty", hint="choose an empty or new directory for the vault")
        if chunk_size < 4096 or chunk_size & (chunk_size - 1) or chunk_size > 4 * 1024 * 1024:
            raise InvalidInput(f"chunk size {chunk_size} is not a power of two between 4 KiB and 4 MiB")
        master = os.urandom(crypto.KEY_LEN)
        keys = crypto.MasterKeys(master)
        config: dict[str, Any] = {
            "format": "vmvault-vault",
            "version": FORMAT_VERSION,
            "uuid": str(uuidlib.uuid4()),
            "chunk_size": chunk_size,
            "leaf_span": LEAF_SPAN,
            "redundancy": redundancy,
            "chunk_id": "blake3-keyed",
            "cipher": "AES-256-GCM",
            "compression": "zstd",
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        config["mac"] = keys.mac(keyfile.canonical(config))
        backend.put(keyfile.KEYFILE_NAME, keyfile.make_keyfile(master, config["uuid"], passphrase))
        backend.put(CONFIG_NAME, json.dumps(config, indent=1, sort_keys=True).encode())
        keyfile.HostKeys(home).store(config["uuid"], master)
        return cls(backend, storage_dir, home, keys, config)

    @classmethod
    def open(cls, storage_dir: Path, home: Path, passphrase: str | None = None) -> Vault:
        storage_dir = Path(storage_dir).absolute()
        backend = LocalBackend(storage_dir)
        config = _read_config(backend, storage_dir)
        host = keyfile.HostKeys(home)
        master = host.load(config["uuid"])
        if master is None:
            if not passphrase:
                raise AuthenticationError(
                    f"vault at {storage_dir} is not unlocked on this host",
                    hint="give its passphrase with VMVAULT_PASSPHRASE or --passphrase-file",
                )
            try:
                master = keyfile.unlock_with_passphrase(backend.get(keyfile.KEYFILE_NAME), passphrase)
            except AuthenticationError as exc:
                raise AuthenticationError(
                    f"wrong passphrase for the vault at {storage_dir}",
                    hint="check the passphrase (VMVAULT_PASSPHRASE or --passphrase-file); nothing was changed",
                ) from exc
        keys = crypto.MasterKeys(master)
        if not keys.check_mac(keyfile.canonical(config), str(config.get("mac", ""))):
            raise IntegrityError(f"vault file {CONFIG_NAME} in {storage_dir} is damaged: its MAC does not match")
        # The key file is what a new host needs to unlock the vault: a damaged one is reported at
        # once rather than discovered in a disaster.
        keyfile.check_keyfile(backend.get(keyfile.KEYFILE_NAME), keys)
        if host.load(config["uuid"]) is None:
            host.store(config["uuid"], master)
        return cls(backend, storage_dir, home, keys, config)

    def close(self) -> None:
        self.index.close()

    # ---- index --------------------------------------------------------------------------------
    def sync_index(self) -> None:
        """Bring the local chunk index in line with the vault's pack index files.

        A damaged index file is skipped and remembered in `damaged_index_files` (verify names
        it, `vault repair` rebuilds it from the pack's trailer): one bad file must not make every
        point of the vault unreadable. The blobs it listed look missing until then, so a backup
        stores that data again rather than deduplicating against a copy nobody can locate.
        """
        present = {name for name, _ in self.backend.list("index") if not _is_tmp(name)}
        known = self.index.known_index_files()
        self.index.forget_index_files(known - present)
        for name in sorted(present - known):
            try:
                pack, salt, entries = parse_index_payload(unseal(self.keys, name, self.backend.get(name)))
            except IntegrityError as exc:
                self.damaged_index_files[name] = exc.message
                continue
            except (ValueError, struct.error, UnicodeDecodeError) as exc:
                self.damaged_index_files[name] = f"vault file {name} is damaged: {exc}"
                continue
            self.damaged_index_files.pop(name, None)
            self.index.add_pack(pack, name, salt, entries)

    # ---- packs the index does not list (vault/gc.py, vault repair) --------------------------------
    def unindexed_packs(self) -> list[str]:
        """Pack files that no index file (known to the local chunk index) lists."""
        return sorted(
            name
            for top in ("data", "tree")
            for name, _size in self.backend.list(top)
            if not _is_tmp(name) and not self.index.has_pack(name)
        )

    def pack_trailer(self, pack: str) -> tuple[bytes, list[BlobRef]]:
        """The salt and blob table a pack's own (authenticated) trailer lists."""
        return read_trailer(self.keys, pack, self.backend.get(pack))

    def reindex_pack(self, pack: str, *, write_index_file: bool) -> tuple[bytes, list[BlobRef]]:
        """List a pack in the chunk index from its trailer; with write_index_file, also (re)write
        its index file (the same name a backup gives it, so a backup publishing it meanwhile
        writes an equivalent file). Raises IntegrityError when the trailer cannot be read."""
        salt, entries = self.pack_trailer(pack)
        index_name = index_name_for(pack)
        if write_index_file:
            self.backend.put(index_name, seal(self.keys, index_name, _index_payload(pack, salt, entries)))
            self.damaged_index_files.pop(index_name, None)
        self.index.forget_index_files([index_name])
        self.index.add_pack(pack, index_name, salt, entries)
        return salt, entries

    def authenticate_pack(self, pack: str) -> None:
        """Check a pack's header, table of contents and index file (once per pack per process).

        Blobs are authenticated on every read anyway; this makes a restore also refuse a pack
        whose other parts are damaged, so damage anywhere in what a point uses is reported.
        """
        with self._checked_lock:
            if pack in self._checked_packs:
                return
        known = self.index.pack_entries(pack)
        index_name = self.index.index_file_of(pack)
        if known is None or index_name is None:
            raise IntegrityError(f"pack {pack} is not in the vault's index", hint="run 'vmvault vault verify'")
        salt, entries = known
        header = self.backend.get(pack, 0, HEADER_LEN)
        if header != PACK_MAGIC + salt:
            raise IntegrityError(f"pack {pack} is damaged: bad header", hint="run 'vmvault vault verify'")
        trailer_at = max((e.offset + e.length for e in entries), default=HEADER_LEN)
        tail = self.backend.get(pack, trailer_at, ENTRY.size * len(entries) + TAG_LEN + 12)
        _salt, listed = read_trailer(self.keys, pack, header + tail)
        indexed = parse_index_payload(unseal(self.keys, index_name, self.backend.get(index_name)))
        if set(listed) != set(entries) or set(indexed[2]) != set(entries) or indexed[1] != salt:
            raise IntegrityError(f"pack {pack} does not match its index file {index_name}")
        with self._checked_lock:
            self._checked_packs.add(pack)

    # ---- blobs --------------------------------------------------------------------------------
    def read_blob(self, loc: Location) -> bytes:
        self.authenticate_pack(loc.pack)
        stored = self.backend.get(loc.pack, loc.ref.offset, loc.ref.length)
        return decode_blob(self.keys, loc.salt, loc.ref, stored, f"pack {loc.pack}")

    def read_blob_from(self, loc: Location, stored: bytes | memoryview) -> bytes:
        """Decode a blob whose stored bytes were already fetched (batched reads on restore)."""
        self.authenticate_pack(loc.pack)
        return decode_blob(self.keys, loc.salt, loc.ref, stored, f"pack {loc.pack}")

    def get_blob(self, blob_id: bytes) -> bytes:
        loc = self.index.lookup(blob_id)
        if loc is None:
            raise IntegrityError(f"chunk {blob_id.hex()} is missing from the vault", hint="run 'vmvault vault verify'")
        return self.read_blob(loc)

    # ---- manifests ----------------------------------------------------------------------------
    @staticmethod
    def manifest_name(rp_id: str) -> str:
        return f"points/{rp_id}"

    def publish_manifest(self, manifest: RecoveryPointManifest) -> None:
        name = self.manifest_name(manifest.rp_id)
        if self.backend.exists(name):
            raise AlreadyExists(f"recovery point {manifest.rp_id} already exists in vault {self.storage_dir}")
        self.backend.put(name, seal(self.keys, name, manifest.to_json()))

    def read_manifest(self, rp_id: str) -> RecoveryPointManifest:
        name = self.manifest_name(rp_id)
        if not self.backend.exists(name):
            raise NotFound(f"recovery point {rp_id} is not in the vault at {self.storage_dir}")
        payload = unseal(self.keys, name, self.backend.get(name))
        try:
            return RecoveryPointManifest.from_json(payload)
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"vault file {name} is damaged: {exc}") from exc

    def list_recovery_points(self) -> list[str]:
        return sorted(name.split("/", 1)[1] for name, _ in self.backend.list("points"))

    def delete_manifest(self, rp_id: str) -> None:
        self.backend.delete(self.manifest_name(rp_id))


def _read_config(backend: Backend, storage_dir: Path) -> dict[str, Any]:
    if not backend.exists(CONFIG_NAME):
        raise NotFound(f"no vault at {storage_dir}", hint="check the path, or create one with 'vmvault vault create'")
    try:
        config: dict[str, Any] = json.loads(backend.get(CONFIG_NAME))
        if config.get("format") != "vmvault-vault":
            raise ValueError("not a vmvault config")
    except ValueError as exc:
        raise IntegrityError(f"vault file {CONFIG_NAME} in {storage_dir} is damaged: {exc}") from exc
    if config.get("version") != FORMAT_VERSION:
        raise InvalidInput(
            f"vault at {storage_dir} has format version {config.get('version')}; "
            f"this vmvault reads version {FORMAT_VERSION}",
            hint="upgrade vmvault",
        )
    return config

"""The vault: an encrypted, deduplicated chunk store holding recovery points.

Write order (docs/format.md, "Publishing"): pack (atomic put) -> pack index file -> ... ->
manifest last. A crash leaves at worst unreferenced packs, which the next backup reuses and
garbage collection removes; never a partial recovery point.
"""

from __future__ import annotations

import hashlib
import json
import logging
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

from vmvault.errors import (
    AlreadyExists,
    AuthenticationError,
    HostileContent,
    IntegrityError,
    InvalidInput,
    NotFound,
    ObjectNotFound,
)
from vmvault.testhooks import crash_point
from vmvault.vault import crypto, keyfile, objlock, seqchain
from vmvault.vault.backends import open_backend
from vmvault.vault.backends.base import Backend
from vmvault.vault.chunkindex import ChunkIndex, Location
from vmvault.vault.crypto import TAG_LEN
from vmvault.vault.journal import PackJournal
from vmvault.vault.manifest import RecoveryPointManifest, UntrustedName
from vmvault.vault.packs import (
    ENTRY,
    HEADER_LEN,
    PACK_MAGIC,
    TARGET_PACK_SIZE,
    TYPE_DATA,
    TYPE_TREE,
    BlobRef,
    FetchedEnds,
    PackBuilder,
    decode_blob,
    read_trailer,
)
from vmvault.vault.sealed import seal, unseal

FORMAT_VERSION = 1
CONFIG_NAME = "config"
CONFIG_COPY = "config.2"
CONFIG_NAMES = (CONFIG_NAME, CONFIG_COPY)
# Capabilities of the vault (docs/format.md, "Features"): a vault without one gains it on first write.
FEATURES = (seqchain.FEATURE, "two-copies-v1")
log = logging.getLogger("vmvault")
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

    def __init__(self, vault: Vault, type_: int, journal: PackJournal | None = None) -> None:
        self._vault = vault
        self._type = type_
        self._journal = journal  # a backup job's: each pack is named there before it is written
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
        if self._journal is not None:
            self._journal.record(name)
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
        self, backend: Backend, home: Path, keys: crypto.MasterKeys, config: dict[str, Any], cache_name: str = ""
    ):
        self.backend = backend
        # Where the vault is, as the catalog stores it: a directory or an azure:// or s3:// URL.
        self.storage_dir: str = backend.location
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
        self._checking: dict[str, threading.Lock] = {}
        self.damaged_index_files: dict[str, str] = {}  # index file -> problem (see sync_index)
        self._write_lock = threading.Lock()
        self._write_ready = False
        # Copies of config / keys/passphrase found damaged or missing at open (healed on the next write).
        self.damaged_copies: dict[str, str] = {}
        # The host's caches of this copy of the vault: a GRS secondary (which lags) has its own.
        self.cache_name = cache_name or self.uuid
        self.chain = seqchain.Chain(backend, self.keys, self.uuid, home / "cache" / self.cache_name / "seq-head.json")
        self.index = ChunkIndex(home / "cache" / self.cache_name / "chunks.db")
        self.sync_index()

    @property
    def features(self) -> list[str]:
        value = self.config.get("features") or []
        return [str(f) for f in value] if isinstance(value, list) else []

    # ---- life cycle -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        storage_dir: Path | str,
        home: Path,
        passphrase: str,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        redundancy: str = "LRS",
        backend: Backend | None = None,
    ) -> Vault:
        backend = backend or open_backend(storage_dir)
        storage_dir = backend.location
        if backend.exists(CONFIG_NAME):
            raise AlreadyExists(
                f"{storage_dir} already holds a vault", hint="use 'vmvault vault import' to register it"
            )
        if any(True for _ in backend.inventory()):
            raise InvalidInput(
                f"{storage_dir} is not empty", hint="choose an empty or new location (directory, container, prefix)"
            )
        if chunk_size < 4096 or chunk_size & (chunk_size - 1) or chunk_size > 4 * 1024 * 1024:
            raise InvalidInput(f"chunk size {chunk_size} is not a power of two between 4 KiB and 4 MiB")
        backend.ensure_container()
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
            "features": list(FEATURES),
        }
        config["mac"] = keys.mac(keyfile.canonical(config))
        _put_copies(backend, keyfile.KEYFILE_NAMES, keyfile.make_keyfile(master, config["uuid"], passphrase))
        keyfile.HostKeys(home).store(config["uuid"], master)
        seqchain.Chain(backend, keys, config["uuid"], home / "cache" / config["uuid"] / "seq-head.json").genesis({})
        _put_copies(backend, CONFIG_NAMES, _config_bytes(config))  # last: until here there is no vault
        return cls(backend, home, keys, config)

    @classmethod
    def open(
        cls,
        storage_dir: Path | str,
        home: Path,
        passphrase: str | None = None,
        *,
        strict_passphrase: bool = False,
        backend: Backend | None = None,
        cache_name: str = "",
    ) -> Vault:
        """Open with this host's key, else the passphrase.

        strict_passphrase: a passphrase given for this one vault must open its key file even when
        the host key opens the vault (AuthenticationError, nothing changed); otherwise a mismatch
        is only logged. Checked at most once per process per vault (the KDF is slow on purpose).
        """
        backend = backend or open_backend(storage_dir)
        storage_dir = backend.location
        configs = _read_configs(backend, storage_dir)
        host = keyfile.HostKeys(home)
        uuid, master = _host_master(host, configs)
        if master is None:
            if not passphrase:
                raise AuthenticationError(
                    f"vault at {storage_dir} is not unlocked on this host",
                    hint="give its passphrase with VMVAULT_PASSPHRASE or --passphrase-file",
                )
            master = _unlock(backend, storage_dir, passphrase)
        elif passphrase:
            _check_passphrase_once(backend, storage_dir, uuid, master, passphrase, strict=strict_passphrase)
        keys = crypto.MasterKeys(master)
        config, damaged = _choose_config(configs, keys, storage_dir)
        damaged.update(_check_keyfiles(backend, keys))
        if host.load(config["uuid"]) is None:
            host.store(config["uuid"], master)
        vault = cls(backend, home, keys, config, cache_name)
        vault.damaged_copies = damaged
        for problem in damaged.values():
            if problem:  # a missing copy (a vault from before the copies) is written quietly
                log.warning("vault %s: %s (see vmvault vault verify)", storage_dir, problem)
        return vault

    def check_passphrase(self, passphrase: str) -> None:
        """AuthenticationError unless the passphrase opens a copy of this vault's key file."""
        master = _unlock(self.backend, self.storage_dir, passphrase)
        if master != self.keys.master:
            raise AuthenticationError(f"the key file of the vault at {self.storage_dir} is not this vault's")

    def change_passphrase(self, new_passphrase: str) -> None:
        """Re-wrap the master key under a new passphrase (current KDF), both copies; data is untouched."""
        data = keyfile.make_keyfile(self.keys.master, self.uuid, new_passphrase)
        _put_copies(self.backend, keyfile.KEYFILE_NAMES, data)
        for name in keyfile.KEYFILE_NAMES:
            self.damaged_copies.pop(name, None)
        _forget_checks(self.uuid)

    # ---- writing: heal copies, start the record chain ------------------------------------------
    def prepare_write(self) -> None:
        """Before this process first changes the vault: heal damaged copies, gain missing features."""
        with self._write_lock:
            if self._write_ready:
                return
            self._heal_copies()
            if seqchain.FEATURE not in self.features:
                # An older vault: start its chain with the points present now (docs/format.md).
                if not self.chain.exists():
                    self.chain.genesis({k: v or "" for k, v in seqchain.manifest_digests(self).items()})
                self._write_config({**self.config, "features": sorted({*self.features, *FEATURES})})
            self._write_ready = True

    def _heal_copies(self) -> None:
        if any(name in CONFIG_NAMES for name in self.damaged_copies):
            self._write_config(self.config)
        bad_keys = [n for n in keyfile.KEYFILE_NAMES if n in self.damaged_copies]
        good = [n for n in keyfile.KEYFILE_NAMES if n not in self.damaged_copies]
        if bad_keys and good:
            data = self.backend.get(good[0])
            _put_copies(self.backend, bad_keys, data)
            for name in bad_keys:
                self.damaged_copies.pop(name, None)

    def _write_config(self, config: dict[str, Any]) -> None:
        doc = {k: v for k, v in config.items() if k != "mac"}
        doc["mac"] = self.keys.mac(keyfile.canonical(doc))
        _put_copies(self.backend, CONFIG_NAMES, _config_bytes(doc))
        self.config = doc
        for name in CONFIG_NAMES:
            self.damaged_copies.pop(name, None)

    def audit_chain(self) -> seqchain.Audit:
        """The record chain against the manifests present (problems: signs of tampering)."""
        if seqchain.FEATURE not in self.features and not self.chain.exists():
            out = seqchain.Audit()
            out.notes.append("the vault has no record chain yet: it starts with the next backup or deletion")
            return out
        return self.chain.audit(seqchain.manifest_digests(self))

    def recorded_points(self) -> seqchain.Recorded | None:
        """What the record chain says of each point; None for an older vault that has no chain yet."""
        if seqchain.FEATURE not in self.features and not self.chain.exists():
            return None
        return self.chain.recorded()

    def manifest_digest(self, rp_id: str) -> str:
        """SHA-256 of the manifest's authenticated payload (what the record chain records)."""
        name = self.manifest_name(rp_id)
        return seqchain.digest(unseal(self.keys, name, self.backend.get(name)))

    def refuse_if_tampered(self, action: str) -> None:
        audit = self.audit_chain()
        if audit.problems:
            more = f" (and {len(audit.problems) - 1} more)" if len(audit.problems) > 1 else ""
            raise IntegrityError(
                f"{action} refused: the vault at {self.storage_dir} was changed outside vmvault: "
                f"{audit.problems[0]}{more}",
                hint="run 'vmvault vault verify' for the full list; check who has write access to the storage",
            )

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
        present = {info.name for info in self.backend.list("index") if not _is_tmp(info.name)}
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
            info.name
            for top in ("data", "tree")
            for info in self.backend.list(top)
            if not _is_tmp(info.name) and not self.index.has_pack(info.name)
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

    def authenticate_pack(self, pack: str, fetched: FetchedEnds | None = None) -> None:
        """Check a pack's header, table of contents and index file (once per pack per process).

        Blobs are authenticated on every read anyway; this makes a restore also refuse a pack
        whose other parts are damaged, so damage anywhere in what a point uses is reported.
        `fetched`: the header and trailer of the whole object, as a restore's whole-pack read
        found them, used instead of two more reads.
        """
        with self._checked_lock:
            if pack in self._checked_packs:
                return
            # One check per pack: the restore's workers that need it meanwhile wait for it
            # instead of each making the same three requests.
            pack_lock = self._checking.setdefault(pack, threading.Lock())
        with pack_lock:
            with self._checked_lock:
                if pack in self._checked_packs:
                    return
            self._authenticate_pack(pack, fetched)
            with self._checked_lock:
                self._checked_packs.add(pack)
                self._checking.pop(pack, None)

    def _authenticate_pack(self, pack: str, fetched: FetchedEnds | None) -> None:
        known = self.index.pack_entries(pack)
        index_name = self.index.index_file_of(pack)
        if known is None or index_name is None:
            raise IntegrityError(f"pack {pack} is not in the vault's index", hint="run 'vmvault vault verify'")
        salt, entries = known
        trailer_at = max((e.offset + e.length for e in entries), default=HEADER_LEN)
        tail_len = ENTRY.size * len(entries) + TAG_LEN + 12
        if fetched is None:
            header = self.backend.get(pack, 0, HEADER_LEN)
            tail = self.backend.get(pack, trailer_at, tail_len)
        else:  # the same two ranges, as a read of the whole object found them
            header, tail = fetched.header, fetched.tail
            if fetched.size != trailer_at + tail_len or len(tail) != tail_len:
                raise IntegrityError(f"pack {pack} is damaged: it is not the length its index gives",
                                     hint="run 'vmvault vault verify'")  # fmt: skip
        if header != PACK_MAGIC + salt:
            raise IntegrityError(f"pack {pack} is damaged: bad header", hint="run 'vmvault vault verify'")
        _salt, listed = read_trailer(self.keys, pack, header + tail)
        indexed = parse_index_payload(unseal(self.keys, index_name, self.backend.get(index_name)))
        if set(listed) != set(entries) or set(indexed[2]) != set(entries) or indexed[1] != salt:
            raise IntegrityError(f"pack {pack} does not match its index file {index_name}")

    # ---- blobs --------------------------------------------------------------------------------
    def read_blob(self, loc: Location) -> bytes:
        self.authenticate_pack(loc.pack)
        stored = self.backend.get(loc.pack, loc.ref.offset, loc.ref.length)
        return decode_blob(self.keys, loc.salt, loc.ref, stored, f"pack {loc.pack}")

    def read_blob_from(self, loc: Location, stored: bytes | memoryview) -> bytes:
        """Decode a blob whose stored bytes were already fetched (batched reads on restore)."""
        self.authenticate_pack(loc.pack)
        return self.decode_fetched(loc, stored)

    def decode_fetched(self, loc: Location, stored: bytes | memoryview) -> bytes:
        """Decode (authenticate: AES-GCM, then its ID re-hashed) a fetched blob without waiting for
        its pack's check: for a caller that runs authenticate_pack itself and fails unless it
        passed (the restore's pipeline, engine/restore.py)."""
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
        """Intent record, manifest (create-only), publish record (docs/format.md, "Record chain")."""
        name = self.manifest_name(manifest.rp_id)
        if self.backend.exists(name):
            raise AlreadyExists(f"recovery point {manifest.rp_id} already exists in vault {self.storage_dir}")
        self.prepare_write()
        payload = manifest.to_json()
        points = {manifest.rp_id: seqchain.digest(payload)}
        self.chain.append("intent", points)
        objlock.check_held(self.storage_dir)  # a lost lease (object storage): a sweep may be running
        self.backend.put_if_absent(name, seal(self.keys, name, payload))
        self.chain.append("publish", points)

    def read_manifest(self, rp_id: str) -> RecoveryPointManifest:
        name = self.manifest_name(rp_id)
        if not self.backend.exists(name):
            raise NotFound(f"recovery point {rp_id} is not in the vault at {self.storage_dir}")
        payload = unseal(self.keys, name, self.backend.get(name))
        try:
            return RecoveryPointManifest.from_json(payload)
        except UntrustedName as exc:  # authentic, so not damage: its author wrote it so
            raise HostileContent(
                f"vault file {name} holds a name user input could not have given: {exc}",
                hint="a vault's author chooses every byte of it: do not trust this vault",
            ) from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"vault file {name} is damaged: {exc}") from exc

    def list_recovery_points(self) -> list[str]:
        return sorted(info.name.split("/", 1)[1] for info in self.backend.list("points"))

    def delete_manifest(self, rp_id: str, reason: str = "retention") -> None:
        """Deletion record, then the manifest; a manifest already gone is not recorded (NotFound)."""
        name = self.manifest_name(rp_id)
        if not self.backend.exists(name):
            # Never record the deletion of what is already missing: that would hide tampering.
            raise NotFound(f"recovery point {rp_id} is not in the vault at {self.storage_dir}")
        self.prepare_write()
        self.chain.append("delete", {rp_id: ""}, reason)
        self.backend.delete(name)


# ---- the two copies of config and keys/passphrase (docs/format.md, "Copies") -------------------


def _config_bytes(config: dict[str, Any]) -> bytes:
    return json.dumps(config, indent=1, sort_keys=True).encode()


def _put_copies(backend: Backend, names: tuple[str, ...] | list[str], data: bytes) -> None:
    for name in names:
        backend.put(name, data)


def _read_configs(backend: Backend, storage_dir: str) -> dict[str, dict[str, Any] | str]:
    """Each copy of the config: its document, or why it cannot be used (not yet authenticated)."""
    found: dict[str, dict[str, Any] | str] = {}
    for name in CONFIG_NAMES:
        try:
            config = json.loads(backend.get(name))
            if not isinstance(config, dict) or config.get("format") != "vmvault-vault":
                raise ValueError("not a vmvault config")
            if not isinstance(config.get("uuid"), str):
                raise ValueError("no vault uuid")
            found[name] = config
        except ObjectNotFound:
            found[name] = ""
        except ValueError as exc:
            found[name] = f"vault file {name} in {storage_dir} is damaged: {exc}"
    usable = [c for c in found.values() if isinstance(c, dict)]
    if not usable:
        if not any(found.values()):
            raise NotFound(
                f"no vault at {storage_dir}", hint="check the path, or create one with 'vmvault vault create'"
            )
        raise IntegrityError("; ".join(str(v) for v in found.values() if v))
    for config in usable:
        if config.get("version") != FORMAT_VERSION:
            raise InvalidInput(
                f"vault at {storage_dir} has format version {config.get('version')}; "
                f"this vmvault reads version {FORMAT_VERSION}",
                hint="upgrade vmvault",
            )
    return found


def _host_master(host: keyfile.HostKeys, configs: dict[str, dict[str, Any] | str]) -> tuple[str, bytes | None]:
    """(uuid, master key) from this host's keys, trying each copy's uuid (one may be damaged)."""
    uuids = [str(c["uuid"]) for c in configs.values() if isinstance(c, dict)]
    for uuid in dict.fromkeys(uuids):
        master = host.load(uuid)
        if master is not None:
            return uuid, master
    return uuids[0], None


def _choose_config(
    configs: dict[str, dict[str, Any] | str], keys: crypto.MasterKeys, storage_dir: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """The first copy whose MAC the master key confirms; the others are reported as damaged."""
    chosen: dict[str, Any] | None = None
    damaged: dict[str, str] = {}
    for name, config in configs.items():
        if isinstance(config, dict) and keys.check_mac(keyfile.canonical(config), str(config.get("mac", ""))):
            if chosen is None:
                chosen = config
            continue
        damaged[name] = config if isinstance(config, str) else (
            f"vault file {name} in {storage_dir} is damaged: its MAC does not match"
        )
    if chosen is None:
        raise IntegrityError(
            f"vault file {CONFIG_NAME} in {storage_dir} is damaged: its MAC does not match "
            f"(and so does {CONFIG_COPY})",
            hint="both copies of the vault's config are damaged: restore them from a copy of the vault",
        )
    for name in CONFIG_NAMES:  # a sound copy that differs from the chosen one (an older config)
        other = configs.get(name)
        if isinstance(other, dict) and name not in damaged and other != chosen:
            damaged[name] = f"vault file {name} in {storage_dir} differs from its other copy"
    return chosen, damaged


def _check_keyfiles(backend: Backend, keys: crypto.MasterKeys) -> dict[str, str]:
    """Damaged or missing copies of the key file (the host key opened the vault: none is fatal)."""
    damaged: dict[str, str] = {}
    for name in keyfile.KEYFILE_NAMES:
        try:
            keyfile.check_keyfile(backend.get(name), keys, name)
        except ObjectNotFound:
            damaged[name] = ""
        except IntegrityError as exc:
            damaged[name] = exc.message
    return damaged


def _key_copies(backend: Backend) -> dict[str, bytes | None]:
    copies: dict[str, bytes | None] = {}
    for name in keyfile.KEYFILE_NAMES:
        try:
            copies[name] = backend.get(name)
        except ObjectNotFound:
            copies[name] = None
    return copies


def _unlock(backend: Backend, storage_dir: str, passphrase: str) -> bytes:
    try:
        return keyfile.unlock_copies(_key_copies(backend), passphrase)
    except AuthenticationError as exc:
        raise AuthenticationError(
            f"wrong passphrase for the vault at {storage_dir}",
            hint="check the passphrase (VMVAULT_PASSPHRASE or --passphrase-file); nothing was changed",
        ) from exc


# Passphrases already checked against a vault in this process: {vault uuid: {sha256(passphrase): ok}}.
# Only digests are kept (never the passphrase), and only for the process's lifetime.
_CHECKED: dict[str, dict[str, bool]] = {}
_CHECKED_LOCK = threading.Lock()


def _forget_checks(vault_uuid: str) -> None:
    with _CHECKED_LOCK:
        _CHECKED.pop(vault_uuid, None)


def _check_passphrase_once(
    backend: Backend, storage_dir: str, uuid: str, master: bytes, passphrase: str, *, strict: bool
) -> None:
    """The host key opened the vault; does the given passphrase open its key file too?"""
    key = hashlib.sha256(passphrase.encode()).hexdigest()
    with _CHECKED_LOCK:
        known = _CHECKED.get(uuid, {}).get(key)
    if known is None:
        try:
            known = keyfile.unlock_copies(_key_copies(backend), passphrase) == master
        except AuthenticationError:
            known = False
        except IntegrityError as exc:
            # A damaged key file is not a wrong passphrase: the host key opens the vault, verify names it.
            log.warning("vault %s: cannot check the passphrase: %s", storage_dir, exc.message)
            return
        with _CHECKED_LOCK:
            _CHECKED.setdefault(uuid, {})[key] = known
    if known:
        return
    if strict:
        raise AuthenticationError(
            f"wrong passphrase for the vault at {storage_dir}: it does not open the vault's key file",
            hint="this host's key opens the vault, but the passphrase given (VMVAULT_PASSPHRASE or "
            "--passphrase-file) is not the one you will need without it; give the right one, or change it "
            "with 'vmvault vault change-passphrase'; nothing was changed",
        )
    log.warning("vault %s: the passphrase given does not open its key file (the host key is used)", storage_dir)

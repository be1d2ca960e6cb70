"""The local chunk index: blob ID -> (pack, offset, length), kept on disk, never all in memory.

It lives under $VMVAULT_HOME/cache/<vault uuid>/ (never in the vault) and is only a cache of the
vault's pack index files: `sync` ingests index files it has not seen and forgets packs whose
index file is gone, so it can be deleted at any time and rebuilt.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vmvault.vault.packs import BlobRef

_SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (pid INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL,
                                  index_name TEXT UNIQUE NOT NULL, salt BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (id BLOB NOT NULL, pid INTEGER NOT NULL, type INTEGER NOT NULL,
    flags INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL, plain INTEGER NOT NULL,
    PRIMARY KEY (id, pid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs (pid);
CREATE TABLE IF NOT EXISTS bad_copies (id BLOB NOT NULL, pack TEXT NOT NULL, problem TEXT NOT NULL,
    PRIMARY KEY (id, pack)) WITHOUT ROWID;
"""
# A copy of a blob is usable unless verify found it bad (self-healing, issue 18): a backup does
# not deduplicate against a bad copy, so it stores the data again; readers prefer a good copy.
_GOOD = "NOT EXISTS (SELECT 1 FROM bad_copies x WHERE x.id = b.id AND x.pack = p.name)"


@dataclass(frozen=True)
class Location:
    pack: str
    salt: bytes
    ref: BlobRef


class ChunkIndex:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._local = threading.local()
        self._write_lock = threading.Lock()
        with self._conn() as conn:
            conn.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def known_index_files(self) -> set[str]:
        return {row[0] for row in self._conn().execute("SELECT index_name FROM packs")}

    def add_pack(self, pack: str, index_name: str, salt: bytes, entries: Iterable[BlobRef]) -> None:
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO packs (name, index_name, salt) VALUES (?, ?, ?)", (pack, index_name, salt)
                )
                if cur.rowcount:
                    pid = cur.lastrowid
                    conn.executemany(
                        "INSERT OR IGNORE INTO blobs VALUES (?, ?, ?, ?, ?, ?, ?)",
                        ((e.blob_id, pid, e.type, e.flags, e.offset, e.length, e.plain_length) for e in entries),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def forget_index_files(self, index_names: Iterable[str]) -> None:
        with self._write_lock:
            conn = self._conn()
            for name in index_names:
                row = conn.execute("SELECT pid FROM packs WHERE index_name = ?", (name,)).fetchone()
                if row:
                    conn.execute("DELETE FROM blobs WHERE pid = ?", row)
                    conn.execute("DELETE FROM packs WHERE pid = ?", row)

    def contains(self, blob_id: bytes) -> bool:
        """True when the vault holds a copy of the blob not known to be bad."""
        query = f"SELECT 1 FROM blobs b JOIN packs p ON p.pid = b.pid WHERE b.id = ? AND {_GOOD} LIMIT 1"
        return self._conn().execute(query, (blob_id,)).fetchone() is not None

    # The pack's name comes from the same query (a join), not from a per-process pid cache: since
    # garbage collection forgets packs, another process may give a deleted pack's pid to a new one.
    def contains_many(self, blob_ids: list[bytes]) -> set[bytes]:
        """The subset of `blob_ids` present in the vault: one query per 500 IDs."""
        found: set[bytes] = set()
        for i in range(0, len(blob_ids), 500):
            batch = blob_ids[i : i + 500]
            marks = ",".join("?" * len(batch))
            query = f"SELECT b.id FROM blobs b JOIN packs p ON p.pid = b.pid WHERE b.id IN ({marks}) AND {_GOOD}"
            found.update(row[0] for row in self._conn().execute(query, batch))
        return found

    def lookup(self, blob_id: bytes) -> Location | None:
        query = (
            "SELECT p.name, p.salt, b.type, b.flags, b.offset, b.length, b.plain FROM blobs b "
            f"JOIN packs p ON p.pid = b.pid WHERE b.id = ? ORDER BY {_GOOD} DESC LIMIT 1"
        )
        row = self._conn().execute(query, (blob_id,)).fetchone()
        if row is None:
            return None
        return Location(row[0], row[1], BlobRef(blob_id, row[2], row[3], row[4], row[5], row[6]))

    def lookup_many(self, blob_ids: list[bytes]) -> dict[bytes, Location]:
        found: dict[bytes, Location] = {}
        for i in range(0, len(blob_ids), 500):
            batch = list(set(blob_ids[i : i + 500]))
            marks = ",".join("?" * len(batch))
            rows = self._conn().execute(  # bad copies first: a good one, listed later, wins
                "SELECT b.id, p.name, p.salt, b.type, b.flags, b.offset, b.length, b.plain FROM blobs b "
                f"JOIN packs p ON p.pid = b.pid WHERE b.id IN ({marks}) ORDER BY {_GOOD}",
                batch,
            )
            for row in rows:
                found[row[0]] = Location(row[1], row[2], BlobRef(row[0], row[3], row[4], row[5], row[6], row[7]))
        return found

    def replace_bad_copies(self, copies: Iterable[tuple[bytes, str, str]]) -> None:
        """The copies (blob id, pack, problem) a vault-wide verify found bad: the whole set."""
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM bad_copies")
                conn.executemany("INSERT OR IGNORE INTO bad_copies VALUES (?, ?, ?)", copies)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def add_bad_copy(self, blob_id: bytes, pack: str, problem: str) -> None:
        """One bad copy found outside a verify (a restore); the next vault-wide verify decides again."""
        with self._write_lock:
            self._conn().execute("INSERT OR IGNORE INTO bad_copies VALUES (?, ?, ?)", (blob_id, pack, problem))

    def bad_copies(self) -> list[tuple[bytes, str]]:
        return [(r[0], r[1]) for r in self._conn().execute("SELECT id, pack FROM bad_copies")]

    def unhealed_bad_ids(self) -> set[bytes]:
        """Blobs verify found bad of which the vault holds no good copy (small: damage is rare)."""
        ids = list({blob for blob, _pack in self.bad_copies()})
        return set(ids) - self.contains_many(ids) if ids else set()

    def is_bad_copy(self, blob_id: bytes, pack: str) -> bool:
        query = "SELECT 1 FROM bad_copies WHERE id = ? AND pack = ?"
        return self._conn().execute(query, (blob_id, pack)).fetchone() is not None

    def iter_packs(self) -> Iterator[tuple[str, str]]:
        yield from self._conn().execute("SELECT name, index_name FROM packs ORDER BY pid")

    # ---- for garbage collection (vault/gc.py) ----------------------------------------------------
    def has_pack(self, pack: str) -> bool:
        return self._conn().execute("SELECT 1 FROM packs WHERE name = ?", (pack,)).fetchone() is not None

    def pack_entries(self, pack: str) -> tuple[bytes, list[BlobRef]] | None:
        """The salt and blob table of an indexed pack, in offset order; None when not indexed."""
        conn = self._conn()
        row = conn.execute("SELECT pid, salt FROM packs WHERE name = ?", (pack,)).fetchone()
        if row is None:
            return None
        rows = conn.execute(
            "SELECT id, type, flags, offset, length, plain FROM blobs WHERE pid = ? ORDER BY offset", (row[0],)
        )
        return row[1], [BlobRef(*r) for r in rows]

    def pack_ends(self, packs: list[str]) -> dict[str, int]:
        """Where each indexed pack's last blob ends (its table of contents follows)."""
        ends: dict[str, int] = {}
        for i in range(0, len(packs), 500):
            batch = list(set(packs[i : i + 500]))
            marks = ",".join("?" * len(batch))
            rows = self._conn().execute(
                "SELECT p.name, MAX(b.offset + b.length) FROM packs p JOIN blobs b ON b.pid = p.pid "
                f"WHERE p.name IN ({marks}) GROUP BY p.pid",
                batch,
            )
            ends.update((str(name), int(end)) for name, end in rows)
        return ends

    def index_file_of(self, pack: str) -> str | None:
        row = self._conn().execute("SELECT index_name FROM packs WHERE name = ?", (pack,)).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

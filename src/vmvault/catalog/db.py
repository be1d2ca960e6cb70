"""Opening the catalog: SQLite in WAL mode, short transactions, migrations only when needed.

Every connection gets ``busy_timeout`` 30 s and foreign keys. pysqlite's own transaction
handling is switched off so SQLAlchemy emits ``BEGIN`` itself: reads use a deferred ``BEGIN``
(WAL readers never block), writes use ``BEGIN IMMEDIATE`` so a check-then-insert in one write
transaction is atomic across processes.
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import Session

from vmvault.errors import Busy, StorageError, VmvaultError

BUSY_TIMEOUT_MS = 30_000
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_REVISION_RE = re.compile(r'^(down_revision|revision)\s*(?::[^=]*)?=\s*["\']?([\w-]+|None)["\']?', re.MULTILINE)


@functools.cache
def head_revision() -> str:
    """The newest revision, read from the version files with a regex (no Alembic import on start-up).

    check_single_head() (run by the tests) confirms it against Alembic's own view.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        fields = dict(_REVISION_RE.findall(path.read_text()))
        if "revision" in fields:
            revisions.add(fields["revision"])
            if fields.get("down_revision", "None") != "None":
                parents.add(fields["down_revision"])
    heads = sorted(revisions - parents)
    if len(heads) != 1:
        raise RuntimeError(f"catalog migrations have {len(heads)} heads ({', '.join(heads)}); merge them")
    return heads[0]
_IMMEDIATE = "vmvault_immediate"


def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # SQLAlchemy's "begin" event issues BEGIN itself
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA foreign_keys = ON")
    finally:
        cur.close()


def _on_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(_IMMEDIATE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_engine(db_path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{db_path}", connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "begin", _on_begin)
    return engine


def alembic_config(connection: Connection | None = None) -> Any:
    """An Alembic Config built in code (no alembic.ini needed at run time)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def alembic_heads() -> list[str]:
    from alembic.script import ScriptDirectory

    return list(ScriptDirectory.from_config(alembic_config()).get_heads())


def check_single_head() -> str:
    """The single Alembic head; raises if the history forked or the version files disagree with Alembic."""
    heads = alembic_heads()
    if len(heads) != 1:
        raise RuntimeError(f"catalog migrations have {len(heads)} heads ({', '.join(heads)}); merge them")
    if heads[0] != head_revision():
        raise RuntimeError(f"Alembic's head is {heads[0]} but the version files say {head_revision()}")
    return heads[0]


def current_revision(conn: Connection) -> str | None:
    """The revision stamped in the catalog: one indexed read, no Alembic import."""
    exists = conn.execute(text("SELECT 1 FROM sqlite_master WHERE type='table' AND name='alembic_version'")).first()
    if exists is None:
        return None
    row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    return None if row is None else str(row[0])


def _upgrade(conn: Connection) -> None:
    from alembic import command
    from alembic.util.exc import CommandError

    try:
        command.upgrade(alembic_config(conn), "head")
    except CommandError as exc:
        raise StorageError(
            f"the catalog database has a schema this vmvault does not know ({exc})",
            hint="upgrade vmvault, or point --home at another directory",
        ) from exc


def _private(db_path: Path) -> None:
    """The home 0700 and the catalog 0600 (token hashes, paths, jobs): other local users read neither.

    The file is created 0600 before SQLite opens it; its -wal and -shm files take the same mode.
    """
    os.chmod(db_path.parent, 0o700)
    os.close(os.open(db_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    os.chmod(db_path, 0o600)


class Catalog:
    """The catalog database of one vmvault home."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.engine = make_engine(db_path)
        self._write_engine = self.engine.execution_options(**{_IMMEDIATE: True})

    @classmethod
    def open(cls, db_path: Path) -> Catalog:
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _private(db_path)
        except OSError as exc:
            raise StorageError(
                f"cannot create the vmvault home {db_path.parent}: {exc.strerror}",
                hint="set VMVAULT_HOME or --home to a writable directory",
            ) from exc
        catalog = cls(db_path)
        try:
            catalog.ensure_schema()
        except DatabaseError as exc:
            catalog.close()
            raise StorageError(
                f"cannot open the catalog {db_path}: {exc.orig}",
                hint="check that the file is a vmvault catalog and its directory is writable",
            ) from exc
        return catalog

    def ensure_schema(self) -> None:
        """Upgrade to head only when the stamped revision differs (checked again under the write lock)."""
        with self.engine.connect() as conn:
            if current_revision(conn) == head_revision():
                return
        with self._write_engine.begin() as conn:
            if current_revision(conn) != head_revision():
                _upgrade(conn)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read transaction (deferred BEGIN)."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A short write transaction (BEGIN IMMEDIATE); commits on success."""
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()


def translate_db_error(exc: BaseException) -> VmvaultError | None:
    """A user-facing error for a catalog failure that escaped a use case (locked or damaged catalog)."""
    if not isinstance(exc, DatabaseError):
        return None
    detail = str(exc.orig) if exc.orig is not None else str(exc)
    if isinstance(exc, OperationalError) and "locked" in detail:
        return Busy(
            f"the catalog is locked by another vmvault process ({detail})",
            hint="retry when the other vmvault command has finished",
        )
    return StorageError(
        f"the catalog database failed: {detail}",
        hint="check the disk holding the vmvault home; the catalog can be rebuilt with: vmvault vault import",
    )

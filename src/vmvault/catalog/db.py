"""Opening the catalog: SQLite (the default) or PostgreSQL, short transactions, migrations only when needed.

SQLite: every connection gets ``busy_timeout`` 30 s and foreign keys. pysqlite's own transaction
handling is switched off so SQLAlchemy emits ``BEGIN`` itself: reads use a deferred ``BEGIN``
(WAL readers never block), writes use ``BEGIN IMMEDIATE`` so a check-then-insert in one write
transaction is atomic across processes.

PostgreSQL (``--catalog postgresql://...`` or ``VMVAULT_CATALOG``, driver psycopg 3): reads are
READ COMMITTED transactions; a write() transaction first takes a transaction-scoped advisory lock
(pg_advisory_xact_lock), the same guarantee as SQLite's BEGIN IMMEDIATE, so every check-then-write
of the service layer keeps its meaning on a shared catalog. The hot paths (claiming a queued job
with SELECT ... FOR UPDATE SKIP LOCKED, progress and heartbeats) use update(), which touches only
its own rows and does not take that lock. Migrations run under another advisory lock, in one
transaction (PostgreSQL's DDL is transactional).
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
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError
from sqlalchemy.orm import Session

from vmvault.errors import Busy, InvalidInput, StorageError, VmvaultError

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
# Keys of PostgreSQL advisory locks (one 64-bit key space per database): "vmvault" + a role byte.
PG_WRITE_LOCK = 0x766D7661756C7401  # write(): one writer at a time, like SQLite's BEGIN IMMEDIATE
PG_MIGRATE_LOCK = 0x766D7661756C7402  # ensure_schema(): one migration at a time
PG_LEADER_LOCK = 0x766D7661756C7403  # the scheduling server (service/leader.py)
PG_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")


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


def check_catalog_url(url: str, *, from_argument: bool = False) -> str:
    """A PostgreSQL catalog URL, checked; from_argument: refuse a password (it would show in ps)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidInput(
            "the catalog URL is not a URL", hint="give postgresql://USER@HOST:PORT/DATABASE"
        ) from None
    if parsed.drivername not in PG_SCHEMES:
        raise InvalidInput(
            f"unsupported catalog URL scheme '{parsed.drivername}'",
            hint="give postgresql://USER@HOST:PORT/DATABASE (without --catalog the catalog is SQLite in the home)",
        )
    if from_argument and parsed.password:
        raise InvalidInput(
            "--catalog must not carry a password: process arguments are visible to every local user",
            hint="put the password in a PGPASSFILE (or ~/.pgpass), or the whole URL in VMVAULT_CATALOG",
        )
    return url


def display_url(url: str) -> str:
    """The catalog URL without its password (for logs and errors)."""
    try:
        return make_url(url).set(drivername="postgresql").render_as_string(hide_password=True)
    except ArgumentError:
        return "(invalid URL)"


def make_pg_engine(url: str) -> Engine:
    """A psycopg 3 engine; keepalives so a dead peer is noticed (the leader lock rides on a connection)."""
    parsed = make_url(url).set(drivername="postgresql+psycopg")
    return create_engine(
        parsed,
        pool_pre_ping=True,
        pool_size=8,
        max_overflow=16,
        connect_args={
            "application_name": "vmvault",
            "connect_timeout": 10,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        },
    )


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
    if conn.dialect.name == "postgresql":
        exists = conn.execute(text("SELECT to_regclass('alembic_version')")).scalar()
    else:
        exists = conn.execute(
            text("SELECT 1 FROM sqlite_master WHERE type='table' AND name='alembic_version'")
        ).first()
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
    """The catalog database of one vmvault home (SQLite), or a PostgreSQL catalog shared by servers."""

    def __init__(self, db_path: Path | None = None, *, url: str | None = None) -> None:
        self.db_path = db_path
        self.url = url
        if url is not None:
            self.engine = make_pg_engine(url)
            self._write_engine = self.engine
        else:
            assert db_path is not None
            self.engine = make_engine(db_path)
            self._write_engine = self.engine.execution_options(**{_IMMEDIATE: True})

    def __repr__(self) -> str:
        return f"Catalog({self.where})"  # never the password

    @property
    def shared(self) -> bool:
        """A PostgreSQL catalog: other servers (other hosts) may use it at the same time."""
        return self.url is not None

    @property
    def where(self) -> str:
        """The catalog for messages: the SQLite file, or the PostgreSQL URL without its password."""
        return display_url(self.url) if self.url is not None else str(self.db_path)

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
        return cls(db_path)._opened()

    @classmethod
    def open_url(cls, url: str) -> Catalog:
        """Open (and if needed migrate) a PostgreSQL catalog."""
        return cls(url=check_catalog_url(url))._opened()

    def _opened(self) -> Catalog:
        try:
            self.ensure_schema()
        except DatabaseError as exc:
            self.close()
            hint = (
                "check that PostgreSQL runs, the database exists and the user may connect (password in "
                "PGPASSFILE or VMVAULT_CATALOG)"
                if self.shared
                else "check that the file is a vmvault catalog and its directory is writable"
            )
            raise StorageError(f"cannot open the catalog {self.where}: {_detail(exc)}", hint=hint) from exc
        return self

    def ensure_schema(self) -> None:
        """Upgrade to head only when the stamped revision differs (checked again under the write lock)."""
        with self.engine.connect() as conn:
            if current_revision(conn) == head_revision():
                return
        with self._write_engine.begin() as conn:
            if self.shared:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATE_LOCK})
            if current_revision(conn) != head_revision():
                _upgrade(conn)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read transaction (deferred BEGIN)."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A short write transaction, one writer at a time (SQLite: BEGIN IMMEDIATE; PostgreSQL: an
        advisory transaction lock); commits on success."""
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            if self.shared:
                session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_WRITE_LOCK})
            yield session

    @contextmanager
    def update(self) -> Iterator[Session]:
        """A write transaction that only touches rows it names (row locks suffice): on PostgreSQL it
        does not wait for other writers. SQLite has one writer at a time anyway (BEGIN IMMEDIATE)."""
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    def dedicated_connection(self) -> Any:
        """PostgreSQL: a psycopg connection of its own, in autocommit, outside the pool (LISTEN, and the
        session advisory lock of the scheduling server live as long as it does)."""
        import psycopg

        assert self.url is not None, "a dedicated connection exists only on a PostgreSQL catalog"
        conninfo = make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)
        return psycopg.connect(
            conninfo,
            autocommit=True,
            application_name="vmvault",
            connect_timeout=10,
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )

    def close(self) -> None:
        self.engine.dispose()


def _detail(exc: DatabaseError) -> str:
    """The driver's message (never SQLAlchemy's, which may quote statements and parameters)."""
    return str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__


def translate_db_error(exc: BaseException) -> VmvaultError | None:
    """A user-facing error for a catalog failure that escaped a use case (locked or damaged catalog)."""
    if not isinstance(exc, DatabaseError):
        return None
    detail = _detail(exc)
    if type(exc.orig).__module__.startswith("psycopg"):
        return _translate_pg_error(exc, detail)
    if isinstance(exc, OperationalError) and "locked" in detail:
        return Busy(
            f"the catalog is locked by another vmvault process ({detail})",
            hint="retry when the other vmvault command has finished",
        )
    return StorageError(
        f"the catalog database failed: {detail}",
        hint="check the disk holding the vmvault home; the catalog can be rebuilt with: vmvault vault import",
    )


def _translate_pg_error(exc: DatabaseError, detail: str) -> VmvaultError:
    sqlstate = str(getattr(exc.orig, "sqlstate", "") or "")
    if sqlstate in ("40001", "40P01", "55P03"):  # serialization failure, deadlock, lock not available
        return Busy(f"the catalog is busy ({detail})", hint="retry the command")
    if isinstance(exc, OperationalError):
        return StorageError(
            f"the PostgreSQL catalog is unreachable: {detail}",
            hint="check that PostgreSQL runs and the catalog URL (VMVAULT_CATALOG or --catalog); then retry",
        )
    return StorageError(
        f"the catalog database failed: {detail}",
        hint="check the PostgreSQL server's log; the catalog can be rebuilt with: vmvault vault import",
    )

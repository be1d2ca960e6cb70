"""The catalog's Alembic history has exactly one head, and a new catalog is stamped with it.

Every test that touches a database runs twice: on SQLite (a file in the home) and on a real
PostgreSQL 15 (an empty database of the session's server, tests/pgserver.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, text

from pgserver import PgServer
from vmvault.catalog import db


@dataclass
class Target:
    """An empty catalog database: a SQLite file, or an empty PostgreSQL database."""

    path: Path
    url: str | None

    def engine(self) -> Engine:
        return db.make_pg_engine(self.url) if self.url else db.make_engine(self.path)

    def open(self) -> db.Catalog:
        return db.Catalog.open_url(self.url) if self.url else db.Catalog.open(self.path)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    home = tmp_path / "home"
    home.mkdir()
    url = None
    if request.param == "postgresql":
        server: PgServer = request.getfixturevalue("pg_server")
        url = server.new_database(empty=True)
    yield Target(home / "catalog.db", url)


def test_migrations_have_a_single_head() -> None:
    heads = db.alembic_heads()
    assert len(heads) == 1, f"the catalog migrations forked: heads {heads}; add a merge revision"
    assert db.check_single_head() == heads[0] == db.head_revision()


def test_new_catalog_is_at_head(target: Target) -> None:
    catalog = target.open()
    try:
        with catalog.engine.connect() as conn:
            assert db.current_revision(conn) == db.head_revision()
            tables = set(inspect(conn).get_table_names())
        assert {"vaults", "vms", "jobs", "recovery_points"} <= tables
        # Opening again must not migrate or fail.
        catalog.ensure_schema()
    finally:
        catalog.close()


def test_0007_records_disk_formats_without_reading_any_image(target: Target) -> None:
    """Formats come from what `vm add` stored in the definition, never from the images; else unknown."""
    import json

    from alembic import command

    engine = target.engine()
    with engine.begin() as conn:
        command.upgrade(db.alembic_config(conn), "0006")
        for vm_id, disks, definition in [
            ("a", [{"name": "disk0", "path": "/nonexistent/a.raw"}, {"name": "disk1", "path": "/nonexistent/b"}],
             {"disks": [{"name": "disk0", "format": "raw"}, {"name": "disk1", "format": "qcow2"}]}),
            ("b", [{"name": "disk0", "path": "/nonexistent/c"}], {}),
        ]:  # fmt: skip
            conn.execute(
                text("INSERT INTO vms (id, name, kind, disks, definition, created) "
                     "VALUES (:i, :i, 'disks', :d, :f, '2026-01-01T00:00:00Z')"),
                {"i": vm_id, "d": json.dumps(disks), "f": json.dumps(definition)},
            )  # fmt: skip
    engine.dispose()
    catalog = target.open()
    try:
        with catalog.engine.connect() as conn:
            got = {r[0]: _json(r[1]) for r in conn.execute(text("SELECT id, disks FROM vms"))}
    finally:
        catalog.close()
    assert [d["format"] for d in got["a"]] == ["raw", "qcow2"]
    assert "chain" not in got["a"][1]  # recorded (or asked for) at its next backup
    assert got["b"][0]["format"] == "unknown"


def test_0008_binds_existing_scoped_tokens_to_their_vaults_uuid(target: Target) -> None:
    """Tokens made before 0008 were scoped by vault name: the migration binds them to that vault's
    UUID; a token whose vault no longer exists gets none and is refused (fails closed)."""
    from alembic import command

    from vmvault.service.context import Context
    from vmvault.service.tokens import authenticate, hash_secret
    from vmvault.settings import Settings

    home = target.path.parent
    engine = target.engine()
    with engine.begin() as conn:
        command.upgrade(db.alembic_config(conn), "0006")
        conn.execute(
            text(
                "INSERT INTO vaults (name, storage_dir, uuid, redundancy, chunk_size, created) "
                "VALUES ('main', '/x', 'uuid-main', 'LRS', 1048576, '2026-01-01T00:00:00.000000Z')"
            )
        )
        for token_id, vault in (("a" * 16, "'main'"), ("b" * 16, "'gone'"), ("c" * 16, "NULL")):
            conn.execute(
                text(
                    "INSERT INTO api_tokens (id, name, token_hash, role, vault, created) "
                    f"VALUES ('{token_id}', 't', '{hash_secret(token_id * 2)}', 'BackupReader', {vault}, "
                    "'2026-01-01T00:00:00.000000Z')"
                )
            )
    engine.dispose()
    catalog = target.open()
    try:
        with catalog.engine.connect() as conn:
            rows = dict(conn.execute(text("SELECT id, vault_uuid FROM api_tokens")).all())
        assert rows == {"a" * 16: "uuid-main", "b" * 16: None, "c" * 16: None}
        ctx = Context(settings=Settings(home=home), catalog=catalog)
        scoped = authenticate(ctx, f"vmv_{'a' * 16}_{'a' * 32}")
        assert scoped is not None and scoped.vault == "main"
        assert authenticate(ctx, f"vmv_{'b' * 16}_{'b' * 32}") is None
        unscoped = authenticate(ctx, f"vmv_{'c' * 16}_{'c' * 32}")
        assert unscoped is not None and unscoped.vault is None
    finally:
        catalog.close()


def _json(value: object) -> object:
    """A JSON column read with raw SQL: text on SQLite, already decoded by psycopg on PostgreSQL."""
    import json

    return json.loads(value) if isinstance(value, str) else value


def test_every_migration_runs_up_and_down_and_the_head_matches_the_model(target: Target) -> None:
    """Each revision upgrades one step at a time, the schema at head is the SQLAlchemy model's
    (one model for both databases), and the whole history downgrades and upgrades again."""
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from vmvault.catalog.models import Base

    script = ScriptDirectory.from_config(db.alembic_config())
    order = [rev.revision for rev in reversed(list(script.walk_revisions()))]
    engine = target.engine()
    try:
        with engine.begin() as conn:
            for revision in order:
                command.upgrade(db.alembic_config(conn), revision)
                assert db.current_revision(conn) == revision
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], f"the migrated schema differs from catalog/models.py: {diff}"
            command.downgrade(db.alembic_config(conn), "base")
            assert db.current_revision(conn) is None
            command.upgrade(db.alembic_config(conn), "head")
            assert db.current_revision(conn) == db.head_revision()
    finally:
        engine.dispose()


def test_concurrent_openers_migrate_once(target: Target) -> None:
    """Several processes opening a new catalog at once: one migrates, the others find it at head."""
    import threading

    errors: list[BaseException] = []

    def open_once() -> None:
        try:
            target.open().close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_once) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    catalog = target.open()
    try:
        with catalog.engine.connect() as conn:
            assert db.current_revision(conn) == db.head_revision()
    finally:
        catalog.close()

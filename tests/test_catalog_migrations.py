"""The catalog's Alembic history has exactly one head, and a new catalog is stamped with it."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from vmvault.catalog import db


def test_migrations_have_a_single_head() -> None:
    heads = db.alembic_heads()
    assert len(heads) == 1, f"the catalog migrations forked: heads {heads}; add a merge revision"
    assert db.check_single_head() == heads[0] == db.head_revision()


def test_new_catalog_is_at_head(tmp_path: Path) -> None:
    catalog = db.Catalog.open(tmp_path / "home" / "catalog.db")
    try:
        with catalog.engine.connect() as conn:
            assert db.current_revision(conn) == db.head_revision()
            tables = {r[0] for r in conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))}
        assert {"vaults", "vms", "jobs", "recovery_points"} <= tables
        # Opening again must not migrate or fail.
        catalog.ensure_schema()
    finally:
        catalog.close()


def test_0007_records_disk_formats_without_reading_any_image(tmp_path: Path) -> None:
    """Formats come from what `vm add` stored in the definition, never from the images; else unknown."""
    import json

    from alembic import command

    path = tmp_path / "catalog.db"
    engine = db.make_engine(path)
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
    catalog = db.Catalog.open(path)
    try:
        with catalog.engine.connect() as conn:
            got = {r[0]: json.loads(r[1]) for r in conn.execute(text("SELECT id, disks FROM vms"))}
    finally:
        catalog.close()
    assert [d["format"] for d in got["a"]] == ["raw", "qcow2"]
    assert "chain" not in got["a"][1]  # recorded (or asked for) at its next backup
    assert got["b"][0]["format"] == "unknown"


def test_0008_binds_existing_scoped_tokens_to_their_vaults_uuid(tmp_path: Path) -> None:
    """Tokens made before 0008 were scoped by vault name: the migration binds them to that vault's
    UUID; a token whose vault no longer exists gets none and is refused (fails closed)."""
    from alembic import command

    from vmvault.service.context import Context
    from vmvault.service.tokens import authenticate, hash_secret
    from vmvault.settings import Settings

    home = tmp_path / "home"
    home.mkdir()
    engine = db.make_engine(home / "catalog.db")
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
    catalog = db.Catalog.open(home / "catalog.db")
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

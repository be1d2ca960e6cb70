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

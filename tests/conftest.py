"""Shared fixtures. Helpers live in helpers.py; nothing here is mocked."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import objstores
import pgserver
from helpers import BIG_IMAGE_SIZE, SMALL_IMAGE_SIZE, Cli, build_image
from pgserver import PgServer
from xdist_groups import (  # noqa: F401  (hooks: two tests at a time, docs/testing.md)
    pytest_collection_modifyitems,
    pytest_configure,
)

# A suite started in the background by a non-interactive shell (`make test &`, a detached CI
# step) inherits SIGINT *ignored*, and so would every vmvault the tests start: the tests of Ctrl-C
# (a cancelled backup) would send a signal no one hears (seen: `(bash .ci/run > log &)` failed
# test_an_interrupted_backup_loses_no_change). An ignored signal stays ignored in a new program, a
# handled one is reset to its default: handle it here, in the runner and in each xdist worker.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def big_image() -> Path:
    """512 MiB + 12345 bytes of realistic content (GPT + ext4 with system files and random data)."""
    return build_image(BIG_IMAGE_SIZE, seed=1)


@pytest.fixture(scope="session")
def small_image() -> Path:
    """48 MiB + 12345 bytes of the same kind, for tests that need many vaults or many restores."""
    return build_image(SMALL_IMAGE_SIZE, seed=2)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """A CLI driver on an empty home of its own."""
    return Cli(home=tmp_path / "home")


# ---- catalogs: SQLite (the default) and a real PostgreSQL 15 --------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A private PostgreSQL 15 for the session (initdb into a temporary directory; stopped at the end)."""
    why = pgserver.available()
    if why is not None:
        pytest.fail(why)
    server = PgServer().start()
    try:
        server.migrate_template()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[objstores.Server]:
    """One Azurite blob service for the session (tests use fresh containers in it)."""
    server = objstores.start_azurite(tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest) -> str | None:
    """Run the test on both catalogs: None (SQLite in the home) or the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    server: PgServer = request.getfixturevalue("pg_server")
    return server.new_database()


@pytest.fixture
def catalog_cli(tmp_path: Path, catalog_url: str | None) -> Cli:
    """A CLI driver on an empty home, once on SQLite and once on PostgreSQL (URL in VMVAULT_CATALOG)."""
    env = {"VMVAULT_CATALOG": catalog_url} if catalog_url else {}
    return Cli(home=tmp_path / "home", extra_env=env)


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[objstores.Server]:
    """One moto S3 server for the session (tests use fresh buckets in it)."""
    server = objstores.start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["local", "azure", "s3"])
def any_storage(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh vault location on each backend: a directory, an Azurite container, a moto bucket.

    The object stores' credentials are set in this process's environment (children inherit
    them); Cli subprocesses get them through objstores.cli_env(location)."""
    kind = str(request.param)
    if kind == "local":
        return str(tmp_path / "vault")
    server: objstores.Server = request.getfixturevalue("azurite" if kind == "azure" else "moto_s3")
    for var, value in server.env.items():
        monkeypatch.setenv(var, value)
    return objstores.fresh_azure_url() if kind == "azure" else objstores.fresh_s3_url()

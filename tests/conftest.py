"""Shared fixtures. Helpers live in helpers.py; nothing here is mocked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import objstores
import pgserver
from helpers import BIG_IMAGE_SIZE, SMALL_IMAGE_SIZE, Cli, build_image
from pgserver import PgServer


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


# ---- two tests at a time: pytest-xdist, `-n 2 --dist loadgroup` (Makefile; docs/testing.md) ------------------
#
# With --dist loadgroup every test is its own unit of work unless it carries @pytest.mark.xdist_group(NAME):
# the tests of one group run on one worker, one after another. Two kinds of groups:
# - a module whose tests share a module- or class-scoped fixture (a booted guest, a backed-up vault, a
#   server's world) is one group named after the module, added here, so that fixture is built once, not
#   once per worker (a module that names a group of its own keeps it);
# - groups named in the test files for tests that must not overlap (see docs/testing.md, "Two at a time").

_SHARED_SCOPES = ("module", "class", "package")

# Seconds a file's tests took in a whole run (the largest first): under xdist the queue is handed out in
# this order (longest first), so the two workers end near the same time instead of one waiting for the
# other's last long scenario. Measured on this 2-core machine; a file not listed comes after, in its order.
SLOW_FILES: dict[str, float] = {
    "test_pg_quiesce.py": 160,
    "test_hostile_disk.py": 160,
    "test_kill_sweep.py": 150,
    "test_agents.py": 140,
    "test_api_remote_cli.py": 100,
    "test_objstore_vaults.py": 77,
    "test_grs.py": 74,
    "test_vault_keys.py": 70,
    "test_scheduler_crash.py": 60,
    "test_scale_out.py": 55,
    "test_standalone.py": 51,
    "test_scheduler.py": 50,
    "test_quiesce_budget.py": 50,
    "test_dr_drill.py": 46,
    "test_libvirt_qemu_user.py": 44,
}


def _shares_a_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(d.scope in _SHARED_SCOPES for defs in info.name2fixturedefs.values() for d in defs)


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Iterator[None]:
    # before every other hook (xdist's turns the groups into node ids): the groups and the order
    for item in items:
        if item.get_closest_marker("xdist_group") is None and _shares_a_fixture(item):
            item.add_marker(pytest.mark.xdist_group(Path(str(item.path)).stem))
    if hasattr(config, "workerinput"):  # only under xdist: a single-process run keeps the files' order
        items.sort(key=lambda item: -SLOW_FILES.get(Path(str(item.path)).name, 0.0))
    yield
    # after them: xdist 3.8 sends a test of group NAME to its scheduler as "<node id>@NAME" by setting
    # `item._nodeid`, which pytest 9 no longer reads (the id is `item._id`): without this every group
    # silently falls apart into single tests. Give the node id its suffix where xdist could not.
    if getattr(config.option, "loadgroup", False):  # set on xdist's workers under --dist loadgroup
        for item in items:
            names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                            for m in item.iter_markers("xdist_group")})  # fmt: skip
            if names and "@" not in item.nodeid.rsplit("]", 1)[-1]:
                _set_node_id(item, f"{item.nodeid}@{'_'.join(names)}")


def _set_node_id(item: pytest.Item, node_id: str) -> None:
    if hasattr(item, "_id"):  # pytest >= 9
        from _pytest.nodeid import NodeId

        item._id = NodeId.parse(node_id)
    else:
        item._nodeid = node_id


def pytest_configure(config: pytest.Config) -> None:
    # xdist hands out groups by their number of tests unless told not to; the order above (longest first)
    # balances the two workers better than a count of tests, which says nothing of their time.
    if config.getoption("dist", "no") == "loadgroup":
        config.option.loadscopereorder = False

"""Shared fixtures. Helpers live in helpers.py; nothing here is mocked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import objstores
from helpers import BIG_IMAGE_SIZE, SMALL_IMAGE_SIZE, Cli, build_image


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


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[objstores.Server]:
    """One Azurite blob service for the session (tests use fresh containers in it)."""
    server = objstores.start_azurite(tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        server.stop()


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

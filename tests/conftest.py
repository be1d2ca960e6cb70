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

"""Shared fixtures. Helpers live in helpers.py; nothing here is mocked."""

from __future__ import annotations

from pathlib import Path

import pytest

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

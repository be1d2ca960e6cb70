"""Helpers of the API tests: a sandboxed home with an app, tokens and a small ext4 disk image."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from vmvault.api.app import create_app
from vmvault.service import tokens
from vmvault.service.context import Context
from vmvault.service.paths import PathPolicy, build_policy
from vmvault.settings import Settings

PASSPHRASE = "correct horse battery staple"


def make_ext4_image(path: Path, size_mib: int = 16, files: dict[str, bytes] | None = None) -> Path:
    """A raw disk: a truncated file formatted ext4 (mkfs.ext4 -d fills it from a directory, no mount)."""
    content = path.parent / f"{path.name}.content"
    content.mkdir(parents=True, exist_ok=True)
    for name, data in (files or {}).items():
        (content / name).write_bytes(data)
    with open(path, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", str(content), str(path)],
        check=True,
        capture_output=True,
    )
    return path


@dataclass
class Sandbox:
    home: Path
    app: FastAPI
    client: TestClient

    @property
    def ctx(self) -> Context:
        ctx: Context = self.app.state.ctx
        return ctx

    def token(self, role: str, vault: str | None = None) -> str:
        _view, token = tokens.create_token(self.ctx, role, vault=vault)
        return token

    def headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, token: str | None, **kwargs: Any) -> Any:
        headers = {**(self.headers(token) if token else {}), **kwargs.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kwargs)


@contextmanager
def sandbox(home: Path, paths: PathPolicy | None = None, catalog_url: str | None = None) -> Iterator[Sandbox]:
    """An app on home; API callers may use paths under the allowed roots of paths (default: anywhere
    under the home's parent, the home itself excluded: service/paths.py). catalog_url: a PostgreSQL
    catalog (the catalog_url fixture) instead of SQLite in the home."""
    settings = Settings(home=home, passphrase=PASSPHRASE, catalog_url=catalog_url)
    allow = [str(home.parent)]
    policy = paths or build_policy(settings, disks=allow, vaults=allow, restores=allow)
    app = create_app(settings, paths=policy)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Sandbox(home=home, app=app, client=client)

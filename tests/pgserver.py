"""A real PostgreSQL 15 server for the tests (Debian's packages), private to one pytest session.

`initdb` runs as the user postgres into a fresh temporary directory; the server listens on a free
TCP port of 127.0.0.1 and on a unix socket in that directory, and is stopped (directory removed) at
the end. vmvault connects as the role `vmvault` with a password (scram-sha-256), the way a real
deployment does: the URL with the password only ever goes into an environment variable.

Each test gets its own database, copied from a template migrated once (CREATE DATABASE ...
TEMPLATE), so a test pays no migration; the migration tests start from an empty database.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
ROLE = "vmvault"
TEMPLATE = "vmvault_template"


def available() -> str | None:
    """Why a PostgreSQL server cannot be started here (None: it can)."""
    if not (PG_BIN / "initdb").exists():
        return "PostgreSQL 15 is not installed (Debian package postgresql; make test-deps)"
    if os.geteuid() != 0:
        return "starting PostgreSQL as the user postgres needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, input=stdin, text=True,
                   capture_output=True, timeout=120)


@dataclass
class PgServer:
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="vmvault-pg-")))
    port: int = field(default_factory=_free_port)
    password: str = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def data(self) -> Path:
        return self.root / "data"

    def start(self) -> PgServer:
        shutil.chown(self.root, "postgres")
        os.chmod(self.root, 0o700)
        _as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                     "--no-sync", "--locale", "C")
        (self.data / "pg_hba.conf").write_text(
            "local all postgres trust\n"
            "local all all scram-sha-256\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        # A test database: durability off (the server dies with the session anyway).
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                     "-w", "-t", "60", "start")
        # The password goes through stdin, never into an argument.
        self.psql(f"CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{self.password}';")
        self.psql(f"CREATE DATABASE {TEMPLATE} OWNER {ROLE};")
        return self

    def psql(self, sql: str, database: str = "postgres") -> None:
        _as_postgres(str(PG_BIN.parent / "bin" / "psql"), "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.root),
                     "-p", str(self.port), "-U", "postgres", "-d", database, stdin=sql)

    def url(self, database: str) -> str:
        return f"postgresql://{ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"

    def migrate_template(self) -> None:
        """The template database at the catalog's head (one migration for the whole session)."""
        from vmvault.catalog.db import Catalog

        Catalog.open_url(self.url(TEMPLATE)).close()

    def new_database(self, *, empty: bool = False) -> str:
        """A fresh database (copied from the migrated template unless empty); returns its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        template = "template0" if empty else TEMPLATE
        self.psql(f"CREATE DATABASE {name} OWNER {ROLE} TEMPLATE {template};")
        return self.url(name)

    def stop(self) -> None:
        try:
            _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

"""Per-job pack journals: which packs a backup job wrote (or was about to write) into a vault.

A backup appends each pack's name to its job's journal, and syncs it, *before* the pack's first
byte reaches the vault, so after a crash at any moment every pack (and every `.tmp-` file of a
pack write) the job left behind is named in its journal. Garbage collection uses the journals of
jobs known to have died (service/gc.py) to collect their unreferenced packs without waiting for the
grace window; a pack named by no such journal (a running job's, a job that succeeded, another
host's, or from before journals existed) waits for the grace window as before.

The journals live beside the chunk index cache, `$VMVAULT_HOME/cache/<vault uuid>/jobs/<job id>.packs`
(one pack name per line), because the catalog of the same home is what says a job died. A lost
journal only means its packs wait for the grace window. Lines are checked to look like pack names;
a torn last line (a crash mid-append) is ignored.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

SUFFIX = ".packs"
_PACK_NAME = re.compile(r"^(data|tree)/[0-9a-f]{2}/[0-9a-f]{32}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def journal_dir(vault: Any) -> Path:
    return Path(vault.home) / "cache" / str(vault.uuid) / "jobs"


class PackJournal:
    """The append-only journal of one job's packs in one vault."""

    def __init__(self, vault: Any, job_id: str) -> None:
        if not _JOB_ID.match(job_id):
            raise ValueError(f"job id {job_id!r} cannot name a journal file")
        self.path = journal_dir(vault) / f"{job_id}{SUFFIX}"

    def record(self, pack: str) -> None:
        """Durably note `pack` before it is written (a crash after this leaves at most a name of
        a pack that was never written: harmless)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, f"{pack}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """The job's packs are named by its manifest now (or collected): the journal is not needed."""
        self.path.unlink(missing_ok=True)


def read_journals(vault: Any) -> dict[str, set[str]]:
    """{job id: pack names} of every journal of this vault on this host."""
    out: dict[str, set[str]] = {}
    with contextlib.suppress(FileNotFoundError):
        for path in journal_dir(vault).iterdir():
            job_id = path.name.removesuffix(SUFFIX)
            if path.suffix != SUFFIX or not _JOB_ID.match(job_id):
                continue
            with contextlib.suppress(OSError):
                lines = path.read_text(errors="replace").splitlines()
                out[job_id] = {line for line in lines if _PACK_NAME.match(line)}
    return out


def discard_journal(vault: Any, job_id: str) -> None:
    if _JOB_ID.match(job_id):
        (journal_dir(vault) / f"{job_id}{SUFFIX}").unlink(missing_ok=True)

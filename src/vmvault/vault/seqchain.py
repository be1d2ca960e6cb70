"""The record chain: one sealed, hash-chained record per point event (docs/format.md, "Record chain").

Someone with write access to the vault's storage cannot forge a manifest (it is sealed), but they
can delete one, or put back an older copy of the vault. Every publish and every deletion is
therefore recorded in ``seq/<n>``, created with the backend's ``put_if_absent`` (never
overwritten; two writers racing for one number: the loser moves on to the next) and carrying the
SHA-256 of the record before it. `audit` compares the chain with the manifests present:

- a manifest without a publish record (added outside vmvault, or swapped in from another copy of
  the vault) or that differs from the one recorded: tampering;
- a recorded point whose manifest is gone without a deletion record: tampering;
- a missing or damaged record, a broken link, a chain shorter than this host has seen: tampering;
- an intent without a manifest (a backup killed between the two): a note, nothing is missing.

Publishing writes an "intent" record, then the manifest, then a "publish" record; deleting writes
a "delete" record, then deletes the manifest. A crash between two steps leaves a state the audit
reads as unfinished, never as tampering (the limit of that window is in docs/format.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmvault.errors import AlreadyExists, IntegrityError, ObjectNotFound, VmvaultError
from vmvault.vault.backends.base import Backend
from vmvault.vault.crypto import MasterKeys
from vmvault.vault.sealed import seal, unseal

FEATURE = "seq-chain-v1"
PREFIX = "seq"
EVENTS = ("genesis", "intent", "publish", "delete")
MAX_APPEND_TRIES = 10_000  # records written by others while we append; a bound, not a timeout


def record_name(n: int) -> str:
    return f"{PREFIX}/{n:012d}"


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


@dataclass(frozen=True)
class Record:
    n: int
    event: str
    points: dict[str, str]  # rp_id -> SHA-256 of the manifest's payload ("" for deletions)
    prev: str
    digest: str  # SHA-256 of this record's payload: the next record's prev
    reason: str = ""


@dataclass
class Audit:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    head: int = -1


class Chain:
    """The chain of one vault; `head_file` (under the host's cache) remembers the highest record seen."""

    def __init__(self, backend: Backend, keys: MasterKeys, vault_uuid: str, head_file: Path) -> None:
        self.backend = backend
        self.keys = keys
        self.vault_uuid = vault_uuid
        self.head_file = head_file

    # ---- reading ------------------------------------------------------------------------------
    def exists(self) -> bool:
        return any(True for _ in self.backend.list(PREFIX))

    def numbers(self) -> list[int]:
        found = []
        for name, _size, _mtime in self.backend.list(PREFIX):
            tail = name.split("/", 1)[1]
            if tail.isdigit():
                found.append(int(tail))
        return sorted(found)

    def read(self, n: int) -> Record:
        name = record_name(n)
        payload = unseal(self.keys, name, self.backend.get(name))
        try:
            doc = json.loads(payload)
            record = Record(
                n=int(doc["seq"]),
                event=str(doc["event"]),
                points={str(k): str(v) for k, v in dict(doc["points"]).items()},
                prev=str(doc["prev"]),
                digest=digest(payload),
                reason=str(doc.get("reason", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"vault record {name} is damaged: {exc}") from exc
        if record.n != n or record.event not in EVENTS or doc.get("vault") != self.vault_uuid:
            raise IntegrityError(f"vault record {name} is damaged: it is not record {n} of this vault")
        return record

    # ---- writing ------------------------------------------------------------------------------
    def append(self, event: str, points: dict[str, str], reason: str = "") -> Record:
        """Add a record after the current head; a record written meanwhile by another writer moves us on."""
        n, prev = self._head()
        for _ in range(MAX_APPEND_TRIES):
            n += 1
            name = record_name(n)
            payload = json.dumps(
                {"seq": n, "vault": self.vault_uuid, "event": event, "points": points, "prev": prev,
                 "reason": reason, "time": datetime.now(UTC).isoformat(timespec="seconds")},
                sort_keys=True, separators=(",", ":"),
            ).encode()  # fmt: skip
            try:
                self.backend.put_if_absent(name, seal(self.keys, name, payload))
            except AlreadyExists:
                other = self.read(n)
                if other.prev != prev:
                    raise IntegrityError(
                        f"vault record {name} does not follow record {n - 1}: the record chain is broken",
                        hint="run 'vmvault vault verify' to see what was changed in the vault's storage",
                    ) from None
                prev = other.digest
                continue
            self.remember_head(n)
            return Record(n, event, points, prev, digest(payload), reason)
        raise IntegrityError(f"could not append to the record chain of vault {self.vault_uuid}")

    def genesis(self, points: dict[str, str]) -> None:
        """Record 0: the points present when the chain starts (a new vault: none). Idempotent."""
        name = record_name(0)
        payload = json.dumps(
            {"seq": 0, "vault": self.vault_uuid, "event": "genesis", "points": points, "prev": "", "reason": "",
             "time": datetime.now(UTC).isoformat(timespec="seconds")},
            sort_keys=True, separators=(",", ":"),
        ).encode()  # fmt: skip
        try:
            self.backend.put_if_absent(name, seal(self.keys, name, payload))
        except AlreadyExists:
            return  # another writer started the chain first: theirs stands
        self.remember_head(0)

    def _head(self) -> tuple[int, str]:
        """(number, digest) of the last record: from the host's hint when it is still the head."""
        hint = self.known_head()
        if hint >= 0 and not self.backend.exists(record_name(hint + 1)):
            try:
                return hint, self.read(hint).digest
            except (ObjectNotFound, IntegrityError):
                pass  # the hint is stale (or the vault was rolled back): list the records
        numbers = self.numbers()
        if not numbers:
            raise IntegrityError(
                f"the record chain of vault {self.vault_uuid} is missing",
                hint="run 'vmvault vault verify' to see what was changed in the vault's storage",
            )
        return numbers[-1], self.read(numbers[-1]).digest

    # ---- the host's memory of the head ----------------------------------------------------------
    def known_head(self) -> int:
        try:
            return int(json.loads(self.head_file.read_text())["head"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    def remember_head(self, n: int) -> None:
        if n <= self.known_head():
            return
        self.head_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.head_file.with_name(f".{self.head_file.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(json.dumps({"head": n}))
        os.replace(tmp, self.head_file)

    # ---- what the chain records of each point ---------------------------------------------------
    def recorded(self) -> Recorded:
        """The points the readable records name (a damaged or missing record is the audit's to report)."""
        records = []
        for n in self.numbers():
            try:
                records.append(self.read(n))
            except VmvaultError:
                continue
        return Recorded(_replay(records))

    # ---- audit --------------------------------------------------------------------------------
    def audit(self, manifests: dict[str, str | None]) -> Audit:
        """Compare the chain with the manifests present ({rp_id: payload SHA-256, None if unreadable})."""
        out = Audit()
        records = self._read_all(out)
        state = _replay(records)
        for rp_id in sorted(manifests):
            _audit_present(rp_id, manifests[rp_id], state, out)
        for rp_id, n in sorted(state.published.items()):
            if rp_id not in manifests and rp_id not in state.deleted:
                out.problems.append(
                    f"recovery point {rp_id} (published in {record_name(n)}) is missing: its manifest "
                    f"points/{rp_id} was removed from the storage without a deletion record"
                )
        for rp_id, n in sorted(state.intents.items()):
            if rp_id not in manifests and rp_id not in state.published and rp_id not in state.deleted:
                out.notes.append(
                    f"recovery point {rp_id} was never published ({record_name(n)} records the intent): "
                    "a backup was interrupted; nothing is missing"
                )
        if out.problems == [] and out.head >= 0:
            self.remember_head(out.head)
        return out

    def _read_all(self, out: Audit) -> list[Record]:
        numbers = self.numbers()
        known = self.known_head()
        if not numbers:
            out.problems.append("the vault's record chain (seq/) is missing: every record was removed")
            return []
        out.head = numbers[-1]
        if known > out.head:
            out.problems.append(
                f"the vault's record chain ends at {record_name(out.head)} but this host has seen "
                f"{record_name(known)}: records were removed, or an older copy of the vault was put back"
            )
        present = set(numbers)
        missing = [n for n in range(out.head + 1) if n not in present]
        if missing:
            shown = ", ".join(record_name(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
            out.problems.append(f"{len(missing)} record(s) of the vault's record chain are missing: {shown}")
        records: list[Record] = []
        prev: Record | None = None
        for n in numbers:
            try:
                record = self.read(n)
            except VmvaultError as exc:
                out.problems.append(f"{record_name(n)}: {exc.message}")
                prev = None
                continue
            if n == 0 and record.event != "genesis":
                out.problems.append(f"{record_name(0)} is not the start of a record chain")
            if prev is not None and prev.n == n - 1 and record.prev != prev.digest:
                out.problems.append(f"{record_name(n)} does not follow {record_name(n - 1)}: the chain is broken")
            records.append(record)
            prev = record
        return records


@dataclass
class _State:
    recorded: dict[str, str] = field(default_factory=dict)  # rp -> manifest digest
    intents: dict[str, int] = field(default_factory=dict)
    published: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Recorded:
    """The chain's account of the points, for deciding whether a manifest is one vmvault wrote here."""

    state: _State

    def unrecorded(self, rp_id: str, found: str) -> str | None:
        """Why the manifest of `rp_id` (its payload's SHA-256: `found`) is not one this vault recorded.

        None when an intent (or genesis) record names it with that digest and no deletion record
        does: a backup that wrote its intent record, then its manifest, then died (before its
        publish record, or before the catalog) left a legitimate point.
        """
        name = f"points/{rp_id}"
        if rp_id not in self.state.recorded:
            return (
                f"{name} has no record in the vault's record chain: it was added outside vmvault "
                "(or copied from another vault or an older copy of this one)"
            )
        if self.state.recorded[rp_id] != found:
            return f"{name} is not the manifest recorded for that point: it was replaced"
        if rp_id in self.state.deleted:
            return f"{name} is recorded as deleted ({record_name(self.state.deleted[rp_id])})"
        return None


def _replay(records: list[Record]) -> _State:
    state = _State()
    for record in records:
        for rp_id, value in record.points.items():
            if record.event in ("genesis", "intent"):
                state.recorded[rp_id] = value
                state.intents.setdefault(rp_id, record.n)
            if record.event in ("genesis", "publish"):
                state.published.setdefault(rp_id, record.n)
            if record.event == "delete":
                state.deleted.setdefault(rp_id, record.n)
    return state


def _audit_present(rp_id: str, found: str | None, state: _State, out: Audit) -> None:
    name = f"points/{rp_id}"
    if rp_id not in state.recorded:
        out.problems.append(
            f"{name} has no publish record in the vault's record chain: it was added outside vmvault "
            "(or copied from another vault or an older copy of this one)"
        )
    elif found is not None and state.recorded[rp_id] != found:
        out.problems.append(f"{name} is not the manifest recorded for that point: it was replaced")
    elif rp_id in state.deleted:
        out.notes.append(f"{name} was recorded as deleted but is still present: an interrupted deletion")
    elif rp_id not in state.published:
        out.notes.append(f"{name} was published but its publish record was not written (an interrupted backup)")


def manifest_digests(vault: Any) -> dict[str, str | None]:
    """{rp_id: SHA-256 of its manifest payload} for every manifest in the vault (None: unreadable)."""
    out: dict[str, str | None] = {}
    for rp_id in vault.list_recovery_points():
        name = vault.manifest_name(rp_id)
        try:
            out[rp_id] = digest(unseal(vault.keys, name, vault.backend.get(name)))
        except VmvaultError:
            out[rp_id] = None
    return out

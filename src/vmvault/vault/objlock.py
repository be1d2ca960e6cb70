"""Lock leases in object storage (Azure Blob, S3), where POSIX locks do not exist.

A lock ``locks/NAME`` is a set of lease objects beside the vault's data:

- ``locks/NAME/exclusive``: one holder, created with ``put_if_absent`` (``If-None-Match: *``),
  so of two contenders exactly one gets it;
- ``locks/NAME/shared/<holder>``: one object per shared holder (process).

Each object's body names its holder (host, pid, a random token) and its lease in seconds. A lease
lives until the object's modification time plus the lease, both by the *store's* clock
(``Backend.now()``, the Date of a response): hosts' clocks are never compared. The holder renews
it (rewrites the object) every third of the lease; a holder that died stops renewing and anyone
may delete its object once the lease has run out.

Protocol (docs/design.md, "Concurrency on object storage"): a shared locker writes its object,
then looks for a live exclusive one and withdraws (deletes its object, waits) if there is one. An
exclusive locker creates the exclusive object, then waits until no live shared object remains
(new shared lockers see it and withdraw, so it is not starved). The store is strongly consistent
(read-after-write, list-after-write), so of a shared and an exclusive locker racing at least one
sees the other.

A holder that finds its object gone or its lease run out at renewal (a long pause, a network
partition: another host may have broken it) has *lost* the lock: ``check_held`` then raises,
and writers call it before publishing (a manifest, a GC deletion), so a lost lock stops the work
instead of racing a sweep.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator

from vmvault.errors import AlreadyExists, Busy, ObjectNotFound, VmvaultError
from vmvault.vault.backends.base import Backend

log = logging.getLogger("vmvault")
DEFAULT_LEASE_S = 60.0
_MIN_LEASE_S, _MAX_LEASE_S = 2.0, 3600.0


def lease_seconds() -> float:
    """The lease of new lock objects (VMVAULT_LOCK_LEASE_SECONDS; tests shorten it)."""
    try:
        value = float(os.environ.get("VMVAULT_LOCK_LEASE_SECONDS", DEFAULT_LEASE_S))
    except ValueError:
        value = DEFAULT_LEASE_S
    return min(max(value, _MIN_LEASE_S), _MAX_LEASE_S)


_held: dict[str, set[Lease]] = {}
_held_lock = threading.Lock()


def check_held(location: str) -> None:
    """Raise Busy when a lock this process holds on the vault at location was lost."""
    with _held_lock:
        leases = list(_held.get(location, ()))
    for lease in leases:
        if lease.lost:
            raise Busy(
                f"the lock {lease.label} of the vault at {location} was lost ({lease.lost}); nothing was published",
                hint="another host may have broken an expired lease (a long pause or a network outage); retry",
            )


class Lease:
    """This process's lease objects for one lock (shared or exclusive), with their renewal."""

    def __init__(self, backend: Backend, base: str, ttl: float | None = None) -> None:
        self.backend = backend
        self.base = base  # e.g. "locks/vault"
        self.label = f"{backend.location}/{base}"
        self.ttl = ttl or lease_seconds()
        self.token = f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(6)}"
        self.mine: str | None = None
        self.lost = ""  # why the lock was lost, once it was
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # ---- the lease objects ------------------------------------------------------------------
    def _body(self, mode: str) -> bytes:
        doc = {"holder": self.token, "host": socket.gethostname(), "pid": os.getpid(), "mode": mode,
               "leaseSeconds": self.ttl}  # fmt: skip
        return json.dumps(doc, sort_keys=True).encode()

    def _lease_of(self, name: str) -> float:
        """The lease an object claims (untrusted: clamped; unreadable means the default)."""
        try:
            value = float(json.loads(self.backend.get(name))["leaseSeconds"])
        except ObjectNotFound:
            raise
        except (VmvaultError, ValueError, KeyError, TypeError):
            return DEFAULT_LEASE_S
        return min(max(value, _MIN_LEASE_S), _MAX_LEASE_S)

    def _live(self, name: str, mtime: float, now: float) -> bool:
        """Whether the lease object is live; an expired one (its holder died) is deleted."""
        if name == self.mine:
            return False
        try:
            if now - mtime < self._lease_of(name):
                return True
        except ObjectNotFound:
            return False
        log.warning("lock %s/%s: the lease ran out (its holder died); breaking it", self.backend.location, name)
        with contextlib.suppress(ObjectNotFound):
            self.backend.delete(name)
        return False

    def _live_exclusive(self) -> bool:
        name = f"{self.base}/exclusive"
        try:
            info = self.backend.stat(name)
        except ObjectNotFound:
            return False
        return self._live(name, info.mtime, self.backend.now())

    def _live_shared(self) -> bool:
        now = self.backend.now()
        return any([self._live(i.name, i.mtime, now) for i in self.backend.list(f"{self.base}/shared")])

    # ---- taking and giving back ---------------------------------------------------------------
    def try_shared(self) -> bool:
        if self._live_exclusive():
            return False
        name = f"{self.base}/shared/{self.token}"
        self.backend.put(name, self._body("shared"))
        self.mine = name
        if self._live_exclusive():  # an exclusive locker came meanwhile: it goes first
            self.release()
            return False
        self._hold()
        return True

    def try_exclusive(self) -> bool:
        """Create the exclusive object (once), then True when no live shared holder remains."""
        if self.mine is None:
            name = f"{self.base}/exclusive"
            if self.backend.exists(name):
                # Live, or broken just now (expired): either way not this round, so that two
                # breakers of one dead lease do not delete each other's new object.
                self._live_exclusive()
                return False
            try:
                self.backend.put_if_absent(name, self._body("exclusive"))
            except AlreadyExists:
                return False  # another contender won (or the dead one is being broken)
            self.mine = name
            self._hold()  # renewed while it waits for the shared holders to finish
        return not self._live_shared()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()
        self._renewer = None
        with _held_lock:
            _held.get(self.backend.location, set()).discard(self)
        if self.mine is not None:
            with contextlib.suppress(ObjectNotFound):
                self.backend.delete(self.mine)
            self.mine = None

    # ---- renewal --------------------------------------------------------------------------------
    def _hold(self) -> None:
        with _held_lock:
            _held.setdefault(self.backend.location, set()).add(self)
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="vmv-lease", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.ttl / 3):
            name = self.mine
            if name is None:
                return
            try:
                self.backend.stat(name)
                self.backend.put(name, self._body("renewed"))
                last = time.monotonic()
            except ObjectNotFound:
                self.lost = "its lease object was deleted by another holder"
                return
            except VmvaultError as exc:
                log.warning("lock %s: cannot renew the lease: %s", self.label, exc.message)
                if time.monotonic() - last >= self.ttl:
                    self.lost = "the lease ran out before it could be renewed"
                    return


def held_objects(backend: Backend, base: str) -> Iterator[str]:
    """Names of the lease objects of a lock (for docs, doctor and tests)."""
    for info in backend.list(base):
        yield info.name

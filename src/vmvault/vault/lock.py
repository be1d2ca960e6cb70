"""The vault lock and pins: how backups, restores and garbage collection share one vault.

**Lock.** ``<vault>/locks/vault.lock`` is an empty file locked with POSIX record locks
(``fcntl.lockf``). Backups and restores hold it *shared* from before their first dedup decision or
read until their manifest is published or their last read is done; the sweep of garbage
collection holds it *exclusive*. So no pack a running backup has deduplicated against can be
deleted before the manifest that references it exists (docs/design.md, "Concurrency and garbage
collection"). The lock lives in the vault directory, not in $VMVAULT_HOME, so hosts sharing a
vault over NFS (which implements POSIX locks) see each other; the kernel (or the NFS server's
lease) drops the lock of a process that dies, so there are no stale lock files to break.

POSIX locks belong to a process, and closing *any* descriptor of the file drops them all, so each
process keeps one descriptor per vault and counts its holders itself (``_ProcessLock``): threads
of one process (the service's workers) share the OS lock. A waiting exclusive locker stops new
shared lockers of its own process (so a GC is not starved by one busy service); do not take the
shared lock twice in one thread.

**Pins.** ``<vault>/pins/<id>.json`` says "the disk indexes under these roots are in use until
<expires>": file-recovery sessions and restores take one, and garbage collection keeps everything a
valid pin reaches even if its recovery point was deleted meanwhile, in the packs where it is (no
repacking under a reader that holds no lock). A pin is valid until it
expires, or, on the host that wrote it, until its process is gone. A pin must be written while
the pinned point still exists and the taker holds the shared lock (or before the point can be
deleted); it may then outlive the lock (a mount lasting hours must not block the sweep).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from vmvault.errors import Busy, Cancelled, ObjectNotFound, StorageError
from vmvault.proc import boot_id, pid_alive
from vmvault.vault import objlock
from vmvault.vault.backends.base import Backend
from vmvault.vault.manifest import RecoveryPointManifest
from vmvault.vault.store import Vault

log = logging.getLogger("vmvault")

LOCK_NAME = "locks/vault.lock"
GC_LOCK_NAME = "locks/gc.lock"  # one garbage collection at a time (two would race on the same packs)
PINS_DIR = "pins"
_POLL_S = (0.02, 1.0)  # first and longest wait between attempts on a held OS lock

P = ParamSpec("P")
R = TypeVar("R")


class _ProcessLock:
    """This process's side of one vault lock file: in-process reader/writer counts + the OS lock."""

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self.cond = threading.Condition()
        self.readers = 0
        self.writer = False
        self.writers_waiting = 0
        self.fd: int | None = None

    # ---- the OS lock (called with self.cond held) ---------------------------------------------
    def _open(self, exclusive: bool) -> int | None:
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exclusive or exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise StorageError(f"cannot open the vault lock {self.path}: {exc.strerror}") from exc
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            # A read-only vault nobody here can write: nothing can collect garbage in it through us.
            log.warning("vault lock %s cannot be created (read-only vault); reading without it", self.path)
            return None

    def _os_lock(self, exclusive: bool, deadline: float | None, cancel: threading.Event | None) -> None:
        fd = self._open(exclusive)
        if fd is None:
            return
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        wait = _POLL_S[0]
        try:
            while True:
                try:
                    fcntl.lockf(fd, mode | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EAGAIN):
                        raise StorageError(f"cannot lock the vault lock {self.path}: {exc.strerror}") from exc
                _check_wait(self.path, exclusive, deadline, cancel)
                time.sleep(wait)
                wait = min(wait * 2, _POLL_S[1])
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _os_unlock(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the record lock
            self.fd = None

    # ---- in-process bookkeeping ---------------------------------------------------------------
    def acquire_shared(self, deadline: float | None, cancel: threading.Event | None) -> None:
        with self.cond:
            while self.writer or self.writers_waiting:
                _check_wait(self.path, False, deadline, cancel)
                self.cond.wait(0.2)
            if self.readers == 0:
                self._os_lock(False, deadline, cancel)
            self.readers += 1

    def release_shared(self) -> None:
        with self.cond:
            self.readers -= 1
            if self.readers == 0:
                self._os_unlock()
            self.cond.notify_all()

    def acquire_exclusive(self, deadline: float | None, cancel: threading.Event | None) -> None:
        with self.cond:
            self.writers_waiting += 1
            try:
                while self.writer or self.readers:
                    _check_wait(self.path, True, deadline, cancel)
                    self.cond.wait(0.2)
                self.writer = True
            finally:
                self.writers_waiting -= 1
            try:
                self._os_lock(True, deadline, cancel)
            except BaseException:
                self.writer = False
                self.cond.notify_all()
                raise

    def release_exclusive(self) -> None:
        with self.cond:
            self._os_unlock()
            self.writer = False
            self.cond.notify_all()


def _check_wait(path: Path | str, exclusive: bool, deadline: float | None, cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled while waiting for the vault lock")
    if deadline is not None and time.monotonic() >= deadline:
        who = "running backups and restores" if exclusive else "a running garbage collection"
        raise Busy(f"the vault is in use by {who} (lock {path})", hint="retry when they have finished")


class _LeaseLock(_ProcessLock):
    """The same in-process bookkeeping over lease objects in object storage (vault/objlock.py)."""

    def __init__(self, backend: Backend, base: str) -> None:
        super().__init__(f"{backend.location}/{base}")
        self.backend = backend
        self.base = base
        self.lease: objlock.Lease | None = None

    def _os_lock(self, exclusive: bool, deadline: float | None, cancel: threading.Event | None) -> None:
        lease = objlock.Lease(self.backend, self.base)
        wait = _POLL_S[0]
        try:
            while not (lease.try_exclusive() if exclusive else lease.try_shared()):
                _check_wait(self.path, exclusive, deadline, cancel)
                time.sleep(wait * random.uniform(0.5, 1.5))  # jitter: hosts polling in step would collide
                wait = min(wait * 2, _POLL_S[1])
        except BaseException:
            lease.release()
            raise
        self.lease = lease

    def _os_unlock(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None


_registry: dict[str, _ProcessLock] = {}
_registry_lock = threading.Lock()


def _process_lock(vault: Vault, name: str = LOCK_NAME) -> _ProcessLock:
    local = vault.backend.lock_path(name)
    if local is None:  # object storage: lease objects under locks/<name>/
        key = f"{vault.backend.location}/{name}"
        with _registry_lock:
            found = _registry.get(key)
            if found is None:
                found = _registry[key] = _LeaseLock(vault.backend, name.removesuffix(".lock"))
            return found
    # One object per file, whatever path names it: two descriptors would drop each other's lock.
    path = Path(os.path.realpath(local))
    with _registry_lock:
        lock = _registry.get(str(path))
        if lock is None:
            lock = _registry[str(path)] = _ProcessLock(path)
        return lock


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


@contextlib.contextmanager
def shared(vault: Vault, timeout: float | None = None, cancel: threading.Event | None = None) -> Iterator[None]:
    """Hold the vault shared: garbage collection cannot sweep meanwhile. Waits for a running sweep."""
    lock = _process_lock(vault)
    lock.acquire_shared(_deadline(timeout), cancel)
    try:
        yield
    finally:
        lock.release_shared()


@contextlib.contextmanager
def exclusive(vault: Vault, timeout: float | None = None, cancel: threading.Event | None = None) -> Iterator[None]:
    """Hold the vault exclusive: no backup or restore runs meanwhile. Waits for the running ones."""
    lock = _process_lock(vault)
    lock.acquire_exclusive(_deadline(timeout), cancel)
    try:
        yield
    finally:
        lock.release_exclusive()


REPLICATOR_LOCK_NAME = "locks/replicator.lock"  # one GRS replicator per vault (vault/replicate.py)


@contextlib.contextmanager
def only_replicator(vault: Vault) -> Iterator[None]:
    """The replication lock (a lease on object storage), without waiting: Busy when one runs."""
    lock = _process_lock(vault, REPLICATOR_LOCK_NAME)
    try:
        lock.acquire_exclusive(time.monotonic(), None)
    except Busy:
        raise Busy(
            f"a replication of the vault at {vault.storage_dir} is already running",
            hint="it catches up on its own; wait for it (vmvault vault show gives the lag)",
        ) from None
    try:
        yield
    finally:
        lock.release_exclusive()


@contextlib.contextmanager
def only_collector(vault: Vault) -> Iterator[None]:
    """The garbage-collection lock, without waiting: Busy when another collection runs."""
    lock = _process_lock(vault, GC_LOCK_NAME)
    try:
        lock.acquire_exclusive(time.monotonic(), None)
    except Busy:
        raise Busy(
            f"a garbage collection of the vault at {vault.storage_dir} is already running",
            hint="wait for it to finish (vmvault job list --operation GarbageCollect)",
        ) from None
    try:
        yield
    finally:
        lock.release_exclusive()


def holding_shared(fn: Callable[Concatenate[Vault, P], R]) -> Callable[Concatenate[Vault, P], R]:
    """Run fn(vault, ...) under the shared vault lock, with the chunk index re-read under it.

    The re-read matters: the caller opened the vault (and synced its chunk index cache) before it
    had the lock, and a sweep that ran in between may have deleted packs the cache still lists.
    """

    @functools.wraps(fn)
    def wrapper(vault: Vault, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with shared(vault):
            vault.sync_index()
            return fn(vault, *args, **kwargs)

    return wrapper


# ---- pins ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pin:
    pin_id: str
    rp_id: str
    roots: list[str]  # hex IDs of the disk index roots in use
    purpose: str
    host: str
    pid: int
    boot_id: str
    created: str
    expires: str

    def is_valid(self, now: datetime | None = None) -> bool:
        moment = now or datetime.now(UTC)
        if datetime.fromisoformat(self.expires) <= moment:
            return False
        if self.host == socket.gethostname():
            return self.boot_id == boot_id() and pid_alive(self.pid)
        return True  # another host's process: trust it until it expires


def _pin_name(pin_id: str) -> str:
    return f"{PINS_DIR}/{pin_id}.json"


def add_pin(vault: Vault, manifest: RecoveryPointManifest, purpose: str, ttl_seconds: float) -> Pin:
    """Pin the disk indexes of a point for ttl_seconds (or until this process ends)."""
    now = datetime.now(UTC)
    pin = Pin(
        pin_id=secrets.token_hex(8),
        rp_id=manifest.rp_id,
        roots=[d.index_root for d in manifest.disks],
        purpose=purpose,
        host=socket.gethostname(),
        pid=os.getpid(),
        boot_id=boot_id(),
        created=now.isoformat(timespec="seconds"),
        expires=(now + timedelta(seconds=ttl_seconds)).isoformat(timespec="seconds"),
    )
    vault.backend.put(_pin_name(pin.pin_id), json.dumps(asdict(pin), sort_keys=True).encode())
    return pin


def remove_pin(vault: Vault, pin_id: str) -> None:
    with contextlib.suppress(ObjectNotFound):
        vault.backend.delete(_pin_name(pin_id))


@contextlib.contextmanager
def pinned(
    vault: Vault, manifest: RecoveryPointManifest, purpose: str, ttl_seconds: float, *, required: bool = True
) -> Iterator[Pin | None]:
    """A pin for the duration of the block; with required=False a vault that cannot be written
    (read-only copy) yields None instead of failing (the caller then relies on the shared lock)."""
    try:
        pin = add_pin(vault, manifest, purpose, ttl_seconds)
    except StorageError:
        if required:
            raise
        log.warning("cannot write a pin into %s; relying on the vault lock alone", vault.storage_dir)
        yield None
        return
    try:
        yield pin
    finally:
        remove_pin(vault, pin.pin_id)


def list_pins(vault: Vault) -> list[Pin]:
    """Every readable pin, valid or not (unreadable ones are skipped: they pin nothing)."""
    pins = []
    for info in vault.backend.list(PINS_DIR):
        try:
            raw: dict[str, Any] = json.loads(vault.backend.get(info.name))
            pins.append(Pin(**raw))
        except (ObjectNotFound, ValueError, TypeError):
            continue
    return pins


def valid_pins(vault: Vault) -> list[Pin]:
    now = datetime.now(UTC)
    return [p for p in list_pins(vault) if p.is_valid(now)]


def pinned_points(vault: Vault) -> set[str]:
    """Recovery points some valid pin holds (retention defers deleting them)."""
    return {p.rp_id for p in valid_pins(vault)}


def remove_stale_pins(vault: Vault) -> int:
    now = datetime.now(UTC)
    stale = [p for p in list_pins(vault) if not p.is_valid(now)]
    for pin in stale:
        remove_pin(vault, pin.pin_id)
    return len(stale)

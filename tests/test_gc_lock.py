"""The vault lock: shared holders exclude the sweep across processes and threads, and back.

Another process is a real `python -c` child trying the lock with a short timeout; the lock only
needs the vault's backend, so a stand-in object with `storage_dir` and `backend` is enough here.
Each test runs on every backend (a directory's POSIX locks, lease objects in Azurite and moto).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from vmvault.errors import Busy
from vmvault.vault import lock, objlock
from vmvault.vault.backends import open_backend

TRY = textwrap.dedent(
    """
    import sys, types
    from vmvault.errors import Busy
    from vmvault.vault import lock
    from vmvault.vault.backends import open_backend
    vault = types.SimpleNamespace(storage_dir=sys.argv[1], backend=open_backend(sys.argv[1]))
    take = lock.exclusive if sys.argv[2] == "exclusive" else lock.shared
    try:
        with take(vault, timeout=float(sys.argv[3])):
            print("got")
    except Busy as exc:
        print("busy:", exc.message)
    """
)


def other_process(storage: str, mode: str, timeout: float = 0.3) -> str:
    out = subprocess.run([sys.executable, "-c", TRY, str(storage), mode, str(timeout)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip()


@pytest.fixture
def vault(any_storage: str) -> Any:
    """On every backend: POSIX locks on a directory, lease objects on Azure Blob and S3."""
    backend = open_backend(any_storage)
    backend.ensure_container()
    return SimpleNamespace(storage_dir=backend.location, backend=backend)


def test_shared_excludes_exclusive_in_another_process_and_back(vault: Any) -> None:
    with lock.shared(vault):
        assert other_process(vault.storage_dir, "shared") == "got"
        assert other_process(vault.storage_dir, "exclusive").startswith("busy: the vault is in use by running backups")
    with lock.exclusive(vault):
        assert other_process(vault.storage_dir, "shared").startswith("busy: the vault is in use by a running garbage")
    assert other_process(vault.storage_dir, "exclusive") == "got"


def test_threads_share_one_os_lock_until_the_last_releases(vault: Any) -> None:
    first, second = threading.Event(), threading.Event()
    release_first, release_second = threading.Event(), threading.Event()

    def hold(got: threading.Event, release: threading.Event) -> None:
        with lock.shared(vault):
            got.set()
            release.wait(30)

    threads = [threading.Thread(target=hold, args=pair) for pair in ((first, release_first), (second, release_second))]
    for t in threads:
        t.start()
    assert first.wait(10) and second.wait(10)
    release_first.set()
    threads[0].join(10)
    # One holder left: closing the first thread's use must not have dropped the process's lock.
    assert other_process(vault.storage_dir, "exclusive").startswith("busy")
    release_second.set()
    threads[1].join(10)
    assert other_process(vault.storage_dir, "exclusive") == "got"


def test_exclusive_waits_for_shared_holders_of_its_own_process(vault: Any) -> None:
    order: list[str] = []
    holding = threading.Event()

    def reader() -> None:
        with lock.shared(vault):
            holding.set()
            time.sleep(0.5)
            order.append("reader done")

    t = threading.Thread(target=reader)
    t.start()
    assert holding.wait(10)
    with lock.exclusive(vault, timeout=10):
        order.append("sweep")
    t.join(10)
    assert order == ["reader done", "sweep"]
    with pytest.raises(Busy), lock.shared(vault), lock.exclusive(vault, timeout=0.2):
        pass


def test_one_garbage_collection_at_a_time(vault: Any) -> None:
    with lock.only_collector(vault), pytest.raises(Busy, match="already running"), lock.only_collector(vault):
        pass
    with lock.only_collector(vault):
        pass


HOLD = textwrap.dedent(
    """
    import sys, time, types
    from vmvault.vault import lock
    from vmvault.vault.backends import open_backend
    vault = types.SimpleNamespace(storage_dir=sys.argv[1], backend=open_backend(sys.argv[1]))
    with lock.exclusive(vault):
        print("holding", flush=True)
        time.sleep(600)
    """
)


def test_the_lease_of_a_killed_holder_runs_out_by_the_stores_clock(vault: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of an exclusive holder on object storage: its lease object stays, and is broken
    once its lease (by the store's timestamps) has run out; until then it excludes."""
    if vault.backend.lock_path("locks/vault.lock") is not None:
        pytest.skip("a directory's POSIX lock dies with its process (test_crash covers it)")
    monkeypatch.setenv("VMVAULT_LOCK_LEASE_SECONDS", "4")
    child = subprocess.Popen([sys.executable, "-c", HOLD, vault.storage_dir], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "holding"
    finally:
        child.kill()
        child.wait()
    started = time.monotonic()
    assert [i.name for i in vault.backend.list("locks/vault")] == ["locks/vault/exclusive"]
    with pytest.raises(Busy, match="garbage collection"), lock.shared(vault, timeout=0.5):
        pass
    with lock.shared(vault, timeout=30):
        waited = time.monotonic() - started
        assert [i.name for i in vault.backend.list("locks/vault/shared")], "the shared holder has no lease object"
    assert 1.0 <= waited <= 20, waited
    assert list(vault.backend.list("locks/vault")) == [], "released leases must leave no object"


def test_a_lost_lease_stops_publishing(vault: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another host broke our lease (we paused past it): the next check before publishing refuses."""
    if vault.backend.lock_path("locks/vault.lock") is not None:
        pytest.skip("POSIX locks cannot be broken by another host")
    monkeypatch.setenv("VMVAULT_LOCK_LEASE_SECONDS", "2")
    objlock.check_held(vault.storage_dir)
    with lock.shared(vault):
        (mine,) = [i.name for i in vault.backend.list("locks/vault/shared")]
        vault.backend.delete(mine)  # what a breaker on another host does to an expired lease
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                objlock.check_held(vault.storage_dir)
            except Busy as exc:
                assert "was lost" in exc.message and vault.storage_dir in exc.message
                break
            time.sleep(0.2)
        else:
            raise AssertionError("a lost lease was not noticed")
    objlock.check_held(vault.storage_dir)  # released: nothing held, nothing lost

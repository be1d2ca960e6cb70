"""The vault lock: shared holders exclude the sweep across processes and threads, and back.

Another process is a real `python -c` child trying the lock with a short timeout; the lock only
needs the vault's backend, so a stand-in object with `storage_dir` and `backend` is enough here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vmvault.errors import Busy
from vmvault.vault import lock
from vmvault.vault.backends.local import LocalBackend

TRY = textwrap.dedent(
    """
    import sys, types
    from vmvault.errors import Busy
    from vmvault.vault import lock
    from vmvault.vault.backends.local import LocalBackend
    vault = types.SimpleNamespace(storage_dir=sys.argv[1], backend=LocalBackend(sys.argv[1]))
    take = lock.exclusive if sys.argv[2] == "exclusive" else lock.shared
    try:
        with take(vault, timeout=float(sys.argv[3])):
            print("got")
    except Busy as exc:
        print("busy:", exc.message)
    """
)


def other_process(storage: Path, mode: str, timeout: float = 0.3) -> str:
    out = subprocess.run([sys.executable, "-c", TRY, str(storage), mode, str(timeout)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip()


@pytest.fixture
def vault(tmp_path: Path) -> Any:
    return SimpleNamespace(storage_dir=tmp_path / "vault", backend=LocalBackend(tmp_path / "vault"))


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

"""The storage backend contract (vmvault.vault.backends.base), run against every backend.

To add a backend, add a BackendKind to BACKENDS: a factory building it on a fresh location, and
the Python source that builds the same backend in a child process (used by the crash test).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import objstores
from vmvault.errors import AlreadyExists, InvalidInput, ObjectNotFound, VmvaultError
from vmvault.vault.backends import open_backend
from vmvault.vault.backends.base import Backend


@dataclass(frozen=True)
class BackendKind:
    name: str
    url: Callable[[Path], str]  # the location for a test's tmp_path (the same in the crash test's child)
    server: str | None = None  # the session fixture of the server it needs

    def make(self, where: Path) -> Backend:
        backend = open_backend(self.url(where))
        backend.ensure_container()
        return backend

    def child_source(self, where: Path) -> str:
        """Python that binds `backend` to the same location (in a child process)."""
        return f"from vmvault.vault.backends import open_backend\nbackend = open_backend({self.url(where)!r})"


def _tag(where: Path) -> str:
    return "t" + hashlib.sha256(str(where).encode()).hexdigest()[:24]


BACKENDS = [
    BackendKind("local", lambda where: str(where / "store")),
    # one container / bucket for the suite, a prefix per test (making a bucket per test is slow)
    BackendKind("azure", lambda where: f"azure://{objstores.DEV_ACCOUNT}/contract/{_tag(where)}", "azurite"),
    BackendKind("s3", lambda where: f"s3://contract/{_tag(where)}", "moto_s3"),
]


@pytest.fixture(params=BACKENDS, ids=[b.name for b in BACKENDS])
def kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> BackendKind:
    k: BackendKind = request.param
    if k.server is not None:
        server: objstores.Server = request.getfixturevalue(k.server)
        for var, value in server.env.items():
            monkeypatch.setenv(var, value)  # children (the crash test) inherit them
    return k


@pytest.fixture
def backend(kind: BackendKind, tmp_path: Path) -> Backend:
    return kind.make(tmp_path)


def listing(backend: Backend, prefix: str = "") -> dict[str, int]:
    items = list(backend.list(prefix))
    names = [info.name for info in items]
    assert len(names) == len(set(names)), f"list({prefix!r}) yielded a name twice: {items}"
    return {info.name: info.size for info in items}


# ---- put / get ----------------------------------------------------------------------------------


def test_put_then_get_returns_the_bytes(backend: Backend) -> None:
    backend.put("a/b/c", b"hello")
    assert backend.get("a/b/c") == b"hello"


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=["bytes", "bytearray", "memoryview"])
def test_put_accepts_bytes_like(backend: Backend, wrap: Callable[[bytes], bytes]) -> None:
    backend.put("x", wrap(b"\x00\x01payload"))
    assert backend.get("x") == b"\x00\x01payload"


def test_empty_object(backend: Backend) -> None:
    backend.put("empty", b"")
    assert backend.exists("empty")
    assert backend.get("empty") == b""
    assert listing(backend) == {"empty": 0}


def test_large_object_round_trips(backend: Backend) -> None:
    data = os.urandom(9 * 1024 * 1024 + 7)
    backend.put("data/big", data)
    assert backend.get("data/big") == data
    assert listing(backend, "data") == {"data/big": len(data)}


def test_overwrite_replaces_the_object(backend: Backend) -> None:
    backend.put("k", b"old contents")
    backend.put("k", b"new")
    assert backend.get("k") == b"new"
    assert listing(backend) == {"k": 3}


def test_get_range(backend: Backend) -> None:
    backend.put("r", b"0123456789")
    assert backend.get("r", 0, 4) == b"0123"
    assert backend.get("r", 3, 4) == b"3456"
    assert backend.get("r", 7) == b"789"
    assert backend.get("r", 0, 0) == b""


def test_get_range_past_the_end_is_truncated(backend: Backend) -> None:
    backend.put("r", b"0123456789")
    assert backend.get("r", 8, 100) == b"89"
    assert backend.get("r", 10, 5) == b""
    assert backend.get("r", 50, 5) == b""
    assert backend.get("r", 50) == b""


def test_get_missing_raises_object_not_found(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.get("nope")
    with pytest.raises(ObjectNotFound):
        backend.get("dir/nope", 0, 10)


def test_a_prefix_is_not_an_object(backend: Backend) -> None:
    backend.put("dir/yes", b"1")
    with pytest.raises(ObjectNotFound):
        backend.get("dir")
    with pytest.raises(ObjectNotFound):
        backend.delete("dir")
    assert backend.get("dir/yes") == b"1"


# ---- put_if_absent --------------------------------------------------------------------------------


def test_put_if_absent_creates(backend: Backend) -> None:
    backend.put_if_absent("seq/000001", b"first")
    assert backend.get("seq/000001") == b"first"
    assert listing(backend, "seq") == {"seq/000001": 5}


def test_put_if_absent_never_overwrites(backend: Backend) -> None:
    backend.put("seq/1", b"original")
    with pytest.raises(AlreadyExists) as info:
        backend.put_if_absent("seq/1", b"usurper")
    assert "seq/1" in str(info.value)
    assert backend.get("seq/1") == b"original"
    assert listing(backend) == {"seq/1": 8}, "a refused put_if_absent left something behind"


def test_put_if_absent_refuses_invalid_names(backend: Backend) -> None:
    with pytest.raises(InvalidInput):
        backend.put_if_absent("../escape", b"x")


def test_put_if_absent_race_has_one_winner(backend: Backend) -> None:
    """Eight threads race for each name: exactly one wins, the object is the winner's, whole."""
    for round_ in range(10):
        name = f"race/{round_}"
        wins: list[bytes] = []
        losses: list[bytes] = []
        barrier = threading.Barrier(8)

        def contender(i: int, name: str = name, wins: list[bytes] = wins, losses: list[bytes] = losses,
                      barrier: threading.Barrier = barrier) -> None:
            data = bytes([i]) * (64 * 1024 + i)
            barrier.wait()
            try:
                backend.put_if_absent(name, data)
                wins.append(data)
            except AlreadyExists:
                losses.append(data)

        threads = [threading.Thread(target=contender, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and len(losses) == 7, (len(wins), len(losses))
        assert backend.get(name) == wins[0]
    assert set(listing(backend, "race")) == {f"race/{i}" for i in range(10)}


# ---- exists / delete ----------------------------------------------------------------------------


def test_exists(backend: Backend) -> None:
    assert not backend.exists("p/q")
    backend.put("p/q", b"1")
    assert backend.exists("p/q")
    assert not backend.exists("p"), "a prefix is not an object"
    assert not backend.exists("p/q/r")


def test_delete(backend: Backend) -> None:
    backend.put("d/1", b"1")
    backend.put("d/2", b"2")
    backend.delete("d/1")
    assert not backend.exists("d/1")
    assert backend.exists("d/2")
    with pytest.raises(ObjectNotFound):
        backend.get("d/1")
    assert listing(backend) == {"d/2": 1}


def test_delete_missing_raises_object_not_found(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound):
        backend.delete("never-was")
    backend.put("once", b"x")
    backend.delete("once")
    with pytest.raises(ObjectNotFound):
        backend.delete("once")


def test_object_not_found_is_a_vmvault_error(backend: Backend) -> None:
    with pytest.raises(VmvaultError) as info:
        backend.get("missing/object")
    assert "missing/object" in str(info.value)


# ---- list ---------------------------------------------------------------------------------------


def test_list_everything_and_by_prefix(backend: Backend) -> None:
    objects = {
        "config": b"c",
        "data/ab/ab01": b"12",
        "data/cd/cd02": b"345",
        "index/ab/ab01": b"6789",
        "points/p1": b"",
    }
    for name, data in objects.items():
        backend.put(name, data)
    sizes = {name: len(data) for name, data in objects.items()}
    assert listing(backend) == sizes
    assert listing(backend, "data") == {"data/ab/ab01": 2, "data/cd/cd02": 3}
    assert listing(backend, "data/ab") == {"data/ab/ab01": 2}
    assert listing(backend, "points") == {"points/p1": 0}


def test_list_prefix_is_a_path_component(backend: Backend) -> None:
    backend.put("data/x", b"1")
    backend.put("database/y", b"2")
    backend.put("data-old", b"3")
    assert listing(backend, "data") == {"data/x": 1}


def test_list_missing_prefix_is_empty(backend: Backend) -> None:
    assert listing(backend) == {}
    assert listing(backend, "nothing") == {}
    backend.put("something/here", b"1")
    assert listing(backend, "nothing") == {}


def test_list_after_delete(backend: Backend) -> None:
    for i in range(20):
        backend.put(f"many/{i:02d}", bytes([i]) * i)
    for i in range(0, 20, 2):
        backend.delete(f"many/{i:02d}")
    assert listing(backend, "many") == {f"many/{i:02d}": i for i in range(1, 20, 2)}


# ---- modification times, the store's clock -----------------------------------------------------


def test_list_and_stat_give_the_stores_modification_time(backend: Backend) -> None:
    """GC's grace window and lock leases compare these with now(): both by the store's clock."""
    before = backend.now()
    backend.put("t/a", b"abc")
    after = backend.now()
    (info,) = list(backend.list("t"))
    assert info.name == "t/a" and info.size == 3
    assert before - 2 <= info.mtime <= after + 2, (before, info.mtime, after)
    assert backend.stat("t/a") == info
    with pytest.raises(ObjectNotFound):
        backend.stat("t/missing")
    with pytest.raises(ObjectNotFound):
        backend.stat("t")


def test_rewrite_moves_the_modification_time(backend: Backend) -> None:
    backend.put("t/b", b"1")
    first = backend.stat("t/b").mtime
    time.sleep(1.1)  # object stores keep whole seconds
    backend.put("t/b", b"2")
    assert backend.stat("t/b").mtime > first


def test_inventory_lists_everything(backend: Backend) -> None:
    backend.put("config", b"c")
    backend.put("data/ab/ab01", b"12")
    assert {i.name: i.size for i in backend.inventory()} == {"config": 1, "data/ab/ab01": 2}


def test_delete_temporaries_keeps_objects(backend: Backend) -> None:
    backend.put("data/x", b"1")
    assert backend.delete_temporaries(0) == 0
    assert listing(backend) == {"data/x": 1}


def test_location_names_no_credentials(backend: Backend) -> None:
    text = backend.location + " " + backend.describe()
    for word in ("AccountKey", "key=", "secret", "password", "SharedAccessSignature"):
        assert word.lower() not in text.lower()


# ---- names --------------------------------------------------------------------------------------

BAD_NAMES = ["", "/abs", "a/../b", "..", ".", "a/./b", "a//b", "trailing/", "sp ace", "back\\slash", "nul\x00",
             "../escape", "ünïcode"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_refused(backend: Backend, name: str, tmp_path: Path) -> None:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(InvalidInput):
        backend.put(name, b"x")
    with pytest.raises(InvalidInput):
        backend.get(name)
    with pytest.raises(InvalidInput):
        backend.exists(name)
    with pytest.raises(InvalidInput):
        backend.delete(name)
    if name:  # "" is the valid "everything" prefix of list()
        with pytest.raises(InvalidInput):
            list(backend.list(name))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_valid_name_characters(backend: Backend) -> None:
    name = "Az09._-/x.y-z_W"
    backend.put(name, b"ok")
    assert backend.get(name) == b"ok"
    assert listing(backend) == {name: 2}


# ---- atomicity ----------------------------------------------------------------------------------


def test_readers_never_see_a_partial_object(backend: Backend) -> None:
    """While one thread overwrites an object, readers and list() see the old or the new one whole."""
    versions = [bytes([65 + i]) * (3 * 1024 * 1024 + i * 4096) for i in range(3)]
    backend.put("busy/obj", versions[0])
    stop = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            backend.put("busy/obj", versions[i % len(versions)])

    t = threading.Thread(target=writer)
    t.start()
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not errors:
            data = backend.get("busy/obj")
            if data not in versions:
                errors.append(f"get returned {len(data)} bytes, not a whole version")
            for name, size, _mtime in backend.list("busy"):
                if name != "busy/obj" or size not in {len(v) for v in versions}:
                    errors.append(f"list yielded {name} of {size} bytes")
    finally:
        stop.set()
        t.join()
    assert errors == []


def test_killed_put_leaves_old_or_nothing(kind: BackendKind, tmp_path: Path) -> None:
    """kill -9 during put: afterwards the object is absent (or the previous one) and list is clean."""
    backend = kind.make(tmp_path)
    backend.put("crash/old", b"previous")
    child = "\n".join([
        "import os",
        kind.child_source(tmp_path),
        "data = os.urandom(1 << 20) * 64",
        "print('ready', flush=True)",
        "while True:",
        "    backend.put('crash/new', data)",
        "    backend.put('crash/old', data)",
        "    backend.delete('crash/new')",
    ])
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.7)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    after = kind.make(tmp_path)
    sizes = listing(after)
    assert set(sizes) <= {"crash/old", "crash/new"}, f"list shows leftovers of the killed put: {sizes}"
    assert sizes["crash/old"] in (len(b"previous"), 64 << 20)
    assert len(after.get("crash/old")) == sizes["crash/old"]
    if "crash/new" in sizes:
        assert sizes["crash/new"] == 64 << 20
        assert after.exists("crash/new")
    else:
        assert not after.exists("crash/new")


def test_describe_names_the_location(backend: Backend) -> None:
    text = backend.describe()
    assert isinstance(text, str) and text.strip()

"""Local-directory backend: objects are files, written by temp + fsync + rename + dir fsync."""

from __future__ import annotations

import errno
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from vmvault.errors import AlreadyExists, ObjectNotFound, StorageError
from vmvault.proc import boot_id, pid_alive
from vmvault.vault.backends.base import ObjectInfo, check_name

_TMP_PREFIX = ".tmp-"
# `.tmp-<name>.w<pid>-<boot id, 32 hex>-<random>`: a temporary file names its writer, so garbage
# collection can delete the temporaries of a process of this boot that died without waiting for
# the grace window (vault/gc.py). Another host's (or an older boot's) wait for the grace window.
_WRITER = re.compile(r"\.w(\d{1,10})-([0-9a-f]{32})-[0-9a-f]+$")


def writer_tag() -> str:
    boot = _boot()
    return f"w{os.getpid()}-{boot}-" if boot else ""


def _boot() -> str:
    boot = boot_id().replace("-", "").lower()
    return boot if re.fullmatch(r"[0-9a-f]{32}", boot) else ""


def dead_writer(name: str) -> bool:
    """True when the temporary file `name` was written by a process of this boot that is gone."""
    found = _WRITER.search(name)
    if found is None or found.group(2) != _boot():
        return False
    return not pid_alive(int(found.group(1)))


class LocalBackend:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def location(self) -> str:
        return str(self.root)

    def describe(self) -> str:
        return str(self.root)

    @property
    def remote(self) -> bool:
        return False  # a directory here (a network file system is the kernel's, not ours)

    @property
    def retries(self) -> int:
        return 0  # a local file system is not retried: its errors are final

    def ensure_container(self) -> None:
        pass  # directories are made on the first write

    def lock_path(self, name: str) -> Path | None:
        return self.root / check_name(name)

    def now(self) -> float:
        return time.time()  # the file system's timestamps come from this host's clock

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        path = self._path(name)
        tmp = self._write_temp(path, data)
        try:
            os.rename(tmp, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {path}: {exc.strerror}", hint=_space_hint(exc)) from exc

    def put_if_absent(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Create-only put: link() the complete temporary file, which fails if the name exists."""
        path = self._path(name)
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise AlreadyExists(f"vault object {name} already exists in {self.root}") from None
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror}", hint=_space_hint(exc)) from exc
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    def _write_temp(self, path: Path, data: bytes | bytearray | memoryview) -> Path:
        """A complete, fsynced temporary file beside path (invisible to list())."""
        tmp = path.parent / f"{_TMP_PREFIX}{path.name}.{writer_tag()}{secrets.token_hex(4)}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {path}: {exc.strerror}", hint=_space_hint(exc)) from exc
        return tmp

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(name)
        try:
            with open(path, "rb", buffering=0) as f:
                if length is None:
                    f.seek(offset)
                    return f.read()
                return os.pread(f.fileno(), length, offset)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"vault object {name} is missing from {self.root}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"vault object {name} is missing from {self.root}") from exc
        _fsync_dir(path.parent)

    def stat(self, name: str) -> ObjectInfo:
        path = self._path(name)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"vault object {name} is missing from {self.root}") from exc
        if not path.is_file():
            raise ObjectNotFound(f"vault object {name} is missing from {self.root}")
        return ObjectInfo(name, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self.root / check_name(prefix) if prefix else self.root
        return (info for info in self._walk(base) if not info.name.rsplit("/", 1)[-1].startswith(_TMP_PREFIX))

    def inventory(self) -> Iterator[ObjectInfo]:
        return self._walk(self.root)

    def delete_temporaries(self, older_than: float, dead_objects: frozenset[str] = frozenset()) -> int:
        """`.tmp-*` files of writes that died before their rename, once older than older_than
        (a younger one may be a write in progress of another process), or at once when they are
        the write of one of dead_objects (`.tmp-<object>.<...>`) or their writer, a process of this
        boot, is gone (writer_tag names it)."""
        now, deleted = self.now(), 0
        for info in self._walk(self.root):
            fname = info.name.rsplit("/", 1)[-1]
            if not fname.startswith(_TMP_PREFIX):
                continue
            dead = fname.removeprefix(_TMP_PREFIX).split(".", 1)[0] in dead_objects or dead_writer(fname)
            if dead or now - info.mtime >= older_than:
                try:
                    (self.root / info.name).unlink()
                except FileNotFoundError:
                    continue
                deleted += 1
        return deleted

    def _walk(self, base: Path) -> Iterator[ObjectInfo]:
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for fname in files:
                full = Path(dirpath) / fname
                try:
                    st = full.stat()
                except FileNotFoundError:
                    continue  # removed meanwhile (a pin, a temporary file)
                yield ObjectInfo(full.relative_to(self.root).as_posix(), st.st_size, st.st_mtime)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _space_hint(exc: OSError) -> str | None:
    if exc.errno == errno.ENOSPC:
        return "the vault's file system is full: free space or move the vault"
    return None

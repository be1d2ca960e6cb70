"""Browse and download from a mounted volume without ever leaving it.

A guest file system is hostile input: `evil -> /etc/shadow` inside it would resolve on the host
if the path were handed to open(). So paths are resolved one component at a time from a file
descriptor of the volume's root (openat with O_NOFOLLOW), on the volume's own device:

- `..` is refused outright (the caller's path is relative to the volume root);
- symbolic links are never followed, in the middle of a path or at its end; a listing shows them
  with their target text, and opening one is refused naming its target;
- crossing into another file system (a different st_dev) is refused;
- only regular files are opened (O_NONBLOCK, so a FIFO cannot hang the caller; nodev mounts stop
  device nodes anyway).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmvault.errors import InvalidInput, NotFound

READ_BLOCK = 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True)
class Entry:
    name: str
    type: str  # file | directory | symlink | other
    size: int
    modified: float
    target: str | None = None  # a symlink's target text (never followed)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "type": self.type, "size": self.size, "modified": self.modified}
        if self.target is not None:
            out["target"] = self.target
        return out


def split_path(path: str) -> list[str]:
    """Components of a path relative to a volume root; `..` and NUL are refused."""
    if "\0" in path:
        raise InvalidInput("the path contains a NUL byte")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(
            f"'..' is not allowed in a recovery path ({path!r})",
            hint="give the path from the volume's root, e.g. disk0-part1/etc/hosts",
        )
    return parts


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _refuse_link(dir_fd: int, name: str, shown: str) -> None:
    target = os.readlink(name, dir_fd=dir_fd)
    raise InvalidInput(
        f"'{shown}' is a symbolic link to '{target}': links in a recovery point are not followed "
        "(they would resolve on this host)",
        hint="open the link's target by its own path inside the volume",
    )


def _step(dir_fd: int, name: str, shown: str, device: int) -> os.stat_result:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise NotFound(f"'{shown}' does not exist in the recovery point") from None
    if stat.S_ISLNK(st.st_mode):
        _refuse_link(dir_fd, name, shown)
    if st.st_dev != device:
        raise InvalidInput(f"'{shown}' is on another file system", hint="browse each volume by its own name")
    return st


@contextlib.contextmanager
def _parent_fd(root: Path, parts: list[str]) -> Iterator[tuple[int, int]]:
    """(fd of the directory holding the last component, the volume's device)."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        device = os.fstat(fd).st_dev
        for i, name in enumerate(parts[:-1]):
            shown = "/".join(parts[: i + 1])
            st = _step(fd, name, shown, device)
            if not stat.S_ISDIR(st.st_mode):
                raise InvalidInput(f"'{shown}' is not a directory")
            nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        yield fd, device
    finally:
        os.close(fd)


def list_dir(root: Path, parts: list[str]) -> list[Entry]:
    with _parent_fd(root, [*parts, "."]) as (parent, device):
        if parts:
            _step(parent, ".", "/".join(parts), device)
        entries = []
        with os.scandir(parent) as it:
            for item in it:
                st = item.stat(follow_symlinks=False)
                target = os.readlink(item.name, dir_fd=parent) if stat.S_ISLNK(st.st_mode) else None
                entries.append(Entry(item.name, _kind(st.st_mode), st.st_size, st.st_mtime, target))
    return sorted(entries, key=lambda e: e.name)


def open_file(root: Path, parts: list[str]) -> tuple[int, int]:
    """(fd, size) of a regular file; the caller closes fd."""
    if not parts:
        raise InvalidInput("give the path of a file inside the volume")
    with _parent_fd(root, parts) as (parent, device):
        shown = "/".join(parts)
        st = _step(parent, parts[-1], shown, device)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"'{shown}' is a {_kind(st.st_mode)}, not a regular file")
        fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=parent)
    st2 = os.fstat(fd)
    if not stat.S_ISREG(st2.st_mode) or st2.st_ino != st.st_ino:  # replaced between the checks
        os.close(fd)
        raise InvalidInput(f"'{shown}' changed while it was opened")
    return fd, st2.st_size


def read_chunks(fd: int) -> Iterator[bytes]:
    """The file's bytes in blocks; closes fd at the end (or when the consumer stops)."""
    try:
        while True:
            block = os.read(fd, READ_BLOCK)
            if not block:
                return
            yield block
    finally:
        os.close(fd)

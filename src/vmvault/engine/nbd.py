"""Reading NBD exports with libnbd (Debian's python3-libnbd; never PyPI's unrelated `nbd`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from vmvault.errors import HypervisorError

try:  # imported lazily by callers; the binding exists only in Debian's Python
    import nbd as _libnbd
except ImportError:  # pragma: no cover - set-up problem, reported clearly on use
    _libnbd = None

STATE_HOLE = 1
STATE_ZERO = 2
MAX_STATUS = 1 << 30


class NbdReader:
    """One connection to an export; use one per thread."""

    def __init__(self, uri: str, meta_contexts: tuple[str, ...] = ("base:allocation",)) -> None:
        if _libnbd is None:
            raise HypervisorError(
                "the libnbd Python binding is missing",
                hint="apt-get install python3-libnbd and use vmvault's .venv (make run)",
            )
        self._h: Any = _libnbd.NBD()
        for ctx in meta_contexts:
            self._h.add_meta_context(ctx)
        try:
            self._h.connect_uri(uri)
        except _libnbd.Error as exc:
            raise HypervisorError(f"cannot connect to NBD export {uri}: {exc}") from exc
        self.size: int = self._h.get_size()

    def pread(self, length: int, offset: int) -> bytes:
        data: bytes = self._h.pread(length, offset)
        return data

    def extents(self, context: str = "base:allocation") -> Iterator[tuple[int, int, int]]:
        """Yield (offset, length, flags) covering the whole export for one metadata context."""
        offset = 0
        while offset < self.size:
            found: list[tuple[int, int]] = []

            def cb(
                metacontext: str, _off: int, entries: list[int], _err: Any, found: list[tuple[int, int]] = found
            ) -> int:
                if metacontext == context:
                    found.extend(zip(entries[0::2], entries[1::2], strict=True))
                return 0

            self._h.block_status(min(MAX_STATUS, self.size - offset), offset, cb)
            if not found:
                raise HypervisorError(f"NBD server gave no {context} extents at offset {offset}")
            for length, flags in found:
                length = min(length, self.size - offset)
                if length <= 0:
                    break
                yield offset, length, flags
                offset += length

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._h.shutdown()

"""Progress reporting from the data path to whoever runs the job (never printed here)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Progress:
    total_bytes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    current_disk: str = ""
    message: str = ""

    @property
    def percent(self) -> float:
        if self.total_bytes <= 0:
            return 0.0
        return min(100.0, round(100.0 * self.bytes_read / self.total_bytes, 1))


ProgressCallback = Callable[[Progress], None]


class ProgressTracker:
    """Thread-safe counters; reports at most every `interval` seconds (and at the end)."""

    def __init__(self, callback: ProgressCallback | None, interval: float = 0.5) -> None:
        import time

        self._time = time.monotonic
        self._callback = callback
        self._interval = interval
        self._last = 0.0
        self._lock = threading.Lock()
        self.state = Progress()

    def add(self, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.state.bytes_read += read
            self.state.bytes_written += written

    def report(self, force: bool = False) -> None:
        if self._callback is None:
            return
        now = self._time()
        if force or now - self._last >= self._interval:
            self._last = now
            with self._lock:
                snapshot = Progress(**vars(self.state))
            self._callback(snapshot)

"""Retries with backoff for object stores: throttling (429/503) and transient errors.

The clients' own retries are turned off so that every attempt goes through here: the count of
retried attempts is kept per backend (``Retrier.retries``) and a job reports it
(``storageRetries``), so a slow backup can be told apart from a throttled one.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from vmvault.errors import StorageError

T = TypeVar("T")
log = logging.getLogger("vmvault")

ATTEMPTS = 10  # first try + 9 retries: with the backoff below, about 30 s of a throttling store


def attempts() -> int:
    """ATTEMPTS, or VMVAULT_STORAGE_ATTEMPTS (1..50) for stores that throttle longer (or tests)."""
    try:
        return min(max(int(os.environ.get("VMVAULT_STORAGE_ATTEMPTS", ATTEMPTS)), 1), 50)
    except ValueError:
        return ATTEMPTS


BASE_S = 0.1
CAP_S = 8.0


class Retrier:
    def __init__(self, describe: str, transient: Callable[[BaseException], bool]) -> None:
        self._describe = describe
        self._transient = transient
        self._lock = threading.Lock()
        self.retries = 0  # attempts repeated after a transient error, since this backend was made

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """fn() until it succeeds or fails for good; transient errors back off (full jitter)."""
        limit = attempts()
        for attempt in range(1, limit + 1):
            try:
                return fn()
            except Exception as exc:
                if not self._transient(exc):
                    raise
                if attempt == limit:
                    raise StorageError(
                        f"{what} in {self._describe} failed {limit} times: {_short(exc)}",
                        hint="the store is unreachable or throttling; check its endpoint and the network, then retry",
                    ) from exc
                with self._lock:
                    self.retries += 1
                delay = random.uniform(0, min(CAP_S, BASE_S * 2**attempt))
                log.debug("%s in %s: %s; retry %d in %.2f s", what, self._describe, _short(exc), attempt, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__

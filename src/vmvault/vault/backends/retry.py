"""Retries with backoff for object stores: throttling (429/503) and transient errors.

The clients' own retries are turned off so that every attempt goes through here: the count of
retried attempts is kept per backend (``Retrier.retries``) and a job reports it
(``storageRetries``), so a slow backup can be told apart from a throttled one.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from vmvault.errors import StorageError

T = TypeVar("T")
log = logging.getLogger("vmvault")

ATTEMPTS = 10  # first try + 9 retries: with the backoff below, about 30 s of a throttling store
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
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return fn()
            except Exception as exc:
                if not self._transient(exc):
                    raise
                if attempt == ATTEMPTS:
                    raise StorageError(
                        f"{what} in {self._describe} failed {ATTEMPTS} times: {_short(exc)}",
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

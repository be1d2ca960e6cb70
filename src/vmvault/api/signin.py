"""Failed sign-ins (API bearer tokens, portal form): logged without the token, slowed per client.

A client (its address) that failed FREE_FAILURES times within WINDOW_S waits before each further
attempt is checked: 0.5 s doubling per failure, at most MAX_DELAY_S. Success clears its record.
The delay is spent in the worker thread of that request, so a guessing client slows itself only.
One guard per app (app.state.signins): the API and the portal share it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("vmvault")

FREE_FAILURES = 5
WINDOW_S = 300.0
MAX_DELAY_S = 8.0
_MAX_CLIENTS = 10_000  # a flood of addresses cannot grow the table without bound


class SignInGuard:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[int, float]] = {}  # client -> (failures, last failure time)

    def delay_for(self, client: str) -> float:
        with self._lock:
            count, last = self._failures.get(client, (0, 0.0))
        if count < FREE_FAILURES or time.monotonic() - last > WINDOW_S:
            return 0.0
        return float(min(MAX_DELAY_S, 0.5 * 2 ** (count - FREE_FAILURES)))

    def before_attempt(self, client: str) -> None:
        """Wait as long as this client's recent failures ask."""
        wait = self.delay_for(client)
        if wait:
            time.sleep(wait)

    def failed(self, client: str, where: str) -> None:
        now = time.monotonic()
        with self._lock:
            count, last = self._failures.get(client, (0, 0.0))
            count = 1 if now - last > WINDOW_S else count + 1
            if len(self._failures) >= _MAX_CLIENTS and client not in self._failures:
                self._failures.clear()
            self._failures[client] = (count, now)
        log.warning("%s sign-in failed from %s (%d recent failures; the token is not logged)", where, client, count)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


def guard_of(request: Any) -> tuple[SignInGuard, str]:
    """The app's guard and the request's client address."""
    state = request.app.state
    guard: SignInGuard | None = getattr(state, "signins", None)
    if guard is None:
        guard = state.signins = SignInGuard()
    return guard, request.client.host if request.client else "unknown"

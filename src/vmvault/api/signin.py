"""Failed sign-ins (API bearer tokens, portal form): logged without the token, slowed per client.

A client (its address) that failed FREE_FAILURES times within WINDOW_S waits before each further
attempt is checked: 0.5 s doubling per failure, at most MAX_DELAY_S. Success clears its record.
The delay is spent in the worker thread of that request, so a guessing client slows itself only.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("vmvault")

FREE_FAILURES = 5
WINDOW_S = 300.0
MAX_DELAY_S = 8.0
_MAX_CLIENTS = 10_000  # a flood of addresses cannot grow the table without bound

_lock = threading.Lock()
_failures: dict[str, tuple[int, float]] = {}  # client -> (failures, last failure time)


def delay_for(client: str) -> float:
    with _lock:
        count, last = _failures.get(client, (0, 0.0))
    if count < FREE_FAILURES or time.monotonic() - last > WINDOW_S:
        return 0.0
    return float(min(MAX_DELAY_S, 0.5 * 2 ** (count - FREE_FAILURES)))


def before_attempt(client: str) -> None:
    """Wait as long as this client's recent failures ask."""
    wait = delay_for(client)
    if wait:
        time.sleep(wait)


def failed(client: str, where: str) -> None:
    now = time.monotonic()
    with _lock:
        count, last = _failures.get(client, (0, 0.0))
        count = 1 if now - last > WINDOW_S else count + 1
        if len(_failures) >= _MAX_CLIENTS and client not in _failures:
            _failures.clear()
        _failures[client] = (count, now)
    log.warning("%s sign-in failed from %s (%d recent failures; the token is not logged)", where, client, count)


def succeeded(client: str) -> None:
    with _lock:
        _failures.pop(client, None)

"""Which `vmvault serve` schedules: exactly one at a time.

SQLite: the one serve of the home (serve.lock, an flock) is always the scheduler.

PostgreSQL (several servers on one catalog): the holder of a session-level advisory lock
(pg_try_advisory_lock) on a connection of its own. Every server answers the API and runs jobs;
only the holder queues scheduled backups and runs maintenance (retention, scheduled verification,
alerts). The lock lives as long as that connection:

- a leader that dies (kill -9, crash, host power-off) loses its connection, so the lock: the
  server closes a dead local peer's socket at once, and the session's TCP keepalives (10 s idle,
  5 s interval, 3 probes: 25 s) drop a silent remote one; the others try to take it every
  RETRY_S, so one of them schedules within 30 s;
- a leader that loses its connection stops scheduling at its next check (each tick);
- even two schedulers at once (a partition healing) cannot queue one slot twice: the scheduler
  moves each item's anchor with a compare-and-set in a serialized write (service/scheduler.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from vmvault.catalog.db import PG_LEADER_LOCK, Catalog

log = logging.getLogger("vmvault")

RETRY_S = 2.0  # a follower's tries to take the lock
KEEPALIVE_SQL = ("SET tcp_keepalives_idle = 10", "SET tcp_keepalives_interval = 5", "SET tcp_keepalives_count = 3")


class Leadership:
    def __init__(self, catalog: Catalog, on_change: Callable[[bool], None] | None = None) -> None:
        self.catalog = catalog
        self.on_change = on_change
        self._conn: Any = None
        self._leader = not catalog.shared
        self._last_try = float("-inf")
        self._lock = threading.Lock()

    @property
    def is_leader(self) -> bool:
        """The last known state (check() refreshes it)."""
        return self._leader

    def check(self) -> bool:
        """Whether this server schedules now; a follower tries to take the lock every RETRY_S."""
        if not self.catalog.shared:
            return True
        with self._lock:
            if self._leader:
                if self._alive():
                    return True
                self._set(False, "lost the connection holding the scheduling lock")
            if time.monotonic() - self._last_try >= RETRY_S:
                self._last_try = time.monotonic()
                if self._try_lock():
                    self._set(True, "took the scheduling lock: this server schedules")
            return self._leader

    def release(self) -> None:
        if not self.catalog.shared:
            return  # SQLite: the home's serve.lock decides, released with the process
        with self._lock:
            self._close()
            if self._leader:
                self._set(False, "released the scheduling lock")

    def _alive(self) -> bool:
        try:
            self._conn.execute("SELECT 1")
            return True
        except Exception:
            self._close()
            return False

    def _try_lock(self) -> bool:
        try:
            if self._conn is None:
                conn = self.catalog.dedicated_connection()
                for statement in KEEPALIVE_SQL:  # the server drops a silent leader's session (and lock)
                    conn.execute(statement)
                self._conn = conn
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (PG_LEADER_LOCK,)).fetchone()
            return bool(row and row[0])
        except Exception:
            log.warning("could not try the scheduling lock of the catalog; retrying", exc_info=True)
            self._close()
            return False

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                log.debug("closing the leader connection failed", exc_info=True)
            self._conn = None

    def _set(self, leader: bool, why: str) -> None:
        self._leader = leader
        log.info("scheduler: %s", why)
        if self.on_change is not None:
            self.on_change(leader)

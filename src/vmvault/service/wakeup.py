"""Waking idle workers when a job is queued.

SQLite: workers look for queued jobs every poll_s (0.5 s), as before. PostgreSQL: a queued job is
NOTIFY'd on the channel vmvault_jobs in the transaction that queues it (catalog/repos.add_job);
one listener thread per server (LISTEN on a connection of its own) wakes that server's idle
workers at once. A slow fallback look (SHARED_POLL_S) covers a notification missed while the
listener reconnects.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from vmvault.catalog.db import Catalog
from vmvault.catalog.repos import JOBS_CHANNEL

log = logging.getLogger("vmvault")

SHARED_POLL_S = 5.0  # PostgreSQL: the fallback look when no notification came
RECONNECT_S = 2.0


class Wakeup:
    def __init__(self, catalog: Catalog, poll_s: float) -> None:
        self.catalog = catalog
        self.poll_s = max(poll_s, SHARED_POLL_S) if catalog.shared else poll_s
        self._cond = threading.Condition()
        self._generation = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = threading.Event()  # set while LISTEN is active (tests wait for it)

    def start(self) -> None:
        if self.catalog.shared:
            self._thread = threading.Thread(target=self._listen, name="vmvault-listen", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.fire()
        if self._thread is not None:
            self._thread.join(10)

    def fire(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait(self, stop: threading.Event) -> None:
        """Until a job may be waiting: a notification, poll_s elapsed, or stop."""
        with self._cond:
            seen = self._generation
            self._cond.wait_for(lambda: self._generation != seen or stop.is_set(), timeout=self.poll_s)

    def _listen(self) -> None:
        while not self._stopping.is_set():
            conn: Any = None
            try:
                conn = self.catalog.dedicated_connection()
                conn.execute(f"LISTEN {JOBS_CHANNEL}")
                self.listening.set()
                self.fire()  # jobs queued while nobody listened
                while not self._stopping.is_set():
                    for _note in conn.notifies(timeout=1.0, stop_after=1):
                        self.fire()
            except Exception:
                log.warning("listening for queued jobs failed; workers poll every %.0f s meanwhile", self.poll_s,
                            exc_info=True)
                self._stopping.wait(RECONNECT_S)
            finally:
                self.listening.clear()
                if conn is not None:
                    conn.close()

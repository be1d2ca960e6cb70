"""Portal sign-in sessions: kept server side; the browser holds only a random session id.

The cookie never carries the API token: the id maps (in this process's memory) to the token, which
is authenticated again on every request, so revoking or expiring a token ends its portal sessions
at once. Each session has its own CSRF secret that every POST form must echo back.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

COOKIE = "vmvault_session"
SIGNIN_COOKIE = "vmvault_signin"  # double-submit CSRF of the sign-in form (no session exists yet)
IDLE_SECONDS = 12 * 3600  # a session unused this long is forgotten
MAX_SESSIONS = 10_000


@dataclass
class PortalSession:
    id: str
    token: str
    csrf: str
    last_seen: float
    toasts: list[dict[str, Any]] = field(default_factory=list)

    def csrf_ok(self, sent: object) -> bool:
        return isinstance(sent, str) and hmac.compare_digest(sent.encode(), self.csrf.encode())

    def toast(self, message: str, job: str | None = None, level: str = "info") -> None:
        """A notification shown once, on the next page (with a link to the job it started)."""
        self.toasts.append({"message": message, "job": job, "level": level})

    def pop_toasts(self) -> list[dict[str, Any]]:
        out, self.toasts = self.toasts, []
        return out


class SessionStore:
    """Sessions by id; thread-safe (handlers run in a thread pool)."""

    def __init__(self) -> None:
        self._sessions: dict[str, PortalSession] = {}
        self._lock = threading.Lock()

    def create(self, token: str) -> PortalSession:
        now = time.monotonic()
        session = PortalSession(secrets.token_urlsafe(32), token, secrets.token_urlsafe(32), now)
        with self._lock:
            self._expire(now)
            if len(self._sessions) >= MAX_SESSIONS:  # refuse to grow without bound: drop the oldest
                oldest = min(self._sessions.values(), key=lambda s: s.last_seen)
                self._sessions.pop(oldest.id, None)
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> PortalSession | None:
        if not session_id:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or now - session.last_seen > IDLE_SECONDS:
                self._sessions.pop(session_id, None)
                return None
            session.last_seen = now
            return session

    def drop(self, session_id: str | None) -> None:
        with self._lock:
            self._sessions.pop(session_id or "", None)

    def _expire(self, now: float) -> None:
        for sid in [s.id for s in self._sessions.values() if now - s.last_seen > IDLE_SECONDS]:
            del self._sessions[sid]


def signin_csrf_ok(cookie: str | None, sent: object) -> bool:
    return bool(cookie) and isinstance(sent, str) and hmac.compare_digest(sent.encode(), str(cookie).encode())

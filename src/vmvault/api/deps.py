"""Dependencies of the handlers: the service context, the caller, and long operations run as jobs."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from vmvault.api.auth import current_principal
from vmvault.errors import InternalError
from vmvault.service import jobs
from vmvault.service.context import Context
from vmvault.service.tokens import Principal
from vmvault.service.views import JsonDict

log = logging.getLogger("vmvault")


def service_ctx(request: Request) -> Context:
    """The server's service context (one per process, shared with the scheduler and workers), as seen by
    API callers: the paths they send are confined to the allowed roots (service/paths.py)."""
    ctx: Context = request.app.state.remote_ctx
    return ctx


def background(request: Request) -> Background:
    runner: Background = request.app.state.background
    return runner


@dataclass
class Background:
    """Long operations started by the API: each runs in a thread of the server process.

    start() returns the job as soon as the operation has recorded it (202); an error raised
    before that (bad input, unknown object) is raised to the caller instead.
    """

    ctx: Context
    _threads: dict[str, tuple[threading.Thread, threading.Event]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, work: Callable[[threading.Event], Any]) -> JsonDict:
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        cancel = threading.Event()

        def run() -> None:
            try:
                with jobs.on_job_created(lambda job_id: events.put(("job", job_id))):
                    work(cancel)
                events.put(("done", None))
            except BaseException as exc:
                events.put(("error", exc))
                if not isinstance(exc, Exception):
                    raise
            finally:
                with self._lock:
                    self._threads.pop(threading.current_thread().name, None)

        thread = threading.Thread(target=run, daemon=True)
        thread.name = f"vmvault-api-job-{id(thread):x}"
        with self._lock:
            self._threads[thread.name] = (thread, cancel)
        thread.start()
        kind, value = events.get()
        if kind == "job":
            return jobs.show_job(self.ctx, str(value))
        if kind == "error":
            raise value
        raise InternalError("the operation ended without recording a job", hint="report it")

    def stop(self, timeout: float = 60.0) -> None:
        """Cancel what still runs and wait for it to record how it ended."""
        with self._lock:
            running = list(self._threads.values())
        for _thread, cancel in running:
            cancel.set()
        for thread, _cancel in running:
            thread.join(timeout)


Ctx = Annotated[Context, Depends(service_ctx)]
Caller = Annotated[Principal, Depends(current_principal)]
Jobs = Annotated[Background, Depends(background)]

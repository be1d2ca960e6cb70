"""Running a job from the CLI: a progress bar on stderr (TTY only) and Ctrl-C to cancel."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
ProgressCallback = Callable[[Any], None]


@contextmanager
def progress_display(label: str) -> Iterator[ProgressCallback | None]:
    """A callback that draws engine Progress on stderr, or None when stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(p: Any) -> None:
            disk = f" {p.current_disk}" if getattr(p, "current_disk", "") else ""
            total = p.total_bytes or None
            bar.update(task, total=total, completed=p.bytes_read, description=f"{label}{disk}")

        yield update


def run_cancellable(work: Callable[[threading.Event], T]) -> T:
    """Run work in a thread; the first Ctrl-C sets its cancel event, a second one gives up waiting."""
    cancel, done = threading.Event(), threading.Event()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = work(cancel)
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    # Wait on an Event, not Thread.join: an interrupted join can leave the thread looking finished.
    threading.Thread(target=target, name="vmvault-job", daemon=True).start()
    while not done.is_set():
        try:
            done.wait(0.2)
        except KeyboardInterrupt:
            if cancel.is_set():
                raise
            cancel.set()
            sys.stderr.write("cancelling... (Ctrl-C again to stop waiting)\n")
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result

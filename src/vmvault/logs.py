"""Logging of `vmvault serve`: text (default) or one JSON object per line (`--log-format json`).

Every line logged while a job runs carries its job ID and VM: run_job (service/jobs.py) and the
workers set them in a context variable, which a filter copies onto each record. Threads that a
job starts for its own work (readers, pools) log without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime

FORMATS = ("text", "json")
_JOB: ContextVar[tuple[str, str | None] | None] = ContextVar("vmvault_job", default=None)


@contextlib.contextmanager
def job_context(job_id: str, vm: str | None) -> Iterator[None]:
    """Lines logged inside (in this thread) name the job and its VM."""
    token = _JOB.set((job_id, vm))
    try:
        yield
    finally:
        _JOB.reset(token)


class JobFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        job = _JOB.get()
        record.job_id, record.vm = job if job is not None else (None, None)
        return True


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", "jobId", "vm", "exception"}: the last three when set."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None)
        if job_id is not None:
            entry["jobId"] = job_id
            entry["vm"] = getattr(record, "vm", None)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job_id = getattr(record, "job_id", None)
        return f"{text} [job {job_id} vm {getattr(record, 'vm', None) or '-'}]" if job_id is not None else text


def configure(fmt: str = "text") -> None:
    """Log WARNING and up (vmvault's own INFO and up) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("vmvault").setLevel(logging.INFO)

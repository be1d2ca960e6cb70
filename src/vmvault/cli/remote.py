"""`--server URL`: commands that run against a vmvault server's API (token from VMVAULT_TOKEN).

The API answers with the same JSON the service returns, so the command prints exactly what it
prints locally; an API error becomes the same VmvaultError (code, message, hint, exit code).
Commands without a remote form refuse --server (cli/state.service_context).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from vmvault.cli.state import STATE
from vmvault.errors import Busy, InvalidInput, VmvaultError

TIMEOUT_S = 60.0
POLL_S = 0.5
ENDED = ("Completed", "CompletedWithWarnings", "Failed", "Cancelled")


class ServerUnreachable(VmvaultError):
    code = "server_unreachable"
    exit_code = 69
    http_status = 502


def active() -> bool:
    return STATE.server is not None


def q(name: str) -> str:
    """A path segment, quoted."""
    return urllib.parse.quote(name, safe="")


def _token() -> str:
    token = os.environ.get("VMVAULT_TOKEN", "").strip()
    if not token:
        raise InvalidInput(
            "--server needs an API token in VMVAULT_TOKEN",
            hint="make one on the server: vmvault token create --role BackupReader (or another role)",
        )
    return token


def _error_class(code: str) -> type[VmvaultError]:
    from vmvault.cli.errors import _subclasses

    for cls in _subclasses(VmvaultError):
        if cls.code == code and cls is not VmvaultError:
            return cls
    return VmvaultError


def call(method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
    """One API call; returns the decoded JSON (None for 204); raises the error the server reported."""
    base = (STATE.server or "").rstrip("/")
    query = {k: ("true" if v is True else "false" if v is False else v) for k, v in (params or {}).items()}
    query = {k: v for k, v in query.items() if v is not None}
    url = f"{base}/api/v1{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {_token()}", "Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise _api_error(exc) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerUnreachable(
            f"cannot reach the vmvault server at {base}: {reason}",
            hint="check --server URL (e.g. http://127.0.0.1:8080) and that vmvault serve runs there",
        ) from None
    return json.loads(raw) if raw else None


def _api_error(exc: urllib.error.HTTPError) -> VmvaultError:
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        body = {}
    code = str(body.get("code") or "internal_error")
    message = str(body.get("message") or f"the server answered {exc.code}")
    cls = _error_class(code)
    return cls(message, hint=body.get("hint"), code=code)


def get(path: str, **params: Any) -> Any:
    return call("GET", path, params=params)


def post(path: str, body: Any = None) -> Any:
    return call("POST", path, body if body is not None else {})


def job_view(job: dict[str, Any]) -> dict[str, Any]:
    """A job as `job list` prints it (GET /jobs/{id} adds extendedInfo)."""
    return {k: v for k, v in job.items() if k != "extendedInfo"}


def wait_job(job_id: str, timeout: float | None = None) -> dict[str, Any]:
    """Poll the job until it ends; Busy (code "timeout") after timeout seconds. Returns it with extendedInfo."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job: dict[str, Any] = get(f"/jobs/{q(job_id)}")
        if job["status"] in ENDED:
            return job
        if deadline is not None and time.monotonic() >= deadline:
            raise Busy(
                f"job {job_id} is still running after {timeout:g} s",
                hint=f"wait longer: vmvault job wait {job_id}",
                code="timeout",
            )
        time.sleep(POLL_S)

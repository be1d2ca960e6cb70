"""`--server URL`: commands that run against a vmvault server's API (token from VMVAULT_TOKEN).

The API answers with the same JSON the CLI prints (service/azure_shape.py for jobs, items,
points, vaults; lists come in pages, {"value", "nextLink"}, which get_list joins), so the command
prints exactly what it prints locally; an API error becomes the same VmvaultError (code, message, hint, exit code).
Commands without a remote form refuse --server (cli/state.service_context), and so do options
the API does not take (refuse_option). Long operations answer 202 with their job; the command
follows it by polling (run_job) and prints it as it does locally.

HTTPS: the server's certificate is checked against the system's CAs plus VMVAULT_CA_FILE (a
private CA or a self-signed certificate; service/tls.py); plain http:// is refused to anything
but a loopback address, since every request carries the token.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

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


def refuse_option(option: str, given: bool) -> None:
    """An option the API does not take: refuse it with --server rather than ignore it."""
    if given and active():
        raise InvalidInput(
            f"{option} does not run against a server (--server {STATE.server})",
            hint=f"run the command on the server itself, or leave {option} out",
        )


def storage_location(location: str | None, option: str) -> str | None:
    """A vault location for the API: an object-store URL as given, else a path on the server."""
    from vmvault.vault.backends import is_url

    if location is None or is_url(location):
        return location
    return server_path(Path(location), option)


def server_path(path: Path | None, option: str) -> str | None:
    """A path on the server, for the API: absolute (a relative one would be read from the server's cwd)."""
    if path is None:
        return None
    if not path.is_absolute():
        raise InvalidInput(
            f"with --server, {option} is a path on the server and must be absolute: {path}",
            hint="give it from /, as the server sees it",
        )
    return str(path)


def _request(method: str, path: str, body: Any, params: dict[str, Any] | None) -> urllib.request.Request:
    from vmvault.service.tls import check_server_url

    base = (STATE.server or "").rstrip("/")
    check_server_url(base)  # before the token is read or sent
    query = {k: ("true" if v is True else "false" if v is False else v) for k, v in (params or {}).items()}
    query = {k: v for k, v in query.items() if v is not None}
    url = f"{base}/api/v1{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {_token()}", "Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    return urllib.request.Request(url, data=data, method=method, headers=headers)


def _unreachable(exc: BaseException) -> ServerUnreachable:
    from vmvault.service.tls import untrusted_hint

    base = (STATE.server or "").rstrip("/")
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return ServerUnreachable(
            f"the vmvault server at {base} is not trusted: {reason.verify_message or reason}", hint=untrusted_hint()
        )
    return ServerUnreachable(
        f"cannot reach the vmvault server at {base}: {reason}",
        hint="check --server URL (e.g. http://127.0.0.1:8080) and that vmvault serve runs there",
    )


@contextmanager
def _open(request: urllib.request.Request) -> Iterator[Any]:
    """The server's response; its error document raised as the VmvaultError it names."""
    from vmvault.service.tls import client_context

    context = client_context() if request.type == "https" else None
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context)
    except urllib.error.HTTPError as exc:
        raise _api_error(exc) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _unreachable(exc) from None
    with response:
        yield response


def _read(response: Any, size: int = -1) -> bytes:
    """A read of the answer; a connection lost on the way is the server being unreachable."""
    try:
        data: bytes = response.read(size)
    except (OSError, http.client.HTTPException) as exc:
        raise _unreachable(exc) from None
    return data


def call(method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
    """One API call; returns the decoded JSON (None for 204); raises the error the server reported."""
    with _open(_request(method, path, body, params)) as response:
        raw = _read(response)
    return json.loads(raw) if raw else None


def download(path: str, sink: BinaryIO, /, **params: Any) -> int:
    """Stream a GET answer (a file) into sink; returns the bytes written (all of them, or an error)."""
    written = 0
    with _open(_request("GET", path, None, params)) as response:
        expected = response.headers.get("Content-Length")
        while block := _read(response, 1 << 20):
            sink.write(block)
            written += len(block)
    if expected is not None and written != int(expected):
        raise ServerUnreachable(
            f"the download from {STATE.server} ended after {written} of {expected} bytes",
            hint="run the command again",
        )
    return written


def _api_error(exc: urllib.error.HTTPError) -> VmvaultError:
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        body = {}
    code = str(body.get("code") or "internal_error")
    message = str(body.get("message") or f"the server answered {exc.code}")
    cls = _error_class(code)
    return cls(message, hint=body.get("hint"), code=code)


def get(path: str, /, **params: Any) -> Any:
    return call("GET", path, params=params)


def post(path: str, body: Any = None) -> Any:
    return call("POST", path, body if body is not None else {})


def put(path: str, body: Any) -> Any:
    return call("PUT", path, body)


def delete(path: str, /, **params: Any) -> Any:
    return call("DELETE", path, params=params)


def get_list(path: str, /, **params: Any) -> list[Any]:
    """Every page of a list answer ({"value": [...], "nextLink": URL}), as one list.

    Only the nextLink's $skipToken is taken: the next page is asked of the same server and path
    (the token is never sent to whatever host a link might name).
    """
    page: dict[str, Any] = get(path, **params)
    rows = list(page["value"])
    while page.get("nextLink"):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(str(page["nextLink"])).query)
        tokens = query.get("$skipToken") or []
        if not tokens:
            break
        token = tokens[0]
        page = get(path, **params, **{"$skipToken": token})
        rows.extend(page["value"])
    return rows


def job_view(job: dict[str, Any]) -> dict[str, Any]:
    """A job as `job list` prints it (job show's extendedInfo without the details only show has)."""
    return job


def _status(job: dict[str, Any]) -> str:
    return str(job["properties"]["status"])


def vm_running(job: dict[str, Any]) -> bool:
    """An instant restore's new VM runs (on the vault's export; the job goes on copying its disks)."""
    return bool(((job["properties"].get("extendedInfo") or {}).get("restore") or {}).get("vmRunning"))


def wait_job(
    job_id: str, timeout: float | None = None, until: Callable[[dict[str, Any]], bool] | None = None
) -> dict[str, Any]:
    """Poll the job until it ends (or until(job)); Busy (code "timeout") after timeout seconds.

    Returns it with extendedInfo.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job: dict[str, Any] = get(f"/jobs/{q(job_id)}")
        if _status(job) in ENDED or (until is not None and until(job)):
            return job
        if deadline is not None and time.monotonic() >= deadline:
            raise Busy(
                f"job {job_id} is still running after {timeout:g} s",
                hint=f"wait longer: vmvault job wait {job_id}",
                code="timeout",
            )
        time.sleep(POLL_S)


def run_job(path: str, body: Any = None, until: Callable[[dict[str, Any]], bool] | None = None) -> Any:
    """Start a long operation (202 + its job), follow it to its end (or until); the JobOutcome to print."""
    from vmvault.service.jobs import JobOutcome

    job = post(path, body)
    return JobOutcome(job=job_view(wait_job(job["name"], until=until)))

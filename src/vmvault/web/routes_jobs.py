"""Jobs: the list with filters and live progress, a job's details and errors, cancel."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from starlette.responses import Response

from vmvault.api.auth import Permission, Scope
from vmvault.service import jobs
from vmvault.service.jobs import Operation, Status
from vmvault.web.core import PortalRoute, access, ctx_of, principal_of, redirect, render, session_of

router = APIRouter(route_class=PortalRoute, include_in_schema=False)
LIST_LIMIT = 200


def _since(request: Request, hours: str) -> str | None:
    """?hours=24: jobs started in the last N hours (the overview's counts link here)."""
    if not hours.isdigit() or not 0 < int(hours) <= 24 * 366:
        return None
    return (ctx_of(request).now() - timedelta(hours=int(hours))).isoformat(timespec="seconds")


def _rows(request: Request, vm: str, status: str, operation: str, hours: str = "") -> list[dict[str, object]]:
    # A vault-scoped token's jobs are chosen by the catalog: its list is full even among other vaults' jobs.
    return jobs.list_jobs(
        ctx_of(request), vm=vm or None, status=status or None, operation=operation or None, limit=LIST_LIMIT,
        since=_since(request, hours), vault=principal_of(request).vault,
    )


@router.get("/jobs")
@access(Permission.READ)
def job_list(request: Request, vm: str = "", status: str = "", operation: str = "", hours: str = "") -> Response:
    rows = _rows(request, vm, status, operation, hours)
    hours = hours if _since(request, hours) else ""
    fields = (("vm", vm), ("status", status), ("operation", operation), ("hours", hours))
    query = urlencode({k: v for k, v in fields if v})
    return render(
        request, "jobs.html", jobs=rows, vm=vm, status=status, operation=operation, hours=hours,
        statuses=Status.ALL, operations=Operation.ALL, live_url=f"/jobs/rows?{query}",
    )  # fmt: skip


@router.get("/jobs/rows")
@access(Permission.READ)
def job_rows(request: Request, vm: str = "", status: str = "", operation: str = "", hours: str = "") -> Response:
    """The list's rows alone: portal.js fetches them every second (live progress, no reload)."""
    return render(request, "jobs_rows.html", fragment=True, jobs=_rows(request, vm, status, operation, hours))


@router.get("/jobs/{job_id}")
@access(Permission.READ, Scope.JOB)
def job_page(request: Request, job_id: str) -> Response:
    return render(request, "job.html", job=jobs.describe_job(ctx_of(request), job_id))


@router.get("/jobs/{job_id}/live")
@access(Permission.READ, Scope.JOB)
def job_live(request: Request, job_id: str) -> Response:
    return render(request, "job_live.html", fragment=True, job=jobs.describe_job(ctx_of(request), job_id))


@router.post("/jobs/{job_id}/cancel")
@access(Permission.JOB_CANCEL, Scope.JOB)
def cancel(request: Request, job_id: str) -> Response:
    jobs.cancel_job(ctx_of(request), job_id)
    session_of(request).toast(f"Cancellation of job {job_id} requested.", job=job_id)
    return redirect(f"/jobs/{job_id}")

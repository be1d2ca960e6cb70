"""Jobs (job list|show|cancel)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from vmvault.api.auth import Permission, Scope, require
from vmvault.api.deps import Caller, Ctx
from vmvault.api.routes.common import ROUTE_CLASS, Pages
from vmvault.api.schemas import Job, JobDetails, Page
from vmvault.service import jobs

router = APIRouter(tags=["jobs"], route_class=ROUTE_CLASS)


@router.get("/jobs", response_model=Page[Job], dependencies=[require(Permission.READ, Scope.GLOBAL)])
def list_jobs(
    ctx: Ctx,
    caller: Caller,
    vm: str | None = None,
    status: str | None = None,
    operation: str | None = None,
    since: str | None = None,
    limit: int = 0,
    *,
    pages: Pages,
) -> dict[str, Any]:
    # The catalog cuts the page (and keeps a vault-scoped token's jobs only): 100,000 jobs are not loaded.
    rows, more = jobs.list_jobs_page(
        ctx, vm=vm, status=status, operation=operation, since=since, vault=caller.vault, limit=max(limit, 0),
        offset=pages.start, top=pages.top,
    )  # fmt: skip
    return pages.window(rows, more)


@router.get("/jobs/{job_id}", response_model=JobDetails, dependencies=[require(Permission.READ, Scope.JOB)])
def show_job(job_id: str, ctx: Ctx) -> dict[str, Any]:
    return jobs.describe_job(ctx, job_id)


@router.post(
    "/jobs/{job_id}/cancel", response_model=JobDetails, dependencies=[require(Permission.JOB_CANCEL, Scope.JOB)]
)
def cancel_job(job_id: str, ctx: Ctx) -> dict[str, Any]:
    return jobs.cancel_job(ctx, job_id)

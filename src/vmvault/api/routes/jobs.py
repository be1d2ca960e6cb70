"""Jobs (job list|show|cancel)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from vmvault.api.auth import Permission, Scope, require, visible
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
    rows = jobs.list_jobs(ctx, vm=vm, status=status, operation=operation, limit=max(limit, 0), since=since)
    return pages.page(visible(caller, rows))


@router.get("/jobs/{job_id}", response_model=JobDetails, dependencies=[require(Permission.READ, Scope.JOB)])
def show_job(job_id: str, ctx: Ctx) -> dict[str, Any]:
    return jobs.describe_job(ctx, job_id)


@router.post(
    "/jobs/{job_id}/cancel", response_model=JobDetails, dependencies=[require(Permission.JOB_CANCEL, Scope.JOB)]
)
def cancel_job(job_id: str, ctx: Ctx) -> dict[str, Any]:
    return jobs.cancel_job(ctx, job_id)

"""Agents (`vmvault agent run`): register, heartbeat, claim and report the jobs of their host.

Only a BackupAgent token bound to {host} reaches these routes (Scope.HOST); the logic is in
service/agentwork.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from vmvault.api.auth import Permission, Scope, require
from vmvault.api.deps import Ctx
from vmvault.api.routes.common import ROUTE_CLASS, Body
from vmvault.api.schemas import View
from vmvault.service import agentwork, hostinstant

router = APIRouter(prefix="/agents/{host}", tags=["agents"], route_class=ROUTE_CLASS)
AGENT = [require(Permission.AGENT_WORK, Scope.HOST)]


class Register(Body):
    version: str = Field(max_length=32, description="The agent's vmvault version")
    api_version: int = Field(description="The agent API version the agent speaks")
    boot_id: str = Field(default="", max_length=64)
    pid: int = Field(default=0, ge=0)
    hypervisors: dict[str, Any] = Field(default_factory=dict, description="libvirtUri, qmpSockets, libvirtDomains")
    file_sessions: list[dict[str, Any]] | None = Field(
        default=None, max_length=1000, description="Its file-recovery sessions after its start-up reconcile"
    )


class Heartbeat(Body):
    running: list[str] = Field(default_factory=list, max_length=1000, description="Ids of the jobs it runs")
    file_sessions: list[dict[str, Any]] | None = Field(
        default=None, max_length=1000, description="Its file-recovery sessions (live, and lately ended)"
    )
    hypervisors: dict[str, Any] | None = Field(
        default=None, description="Now and then (every 30 s): what the agent finds, as at registration (libvirt "
        "domains and their states: a libvirt VM is backed up by the host where its domain runs)"
    )


class Claim(Body):
    pid: int = Field(default=0, ge=0)


class Progress(Body):
    progress: dict[str, Any] = Field(default_factory=dict)
    details: dict[str, Any] | None = None


class SaveVm(Body):
    updates: dict[str, Any] = Field(default_factory=dict)
    disks: list[dict[str, Any]] | None = None


class SaveDisk(Body):
    name: str = Field(max_length=64)
    values: dict[str, Any] = Field(default_factory=dict)


class Finish(Body):
    status: str = Field(max_length=32, description="Completed, Failed or Cancelled")
    recovery_point: str | None = Field(default=None, max_length=64)
    files: list[str] | None = Field(default=None, max_length=1024, description="A Restore: the files written")
    new_vm: dict[str, Any] | None = Field(
        default=None, description="A restore as a new VM: the copy defined on the host (kind, disks, definition, "
        "files, view, started)"
    )
    sessions: list[dict[str, Any]] | None = Field(
        default=None, max_length=1000, description="A file-recovery mount or unmount: its sessions"
    )
    error: dict[str, Any] | None = None
    warnings: list[dict[str, Any]] = Field(default_factory=list, max_length=100)
    progress: dict[str, Any] | None = None
    details: dict[str, Any] | None = None


class InstantReport(Body):
    restore: dict[str, Any] | None = Field(
        default=None, description="The job's state (state, vmRunning, disks, exportPid ...): details.restore"
    )
    error: dict[str, Any] | None = Field(default=None, description="The job's error while InProgress (null: none)")
    new_vm: dict[str, Any] | None = Field(
        default=None, description="The copy defined on the host, before it boots (kind, disks, definition, files, "
        "view): registered as a VM of the host"
    )
    unregister: bool = Field(default=False, description="The copy was stopped and removed: forget its VM")


class AgentInstant(View):
    cancel: bool = Field(description="Stop the job: it was cancelled")
    name: str | None = Field(default=None, description="The registered VM's name (with newVm)")
    id: str | None = Field(default=None, description="The registered VM's id (with newVm)")


class AgentRegistered(View):
    host: str
    api_version: int
    heartbeat_seconds: float = Field(description="How often the agent beats")
    lease_seconds: float = Field(description="Silent longer than this: its jobs end agent_lost")
    vms: list[dict[str, Any]] = Field(description="The host's VMs (id, name, kind, definition): start-up reconcile")


class AgentCancels(View):
    cancel: list[str] = Field(description="Ids of running jobs to stop (cancelled, or ended by the server)")
    end_sessions: list[str] = Field(
        default_factory=list, description="File-recovery sessions it reported that ended on the server: end them"
    )


class AgentClaimed(View):
    package: dict[str, Any] | None = Field(
        description="The work package (a Backup: jobId, details, vm, retainUntil, vault, previousPoint, "
        "pointTimeFloor, budget; a Restore: jobId, operation, details, vm, vault, restore, hostDisks; a "
        "FileRecoveryMount/Unmount: jobId, operation, details, vm, vault, files), or null "
        "when no job of this host is queued"
    )


class AgentProgressed(View):
    cancel: bool = Field(description="Stop the job: it was cancelled")


class AgentSaved(View):
    saved: bool


class AgentJobEnded(View):
    """The job as the service shows it (job show's fields)."""

    id: str
    status: str
    host: str | None = None
    error: dict[str, Any] | None = None


@router.post("/register", response_model=AgentRegistered, dependencies=AGENT)
def register(host: str, body: Register, ctx: Ctx) -> dict[str, Any]:
    return agentwork.register(ctx, host, body.model_dump(by_alias=True))


@router.post("/heartbeat", response_model=AgentCancels, dependencies=AGENT)
def heartbeat(host: str, body: Heartbeat, ctx: Ctx) -> dict[str, Any]:
    return agentwork.heartbeat(ctx, host, body.running, body.file_sessions, body.hypervisors)


@router.post("/claim", response_model=AgentClaimed, dependencies=AGENT)
def claim(host: str, body: Claim, ctx: Ctx) -> dict[str, Any]:
    return {"package": agentwork.claim(ctx, host, body.pid)}


@router.post("/jobs/{job_id}/progress", response_model=AgentProgressed, dependencies=AGENT)
def progress(host: str, job_id: str, body: Progress, ctx: Ctx) -> dict[str, Any]:
    return agentwork.progress(ctx, host, job_id, body.progress, body.details)


@router.post("/jobs/{job_id}/vm", response_model=AgentSaved, dependencies=AGENT)
def save_vm(host: str, job_id: str, body: SaveVm, ctx: Ctx) -> dict[str, Any]:
    agentwork.save_vm(ctx, host, job_id, body.updates, body.disks)
    return {"saved": True}


@router.post("/jobs/{job_id}/disk", response_model=AgentSaved, dependencies=AGENT)
def save_disk(host: str, job_id: str, body: SaveDisk, ctx: Ctx) -> dict[str, Any]:
    agentwork.save_disk(ctx, host, job_id, body.name, body.values)
    return {"saved": True}


@router.post("/jobs/{job_id}/instant", response_model=AgentInstant, dependencies=AGENT)
def instant(host: str, job_id: str, body: InstantReport, ctx: Ctx) -> dict[str, Any]:
    """An instant restore's bookkeeping while it runs (service/hostinstant.py)."""
    return hostinstant.report(ctx, host, job_id, body.model_dump(by_alias=True, exclude_unset=True))


@router.post("/jobs/{job_id}/finish", response_model=AgentJobEnded, dependencies=AGENT)
def finish(host: str, job_id: str, body: Finish, ctx: Ctx) -> dict[str, Any]:
    return agentwork.finish(ctx, host, job_id, body.model_dump(by_alias=True))

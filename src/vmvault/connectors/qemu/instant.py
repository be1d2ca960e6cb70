"""Instant restore at the QEMU level: overlays on a block export, and the QMP calls that migrate off it.

A restored disk starts as a local qcow2 overlay whose backing file is the vault's NBD export of the
point (backing format raw). The guest device stops the VM on a read or write error
(`rerror=stop,werror=stop`), so an export that vanishes pauses the VM (status `io-error`) instead
of handing the guest EIO. `block-stream` with the overlay as top copies everything the overlay
lacks from the export into it and then drops the backing file: the disk is local. Each function
here is one QMP command (or one qemu-img call) named after what it does.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmvault.connectors.qemu.qmp import QmpClient, QmpError
from vmvault.errors import HypervisorError

JsonDict = dict[str, Any]
STREAM_JOB_PREFIX = "vmv-stream-"


# ---- the overlay --------------------------------------------------------------------------------


def nbd_backing(socket: Path, export: str) -> str:
    """The backing file name of an NBD export on a unix socket (QEMU reconnects to it by this path)."""
    return f"nbd+unix:///{export}?socket={socket}"


def create_overlay(path: Path, socket: Path, export: str, size: int) -> None:
    """A qcow2 overlay of `size` bytes on the export (-u: the size is known, the export need not answer)."""
    # 0600 before qemu-img writes it (it keeps an existing file's mode): guest data, never readable by others
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    os.chmod(path, 0o600)
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b", nbd_backing(socket, export),
           str(path), str(size)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HypervisorError(f"could not create the overlay {path}: {proc.stderr.strip()}")


def image_backing(path: Path) -> str | None:
    """The backing file an image names now (qemu-img info -U: readable while QEMU has it open)."""
    proc = subprocess.run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(path)], capture_output=True,
                          text=True)  # the overlay vmvault made: qcow2, never guessed  # fmt: skip
    if proc.returncode != 0:
        raise HypervisorError(f"qemu-img info {path} failed: {proc.stderr.strip()}")
    backing = json.loads(proc.stdout).get("backing-filename")
    return str(backing) if backing else None


def drop_backing_offline(path: Path) -> None:
    """Copy what the overlay lacks from its (still served) backing and drop it: block-stream without a VM."""
    proc = subprocess.run(["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise HypervisorError(f"could not copy the rest of {path} from the export: {proc.stderr.strip()}")


def stop_on_errors(cmdline: list[str], nodes: list[str]) -> list[str]:
    """The command line with `werror=stop,rerror=stop` on the guest devices of these disk nodes.

    `-device …,drive=NODE` gets them; a `-drive` that is its own device (no `-device` uses its id, not
    a cdrom) gets them on the `-drive`.
    """
    out = list(cmdline)
    opts = [(i, out[i].lstrip("-"), _keys(out[i + 1])) for i in range(1, len(out) - 1) if out[i].startswith("-")]
    devices = {k.get("drive") for _i, option, k in opts if option == "device"}
    for i, option, keys in opts:
        if "werror" in keys or "rerror" in keys or out[i + 1].startswith("{"):
            continue
        ours = (
            keys.get("drive") in nodes
            if option == "device"
            else (option == "drive" and keys.get("id") not in devices and keys.get("media") != "cdrom")
        )
        if ours:
            out[i + 1] += ",werror=stop,rerror=stop"
    return out


def _keys(value: str) -> dict[str, str]:
    return {key: val for key, _, val in (part.partition("=") for part in value.split(","))}


# ---- block-stream jobs ----------------------------------------------------------------------------


def stream_job_id(node: str) -> str:
    return STREAM_JOB_PREFIX + node


def start_stream(qmp: QmpClient, node: str, speed: int = 0) -> str:
    """block-stream the whole backing chain into node (the overlay); a read error pauses the job."""
    job_id = stream_job_id(node)
    args: JsonDict = {"job-id": job_id, "device": node, "on-error": "stop", "auto-dismiss": False}
    if speed > 0:
        args["speed"] = speed
    qmp.execute("block-stream", args)
    return job_id


@dataclass(frozen=True)
class JobState:
    job_id: str
    status: str  # query-jobs: running, paused, ready, concluded, ...
    done: int  # bytes copied so far
    total: int
    error: str | None  # set on a concluded job that failed


def stream_jobs(qmp: QmpClient) -> dict[str, JobState]:
    """vmvault's stream jobs by id (query-jobs)."""
    found: dict[str, JobState] = {}
    for job in qmp.execute("query-jobs") or []:
        job_id = str(job.get("id") or "")
        if job_id.startswith(STREAM_JOB_PREFIX):
            found[job_id] = JobState(job_id, str(job.get("status")), int(job.get("current-progress") or 0),
                                     int(job.get("total-progress") or 0), job.get("error"))  # fmt: skip
    return found


def paused_streams(qmp: QmpClient) -> list[str]:
    """vmvault's stream jobs that are paused: by a read error (on-error=stop), or by hand.

    io-status cannot tell which: `cont` resets it while the job stays paused.
    """
    return [job_id for job_id, state in stream_jobs(qmp).items() if state.status == "paused"]


def resume_job(qmp: QmpClient, job_id: str) -> None:
    qmp.execute("block-job-resume", {"device": job_id})


def set_job_speed(qmp: QmpClient, job_id: str, speed: int) -> None:
    qmp.execute("block-job-set-speed", {"device": job_id, "speed": speed})


def cancel_job(qmp: QmpClient, job_id: str) -> None:
    qmp.execute("block-job-cancel", {"device": job_id, "force": True})


def dismiss_job(qmp: QmpClient, job_id: str) -> None:
    qmp.execute("job-dismiss", {"id": job_id})


# ---- the machine ----------------------------------------------------------------------------------


def vm_status(qmp: QmpClient) -> str:
    """query-status: running, paused, io-error (paused by a disk error), ..."""
    return str(qmp.query_status().get("status"))


def resume_after_io_error(qmp: QmpClient) -> bool:
    """`cont` a VM paused by a disk error (only that: a VM someone paused stays paused); True if resumed."""
    if vm_status(qmp) != "io-error":
        return False
    try:
        qmp.cont()
    except QmpError:
        return False
    return True


# ---- the copy of an instant restore (connectors/contract.py LiveCopy) --------------------------------


def finish_offline(disks: list[Any]) -> None:
    """The VM stopped before the copy completed: copy the rest without it, against the export."""
    for disk in disks:
        if not disk.done and image_backing(Path(disk.path)) is not None:
            drop_backing_offline(Path(disk.path))
        disk.done = True


def check_local(disks: list[Any]) -> None:
    from vmvault.errors import IntegrityError

    for disk in disks:
        backing = image_backing(Path(disk.path))
        if backing is not None:
            raise IntegrityError(f"the disk {disk.path} still has the backing file {backing} after the copy")

"""libvirt-managed VMs: discover and add domains, back them up live (pull backups) or offline.

A backup of a running domain (docs/libvirt.md):
  abort a leftover job -> pre-script (agent through libvirt) -> backupBegin (pull, scratch per disk,
  a new checkpoint, QUIESCE when the agent allows freezing) -> post-script -> engine reads the NBD
  exports (changed extents from `qemu:dirty-bitmap:backup-<disk>` for an incremental) -> abortJob.
A stopped domain's images are read offline holding their lock: CrashConsistent. Stale checkpoints
(after `virsh destroy` or a host crash) are dropped (metadata only) and a new chain starts.
Every point's manifest holds the domain XML and the point's checkpoint (`vm_definition`).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmvault.catalog import repos
from vmvault.catalog.clock import now_iso
from vmvault.catalog.models import VmRow
from vmvault.errors import InvalidInput
from vmvault.service.context import Context
from vmvault.service.validate import check_name
from vmvault.service.views import JsonDict

log = logging.getLogger("vmvault")

KIND_LIBVIRT = "libvirt"


# ---- discover and add ------------------------------------------------------------------------------------


def discover(ctx: Context, uri: str | None = None) -> list[JsonDict]:
    """The domains at uri that no VM of this catalog is yet."""
    from vmvault.connectors.libvirt import domain as lv

    uri = uri or lv.DEFAULT_URI
    with ctx.catalog.read() as s:
        known = {str((r.definition or {}).get("uuid")) for r in repos.list_vms(s) if r.kind == KIND_LIBVIRT}
    conn = lv.connect(uri)
    try:
        found = [lv.inspect(d) for d in conn.listAllDomains(0)]
    finally:
        conn.close()
    return [{**d.to_dict(), "connect": uri} for d in sorted(found, key=lambda d: d.name) if d.uuid not in known]


def add_libvirt_vm(ctx: Context, name: str, domain: str, uri: str | None = None) -> JsonDict:
    from vmvault.connectors.libvirt import domain as lv
    from vmvault.service.vms import _refuse_taken, _refuse_taken_in, _view

    check_name("VM", name)
    uri = uri or lv.DEFAULT_URI
    _refuse_taken(ctx, name)
    conn = lv.connect(uri)
    try:
        info = lv.inspect(lv.lookup(conn, domain))
    finally:
        conn.close()
    if not info.disks:
        raise InvalidInput(f"domain '{domain}' has no writable file disk to back up")
    row = VmRow(
        id=str(uuid.uuid4()),
        name=name,
        kind=KIND_LIBVIRT,
        disks=[{"name": d.name, "path": d.path, "format": d.format} for d in info.disks],  # the XML's <driver type>
        definition=_definition(uri, info),
        created=now_iso(),
    )
    with ctx.catalog.write() as s:
        _refuse_taken_in(s, name)
        if any((r.definition or {}).get("uuid") == info.uuid for r in repos.list_vms(s) if r.kind == KIND_LIBVIRT):
            raise InvalidInput(f"domain '{domain}' ({info.uuid}) is already added", hint="see it with: vmvault vm list")
        repos.add_vm(s, row)
        return _view(s, row)


def _definition(uri: str, info: Any) -> JsonDict:
    return {
        "kind": KIND_LIBVIRT,
        "connect": uri,
        "domain": info.name,
        "uuid": info.uuid,
        "disks": [{"name": d.name, "path": d.path, "format": d.format} for d in info.disks],
        "agentChannel": info.agent_channel,
        "domainXml": info.xml,
    }


# ---- backups -------------------------------------------------------------------------------------------


def run_libvirt_backup(ctx: Context, plan: Any, job_id: str, run: Any) -> Any:
    from vmvault.connectors.libvirt import domain as lv

    conn = lv.connect(str(plan.definition.get("connect") or lv.DEFAULT_URI))
    try:
        dom = lv.lookup(conn, str(plan.definition["domain"]), plan.definition.get("uuid"))
        info = lv.inspect(dom)
        wanted = {d["name"] for d in plan.disks}
        disks = [d for d in info.disks if d.name in wanted]
        if not disks:
            raise InvalidInput(f"domain '{info.name}' no longer has disk(s) {', '.join(sorted(wanted))}")
        backup = _Backup(ctx, plan, job_id, run, dom, info, disks)
        manifest = backup.live() if dom.isActive() else backup.offline()
        backup.report()
        return manifest
    finally:
        conn.close()


class _Backup:
    def __init__(self, ctx: Context, plan: Any, job_id: str, run: Any, dom: Any, info: Any, disks: list[Any]) -> None:
        self.ctx, self.plan, self.job_id, self.job_run = ctx, plan, job_id, run
        self.dom, self.info, self.disks = dom, info, disks
        self.notes: list[Any] = []
        self.tag = plan.vm_id.replace("-", "")[:8]

    def note(self, code: str, message: str, hint: str | None = None) -> None:
        from vmvault.engine.consistency import Note

        self.notes.append(Note(code, message, hint))

    def report(self) -> None:
        for note in self.notes:
            log.warning("%s", note.message)
            self.job_run.warnings.append(note.to_dict())

    def definition(self, checkpoint: str | None) -> JsonDict:
        return {**_definition(str(self.plan.definition.get("connect")), self.info), "checkpoint": checkpoint}

    def _raw_disks(self) -> list[str]:
        return [d.name for d in self.disks if d.format != "qcow2"]

    # ---- a running domain ----------------------------------------------------------------------------
    def live(self) -> Any:
        from vmvault.connectors.libvirt import domain as lv
        from vmvault.service.backups import _cancel_reason, _previous_manifest
        from vmvault.service.vaultio import opened_vault

        if lv.abort_leftover_job(self.dom, self.ctx.settings.home / "scratch" / self.tag):
            self.note("leftovers_reconciled", f"a backup job left on domain {self.info.name} was aborted")
        leftover = sorted((self.ctx.settings.home / "scratch" / self.tag).glob("scratch-*.qcow2"))
        for path in leftover:  # a killed vmvault's scratch files (its job is aborted above)
            path.unlink(missing_ok=True)
        if leftover:
            self.note("leftovers_reconciled", f"removed scratch files of a killed backup: {len(leftover)}")
        with opened_vault(self.ctx, self.plan.vault) as vault, _cancel_reason(self.job_run, self.plan.vm_name):
            previous = _previous_manifest(self.ctx, vault, self.plan)
            raw = self._raw_disks()
            incremental: str | None = None
            if raw:
                self.note("cbt_unavailable", f"disk(s) {', '.join(raw)} are raw and cannot carry checkpoints: "
                          "reading all data and comparing hashes", "convert the disks to qcow2")  # fmt: skip
            else:
                incremental = self._trusted_checkpoint(previous)
            return self._pull(vault, previous, incremental, checkpoint=None if raw else self._new_name())

    def _new_name(self) -> str:
        from vmvault.connectors.libvirt.domain import CHECKPOINT_PREFIX

        return f"{CHECKPOINT_PREFIX}{self.tag}-{secrets.token_hex(4)}"

    def _trusted_checkpoint(self, previous: Any) -> str | None:
        from vmvault.connectors.libvirt import domain as lv

        name = (previous.vm_definition or {}).get("checkpoint") if previous is not None else None
        if not name:
            return None
        if lv.has_checkpoint(self.dom, str(name)):
            return str(name)
        self._fall_back(f"checkpoint {name} of the latest point is gone", stale=False)
        return None

    def _fall_back(self, why: str, *, stale: bool = True) -> None:
        from vmvault.connectors.libvirt import domain as lv

        dropped = lv.drop_checkpoints(self.dom, f"{lv.CHECKPOINT_PREFIX}{self.tag}-", metadata_only=stale)
        message = f"changed-block tracking not used ({why}); reading all data and comparing hashes, a new chain starts"
        if dropped:
            what = "stale checkpoint metadata" if stale else "checkpoints"
            message += f" (dropped {what}: {', '.join(dropped)})"
        self.note("cbt_fallback", message, "none: the next backup uses the new checkpoint")

    def _pull(self, vault: Any, previous: Any, incremental: str | None, checkpoint: str | None) -> Any:
        from vmvault.connectors.libvirt import domain as lv
        from vmvault.engine.backup import ExportedDisk, PointSpec, backup_exported
        from vmvault.service.backups import _next_point_time, new_rp_id
        from vmvault.service.quiesce import record
        from vmvault.service.running_vms import _TEST_HOLD_SNAPSHOT, _run_dir, _test_hold

        work = self.ctx.settings.home / "scratch" / self.tag
        pull = lv.PullBackup(self.dom, self.disks, work, _run_dir(self.ctx, self.plan.vm_id) / "backup.sock")
        cp_xml = lv.PullBackup.checkpoint_xml(checkpoint, self.disks, self.info.disks) if checkpoint else None
        manifest = None
        try:
            with _quiesced(self) as q:
                started = time.monotonic()
                try:
                    pull.begin(incremental, cp_xml)
                except lv.LibvirtError as exc:
                    if not incremental:
                        raise
                    self._fall_back(f"libvirt refused an incremental from checkpoint {incremental}: {exc.message}")
                    incremental = None
                    pull.begin(incremental, cp_xml)
                snapshot_s = time.monotonic() - started
            record(self.job_run, q, snapshot_s)
            _test_hold(_TEST_HOLD_SNAPSHOT)  # test-only hook (docs/running-vms.md): after the instant, before reading
            exported = [
                ExportedDisk(d.name, d.uri, d.size, d.format, d.path, changed_extents=d.changed_extents)
                for d in pull.export(incremental is not None)
            ]
            manifest, stats = backup_exported(
                vault,
                PointSpec(
                    vm_name=self.plan.vm_name,
                    vm_id=self.plan.vm_id,
                    rp_id=new_rp_id(),
                    time=_next_point_time(self.ctx, self.plan.vm_id),
                    retain_until=self.plan.retain_until,
                    consistency=q.consistency,
                    vm_definition=self.definition(checkpoint),
                    job_id=self.job_id,
                ),
                exported,
                previous,
                on_progress=self.job_run.progress,
                cancel=self.job_run.cancel,
            )
            for disk in stats:
                for warning in disk.warnings:
                    self.note("cbt_fallback", warning, "nothing to do: the next backup uses the checkpoint")
        finally:
            pull.abort()
            with contextlib.suppress(OSError):
                pull.socket.parent.rmdir()
            with contextlib.suppress(OSError):
                work.rmdir()
            if manifest is None and checkpoint and lv.has_checkpoint(self.dom, checkpoint):
                try:
                    lv.delete_checkpoint(self.dom, checkpoint)  # a failed run's checkpoint: merged into its parent
                except lv.LibvirtError:
                    log.warning("could not delete checkpoint %s of %s", checkpoint, self.info.name, exc_info=True)
        if checkpoint:  # the older checkpoints are no longer needed: merge them away
            for name in lv.checkpoint_names(self.dom):
                if name.startswith(f"{lv.CHECKPOINT_PREFIX}{self.tag}-") and name != checkpoint:
                    with contextlib.suppress(lv.LibvirtError):
                        lv.delete_checkpoint(self.dom, name)
        return manifest

    # ---- a stopped domain ----------------------------------------------------------------------------
    def offline(self) -> Any:
        from vmvault.connectors.libvirt import domain as lv
        from vmvault.engine.backup import DiskSource, PointSpec, run_backup
        from vmvault.service.backups import (
            CRASH_CONSISTENT,
            _cancel_reason,
            _next_point_time,
            _previous_manifest,
            new_rp_id,
        )
        from vmvault.service.vaultio import opened_vault

        with opened_vault(self.ctx, self.plan.vault) as vault, _cancel_reason(self.job_run, self.plan.vm_name):
            previous = _previous_manifest(self.ctx, vault, self.plan)
            carry: str | None = None
            name = (previous.vm_definition or {}).get("checkpoint") if previous is not None else None
            raw = self._raw_disks()
            if raw:
                self.note("cbt_unavailable", f"disk(s) {', '.join(raw)} are raw and cannot carry checkpoints: "
                          "reading all data and comparing hashes", "convert the disks to qcow2")  # fmt: skip
            elif name:
                if not lv.has_checkpoint(self.dom, str(name)):
                    self._fall_back(f"checkpoint {name} of the latest point is gone")
                elif (why := lv.stale_reason(self.dom, self.disks, str(name))) is not None:
                    self._fall_back(why)
                else:
                    carry = str(name)  # the domain is off: the bitmap still covers everything since that point
            self.note("vm_stopped", f"domain {self.info.name} is not running: its images were read offline, "
                      "the point is crash-consistent")  # fmt: skip
            return run_backup(
                vault,
                PointSpec(
                    vm_name=self.plan.vm_name,
                    vm_id=self.plan.vm_id,
                    rp_id=new_rp_id(),
                    time=_next_point_time(self.ctx, self.plan.vm_id),
                    retain_until=self.plan.retain_until,
                    consistency=CRASH_CONSISTENT,
                    vm_definition=self.definition(carry),
                    job_id=self.job_id,
                ),
                [DiskSource(d.name, Path(d.path), d.format) for d in self.disks],  # the XML's <driver type>
                previous,
                on_progress=self.job_run.progress,
                cancel=self.job_run.cancel,
            )


@contextlib.contextmanager
def _quiesced(b: _Backup) -> Iterator[Any]:
    """Pre-script, freeze (within the VM's budget), yield (the caller's backupBegin), thaw, post-script.

    engine/consistency.py's sequence, budgets and thaw guard, with the agent reached through libvirt
    (virDomainQemuAgentCommand) and the guard thawing through libvirt too.
    """
    from vmvault.connectors.libvirt.domain import LibvirtAgent, LibvirtError, domain_state
    from vmvault.engine.consistency import INSTALL_AGENT_HINT, Quiesce, quiesce_agent
    from vmvault.service.quiesce import budget_for

    q = Quiesce()
    budget = budget_for(b.ctx, b.plan)
    try:
        state = domain_state(b.dom)
        target = f"libvirt:{b.dom.connect().getURI()}#{b.dom.UUIDString()}"
    except Exception as exc:  # libvirt.libvirtError: a named error, not internal_error
        raise LibvirtError(f"cannot ask libvirt about domain {b.info.name}: {exc}") from exc
    if budget.crash_only:
        q.agent_state = "Skipped"  # the policy asks for crash-consistent points
        yield q
    elif state != "running":
        q.notes.append(_note("vm_paused", "the domain is paused: the point is crash-consistent"))
        yield q
    elif not b.info.agent_channel:
        message = f"domain {b.info.name} has no {AGENT_CHANNEL_NAME} channel: the point is crash-consistent"
        q.notes.append(_note("agent_not_configured", message, INSTALL_AGENT_HINT))
        yield q
    else:
        with quiesce_agent(lambda: LibvirtAgent(b.dom), target, budget, q):
            yield q
    b.notes.extend(q.notes)


AGENT_CHANNEL_NAME = "org.qemu.guest_agent.0"


def _note(code: str, message: str, hint: str | None = None) -> Any:
    from vmvault.engine.consistency import Note

    return Note(code, message, hint)


# ---- status for vm list / item show ---------------------------------------------------------------------

AGENT_FIX = "vmvault vm enable-agent {name}, effective at next boot"
STATUS_TIMEOUT_S = 1  # vm list stays fast: one guest-ping per running domain, this long at most


def statuses(rows: list[VmRow]) -> dict[str, JsonDict]:
    """Power state, disks (targets) and agent reachability of libvirt VMs, by VM id (one connection per URI)."""
    from vmvault.connectors.libvirt import domain as lv

    out: dict[str, JsonDict] = {}
    by_uri: dict[str, list[VmRow]] = {}
    for row in rows:
        by_uri.setdefault(str((row.definition or {}).get("connect") or lv.DEFAULT_URI), []).append(row)
    for uri, group in by_uri.items():
        try:
            conn = lv.connect(uri)
        except lv.LibvirtError:
            out.update({r.id: {"powerState": "unknown", "agent": f"unknown (libvirt at {uri} not reachable)"}
                        for r in group})  # fmt: skip
            continue
        try:
            for row in group:
                out[row.id] = _status(conn, row)
        finally:
            conn.close()
    return out


def _status(conn: Any, row: VmRow) -> JsonDict:
    from vmvault.connectors.libvirt import domain as lv

    definition = row.definition or {}
    try:
        dom = lv.lookup(conn, str(definition.get("domain")), definition.get("uuid"))
        info = lv.inspect(dom)
    except lv.LibvirtError:
        return {"powerState": "undefined", "agent": "unknown (the domain is gone from libvirt)"}
    return {"powerState": info.state, "disks": [{"name": d.name, "path": d.path} for d in info.disks],
            "agent": _agent_state(dom, info)}  # fmt: skip


def _agent_state(dom: Any, info: Any) -> str:
    from vmvault.connectors.libvirt import domain as lv

    if not info.agent_channel:
        pending = info.running and lv.has_agent_channel(lv.persistent_xml(dom))
        return "no channel (added, effective at next boot)" if pending else "no channel"
    if not info.running:
        return "channel (domain not running)"
    return "answers" if lv.agent_answers(dom, STATUS_TIMEOUT_S) else "channel, no answer"


def agent_advice(row: VmRow) -> JsonDict:
    """What item show says about a libvirt VM's guest agent: channel present, and the fix when not."""
    from vmvault.connectors.libvirt import domain as lv

    definition = row.definition or {}
    try:
        conn = lv.connect(str(definition.get("connect") or lv.DEFAULT_URI))
    except lv.LibvirtError as exc:
        return {"channel": None, "message": f"cannot ask libvirt: {exc.message}"}
    try:
        dom = lv.lookup(conn, str(definition.get("domain")), definition.get("uuid"))
        info = lv.inspect(dom)
        pending = not info.agent_channel and lv.has_agent_channel(lv.persistent_xml(dom))
    except lv.LibvirtError as exc:
        return {"channel": None, "message": exc.message}
    finally:
        conn.close()
    if info.agent_channel:
        return {"channel": True, "message": None}
    crash = "backups are CrashConsistent until then"
    if pending:
        return {"channel": False, "message": f"the {lv.AGENT_CHANNEL} channel is added and takes effect at the "
                f"next boot of domain {info.name}: {crash}"}  # fmt: skip
    return {"channel": False, "message": f"domain {info.name} has no {lv.AGENT_CHANNEL} channel: fix it with "
            f"{AGENT_FIX.format(name=row.name)}; {crash}"}  # fmt: skip


def enable_agent(ctx: Context, name: str) -> JsonDict:
    """Add the guest agent channel to a libvirt VM's persistent definition (idempotent)."""
    from vmvault.connectors.libvirt import domain as lv

    with ctx.catalog.read() as s:
        row = repos.get_vm(s, name)
        s.expunge(row)
    if row.kind != KIND_LIBVIRT:
        raise InvalidInput(
            f"VM '{name}' is not a libvirt domain: vmvault cannot add a guest agent channel to it",
            hint="give the QEMU process a virtserialport named org.qemu.guest_agent.0 and add the VM with "
            "--guest-agent SOCKET (docs/running-vms.md)",
        )
    definition = row.definition or {}
    conn = lv.connect(str(definition.get("connect") or lv.DEFAULT_URI))
    try:
        dom = lv.lookup(conn, str(definition.get("domain")), definition.get("uuid"))
        added = lv.add_agent_channel(dom)
        running = bool(dom.isActive())
        live = lv.inspect(dom).agent_channel
    finally:
        conn.close()
    if live:
        effect = "the running domain has the channel"
    elif running:
        effect = "effective at the next boot (shut the domain down and start it; a reboot inside the guest is not one)"
    else:
        effect = "effective when the domain next starts"
    return {"vm": name, "domain": definition.get("domain"), "added": added, "effect": effect,
            "note": "install and start qemu-guest-agent inside the guest too"}  # fmt: skip


# ---- leftovers of a killed vmvault (service start) -----------------------------------------------------------


def reconcile_leftovers(ctx: Context) -> list[str]:
    """Abort vmvault's leftover backup jobs on libvirt domains, remove scratch files and failed checkpoints.

    Run at `vmvault serve` start, before any job runs. A failed checkpoint is a vmvault checkpoint
    of the VM that is not the checkpoint of its latest point (read from the vault; when the vault
    cannot be opened the checkpoints are left to the next backup, which merges them away).
    Returns what was done, one line each.
    """
    from vmvault.connectors.libvirt import domain as lv
    from vmvault.service.jobs import Operation

    with ctx.catalog.read() as s:  # a VM with a live Backup job (another process's) is that job's business
        rows = [r for r in repos.list_vms(s) if r.kind == KIND_LIBVIRT]
        rows = [r for r in rows if repos.running_job_for_vm(s, r.name, Operation.BACKUP) is None]
        s.expunge_all()
    done: list[str] = []
    for row in rows:
        definition = row.definition or {}
        try:
            conn = lv.connect(str(definition.get("connect") or lv.DEFAULT_URI))
        except lv.LibvirtError as exc:
            log.warning("leftovers of VM %s not reconciled: %s", row.name, exc.message)
            continue
        try:
            dom = lv.lookup(conn, str(definition.get("domain")), definition.get("uuid"))
            done += _reconcile(ctx, row, dom)
        except lv.LibvirtError as exc:
            log.warning("leftovers of VM %s not reconciled: %s", row.name, exc.message)
        finally:
            conn.close()
    for line in done:
        log.info("reconciled: %s", line)
    return done


def _reconcile(ctx: Context, row: VmRow, dom: Any) -> list[str]:
    from vmvault.connectors.libvirt import domain as lv
    from vmvault.service.running_vms import _run_dir

    tag = row.id.replace("-", "")[:8]
    work = ctx.settings.home / "scratch" / tag
    done = []
    if lv.leftover_job(dom, work) == "vmvault":
        with contextlib.suppress(lv.LibvirtError):
            lv.abort_leftover_job(dom, work)
            done.append(f"aborted the backup job a killed vmvault left on domain {dom.name()} (VM {row.name})")
    files = sorted(work.glob("scratch-*.qcow2")) + [p for p in [_run_dir(ctx, row.id) / "backup.sock"] if p.exists()]
    for path in files:
        path.unlink(missing_ok=True)
        done.append(f"removed {path}")
    for directory in (work, _run_dir(ctx, row.id)):
        with contextlib.suppress(OSError):
            directory.rmdir()
    keep = _latest_checkpoint(ctx, row)
    if keep is not False:
        prefix = f"{lv.CHECKPOINT_PREFIX}{tag}-"
        for name in lv.checkpoint_names(dom):
            if name.startswith(prefix) and name != keep:
                try:
                    lv.delete_checkpoint(dom, name, metadata_only=not dom.isActive())
                    done.append(f"deleted failed checkpoint {name} of domain {dom.name()} (VM {row.name})")
                except lv.LibvirtError as exc:
                    log.warning("could not delete checkpoint %s: %s", name, exc.message)
    return done


def _latest_checkpoint(ctx: Context, row: VmRow) -> str | bool | None:
    """The checkpoint of the VM's latest point (None: no point or none recorded; False: cannot tell)."""
    from vmvault.errors import VmvaultError
    from vmvault.service.vaultio import opened_vault, read_manifest_or_none

    with ctx.catalog.read() as s:
        latest = repos.latest_recovery_point(s, row.id)
        vault = repos.vault_by_id(s, latest.vault_id) if latest is not None else None
        s.expunge_all()
    if latest is None or vault is None:
        return None
    try:
        with opened_vault(ctx, vault) as opened:
            manifest = read_manifest_or_none(opened, latest.id)
    except (VmvaultError, OSError) as exc:
        log.warning("checkpoints of VM %s left alone: %s", row.name, exc)
        return False
    if manifest is None:
        return False
    name = (manifest.vm_definition or {}).get("checkpoint")
    return str(name) if name else None


def reconcile_at_start(ctx: Context) -> None:
    """reconcile_leftovers for `vmvault serve` start: never keeps the service from starting."""
    try:
        reconcile_leftovers(ctx)
    except Exception:  # logged; the next backup of each domain reconciles again
        log.warning("reconciling leftovers of libvirt backups failed", exc_info=True)

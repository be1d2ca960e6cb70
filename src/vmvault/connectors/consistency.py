"""Application, file-system and crash consistency of a running VM's snapshot, in Azure's words.

    pre-script  ->  thaw guard up  ->  freeze  ->  [the caller takes the snapshot]  ->  thaw  ->  post-script

Pre/post scripts follow Azure's Linux framework: `/etc/vmvault/VMSnapshotScriptPluginConfig.json`
inside the guest (preScriptLocation, postScriptLocation, preScriptParams, postScriptParams,
preScriptNoOfRetries, postScriptNoOfRetries, timeoutInSeconds, continueBackupOnFailure,
fsFreezeEnabled). They run through the agent's guest-exec *outside* the frozen window (the agent
refuses guest-exec while frozen and cannot kill a guest-exec), under the guest's `timeout`.

Never leave a guest frozen: the agent connection is closed right after the freeze, and a detached
thaw guard (`python -m vmvault.connectors.consistency --thaw-guard ...`, its own session) holds the
freeze lock and thaws the guest when vmvault dies (its pipe reaches EOF) or when the deadline
passes, whichever comes first. vmvault thaws normally and then releases the guard. A thaw that finds
nothing frozen means the guard got there first: the point is then only crash-consistent.

A Windows agent freezes through VSS: a clean VSS freeze and thaw is application-consistent; a VSS
writer failure reported at thaw is file-system-consistent (the provider held the volumes, a writer
did not quiesce); a VSS hold-writes timeout is crash-consistent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vmvault.connectors.contract import (
    APP_CONSISTENT,
    CRASH_CONSISTENT,
    DEFAULT_FROZEN_WINDOW_S,
    FILE_SYSTEM_CONSISTENT,
    Budget,
    Note,
)
from vmvault.connectors.guest_agent import AgentError, ExecResult, GuestAgent, freeze_lock_path
from vmvault.errors import HypervisorError
from vmvault.testhooks import slow_snapshot

log = logging.getLogger("vmvault")


CONFIG_PATH = "/etc/vmvault/VMSnapshotScriptPluginConfig.json"
GUARD_START_TIMEOUT_S = 15.0
SCRIPT_GRACE_S = 15.0  # host-side wait beyond the guest's own `timeout`
INSTALL_AGENT_HINT = (
    "install qemu-guest-agent in the guest and give the VM a virtio-serial port named org.qemu.guest_agent.0 "
    "(-chardev socket,path=SOCK,server=on,wait=off,id=qga0 -device virtio-serial -device "
    "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0), then: vmvault vm add NAME --qmp ... --guest-agent SOCK"
)


class PreScriptFailed(HypervisorError):
    """The pre-script failed and continueBackupOnFailure is false: no snapshot is taken."""

    code = "pre_script_failed"


# ---- the script configuration --------------------------------------------------------------------


@dataclass(frozen=True)
class ScriptConfig:
    pre_script: str = ""
    post_script: str = ""
    pre_params: tuple[str, ...] = ()
    post_params: tuple[str, ...] = ()
    pre_retries: int = 0
    post_retries: int = 0
    timeout_s: int = 30
    continue_on_failure: bool = True
    fs_freeze: bool = True

    @classmethod
    def parse(cls, data: bytes) -> ScriptConfig:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("the configuration is not a JSON object")

        def params(key: str) -> tuple[str, ...]:
            value = raw.get(key) or []
            if not isinstance(value, list):
                raise ValueError(f"{key} must be a list of strings")
            return tuple(str(v) for v in value if str(v) != "")

        timeout = int(raw.get("timeoutInSeconds", 30))
        if not 1 <= timeout <= 3600:
            raise ValueError("timeoutInSeconds must be between 1 and 3600")
        return cls(
            pre_script=str(raw.get("preScriptLocation") or ""),
            post_script=str(raw.get("postScriptLocation") or ""),
            pre_params=params("preScriptParams"),
            post_params=params("postScriptParams"),
            pre_retries=max(0, int(raw.get("preScriptNoOfRetries", 0))),
            post_retries=max(0, int(raw.get("postScriptNoOfRetries", 0))),
            timeout_s=timeout,
            continue_on_failure=_flag(raw.get("continueBackupOnFailure", True)),
            fs_freeze=_flag(raw.get("fsFreezeEnabled", True)),
        )

    @property
    def has_scripts(self) -> bool:
        return bool(self.pre_script or self.post_script)


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


# ---- the agent's capabilities --------------------------------------------------------------------


@dataclass(frozen=True)
class AgentProbe:
    version: str
    os_id: str  # "linux"-like, or "mswindows"
    exec_allowed: bool
    freeze_allowed: bool

    @property
    def windows(self) -> bool:
        return self.os_id == "mswindows"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "os": self.os_id,
            "guestExec": self.exec_allowed,
            "fsFreeze": self.freeze_allowed,
        }


def probe_agent(agent: GuestAgent) -> AgentProbe:
    info = agent.guest_info()
    enabled = {c.get("name"): bool(c.get("enabled")) for c in info.get("supported_commands", [])}
    os_id = ""
    if enabled.get("guest-get-osinfo"):
        with contextlib.suppress(AgentError):
            os_id = str(agent.guest_get_osinfo().get("id") or "")
    return AgentProbe(
        version=str(info.get("version", "")),
        os_id=os_id,
        exec_allowed=bool(enabled.get("guest-exec") and enabled.get("guest-exec-status")),
        freeze_allowed=bool(enabled.get("guest-fsfreeze-freeze") and enabled.get("guest-fsfreeze-thaw")),
    )


# ---- VSS (Windows) ------------------------------------------------------------------------------

_VSS_WRITER_HRESULTS = re.compile(r"800423f[0-6]", re.IGNORECASE)  # VSS_E_WRITERERROR_* and friends


def classify_vss_thaw(error: AgentError | None) -> tuple[str, Note | None]:
    """The consistency of a snapshot taken under a successful VSS freeze, from the thaw's reply."""
    if error is None:
        return APP_CONSISTENT, None
    desc = error.desc
    if "hold writes" in desc.lower() or "80042314" in desc:  # VSS_E_HOLD_WRITES_TIMEOUT
        return CRASH_CONSISTENT, Note(
            "vss_hold_writes_timeout",
            f"VSS could not hold writes for the whole snapshot ({desc}); the point is crash-consistent",
            "look for I/O-heavy work during backups in the guest's event log; VSS holds writes at most 10 s",
        )
    if "writer" in desc.lower() or _VSS_WRITER_HRESULTS.search(desc):
        return FILE_SYSTEM_CONSISTENT, Note(
            "vss_writer_failed",
            f"a VSS writer failed ({desc}); the volumes were frozen, so the point is file-system-consistent",
            "run `vssadmin list writers` in the guest and fix the failed writer",
        )
    return FILE_SYSTEM_CONSISTENT, Note(
        "vss_thaw_failed",
        f"VSS reported an error at thaw ({desc}); the point is file-system-consistent",
        "check the guest's Application event log (VSS and QEMU Guest Agent sources)",
    )


# ---- budgets --------------------------------------------------------------------------------------


# ---- the thaw guard -------------------------------------------------------------------------------
#
# Protocol on its pipe: b"F" = the freeze returned, the frozen window starts (deadline frozen_s);
# b"D" = vmvault thawed (or gave up and thawed itself): exit quietly; EOF = vmvault died or gave up
# without thawing: thaw as soon as the agent answers. Before b"F" the guard never thaws on a timer
# of its own shorter than the freeze budget plus the recovery wait: vmvault is still in its freeze
# call, and the guard must not race a working quiesce.


class ThawGuard:
    """A detached process that thaws the guest when vmvault abandons it frozen."""

    def __init__(self, proc: subprocess.Popen[bytes], done_fd: int) -> None:
        self._proc = proc
        self._done_fd: int | None = done_fd

    @classmethod
    def start(cls, target: str, budget: Budget) -> ThawGuard:
        """target: an agent socket path, or `libvirt:URI#UUID` (the agent reached through libvirt)."""
        done_r, done_w = os.pipe()
        ready_r, ready_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "vmvault.connectors.consistency", "--thaw-guard", target,
                 str(budget.freeze_s + budget.recover_s), str(budget.frozen_s), str(done_r), str(ready_w)],
                pass_fds=(done_r, ready_w),
                start_new_session=True,  # survives a kill of vmvault's process group
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # it outlives vmvault: keep it off vmvault's pipes
            )  # fmt: skip
        except BaseException:
            for fd in (done_r, done_w, ready_r, ready_w):
                os.close(fd)
            raise
        os.close(done_r)
        os.close(ready_w)
        guard = cls(proc, done_w)
        try:
            ready, _, _ = select.select([ready_r], [], [], GUARD_START_TIMEOUT_S)
            if not ready or os.read(ready_r, 16) != b"ready":
                guard.release()
                raise HypervisorError("the thaw guard did not start; the guest is not frozen")
        finally:
            os.close(ready_r)
        return guard

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def frozen(self) -> None:
        """The freeze returned: the frozen window's deadline starts now."""
        if self._done_fd is not None:
            with contextlib.suppress(OSError):  # a dead guard: noticed at release
                os.write(self._done_fd, b"F")

    def release(self, thawed: bool = True) -> None:
        """thawed: the guest is thawed, the guard exits quietly; else it thaws the guest itself now."""
        if self._done_fd is None:
            return
        if thawed:
            with contextlib.suppress(OSError):  # the guard may be gone (it thawed at its deadline)
                os.write(self._done_fd, b"D")
        os.close(self._done_fd)  # without "D", EOF: the guard thaws
        self._done_fd = None
        if not thawed:
            return  # let it work on its own (it retries until the agent answers)
        try:
            self._proc.wait(GUARD_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def guard_lock_key(target: str) -> str:
    return target


def _guard_main(target: str, wait_s: float, window_s: float, done_fd: int, ready_fd: int) -> int:
    import fcntl

    lock = open(freeze_lock_path(guard_lock_key(target)), "a+")  # noqa: SIM115 - held for the process's life
    with contextlib.suppress(OSError):
        os.chmod(lock.name, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.write(ready_fd, b"ready")
    os.close(ready_fd)
    deadline = time.monotonic() + wait_s
    frozen = False
    why = ""
    while not why:
        ready, _, _ = select.select([done_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            why = f"the {window_s:.0f} s frozen window passed" if frozen else "vmvault's freeze call did not end"
            break
        data = os.read(done_fd, 1)
        if data == b"D":
            return 0
        if data == b"F":
            deadline, frozen = time.monotonic() + window_s, True
        elif not data:
            why = "vmvault exited or gave up without thawing"
    return _guard_thaw(target, why, time.monotonic() + max(60.0, wait_s))


def _guard_thaw(target: str, why: str, end: float) -> int:
    while True:
        try:
            with guard_agent(target) as agent:
                thawed = agent.guest_fsfreeze_thaw()
            _guard_log(target, f"{why}; thawed {thawed} file system(s)")
            return 0
        except AGENT_FAILURES as exc:
            if time.monotonic() > end:
                _guard_log(target, f"{why}; could not thaw: {exc}")
                return 1
            time.sleep(0.5)


def guard_agent(target: str) -> GuestAgent:
    """A connected agent session for a guard target (an agent socket, or libvirt:URI#UUID)."""
    if target.startswith("libvirt:"):
        from vmvault.connectors.libvirt import domain as lv

        uri, _, uuid = target[len("libvirt:") :].rpartition("#")
        dom = lv.connect(uri).lookupByUUIDString(uuid)
        return lv.LibvirtAgent(dom, timeout=20).connect(timeout=10, check_frozen=False)
    return GuestAgent(target, timeout=20).connect(timeout=10, check_frozen=False)


def _guard_log(target: str, message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with contextlib.suppress(OSError), open(freeze_lock_path(guard_lock_key(target)).with_suffix(".log"), "a") as f:
        f.write(f"{stamp} vmvault thaw guard for {target}: {message}\n")


# ---- scripts ------------------------------------------------------------------------------------


@dataclass
class ScriptOutcome:
    which: str  # "pre" | "post"
    path: str
    result: ExecResult | None = None
    problem: str = ""  # why it did not run or failed, when result says nothing

    @property
    def ok(self) -> bool:
        return not self.problem and self.result is not None and self.result.ok

    def describe(self) -> str:
        if self.problem:
            return f"{self.which}-script {self.path}: {self.problem}"
        assert self.result is not None
        if self.result.timed_out:
            how = "did not end in time"
        elif self.result.exit_code is None:
            how = f"was killed by signal {self.result.signal}"
        else:
            how = f"exited with code {self.result.exit_code}"
        output = self.result.output()
        return f"{self.which}-script {self.path} {how}" + (f"; output: {output}" if output else "")


def _check_owner(agent: GuestAgent, path: str) -> str:
    """Empty when path is a root-owned file nobody else can write, else why not."""
    probe = agent.run("/bin/sh", ["-c", 'test -f "$1" || exit 3; stat -c "%u %a" -- "$1"', "sh", path], timeout=30)
    if probe.exit_code == 3:
        return "does not exist in the guest"
    if not probe.ok:
        return f"cannot be checked: {probe.output()}"
    try:
        uid, mode = probe.stdout.split()
        writable_by_others = int(mode, 8) & 0o022
    except ValueError:
        return f"cannot be checked (stat said {probe.stdout.strip()!r})"
    if uid != "0":
        return f"is owned by uid {uid}, not root"
    if writable_by_others:
        return f"is writable by group or others (mode {mode}); chmod go-w it"
    return ""


def _run_script(agent: GuestAgent, which: str, path: str, params: tuple[str, ...], cfg: ScriptConfig) -> ScriptOutcome:
    problem = _check_owner(agent, path)
    if problem:
        return ScriptOutcome(which, path, problem=problem)
    outcome = ScriptOutcome(which, path)
    retries = cfg.pre_retries if which == "pre" else cfg.post_retries
    for _attempt in range(retries + 1):
        # The guest's own timeout kills the script: the agent cannot kill a guest-exec.
        outcome.result = agent.run(
            "/bin/sh",
            ["-c", 'exec timeout -s KILL "$0" "$@"', str(cfg.timeout_s), path, *params],
            timeout=cfg.timeout_s + SCRIPT_GRACE_S,
        )
        if outcome.ok:
            break
    return outcome


# ---- the whole sequence -------------------------------------------------------------------------


@dataclass
class Quiesce:
    """What the sequence found: the point's consistency and the warnings for the job."""

    consistency: str = CRASH_CONSISTENT
    notes: list[Note] = field(default_factory=list)
    probe: AgentProbe | None = None
    agent_state: str = "NotConfigured"  # NotConfigured | NotReachable | Ready | Limited | NotApplicable | Skipped
    frozen: int = 0
    attempts: int = 0  # freeze attempts (a timed-out one is retried once)
    timings: dict[str, float] = field(default_factory=dict)  # freezeSeconds, frozenSeconds, thawSeconds
    frozen_at: float = 0.0
    window_s: float = DEFAULT_FROZEN_WINDOW_S
    window_missed: bool = False  # the snapshot outlasted the frozen window: the guard thawed before vmvault
    thawed_after_miss: bool = False  # ... and the guest was then seen thawed (fsfreeze-status), so a retry is safe
    snapshot_attempts: int = 1  # a snapshot that outlasted the frozen window is undone and retried once
    retried: str = ""  # why the first snapshot attempt was undone

    def report(self) -> dict[str, Any]:
        """For the job's details: what the quiesce did and how long each step took."""
        extra = {"snapshotRetryReason": self.retried} if self.retried else {}
        return {"consistency": self.consistency, "agent": self.agent_state, "attempts": self.attempts,
                "snapshotAttempts": self.snapshot_attempts, "frozenFileSystems": self.frozen, **extra,
                **self.timings}  # fmt: skip


AgentFactory = Callable[[], GuestAgent]  # a new, unconnected session with the guest's agent
# What talking to a guest agent can raise: its replies come from the guest and are untrusted (a
# hostile agent's `{"return": {}}` to a freeze is a TypeError): each is a named warning, never a crash.
AGENT_FAILURES = (HypervisorError, OSError, ValueError, TypeError, KeyError, AttributeError)


@dataclass(frozen=True)
class Guest:
    """The guest as a connector finds it right before the instant, in its words for what is missing.

    agent: a new, unconnected session with its guest agent (None: no agent configured, no channel);
    target: the thaw guard's (an agent socket, or libvirt:URI#UUID); present False: nothing runs
    a guest to quiesce (a qemu-storage-daemon).
    """

    agent: AgentFactory | None
    target: str
    present: bool = True
    running: bool = True
    paused: Note | None = None  # the warning when the guest is not running
    paused_state: str = "NotConfigured"  # the agent's state reported then
    no_agent: Note | None = None  # the warning when it has no agent


@contextlib.contextmanager
def quiesced(guest: Guest, budget: Budget) -> Iterator[Quiesce]:
    """Run pre-script and freeze, yield (the caller takes the snapshot), thaw and run the post-script.

    The fallback order of every kind of VM: nothing to quiesce (NotApplicable); the policy asks for
    crash-consistent points (Skipped, no warning); the guest is not running, or has no agent
    (crash-consistent, the connector's warning); else the agent's sequence (quiesce_agent). Raises
    PreScriptFailed before anything is frozen when a pre-script fails and the guest's
    configuration says not to continue.
    """
    q = Quiesce()
    if not guest.present:
        q.agent_state = "NotApplicable"
        yield q
        return
    if budget.crash_only:
        q.agent_state = "Skipped"  # the policy asks for crash-consistent points: not a warning
        yield q
        return
    if not guest.running or guest.agent is None:
        if not guest.running:
            q.agent_state = guest.paused_state
        note = guest.paused if not guest.running else guest.no_agent
        if note is not None:
            q.notes.append(note)
        yield q
        return
    with quiesce_agent(guest.agent, guest.target, budget, q):
        yield q


@contextlib.contextmanager
def quiesce_agent(factory: AgentFactory, target: str, budget: Budget, q: Quiesce) -> Iterator[Quiesce]:
    """The agent part of the sequence, for an agent socket or one reached through libvirt (target: ThawGuard's)."""
    try:
        agent = factory().connect()
    except AGENT_FAILURES as exc:
        q.agent_state = "NotReachable"
        q.notes.append(Note("agent_not_reachable", f"{_why(exc)}: the point is crash-consistent", INSTALL_AGENT_HINT))
        yield q
        return
    q.window_s = budget.frozen_s
    lost: Exception | None = None
    cfg: ScriptConfig | None = None
    pre_ok = True
    try:
        with agent:
            q.probe = probe_agent(agent)
            q.agent_state = "Ready" if q.probe.exec_allowed and q.probe.freeze_allowed else "Limited"
            if agent.thawed_stale_freeze:
                q.notes.append(
                    Note("stale_freeze_thawed", "the guest was found frozen with no backup running; vmvault thawed it")
                )
            cfg = _load_config(agent, q)
            pre_ok = _pre_script(agent, cfg, q)
    except PreScriptFailed:
        raise
    except AGENT_FAILURES as exc:
        lost = exc
    if lost is not None or q.probe is None:
        q.agent_state = "NotReachable"
        q.notes.append(Note("agent_not_reachable", f"{_why(lost)}: the point is crash-consistent", INSTALL_AGENT_HINT))
        yield q
        return
    freeze = q.probe.freeze_allowed and (cfg is None or cfg.fs_freeze)
    if q.probe.freeze_allowed is False:
        q.notes.append(
            Note(
                "freeze_not_allowed",
                "the guest agent does not allow guest-fsfreeze-freeze; the point is not file-system-consistent",
                "enable guest-fsfreeze-* in the agent's configuration",
            )
        )
    vss_error: AgentError | None = None
    thaw_found: int | None = None
    guard = _freeze_with_retry(factory, target, budget, q) if freeze else None
    try:
        yield q
    finally:
        if guard is not None:
            thawed = True
            if q.frozen or q.probe.windows:
                guard_gone = not guard.alive
                thawed, thaw_found, vss_error = _thaw(factory, q)
                if guard_gone and thaw_found:  # it ended without thawing (killed?): nobody watched the freeze
                    q.notes.append(Note("thaw_guard_died", "the thaw guard ended while the guest was frozen; "
                                        "vmvault thawed the guest itself", "check the host for killed processes "
                                        "(OOM killer) and the guard's log next to its lock in $TMPDIR"))  # fmt: skip
            guard.release(thawed)
            if q.frozen and not q.probe.windows and thaw_found == 0:  # the guard thawed first: see it thawed
                q.window_missed, q.thawed_after_miss = True, _recover(factory, budget)
        q.consistency = _consistency(q, cfg, pre_ok, freeze, thaw_found, vss_error, budget)
        if cfg is not None and cfg.post_script:
            _post_script(factory, cfg, q)


def _why(exc: BaseException | None) -> str:
    if isinstance(exc, HypervisorError):
        return exc.message
    return f"{type(exc).__name__}: {exc}" if exc is not None else "the guest agent did not answer"


def _budget_hint() -> str:
    return (
        "give the VM a larger quiesce budget (vmvault vm update NAME --quiesce-timeout SECONDS) or make the "
        "guest's fsfreeze hooks (/etc/qemu/fsfreeze-hook.d) faster; check the guest agent's log"
    )


def _freeze_with_retry(factory: AgentFactory, target: str, budget: Budget, q: Quiesce) -> ThawGuard | None:
    """Freeze within the budget; a timed-out attempt is thawed (when the agent answers again) and retried once.

    Returns the guard of a successful freeze (or of one the agent refused, which a Windows guest
    still thaws), None when nothing is frozen and nothing is to thaw.
    """
    for attempt in (1, 2):
        q.attempts = attempt
        try:
            guard = ThawGuard.start(target, budget)
        except (OSError, HypervisorError) as exc:
            q.notes.append(Note("thaw_guard_failed", f"the thaw guard did not start ({exc}): the guest was not frozen"))
            return None
        started = time.monotonic()
        try:
            with factory().connect(check_frozen=False) as agent:
                q.frozen = agent.guest_fsfreeze_freeze(timeout=budget.freeze_s)
        except AgentError as exc:  # the agent answered: a hook failed, VSS refused...
            q.notes.append(Note("freeze_failed", f"the guest's file systems could not be frozen: {exc.message}",
                                "check the guest agent's log and its fsfreeze hook"))  # fmt: skip
            return guard
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a garbled reply: the guest is untrusted
            guard.release(thawed=_recover(factory, budget))
            q.notes.append(Note("freeze_failed", f"the guest agent's reply to guest-fsfreeze-freeze is not valid "
                                f"({type(exc).__name__}: {exc}); vmvault thawed the guest", "check the guest agent "
                                "(qemu-ga) of the guest: a modified or broken agent"))  # fmt: skip
            return None
        except AGENT_FAILURES as exc:  # no answer within the budget
            log.warning("freeze attempt %d of %s gave up after %.0f s: %s", attempt, target, budget.freeze_s, _why(exc))
            answered = _recover(factory, budget)
            guard.release(thawed=answered)
            if not answered:
                q.notes.append(Note(
                    "quiesce_timeout",
                    f"the guest's freeze did not return within the {budget.freeze_s:.0f} s quiesce budget and its "
                    f"agent did not answer again within {budget.recover_s:.0f} s (the thaw guard keeps trying to "
                    "thaw it): the point is crash-consistent",
                    _budget_hint(),
                ))  # fmt: skip
                return None
            continue
        q.timings["freezeSeconds"] = round(time.monotonic() - started, 3)
        q.frozen_at = time.monotonic()
        guard.frozen()
        return guard
    q.notes.append(Note(
        "quiesce_timeout",
        f"the guest's freeze (its fsfreeze hooks included) did not return within the {budget.freeze_s:.0f} s "
        "quiesce budget, twice; vmvault thawed the guest each time: the point is crash-consistent",
        _budget_hint(),
    ))  # fmt: skip
    return None


def _window_note(window_s: float, *, retried: bool) -> Note:
    how = "twice (vmvault undid the first snapshot, saw the guest thawed and retried once)" if retried else "once"
    return Note(
        "quiesce_timeout",
        f"the snapshot took longer than the {window_s:g} s frozen window {how}: the thaw guard thawed the guest "
        "before vmvault's thaw, so the point is crash-consistent",
        "check the host's load during backups (the frozen window covers only the snapshot), or give a longer "
        "window (VMVAULT_FROZEN_WINDOW, seconds, default 10) if the guest's applications tolerate it",
    )


Attempt = Callable[[], contextlib.AbstractContextManager[Quiesce]]  # one quiesce: pre-script ... post-script


def snapshot_in_window(attempt: Attempt, take: Callable[[], None], undo: Callable[[], None]) -> tuple[Quiesce, float]:
    """Quiesce, take the snapshot (take: QMP transaction / backupBegin) and thaw; returns (quiesce, snapshot s).

    A snapshot that outlasted the frozen window is not consistent (the guard thawed the guest during
    it): like a freeze past its budget, it is undone (undo: whatever take set up, so nothing of it is
    left), and once the guest is seen thawed the whole attempt is retried once. A second miss keeps
    its snapshot as a crash-consistent point with the quiesce_timeout warning.
    """
    first: Quiesce | None = None
    for n in (1, 2):
        with attempt() as q:
            started = time.monotonic()
            take()
            took = time.monotonic() - started
            slow_snapshot(n)  # test-only (testhooks.py): inert unless VMVAULT_TEST_SLOW_SNAPSHOT is set
        if n == 2 or not (q.window_missed and q.thawed_after_miss):
            break
        log.warning("the snapshot outlasted the %g s frozen window: undoing it and retrying once", q.window_s)
        undo()
        first = q
    if first is not None:
        q.snapshot_attempts = 2
        q.retried = f"the first snapshot outlasted the {first.window_s:g} s frozen window; it was undone and retried"
        kept = [n for n in first.notes if n.code != "quiesce_timeout" and n not in q.notes]
        q.notes = kept + [_window_note(q.window_s, retried=True) if n.code == "quiesce_timeout" and q.window_missed
                          else n for n in q.notes]  # fmt: skip
    return q, took


def _recover(factory: AgentFactory, budget: Budget) -> bool:
    """After a timed-out freeze: once the agent answers again (guest-ping), thaw the late freeze; True when thawed."""
    end = time.monotonic() + budget.recover_s
    while time.monotonic() < end:
        try:
            with factory().connect(timeout=min(10.0, max(1.0, end - time.monotonic())), check_frozen=False) as agent:
                agent.guest_ping()
                if agent.guest_fsfreeze_status() == "frozen":
                    agent.guest_fsfreeze_thaw()
                if agent.guest_fsfreeze_status() == "thawed":
                    return True
        except AGENT_FAILURES:
            pass
        time.sleep(0.5)
    return False


def _load_config(agent: GuestAgent, q: Quiesce) -> ScriptConfig | None:
    assert q.probe is not None
    if q.probe.windows:
        return None  # VSS quiesces Windows applications; Azure's script framework here is Linux's
    if not q.probe.exec_allowed:
        q.notes.append(
            Note(
                "guest_exec_not_allowed",
                f"the guest agent does not allow guest-exec: pre/post scripts ({CONFIG_PATH}) cannot run",
                "enable guest-exec in the agent's configuration",
            )
        )
        return None
    data = agent.read_file(CONFIG_PATH)
    if data is None:
        return None
    problem = _check_owner(agent, CONFIG_PATH)
    if problem:
        q.notes.append(
            Note(
                "script_config_unsafe",
                f"{CONFIG_PATH} {problem}: its scripts were not run",
                f"chown root {CONFIG_PATH}; chmod 600 {CONFIG_PATH}",
            )
        )
        return None
    try:
        return ScriptConfig.parse(data)
    except (ValueError, TypeError) as exc:
        q.notes.append(
            Note(
                "script_config_invalid",
                f"{CONFIG_PATH} is not valid: {exc}; its scripts were not run",
                "fix the JSON (see docs/running-vms.md for the fields)",
            )
        )
        return None


def _pre_script(agent: GuestAgent, cfg: ScriptConfig | None, q: Quiesce) -> bool:
    if cfg is None or not cfg.pre_script:
        return True
    outcome = _run_script(agent, "pre", cfg.pre_script, cfg.pre_params, cfg)
    if outcome.ok:
        return True
    if not cfg.continue_on_failure:
        if cfg.post_script:
            _post_script(lambda: agent, cfg, q, agent)
        raise PreScriptFailed(
            f"{outcome.describe()}; continueBackupOnFailure is false, so no snapshot was taken",
            hint=f"fix the pre-script, or set continueBackupOnFailure to true in {CONFIG_PATH}",
        )
    q.notes.append(
        Note(
            "pre_script_failed",
            f"{outcome.describe()}; the backup went on (continueBackupOnFailure)",
            "fix the pre-script; until then points are at best file-system-consistent",
        )
    )
    return False


def _post_script(factory: AgentFactory, cfg: ScriptConfig, q: Quiesce, agent: GuestAgent | None = None) -> None:
    try:
        with contextlib.ExitStack() as stack:
            if agent is None:
                agent = stack.enter_context(factory().connect())
            outcome = _run_script(agent, "post", cfg.post_script, cfg.post_params, cfg)
    except AGENT_FAILURES as exc:
        q.notes.append(Note("post_script_failed", f"post-script {cfg.post_script} could not run: {_why(exc)}"))
        return
    if not outcome.ok:
        q.notes.append(Note("post_script_failed", outcome.describe(), "fix the post-script"))


def _thaw(factory: AgentFactory, q: Quiesce) -> tuple[bool, int | None, AgentError | None]:
    """(reached the agent, file systems thawed, the agent's error)."""
    if q.frozen_at:
        q.timings["frozenSeconds"] = round(time.monotonic() - q.frozen_at, 3)
    started = time.monotonic()
    try:
        with factory().connect(check_frozen=False) as agent:
            found = agent.guest_fsfreeze_thaw()
        q.timings["thawSeconds"] = round(time.monotonic() - started, 3)
        return True, found, None
    except AgentError as exc:
        return True, None, exc
    except AGENT_FAILURES as exc:
        q.notes.append(
            Note(
                "thaw_failed",
                f"vmvault could not thaw the guest ({_why(exc)}); its thaw guard does",
                "check the guest agent's log; the guest is thawed by the guard once its agent answers",
            )
        )
        return False, None, None


def _consistency(
    q: Quiesce,
    cfg: ScriptConfig | None,
    pre_ok: bool,
    freeze: bool,
    thaw_found: int | None,
    vss_error: AgentError | None,
    budget: Budget,
) -> str:
    assert q.probe is not None
    if q.probe.windows:
        if not q.frozen:
            return CRASH_CONSISTENT
        consistency, note = classify_vss_thaw(vss_error)
        if note is not None:
            q.notes.append(note)
        return consistency
    if freeze and not q.frozen:
        return CRASH_CONSISTENT  # freeze_failed was noted
    if freeze and thaw_found == 0:
        q.notes.append(_window_note(budget.frozen_s, retried=False))
        return CRASH_CONSISTENT
    scripts = cfg is not None and bool(cfg.pre_script)
    if freeze:
        return APP_CONSISTENT if scripts and pre_ok else FILE_SYSTEM_CONSISTENT
    return APP_CONSISTENT if scripts and pre_ok else CRASH_CONSISTENT


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--thaw-guard":
    sys.exit(_guard_main(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])))

"""Application, file-system and crash consistency of a running VM's snapshot, in Azure's words.

    pre-script  ->  thaw guard up  ->  freeze  ->  [the caller takes the snapshot]  ->  thaw  ->  post-script

Pre/post scripts follow Azure's Linux framework: `/etc/vmvault/VMSnapshotScriptPluginConfig.json`
inside the guest (preScriptLocation, postScriptLocation, preScriptParams, postScriptParams,
preScriptNoOfRetries, postScriptNoOfRetries, timeoutInSeconds, continueBackupOnFailure,
fsFreezeEnabled). They run through the agent's guest-exec *outside* the frozen window (the agent
refuses guest-exec while frozen and cannot kill a guest-exec), under the guest's `timeout`.

Never leave a guest frozen: the agent connection is closed right after the freeze, and a detached
thaw guard (`python -m vmvault.engine.consistency --thaw-guard ...`, its own session) holds the
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
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vmvault.errors import HypervisorError
from vmvault.hypervisor.guest_agent import AgentError, AgentUnavailable, ExecResult, GuestAgent, freeze_lock_path

APP_CONSISTENT = "AppConsistent"
FILE_SYSTEM_CONSISTENT = "FileSystemConsistent"
CRASH_CONSISTENT = "CrashConsistent"

CONFIG_PATH = "/etc/vmvault/VMSnapshotScriptPluginConfig.json"
FREEZE_DEADLINE_S = 10.0  # sized for TCG guests; VSS itself holds writes at most 10 s
GUARD_START_TIMEOUT_S = 15.0
SCRIPT_GRACE_S = 15.0  # host-side wait beyond the guest's own `timeout`
INSTALL_AGENT_HINT = (
    "install qemu-guest-agent in the guest and give the VM a virtio-serial port named org.qemu.guest_agent.0 "
    "(-chardev socket,path=SOCK,server=on,wait=off,id=qga0 -device virtio-serial -device "
    "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0), then: vmvault vm add NAME --qmp ... --guest-agent SOCK"
)


@dataclass(frozen=True)
class Note:
    """Something the job reports as a warning: a stable code, a message, and the fix."""

    code: str
    message: str
    hint: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "recommendedAction": self.hint}


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


# ---- the thaw guard -------------------------------------------------------------------------------


class ThawGuard:
    """A detached process that thaws the guest when vmvault dies or the deadline passes."""

    def __init__(self, proc: subprocess.Popen[bytes], done_fd: int) -> None:
        self._proc = proc
        self._done_fd: int | None = done_fd

    @classmethod
    def start(cls, agent_socket: str, deadline_s: float = FREEZE_DEADLINE_S) -> ThawGuard:
        done_r, done_w = os.pipe()
        ready_r, ready_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "vmvault.engine.consistency", "--thaw-guard", agent_socket,
                 str(deadline_s), str(done_r), str(ready_w)],
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

    def release(self, thawed: bool = True) -> None:
        """thawed: the guest is thawed, the guard exits quietly; else it thaws the guest itself now."""
        if self._done_fd is None:
            return
        if thawed:
            with contextlib.suppress(OSError):
                os.write(self._done_fd, b"done")
        os.close(self._done_fd)  # without "done", EOF: the guard thaws
        self._done_fd = None
        if not thawed:
            return  # let it work on its own (it retries for a minute)
        try:
            self._proc.wait(GUARD_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _guard_main(agent_socket: str, deadline_s: float, done_fd: int, ready_fd: int) -> int:
    import fcntl

    lock = open(freeze_lock_path(agent_socket), "a+")  # noqa: SIM115 - held for the process's life
    with contextlib.suppress(OSError):
        os.chmod(lock.name, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.write(ready_fd, b"ready")
    os.close(ready_fd)
    ready, _, _ = select.select([done_fd], [], [], deadline_s)
    if ready and os.read(done_fd, 16) == b"done":
        return 0
    why = "vmvault exited without thawing" if ready else f"the {deadline_s:.0f} s freeze deadline passed"
    end = time.monotonic() + 60
    while True:
        try:
            with GuestAgent(agent_socket, timeout=20).connect(timeout=10, check_frozen=False) as agent:
                thawed = agent.guest_fsfreeze_thaw()
            _guard_log(agent_socket, f"{why}; thawed {thawed} file system(s)")
            return 0
        except HypervisorError as exc:
            if time.monotonic() > end:
                _guard_log(agent_socket, f"{why}; could not thaw: {exc}")
                return 1
            time.sleep(0.5)


def _guard_log(agent_socket: str, message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with contextlib.suppress(OSError), open(freeze_lock_path(agent_socket).with_suffix(".log"), "a") as f:
        f.write(f"{stamp} vmvault thaw guard for {agent_socket}: {message}\n")


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
    agent_state: str = "NotConfigured"  # NotConfigured | NotReachable | Ready | Limited
    frozen: int = 0


@contextlib.contextmanager
def quiesced(
    agent_socket: str | None, *, running: bool = True, guest: bool = True, deadline_s: float = FREEZE_DEADLINE_S
) -> Iterator[Quiesce]:
    """Run pre-script and freeze, yield (the caller snapshots), thaw and run the post-script.

    Raises PreScriptFailed before anything is frozen when a pre-script fails and the guest's
    configuration says not to continue. guest=False (a qemu-storage-daemon): nothing to quiesce.
    """
    q = Quiesce()
    if not guest:
        q.agent_state = "NotApplicable"
        yield q
        return
    if not running:
        q.agent_state = "Unknown"
        q.notes.append(
            Note("vm_paused", "the VM is not running (paused): no guest agent, the point is crash-consistent")
        )
        yield q
        return
    if not agent_socket:
        q.notes.append(
            Note(
                "agent_not_configured",
                "no guest agent is configured: the point is crash-consistent",
                INSTALL_AGENT_HINT,
            )
        )
        yield q
        return
    try:
        agent = GuestAgent(agent_socket).connect()
    except AgentUnavailable as exc:
        q.agent_state = "NotReachable"
        q.notes.append(Note("agent_not_reachable", f"{exc.message}: the point is crash-consistent", INSTALL_AGENT_HINT))
        yield q
        return
    lost: HypervisorError | None = None
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
    except HypervisorError as exc:
        lost = exc
    if lost is not None or q.probe is None:
        q.agent_state = "NotReachable"
        q.notes.append(Note("agent_not_reachable", f"{lost}: the point is crash-consistent", INSTALL_AGENT_HINT))
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
    guard: ThawGuard | None = None
    if freeze:
        try:
            guard = ThawGuard.start(agent_socket, deadline_s)
        except (OSError, HypervisorError) as exc:
            q.notes.append(Note("thaw_guard_failed", f"the thaw guard did not start ({exc}): the guest was not frozen"))
            freeze = False
    try:
        if guard is not None:
            try:
                q.frozen = _freeze(agent_socket, q)
                yield q
            finally:
                thawed = True
                if q.frozen or q.probe.windows:
                    thawed, thaw_found, vss_error = _thaw(agent_socket, q)
                guard.release(thawed)
        else:
            yield q
    finally:
        q.consistency = _consistency(q, cfg, pre_ok, freeze, thaw_found, vss_error)
        if cfg is not None and cfg.post_script:
            _post_script(agent_socket, cfg, q)


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
            _post_script(agent.path, cfg, q, agent)
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


def _post_script(agent_socket: str, cfg: ScriptConfig, q: Quiesce, agent: GuestAgent | None = None) -> None:
    try:
        with contextlib.ExitStack() as stack:
            if agent is None:
                agent = stack.enter_context(GuestAgent(agent_socket).connect())
            outcome = _run_script(agent, "post", cfg.post_script, cfg.post_params, cfg)
    except HypervisorError as exc:
        q.notes.append(Note("post_script_failed", f"post-script {cfg.post_script} could not run: {exc.message}"))
        return
    if not outcome.ok:
        q.notes.append(Note("post_script_failed", outcome.describe(), "fix the post-script"))


def _freeze(agent_socket: str, q: Quiesce) -> int:
    try:
        with GuestAgent(agent_socket).connect(check_frozen=False) as agent:
            return agent.guest_fsfreeze_freeze()
    except HypervisorError as exc:
        q.notes.append(
            Note(
                "freeze_failed",
                f"the guest's file systems could not be frozen: {exc.message}",
                "check the guest agent's log and its fsfreeze hook",
            )
        )
        return 0


def _thaw(agent_socket: str, q: Quiesce) -> tuple[bool, int | None, AgentError | None]:
    """(reached the agent, file systems thawed, the agent's error)."""
    try:
        with GuestAgent(agent_socket).connect(check_frozen=False) as agent:
            return True, agent.guest_fsfreeze_thaw(), None
    except AgentError as exc:
        return True, None, exc
    except HypervisorError as exc:
        q.notes.append(Note("thaw_failed", f"vmvault could not thaw the guest ({exc.message}); its thaw guard does"))
        return False, None, None


def _consistency(
    q: Quiesce,
    cfg: ScriptConfig | None,
    pre_ok: bool,
    freeze: bool,
    thaw_found: int | None,
    vss_error: AgentError | None,
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
        q.notes.append(
            Note(
                "thawed_early",
                "the guest was thawed before vmvault's thaw (the thaw guard's deadline "
                "passed): the point is crash-consistent",
            )
        )
        return CRASH_CONSISTENT
    scripts = cfg is not None and bool(cfg.pre_script)
    if freeze:
        return APP_CONSISTENT if scripts and pre_ok else FILE_SYSTEM_CONSISTENT
    return APP_CONSISTENT if scripts and pre_ok else CRASH_CONSISTENT


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--thaw-guard":
    sys.exit(_guard_main(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))

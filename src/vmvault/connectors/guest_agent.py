"""A client for the QEMU guest agent (qemu-ga), one method per agent command.

The agent's socket is a chardev: one client at a time, no greeting, and after a timeout a late
reply may still be in the pipe. So every connection, and every command after a timeout, starts
with a resynchronisation: a 0xFF byte (which makes the agent drop any partial input) and
`guest-sync-delimited` with a fresh id; the reply starts with 0xFF and lines are skipped until the
one carrying our id.

Every connection also checks `guest-fsfreeze-status`: a guest found frozen while no vmvault thaw
guard holds the freeze lock (a crashed backup, another tool) is thawed at once.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import select
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from vmvault.errors import HypervisorError

log = logging.getLogger("vmvault")

JsonDict = dict[str, Any]
SYNC_TRY_S = 0.5  # the agent may not be up yet: its input waits in the chardev, so retry the sync
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0
DELIMITER = b"\xff"


class AgentError(HypervisorError):
    """The agent answered a command with an error."""

    code = "guest_agent_error"

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"the guest agent refused {command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class AgentUnavailable(HypervisorError):
    """Nothing (or nothing that answers) behind the agent socket."""

    code = "guest_agent_unavailable"


def freeze_lock_path(socket_path: str | os.PathLike[str]) -> Path:
    """The lock a thaw guard holds while a backup keeps this guest frozen (one per agent socket)."""
    digest = hashlib.sha256(os.path.realpath(socket_path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"vmvault-freeze-{digest}.lock"


def freeze_guarded(socket_path: str | os.PathLike[str]) -> bool:
    """True while a thaw guard holds the freeze lock of this agent (a backup is in its frozen window)."""
    try:
        fd = os.open(freeze_lock_path(socket_path), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@dataclass(frozen=True)
class ExecResult:
    exit_code: int | None  # None: killed by a signal or still running at the deadline
    signal: int | None
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def output(self, limit: int = 2000) -> str:
        text = (self.stdout + self.stderr).strip()
        return text if len(text) <= limit else text[: limit - 3] + "..."


class GuestAgent:
    """One session with a guest agent. `connect()` resyncs and checks for a stale freeze."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = COMMAND_TIMEOUT) -> None:
        self.path = str(path)
        self.timeout = timeout
        self.thawed_stale_freeze = False
        self._sock: socket.socket | None = None
        self._buf = b""
        self._dirty = True  # resync before the next command

    # ---- connection ------------------------------------------------------------------------------
    def connect(self, timeout: float = CONNECT_TIMEOUT, *, check_frozen: bool = True) -> GuestAgent:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(
                f"cannot connect to the guest agent socket {self.path}: {exc.strerror or exc}",
                hint="check the VM has a virtio-serial port org.qemu.guest_agent.0 on that socket",
            ) from exc
        self._sock = sock
        try:
            self.resync(timeout)
            if check_frozen:
                self._thaw_if_stale()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> GuestAgent:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def resync(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """0xFF + guest-sync-delimited until the agent echoes our id; drops whatever came before."""
        assert self._sock is not None
        deadline = time.monotonic() + timeout
        while True:
            sync_id = random.randrange(1, 1 << 31)
            request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
            self._send(DELIMITER + json.dumps(request).encode() + b"\n")
            try_until = min(deadline, time.monotonic() + SYNC_TRY_S)
            while True:
                try:
                    message = self._read_line(try_until, delimited=True)
                except TimeoutError:
                    break
                if message.get("return") == sync_id:
                    self._dirty = False
                    return
            if time.monotonic() >= deadline:
                raise AgentUnavailable(
                    f"the guest agent on {self.path} did not answer within {timeout:.0f} s",
                    hint="check that qemu-guest-agent runs in the guest (and that no other client holds the socket)",
                )

    def _thaw_if_stale(self) -> None:
        if self.guest_fsfreeze_status() != "frozen" or freeze_guarded(self.path):
            return
        log.warning("the guest behind %s was frozen with no backup running: thawing it", self.path)
        self.guest_fsfreeze_thaw()
        self.thawed_stale_freeze = True

    # ---- wire ------------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as exc:  # QEMU closed the chardev (the VM stopped): a named error, not a crash
            self._dirty = True
            raise AgentUnavailable(f"the guest agent socket {self.path} was closed: {exc.strerror or exc}") from exc

    def _read_line(self, deadline: float, *, delimited: bool = False) -> JsonDict:
        assert self._sock is not None
        while True:
            if delimited and DELIMITER in self._buf:
                self._buf = self._buf.rsplit(DELIMITER, 1)[1]
            if b"\n" in self._buf:
                line, _, self._buf = self._buf.partition(b"\n")
                try:
                    message = json.loads(line)
                except ValueError:
                    continue  # garbage left over from before a resync
                if isinstance(message, dict):
                    return message
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self._sock], [], [], left)
            if not ready:
                continue
            try:
                data = self._sock.recv(65536)
            except OSError as exc:
                raise AgentUnavailable(f"the guest agent socket {self.path} failed: {exc.strerror or exc}") from exc
            if not data:
                raise AgentUnavailable(f"the guest agent closed its socket {self.path}")
            self._buf += data

    def execute(self, command: str, arguments: JsonDict | None = None, timeout: float | None = None) -> Any:
        if self._sock is None:
            raise AgentUnavailable(f"the guest agent connection {self.path} is closed")
        if self._dirty:
            self.resync()
        request: JsonDict = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._send(json.dumps(request).encode() + b"\n")
        if command in ("guest-shutdown",):
            return None  # no reply by design
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            try:
                message = self._read_line(deadline)
            except TimeoutError as exc:
                self._dirty = True  # a late reply must not be taken for the next command's
                raise AgentUnavailable(
                    f"the guest agent did not answer {command} within {timeout or self.timeout:.0f} s"
                ) from exc
            if "error" in message:
                err = message["error"]
                raise AgentError(command, str(err.get("class", "")), str(err.get("desc", "")))
            if "return" in message:
                return message["return"]

    # ---- commands ----------------------------------------------------------------------------------
    def guest_ping(self) -> None:
        self.execute("guest-ping")

    def guest_info(self) -> JsonDict:
        result: JsonDict = self.execute("guest-info")
        return result

    def guest_get_osinfo(self) -> JsonDict:
        result: JsonDict = self.execute("guest-get-osinfo")
        return result

    def guest_get_fsinfo(self) -> list[JsonDict]:
        result: list[JsonDict] = self.execute("guest-get-fsinfo")
        return result

    def guest_fsfreeze_status(self) -> str:
        return str(self.execute("guest-fsfreeze-status"))

    def guest_fsfreeze_freeze(self, timeout: float = 60.0) -> int:
        return int(self.execute("guest-fsfreeze-freeze", timeout=timeout))

    def guest_fsfreeze_thaw(self, timeout: float = 60.0) -> int:
        return int(self.execute("guest-fsfreeze-thaw", timeout=timeout))

    def guest_exec(self, path: str, args: list[str], *, input_data: bytes | None = None) -> int:
        arguments: JsonDict = {"path": path, "arg": args, "capture-output": True}
        if input_data is not None:
            arguments["input-data"] = base64.b64encode(input_data).decode()
        return int(self.execute("guest-exec", arguments)["pid"])

    def guest_exec_status(self, pid: int) -> JsonDict:
        result: JsonDict = self.execute("guest-exec-status", {"pid": pid})
        return result

    def guest_shutdown(self, mode: str = "powerdown") -> None:
        self.execute("guest-shutdown", {"mode": mode})

    # ---- helpers -----------------------------------------------------------------------------------
    def run(self, path: str, args: list[str], *, timeout: float = 60.0, input_data: bytes | None = None) -> ExecResult:
        """guest-exec, then poll guest-exec-status until the process exits or the deadline passes."""
        pid = self.guest_exec(path, args, input_data=input_data)
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            status = self.guest_exec_status(pid)
            if status.get("exited"):
                return ExecResult(
                    exit_code=status.get("exitcode"),
                    signal=status.get("signal"),
                    stdout=_decode(status.get("out-data")),
                    stderr=_decode(status.get("err-data")),
                )
            if time.monotonic() >= deadline:
                return ExecResult(None, None, "", "", timed_out=True)
            time.sleep(delay)
            delay = min(0.2, delay * 2)

    def read_file(self, path: str, limit: int = 1 << 20) -> bytes | None:
        """A small guest file's content (through `cat`), None when it does not exist."""
        result = self.run("/bin/sh", ["-c", 'test -e "$1" || exit 3; cat -- "$1"', "sh", path], timeout=30)
        if result.exit_code == 3:
            return None
        if not result.ok:
            raise HypervisorError(f"cannot read {path} in the guest: {result.output()}")
        return result.stdout.encode()[:limit]


def _decode(data: Any) -> str:
    if not data:
        return ""
    with contextlib.suppress(ValueError):
        return base64.b64decode(data).decode(errors="replace")
    return ""

"""The guest-agent protocol and the Windows (VSS) consistency rules, against recorded agent replies.

No Windows guest runs here: a small fake agent on a unix socket answers with replies recorded from
qemu-ga (the virtio-win build for Windows, Debian's 7.2 for Linux), in the agent's wire format
(a 0xFF before the reply to guest-sync-delimited).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmvault.connectors.consistency import ScriptConfig, classify_vss_thaw
from vmvault.connectors.contract import APP_CONSISTENT, CRASH_CONSISTENT, FILE_SYSTEM_CONSISTENT, Budget
from vmvault.connectors.guest_agent import AgentError, AgentUnavailable, GuestAgent
from vmvault.connectors.qemu.quiesce import quiesced

Reply = dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any] | None]

WINDOWS_INFO = {"return": {"version": "107.0.1", "supported_commands": [
    {"enabled": True, "name": n, "success-response": True}
    for n in ("guest-ping", "guest-info", "guest-get-osinfo", "guest-fsfreeze-status", "guest-fsfreeze-freeze",
              "guest-fsfreeze-thaw", "guest-exec", "guest-exec-status", "guest-sync-delimited")]}}  # fmt: skip
WINDOWS_OS = {"return": {"name": "Microsoft Windows", "kernel-release": "20348", "version": "Microsoft Windows Server "
              "2022", "variant": "server", "pretty-name": "Windows Server 2022 Datacenter", "version-id": "2022",
              "variant-id": "server", "kernel-version": "10.0", "machine": "x86_64", "id": "mswindows"}}  # fmt: skip
VSS_WRITER_FAILED = {"error": {"class": "GenericError", "desc": "failed to do snapshot set: The writer experienced a "
                     "non-transient error. If the backup process is retried, the error is likely to reoccur. "
                     "(error: 800423f4)"}}  # fmt: skip
VSS_HOLD_WRITES = {
    "error": {
        "class": "GenericError",
        "desc": "couldn't hold writes: fsfreeze is limited up to 10 seconds (error: 80042314)",
    }
}
VSS_FREEZE_FAILED = {"error": {"class": "GenericError", "desc": "failed to add \\\\?\\Volume{9c24dfaf-a611-4b06-bd60-"
                     "e4fe3e7103da}\\ to snapshot set (error: 8004230c)"}}  # fmt: skip


class FakeAgent:
    """Answers one client at a time, like the agent's chardev, from a table of replies per command."""

    def __init__(self, path: Path, replies: dict[str, Reply]) -> None:
        self.path = path
        self.replies = replies
        self.calls: list[str] = []
        self.late: list[dict[str, Any]] = []  # replies sent before the answer to the next request
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                request = json.loads(line.lstrip(b"\xff"))
                command = request["execute"]
                self.calls.append(command)
                while self.late:
                    conn.sendall(json.dumps(self.late.pop(0)).encode() + b"\n")
                if command == "guest-sync-delimited":
                    conn.sendall(b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n")
                    continue
                reply = self.replies.get(command, {"return": {}})
                answer = reply(request) if callable(reply) else reply
                if answer is not None:
                    try:
                        conn.sendall(json.dumps(answer).encode() + b"\n")
                    except OSError:  # the client gave up waiting (a reply after its timeout)
                        return

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def agent_path(tmp_path: Path) -> Path:
    return tmp_path / "qga.sock"


@pytest.fixture
def fake(agent_path: Path) -> Iterator[Callable[[dict[str, Reply]], FakeAgent]]:
    made: list[FakeAgent] = []

    def make(replies: dict[str, Reply]) -> FakeAgent:
        made.append(FakeAgent(agent_path, replies))
        return made[-1]

    yield make
    for agent in made:
        agent.close()


def _windows(freeze: dict[str, Any], thaw: dict[str, Any]) -> dict[str, Reply]:
    return {"guest-info": WINDOWS_INFO, "guest-get-osinfo": WINDOWS_OS,
            "guest-fsfreeze-status": {"return": "thawed"},
            "guest-fsfreeze-freeze": freeze, "guest-fsfreeze-thaw": thaw}  # fmt: skip


@pytest.mark.parametrize(
    ("freeze", "thaw", "expected", "code"),
    [
        ({"return": 2}, {"return": 2}, APP_CONSISTENT, None),
        ({"return": 2}, VSS_WRITER_FAILED, FILE_SYSTEM_CONSISTENT, "vss_writer_failed"),
        ({"return": 2}, VSS_HOLD_WRITES, CRASH_CONSISTENT, "vss_hold_writes_timeout"),
        (VSS_FREEZE_FAILED, {"return": 0}, CRASH_CONSISTENT, "freeze_failed"),
    ],
)
def test_windows_vss_consistency_from_recorded_replies(
    fake: Callable[[dict[str, Reply]], FakeAgent],
    agent_path: Path,
    freeze: dict[str, Any],
    thaw: dict[str, Any],
    expected: str,
    code: str | None,
) -> None:
    agent = fake(_windows(freeze, thaw))
    snapshots = []
    with quiesced(str(agent_path)) as q:
        snapshots.append(agent.calls.count("guest-fsfreeze-freeze"))
    assert snapshots == [1], "the snapshot must be taken after the freeze"
    assert q.consistency == expected, q
    assert [n.code for n in q.notes] == ([code] if code else []), q.notes
    assert "guest-exec" not in agent.calls, "Windows guests get no Linux script framework"
    assert agent.calls.count("guest-fsfreeze-thaw") == 1


def test_classify_vss_thaw() -> None:
    assert classify_vss_thaw(None) == (APP_CONSISTENT, None)
    other = AgentError("guest-fsfreeze-thaw", "GenericError", "failed to complete backup (error: 80042301)")
    consistency, note = classify_vss_thaw(other)
    assert consistency == FILE_SYSTEM_CONSISTENT and note is not None and note.code == "vss_thaw_failed"


def test_a_stale_freeze_is_thawed_on_connect(fake: Callable[[dict[str, Reply]], FakeAgent], agent_path: Path) -> None:
    state = {"status": "frozen"}

    def thaw(_request: dict[str, Any]) -> dict[str, Any]:
        state["status"] = "thawed"
        return {"return": 1}

    agent = fake({"guest-fsfreeze-status": lambda _r: {"return": state["status"]}, "guest-fsfreeze-thaw": thaw})
    with GuestAgent(agent_path).connect() as client:
        assert client.thawed_stale_freeze
    assert state["status"] == "thawed" and agent.calls.count("guest-fsfreeze-thaw") == 1


def test_after_a_timeout_the_client_resyncs_and_drops_the_late_reply(
    fake: Callable[[dict[str, Reply]], FakeAgent], agent_path: Path
) -> None:
    agent: FakeAgent | None = None

    def slow(_request: dict[str, Any]) -> None:
        assert agent is not None
        agent.late.append({"return": "late reply to guest-get-fsinfo"})  # goes out with the next answer

    agent = fake({"guest-fsfreeze-status": {"return": "thawed"}, "guest-get-fsinfo": slow})
    with GuestAgent(agent_path).connect() as client:
        with pytest.raises(AgentUnavailable, match="did not answer guest-get-fsinfo"):
            client.execute("guest-get-fsinfo", timeout=0.3)
        # The late reply arrives just before the next answer: without the resync (0xFF +
        # guest-sync-delimited) it would be taken for the reply to guest-ping.
        assert client.execute("guest-ping") == {}
    assert agent.calls[-3:] == ["guest-get-fsinfo", "guest-sync-delimited", "guest-ping"], agent.calls


def test_script_config_follows_azures_fields() -> None:
    cfg = ScriptConfig.parse(json.dumps({
        "pluginName": "ScriptRunner", "preScriptLocation": "/opt/pre.sh", "postScriptLocation": "/opt/post.sh",
        "preScriptParams": ["a", "", "b"], "postScriptParams": [], "preScriptNoOfRetries": 2,
        "postScriptNoOfRetries": 0, "timeoutInSeconds": 45, "continueBackupOnFailure": "false",
        "fsFreezeEnabled": True}).encode())  # fmt: skip
    assert cfg.pre_script == "/opt/pre.sh" and cfg.post_script == "/opt/post.sh"
    assert cfg.pre_params == ("a", "b") and cfg.pre_retries == 2 and cfg.timeout_s == 45
    assert cfg.continue_on_failure is False and cfg.fs_freeze is True
    defaults = ScriptConfig.parse(b"{}")
    assert defaults.continue_on_failure and defaults.fs_freeze and not defaults.has_scripts
    with pytest.raises(ValueError):
        ScriptConfig.parse(b'{"timeoutInSeconds": 0}')


# ---- the quiesce budget (a slow fsfreeze hook: the agent answers nothing until it returns) ----------

LINUX_INFO = {"return": {"version": "7.2.22", "supported_commands": [
    {"enabled": True, "name": n, "success-response": True}
    for n in ("guest-ping", "guest-info", "guest-fsfreeze-status", "guest-fsfreeze-freeze",
              "guest-fsfreeze-thaw", "guest-sync-delimited")]}}  # fmt: skip


def _codes(q: Any) -> list[str]:
    """The notes' codes, less the one this agent always gets (it allows no guest-exec: no scripts)."""
    return [n.code for n in q.notes if n.code != "guest_exec_not_allowed"]


class FrozenState:
    """A Linux agent whose freeze takes `hook_s` (its fsfreeze hook), counting what it froze and thawed."""

    def __init__(self, hook_s: float) -> None:
        self.hook_s = hook_s
        self.frozen = False

    def replies(self) -> dict[str, Reply]:
        return {"guest-info": LINUX_INFO, "guest-fsfreeze-status": self.status,
                "guest-fsfreeze-freeze": self.freeze, "guest-fsfreeze-thaw": self.thaw}  # fmt: skip

    def status(self, _request: dict[str, Any]) -> dict[str, Any]:
        return {"return": "frozen" if self.frozen else "thawed"}

    def freeze(self, _request: dict[str, Any]) -> dict[str, Any]:
        time.sleep(self.hook_s)
        self.frozen = True
        return {"return": 1}

    def thaw(self, _request: dict[str, Any]) -> dict[str, Any]:
        was, self.frozen = self.frozen, False
        return {"return": 1 if was else 0}


def test_a_freeze_slower_than_the_frozen_window_but_within_the_budget_is_not_raced(
    fake: Callable[[dict[str, Reply]], FakeAgent], agent_path: Path
) -> None:
    state = FrozenState(hook_s=2.5)
    agent = fake(state.replies())
    with quiesced(str(agent_path), budget=Budget(freeze_s=10, frozen_s=1)) as q:
        assert state.frozen, "the snapshot must be taken after the freeze"
    assert q.consistency == FILE_SYSTEM_CONSISTENT and _codes(q) == [], q
    assert agent.calls.count("guest-fsfreeze-freeze") == 1 and agent.calls.count("guest-fsfreeze-thaw") == 1
    assert q.timings["freezeSeconds"] >= 2.5 and q.attempts == 1, q


def test_a_freeze_past_its_budget_is_thawed_when_the_agent_answers_retried_once_then_crash_consistent(
    fake: Callable[[dict[str, Reply]], FakeAgent], agent_path: Path
) -> None:
    state = FrozenState(hook_s=2.0)
    agent = fake(state.replies())
    snapshots = []
    with quiesced(str(agent_path), budget=Budget(freeze_s=1, frozen_s=5)) as q:
        snapshots.append(state.frozen)
    assert snapshots == [False], "the snapshot was taken while a late freeze held the guest"
    assert q.consistency == CRASH_CONSISTENT and _codes(q) == ["quiesce_timeout"], q
    (note,) = [n for n in q.notes if n.code == "quiesce_timeout"]
    assert "1 s quiesce budget" in note.message and "--quiesce-timeout" in (note.hint or "")
    assert agent.calls.count("guest-fsfreeze-freeze") == 2 and agent.calls.count("guest-fsfreeze-thaw") == 2
    assert not state.frozen and q.attempts == 2


def test_a_snapshot_past_the_frozen_window_is_thawed_by_the_guard(
    fake: Callable[[dict[str, Reply]], FakeAgent], agent_path: Path
) -> None:
    state = FrozenState(hook_s=0)
    fake(state.replies())
    with quiesced(str(agent_path), budget=Budget(freeze_s=10, frozen_s=1)) as q:
        deadline = time.monotonic() + 30
        while state.frozen and time.monotonic() < deadline:  # a snapshot that takes too long
            time.sleep(0.1)
    assert not state.frozen
    assert q.consistency == CRASH_CONSISTENT and _codes(q) == ["quiesce_timeout"], q
    assert "frozen window" in q.notes[-1].message


def test_a_hostile_agents_freeze_reply_is_a_named_warning(
    fake: Callable[[dict[str, Reply]], FakeAgent], agent_path: Path
) -> None:
    state = FrozenState(hook_s=0)
    agent = fake({**state.replies(), "guest-fsfreeze-freeze": {"return": {"frozen": "all"}}})
    with quiesced(str(agent_path), budget=Budget(freeze_s=5, frozen_s=5)) as q:
        pass
    assert q.consistency == CRASH_CONSISTENT and _codes(q) == ["freeze_failed"], q
    assert "not valid" in q.notes[-1].message and agent.calls.count("guest-fsfreeze-freeze") == 1


def test_an_agent_socket_that_closes_mid_command_is_a_named_error(
    fake: Callable[[dict[str, Reply]], FakeAgent], agent_path: Path
) -> None:
    fake({"guest-fsfreeze-status": {"return": "thawed"}})
    client = GuestAgent(agent_path).connect()
    assert client._sock is not None
    client._sock.shutdown(socket.SHUT_WR)
    with pytest.raises(AgentUnavailable):  # not a BrokenPipeError (the job's internal_error)
        for _ in range(3):
            client.execute("guest-ping", timeout=1)
    client.close()

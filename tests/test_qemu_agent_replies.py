"""The guest-agent protocol and the Windows (VSS) consistency rules, against recorded agent replies.

No Windows guest runs here: a small fake agent on a unix socket answers with replies recorded from
qemu-ga (the virtio-win build for Windows, Debian's 7.2 for Linux), in the agent's wire format
(a 0xFF before the reply to guest-sync-delimited).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmvault.engine.consistency import (
    APP_CONSISTENT,
    CRASH_CONSISTENT,
    FILE_SYSTEM_CONSISTENT,
    ScriptConfig,
    classify_vss_thaw,
    quiesced,
)
from vmvault.hypervisor.guest_agent import AgentError, AgentUnavailable, GuestAgent

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
                    conn.sendall(json.dumps(answer).encode() + b"\n")

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

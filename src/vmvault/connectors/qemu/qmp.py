"""A small synchronous QMP client (QEMU Machine Protocol over a unix socket), one method per command.

QEMU serves one client per `-qmp` socket: a second client connects at the socket level but gets no
greeting until the first one leaves. vmvault therefore needs a `-qmp` socket of its own (QEMU
accepts several), and a missing greeting is reported as "busy", never waited for forever.

Events arrive interleaved with replies; they are kept in order and `wait_event` consumes them.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

from vmvault.errors import Busy, HypervisorError

JsonDict = dict[str, Any]
DEFAULT_TIMEOUT = 30.0
GREETING_TIMEOUT = 5.0
_SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17)


class QmpError(HypervisorError):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QemuNotRunning(HypervisorError):
    """Nothing listens on the QMP socket: the QEMU behind it is not running."""

    code = "vm_not_running"


class QmpBusy(Busy):
    code = "qmp_busy"


class QmpClient:
    """One QMP session. Use as a context manager; every call has a deadline."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = str(path)
        self.timeout = timeout
        self.greeting: JsonDict = {}
        self.events: deque[JsonDict] = deque()
        self._sock: socket.socket | None = None
        self._buf = b""

    # ---- connection ------------------------------------------------------------------------------
    def connect(self, greeting_timeout: float = GREETING_TIMEOUT) -> QmpClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise QemuNotRunning(
                f"no QEMU answers on QMP socket {self.path} ({exc.strerror})",
                hint="start the VM, or check the path given with --qmp",
            ) from exc
        except OSError as exc:
            sock.close()
            raise HypervisorError(f"cannot connect to QMP socket {self.path}: {exc}") from exc
        self._sock = sock
        try:
            self.greeting = self._read_message(time.monotonic() + greeting_timeout, what="greeting")
        except TimeoutError as exc:
            self.close()
            raise QmpBusy(
                f"QEMU sent no greeting on QMP socket {self.path}: another client is connected to it",
                hint="give vmvault a QMP socket of its own: add -qmp unix:PATH,server=on,wait=off to the "
                "QEMU command line (QEMU accepts several -qmp options)",
            ) from exc
        except BaseException:
            self.close()
            raise
        if "QMP" not in self.greeting:
            self.close()
            raise HypervisorError(f"{self.path} is not a QMP socket (it sent {str(self.greeting)[:80]})")
        self.execute("qmp_capabilities")
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> QmpClient:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def peer_pid(self) -> int | None:
        """The pid of the process serving the socket (QEMU), from SO_PEERCRED."""
        if self._sock is None:
            return None
        raw = self._sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, struct.calcsize("3i"))
        pid: int = struct.unpack("3i", raw)[0]
        return pid or None

    # ---- wire ------------------------------------------------------------------------------------
    def _read_message(self, deadline: float, what: str) -> JsonDict:
        assert self._sock is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"QMP {what}")
            ready, _, _ = select.select([self._sock], [], [], left)
            if not ready:
                continue
            data = self._sock.recv(65536)
            if not data:
                raise HypervisorError(f"QEMU closed the QMP connection {self.path} (waiting for {what})")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        if not line.strip():
            return self._read_message(deadline, what)
        message: JsonDict = json.loads(line)
        return message

    def execute(self, command: str, arguments: JsonDict | None = None, timeout: float | None = None) -> Any:
        """Run one command; returns its `return` value, raises QmpError on an `error` reply."""
        if self._sock is None:
            raise HypervisorError(f"QMP connection to {self.path} is closed")
        request: JsonDict = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            try:
                message = self._read_message(deadline, what=f"the reply to {command}")
            except TimeoutError as exc:
                self.close()  # a late reply would be taken for the next command's
                raise HypervisorError(f"QEMU did not answer {command} within {timeout or self.timeout:.0f} s") from exc
            if "event" in message:
                self.events.append(message)
                continue
            if "error" in message:
                err = message["error"]
                raise QmpError(command, str(err.get("class", "")), str(err.get("desc", "")))
            if "return" in message:
                return message["return"]

    def wait_event(
        self, name: str, match: Callable[[JsonDict], bool] | None = None, timeout: float | None = None
    ) -> JsonDict:
        """Consume and return the first event `name` (whose data satisfies match), waiting for it."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for event in list(self.events):
                if event.get("event") == name and (match is None or match(event.get("data") or {})):
                    self.events.remove(event)
                    return event
            try:
                message = self._read_message(deadline, what=f"event {name}")
            except TimeoutError as exc:
                raise HypervisorError(f"QEMU sent no {name} event within {timeout or self.timeout:.0f} s") from exc
            if "event" in message:
                self.events.append(message)

    # ---- queries -----------------------------------------------------------------------------------
    def query_status(self) -> JsonDict:
        result: JsonDict = self.execute("query-status")
        return result

    def query_name(self) -> JsonDict:
        result: JsonDict = self.execute("query-name")
        return result

    def query_uuid(self) -> JsonDict:
        result: JsonDict = self.execute("query-uuid")
        return result

    def query_version(self) -> JsonDict:
        result: JsonDict = self.execute("query-version")
        return result

    def query_cpus_fast(self) -> list[JsonDict]:
        result: list[JsonDict] = self.execute("query-cpus-fast")
        return result

    def query_memory_size_summary(self) -> JsonDict:
        result: JsonDict = self.execute("query-memory-size-summary")
        return result

    def query_rx_filter(self) -> list[JsonDict]:
        result: list[JsonDict] = self.execute("query-rx-filter")
        return result

    def query_block(self) -> list[JsonDict]:
        result: list[JsonDict] = self.execute("query-block")
        return result

    def query_named_block_nodes(self) -> list[JsonDict]:
        result: list[JsonDict] = self.execute("query-named-block-nodes", {"flat": True})
        return result

    def query_block_jobs(self) -> list[JsonDict]:
        result: list[JsonDict] = self.execute("query-block-jobs")
        return result

    def query_block_exports(self) -> list[JsonDict]:
        result: list[JsonDict] = self.execute("query-block-exports")
        return result

    # ---- block nodes, bitmaps, jobs, exports -----------------------------------------------------------
    def blockdev_add(self, options: JsonDict) -> None:
        self.execute("blockdev-add", options)

    def blockdev_del(self, node_name: str) -> None:
        self.execute("blockdev-del", {"node-name": node_name})

    def transaction(self, actions: list[JsonDict]) -> None:
        self.execute("transaction", {"actions": actions})

    def block_dirty_bitmap_add(self, node: str, name: str, *, persistent: bool) -> None:
        self.execute("block-dirty-bitmap-add", {"node": node, "name": name, "persistent": persistent})

    def block_dirty_bitmap_remove(self, node: str, name: str) -> None:
        self.execute("block-dirty-bitmap-remove", {"node": node, "name": name})

    def block_dirty_bitmap_enable(self, node: str, name: str) -> None:
        self.execute("block-dirty-bitmap-enable", {"node": node, "name": name})

    def block_dirty_bitmap_disable(self, node: str, name: str) -> None:
        self.execute("block-dirty-bitmap-disable", {"node": node, "name": name})

    def block_dirty_bitmap_merge(self, node: str, target: str, bitmaps: list[str]) -> None:
        self.execute("block-dirty-bitmap-merge", {"node": node, "target": target, "bitmaps": bitmaps})

    def block_job_cancel(self, device: str, *, force: bool = False) -> None:
        self.execute("block-job-cancel", {"device": device, "force": force})

    def nbd_server_start(self, socket_path: str) -> None:
        self.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": socket_path}}})

    def nbd_server_stop(self) -> None:
        self.execute("nbd-server-stop")

    def block_export_add(self, export_id: str, node_name: str, name: str, bitmaps: list[str]) -> None:
        args: JsonDict = {"type": "nbd", "id": export_id, "node-name": node_name, "name": name, "writable": False}
        if bitmaps:
            args["bitmaps"] = bitmaps
        self.execute("block-export-add", args)

    def block_export_del(self, export_id: str, *, hard: bool = False) -> None:
        self.execute("block-export-del", {"id": export_id, "mode": "hard" if hard else "safe"})

    # ---- the machine -----------------------------------------------------------------------------------
    def stop(self) -> None:
        self.execute("stop")

    def cont(self) -> None:
        self.execute("cont")

    def quit(self) -> None:
        self.execute("quit")


# ---- transaction actions ---------------------------------------------------------------------------


def bitmap_add_action(node: str, name: str, *, persistent: bool) -> JsonDict:
    return {"type": "block-dirty-bitmap-add", "data": {"node": node, "name": name, "persistent": persistent}}


def bitmap_disable_action(node: str, name: str) -> JsonDict:
    return {"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": name}}


def blockdev_backup_action(job_id: str, device: str, target: str) -> JsonDict:
    """A point-in-time view: copy-before-write of `device` into `target`, never completing (sync=none)."""
    return {
        "type": "blockdev-backup",
        "data": {"job-id": job_id, "device": device, "target": target, "sync": "none", "auto-dismiss": True},
    }

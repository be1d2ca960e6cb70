"""Quiescing a plain QEMU VM's guest: its agent is a unix socket (connectors/consistency.py has the policy)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from vmvault.connectors.consistency import INSTALL_AGENT_HINT, Guest, Quiesce
from vmvault.connectors.consistency import quiesced as quiesced_guest
from vmvault.connectors.contract import Budget, Note
from vmvault.connectors.guest_agent import GuestAgent

PAUSED = Note("vm_paused", "the VM is not running (paused): no guest agent, the point is crash-consistent")
NO_AGENT = Note(
    "agent_not_configured", "no guest agent is configured: the point is crash-consistent", INSTALL_AGENT_HINT
)


@contextlib.contextmanager
def quiesced(
    agent_socket: str | None, *, running: bool = True, guest: bool = True, budget: Budget | None = None
) -> Iterator[Quiesce]:
    """The policy's sequence (connectors/consistency.py quiesced) with the agent on `agent_socket`.

    guest=False (a qemu-storage-daemon): nothing to quiesce.
    """
    socket_path = agent_socket or ""
    factory = (lambda: GuestAgent(socket_path)) if agent_socket else None
    found = Guest(factory, socket_path, present=guest, running=running, paused=PAUSED, paused_state="Unknown",
                  no_agent=NO_AGENT)  # fmt: skip
    with quiesced_guest(found, budget or Budget()) as q:
        yield q

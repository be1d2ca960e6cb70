"""Notifications arrive: a webhook (a real HTTP server) and an e-mail (a real SMTP server, aiosmtpd)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from helpers import Cli, wait_for

MiB = 1 << 20


class Hooks:
    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.lock = threading.Lock()


@pytest.fixture
def webhook() -> Iterator[tuple[str, Hooks]]:
    hooks = Hooks()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with hooks.lock:
                hooks.posts.append({"type": self.headers["Content-Type"], "body": json.loads(body)})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", hooks
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[tuple[str, list[Any]]]:
    from aiosmtpd.controller import Controller

    mails: list[Any] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
            mails.append(envelope)
            return "250 OK"

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield f"127.0.0.1:{port}", mails
    finally:
        controller.stop()


def test_webhook_and_email_arrive(
    cli: Cli, tmp_path: Path, webhook: tuple[str, Hooks], smtp: tuple[str, list[Any]]
) -> None:
    url, hooks = webhook
    server, mails = smtp
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(2 * MiB) + b"vmvault" * 1000 + bytes(2 * MiB))
    cli.vault_create("v1", tmp_path / "v1")
    assert cli.vm_add("vm1", disk).ok
    assert cli.protection_enable("vm1", "v1").ok
    hook = cli.ok("vault", "notify", "add", "v1", "--webhook", url, "--on", "all").json()
    assert (hook["kind"], hook["events"]) == ("webhook", "all")
    mail = cli.ok("vault", "notify", "add", "v1", "--email", "ops@example.com", "--smtp", server,
                  "--from", "vmvault@backup.example.com").json()  # fmt: skip
    assert (mail["kind"], mail["events"]) == ("email", "failed")
    r = cli.fails("vault", "notify", "add", "v1", "--webhook", "ftp://x")
    assert r.returncode == 64, r
    r = cli.fails("vault", "notify", "add", "v1", "--email", "ops@example.com")
    assert "--smtp" in r.stderr, r

    ok_job = cli.ok(*cli.backup_args("vm1")).json()
    wait_for(lambda: len(hooks.posts) >= 1, 30, "the webhook of the completed backup")
    post = hooks.posts[0]
    assert post["type"] == "application/json"
    assert post["body"]["event"] == "JobEnded" and post["body"]["vault"] == "v1"
    assert post["body"]["job"]["name"] == ok_job["name"] and post["body"]["job"]["properties"]["status"] == "Completed"
    assert post["body"]["job"] == cli.ok("job", "show", ok_job["name"]).json(), "the job as job show prints it"
    assert mails == [], "the e-mail target hears of failed jobs only"

    disk.unlink()  # the next backup fails
    failed = cli.fails(*cli.backup_args("vm1")).json()
    assert failed["properties"]["status"] == "Failed"
    wait_for(lambda: len(hooks.posts) >= 2 and len(mails) >= 1, 30, "the webhook and the e-mail of the failure")
    assert hooks.posts[1]["body"]["job"]["name"] == failed["name"]
    assert hooks.posts[1]["body"]["job"]["properties"]["errorDetails"][0]["errorCode"] == "not_found"
    (envelope,) = mails
    assert envelope.mail_from == "vmvault@backup.example.com"
    assert envelope.rcpt_tos == ["ops@example.com"]
    message = message_from_bytes(envelope.content)
    assert message["Subject"] == "[vmvault] Backup Failed: vm1"
    text = message.get_payload(decode=True).decode()
    assert failed["name"] in text and "not_found" in text

    targets = {t["kind"]: t for t in cli.ok("vault", "notify", "list", "v1").json()}
    assert (targets["webhook"]["delivered"], targets["email"]["delivered"]) == (2, 1)


def test_undeliverable_notification_stays_pending(cli: Cli, tmp_path: Path) -> None:
    cli.vault_create("v1", tmp_path / "v1")
    port = free_port()  # nothing listens there
    target = cli.ok("vault", "notify", "add", "v1", "--webhook", f"http://127.0.0.1:{port}/", "--on", "all").json()
    cli.ok("vault", "verify", "v1")  # a job of the vault: Completed
    (listed,) = cli.ok("vault", "notify", "list", "v1").json()
    assert (listed["delivered"], listed["pending"]) == (0, 1), listed
    cli.ok("vault", "notify", "remove", "v1", str(target["id"]))
    assert cli.ok("vault", "notify", "list", "v1").json() == []

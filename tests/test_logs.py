"""`vmvault serve --log-format json`: one JSON object per line, the job ID and VM on every line of a job."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
from pathlib import Path

from helpers import Cli
from test_scheduler import Serve

MiB = 1 << 20


def test_json_lines_carry_the_job_and_vm() -> None:
    from vmvault.logs import JobFilter, JsonFormatter, job_context

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(JobFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("vmvault.test-logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("outside")
        with job_context("job-1", "vm1"):
            logger.warning("two\nlines and a \"quote\"")
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4, lines  # a message with a newline stays on one line
    entries = [json.loads(line) for line in lines]
    assert "jobId" not in entries[0] and "jobId" not in entries[3]
    assert entries[1]["message"] == 'two\nlines and a "quote"'
    assert (entries[1]["jobId"], entries[1]["vm"], entries[1]["level"]) == ("job-1", "vm1", "WARNING")
    assert entries[2]["jobId"] == "job-1" and "ValueError: boom" in entries[2]["exception"]


def test_serve_logs_json_with_the_job_on_each_of_its_lines(cli: Cli, tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(os.urandom(MiB) + bytes(MiB))
    cli.vault_create("v1", tmp_path / "v1")
    assert cli.vm_add("vm1", disk).ok
    assert cli.protection_enable("vm1", "v1").ok
    r = cli.fails("serve", "--log-format", "yaml")
    assert r.returncode == 64 and "--log-format json" in r.output, r

    serve = Serve(cli, "--log-format", "json", "--retention-every", "0")
    try:
        job = cli.ok(*cli.backup_args("vm1")).json()  # queued to the service, run by its worker
    finally:
        serve.proc.send_signal(signal.SIGTERM)
        _stdout, stderr = serve.proc.communicate(timeout=120)  # all of stderr, up to its exit
        assert serve.stop() == 0
    lines = [line for line in stderr.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    of_job = [e for e in entries if job["name"] in e["message"]]
    assert len(of_job) >= 2, entries  # started, ended
    for entry in of_job:
        assert (entry["jobId"], entry["vm"]) == (job["name"], "vm1"), entry
        assert {"time", "level", "logger", "message"} <= entry.keys()
    assert any(e["message"].endswith("ended Completed") for e in of_job), of_job

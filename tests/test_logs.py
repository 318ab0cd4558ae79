"""asyncssh's log calls with the level check first (cfl_sftp.logs.skip_disabled_asyncssh_logs), and the service's
log lines (cfl_sftp.logs.configure_logging, in a child process: it reconfigures logging process-wide)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import asyncssh
from asyncssh.logging import SSHLogger, logger
from asyncssh.packet import SSHPacketLogger


class _Named:
    """A log argument that counts how often it is turned into text."""

    def __init__(self) -> None:
        self.formatted = 0

    def __str__(self) -> str:
        self.formatted += 1
        return "named"


class _Packets(SSHPacketLogger):
    @property
    def logger(self) -> SSHLogger:
        return logger.get_child("conn")


def test_a_disabled_asyncssh_log_call_formats_nothing(asyncssh_records: list[logging.LogRecord]) -> None:
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    named = _Named()
    logger.get_child("conn", "conn=1").info("Accepted from %s", [named, b"x"])
    _Packets().log_sent_packet(21, 3, b"\x15")
    assert named.formatted == 0
    assert asyncssh_records == []


def test_an_enabled_asyncssh_log_call_reads_as_asyncssh_writes_it(asyncssh_records: list[logging.LogRecord]) -> None:
    logging.getLogger("asyncssh").setLevel(logging.DEBUG)
    asyncssh.set_debug_level(3)
    named = _Named()
    logger.get_child("conn", "conn=1").info("Accepted from %s on %s", [named, b"x"], ("127.0.0.1", 22))
    _Packets().log_sent_packet(21, 3, b"\x15")
    assert asyncssh_records[0].getMessage() == "[conn=1] Accepted from named,x on 127.0.0.1, port 22"
    assert "Sent packet type 21, 1 byte" in asyncssh_records[1].getMessage()
    assert named.formatted == 1


_LOGGING_SCRIPT = """
import logging, structlog
from cfl_sftp.logs import configure_logging
configure_logging(level=LEVEL, json=True)
log = structlog.get_logger("cfl_sftp.example")
structlog.contextvars.bind_contextvars(session="0a1b2c3d4e5f")
log.debug("not_shown")
log.info("login_accepted", user="northern-ops", peer="127.0.0.1:40000")
logging.getLogger("asyncssh").info("asyncssh info is below its level")
logging.getLogger("asyncssh").warning("Connection lost from %s", "127.0.0.1")
try:
    raise ValueError("meter-secret")
except ValueError:
    log.exception("request_failed", request="READ")
"""


def _log_lines(level: str) -> list[dict[str, object]]:
    run = subprocess.run([sys.executable, "-c", _LOGGING_SCRIPT.replace("LEVEL", repr(level))],
                         capture_output=True, text=True, timeout=60, check=True)
    assert run.stderr == ""
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_our_lines_and_other_libraries_records_come_out_alike_as_json() -> None:
    """One JSON object per line on stdout, in order, whether a line comes from structlog (written directly) or
    from a library's stdlib logger; each carries the level, a UTC timestamp and the session's bound context; an
    exception is rendered as data, without frame locals."""
    lines = _log_lines("info")
    assert [line["event"] for line in lines] == ["login_accepted", "Connection lost from 127.0.0.1", "request_failed"]
    assert [line["level"] for line in lines] == ["info", "warning", "error"]
    assert all(line["session"] == "0a1b2c3d4e5f" and str(line["timestamp"]).endswith("Z") for line in lines)
    assert lines[0]["user"] == "northern-ops"
    exception = lines[2]["exception"]
    assert isinstance(exception, list)
    assert exception[0]["exc_type"] == "ValueError"
    assert all("locals" not in frame for frame in exception[0]["frames"])


def test_the_configured_level_filters_our_lines_and_the_libraries_records() -> None:
    assert [line["event"] for line in _log_lines("warning")] == ["Connection lost from 127.0.0.1", "request_failed"]


def test_a_logger_used_before_the_level_changes_follows_the_new_level() -> None:
    """``cfl-sftp demo`` configures WARNING while it builds the demo, then ``serve`` configures INFO: a module's
    logger first used in between logs at INFO afterwards, as a logger first used later does."""
    script = """
import structlog
from cfl_sftp.logs import configure_logging
configure_logging(level="warning", json=True)
early = structlog.get_logger("cfl_sftp.intake")
early.info("package_received", outcome="accepted")
configure_logging(level="info", json=True)
early.info("package_received", outcome="held")
structlog.get_logger("cfl_sftp.service").info("service_started")
configure_logging(level="error", json=True)
early.warning("not_shown")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(line["event"], line.get("outcome")) for line in lines] == [
        ("package_received", "held"), ("service_started", None)]


def test_a_log_line_that_cannot_be_written_is_lost_without_failing_the_caller() -> None:
    """As ``logging``'s handlers do: stdout gone (here closed under the logger), the caller carries on and stderr
    says a line was lost; a library's record through ``logging`` behaves the same."""
    script = """
import logging, os, sys, structlog
from cfl_sftp.logs import configure_logging
configure_logging(json=True)
log = structlog.get_logger("cfl_sftp.example")
log.info("before")
sys.stdout.flush()
os.close(1)
log.info("login_accepted", user="northern-ops")
log.exception("checkpoint_failed")
logging.getLogger("asyncssh").warning("Connection lost")
sys.stderr.write("carried on\\n")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert [json.loads(line)["event"] for line in run.stdout.splitlines()] == ["before"]
    assert run.stderr.count("--- log line lost: OSError") == 2
    assert run.stderr.rstrip().endswith("carried on")


def test_an_unknown_level_is_refused_and_changes_nothing() -> None:
    script = """
import structlog
from cfl_sftp.logs import configure_logging
configure_logging(level="info", json=True)
try:
    configure_logging(level="verbose", json=True)
except ValueError as exc:
    structlog.get_logger("x").info("refused", error=str(exc))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert [json.loads(line)["error"] for line in run.stdout.splitlines()] == ["unknown log level 'verbose'"]

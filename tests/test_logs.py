"""asyncssh's log calls with the level check first (cfl_sftp.logs.skip_disabled_asyncssh_logs)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import asyncssh
import pytest
from asyncssh.logging import SSHLogger, logger
from asyncssh.packet import SSHPacketLogger

from cfl_sftp.logs import skip_disabled_asyncssh_logs


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


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """asyncssh's records as its logger emits them, with its level and debug level restored afterwards."""
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    target = logging.getLogger("asyncssh")
    level, debug_level = target.level, SSHLogger._debug_level
    target.addHandler(handler)
    skip_disabled_asyncssh_logs()
    try:
        yield seen
    finally:
        target.removeHandler(handler)
        target.setLevel(level)
        SSHLogger._debug_level = debug_level


def test_a_disabled_asyncssh_log_call_formats_nothing(records: list[logging.LogRecord]) -> None:
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    named = _Named()
    logger.get_child("conn", "conn=1").info("Accepted from %s", [named, b"x"])
    _Packets().log_sent_packet(21, 3, b"\x15")
    assert named.formatted == 0
    assert records == []


def test_an_enabled_asyncssh_log_call_reads_as_asyncssh_writes_it(records: list[logging.LogRecord]) -> None:
    logging.getLogger("asyncssh").setLevel(logging.DEBUG)
    asyncssh.set_debug_level(3)
    named = _Named()
    logger.get_child("conn", "conn=1").info("Accepted from %s on %s", [named, b"x"], ("127.0.0.1", 22))
    _Packets().log_sent_packet(21, 3, b"\x15")
    assert records[0].getMessage() == "[conn=1] Accepted from named,x on 127.0.0.1, port 22"
    assert "Sent packet type 21, 1 byte" in records[1].getMessage()
    assert named.formatted == 1

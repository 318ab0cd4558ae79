"""asyncssh's log calls with the level check first (cfl_sftp.logs.skip_disabled_asyncssh_logs)."""

from __future__ import annotations

import logging

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

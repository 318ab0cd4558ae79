"""Structured logs: one JSON object per line on stdout, readable console lines on a terminal (SPEC 9).

asyncssh's own records and tracebacks go through the same processors, so stdout and stderr carry nothing but
these lines. Context that applies to a whole session (``session``, ``user``, ``peer``) is bound with
contextvars by the SFTP layer and appears on every line it causes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
from typing import Any, TextIO

import structlog
from asyncssh.logging import SSHLogger
from asyncssh.packet import SSHPacketLogger
from structlog.tracebacks import ExceptionDictTransformer

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
           "error": logging.ERROR, "exception": logging.ERROR, "critical": logging.CRITICAL,
           "fatal": logging.CRITICAL}
_level = logging.INFO
"""The level last configured. A logger is bound to the configuration in force at its first use and keeps it, so
the level is read at each call rather than built into the logger: ``cfl-sftp demo`` configures WARNING while it
builds the demo, then ``serve`` configures INFO, and the loggers used in between must follow."""


class StdoutLines:
    """Where structlog writes our lines: one write and a flush each, under a lock, as structlog's ``WriteLogger``.
    Unlike it, and like ``logging``'s handlers, a write that fails (stdout closed, its reader gone) never reaches
    the code that logged, which may be an ``except`` block, a background loop or an asyncssh callback: the line
    is lost and a note goes to stderr."""

    def __init__(self, file: TextIO, *_args: Any) -> None:
        self._file = file
        self._lock = _OUTPUT_LOCK

    def msg(self, message: str) -> None:
        try:
            with self._lock:
                self._file.write(message + "\n")
                self._file.flush()
        except (OSError, ValueError) as exc:  # ValueError: the file is closed
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(f"--- log line lost: {type(exc).__name__}: {exc}\n")

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


_OUTPUT_LOCK = threading.Lock()


def _drop_below_level(_logger: Any, method_name: str, event_dict: Any) -> Any:
    if _LEVELS.get(method_name, logging.INFO) < _level:
        raise structlog.DropEvent
    return event_dict


def configure_logging(*, level: str = "info", json: bool | None = None) -> None:
    """Route structlog and stdlib logging to stdout; JSON unless stdout is a terminal (or ``json`` says).

    Our own lines are rendered by structlog and written straight to stdout; records of other libraries
    (asyncssh, SQLAlchemy, Alembic) pass through stdlib ``logging`` and the same processors, so both come out
    alike. Through ``logging`` as well (a ``LogRecord``, the handler's lock, the formatter), a session's two
    INFO lines cost about 6 % of the server's CPU per login; written directly, about half that
    (docs/decisions.md).
    """
    global _level  # noqa: PLW0603 - the one setting every logger reads at each call
    numeric_level = logging.getLevelNamesMapping().get(level.upper())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}")
    if json is None:
        json = not sys.stdout.isatty()
    _level = numeric_level
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    rendering: list[Any] = [
        # Never frame locals: they can hold uploaded bytes (release notes) or data keys.
        structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
        if json
        else structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()),
    ]
    structlog.configure(
        processors=[_drop_below_level, *shared, *rendering],
        logger_factory=functools.partial(StdoutLines, sys.stdout),
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # asyncssh logs every packet at debug and every channel at info; warnings are what operators need.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    skip_disabled_asyncssh_logs()
    logging.getLogger("alembic").setLevel(logging.WARNING)


_format_asyncssh_log = SSHLogger.log
_format_asyncssh_packet_log = SSHPacketLogger._log_packet


def _asyncssh_log(self: SSHLogger, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
    if self.isEnabledFor(level):
        _format_asyncssh_log(self, level, msg, *args, **kwargs)


def asyncssh_packets_logged(logger: SSHLogger) -> bool:
    """Whether asyncssh writes packet dumps through ``logger`` (debug level 3 and DEBUG): a caller may then skip
    building a packet only to log it."""
    return SSHLogger._debug_level >= 3 and logger.isEnabledFor(logging.DEBUG)


def _asyncssh_packet_log(  # noqa: PLR0917 - asyncssh's own signature
    self: SSHPacketLogger, msg: str, pkttype: int, pktid: int | None, packet: Any, note: str
) -> None:
    if asyncssh_packets_logged(self.logger):
        _format_asyncssh_packet_log(self, msg, pkttype, pktid, packet, note)


def skip_disabled_asyncssh_logs() -> None:
    """Make asyncssh check its log level before it formats a message, not after.

    asyncssh 2.24 turns each argument of its ~60 log calls per login into text, and names and sizes every packet
    (~75 per login), before ``logging`` drops them all below ``WARNING``: about 0.3 ms of a login's 3 ms. With
    this, a call whose level is disabled returns at once; an enabled one is formatted and written exactly as
    before (``SSHLogger.log`` and ``SSHPacketLogger._log_packet`` are wrapped, not rewritten; packet dumps still
    need ``asyncssh.set_debug_level(3)`` and DEBUG).
    """
    SSHLogger.log = _asyncssh_log  # type: ignore[method-assign]
    SSHPacketLogger._log_packet = _asyncssh_packet_log  # type: ignore[method-assign]

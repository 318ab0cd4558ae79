"""Structured logs: one JSON object per line on stdout, readable console lines on a terminal (SPEC 9).

asyncssh's own records and tracebacks go through the same processors, so stdout and stderr carry nothing but
these lines. Context that applies to a whole session (``session``, ``user``, ``peer``) is bound with
contextvars by the SFTP layer and appears on every line it causes.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer


def configure_logging(*, level: str = "info", json: bool | None = None) -> None:
    """Route structlog and stdlib logging to stdout; JSON unless stdout is a terminal (or ``json`` says)."""
    if json is None:
        json = not sys.stdout.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Never frame locals: they can hold uploaded bytes (release notes) or data keys.
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
            if json
            else structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # asyncssh logs every packet at debug and every channel at info; warnings are what operators need.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)

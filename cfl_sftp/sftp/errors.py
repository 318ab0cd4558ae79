"""The one place where failures become SFTP status replies.

Domain errors carry a public message; anything else is logged with its traceback and answered with a fixed
``SSH_FX_FAILURE`` text, so no exception text (paths, SQL, keys) ever reaches a client.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import asyncssh
import structlog

from cfl_sftp.availability import ServiceUnavailable, is_database_outage
from cfl_sftp.domain.errors import CflError

log = structlog.get_logger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

GENERIC_FAILURE = "The request could not be completed."


def no_such_file() -> asyncssh.SFTPError:
    return asyncssh.SFTPNoSuchFile("No such file")


def permission_denied() -> asyncssh.SFTPError:
    return asyncssh.SFTPPermissionDenied("Permission denied")


def translate(exc: BaseException) -> asyncssh.SFTPError:
    if isinstance(exc, asyncssh.SFTPError):
        return exc
    if isinstance(exc, CflError):
        return asyncssh.SFTPFailure(exc.public_message)
    if is_database_outage(exc):  # expected while the database is away: no traceback for each request
        log.warning("sftp_request_failed", reason="database-unreachable", error=type(exc).__name__)
        return asyncssh.SFTPFailure(ServiceUnavailable.public_message)
    log.error("sftp_request_failed", exc_info=exc)
    return asyncssh.SFTPFailure(GENERIC_FAILURE)


def sftp_errors(func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Wrap an async SFTPServer method so that every exception leaves as a safe SFTP status."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await func(*args, **kwargs)
        except Exception as exc:  # the boundary: everything is translated here
            raise translate(exc) from None

    return wrapper

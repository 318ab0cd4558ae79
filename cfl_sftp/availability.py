"""Whether this node can use its database now (SPEC 9: while the database cannot be reached, a node refuses new
logins, answers requests with ``SSH_FX_FAILURE``, lets open downloads finish, and recovers by itself).

The node's background work notices an outage: the catalogue poll (a read every second), the heartbeat and the
audit writer (writes). Only a successful *write* ends an outage, because the audit trail is what a login needs:
a SQLite file locked by another process still answers reads. While the database is down the audit writer
probes it with an empty writing transaction, so the node comes back by itself within a second or two of the
database. Logging happens at the transitions, not at every failed attempt.

What this module does not do: refuse anything. The SSH layer asks :attr:`DatabaseAvailability.available`
before authenticating, the SFTP layer before each request that is not on an open handle.
"""

from __future__ import annotations

import threading
import time

import structlog
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from cfl_sftp.domain.errors import CflError

log = structlog.get_logger(__name__)


class ServiceUnavailable(CflError):
    """Refused because the node cannot reach its database (answered as ``SSH_FX_FAILURE``)."""

    public_message = "The service is temporarily unavailable; try again shortly."


def is_database_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the database could not be used at all (connection lost or refused, locked, read-only)
    rather than that a statement was wrong."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


class DatabaseAvailability:
    """The node's view of its database: up until an outage is seen, down until a write succeeds again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down_since: float | None = None

    @property
    def available(self) -> bool:
        return self._down_since is None

    def require(self) -> None:
        """Raise :class:`ServiceUnavailable` during an outage."""
        if self._down_since is not None:
            raise ServiceUnavailable()

    def failed(self, exc: BaseException, during: str) -> bool:
        """Report a failure (from any thread). True when it was an outage; logs once, as the outage begins."""
        if not is_database_outage(exc):
            return False
        with self._lock:
            began = self._down_since is None
            if began:
                self._down_since = time.monotonic()
        if began:
            detail = (str(getattr(exc, "orig", None) or exc).splitlines() or [""])[0][:200]
            log.error("database_unreachable", during=during, error=type(exc).__name__, detail=detail)
        return True

    def succeeded(self) -> None:
        """Report a successful write: an outage, if any, is over."""
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.warning("database_reachable_again", outage_seconds=round(time.monotonic() - since, 1))

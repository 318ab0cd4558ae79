"""Abuse limits on connections (SPEC 9 ``[limits]``): unauthenticated connections, bans, sessions per user.

Kept per node for now: with several nodes each enforces its own share (the shared database version is #8's).
Each refusal is logged and audited (``session-refused``, ``address-banned``); refusals that a flood could
repeat are audited at most once per address, reason and minute, so the trail cannot be flooded.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import structlog

from cfl_sftp.config import SessionLimits
from cfl_sftp.storage.audit_store import AuditEvent

log = structlog.get_logger(__name__)


class AbuseGuard:
    """Decisions about connections from one node's point of view; every method is O(1) on the event loop."""

    def __init__(
        self, limits: Callable[[], SessionLimits], audit: Callable[[AuditEvent], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = limits
        self._audit = audit
        self._clock = clock
        self._unauthenticated = 0
        self._failures: dict[str, deque[float]] = {}
        self._banned_until: dict[str, float] = {}
        self._last_refusal_audit: dict[tuple[str, str], int] = {}

    @property
    def unauthenticated(self) -> int:
        return self._unauthenticated

    def _refuse(self, address: str, reason: str, actor: str = "", organisation: str = "") -> None:
        log.warning("session_refused", peer=address, reason=reason, user=actor or None)
        minute = int(self._clock() // 60)
        if self._last_refusal_audit.get((address, reason)) != minute:
            self._last_refusal_audit[(address, reason)] = minute
            self._audit(AuditEvent("session-refused", actor, organisation, address, {"reason": reason}))

    def banned(self, address: str) -> bool:
        until = self._banned_until.get(address)
        if until is None:
            return False
        if until <= self._clock():
            del self._banned_until[address]
            return False
        return True

    def admit_connection(self, address: str) -> bool:
        """A new TCP connection: refused while its address is banned or too many are unauthenticated."""
        if self.banned(address):
            self._refuse(address, "address-banned")
            return False
        if self._unauthenticated >= self._limits().unauthenticated_connections:
            self._refuse(address, "unauthenticated-connections")
            return False
        self._unauthenticated += 1
        return True

    def authenticated(self) -> None:
        self._unauthenticated = max(0, self._unauthenticated - 1)

    def ended_unauthenticated(self, address: str, *, failed_login: bool) -> None:
        self._unauthenticated = max(0, self._unauthenticated - 1)
        if failed_login:
            self._login_failed(address)

    def _login_failed(self, address: str) -> None:
        limits = self._limits()
        now = self._clock()
        window = self._failures.setdefault(address, deque())
        window.append(now)
        while window and window[0] < now - limits.ban_seconds:
            window.popleft()
        if len(window) >= limits.failed_logins_per_address:
            self._banned_until[address] = now + limits.ban_seconds
            del self._failures[address]
            log.warning("address_banned", peer=address, seconds=limits.ban_seconds)
            self._audit(AuditEvent("address-banned", "", "", address, {
                "failed_logins": len(window), "ban_seconds": limits.ban_seconds}))

    def admit_session(self, address: str, user: str, organisation: str, open_sessions: int) -> bool:
        """An authenticated user's new connection: refused past ``sessions_per_user``."""
        if open_sessions > self._limits().sessions_per_user:
            self._refuse(address, "sessions-per-user", user, organisation)
            return False
        return True

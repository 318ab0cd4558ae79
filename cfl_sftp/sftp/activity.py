"""What each authenticated connection is doing, as the idle timeout and a graceful stop need to know it.

asyncssh 2.24 has no idle timeout of its own (``keepalive_interval`` checks that a peer is alive, which an idle
batch job is; ``login_timeout`` ends only before authentication), so the service keeps its own account here:

* a connection is **busy** while one of its SFTP requests is being answered, or while responses wait in the
  server's buffers for a slow client to take them;
* it is **active** whenever bytes of an SFTP request arrive (a large WRITE trickling in counts);
* :meth:`SessionActivity.idle_seconds` is how long it has been neither; a connection that never opened an SFTP
  channel is idle from its login;
* it holds a **transfer** while an SFTP file handle is open.

The rules that act on this (close after ``idle_timeout_seconds``; during a stop, close what has nothing in
progress) are the pure functions at the end; the service applies them and :class:`Runtime` does the closing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

import asyncssh


class ChannelActivity(Protocol):
    """One SFTP channel of a connection (the SFTP handler): what it holds open and what it has yet to send."""

    def open_files(self) -> int: ...

    def output_pending(self) -> bool: ...


class SessionActivity:
    """The activity of one authenticated connection (a session, as SPEC 8's ``session`` id names it)."""

    def __init__(
        self, session_id: str, conn: asyncssh.SSHServerConnection, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.session_id = session_id
        self.conn = conn
        self._clock = clock
        self.last_active = clock()
        self._requests = 0
        self._channels: set[ChannelActivity] = set()

    def touched(self) -> None:
        self.last_active = self._clock()

    def request_started(self) -> None:
        self._requests += 1
        self.last_active = self._clock()

    def request_ended(self) -> None:
        self._requests = max(0, self._requests - 1)
        self.last_active = self._clock()

    def attach(self, channel: ChannelActivity) -> None:
        self._channels.add(channel)
        self.last_active = self._clock()

    def detach(self, channel: ChannelActivity) -> None:
        self._channels.discard(channel)

    @property
    def requests_in_progress(self) -> int:
        return self._requests

    def open_files(self) -> int:
        return sum(channel.open_files() for channel in self._channels)

    def output_pending(self) -> bool:
        if any(channel.output_pending() for channel in self._channels):
            return True
        # What the SSH layer has handed to the socket but the kernel has not taken yet (the client reads
        # slowly): asyncssh keeps the transport private, and closing would drop these bytes.
        transport = getattr(self.conn, "_transport", None)
        return transport is not None and bool(transport.get_write_buffer_size())

    @property
    def busy(self) -> bool:
        return self._requests > 0 or self.output_pending()

    def idle_seconds(self, now: float | None = None) -> float:
        """Seconds since the last request byte or answer; 0 while busy."""
        if self.busy:
            return 0.0
        return max(0.0, (self._clock() if now is None else now) - self.last_active)

    @property
    def finished(self) -> bool:
        """Nothing in progress: no request being answered, nothing left to send, no file open."""
        return not self.busy and self.open_files() == 0


# -- the rules ---------------------------------------------------------------------------------------------

IDLE = "idle-timeout"
STOPPING = "service-stopping"
STOP_TIMEOUT = "stop-timeout"

DRAIN_IDLE_SECONDS = 5.0
"""During a stop, a session that holds a file open but has asked for nothing for this long (or for
``idle_timeout_seconds`` if shorter) is not transferring: it is closed rather than left to hold the stop."""


def idle_sessions(sessions: Iterable[SessionActivity], now: float, idle_timeout: float) -> list[SessionActivity]:
    """Sessions with no request for ``idle_timeout`` seconds (``[limits] idle_timeout_seconds``)."""
    return [s for s in sessions if s.idle_seconds(now) >= idle_timeout]


def drained_sessions(sessions: Iterable[SessionActivity], now: float, idle_timeout: float) -> list[SessionActivity]:
    """During a stop: sessions that have nothing in progress, or that went quiet with a file open."""
    grace = min(DRAIN_IDLE_SECONDS, idle_timeout)
    return [s for s in sessions if s.finished or s.idle_seconds(now) >= grace]

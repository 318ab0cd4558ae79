"""systemd's notification protocol (``sd_notify(3)``): tell the service manager how the service is doing.

With ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, a datagram socket (a path, or an abstract name written
with a leading ``@``), and waits for ``READY=1`` before it counts the service as started. Each message is one
datagram of ``KEY=value`` lines. The protocol is this small, so it is spoken here rather than through a library.

With ``WatchdogSec=`` systemd also expects ``WATCHDOG=1`` at least that often, and kills and restarts a
service whose pings stop: they are sent from the event loop, so a loop that hangs is restarted.

Notifying is best effort: the service never stops serving because the service manager did not listen. Outside
systemd (no ``$NOTIFY_SOCKET``) every call does nothing.

What this module leaves to the service: when each state is reached, and what the ``STATUS=`` text says.
"""

from __future__ import annotations

import os
import socket
import time

import structlog

log = structlog.get_logger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def watchdog_seconds(environ: dict[str, str] | None = None) -> float | None:
    """systemd's ``WatchdogSec=`` for this process (``$WATCHDOG_USEC``), or None when no watchdog is asked of it.

    As ``sd_watchdog_enabled(3)``: a ``$WATCHDOG_PID`` naming another process means the watchdog is not ours.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get(WATCHDOG_USEC_ENV, ""))
    except ValueError:
        return None
    pid = env.get(WATCHDOG_PID_ENV)
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1_000_000


def socket_address(name: str) -> str | bytes:
    """The address to send to: a path as it is, ``@name`` as the abstract socket ``\\0name``."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, as ``MONOTONIC_USEC=`` wants it with ``RELOADING=1``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Notifier:
    """Sends state changes to ``$NOTIFY_SOCKET``; a no-op when the service does not run under systemd."""

    def __init__(self, address: str | None = None) -> None:
        self._address = socket_address(address) if address else None
        self._socket: socket.socket | None = None

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.get(NOTIFY_SOCKET_ENV) or None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str | int) -> bool:
        """One datagram with ``KEY=value`` lines (keys upper-case); True when it was sent."""
        if self._address is None:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message, self._address)
        except OSError as exc:
            log.warning("service_manager_unreachable", error=str(exc), message=message.decode())
            return False
        return True

    def ready(self, status: str) -> bool:
        """Every listener is up (or a reload has finished): the service manager may count us as running."""
        return self.send(ready=1, status=_one_line(status))

    def reloading(self, status: str) -> bool:
        """A reload has begun; ``READY=1`` follows when it is done (systemd 253+ wants the timestamp)."""
        return self.send(reloading=1, monotonic_usec=monotonic_usec(), status=_one_line(status))

    def stopping(self, status: str, *, within_seconds: float | None = None) -> bool:
        """A stop has begun; ``within_seconds`` asks systemd to wait that long for it (``EXTEND_TIMEOUT_USEC``)."""
        if within_seconds is None:
            return self.send(stopping=1, status=_one_line(status))
        return self.send(stopping=1, status=_one_line(status), extend_timeout_usec=int(within_seconds * 1_000_000))

    def status(self, status: str) -> bool:
        return self.send(status=_one_line(status))

    def watchdog(self) -> bool:
        """The event loop is alive (``WATCHDOG=1``): sent at half the watchdog interval, from the loop itself."""
        return self.send(watchdog=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

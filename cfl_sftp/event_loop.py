"""The event loop ``cfl-sftp serve`` runs on: uvloop where it is installed, asyncio's own loop otherwise.

uvloop (libuv, in Cython) does the loop's own work (socket reads and writes, callbacks, timers) in C, which
saves CPU on every packet and every login (figures in benchmarks/README.md). It is a dependency on the platforms
it supports; elsewhere (PyPy, Windows, a build without it) the service runs on asyncio's loop with the same
behaviour, only slower, and says which in its ``service_started`` line.

The test suite runs its in-process services on the same kind of loop (tests/conftest.py), so it checks what
ships. What this module leaves to others: running the service (:mod:`cfl_sftp.service`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency wherever it installs
    uvloop = None  # type: ignore[assignment]

new_event_loop: Callable[[], asyncio.AbstractEventLoop] = (
    uvloop.new_event_loop if uvloop is not None else asyncio.new_event_loop
)
"""A new loop of the kind the service runs on; for ``asyncio.Runner(loop_factory=...)``."""



def loop_kind(loop: asyncio.AbstractEventLoop) -> str:
    """``"uvloop"`` or ``"asyncio"``: what ``loop`` is, as the ``service_started`` log line names it."""
    return type(loop).__module__.partition(".")[0]

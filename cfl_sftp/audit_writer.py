"""Group commits for the audit entries that nobody waits on, and the per-minute count of refused logins.

Logins, session ends and download completions are audited without making the client wait (SPEC 8: "the answer
never waits on this entry"). Writing each in its own transaction would cap the login rate at the database's
commit rate, so they are queued and appended together, every few milliseconds, in one transaction
(``audit_store.append_many``): ``seq`` stays gap-free because the batch takes the head row's lock once.

Refused logins are not written one by one either: unauthenticated clients could flood the trail. They are
counted per source address and UTC minute, and each finished minute becomes one ``login-refused`` entry with
its count.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections import Counter

import structlog

from cfl_sftp.storage import audit_store
from cfl_sftp.storage.audit_store import AuditEvent
from cfl_sftp.storage.db import Database

log = structlog.get_logger(__name__)

FLUSH_SECONDS = 0.02
MAX_BATCH = 500


def _minute(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(second=0, microsecond=0)


class AuditWriter:
    """Queues events from the event loop; one task writes them in batches (one transaction each)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._queue: list[AuditEvent] = []
        self._refused: Counter[tuple[str, dt.datetime]] = Counter()
        self._wakeup = asyncio.Event()

    def submit(self, event: AuditEvent) -> None:
        self._queue.append(event)
        self._wakeup.set()

    def login_refused(self, address: str, now: dt.datetime | None = None) -> None:
        self._refused[(address, _minute(now or dt.datetime.now(dt.UTC)))] += 1

    def _due_refusals(self, now: dt.datetime, *, everything: bool) -> list[AuditEvent]:
        current = _minute(now)
        due = [key for key in self._refused if everything or key[1] < current]
        events = []
        for address, minute in sorted(due, key=lambda k: (k[1], k[0])):
            count = self._refused.pop((address, minute))
            details = {"count": count, "minute": minute.strftime("%Y-%m-%dT%H:%MZ")}
            events.append(AuditEvent("login-refused", "", "", address, details))
        return events

    def _write(self, events: list[AuditEvent]) -> None:
        with self._db.writing() as session:
            audit_store.append_many(session, events)

    async def flush(self, *, everything: bool = False) -> None:
        """Write what is queued (and, with ``everything``, the refusals of the current minute too)."""
        events = self._due_refusals(dt.datetime.now(dt.UTC), everything=everything) + self._queue
        self._queue = []
        for start in range(0, len(events), MAX_BATCH):
            batch = events[start : start + MAX_BATCH]
            try:
                await asyncio.to_thread(self._write, batch)
            except Exception:
                # The database is unreachable: keep the entries and try again at the next flush.
                log.exception("audit_write_failed", entries=len(batch))
                self._queue[:0] = events[start:]
                return

    async def run(self) -> None:
        """Flush every few milliseconds while events arrive; check finished minutes of refusals each second."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), 1.0)
            self._wakeup.clear()
            await asyncio.sleep(FLUSH_SECONDS)  # let a burst of logins share one commit
            await self.flush()

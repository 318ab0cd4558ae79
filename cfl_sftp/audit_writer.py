"""Group commits for the audit entries that nobody waits on, and the per-minute count of refused logins.

Logins, session ends and download completions are audited without making the client wait (SPEC 8: "the answer
never waits on this entry"). Writing each in its own transaction would cap the login rate at the database's
commit rate, so they are queued and appended together, every few milliseconds, in one transaction
(``audit_store.append_many``): ``seq`` stays gap-free because the batch takes the head row's lock once.

Refused logins are not written one by one either: unauthenticated clients could flood the trail. They are
counted per source address and UTC minute, and each finished minute becomes one ``login-refused`` entry with
its count.

While the database cannot be reached (:mod:`cfl_sftp.availability`) entries wait in memory and are written, in
order, once it is back; an entry written more than :data:`DELAYED_SECONDS` after its event carries the event's
own time as ``details.occurred_at`` (``time`` is always that of the write, so that it is the order of ``seq``).
Little can queue up meanwhile, because the node refuses logins and requests during an outage: what remains is
the end of sessions and downloads already open. The queue is bounded all the same (:data:`MAX_QUEUED`); past
that, entries are dropped and counted in an error log line. A node killed during an outage loses its queue, as
it loses the sessions those entries describe.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
from collections import Counter

import structlog

from cfl_sftp.availability import DatabaseAvailability
from cfl_sftp.storage import audit_store
from cfl_sftp.storage.audit_store import AuditEvent, rfc3339
from cfl_sftp.storage.db import Database

log = structlog.get_logger(__name__)

FLUSH_SECONDS = 0.02
MAX_BATCH = 500
MAX_QUEUED = 100_000
RETRY_SECONDS = (0.25, 2.0)
"""First and longest wait between attempts while the database is unreachable (doubling in between)."""
DELAYED_SECONDS = 5.0


def _minute(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(second=0, microsecond=0)


class AuditWriter:
    """Queues events from the event loop; one task writes them in batches (one transaction each)."""

    def __init__(self, db: Database, availability: DatabaseAvailability | None = None) -> None:
        self._db = db
        self.availability = availability or DatabaseAvailability()
        self._queue: list[tuple[AuditEvent, dt.datetime]] = []
        self._refused: Counter[tuple[str, dt.datetime]] = Counter()
        self._wakeup = asyncio.Event()
        self.dropped = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, event: AuditEvent) -> None:
        if len(self._queue) >= MAX_QUEUED:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("audit_queue_full", dropped=self.dropped, event_dropped=event.event)
            return
        self._queue.append((event, dt.datetime.now(dt.UTC)))
        self._wakeup.set()

    def login_refused(self, address: str, now: dt.datetime | None = None) -> None:
        self._refused[(address, _minute(now or dt.datetime.now(dt.UTC)))] += 1

    def _due_refusals(self, now: dt.datetime, *, everything: bool) -> list[tuple[AuditEvent, dt.datetime]]:
        current = _minute(now)
        due = [key for key in self._refused if everything or key[1] < current]
        events = []
        for address, minute in sorted(due, key=lambda k: (k[1], k[0])):
            count = self._refused.pop((address, minute))
            details = {"count": count, "minute": minute.strftime("%Y-%m-%dT%H:%MZ")}
            events.append((AuditEvent("login-refused", "", "", address, details), now))
        return events

    def _write(self, queued: list[tuple[AuditEvent, dt.datetime]]) -> None:
        now = dt.datetime.now(dt.UTC)
        events = [
            dataclasses.replace(event, details={**event.details, "occurred_at": rfc3339(at)})
            if (now - at).total_seconds() > DELAYED_SECONDS and "occurred_at" not in event.details
            else event
            for event, at in queued
        ]
        with self._db.writing_rows() as connection:  # empty, a probe: BEGIN IMMEDIATE on SQLite
            audit_store.append_many(connection, events)

    async def flush(self, *, everything: bool = False) -> bool:
        """Write what is queued (and, with ``everything``, the refusals of the current minute too). During an
        outage an empty queue still probes the database. False when the database refused: nothing was lost,
        the entries wait for the next attempt."""
        events = self._due_refusals(dt.datetime.now(dt.UTC), everything=everything) + self._queue
        self._queue = []
        if not events and self.availability.available:
            return True
        for start in range(0, max(len(events), 1), MAX_BATCH):
            batch = events[start : start + MAX_BATCH]
            writing = asyncio.ensure_future(asyncio.to_thread(self._write, batch))
            try:
                await asyncio.shield(writing)
            except asyncio.CancelledError:
                # A stop cancelled the writer mid-flush: the batch in its thread may still commit, so wait for
                # it, and keep every entry it did not write queued for the stop's final flush.
                with contextlib.suppress(Exception):
                    await writing
                committed = not writing.cancelled() and writing.exception() is None
                self._queue[:0] = events[start + len(batch) if committed else start :]
                raise
            except Exception as exc:
                if not self.availability.failed(exc, "audit"):
                    log.exception("audit_write_failed", entries=len(batch))
                self._queue[:0] = events[start:]
                return False
        self.availability.succeeded()
        return True

    async def run(self) -> None:
        """Flush every few milliseconds while events arrive; check finished minutes of refusals each second;
        while the database is unreachable, try again with a growing pause (at most ``RETRY_SECONDS[1]``)."""
        pause = RETRY_SECONDS[0]
        while True:
            if self.availability.available:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), 1.0)
                self._wakeup.clear()
                await asyncio.sleep(FLUSH_SECONDS)  # let a burst of logins share one commit
            else:
                await asyncio.sleep(pause)
            written = await self.flush()
            pause = RETRY_SECONDS[0] if written else min(pause * 2, RETRY_SECONDS[1])

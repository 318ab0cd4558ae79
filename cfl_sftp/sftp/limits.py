"""Abuse limits on connections (SPEC 9 ``[limits]``): unauthenticated connections, bans, sessions per user.

Bans and session counts hold on every node (SPEC 9), through the database (:mod:`cfl_sftp.storage.limits_store`):

* **Bans**: a failed login is recorded in the database (in a worker thread, after the connection has gone), so
  failures through any node count towards one address's ban; the node whose failure reaches the threshold writes
  the ban and audits it. Each node refuses banned addresses from a cache in memory, refreshed from the database
  every :data:`BAN_REFRESH_SECONDS`, so a connection is refused before its SSH handshake with no database work,
  and a ban decided on one node holds on every other within about a second.
* **Sessions per user**: each authenticated connection is a row; a new one is admitted only while its user has
  fewer than ``sessions_per_user`` rows on live nodes (a node silent for 60 s no longer counts, and its rows are
  swept). Admission runs in a worker thread right after authentication, in group commits with every other
  admission and session end of the moment (:class:`SessionLedger`); the session channel opens only once it has
  answered, and a refused connection is closed.
* **Unauthenticated connections** are a node's own resource (sockets, handshakes) and are capped per node.

Each refusal is logged and audited (``session-refused``, ``address-banned``); refusals that a flood could
repeat are audited at most once per address, reason and minute, so the trail cannot be flooded. If the database
cannot be reached, a login is refused (nothing could be recorded) while banned addresses stay refused from the
cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from sqlalchemy.exc import IntegrityError

from cfl_sftp.config import SessionLimits
from cfl_sftp.storage import limits_store
from cfl_sftp.storage.audit_store import AuditEvent
from cfl_sftp.storage.db import Database
from cfl_sftp.storage.limits_store import OpenSession
from cfl_sftp.vault_admin import NODE_LIVE_SECONDS

log = structlog.get_logger(__name__)

BAN_REFRESH_SECONDS = 0.5
"""How often a node reads the bans other nodes decided: a ban holds everywhere within about a second."""
CLOSE_WAIT_SECONDS = 0.02
"""How long a session end may wait for an admission to share its transaction (as audit entries do)."""
CLOSE_RETRY_SECONDS = 1.0
"""How soon the removal of ended sessions' rows is tried again after the database refused it."""
SWEEP_SECONDS = 15.0
"""How often a node drops dead nodes' sessions, ended bans and old failures."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AbuseGuard:
    """A node's decisions about connections. The methods the event loop calls directly work in memory; the
    database work runs in tasks (worker threads)."""

    def __init__(
        self, limits: Callable[[], SessionLimits], audit: Callable[[AuditEvent], None], db: Database,
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        self._limits = limits
        self._audit = audit
        self._db = db
        self._clock = clock
        self._node_id = ""
        self._endpoint = ""
        self._unauthenticated = 0
        self._banned_until: dict[str, dt.datetime] = {}
        self._last_refusal_audit: dict[tuple[str, str], int] = {}
        self._admissions: dict[str, asyncio.Task[bool]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ledger = SessionLedger(db, lambda: self._limits().sessions_per_user, clock)

    @property
    def unauthenticated(self) -> int:
        return self._unauthenticated

    # -- node life ------------------------------------------------------------------------------------

    async def start(self, node_id: str, endpoint: str) -> None:
        """This node's identity; drop what an earlier run of it (same ``endpoint``) left, and load the bans."""
        self._node_id, self._endpoint = node_id, endpoint

        def drop() -> int:
            with self._db.writing() as session:
                return limits_store.drop_previous_runs(session, endpoint, node_id)

        dropped = await asyncio.to_thread(drop)
        if dropped:
            log.info("stale_sessions_dropped", sessions=dropped, endpoint=endpoint)
        await self.refresh()

    async def refresh(self) -> None:
        """Read the bans in force (every node's) into the cache."""

        def load() -> dict[str, dt.datetime]:
            with self._db.reading() as session:
                return limits_store.active_bans(session, self._clock())

        bans = await asyncio.to_thread(load)
        now = self._clock()
        # Keep bans this node decided that the database does not show yet (none, once committed).
        local = {a: u for a, u in self._banned_until.items() if u > now and a not in bans}
        self._banned_until = {**bans, **local}

    async def _sweep(self) -> None:
        now = self._clock()
        limits = self._limits()

        def sweep() -> None:
            with self._db.writing() as session:
                limits_store.sweep(
                    session, self._node_id, now, live_after=now - dt.timedelta(seconds=NODE_LIVE_SECONDS),
                    failures_before=now - dt.timedelta(seconds=limits.ban_seconds),
                )

        await asyncio.to_thread(sweep)

    async def run(self) -> None:
        """Refresh the ban cache every :data:`BAN_REFRESH_SECONDS`; sweep every :data:`SWEEP_SECONDS`."""
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        while True:
            try:
                await self.refresh()
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + SWEEP_SECONDS
                    await self._sweep()
            except Exception:
                log.exception("limits_refresh_failed")
            await asyncio.sleep(BAN_REFRESH_SECONDS)

    async def settle(self, timeout: float) -> int:
        """At stop: wait (bounded) for the database work of ended sessions and failed logins, whose audit entries
        (``address-banned``) must be queued before the last flush. Returns how many are still running."""
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout)
        return len(pending)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- refusals -------------------------------------------------------------------------------------

    def refuse_connection(
        self, address: str, reason: str, actor: str = "", organisation: str = "", peer: str | None = None
    ) -> None:
        """Log and (at most once per address, reason and minute) audit a refused connection; ``peer`` (address
        and port) names it when known."""
        peer = peer or address
        log.warning("session_refused", peer=peer, reason=reason, user=actor or None)
        minute = int(self._clock().timestamp() // 60)
        if self._last_refusal_audit.get((address, reason)) != minute:
            self._last_refusal_audit[(address, reason)] = minute
            self._audit(AuditEvent("session-refused", actor, organisation, peer, {"reason": reason}))

    def banned(self, address: str) -> bool:
        until = self._banned_until.get(address)
        if until is None:
            return False
        if until <= self._clock():
            del self._banned_until[address]
            return False
        return True

    # -- connections ----------------------------------------------------------------------------------

    def admit_connection(self, address: str) -> bool:
        """A new TCP connection: refused while its address is banned or too many are unauthenticated."""
        if self.banned(address):
            self.refuse_connection(address, "address-banned")
            return False
        if self._unauthenticated >= self._limits().unauthenticated_connections:
            self.refuse_connection(address, "unauthenticated-connections")
            return False
        self._unauthenticated += 1
        return True

    def authenticated(self) -> None:
        self._unauthenticated = max(0, self._unauthenticated - 1)

    def ended_unauthenticated(self, address: str, *, failed_login: bool) -> None:
        self._unauthenticated = max(0, self._unauthenticated - 1)
        if failed_login:
            self._spawn(self._login_failed(address))

    async def _login_failed(self, address: str) -> None:
        limits = self._limits()
        now = self._clock()

        def record() -> int | None:
            try:
                with self._db.writing() as session:
                    return limits_store.record_failed_login(
                        session, address, now, window_seconds=limits.ban_seconds,
                        threshold=limits.failed_logins_per_address, ban_seconds=limits.ban_seconds,
                        node_id=self._node_id,
                    )
            except IntegrityError:
                return None  # another node wrote the ban at the same moment, and audits it

        try:
            failures = await asyncio.to_thread(record)
        except Exception:
            log.exception("failed_login_not_recorded", peer=address)
            return
        if failures is None:
            return
        self._banned_until[address] = now + dt.timedelta(seconds=limits.ban_seconds)
        log.warning("address_banned", peer=address, seconds=limits.ban_seconds, failed_logins=failures)
        self._audit(AuditEvent("address-banned", "", "", address, {
            "failed_logins": failures, "ban_seconds": limits.ban_seconds}))

    # -- sessions -------------------------------------------------------------------------------------

    def admit_session(
        self, address: str, user: str, organisation: str, session_id: str, peer: str
    ) -> asyncio.Task[bool]:
        """An authenticated connection: admitted (True) while its user has fewer than ``sessions_per_user``
        sessions on every live node together, counting this one."""
        task = asyncio.ensure_future(self._admit(address, user, organisation, session_id, peer))
        self._admissions[session_id] = task
        return task

    async def _admit(self, address: str, user: str, organisation: str, session_id: str, peer: str) -> bool:
        opened = OpenSession(session_id=session_id, node_id=self._node_id, endpoint=self._endpoint, user=user,
                             peer=peer[:128], opened_at=self._clock())
        try:
            count = await self._ledger.open(opened)
        except Exception:
            log.exception("session_not_recorded", peer=address, user=user)
            self.refuse_connection(address, "database-unavailable", user, organisation, peer)
            return False
        if count is None:
            self.refuse_connection(address, "sessions-per-user", user, organisation, peer)
            return False
        return True

    def session_ended(self, session_id: str) -> None:
        """An authenticated connection is gone: its row goes (once its admission has answered)."""
        admission = self._admissions.pop(session_id, None)
        self._spawn(self._close_session(session_id, admission))

    async def _close_session(self, session_id: str, admission: asyncio.Task[bool] | None) -> None:
        if admission is not None:
            with contextlib.suppress(Exception):
                if not await admission:
                    return

        try:
            await self._ledger.close(session_id)
        except Exception:
            log.exception("session_row_not_removed", session=session_id)  # swept when this node is gone


class SessionLedger:
    """The open-sessions table, written in group commits: one transaction (one fsync on SQLite) for every
    admission and session end that arrived while the previous one was being written, not one per login.

    Admissions are written at once (a login waits for its answer). Session ends wait up to
    :data:`CLOSE_WAIT_SECONDS` for an admission to share its transaction; whenever an admission is written, every
    session end this node has seen is removed first, in the same transaction, so this node's own ends never
    count against its admissions. Admission stays exact: the batch counts each user's rows on live nodes once,
    under that user's lock, and then the rows it admits itself.
    """

    def __init__(self, db: Database, limit: Callable[[], int], clock: Callable[[], dt.datetime]) -> None:
        self._db = db
        self._limit = limit
        self._clock = clock
        self._opens: list[tuple[OpenSession, asyncio.Future[int | None]]] = []
        self._closes: list[tuple[str, asyncio.Future[None]]] = []
        self._writing: asyncio.Task[None] | None = None
        self._closes_due: asyncio.TimerHandle | None = None

    def open(self, opened: OpenSession) -> asyncio.Future[int | None]:
        """Resolves to the user's session count with ``opened``, or None when the limit refused it."""
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._opens.append((opened, future))
        self._write_now()
        return future

    def close(self, session_id: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closes.append((session_id, future))
        if self._writing is None and self._closes_due is None:
            self._closes_due = asyncio.get_running_loop().call_later(CLOSE_WAIT_SECONDS, self._write_now)
        return future

    def _write_now(self) -> None:
        if self._closes_due is not None:
            self._closes_due.cancel()
            self._closes_due = None
        if self._writing is None:
            self._writing = asyncio.ensure_future(self._write_batches())

    async def _write_batches(self) -> None:
        try:
            while self._opens or self._closes:
                opens, self._opens = self._opens, []
                closes, self._closes = self._closes, []
                try:
                    counts = await asyncio.to_thread(self._apply, [o for o, _ in opens], [c for c, _ in closes])
                except Exception as exc:
                    for _, refused in opens:
                        if not refused.done():
                            refused.set_exception(exc)
                    # A session that ended must stop counting, or its user stays short of sessions on every
                    # node until this one restarts: its removal is retried until the database takes it.
                    self._closes = closes + self._closes
                    log.warning("session_rows_not_removed", sessions=len(closes), error=str(exc))
                    await asyncio.sleep(CLOSE_RETRY_SECONDS)
                    continue
                for (_, opened), count in zip(opens, counts, strict=True):
                    if not opened.done():
                        opened.set_result(count)
                for _, closed in closes:
                    if not closed.done():
                        closed.set_result(None)
                if not self._opens:
                    break  # ends that arrived meanwhile wait for the next admission, or CLOSE_WAIT_SECONDS
        finally:
            self._writing = None
        if self._opens or self._closes:
            self._closes_due = asyncio.get_running_loop().call_later(CLOSE_WAIT_SECONDS, self._write_now)

    def _apply(self, opens: list[OpenSession], closes: list[str]) -> list[int | None]:
        """One transaction: this node's ended sessions go first, then the admissions are counted and written."""
        limit = self._limit()
        live_after = self._clock() - dt.timedelta(seconds=NODE_LIVE_SECONDS)
        with self._db.writing_rows() as connection:
            limits_store.close_sessions(connection, closes)
            return limits_store.open_sessions(connection, opens, limit=limit, live_after=live_after)

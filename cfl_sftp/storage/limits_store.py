"""Bans, failed logins and open sessions shared by every node through the database (SPEC 9).

Repository functions: each receives a session and never commits (the caller owns the transaction). Races between
nodes are settled here, under a lock per address (failed logins) or per user (sessions): a PostgreSQL
transaction-level advisory lock; SQLite's writing transactions are serialised already. So failures on two nodes
at the same moment both count, a ban is decided (and audited) once, and two nodes admitting the same user at
once cannot both slip under ``sessions_per_user``.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Sequence
from typing import NamedTuple

from sqlalchemy import Connection, bindparam, delete, func, insert, or_, select, text
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from cfl_sftp.storage.models import BanRow, FailedLoginRow, NodeRow, OpenSessionRow

_SESSION_LOCK_SPACE = 0x6366_6C02  # arbitrary constants: "cfl" + 2 and + 3 (the migration lock is + 1)
_BAN_LOCK_SPACE = 0x6366_6C03


def active_bans(session: Session, now: dt.datetime) -> dict[str, dt.datetime]:
    """Every address banned at ``now``, with the moment its ban ends."""
    rows = session.execute(select(BanRow.address, BanRow.until).where(BanRow.until > now))
    return {address: until for address, until in rows}


def record_failed_login(
    session: Session, address: str, now: dt.datetime, *, window_seconds: int, threshold: int, ban_seconds: int,
    node_id: str,
) -> int | None:
    """Count one failed login from ``address``; when it makes ``threshold`` within the window, ban the address.

    Returns the number of failures when this call decided the ban (the caller audits it), else None; a failure
    from an address already banned (a login that began before the ban) decides nothing.
    """
    _lock(session.connection(), _BAN_LOCK_SPACE, address)
    ban = session.get(BanRow, address)
    if ban is not None and ban.until > now:
        return None
    session.add(FailedLoginRow(address=address, at=now))
    session.flush()
    cutoff = now - dt.timedelta(seconds=window_seconds)
    count = session.scalar(
        select(func.count()).select_from(FailedLoginRow)
        .where(FailedLoginRow.address == address, FailedLoginRow.at > cutoff)
    ) or 0
    if count < threshold:
        return None
    until = now + dt.timedelta(seconds=ban_seconds)
    if ban is None:
        session.add(BanRow(address=address, until=until, banned_at=now, failed_logins=count, node_id=node_id))
    else:
        ban.until, ban.banned_at, ban.failed_logins, ban.node_id = until, now, count, node_id
    session.execute(delete(FailedLoginRow).where(FailedLoginRow.address == address))
    return count


def _lock_key(name: str) -> int:
    """The advisory-lock key of ``name``: a signed 32-bit int, as PostgreSQL's two-key form wants."""
    return zlib.crc32(name.encode()) - (1 << 31)


def _lock(connection: Connection, space: int, name: str) -> None:
    """Serialise transactions about ``name`` (and any name sharing its key) until this one ends (PostgreSQL;
    SQLite's writers are serial)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:space, :key)"), {"space": space, "key": _lock_key(name)})


_LIVE_NODE: ColumnElement[bool] = or_(
    OpenSessionRow.node_id == bindparam("node_id"),
    OpenSessionRow.node_id.in_(select(NodeRow.node_id).where(NodeRow.last_seen >= bindparam("live_after"))),
)
"""Rows of this node (``node_id``), or of a node whose heartbeat is at ``live_after`` or later."""


class OpenSession(NamedTuple):
    """An authenticated connection to record (a row of ``open_sessions``), as plain values: the login path builds
    one per login and never needs an ORM object for it."""

    session_id: str
    node_id: str
    endpoint: str
    user: str
    peer: str
    opened_at: dt.datetime


# Built once: the login path runs these in every admission, and building and caching them again cost more than
# running them. ``users`` and ``ids`` expand to as many values as the batch has.
_COUNT_LIVE_SESSIONS = (
    select(OpenSessionRow.user, func.count())
    .where(OpenSessionRow.user.in_(bindparam("users", expanding=True)), _LIVE_NODE)
    .group_by(OpenSessionRow.user)
)
_INSERT_SESSIONS = insert(OpenSessionRow)
_DELETE_SESSIONS = delete(OpenSessionRow).where(OpenSessionRow.session_id.in_(bindparam("ids", expanding=True)))


def open_sessions(
    connection: Connection, sessions: Sequence[OpenSession], *, limit: int, live_after: dt.datetime
) -> list[int | None]:
    """Record each of ``sessions`` (one node's, in order) whose user has fewer than ``limit`` sessions on live
    nodes, counting the ones admitted before it; per session, its user's count with it, or None (not recorded).

    One count per user and one multi-row insert, whatever the batch, with Core statements built once: this is the
    login path's database cost, paid once per login.
    """
    if not sessions:
        return []
    users = sorted({opened.user for opened in sessions})
    # In the order of the keys actually locked, each once: two nodes' batches taking [a, b] and [b, a] would
    # deadlock, and two names may share a key.
    for user in sorted({_lock_key(user): user for user in users}.values(), key=_lock_key):
        _lock(connection, _SESSION_LOCK_SPACE, user)
    counts: dict[str, int] = {user: count for user, count in connection.execute(
        _COUNT_LIVE_SESSIONS, {"users": users, "node_id": sessions[0].node_id, "live_after": live_after}
    )}
    answers: list[int | None] = []
    admitted = []
    for opened in sessions:
        count = counts.get(opened.user, 0)
        if count >= limit:
            answers.append(None)
            continue
        counts[opened.user] = count + 1
        answers.append(count + 1)
        admitted.append(opened._asdict())
    if admitted:
        connection.execute(_INSERT_SESSIONS, admitted)
    return answers


def close_sessions(connection: Connection, session_ids: Sequence[str]) -> None:
    if session_ids:
        connection.execute(_DELETE_SESSIONS, {"ids": list(session_ids)})


def drop_previous_runs(session: Session, endpoint: str, node_id: str) -> int:
    """A node starting again: the sessions its earlier runs (same endpoint, another node id) left are gone."""
    result = session.execute(
        delete(OpenSessionRow).where(OpenSessionRow.endpoint == endpoint, OpenSessionRow.node_id != node_id)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def sweep(session: Session, node_id: str, now: dt.datetime, *, live_after: dt.datetime,
          failures_before: dt.datetime) -> None:
    """Drop what no longer counts: sessions of dead nodes, ended bans, failures outside every window."""
    session.execute(delete(OpenSessionRow).where(~_LIVE_NODE), {"node_id": node_id, "live_after": live_after})
    session.execute(delete(BanRow).where(BanRow.until <= now))
    session.execute(delete(FailedLoginRow).where(FailedLoginRow.at <= failures_before))

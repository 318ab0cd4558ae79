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

from sqlalchemy import delete, func, insert, or_, select, text
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
    _lock(session, _BAN_LOCK_SPACE, address)
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


def _lock(session: Session, space: int, name: str) -> None:
    """Serialise transactions about ``name`` (and any name sharing its key) until this one ends (PostgreSQL;
    SQLite's writers are serial)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:space, :key)"), {"space": space, "key": _lock_key(name)})


def _live_node(node_id: str, live_after: dt.datetime) -> ColumnElement[bool]:
    """Rows of this node, or of a node whose heartbeat is recent."""
    live = select(NodeRow.node_id).where(NodeRow.last_seen >= live_after)
    return or_(OpenSessionRow.node_id == node_id, OpenSessionRow.node_id.in_(live))


_OPEN_SESSION_COLUMNS = tuple(column.key for column in OpenSessionRow.__table__.columns)


def open_sessions(
    session: Session, rows: Sequence[OpenSessionRow], *, limit: int, live_after: dt.datetime
) -> list[int | None]:
    """Record each of ``rows`` (one node's, in order) whose user has fewer than ``limit`` sessions on live nodes,
    counting the rows admitted before it; per row, its user's count with it, or None (not recorded).

    One count per user and one multi-row insert, whatever the batch (the login path's cost per session): the
    rows are plain values here and are inserted with Core, never added to ``session``.
    """
    if not rows:
        return []
    users = sorted({row.user for row in rows})
    # In the order of the keys actually locked, each once: two nodes' batches taking [a, b] and [b, a] would
    # deadlock, and two names may share a key.
    for user in sorted({_lock_key(user): user for user in users}.values(), key=_lock_key):
        _lock(session, _SESSION_LOCK_SPACE, user)
    connection = session.connection()
    counts: dict[str, int] = {user: count for user, count in connection.execute(
        select(OpenSessionRow.user, func.count())
        .where(OpenSessionRow.user.in_(users), _live_node(rows[0].node_id, live_after))
        .group_by(OpenSessionRow.user)
    )}
    answers: list[int | None] = []
    admitted = []
    for row in rows:
        count = counts.get(row.user, 0)
        if count >= limit:
            answers.append(None)
            continue
        counts[row.user] = count + 1
        answers.append(count + 1)
        admitted.append({key: getattr(row, key) for key in _OPEN_SESSION_COLUMNS})
    if admitted:
        connection.execute(insert(OpenSessionRow), admitted)
    return answers


def close_sessions(session: Session, session_ids: Sequence[str]) -> None:
    if session_ids:
        session.connection().execute(delete(OpenSessionRow).where(OpenSessionRow.session_id.in_(session_ids)))


def drop_previous_runs(session: Session, endpoint: str, node_id: str) -> int:
    """A node starting again: the sessions its earlier runs (same endpoint, another node id) left are gone."""
    result = session.execute(
        delete(OpenSessionRow).where(OpenSessionRow.endpoint == endpoint, OpenSessionRow.node_id != node_id)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def sweep(session: Session, node_id: str, now: dt.datetime, *, live_after: dt.datetime,
          failures_before: dt.datetime) -> None:
    """Drop what no longer counts: sessions of dead nodes, ended bans, failures outside every window."""
    session.execute(delete(OpenSessionRow).where(~_live_node(node_id, live_after)))
    session.execute(delete(BanRow).where(BanRow.until <= now))
    session.execute(delete(FailedLoginRow).where(FailedLoginRow.at <= failures_before))

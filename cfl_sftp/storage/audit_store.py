"""Appending audit entries in the caller's transaction (SPEC 8).

``append`` takes the one ``audit_head`` row (locked ``FOR UPDATE`` on PostgreSQL; SQLite's writing transactions
are already exclusive), gives the entry the next ``seq``, serialises it as RFC 8785 bytes, and extends the
Merkle tree's compact range by one leaf: O(log n) per entry, never a recomputation. Because it runs in the
transaction of the change it records, an entry exists exactly when its change does, and ``seq`` has no gap.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.orm import Session

from cfl_sftp.domain.audit import CompactRange, canonical_entry, leaf_hash
from cfl_sftp.storage.models import AuditEntryRow, AuditHeadRow

_HEAD_ID = 1


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """What happened, by whom, from where: the fields of an entry other than ``seq`` and ``time``."""

    event: str
    actor: str
    organisation: str
    peer: str
    details: Mapping[str, object]


def rfc3339(moment: dt.datetime) -> str:
    """UTC with microseconds and a ``Z``: sortable text that every language parses."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# Built once: the audit writer runs them for every group commit of logins and session ends.
_LOCK_HEAD = select(AuditHeadRow.size, AuditHeadRow.compact_range).where(AuditHeadRow.id == _HEAD_ID).with_for_update()
_INSERT_ENTRIES = insert(AuditEntryRow)
_UPDATE_HEAD = update(AuditHeadRow).where(AuditHeadRow.id == _HEAD_ID)


def _lock_head(connection: Connection) -> tuple[int, CompactRange]:
    """The trail's size and compact range, locked until the transaction ends (created empty on first use)."""
    head = connection.execute(_LOCK_HEAD).one_or_none()
    if head is None:
        connection.execute(insert(AuditHeadRow).values(id=_HEAD_ID, size=0, compact_range=CompactRange().to_bytes()))
        return 0, CompactRange()
    return head.size, CompactRange.from_bytes(head.compact_range)


def append(transaction: Session | Connection, event: AuditEvent, now: dt.datetime | None = None) -> int:
    """Append ``event`` as the next entry in the caller's transaction and return its ``seq``."""
    return append_many(transaction, [event], now)[0]


def append_many(
    transaction: Session | Connection, events: list[AuditEvent], now: dt.datetime | None = None
) -> list[int]:
    """Append several entries under one lock of the head row (a group commit).

    The head and the entries are read and written with Core statements built once, on the transaction's
    connection, never as ORM objects: the audit writer appends every login and session end this way, and a unit
    of work cost more than the entries themselves. ``transaction`` is an ORM session (a change and its entry in
    one transaction) or a bare connection (:meth:`Database.writing_rows`).
    """
    if not events:
        return []
    if isinstance(transaction, Session):
        transaction.flush()  # the change this entry records goes first, before the head is locked
        connection = transaction.connection()
    else:
        connection = transaction
    moment = now or dt.datetime.now(dt.UTC)
    time_text = rfc3339(moment)
    size, tree = _lock_head(connection)
    seqs: list[int] = []
    rows: list[dict[str, object]] = []
    for event in events:
        size += 1
        entry = canonical_entry(
            {
                "seq": size,
                "time": time_text,
                "event": event.event,
                "actor": event.actor,
                "organisation": event.organisation,
                "peer": event.peer,
                "details": dict(event.details),
            }
        )
        leaf = leaf_hash(entry)
        tree.append(leaf)
        rows.append({"seq": size, "time": moment, "event": event.event, "entry": entry, "leaf_hash": leaf})
        seqs.append(size)
    connection.execute(_INSERT_ENTRIES, rows)
    connection.execute(_UPDATE_HEAD, {"size": size, "compact_range": tree.to_bytes()})
    return seqs

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

from sqlalchemy import insert, select
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


def _lock_head(session: Session) -> AuditHeadRow:
    head = session.execute(
        select(AuditHeadRow).where(AuditHeadRow.id == _HEAD_ID).with_for_update()
    ).scalar_one_or_none()
    if head is None:
        head = AuditHeadRow(id=_HEAD_ID, size=0, compact_range=CompactRange().to_bytes())
        session.add(head)
        session.flush()
    return head


def append(session: Session, event: AuditEvent, now: dt.datetime | None = None) -> int:
    """Append ``event`` as the next entry in the caller's transaction and return its ``seq``."""
    return append_many(session, [event], now)[0]


def append_many(session: Session, events: list[AuditEvent], now: dt.datetime | None = None) -> list[int]:
    """Append several entries under one lock of the head row (a group commit).

    The entries go in as one multi-row insert (Core, on the session's connection) rather than one ORM object
    each: the audit writer appends every login and session end this way, and the unit of work cost more than
    the entries themselves.
    """
    moment = now or dt.datetime.now(dt.UTC)
    time_text = rfc3339(moment)
    head = _lock_head(session)
    tree = CompactRange.from_bytes(head.compact_range)
    seqs: list[int] = []
    rows: list[dict[str, object]] = []
    for event in events:
        seq = head.size + 1
        entry = canonical_entry(
            {
                "seq": seq,
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
        rows.append({"seq": seq, "time": moment, "event": event.event, "entry": entry, "leaf_hash": leaf})
        head.size = seq
        seqs.append(seq)
    if rows:
        session.connection().execute(insert(AuditEntryRow), rows)
    head.compact_range = tree.to_bytes()
    session.flush()
    return seqs

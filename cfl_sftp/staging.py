"""Staging files in ``/incoming``: any name that is not a ``*.cfl`` (SPEC 4).

Clients that upload to a temporary name and rename at the end (WinSCP, rclone, lftp, resumable transfers) write
here. Only the owner sees its staging files; they can be read back, appended to, renamed (a rename to ``*.cfl``
runs the gateway over the file's bytes), removed, count against ``staging_quota_bytes`` per user and expire
after ``staging_ttl_hours``.

A staging file is a list of sealed parts (``staging_parts``), one per write session, each under its own data key
(SPEC 7: every byte received is stored encrypted). Writes go front to back: at the end of the file (append,
resume) or from zero after truncation; a write anywhere else is refused.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from cfl_sftp.deployment import Deployment
from cfl_sftp.domain.errors import CflError
from cfl_sftp.storage import audit_store
from cfl_sftp.storage.audit_store import AuditEvent
from cfl_sftp.storage.models import StagingPartRow, VaultObjectRow
from cfl_sftp.storage.sealed import SealedReader, SealedWriter, spool_context


class StagingError(CflError):
    """A staging operation the rules do not allow (quota, write position)."""


class QuotaExceeded(StagingError):
    public_message = "Your staging quota in /incoming is full."


@dataclass(frozen=True, slots=True)
class StagingFile:
    owner: str
    name: str
    size: int
    created_at: dt.datetime
    parts: tuple[tuple[str, int], ...]  # (vault object id, size)


def _files(session: Session, owner: str, name: str | None = None) -> list[StagingFile]:
    query = select(StagingPartRow).where(StagingPartRow.owner == owner)
    if name is not None:
        query = query.where(StagingPartRow.name == name)
    grouped: dict[str, list[StagingPartRow]] = {}
    for row in session.execute(query.order_by(StagingPartRow.name, StagingPartRow.part_no)).scalars():
        grouped.setdefault(row.name, []).append(row)
    return [
        StagingFile(
            owner=owner,
            name=file_name,
            size=sum(p.size for p in parts),
            created_at=min(p.created_at for p in parts),
            parts=tuple((p.vault_object, p.size) for p in parts),
        )
        for file_name, parts in grouped.items()
    ]


class StagingArea:
    """Staging files of every user, over the shared database and spool folder."""

    def __init__(self, deployment: Deployment) -> None:
        self._deployment = deployment
        # Bytes of each owner that open writers hold but have not recorded yet, and the recorded bytes added
        # (or removed) since: so several handles open at once share one quota on this node.
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        self._recorded_delta: Counter[str] = Counter()

    def charge(self, owner: str, amount: int, recorded_at_open: int, delta_at_open: int) -> None:
        """Count ``amount`` new bytes against the owner's quota, or raise :class:`QuotaExceeded`."""
        quota = self._deployment.config.gateway.staging_quota_bytes
        with self._lock:
            recorded = recorded_at_open + self._recorded_delta[owner] - delta_at_open
            if recorded + self._in_flight[owner] + amount > quota:
                raise QuotaExceeded()
            self._in_flight[owner] += amount

    def _settle(self, owner: str, written: int, *, recorded: bool) -> None:
        with self._lock:
            self._in_flight[owner] -= written
            if recorded:
                self._recorded_delta[owner] += written

    def recorded_delta(self, owner: str) -> int:
        with self._lock:
            return self._recorded_delta[owner]

    def files_of(self, owner: str) -> list[StagingFile]:
        with self._deployment.db.reading() as session:
            return _files(session, owner)

    def get(self, owner: str, name: str) -> StagingFile | None:
        with self._deployment.db.reading() as session:
            found = _files(session, owner, name)
        return found[0] if found else None

    def used_bytes(self, owner: str) -> int:
        with self._deployment.db.reading() as session:
            total = session.execute(
                select(func.coalesce(func.sum(StagingPartRow.size), 0)).where(StagingPartRow.owner == owner)
            ).scalar_one()
        return int(total)

    def open_writer(self, owner: str, organisation: str, name: str, *, truncate: bool) -> StagingWriter:
        """Start a write session; with ``truncate`` the file's old parts are dropped first."""
        if truncate:
            self.remove(owner, name)
        existing = self.get(owner, name)
        return StagingWriter(
            self,
            owner,
            organisation,
            name,
            start=existing.size if existing else 0,
            part_no=len(existing.parts) if existing else 0,
            recorded_at_open=self.used_bytes(owner),
            delta_at_open=self.recorded_delta(owner),
        )

    def _record_part(self, writer: StagingWriter, sealed_size: int, obj_writer: SealedWriter) -> None:
        deployment = self._deployment
        obj = obj_writer.close()
        now = dt.datetime.now(dt.UTC)
        final = deployment.spool.commit(obj)
        try:
            with deployment.db.writing() as session:
                session.add(obj.row(deployment.keyring, spool_context(obj.object_id), now))
                session.flush()
                session.add(
                    StagingPartRow(
                        owner=writer.owner,
                        organisation=writer.organisation,
                        name=writer.name,
                        part_no=writer.part_no,
                        vault_object=obj.object_id,
                        size=sealed_size,
                        created_at=now,
                    )
                )
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        finally:
            obj.path.unlink(missing_ok=True)

    def _delete_parts(self, session: Session, rows: list[StagingPartRow]) -> list[str]:
        objects = [r.vault_object for r in rows]
        for row in rows:
            session.delete(row)
        session.flush()
        if objects:
            session.execute(delete(VaultObjectRow).where(VaultObjectRow.object_id.in_(objects)))
        return objects

    def remove(self, owner: str, name: str) -> bool:
        with self._deployment.db.writing() as session:
            rows = list(
                session.execute(
                    select(StagingPartRow).where(StagingPartRow.owner == owner, StagingPartRow.name == name)
                ).scalars()
            )
            objects = self._delete_parts(session, rows)
        with self._lock:
            self._recorded_delta[owner] -= sum(r.size for r in rows)
        for object_id in objects:
            self._deployment.spool.remove(object_id)
        return bool(rows)

    def rename(self, owner: str, old: str, new: str, *, overwrite: bool) -> bool:
        """Rename within the owner's staging files; False when ``old`` does not exist."""
        removed: list[str] = []
        with self._deployment.db.writing() as session:
            exists = session.execute(
                select(func.count()).where(StagingPartRow.owner == owner, StagingPartRow.name == old)
            ).scalar_one()
            if not exists:
                return False
            if old == new:
                return True
            target = list(
                session.execute(
                    select(StagingPartRow).where(StagingPartRow.owner == owner, StagingPartRow.name == new)
                ).scalars()
            )
            if target:
                if not overwrite:
                    raise StagingError("A file with that name already exists.")
                removed = self._delete_parts(session, target)
            session.execute(
                update(StagingPartRow)
                .where(StagingPartRow.owner == owner, StagingPartRow.name == old)
                .values(name=new)
            )
        for object_id in removed:
            self._deployment.spool.remove(object_id)
        return True

    def reader(self, staged: StagingFile) -> StagingReader:
        return StagingReader(self._deployment, staged)

    def expire(self, now: dt.datetime | None = None) -> int:
        """Remove staging files older than ``staging_ttl_hours``; each is audited as ``staging-expired``."""
        now = now or dt.datetime.now(dt.UTC)
        cutoff = now - dt.timedelta(hours=self._deployment.config.gateway.staging_ttl_hours)
        removed: list[str] = []
        with self._deployment.db.writing() as session:
            old = session.execute(
                select(StagingPartRow.owner, StagingPartRow.name, StagingPartRow.organisation)
                .group_by(StagingPartRow.owner, StagingPartRow.name, StagingPartRow.organisation)
                .having(func.min(StagingPartRow.created_at) < cutoff)
            ).all()
            for owner, name, organisation in old:
                rows = list(
                    session.execute(
                        select(StagingPartRow).where(StagingPartRow.owner == owner, StagingPartRow.name == name)
                    ).scalars()
                )
                size = sum(r.size for r in rows)
                removed += self._delete_parts(session, rows)
                audit_store.append(
                    session,
                    AuditEvent("staging-expired", owner, organisation, "local", {"file_name": name, "size": size}),
                )
        for object_id in removed:
            self._deployment.spool.remove(object_id)
        return len(old)


class StagingWriter:
    """One write session on a staging file: bytes go front to back into a new sealed part."""

    def __init__(
        self, area: StagingArea, owner: str, organisation: str, name: str, *, start: int, part_no: int,
        recorded_at_open: int, delta_at_open: int,
    ) -> None:
        self._area = area
        self.owner = owner
        self.organisation = organisation
        self.name = name
        self.part_no = part_no
        self.next_offset = start
        self._written = 0
        self._recorded_at_open = recorded_at_open
        self._delta_at_open = delta_at_open
        self._part: SealedWriter | None = None

    def write(self, offset: int, data: bytes) -> None:
        if offset != self.next_offset:
            raise StagingError("Staging files are written front to back; this write is out of order.")
        self._area.charge(self.owner, len(data), self._recorded_at_open, self._delta_at_open)
        if self._part is None:
            self._part = self._area._deployment.spool.writer("staging")
        self._part.write(data)
        self._written += len(data)
        self.next_offset += len(data)

    def close(self) -> None:
        """Record the part; a session that wrote nothing still leaves an (empty) file behind, as ``touch``."""
        if self._part is None:
            self._part = self._area._deployment.spool.writer("staging")
        try:
            self._area._record_part(self, self._written, self._part)
        except BaseException:
            self._area._settle(self.owner, self._written, recorded=False)
            raise
        self._area._settle(self.owner, self._written, recorded=True)

    def abort(self) -> None:
        self._area._settle(self.owner, self._written, recorded=False)
        if self._part is not None:
            self._part.discard()


class StagingReader:
    """Reads a staging file's plaintext across its parts (decrypted in memory only)."""

    def __init__(self, deployment: Deployment, staged: StagingFile) -> None:
        self._deployment = deployment
        self.size = staged.size
        self._parts = staged.parts
        self._open: dict[str, SealedReader] = {}

    def _part_reader(self, object_id: str) -> SealedReader:
        reader = self._open.get(object_id)
        if reader is None:
            with self._deployment.db.reading() as session:
                row = session.get(VaultObjectRow, object_id)
            if row is None:
                raise StagingError("The file changed while it was being read.")
            reader = SealedReader.open(
                self._deployment.spool.path_of(object_id), row, self._deployment.keyring, spool_context(object_id)
            )
            self._open[object_id] = reader
        return reader

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        base = 0
        for object_id, size in self._parts:
            if length <= 0:
                break
            if offset < base + size:
                within = offset - base
                take = min(length, size - within)
                chunk = self._part_reader(object_id).read(within, take)
                out += chunk
                offset += len(chunk)
                length -= len(chunk)
            base += size
        return bytes(out)

    def chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        offset = 0
        while offset < self.size:
            data = self.read(offset, chunk_size)
            if not data:
                break
            offset += len(data)
            yield data

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()

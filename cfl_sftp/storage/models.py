"""SQLAlchemy 2 models: the library, receipts, held packages, vault data keys and the audit trail.

The schema is owned by the Alembic migrations in ``storage/migrations``; a test checks that these models and the
migrations agree. The database, not the process, settles races between sessions and nodes: a unique SHA-256
over every image ever added, and a partial unique index over the current image of each device model and
firmware version.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored as UTC and always returned timezone-aware (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Sha256Hex = String(64)
HexId = String(4)
FirmwareVersion = String(8)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class DeviceModelRow(Base):
    """Every device model the library has held, with the device type it was first added under."""

    __tablename__ = "device_models"

    manufacturer_id: Mapped[str] = mapped_column(HexId, primary_key=True)
    model_id: Mapped[str] = mapped_column(HexId, primary_key=True)
    hardware_version: Mapped[str] = mapped_column(HexId, primary_key=True)
    device_type: Mapped[str] = mapped_column(String(8))


class VaultObjectRow(Base):
    """A sealed object (release note, upload in progress, held package) and its wrapped data key."""

    __tablename__ = "vault_objects"

    object_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    wrapped_key: Mapped[str] = mapped_column(Text)
    kek_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class ImageRow(Base):
    """A firmware image in the library. Retired images stay (their bytes and hash still count as seen)."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sha256: Mapped[str] = mapped_column(Sha256Hex, unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    device_type: Mapped[str] = mapped_column(String(8))
    manufacturer_id: Mapped[str] = mapped_column(HexId)
    model_id: Mapped[str] = mapped_column(HexId)
    hardware_version: Mapped[str] = mapped_column(HexId)
    firmware_version: Mapped[str] = mapped_column(FirmwareVersion)
    purpose: Mapped[str] = mapped_column(String(16))
    released: Mapped[str] = mapped_column(String(10))
    image_name: Mapped[str] = mapped_column(String(128))
    manifest: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    release_notes_name: Mapped[str | None] = mapped_column(String(128))
    release_notes_size: Mapped[int | None] = mapped_column(BigInteger)
    release_notes_sha256: Mapped[str | None] = mapped_column(Sha256Hex)
    release_notes_object: Mapped[str | None] = mapped_column(ForeignKey("vault_objects.object_id"))
    upload_id: Mapped[str] = mapped_column(String(64))
    added_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    retired: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    retired_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


Index(
    "uq_images_current_version",
    ImageRow.manufacturer_id,
    ImageRow.model_id,
    ImageRow.hardware_version,
    ImageRow.firmware_version,
    unique=True,
    sqlite_where=text("retired = 0"),
    postgresql_where=text("NOT retired"),
)


class UploadRow(Base):
    """One gateway run and its receipt (exactly the bytes served under ``/receipts``)."""

    __tablename__ = "uploads"

    upload_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    file_name: Mapped[str] = mapped_column(String(128))
    uploader: Mapped[str] = mapped_column(String(64), index=True)
    organisation: Mapped[str] = mapped_column(String(64), index=True)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    size: Mapped[int] = mapped_column(BigInteger)
    package_sha256: Mapped[str] = mapped_column(Sha256Hex)
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(32))
    image_path: Mapped[str | None] = mapped_column(Text)
    audit_seq: Mapped[int] = mapped_column(BigInteger)
    receipt: Mapped[bytes] = mapped_column(LargeBinary)


class HeldPackageRow(Base):
    """A package held by the gateway, kept encrypted under ``spool/held`` until released or purged."""

    __tablename__ = "held_packages"

    upload_id: Mapped[str] = mapped_column(ForeignKey("uploads.upload_id"), primary_key=True)
    organisation: Mapped[str] = mapped_column(String(64), index=True)
    file_name: Mapped[str] = mapped_column(String(128))
    size: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(32))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    vault_object: Mapped[str] = mapped_column(ForeignKey("vault_objects.object_id"))
    held_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class AuditEntryRow(Base):
    """One audit entry: the exact RFC 8785 bytes that were hashed into the Merkle tree."""

    __tablename__ = "audit_entries"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    time: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    event: Mapped[str] = mapped_column(String(32))
    entry: Mapped[bytes] = mapped_column(LargeBinary)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class AuditHeadRow(Base):
    """The single row that serialises appends: the tree size and its compact range (O(log n) to extend)."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    size: Mapped[int] = mapped_column(BigInteger)
    compact_range: Mapped[bytes] = mapped_column(LargeBinary)


class CheckpointRow(Base):
    """A signed checkpoint of the audit tree, served as ``/audit/checkpoints/<tree_size>``."""

    __tablename__ = "checkpoints"

    tree_size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class StagingPartRow(Base):
    """One sealed part of a staging file in ``/incoming``; a file's bytes are its parts in ``part_no`` order.

    Each write session appends a new part under its own data key, so appending never re-encrypts (and never
    reuses a nonce). The table is shared by all nodes: a file written through one can be renamed through another.
    """

    __tablename__ = "staging_parts"
    __table_args__ = (UniqueConstraint("owner", "name", "part_no"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    organisation: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    part_no: Mapped[int] = mapped_column(Integer)
    vault_object: Mapped[str] = mapped_column(ForeignKey("vault_objects.object_id"))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class NodeRow(Base):
    """A running service node's heartbeat (SPEC 9), with the id of the KEK it wraps new data keys with (SPEC 7).

    Each node refreshes its own row; a row not seen for 60 s is a dead node. ``vault rotate-key`` re-wraps data
    keys only once every live node wraps with the new key (so every node can unwrap them), and ``--finish``
    drops the old keys only then.
    """

    __tablename__ = "nodes"

    node_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    kek_id: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


class BanRow(Base):
    """An address refused on every node until ``until`` (SPEC 9: a ban holds on every node).

    One row per address; the node that decided the ban writes it and audits it, the others refresh their cache.
    """

    __tablename__ = "bans"

    address: Mapped[str] = mapped_column(String(64), primary_key=True)
    until: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    banned_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    failed_logins: Mapped[int] = mapped_column(Integer)
    node_id: Mapped[str] = mapped_column(String(128))


class FailedLoginRow(Base):
    """One failed login, kept for ``ban_seconds``: failures through any node count towards one address's ban."""

    __tablename__ = "failed_logins"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    address: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


class OpenSessionRow(Base):
    """An authenticated connection open on some node: ``sessions_per_user`` counts these across nodes.

    ``endpoint`` (host name and bound addresses) is the same for a node's successive runs, so a restarted node
    can drop the rows its previous run left; the rows of a node whose heartbeat is 60 s old are not counted.
    """

    __tablename__ = "open_sessions"

    session_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(128), index=True)
    endpoint: Mapped[str] = mapped_column(String(255), index=True)
    user: Mapped[str] = mapped_column(String(64), index=True)
    peer: Mapped[str] = mapped_column(String(128))
    opened_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)

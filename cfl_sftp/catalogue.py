"""The library's current images, held in memory for the virtual trees.

Every listing and lookup of ``/images`` and ``/updates`` is answered from an immutable :class:`Catalogue`, so
serving a request costs no database query. A catalogue is rebuilt when the library changes (this node's
gateway says so at once; other nodes' changes are seen by a cheap poll of the library's version).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cfl_sftp.domain.model import DeviceModel, DeviceType, ImageRef, Purpose
from cfl_sftp.storage.models import ImageRow


@dataclass(frozen=True, slots=True)
class CatalogueImage:
    """A current library image with what the tree serves of it (the manifest and signature are small)."""

    id: int
    ref: ImageRef
    sha256: str
    size: int
    purpose: Purpose
    released: str
    manifest: bytes
    signature: bytes
    release_notes_name: str | None
    release_notes_size: int | None
    release_notes_sha256: str | None
    release_notes_object: str | None
    added_at: dt.datetime

    @property
    def device_type(self) -> DeviceType:
        return self.ref.device_type

    @property
    def device_model(self) -> DeviceModel:
        return self.ref.device_model

    @property
    def firmware_version(self) -> str:
        return self.ref.firmware_version


LibraryVersion = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Catalogue:
    version: LibraryVersion
    images: tuple[CatalogueImage, ...]


def library_version(session: Session) -> LibraryVersion:
    """Changes whenever an image is added or retired: (highest id, count, retired count)."""
    max_id, count, retired = session.execute(
        select(
            func.coalesce(func.max(ImageRow.id), 0),
            func.count(ImageRow.id),
            func.count(ImageRow.retired_at),
        )
    ).one()
    return int(max_id), int(count), int(retired)


def _catalogue_image(row: ImageRow) -> CatalogueImage:
    return CatalogueImage(
        id=row.id,
        ref=ImageRef(
            DeviceType(row.device_type),
            DeviceModel(row.manufacturer_id, row.model_id, row.hardware_version),
            row.firmware_version,
            row.image_name,
        ),
        sha256=row.sha256,
        size=row.size,
        purpose=Purpose(row.purpose),
        released=row.released,
        manifest=row.manifest,
        signature=row.signature,
        release_notes_name=row.release_notes_name,
        release_notes_size=row.release_notes_size,
        release_notes_sha256=row.release_notes_sha256,
        release_notes_object=row.release_notes_object,
        added_at=row.added_at,
    )


def load_catalogue(session: Session) -> Catalogue:
    version = library_version(session)
    rows: Sequence[ImageRow] = session.execute(
        select(ImageRow).where(ImageRow.retired.is_(False)).order_by(ImageRow.id)
    ).scalars().all()
    return Catalogue(version=version, images=tuple(_catalogue_image(r) for r in rows))

"""Queries over the library, uploads and held packages. Repositories take a session and never commit."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from cfl_sftp.domain.model import DeviceModel, DeviceType, ImageRef
from cfl_sftp.storage.models import DeviceModelRow, HeldPackageRow, ImageRow, UploadRow


def image_ref(row: ImageRow) -> ImageRef:
    return ImageRef(
        DeviceType(row.device_type),
        DeviceModel(row.manufacturer_id, row.model_id, row.hardware_version),
        row.firmware_version,
        row.image_name,
    )


class LibraryRepository:
    """The library as the gateway and the virtual tree see it (implements ``domain.gateway.LibraryView``)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def device_type_of(self, model: DeviceModel) -> DeviceType | None:
        row = self.session.get(DeviceModelRow, (model.manufacturer_id, model.model_id, model.hardware_version))
        return DeviceType(row.device_type) if row is not None else None

    def image_with_sha256(self, sha256: str) -> ImageRef | None:
        row = self.image_row_with_sha256(sha256)
        return image_ref(row) if row is not None else None

    def image_row_with_sha256(self, sha256: str) -> ImageRow | None:
        return self.session.execute(select(ImageRow).where(ImageRow.sha256 == sha256)).scalar_one_or_none()

    def current_image(self, model: DeviceModel, firmware_version: str) -> ImageRef | None:
        row = self.current_image_row(model, firmware_version)
        return image_ref(row) if row is not None else None

    def current_image_row(self, model: DeviceModel, firmware_version: str) -> ImageRow | None:
        return self.session.execute(
            select(ImageRow).where(
                ImageRow.manufacturer_id == model.manufacturer_id,
                ImageRow.model_id == model.model_id,
                ImageRow.hardware_version == model.hardware_version,
                ImageRow.firmware_version == firmware_version,
                ImageRow.retired.is_(False),
            )
        ).scalar_one_or_none()

    def images(self, *, include_retired: bool = True) -> Sequence[ImageRow]:
        query = select(ImageRow).order_by(
            ImageRow.device_type, ImageRow.manufacturer_id, ImageRow.model_id, ImageRow.hardware_version,
            ImageRow.firmware_version, ImageRow.id,
        )
        if not include_retired:
            query = query.where(ImageRow.retired.is_(False))
        return self.session.execute(query).scalars().all()

    def upload(self, upload_id: str) -> UploadRow | None:
        return self.session.get(UploadRow, upload_id)

    def uploads_of(self, organisation: str) -> Sequence[UploadRow]:
        return self.session.execute(
            select(UploadRow).where(UploadRow.organisation == organisation).order_by(UploadRow.upload_id)
        ).scalars().all()

    def held(self, organisation: str | None = None) -> Sequence[HeldPackageRow]:
        query = select(HeldPackageRow).order_by(HeldPackageRow.upload_id)
        if organisation is not None:
            query = query.where(HeldPackageRow.organisation == organisation)
        return self.session.execute(query).scalars().all()

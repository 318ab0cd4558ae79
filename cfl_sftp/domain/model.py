"""Plain value objects for the nouns of the smart-metering firmware world.

They hold already-validated data: constructing them does no checking beyond what types enforce. The validators
(``manifest``, ``package``, ``policy``) are where untrusted input becomes one of these.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum


class DeviceType(StrEnum):
    """GB smart-metering device types (SPEC 2)."""

    ESME = "ESME"
    GSME = "GSME"
    CHF = "CHF"
    GPF = "GPF"
    PPMID = "PPMID"
    IHD = "IHD"
    HCALCS = "HCALCS"
    CAD = "CAD"


class Purpose(StrEnum):
    """Why a firmware version was released (SPEC 3)."""

    COMPLIANCE = "compliance"
    SECURITY_FIX = "security-fix"
    DEFECT_FIX = "defect-fix"


class Role(StrEnum):
    """Roles a user may hold (SPEC 1)."""

    IMPORT_SUPPLIER = "import-supplier"
    GAS_SUPPLIER = "gas-supplier"
    UPLOADER = "uploader"
    RELEASE_NOTES = "release-notes"
    AUDITOR = "auditor"


class OrganisationKind(StrEnum):
    SUPPLIER = "supplier"
    MANUFACTURER = "manufacturer"
    MAP = "map"
    AUDITOR = "auditor"


@dataclass(frozen=True, slots=True, order=True)
class DeviceModel:
    """A GB Central Products List device model: three 4-hex-digit ids."""

    manufacturer_id: str
    model_id: str
    hardware_version: str

    def __str__(self) -> str:
        return f"{self.manufacturer_id}/{self.model_id}/{self.hardware_version}"


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A file a manifest declares: its member name, size in bytes and lower-case hex SHA-256."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """A validated ``manifest.json`` (SPEC 3)."""

    device_model: DeviceModel
    device_type: DeviceType
    firmware_version: str
    purpose: Purpose
    specifications: tuple[str, ...]
    released: dt.date
    image: FileEntry
    release_notes: FileEntry | None
    supersedes: tuple[str, ...]

    @property
    def firmware_number(self) -> int:
        """The firmware version as the unsigned integer GBCS compares."""
        return int(self.firmware_version, 16)


@dataclass(frozen=True, slots=True)
class ImageRef:
    """Where an image sits in the virtual tree: enough to build its ``/images/...`` path."""

    device_type: DeviceType
    device_model: DeviceModel
    firmware_version: str
    image_name: str

    @property
    def folder(self) -> str:
        m = self.device_model
        return (
            f"/images/{self.device_type.value}/{m.manufacturer_id}/{m.model_id}/"
            f"{m.hardware_version}/{self.firmware_version}"
        )

    @property
    def path(self) -> str:
        return f"{self.folder}/{self.image_name}"

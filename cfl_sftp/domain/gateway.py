"""The gateway's verdict on a package that has been read (SPEC 4, checks 5 to 9).

Checks 1 to 4 happen while the bytes arrive (:mod:`cfl_sftp.domain.package`); what is left needs the policy
in force and what the library already holds, which this module receives as plain values and a small read-only
port (:class:`LibraryView`). It decides; it stores nothing. The caller commits the verdict and, because another
session or node may have added the same image meanwhile, asks again when the database refuses the insert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from cfl_sftp.domain.errors import GatewayRejection, Outcome, Reason
from cfl_sftp.domain.model import DeviceModel, DeviceType, ImageRef, Manifest, Purpose
from cfl_sftp.domain.package import ReadPackage
from cfl_sftp.domain.signature import ManufacturerKey, verify_manifest_signature


class LibraryView(Protocol):
    """What the gateway needs to know of the library; storage implements it over the database."""

    def device_type_of(self, model: DeviceModel) -> DeviceType | None:
        """The device type the library holds ``model`` under, if it holds it at all."""

    def image_with_sha256(self, sha256: str) -> ImageRef | None:
        """Any image with these bytes, current or retired."""

    def current_image(self, model: DeviceModel, firmware_version: str) -> ImageRef | None:
        """The current (not retired) image of that device model and firmware version."""


@dataclass(frozen=True, slots=True)
class UploadRules:
    """The policy and configuration in force for one upload."""

    uploader_organisation: str
    keys_for_manufacturer: Callable[[str], Iterable[ManufacturerKey]]
    may_upload_for: Callable[[str, str], bool]
    admitted_purposes: frozenset[Purpose]
    require_product_list: bool
    in_product_list: Callable[[DeviceModel, str, str], bool]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The gateway's decision. ``image`` is the new image (accepted) or the one it duplicates (held)."""

    outcome: Outcome
    reason: Reason
    message: str
    image: ImageRef | None = None


def rejected(exc: GatewayRejection) -> Verdict:
    return Verdict(Outcome.REJECTED, exc.reason, exc.public_message)


def image_ref_of(package: ReadPackage) -> ImageRef:
    m = package.manifest
    return ImageRef(m.device_type, m.device_model, m.firmware_version, m.image.name)


def decide(package: ReadPackage, rules: UploadRules, library: LibraryView) -> Verdict:
    """Run checks 3 (library part) and 5 to 9 in order; the first that fails decides."""
    m = package.manifest
    known_type = library.device_type_of(m.device_model)
    if known_type is not None and known_type != m.device_type:
        return Verdict(
            Outcome.REJECTED,
            Reason.BAD_MANIFEST,
            f"Device model {m.device_model} is already in the library as {known_type.value}, "
            f"not {m.device_type.value}.",
        )
    try:
        verify_manifest_signature(
            package.manifest_bytes, package.signature, rules.keys_for_manufacturer(m.device_model.manufacturer_id)
        )
    except GatewayRejection as exc:
        return rejected(exc)
    if not rules.may_upload_for(rules.uploader_organisation, m.device_model.manufacturer_id):
        return Verdict(
            Outcome.REJECTED,
            Reason.MANUFACTURER_NOT_ALLOWED,
            f"Your organisation may not upload packages for manufacturer {m.device_model.manufacturer_id}.",
        )
    if m.purpose not in rules.admitted_purposes:
        return Verdict(
            Outcome.REJECTED,
            Reason.PURPOSE_NOT_ADMITTED,
            f"The library does not admit images whose purpose is {m.purpose.value}.",
        )
    if rules.require_product_list and not rules.in_product_list(
        m.device_model, m.firmware_version, m.image.sha256
    ):
        return Verdict(
            Outcome.REJECTED,
            Reason.NOT_IN_PRODUCT_LIST,
            f"Firmware {m.firmware_version} for device model {m.device_model} with this image hash "
            "is not in the product list.",
        )
    held = already_in_library(m, library)
    if held is not None:
        return held
    return Verdict(
        Outcome.ACCEPTED,
        Reason.ACCEPTED,
        f"Firmware {m.firmware_version} for device model {m.device_model} was added to the library.",
        image_ref_of(package),
    )


def already_in_library(m: Manifest, library: LibraryView) -> Verdict | None:
    """Check 9 alone: the ``held`` verdict if the library already has these bytes (retired ones included) or
    other bytes for this device model and firmware version; None if the package would be new.

    :func:`decide` ends with it; the intake also asks it as soon as the manifest has been read, to know whether
    the package is likely to be held and so worth spooling whole (:mod:`cfl_sftp.intake`).
    """
    same_bytes = library.image_with_sha256(m.image.sha256)
    if same_bytes is not None:
        return Verdict(
            Outcome.HELD,
            Reason.DUPLICATE_IMAGE,
            "The library already holds an image with these exact bytes; the package is held.",
            same_bytes,
        )
    same_version = library.current_image(m.device_model, m.firmware_version)
    if same_version is not None:
        return Verdict(
            Outcome.HELD,
            Reason.VERSION_CONFLICT,
            f"The library already holds different bytes for firmware {m.firmware_version} of device model "
            f"{m.device_model}; the package is held for an operator to decide.",
            same_version,
        )
    return None

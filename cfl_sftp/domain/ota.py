"""The ZigBee OTA upgrade file header, and whether it agrees with the manifest (SPEC 4 check 4, appendix).

A GB firmware image as a manufacturer releases it starts with the ZCL OTA header: the device reads its
manufacturer code, file version and hardware range before it accepts the image, so a package whose header says
something other than its manifest would be listed under one device model and version but act as another. The
check applies only to images that start with the OTA upgrade file identifier; other images are opaque.

The header is at most :data:`OTA_HEADER_MAX_BYTES` long, so the package reader keeps just that prefix of the
image while it streams and calls :func:`check_ota_header` at the end. All integers are little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cfl_sftp.domain.errors import GatewayRejection, Reason
from cfl_sftp.domain.model import Manifest

OTA_FILE_IDENTIFIER = b"\x1e\xf1\xee\x0b"
OTA_HEADER_VERSION = 0x0100
OTA_FIXED_HEADER_BYTES = 56
OTA_HEADER_MAX_BYTES = OTA_FIXED_HEADER_BYTES + 1 + 8 + 4
WILDCARD_MANUFACTURER = 0xFFFF

SECURITY_CREDENTIAL_PRESENT = 0x0001
DESTINATION_PRESENT = 0x0002
HARDWARE_RANGE_PRESENT = 0x0004
_KNOWN_FIELD_CONTROL = SECURITY_CREDENTIAL_PRESENT | DESTINATION_PRESENT | HARDWARE_RANGE_PRESENT

# identifier, header version, header length, field control, manufacturer, image type, file version,
# stack version, header string, total image size
_FIXED = struct.Struct("<4sHHHHHIH32sI")


@dataclass(frozen=True, slots=True)
class OtaHeader:
    """The decoded header; optional fields are ``None`` when the field control leaves them out."""

    header_version: int
    header_length: int
    field_control: int
    manufacturer_code: int
    image_type: int
    file_version: int
    stack_version: int
    header_string: bytes
    total_image_size: int
    security_credential_version: int | None
    upgrade_file_destination: bytes | None
    min_hardware_version: int | None
    max_hardware_version: int | None


def _mismatch(message: str) -> GatewayRejection:
    return GatewayRejection(Reason.HEADER_MISMATCH, message)


def is_ota_image(prefix: bytes) -> bool:
    """Whether an image starting with ``prefix`` is a ZigBee OTA upgrade file."""
    return prefix[:4] == OTA_FILE_IDENTIFIER


def parse_ota_header(prefix: bytes) -> OtaHeader:
    """Decode the header from the first bytes of an OTA image (raise ``header-mismatch`` when truncated).

    ``prefix`` is the image's first ``min(size, OTA_HEADER_MAX_BYTES)`` bytes: a header that claims more than
    that is a truncated header, whatever the reason.
    """
    if len(prefix) < OTA_FIXED_HEADER_BYTES:
        raise _mismatch("The image's OTA header is truncated.")
    (
        _identifier,
        header_version,
        header_length,
        field_control,
        manufacturer_code,
        image_type,
        file_version,
        stack_version,
        header_string,
        total_image_size,
    ) = _FIXED.unpack_from(prefix)
    if header_version != OTA_HEADER_VERSION:
        raise _mismatch(f"The image's OTA header version {header_version:04X} is not the supported 0100.")
    if field_control & ~_KNOWN_FIELD_CONTROL:
        raise _mismatch("The image's OTA header field control sets reserved bits.")
    pos = OTA_FIXED_HEADER_BYTES
    security_credential_version = destination = min_hw = max_hw = None
    if field_control & SECURITY_CREDENTIAL_PRESENT:
        security_credential_version = prefix[pos] if pos < len(prefix) else None
        pos += 1
    if field_control & DESTINATION_PRESENT:
        destination = prefix[pos : pos + 8]
        pos += 8
    if field_control & HARDWARE_RANGE_PRESENT:
        if pos + 4 <= len(prefix):
            min_hw, max_hw = struct.unpack_from("<HH", prefix, pos)
        pos += 4
    if pos > len(prefix):
        raise _mismatch("The image's OTA header is truncated: it declares fields beyond the image's end.")
    if header_length != pos:
        raise _mismatch(
            f"The image's OTA header length {header_length} does not match the {pos} bytes of its fields."
        )
    return OtaHeader(
        header_version=header_version,
        header_length=header_length,
        field_control=field_control,
        manufacturer_code=manufacturer_code,
        image_type=image_type,
        file_version=file_version,
        stack_version=stack_version,
        header_string=header_string,
        total_image_size=total_image_size,
        security_credential_version=security_credential_version,
        upgrade_file_destination=destination,
        min_hardware_version=min_hw,
        max_hardware_version=max_hw,
    )


def check_ota_header(prefix: bytes, image_size: int, manifest: Manifest) -> None:
    """Raise ``header-mismatch`` unless an OTA image's header agrees with the manifest; ignore other images.

    ``prefix`` is the first ``min(image_size, OTA_HEADER_MAX_BYTES)`` bytes of the image.
    """
    if not is_ota_image(prefix):
        return
    header = parse_ota_header(prefix[:image_size])
    model = manifest.device_model
    if header.manufacturer_code == WILDCARD_MANUFACTURER:
        raise _mismatch("The image's OTA header names the wildcard manufacturer FFFF, which is refused.")
    if header.manufacturer_code != int(model.manufacturer_id, 16):
        raise _mismatch(
            f"The image's OTA manufacturer code {header.manufacturer_code:04X} differs from manufacturer_id "
            f"{model.manufacturer_id}."
        )
    if header.file_version != manifest.firmware_number:
        raise _mismatch(
            f"The image's OTA file version {header.file_version:08X} differs from firmware_version "
            f"{manifest.firmware_version}."
        )
    if header.upgrade_file_destination is not None:
        raise _mismatch("The image's OTA header names a destination device; such files are refused.")
    if header.min_hardware_version is not None and header.max_hardware_version is not None:
        hardware = int(model.hardware_version, 16)
        if not header.min_hardware_version <= hardware <= header.max_hardware_version:
            raise _mismatch(
                f"The image's OTA hardware range {header.min_hardware_version:04X} to "
                f"{header.max_hardware_version:04X} does not include hardware_version "
                f"{model.hardware_version}."
            )
    if header.total_image_size != image_size:
        raise _mismatch(
            f"The image's OTA total image size {header.total_image_size} differs from the image's size "
            f"{image_size}."
        )

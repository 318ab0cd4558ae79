"""The ZigBee OTA header check (SPEC 4 check 4 and the appendix), on bytes."""

from __future__ import annotations

import datetime as dt
import struct

import pytest

from cfl_sftp.domain.errors import GatewayRejection, Reason
from cfl_sftp.domain.model import DeviceModel, DeviceType, FileEntry, Manifest, Purpose
from cfl_sftp.domain.ota import OTA_HEADER_MAX_BYTES, check_ota_header, parse_ota_header
from tests.factory import ota_image


def manifest(
    manufacturer_id: str = "1A2B", firmware_version: str = "00000010", hardware_version: str = "0100"
) -> Manifest:
    return Manifest(
        device_model=DeviceModel(manufacturer_id, "0001", hardware_version),
        device_type=DeviceType.ESME,
        firmware_version=firmware_version,
        purpose=Purpose.SECURITY_FIX,
        specifications=("GBCS v4.0",),
        released=dt.date(2026, 1, 15),
        image=FileEntry("firmware.bin", 1, "0" * 64),
        release_notes=None,
        supersedes=(),
    )


def gb_example() -> bytes:
    """The header decoded from a DCC sample request (SPEC appendix), followed by its 301-byte image body."""
    header = struct.pack(
        "<4sHHHHHIH32sIHH",
        b"\x1e\xf1\xee\x0b",
        0x0100,
        60,
        0x0004,
        0x121D,
        0x0000,
        0xACDCACDC,
        0x0002,
        b"GB sample".ljust(32, b"\0"),
        361,
        0x1111,
        0x1211,
    )
    return header + bytes(range(256)) + bytes(45)


def check(image: bytes, m: Manifest) -> None:
    check_ota_header(image[:OTA_HEADER_MAX_BYTES], len(image), m)


def rejection(image: bytes, m: Manifest) -> GatewayRejection:
    with pytest.raises(GatewayRejection) as caught:
        check(image, m)
    assert caught.value.reason is Reason.HEADER_MISMATCH
    return caught.value


def test_gb_example_header_decodes_as_the_appendix_says():
    image = gb_example()
    assert len(image) == 361
    header = parse_ota_header(image[:OTA_HEADER_MAX_BYTES])
    assert header.header_length == 60
    assert header.field_control == 0x0004
    assert header.manufacturer_code == 0x121D
    assert header.image_type == 0x0000
    assert header.file_version == 0xACDCACDC
    assert header.total_image_size == 361
    assert (header.min_hardware_version, header.max_hardware_version) == (0x1111, 0x1211)
    assert header.security_credential_version is None
    assert header.upgrade_file_destination is None


@pytest.mark.parametrize("hardware_version", ["1111", "1150", "1211"])
def test_gb_example_agrees_with_a_manifest_inside_its_hardware_range(hardware_version):
    check(gb_example(), manifest("121D", "ACDCACDC", hardware_version))


@pytest.mark.parametrize("hardware_version", ["1110", "1212", "0100"])
def test_hardware_version_outside_the_header_range_is_a_header_mismatch(hardware_version):
    error = rejection(gb_example(), manifest("121D", "ACDCACDC", hardware_version))
    assert "hardware_version" in error.public_message


def test_manufacturer_code_other_than_manufacturer_id_is_a_header_mismatch():
    error = rejection(gb_example(), manifest("121E", "ACDCACDC", "1111"))
    assert "manufacturer" in error.public_message


def test_file_version_other_than_firmware_version_is_a_header_mismatch():
    error = rejection(gb_example(), manifest("121D", "ACDCACDD", "1111"))
    assert "firmware_version" in error.public_message


def test_total_image_size_other_than_the_image_size_is_a_header_mismatch():
    image = gb_example() + b"\0"
    error = rejection(image, manifest("121D", "ACDCACDC", "1111"))
    assert "size" in error.public_message


def test_wildcard_manufacturer_is_refused_even_when_the_manifest_says_ffff():
    image = ota_image("FFFF", "00000010", 200)
    error = rejection(image, manifest("FFFF"))
    assert "wildcard" in error.public_message


def test_device_specific_file_with_an_upgrade_destination_is_refused():
    image = ota_image("1A2B", "00000010", 200, destination=b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert parse_ota_header(image[:OTA_HEADER_MAX_BYTES]).upgrade_file_destination == bytes(range(1, 9))
    rejection(image, manifest())


def test_security_credential_version_field_is_accepted():
    image = ota_image("1A2B", "00000010", 200, (0x0100, 0x0100), security_credential_version=2)
    header = parse_ota_header(image[:OTA_HEADER_MAX_BYTES])
    assert header.header_length == 61
    assert header.security_credential_version == 2
    check(image, manifest())


def test_header_without_hardware_range_accepts_any_hardware_version():
    check(ota_image("1A2B", "00000010", 200), manifest(hardware_version="FFFF"))


def test_all_optional_fields_together_fill_the_longest_header():
    image = ota_image("1A2B", "00000010", 200, (1, 2), security_credential_version=0, destination=bytes(8))
    assert parse_ota_header(image[:OTA_HEADER_MAX_BYTES]).header_length == OTA_HEADER_MAX_BYTES


@pytest.mark.parametrize("size", [4, 20, 55])
def test_image_shorter_than_the_fixed_header_is_a_truncated_header(size):
    image = ota_image("1A2B", "00000010", size)
    assert len(image) == size
    assert "truncated" in rejection(image, manifest()).public_message


def test_hardware_range_beyond_the_end_of_the_image_is_a_truncated_header():
    image = ota_image("1A2B", "00000010", 58, (0x0100, 0x0100))  # the range needs 60 bytes
    assert "truncated" in rejection(image, manifest()).public_message


def test_header_length_beyond_the_end_of_the_image_is_a_header_mismatch():
    image = ota_image("1A2B", "00000010", 56, header_length=60)
    rejection(image, manifest())


@pytest.mark.parametrize("header_length", [56, 58, 64, 0xFFFF])
def test_header_length_inconsistent_with_its_fields_is_a_header_mismatch(header_length):
    image = ota_image("1A2B", "00000010", 200, (0x0100, 0x0100), header_length=header_length)
    assert "length" in rejection(image, manifest()).public_message


def test_reserved_field_control_bits_are_a_header_mismatch():
    rejection(ota_image("1A2B", "00000010", 200, field_control=0x0008), manifest())


def test_unknown_header_version_is_a_header_mismatch():
    rejection(ota_image("1A2B", "00000010", 200, header_version=0x0200), manifest())


@pytest.mark.parametrize(
    "image",
    [b"", b"\x1e", b"\x1e\xf1\xee", b"\x0b\xee\xf1\x1e" + bytes(100), b"plain firmware, no OTA header"],
)
def test_images_without_the_ota_identifier_are_not_checked(image):
    check(image, manifest())


def test_default_factory_image_agrees_with_its_manifest():
    check(ota_image("1A2B", "00000010", 1024, (0x0100, 0x0100)), manifest())

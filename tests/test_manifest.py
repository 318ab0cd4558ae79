"""``manifest.json``: the layout the container check reads, and the full schema of SPEC 3, on bytes."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from cfl_sftp.domain.errors import GatewayRejection, Reason
from cfl_sftp.domain.manifest import DeclaredMember, parse_manifest_layout, validate_manifest
from cfl_sftp.domain.model import DeviceModel, DeviceType, FileEntry, Purpose

SHA_A = "a" * 64
SHA_B = "b" * 64


def fields(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "format": "cfl-package/1",
        "manufacturer_id": "1A2B",
        "model_id": "0001",
        "hardware_version": "0100",
        "device_type": "ESME",
        "firmware_version": "00000010",
        "purpose": "security-fix",
        "specifications": ["SMETS2 v5.0", "GBCS v4.0"],
        "released": "2026-01-15",
        "image": {"name": "firmware.bin", "size": 1024, "sha256": SHA_A},
        "release_notes": {"name": "notes.md", "size": 10, "sha256": SHA_B},
        "supersedes": ["0000000F"],
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()


def raw(value: object) -> bytes:
    return json.dumps(value).encode()


def rejected(data: bytes) -> str:
    """The public message of the ``bad-manifest`` rejection of ``data``."""
    with pytest.raises(GatewayRejection) as caught:
        validate_manifest(data)
    assert caught.value.reason is Reason.BAD_MANIFEST
    return caught.value.public_message


# -- a valid manifest ---------------------------------------------------------------------------------------


def test_valid_manifest_becomes_the_manifest_value():
    m = validate_manifest(raw(fields()))
    assert m.device_model == DeviceModel("1A2B", "0001", "0100")
    assert m.device_type is DeviceType.ESME
    assert m.firmware_version == "00000010"
    assert m.firmware_number == 0x10
    assert m.purpose is Purpose.SECURITY_FIX
    assert m.specifications == ("SMETS2 v5.0", "GBCS v4.0")
    assert m.released == dt.date(2026, 1, 15)
    assert m.image == FileEntry("firmware.bin", 1024, SHA_A)
    assert m.release_notes == FileEntry("notes.md", 10, SHA_B)
    assert m.supersedes == ("0000000F",)


def test_optional_fields_may_be_left_out():
    m = validate_manifest(raw(fields(release_notes=DROP, supersedes=DROP)))
    assert m.release_notes is None
    assert m.supersedes == ()


def test_top_level_x_fields_are_allowed_with_any_value():
    m = validate_manifest(raw(fields(**{"x-vendor": {"anything": [1, 2]}, "x-": None})))
    assert m.image.name == "firmware.bin"


def test_utf8_text_in_specifications_is_kept():
    assert validate_manifest(raw(fields(specifications=["Spécification ✓"]))).specifications == (
        "Spécification ✓",
    )


def test_leap_day_is_a_valid_release_date():
    assert validate_manifest(raw(fields(released="2024-02-29"))).released == dt.date(2024, 2, 29)


@pytest.mark.parametrize("device_type", [t.value for t in DeviceType])
def test_every_device_type_is_accepted(device_type):
    assert validate_manifest(raw(fields(device_type=device_type))).device_type.value == device_type


@pytest.mark.parametrize("purpose", [p.value for p in Purpose])
def test_every_purpose_is_accepted(purpose):
    assert validate_manifest(raw(fields(purpose=purpose))).purpose.value == purpose


def test_file_names_may_use_every_allowed_character_up_to_128():
    name = "A9._+-" + "z" * 122
    assert validate_manifest(raw(fields(image={"name": name, "size": 1, "sha256": SHA_A}))).image.name == name


# -- not a JSON object --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\xff\xfe{}", "UTF-8"),
        (b"", "JSON"),
        (b"{", "JSON"),
        ("\ufeff".encode() + raw(fields()), "JSON"),
        (raw(fields())[:-1] + b',"x-a": NaN}', "JSON"),
        (b"[]", "object"),
        (b'"manifest"', "object"),
        (b"null", "object"),
        (b"[" * 100_000, "JSON"),
    ],
)
def test_bytes_that_are_not_a_utf8_json_object_are_rejected(data, words):
    assert words in rejected(data)


# -- duplicate and unknown keys -----------------------------------------------------------------------------


def test_duplicate_top_level_key_is_rejected():
    data = raw(fields())[:-1] + b', "purpose": "compliance"}'
    assert "purpose" in rejected(data)


def test_duplicate_key_inside_image_is_rejected():
    data = raw(fields(image={"name": "firmware.bin", "size": 1024, "sha256": SHA_A}))
    data = data.replace(b'"size": 1024', b'"size": 1024, "size": 1025')
    assert "size" in rejected(data)


def test_duplicate_key_inside_an_x_field_is_rejected():
    data = raw(fields(**{"x-vendor": {"a": 1}})).replace(b'{"a": 1}', b'{"a": 1, "a": 2}')
    assert '"a"' in rejected(data)


def test_duplicate_x_field_is_rejected():
    data = raw(fields(**{"x-a": 1}))[:-1] + b', "x-a": 2}'
    assert "x-a" in rejected(data)


@pytest.mark.parametrize("key", ["formats", "X-vendor", "xvendor", "x_vendor", "image_name", "", "signature"])
def test_unknown_top_level_field_is_rejected(key):
    assert "unknown field" in rejected(raw(fields(**{key: 1})))


@pytest.mark.parametrize("entry", ["image", "release_notes"])
def test_unknown_field_inside_a_file_entry_is_rejected_even_with_x_prefix(entry):
    for key in ("mode", "x-note"):
        value = {"name": "f.bin", "size": 1, "sha256": SHA_A, key: 1}
        message = rejected(raw(fields(**{entry: value})))
        assert entry in message
        assert key in message


# -- each field's rule --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field",
    [
        "format",
        "manufacturer_id",
        "model_id",
        "hardware_version",
        "device_type",
        "firmware_version",
        "purpose",
        "specifications",
        "released",
        "image",
    ],
)
def test_missing_required_field_is_rejected_naming_it(field):
    message = rejected(raw(fields(**{field: DROP})))
    assert field in message
    assert "missing" in message


BAD_VALUES = [
    ("format", "cfl-package/2"),
    ("format", "CFL-PACKAGE/1"),
    ("format", 1),
    ("manufacturer_id", "1a2b"),
    ("manufacturer_id", "1A2"),
    ("manufacturer_id", "1A2B3"),
    ("manufacturer_id", "1A2G"),
    ("manufacturer_id", 6699),
    ("manufacturer_id", "1A2B\n"),
    ("model_id", "00001"),
    ("model_id", None),
    ("hardware_version", "01 0"),
    ("hardware_version", "０１００"),
    ("device_type", "esme"),
    ("device_type", "METER"),
    ("device_type", ["ESME"]),
    ("firmware_version", "0000010"),
    ("firmware_version", "000000010"),
    ("firmware_version", "0000001a"),
    ("firmware_version", 16),
    ("purpose", "bugfix"),
    ("purpose", "Security-Fix"),
    ("specifications", []),
    ("specifications", "SMETS2 v5.0"),
    ("specifications", ["SMETS2 v5.0", 5]),
    ("specifications", None),
    ("released", "2026-13-01"),
    ("released", "2023-02-29"),
    ("released", "2026-1-15"),
    ("released", "20260115"),
    ("released", "2026-01-15T00:00:00Z"),
    ("released", 20260115),
    ("image", "firmware.bin"),
    ("image", None),
    ("release_notes", None),
    ("release_notes", []),
    ("supersedes", "0000000F"),
    ("supersedes", ["0000000f"]),
    ("supersedes", ["F"]),
    ("supersedes", [15]),
    ("supersedes", None),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_field_breaking_its_rule_is_rejected_naming_the_field(field, value):
    message = rejected(raw(fields(**{field: value})))
    assert field in message
    assert message.endswith(".")


BAD_ENTRIES = [
    ("name", "../x"),
    ("name", "/firmware.bin"),
    ("name", "sub/firmware.bin"),
    ("name", ".hidden"),
    ("name", "-dash"),
    ("name", "has space"),
    ("name", "firmware.bin\n"),
    ("name", "é.bin"),
    ("name", ""),
    ("name", "a" * 129),
    ("name", 7),
    ("name", "manifest.json"),
    ("name", "manifest.sig"),
    ("name", "SHA256SUMS"),
    ("size", 0),
    ("size", -1),
    ("size", True),
    ("size", 1.0),
    ("size", 1.5),
    ("size", "1"),
    ("size", None),
    ("sha256", "A" * 64),
    ("sha256", "a" * 63),
    ("sha256", "a" * 65),
    ("sha256", "g" * 64),
    ("sha256", None),
]


@pytest.mark.parametrize("entry", ["image", "release_notes"])
@pytest.mark.parametrize(("key", "value"), BAD_ENTRIES)
def test_file_entry_breaking_its_rule_is_rejected_naming_the_field(entry, key, value):
    good = {"name": "thing.bin", "size": 5, "sha256": SHA_A}
    message = rejected(raw(fields(**{entry: {**good, key: value}})))
    assert f"{entry}.{key}" in message


@pytest.mark.parametrize("entry", ["image", "release_notes"])
@pytest.mark.parametrize("key", ["name", "size", "sha256"])
def test_file_entry_missing_a_field_is_rejected_naming_it(entry, key):
    good = {"name": "thing.bin", "size": 5, "sha256": SHA_A}
    del good[key]
    assert f"{entry}.{key}" in rejected(raw(fields(**{entry: good})))


def test_image_and_release_notes_with_the_same_name_are_rejected():
    same = {"name": "same.bin", "size": 5, "sha256": SHA_A}
    message = rejected(raw(fields(image=same, release_notes=same)))
    assert "image.name" in message
    assert "release_notes.name" in message


def test_huge_size_number_is_rejected_as_json_not_a_crash():
    data = raw(fields()).replace(b'"size": 1024', b'"size": 1' + b"0" * 5000)
    assert rejected(data)


# -- the layout the container check reads -------------------------------------------------------------------


def test_layout_gives_the_image_and_release_notes_names_and_sizes():
    layout = parse_manifest_layout(raw(fields()))
    assert layout.image == DeclaredMember("firmware.bin", 1024)
    assert layout.release_notes == DeclaredMember("notes.md", 10)


def test_layout_without_release_notes_has_none():
    assert parse_manifest_layout(raw(fields(release_notes=DROP))).release_notes is None


@pytest.mark.parametrize(
    "changes",
    [
        {"purpose": "bugfix"},
        {"format": "cfl-package/9", "x-y": 1, "unknown": 2},
        {"image": {"name": "firmware.bin", "size": 1024, "sha256": "bad", "extra": 1}},
        {"image": {"name": "../x", "size": 1024}},
    ],
)
def test_layout_ignores_errors_that_do_not_hide_names_and_sizes(changes):
    """So a package with such a manifest is judged on its container first, as SPEC 4 orders."""
    layout = parse_manifest_layout(raw(fields(**changes)))
    assert layout.image.size == 1024


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[1]",
        raw(fields(image=DROP)),
        raw(fields(image="firmware.bin")),
        raw(fields(image={"size": 1024})),
        raw(fields(image={"name": 5, "size": 1024})),
        raw(fields(image={"name": "firmware.bin", "size": "1024"})),
        raw(fields(image={"name": "firmware.bin", "size": 1024.0})),
        raw(fields(image={"name": "firmware.bin", "size": -1})),
        raw(fields(image={"name": "firmware.bin", "size": True})),
        raw(fields(release_notes=None)),
        raw(fields(release_notes={"name": "notes.md"})),
    ],
)
def test_layout_too_broken_to_learn_names_and_sizes_is_a_bad_manifest(data):
    with pytest.raises(GatewayRejection) as caught:
        parse_manifest_layout(data)
    assert caught.value.reason is Reason.BAD_MANIFEST

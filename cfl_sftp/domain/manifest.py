"""``manifest.json``: its layout for the container check and its full schema (SPEC 3; gateway checks 2, 3).

The gateway reads the manifest twice, for two different questions. While the package streams in it only needs
the names and sizes of the members that follow (:func:`parse_manifest_layout`), so a manifest that is wrong
in some other field still lets the container be judged first, as SPEC 4 orders. Once the container is sound,
:func:`validate_manifest` applies every rule and returns the :class:`~cfl_sftp.domain.model.Manifest`.

Both take the exact bytes and open nothing. Every refusal is ``bad-manifest`` with one sentence that names
the field at fault; the text is safe to show the uploader.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

from cfl_sftp.domain.errors import GatewayRejection, Reason
from cfl_sftp.domain.model import DeviceModel, DeviceType, FileEntry, Manifest, Purpose

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME, "SHA256SUMS"})
"""Names the library serves beside an image, so an image or its notes may not take them."""
FORMAT = "cfl-package/1"

FILE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_HEX4 = re.compile(r"[0-9A-F]{4}")
_HEX8 = re.compile(r"[0-9A-F]{8}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

_FIELDS = frozenset(
    {
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
        "release_notes",
        "supersedes",
    }
)
_OPTIONAL_FIELDS = frozenset({"release_notes", "supersedes"})
_FILE_FIELDS = ("name", "size", "sha256")


@dataclass(frozen=True, slots=True)
class DeclaredMember:
    """A member the manifest announces, as far as the container check needs it."""

    name: str
    size: int


@dataclass(frozen=True, slots=True)
class ManifestLayout:
    """The members that follow ``manifest.json`` and ``manifest.sig``, in order."""

    image: DeclaredMember
    release_notes: DeclaredMember | None


def _reject(message: str) -> GatewayRejection:
    return GatewayRejection(Reason.BAD_MANIFEST, message)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _load(raw: bytes, hook: Callable[[list[tuple[str, Any]]], dict[str, Any]] | None) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _reject("The manifest is not valid UTF-8.") from None
    try:
        value = json.loads(text, object_pairs_hook=hook, parse_constant=_refuse_constant)
    except _DuplicateKey as exc:
        raise _reject(f"The manifest repeats the key {_shown(exc.key)}.") from None
    except (ValueError, RecursionError):
        raise _reject("The manifest is not valid JSON.") from None
    if not isinstance(value, dict):
        raise _reject("The manifest is not a JSON object.")
    return value


def _shown(key: str) -> str:
    """A key as it may appear in a public message: quoted, printable and short."""
    return json.dumps(key[:64])


def parse_manifest_layout(raw: bytes) -> ManifestLayout:
    """Learn the image and release-note member names and sizes, and nothing more.

    Raises ``bad-manifest`` only when those cannot be learned; every other rule waits for
    :func:`validate_manifest`, which runs after the container check.
    """
    fields = _load(raw, None)
    image = _declared_member(fields, "image", required=True)
    assert image is not None
    return ManifestLayout(image, _declared_member(fields, "release_notes", required=False))


def _declared_member(fields: dict[str, Any], field: str, *, required: bool) -> DeclaredMember | None:
    if field not in fields and not required:
        return None
    entry = fields.get(field)
    if not isinstance(entry, dict):
        raise _reject(f"The manifest field {field} must be an object with name, size and sha256.")
    name, size = entry.get("name"), entry.get("size")
    if not isinstance(name, str) or not name:
        raise _reject(f"The manifest field {field}.name must be a file name.")
    if not _is_int(size) or size < 0:
        raise _reject(f"The manifest field {field}.size must be a whole number of bytes greater than zero.")
    return DeclaredMember(name, size)


def validate_manifest(raw: bytes) -> Manifest:
    """Apply every rule of SPEC 3 to the exact bytes of ``manifest.json`` and return the manifest."""
    fields = _load(raw, _no_duplicates)
    for key in fields:
        if key not in _FIELDS and not key.startswith("x-"):
            raise _reject(f"The manifest has an unknown field {_shown(key)}.")
    for key in sorted(_FIELDS - _OPTIONAL_FIELDS):
        if key not in fields:
            raise _reject(f"The manifest field {key} is missing.")

    if fields["format"] != FORMAT:
        raise _reject(f"The manifest field format must be exactly {FORMAT}.")
    ids = {key: _hex(fields, key, _HEX4, "4 upper-case hex digits") for key in _DEVICE_MODEL_FIELDS}
    try:
        device_type = DeviceType(_string(fields, "device_type"))
    except ValueError:
        kinds = ", ".join(t.value for t in DeviceType)
        raise _reject(f"The manifest field device_type must be one of {kinds}.") from None
    firmware_version = _hex(fields, "firmware_version", _HEX8, "8 upper-case hex digits")
    try:
        purpose = Purpose(_string(fields, "purpose"))
    except ValueError:
        kinds = ", ".join(p.value for p in Purpose)
        raise _reject(f"The manifest field purpose must be one of {kinds}.") from None
    specifications = fields["specifications"]
    if (
        not isinstance(specifications, list)
        or not specifications
        or not all(isinstance(s, str) for s in specifications)
    ):
        raise _reject("The manifest field specifications must be a non-empty array of strings.")
    released = _date(fields, "released")
    image = _file_entry(fields, "image")
    release_notes = _file_entry(fields, "release_notes") if "release_notes" in fields else None
    if release_notes is not None and release_notes.name == image.name:
        raise _reject("The manifest fields image.name and release_notes.name must differ.")
    supersedes = fields.get("supersedes", [])
    if not isinstance(supersedes, list) or not all(
        isinstance(v, str) and _HEX8.fullmatch(v) for v in supersedes
    ):
        raise _reject(
            "The manifest field supersedes must be an array of firmware versions of 8 upper-case hex digits."
        )
    return Manifest(
        device_model=DeviceModel(**ids),
        device_type=device_type,
        firmware_version=firmware_version,
        purpose=purpose,
        specifications=tuple(specifications),
        released=released,
        image=image,
        release_notes=release_notes,
        supersedes=tuple(supersedes),
    )


_DEVICE_MODEL_FIELDS = ("manufacturer_id", "model_id", "hardware_version")


def _is_int(value: object) -> TypeGuard[int]:
    """JSON integers only: ``true`` is an int to Python and ``1.0`` is a number to JSON, neither is a size."""
    return type(value) is int


def _string(fields: dict[str, Any], key: str) -> str:
    value = fields[key]
    return value if isinstance(value, str) else ""


def _hex(fields: dict[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
    value = _string(fields, key)
    if not pattern.fullmatch(value):
        raise _reject(f"The manifest field {key} must be {what}.")
    return value


def _date(fields: dict[str, Any], key: str) -> dt.date:
    value = _string(fields, key)
    if _DATE.fullmatch(value):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    raise _reject(f"The manifest field {key} must be a date written YYYY-MM-DD.")


def _file_entry(fields: dict[str, Any], field: str) -> FileEntry:
    entry = fields[field]
    if not isinstance(entry, dict):
        raise _reject(f"The manifest field {field} must be an object with name, size and sha256.")
    for key in entry:
        if key not in _FILE_FIELDS:
            raise _reject(f"The manifest field {field} has an unknown field {_shown(key)}.")
    for key in _FILE_FIELDS:
        if key not in entry:
            raise _reject(f"The manifest field {field}.{key} is missing.")
    name, size, sha256 = entry["name"], entry["size"], entry["sha256"]
    if not isinstance(name, str) or not FILE_NAME_PATTERN.fullmatch(name):
        raise _reject(
            f"The manifest field {field}.name must be a plain file name of letters, digits and ._+- "
            "(at most 128 characters, starting with a letter or digit)."
        )
    if name in RESERVED_NAMES:
        raise _reject(f"The manifest field {field}.name may not be {name}.")
    if not _is_int(size) or size <= 0:
        raise _reject(f"The manifest field {field}.size must be a whole number of bytes greater than zero.")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise _reject(f"The manifest field {field}.sha256 must be 64 lower-case hex digits.")
    return FileEntry(name=name, size=size, sha256=sha256)

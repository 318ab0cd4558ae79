"""Real, signed ``.cfl`` packages as bytes, for every test that needs one.

The defaults make a package that passes every gateway check that needs no policy (SPEC 4 checks 1 to 5, the
signature by :data:`SIGNING_KEY`)::

    from tests.factory import SIGNING_KEY, PackageSpec, build, public_pem

    good = build(PackageSpec())                                  # ESME 1A2B/0001/0100, firmware 00000010
    newer = build(PackageSpec(firmware_version="00000011"))      # another version of the same device model
    conflict = build(PackageSpec(variant=1))                     # same model and version, different bytes
    with_notes = build(PackageSpec(release_notes=b"# Fixes\\n"))
    pem = public_pem(SIGNING_KEY)                                # for policies/manufacturer-keys/1A2B/

The image is a ZigBee OTA file whose header agrees with the spec (:func:`ota_image`), with a payload derived
from the device model, the version and ``variant``: two specs give the same image bytes only when they
describe the same image. :func:`image_of` and :func:`manifest_of` give the exact bytes a spec puts in the
package, to compare with what a download returns.

Knobs for bad packages (each one leaves everything else valid and signed):

* ``manifest_overrides``: fields merged into the generated manifest (one level deep for ``image`` and
  ``release_notes``; :data:`OMIT` removes a field); ``manifest_bytes``: the raw ``manifest.json`` instead;
* ``signature``: the raw ``manifest.sig`` instead of a real signature; ``key``: another signer;
* ``image_member`` / ``notes_member``: the bytes the tar carries, while the manifest still describes
  ``image`` / ``release_notes`` (a member longer or shorter than declared);
* ``members``: a function that edits the list of :class:`Member` (add, drop, reorder, symlinks,
  directories, absolute or ``../x`` names);
* ``tar_format``: ``"pax"`` (the default), ``"gnu"`` or ``"ustar"`` as Python's ``tarfile`` writes them;
  :func:`build_with_tar` runs the real ``tar`` binary instead;
* ``trailing``: bytes appended after the archive; ``truncate_to``: keep only the first N bytes.
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
import subprocess
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from cfl_sftp.domain.build import manifest_json
from cfl_sftp.domain.signature import PrivateKey, sign_manifest

TarFormat = Literal["pax", "gnu", "ustar"]


def new_ecdsa_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 signing key."""
    return ec.generate_private_key(ec.SECP256R1())


def new_ed25519_key() -> ed25519.Ed25519PrivateKey:
    """A fresh Ed25519 signing key (deterministic signatures: the same spec builds the same bytes)."""
    return ed25519.Ed25519PrivateKey.generate()


def public_pem(key: PrivateKey) -> bytes:
    """The PEM public key to register under ``policies/manufacturer-keys/<manufacturer_id>/``."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(key: PrivateKey) -> bytes:
    """The unencrypted PKCS#8 PEM that ``cfl-sftp package build --key`` reads."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


SIGNING_KEY: ec.EllipticCurvePrivateKey = new_ecdsa_key()
"""The manufacturer key that signs every package unless a spec names another."""

OMIT: object = object()
"""In ``manifest_overrides``: remove this field from the manifest."""


_OTA_TWEAKS = frozenset(
    {
        "header_version",
        "header_length",
        "field_control",
        "manufacturer_code",
        "image_type",
        "file_version",
        "stack_version",
        "header_string",
        "total_image_size",
        "security_credential_version",
        "destination",
    }
)


def ota_image(
    manufacturer_id: str = "1A2B",
    firmware_version: str = "00000010",
    size: int = 1024,
    hw_range: tuple[int, int] | None = None,
    *,
    variant: object = 0,
    **tweaks: int | bytes,
) -> bytes:
    """A ZigBee OTA upgrade file of ``size`` bytes whose header agrees with the arguments.

    ``hw_range`` adds the minimum/maximum hardware version fields. ``tweaks`` override single header
    fields to make a header disagree: ``header_version``, ``header_length``, ``field_control``,
    ``manufacturer_code``, ``image_type``, ``file_version``, ``stack_version``, ``header_string`` (bytes),
    ``total_image_size``, ``security_credential_version`` and ``destination`` (8 bytes; these two add their
    optional field). The payload after the header is pseudo-random, seeded by the arguments and ``variant``.
    A ``size`` below the header's length cuts the header short (a truncated header).
    """
    unknown = set(tweaks) - _OTA_TWEAKS
    if unknown:
        raise TypeError(f"unknown OTA header tweaks: {sorted(unknown)}")
    credential = tweaks.get("security_credential_version")
    destination = tweaks.get("destination")
    optional = b""
    control = 0
    if isinstance(credential, int):
        control |= 0x0001
        optional += bytes([credential])
    if isinstance(destination, bytes):
        control |= 0x0002
        optional += destination
    if hw_range is not None:
        control |= 0x0004
        optional += struct.pack("<HH", *hw_range)

    def number(name: str, default: int) -> int:
        value = tweaks.get(name, default)
        assert isinstance(value, int)
        return value

    header_string = tweaks.get("header_string", b"cfl-sftp test image")
    assert isinstance(header_string, bytes)
    header = struct.pack(
        "<4sHHHHHIH32sI",
        b"\x1e\xf1\xee\x0b",
        number("header_version", 0x0100),
        number("header_length", 56 + len(optional)),
        number("field_control", control),
        number("manufacturer_code", _hex_or_zero(manufacturer_id)),
        number("image_type", 0x0000),
        number("file_version", _hex_or_zero(firmware_version)),
        number("stack_version", 0x0002),
        header_string.ljust(32, b"\0")[:32],
        number("total_image_size", size),
    ) + optional
    if size <= len(header):
        return header[:size]
    seed = f"{manufacturer_id}/{firmware_version}/{size}/{variant}"
    return header + random.Random(seed).randbytes(size - len(header))


def _hex_or_zero(value: str) -> int:
    try:
        return int(value, 16) & 0xFFFFFFFF
    except ValueError:
        return 0


@dataclass(frozen=True)
class Member:
    """One tar member as the factory writes it: a regular file unless ``type`` says otherwise."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""


@dataclass(frozen=True)
class PackageSpec:
    """What to put in a package; every default is valid. See the module docstring for the knobs."""

    manufacturer_id: str = "1A2B"
    model_id: str = "0001"
    hardware_version: str = "0100"
    device_type: str = "ESME"
    firmware_version: str = "00000010"
    purpose: str = "security-fix"
    specifications: tuple[str, ...] = ("SMETS2 v5.0", "GBCS v4.0")
    released: str = "2026-01-15"
    supersedes: tuple[str, ...] = ()  # left out of the manifest when empty
    image: bytes | None = None  # None: an OTA image matching the fields above, of image_size bytes
    image_size: int = 1024
    variant: int = 0  # another value: other payload bytes for the same default image header
    image_name: str = "firmware.bin"
    release_notes: bytes | None = None
    release_notes_name: str = "release-notes.md"
    key: PrivateKey | None = None  # None: SIGNING_KEY
    # knobs for bad packages
    manifest_overrides: Mapping[str, object] = field(default_factory=dict)
    manifest_bytes: bytes | None = None
    signature: bytes | None = None
    image_member: bytes | None = None
    notes_member: bytes | None = None
    members: Callable[[list[Member]], list[Member]] | None = None
    tar_format: TarFormat = "pax"
    trailing: bytes = b""
    truncate_to: int | None = None


def image_of(spec: PackageSpec) -> bytes:
    """The image the spec's manifest describes (and, unless ``image_member`` says otherwise, carries)."""
    if spec.image is not None:
        return spec.image
    hardware = _hex_or_zero(spec.hardware_version) & 0xFFFF
    return ota_image(
        spec.manufacturer_id,
        spec.firmware_version,
        spec.image_size,
        (hardware, hardware),
        variant=(spec.model_id, spec.hardware_version, spec.variant),
    )


def manifest_fields(spec: PackageSpec) -> dict[str, object]:
    """The manifest as a dict, overrides applied; its ``image`` and ``release_notes`` describe the files."""
    image = image_of(spec)
    fields: dict[str, object] = {
        "format": "cfl-package/1",
        "manufacturer_id": spec.manufacturer_id,
        "model_id": spec.model_id,
        "hardware_version": spec.hardware_version,
        "device_type": spec.device_type,
        "firmware_version": spec.firmware_version,
        "purpose": spec.purpose,
        "specifications": list(spec.specifications),
        "released": spec.released,
        "image": _file_entry(spec.image_name, image),
    }
    if spec.release_notes is not None:
        fields["release_notes"] = _file_entry(spec.release_notes_name, spec.release_notes)
    if spec.supersedes:
        fields["supersedes"] = list(spec.supersedes)
    for key, value in spec.manifest_overrides.items():
        current = fields.get(key)
        if value is OMIT:
            fields.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(current, dict):
            merged = {**current, **value}
            fields[key] = {k: v for k, v in merged.items() if v is not OMIT}
        else:
            fields[key] = value
    return fields


def manifest_of(spec: PackageSpec) -> bytes:
    """The exact ``manifest.json`` bytes the spec's package holds."""
    return spec.manifest_bytes if spec.manifest_bytes is not None else manifest_json(manifest_fields(spec))


def members_of(spec: PackageSpec) -> list[Member]:
    """The tar members in order, after the ``members`` hook."""
    manifest = manifest_of(spec)
    signature = spec.signature
    if signature is None:
        signature = sign_manifest(manifest, spec.key or SIGNING_KEY)
    members = [
        Member("manifest.json", manifest),
        Member("manifest.sig", signature),
        Member(spec.image_name, spec.image_member if spec.image_member is not None else image_of(spec)),
    ]
    if spec.release_notes is not None or spec.notes_member is not None:
        notes = spec.notes_member if spec.notes_member is not None else spec.release_notes
        assert notes is not None
        members.append(Member(spec.release_notes_name, notes))
    return spec.members(members) if spec.members is not None else members


def build(spec: PackageSpec | None = None) -> bytes:
    """The package's bytes, written with Python's ``tarfile`` in ``spec.tar_format``."""
    spec = spec or PackageSpec()
    formats = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=formats[spec.tar_format]) as tar:
        for member in members_of(spec):
            info = tarfile.TarInfo(member.name)
            info.type = member.type
            info.linkname = member.linkname
            info.mode = 0o755 if member.type == tarfile.DIRTYPE else 0o644
            info.mtime = 0
            info.uname = info.gname = ""
            if member.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(member.data)
                tar.addfile(info, io.BytesIO(member.data))
            else:
                tar.addfile(info)
    return _finish(spec, out.getvalue())


def build_with_tar(spec: PackageSpec, workdir: Path, tar_format: TarFormat = "gnu") -> bytes:
    """The package's bytes as the real ``tar`` binary writes them (``tar --format=... -cf``).

    Only regular members with plain names: the point is to see what real tools produce.
    """
    names = []
    for member in members_of(spec):
        if member.type != tarfile.REGTYPE or "/" in member.name:
            raise ValueError("build_with_tar writes regular files with plain names only")
        (workdir / member.name).write_bytes(member.data)
        names.append(member.name)
    result = subprocess.run(
        ["tar", f"--format={tar_format}", "--owner=0", "--group=0", "--numeric-owner", "--mtime=@0",
         "-C", str(workdir), "-cf", "-", "--", *names],
        check=True,
        capture_output=True,
    )
    return _finish(spec, result.stdout)


def _finish(spec: PackageSpec, archive: bytes) -> bytes:
    data = archive + spec.trailing
    return data if spec.truncate_to is None else data[: spec.truncate_to]


def _file_entry(name: str, data: bytes) -> dict[str, object]:
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

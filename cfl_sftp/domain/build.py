"""Making a signed ``.cfl`` package: what ``cfl-sftp package build`` runs (SPEC 3 and 10).

A manufacturer writes the descriptive manifest fields; this module fills in what must agree with the bytes
(the ``name``, ``size`` and ``sha256`` of the image and release notes), serialises ``manifest.json``
deterministically, signs it and writes the tar in the one order the gateway accepts. It refuses to write a
package whose manifest the gateway would refuse, so a mistake shows at build time rather than in a receipt.

It writes to the binary stream it is given and reads the inputs it is given (each twice: once to hash, once to
copy, so nothing is held in memory); choosing file names and replacing files atomically is the caller's job.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Mapping
from typing import BinaryIO

from cfl_sftp.domain.errors import GatewayRejection
from cfl_sftp.domain.manifest import MANIFEST_NAME, SIGNATURE_NAME, validate_manifest
from cfl_sftp.domain.signature import PrivateKey, sign_manifest

_CHUNK = 1 << 20


def manifest_json(fields: Mapping[str, object]) -> bytes:
    """The canonical ``manifest.json`` bytes: sorted keys, indent 2, UTF-8, one trailing newline.

    Deterministic so that the same inputs sign the same bytes, and readable because people open it.
    """
    return (json.dumps(fields, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def build_package(
    out: BinaryIO,
    manifest_fields: Mapping[str, object],
    image: BinaryIO,
    image_name: str,
    key: PrivateKey,
    *,
    release_notes: BinaryIO | None = None,
    release_notes_name: str | None = None,
) -> bytes:
    """Write a signed package to ``out`` and return the exact ``manifest.json`` bytes it holds.

    ``image`` and ``release_notes`` are read from their current position to their end. Raises ``ValueError``
    with a one-line reason when the manifest would not pass the gateway's schema, or an input changes while
    it is being copied.
    """
    if (release_notes is None) != (release_notes_name is None):
        raise ValueError("release notes need both a file and a name")
    fields = dict(manifest_fields)
    image_start = image.tell()
    fields["image"] = _describe(image, image_name)
    notes_start = 0
    if release_notes is not None and release_notes_name is not None:
        notes_start = release_notes.tell()
        fields["release_notes"] = _describe(release_notes, release_notes_name)
    elif "release_notes" in fields:
        raise ValueError("the manifest declares release notes but no release-notes file was given")
    manifest_bytes = manifest_json(fields)
    try:
        validate_manifest(manifest_bytes)
    except GatewayRejection as exc:
        raise ValueError(exc.public_message) from None
    signature = sign_manifest(manifest_bytes, key)

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, MANIFEST_NAME, io.BytesIO(manifest_bytes), len(manifest_bytes), None)
        _add(tar, SIGNATURE_NAME, io.BytesIO(signature), len(signature), None)
        image.seek(image_start)
        _add(tar, image_name, image, _size(fields["image"]), _sha256(fields["image"]))
        if release_notes is not None and release_notes_name is not None:
            release_notes.seek(notes_start)
            notes = fields["release_notes"]
            _add(tar, release_notes_name, release_notes, _size(notes), _sha256(notes))
    return manifest_bytes


def _describe(source: BinaryIO, name: str) -> dict[str, object]:
    digest = hashlib.sha256()
    size = 0
    while chunk := source.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return {"name": name, "size": size, "sha256": digest.hexdigest()}


def _size(entry: object) -> int:
    assert isinstance(entry, dict)
    size = entry["size"]
    assert isinstance(size, int)
    return size


def _sha256(entry: object) -> str:
    assert isinstance(entry, dict)
    sha256 = entry["sha256"]
    assert isinstance(sha256, str)
    return sha256


class _HashingReader:
    """Reads through to ``source`` and hashes what passes, to notice an input changed since it was hashed."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.digest = hashlib.sha256()
        self.ended = False

    def read(self, size: int = -1) -> bytes:
        chunk = self.source.read(size)
        self.digest.update(chunk)
        self.ended = self.ended or not chunk
        return chunk


def _add(tar: tarfile.TarFile, name: str, source: BinaryIO, size: int, sha256: str | None) -> None:
    """Append a regular file with neutral metadata: mode 0644, owner 0/0 unnamed, mtime 0."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    reader = _HashingReader(source)
    try:
        tar.addfile(info, reader)
    except OSError:
        if reader.ended:  # tarfile's "unexpected end of data": the file shrank since it was hashed
            raise ValueError(f"{name} changed while the package was being built") from None
        raise
    if sha256 is not None and reader.digest.hexdigest() != sha256:
        raise ValueError(f"{name} changed while the package was being built")

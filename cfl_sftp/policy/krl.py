"""``revoked-keys`` (SPEC 6): the keys and certificates refused, from an OpenSSH KRL or ``SHA256:`` lines.

:func:`parse_krl` reads the binary key revocation list that ``ssh-keygen -k`` writes (OpenSSH's
``PROTOCOL.krl``) into a :class:`KeyRevocationList`: explicit keys, SHA-1 and SHA-256 key hashes, and
certificates revoked by serial number (lists, ranges, bitmaps) or key id, per CA or for any CA. It refuses what
OpenSSH 9.4 and later refuse (signed KRLs, unknown sections, critical extensions) rather than guess at it, and
skips non-critical extensions. :class:`RevokedKeys` answers "is this key, or this certificate, revoked?" from
either form of the file, with OpenSSH's rules:

* a key is revoked when its plain public key blob, or its SHA-1 or SHA-256 hash, is listed;
* a certificate is revoked when its certified key is, when its CA key is, or when its key id or (non-zero)
  serial is listed under its CA or under the wildcard CA;
* with the ``SHA256:`` fingerprint form only keys can be listed, so a certificate is revoked through its
  certified key or its CA key.

Bytes in, answers out: this module opens no file, knows nothing of asyncssh and verifies no signature (the
certificate's own signature is the SSH layer's job, and the KRL is trusted because it is in ``policies/``).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

KRL_MAGIC = b"SSHKRL\n\0"
KRL_FORMAT_VERSION = 1

SECTION_CERTIFICATES = 1
SECTION_EXPLICIT_KEY = 2
SECTION_FINGERPRINT_SHA1 = 3
SECTION_SIGNATURE = 4
SECTION_FINGERPRINT_SHA256 = 5
SECTION_EXTENSION = 255

CERT_SERIAL_LIST = 0x20
CERT_SERIAL_RANGE = 0x21
CERT_SERIAL_BITMAP = 0x22
CERT_KEY_ID = 0x23
CERT_EXTENSION = 0x39

ANY_CA = b""
"""The CA key of a certificate section that applies to every CA (a "wildcard CA")."""

MAX_BITMAP_SERIALS = 1 << 24
"""Serials one bitmap subsection may revoke; a KRL of a few MiB stays within it, a hostile one does not."""


class WireReader:
    """Reads SSH wire-format values (RFC 4251 section 5) from bytes; raises ``ValueError`` when they run out."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._offset = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def take(self, size: int) -> bytes:
        if size > self.remaining:
            raise ValueError("truncated")
        start = self._offset
        self._offset += size
        return bytes(self._data[start : self._offset])

    def byte(self) -> int:
        return self.take(1)[0]

    def uint32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def uint64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def string(self) -> bytes:
        return self.take(self.uint32())

    def boolean(self) -> bool:
        return self.byte() != 0

    def end(self) -> None:
        if self.remaining:
            raise ValueError("unexpected bytes after the data")


def sha256_fingerprint(key_blob: bytes) -> str:
    """OpenSSH's ``SHA256:`` fingerprint of a plain public key blob (``ssh-keygen -l``)."""
    digest = hashlib.sha256(key_blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


@dataclass(frozen=True, slots=True)
class CertificateRevocations:
    """The certificates of one CA (or of any CA) that a KRL revokes."""

    serials: frozenset[int] = frozenset()
    ranges: tuple[tuple[int, int], ...] = ()
    """Inclusive (lowest, highest) serial ranges."""
    key_ids: frozenset[str] = frozenset()

    def revokes(self, serial: int, key_id: str) -> bool:
        if key_id in self.key_ids:
            return True
        if serial == 0:  # the serial of a certificate whose CA set none: never matched, as in OpenSSH
            return False
        return serial in self.serials or any(low <= serial <= high for low, high in self.ranges)


@dataclass(frozen=True, slots=True)
class KeyRevocationList:
    """A parsed OpenSSH KRL. ``certificates`` maps a CA's public key blob (or :data:`ANY_CA`) to what it
    revokes of that CA's certificates."""

    keys: frozenset[bytes] = frozenset()
    sha1: frozenset[bytes] = frozenset()
    sha256: frozenset[bytes] = frozenset()
    certificates: Mapping[bytes, CertificateRevocations] = field(default_factory=lambda: MappingProxyType({}))
    version: int = 0
    comment: str = ""

    def revokes_key(self, key_blob: bytes) -> bool:
        """A plain public key (never a certificate blob) listed explicitly or by hash."""
        return (
            key_blob in self.keys
            or hashlib.sha256(key_blob).digest() in self.sha256
            or hashlib.sha1(key_blob, usedforsecurity=False).digest() in self.sha1
        )

    def revokes_certificate(self, ca_key: bytes, serial: int, key_id: str) -> bool:
        """By serial or key id, under this CA or under the wildcard CA (not through its keys: see
        :meth:`RevokedKeys.revokes_certificate`)."""
        for scope in (ca_key, ANY_CA):
            revoked = self.certificates.get(scope)
            if revoked is not None and revoked.revokes(serial, key_id):
                return True
        return False


def _strings(section: bytes, what: str, size: int | None = None) -> list[bytes]:
    reader = WireReader(section)
    found = []
    while reader.remaining:
        value = reader.string()
        if size is not None and len(value) != size:
            raise ValueError(f"a {what} is {len(value)} bytes, not {size}")
        found.append(value)
    if not found:
        raise ValueError(f"an empty {what} section")
    return found


def _extension(section: bytes) -> None:
    """Skip a non-critical extension; refuse a critical one (we cannot honour what we do not know)."""
    reader = WireReader(section)
    name = reader.string().decode("utf-8", "replace")
    critical = reader.boolean()
    reader.string()
    reader.end()
    if critical:
        raise ValueError(f"unsupported critical extension {name!r}")


@dataclass
class _CertificateSection:
    serials: set[int] = field(default_factory=set)
    ranges: list[tuple[int, int]] = field(default_factory=list)
    key_ids: set[str] = field(default_factory=set)

    def freeze(self) -> CertificateRevocations:
        return CertificateRevocations(frozenset(self.serials), tuple(sorted(self.ranges)), frozenset(self.key_ids))


def _certificate_section(section: bytes, by_ca: dict[bytes, _CertificateSection]) -> None:
    reader = WireReader(section)
    ca_key = reader.string()
    reader.string()  # reserved
    revoked = by_ca.setdefault(ca_key, _CertificateSection())
    while reader.remaining:
        kind = reader.byte()
        data = WireReader(reader.string())
        if kind == CERT_SERIAL_LIST:
            while data.remaining:
                revoked.serials.add(data.uint64())
        elif kind == CERT_SERIAL_RANGE:
            low, high = data.uint64(), data.uint64()
            if low > high:
                raise ValueError(f"serial range {low}-{high} is empty")
            revoked.ranges.append((low, high))
        elif kind == CERT_SERIAL_BITMAP:
            offset = data.uint64()
            bitmap = data.string()
            if bitmap[:1] >= b"\x80":
                raise ValueError("negative serial bitmap")
            if len(bitmap) * 8 > MAX_BITMAP_SERIALS:
                raise ValueError("serial bitmap too large")
            # An mpint is big-endian: bit N (serial offset + N) is bit N % 8 of the N // 8-th byte from the end.
            for position, octet in enumerate(reversed(bitmap)):
                revoked.serials.update(offset + position * 8 + bit for bit in range(8) if octet >> bit & 1)
        elif kind == CERT_KEY_ID:
            ids = _strings(data.take(data.remaining), "key id")
            try:
                revoked.key_ids.update(key_id.decode("utf-8") for key_id in ids)
            except UnicodeDecodeError:
                raise ValueError("a key id is not UTF-8") from None
        elif kind == CERT_EXTENSION:
            _extension(data.take(data.remaining))
        else:
            raise ValueError(f"unknown certificate subsection 0x{kind:02x}")
        data.end()


def parse_krl(data: bytes) -> KeyRevocationList:
    """Parse an OpenSSH KRL; raise ``ValueError`` with a short reason (never quoting key material)."""
    reader = WireReader(data)
    try:
        if reader.take(len(KRL_MAGIC)) != KRL_MAGIC:
            raise ValueError("not an OpenSSH KRL (bad magic)")
        if (version := reader.uint32()) != KRL_FORMAT_VERSION:
            raise ValueError(f"KRL format version {version} is not supported")
        krl_version = reader.uint64()
        reader.uint64()  # generated date
        reader.uint64()  # flags: none are defined
        reader.string()  # reserved
        comment = reader.string().decode("utf-8", "replace")
        keys: set[bytes] = set()
        sha1: set[bytes] = set()
        sha256: set[bytes] = set()
        by_ca: dict[bytes, _CertificateSection] = {}
        while reader.remaining:
            kind = reader.byte()
            if kind == SECTION_SIGNATURE:
                raise ValueError("signed KRLs are not supported (OpenSSH 9.4 and later refuse them too)")
            section = reader.string()
            if kind == SECTION_CERTIFICATES:
                _certificate_section(section, by_ca)
            elif kind == SECTION_EXPLICIT_KEY:
                keys.update(_strings(section, "key"))
            elif kind == SECTION_FINGERPRINT_SHA1:
                sha1.update(_strings(section, "SHA-1 hash", 20))
            elif kind == SECTION_FINGERPRINT_SHA256:
                sha256.update(_strings(section, "SHA-256 hash", 32))
            elif kind == SECTION_EXTENSION:
                _extension(section)
            else:
                raise ValueError(f"unknown KRL section type {kind}")
    except ValueError as exc:
        if str(exc) == "truncated":
            raise ValueError("the KRL is truncated") from None
        raise
    return KeyRevocationList(
        keys=frozenset(keys),
        sha1=frozenset(sha1),
        sha256=frozenset(sha256),
        certificates=MappingProxyType({ca: section.freeze() for ca, section in by_ca.items()}),
        version=krl_version,
        comment=comment,
    )


@dataclass(frozen=True, slots=True)
class RevokedKeys:
    """What ``revoked-keys`` refuses, whichever form it has; empty when the file is absent."""

    fingerprints: frozenset[str] = frozenset()
    krl: KeyRevocationList | None = None

    @classmethod
    def of(cls, fingerprints: Iterable[str], krl: bytes | None) -> RevokedKeys:
        """From the snapshot's ``revoked_fingerprints`` and ``revoked_krl`` (raises ``ValueError`` on a bad KRL)."""
        return cls(frozenset(fingerprints), parse_krl(krl) if krl is not None else None)

    def revokes_key(self, key_blob: bytes) -> bool:
        if self.fingerprints and sha256_fingerprint(key_blob) in self.fingerprints:
            return True
        return self.krl is not None and self.krl.revokes_key(key_blob)

    def revokes_certificate(self, key_blob: bytes, ca_key: bytes, serial: int, key_id: str) -> bool:
        """A certificate for plain key ``key_blob``, signed by ``ca_key``, with this serial and key id."""
        if self.revokes_key(key_blob) or self.revokes_key(ca_key):
            return True
        return self.krl is not None and self.krl.revokes_certificate(ca_key, serial, key_id)

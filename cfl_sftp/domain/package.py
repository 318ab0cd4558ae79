"""Reading a ``.cfl`` package as it is written: gateway checks 1 to 4 (SPEC 3 and 4).

The SFTP layer feeds :class:`PackageReader` each piece a client writes. The reader counts and hashes every
byte, parses the tar as it goes (:mod:`~cfl_sftp.domain.tarstream`), keeps the two small members
(``manifest.json``, ``manifest.sig``) and the first bytes of the image (its OTA header), and passes the image
and release-note bytes straight on to the caller's sinks as they arrive. So :meth:`PackageReader.finish` has
nothing left to read: its time and the reader's memory do not grow with the package.

A bad package never makes :meth:`~PackageReader.feed` raise: the client is still writing, and the verdict is
given once, at close. The reader remembers the first problem it met and keeps counting and hashing, so the
receipt can give the package's size and SHA-256 whatever is wrong with it. :meth:`~PackageReader.finish` then
raises the :class:`~cfl_sftp.domain.errors.GatewayRejection` of the first failing check in SPEC 4 order, or
returns a :class:`ReadPackage`.

Not here: the signature (check 5, :func:`cfl_sftp.domain.signature.verify_manifest_signature`) and everything
that needs the policy or the library (:mod:`cfl_sftp.domain.gateway`); where the sinks put the bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

from cfl_sftp.domain.errors import GatewayRejection, Reason
from cfl_sftp.domain.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    ManifestLayout,
    parse_manifest_layout,
    validate_manifest,
)
from cfl_sftp.domain.model import FileEntry, Manifest
from cfl_sftp.domain.ota import OTA_HEADER_MAX_BYTES, check_ota_header
from cfl_sftp.domain.signature import MAX_SIGNATURE_BYTES
from cfl_sftp.domain.tarstream import (
    ArchiveEnd,
    MemberData,
    MemberEnd,
    MemberStart,
    TarError,
    TarEvent,
    TarStream,
)

MAX_MANIFEST_BYTES = 64 * 1024


class ContentSink(Protocol):
    """Where the image or release-note bytes go as they arrive (a temp file, a sealed vault object).

    ``data`` may be a view into the piece being fed, valid during the call: a sink that keeps bytes copies them.
    """

    def write(self, data: bytes | memoryview) -> None: ...


@dataclass(frozen=True, slots=True)
class PackageLimits:
    """The gateway's size bounds (``[gateway]`` in the configuration), enforced while bytes stream in."""

    max_package_bytes: int = 1 << 30
    max_release_notes_bytes: int = 64 << 20


@dataclass(frozen=True, slots=True)
class ReadPackage:
    """A package that passed gateway checks 1 to 4; its image and notes went to the sinks."""

    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    package_size: int
    package_sha256: str


class _Slot(Enum):
    """The members of a package, in the only order allowed."""

    MANIFEST = auto()
    SIGNATURE = auto()
    IMAGE = auto()
    RELEASE_NOTES = auto()
    END = auto()


_EXPECTED = {
    _Slot.MANIFEST: MANIFEST_NAME,
    _Slot.SIGNATURE: SIGNATURE_NAME,
    _Slot.IMAGE: "the image the manifest names",
    _Slot.RELEASE_NOTES: "the release notes the manifest names",
}
_ORDER = "manifest.json, manifest.sig, the image, then any release notes"


class _Content:
    """An image or release-notes member: hashed, counted and handed on as it streams past."""

    __slots__ = ("received", "sha256", "sink")

    def __init__(self, sink: ContentSink | None) -> None:
        self.sink = sink
        self.sha256 = hashlib.sha256()
        self.received = 0

    def take(self, chunk: bytes | memoryview) -> None:
        self.sha256.update(chunk)
        self.received += len(chunk)
        if self.sink is not None:
            self.sink.write(chunk)  # a view into the piece fed: no copy


def _container(message: str) -> GatewayRejection:
    return GatewayRejection(Reason.BAD_CONTAINER, message)


def _shown(name: str) -> str:
    """A member name as a public message may quote it: JSON-escaped and short."""
    return json.dumps(name if len(name) <= 80 else name[:80] + "...")


class Digest(Protocol):
    """A running hash of the whole package, as ``hashlib.sha256()`` is; a caller may pass one that hashes beside
    the reader's own work (the gateway hashes in another thread, so the two SHA-256s use two cores)."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


class PackageReader:
    """Checks 1 to 4 on a package fed in order, in pieces of any size; see the module docstring."""

    def __init__(
        self,
        limits: PackageLimits,
        image_sink: ContentSink | None = None,
        notes_sink: ContentSink | None = None,
        package_digest: Digest | None = None,
    ) -> None:
        self._limits = limits
        self._tar = TarStream()
        self._received = 0
        self._sha256: Digest = package_digest if package_digest is not None else hashlib.sha256()
        self._problem: GatewayRejection | None = None  # checks 2 (or an unreadable layout): parsing stopped
        self._slot = _Slot.MANIFEST
        self._current: _Slot | None = None  # the slot whose data is streaming
        self._names: set[str] = set()
        self._layout: ManifestLayout | None = None
        self._valid_manifest: Manifest | None = None
        self._manifest = bytearray()
        self._signature = bytearray()
        self._image = _Content(image_sink)
        self._image_prefix = bytearray()
        self._image_span: tuple[int, int] | None = None
        self._notes = _Content(notes_sink)
        self._notes_too_large = False
        self._outcome: ReadPackage | GatewayRejection | None = None

    @property
    def bytes_received(self) -> int:
        """Every byte fed so far, including those past the size limit."""
        return self._received

    @property
    def package_sha256(self) -> str:
        """Hex SHA-256 of every byte fed so far."""
        return self._sha256.hexdigest()

    @property
    def manifest(self) -> Manifest | None:
        """The manifest, as soon as its member has been read and passes every rule of SPEC 3; else None.

        A caller can act on what the package declares before the image arrives (the gateway's spool does). It
        is only a forecast: the package may still fail any check, and :meth:`finish` alone gives the verdict.
        """
        return self._valid_manifest

    @property
    def image_span(self) -> tuple[int, int] | None:
        """``(start, stop)``: the package offsets of the image member's content, once its header has been read
        and accepted; every byte outside is framing (headers, the other members, padding, end blocks)."""
        return self._image_span

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the package; bad content never raises here, :meth:`finish` judges it."""
        if self._outcome is not None:
            raise RuntimeError("the package has already been finished")
        room = self._limits.max_package_bytes - self._received
        self._received += len(data)
        self._sha256.update(data)
        if self._problem is not None or room <= 0:
            return
        try:
            events = self._tar.feed(data if len(data) <= room else data[:room])
        except TarError as exc:
            self._on_events(exc.events)
            self._note(_container(f"The package is not a valid tar archive ({exc})."))
            return
        self._on_events(events)

    def finish(self) -> ReadPackage:
        """The verdict of checks 1 to 4: the package, or the first failing check's rejection."""
        if self._outcome is None:
            try:
                self._outcome = self._verdict()
            except GatewayRejection as exc:
                self._outcome = exc
        if isinstance(self._outcome, GatewayRejection):
            raise self._outcome
        return self._outcome

    # -- the verdict -------------------------------------------------------------------------------------

    def _verdict(self) -> ReadPackage:
        limits = self._limits
        if self._received > limits.max_package_bytes:
            raise GatewayRejection(
                Reason.TOO_LARGE,
                f"The package is larger than the {limits.max_package_bytes} bytes the library accepts.",
            )
        if self._problem is not None:
            raise self._problem
        if self._received == 0:
            raise _container("The package is empty.")
        try:
            self._tar.finish()
        except TarError as exc:
            raise _container(f"The package is not a valid tar archive ({exc}).") from None
        manifest_bytes = bytes(self._manifest)
        manifest = self._valid_manifest or validate_manifest(manifest_bytes)
        notes = manifest.release_notes
        if notes is not None and notes.size > limits.max_release_notes_bytes:
            raise GatewayRejection(
                Reason.TOO_LARGE,
                f"The release notes are declared as {notes.size} bytes, more than the "
                f"{limits.max_release_notes_bytes} bytes the library accepts.",
            )
        _check_content("image", manifest.image, self._image)
        if notes is not None:
            _check_content("release notes", notes, self._notes)
        check_ota_header(bytes(self._image_prefix), self._image.received, manifest)
        return ReadPackage(
            manifest=manifest,
            manifest_bytes=manifest_bytes,
            signature=bytes(self._signature),
            package_size=self._received,
            package_sha256=self.package_sha256,
        )

    # -- the container, event by event -------------------------------------------------------------------

    def _note(self, problem: GatewayRejection) -> None:
        """Remember the first problem; parsing stops there (only the byte count and hash go on)."""
        if self._problem is None:
            self._problem = problem

    def _on_events(self, events: list[TarEvent]) -> None:
        for event in events:
            if self._problem is not None:
                return
            if isinstance(event, MemberData):
                self._on_data(event.chunk)
            elif isinstance(event, MemberStart):
                self._on_start(event.name, event.size, event.data_offset)
            elif isinstance(event, MemberEnd):
                self._on_end()
            elif isinstance(event, ArchiveEnd) and self._slot is not _Slot.END:
                self._note(_container(f"The package ends without {_EXPECTED[self._slot]}."))

    def _expected_name(self, slot: _Slot) -> str:
        if slot is _Slot.MANIFEST:
            return MANIFEST_NAME
        if slot is _Slot.SIGNATURE:
            return SIGNATURE_NAME
        assert self._layout is not None
        if slot is _Slot.IMAGE:
            return self._layout.image.name
        assert self._layout.release_notes is not None
        return self._layout.release_notes.name

    def _largest(self, slot: _Slot) -> int:
        """The most bytes the member in ``slot`` may have without breaking the container."""
        if slot is _Slot.MANIFEST:
            return MAX_MANIFEST_BYTES
        if slot is _Slot.SIGNATURE:
            return MAX_SIGNATURE_BYTES
        assert self._layout is not None
        if slot is _Slot.IMAGE:
            return self._layout.image.size
        assert self._layout.release_notes is not None
        return self._layout.release_notes.size

    @staticmethod
    def _too_long(slot: _Slot) -> str:
        if slot is _Slot.MANIFEST:
            return "larger than the 64 KiB allowed"
        if slot is _Slot.SIGNATURE:
            return "larger than the 1 KiB allowed"
        return "longer than the manifest declares"

    def _on_start(self, name: str, size: int, data_offset: int) -> None:
        slot = self._slot
        if name.startswith("/") or ".." in name.split("/"):
            self._note(_container(f"The package member {_shown(name)} has an absolute path or a '..' part."))
        elif name in self._names:
            self._note(_container(f"The package holds the member {_shown(name)} twice."))
        elif slot is _Slot.END:
            self._note(_container(f"The package holds a member the manifest does not name: {_shown(name)}."))
        elif name != self._expected_name(slot):
            message = f"The package member {_shown(name)} is not {_EXPECTED[slot]}; members are {_ORDER}."
            self._note(_container(message))
        elif size > self._largest(slot):
            self._note(_container(f"The package member {_shown(name)} is {self._too_long(slot)}."))
        else:
            self._names.add(name)
            self._current = slot
            if slot is _Slot.IMAGE:
                self._image_span = (data_offset, data_offset + size)
            elif slot is _Slot.RELEASE_NOTES:
                self._notes_too_large = size > self._limits.max_release_notes_bytes

    def _on_data(self, chunk: bytes | memoryview) -> None:
        slot = self._current
        if slot is _Slot.IMAGE:
            missing = OTA_HEADER_MAX_BYTES - len(self._image_prefix)
            if missing > 0:
                self._image_prefix += chunk[:missing]
            self._image.take(chunk)
        elif slot is _Slot.RELEASE_NOTES:
            if not self._notes_too_large:  # check 3 refuses them anyway: they never reach the vault
                self._notes.take(chunk)
        elif slot is _Slot.MANIFEST:
            self._manifest += chunk
        elif slot is _Slot.SIGNATURE:
            self._signature += chunk

    def _on_end(self) -> None:
        slot = self._current
        self._current = None
        if slot is _Slot.MANIFEST:
            try:
                self._layout = parse_manifest_layout(bytes(self._manifest))
            except GatewayRejection as exc:
                self._note(exc)
                return
            with contextlib.suppress(GatewayRejection):  # finish() raises it again, in check order
                self._valid_manifest = validate_manifest(bytes(self._manifest))
            self._slot = _Slot.SIGNATURE
        elif slot is _Slot.SIGNATURE:
            self._slot = _Slot.IMAGE
        elif slot is _Slot.IMAGE:
            assert self._layout is not None
            self._slot = _Slot.RELEASE_NOTES if self._layout.release_notes is not None else _Slot.END
        elif slot is _Slot.RELEASE_NOTES:
            self._slot = _Slot.END


def _check_content(what: str, declared: FileEntry, content: _Content) -> None:
    if content.received != declared.size:
        raise GatewayRejection(
            Reason.HASH_MISMATCH,
            f"The {what} member is {content.received} bytes, not the {declared.size} the manifest declares.",
        )
    if content.sha256.hexdigest() != declared.sha256:
        raise GatewayRejection(
            Reason.HASH_MISMATCH, f"The {what} member's SHA-256 does not match the one in the manifest."
        )

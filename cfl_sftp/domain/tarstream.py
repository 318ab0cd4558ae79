"""A sans-IO, incremental reader of the tar subset a ``.cfl`` package may use (SPEC 3).

:class:`TarStream` takes bytes in pieces of any size and returns events: :class:`MemberStart`,
:class:`MemberData`, :class:`MemberEnd` and, once the end-of-archive marker has been read,
:class:`ArchiveEnd`.
It opens no file and keeps no member data: what it is fed is handed back as slices, so memory stays bounded
whatever the member sizes, and the caller decides where the bytes go (hash, temp file, nowhere).

What it accepts, and why so little:

* ustar headers (POSIX ``ustar\\0`` ``00`` and GNU ``ustar  \\0`` magic), with a verified header checksum and
  octal numbers tolerant of the leading/trailing spaces and NULs that real tar writers leave;
* GNU base-256 sizes and ``L`` long names, as GNU ``tar -cf`` writes them by default;
* pax ``x`` headers, of which ``path`` and ``size`` apply to the next member and a short list of descriptive
  keys (times, owners, comments, vendor ``SCHILY.*``/``LIBARCHIVE.*`` records) is ignored;
* regular files (``0`` and the old ``\\0``) only.

Everything else a package has no business carrying is a :class:`TarError`: pax global headers, sparse files
(``S`` or ``GNU.sparse.*``), hard and symbolic links, ``K`` long link names, devices, FIFOs, directories,
other or unknown types, unknown pax keys, extended records over 64 KiB, absurd sizes, anything but zero
blocks after the end-of-archive marker, and an archive that stops before that marker
(:meth:`TarStream.finish`).

Member names are reported exactly as the archive gives them; judging them (``..``, absolute paths, the names
a manifest declares) is the package reader's job.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import NoReturn

BLOCK = 512
MAX_EXTENDED_BYTES = 64 * 1024
"""Largest pax ``x`` record set or GNU ``L`` long name accepted: a name is at most a few hundred bytes."""
MAX_MEMBER_SIZE = 1 << 40
"""Sizes above this (1 TiB) are absurd for a firmware package and refused outright."""

_ZERO_BLOCK = bytes(BLOCK)
_POSIX_MAGIC = b"ustar\x0000"
_GNU_MAGIC = b"ustar  \x00"
_REGULAR_TYPES = frozenset({b"0", b"\x00"})
_PAX_TYPE = b"x"
_GNU_LONGNAME_TYPE = b"L"
_REFUSED_TYPES = {
    b"1": "hard links are not allowed",
    b"2": "symbolic links are not allowed",
    b"3": "character devices are not allowed",
    b"4": "block devices are not allowed",
    b"5": "directories are not allowed",
    b"6": "FIFOs are not allowed",
    b"g": "pax global headers are not allowed",
    b"S": "sparse files are not allowed",
    b"K": "GNU long link names are not allowed",
}
_PAX_IGNORED_KEYS = frozenset(
    {"mtime", "atime", "ctime", "uid", "gid", "uname", "gname", "comment", "charset", "hdrcharset"}
)
_PAX_IGNORED_PREFIXES = ("SCHILY.", "LIBARCHIVE.")


class TarError(Exception):
    """The bytes are not a tar archive of the accepted subset; the message says what is wrong.

    ``events`` holds what the failing :meth:`TarStream.feed` call completed before the problem, so a caller
    sees the same events in the same order however the input was split.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.events: list[TarEvent] = []


@dataclass(frozen=True, slots=True)
class MemberStart:
    """A regular file begins; ``name`` and ``size`` are those after pax or GNU long-name overrides.

    ``data_offset`` is where the member's data begins in the archive (bytes fed before it), so a caller can tell
    a member's content apart from the archive's framing without parsing it again. It is left out of equality:
    two starts of the same member are the same event whatever came before.
    """

    name: str
    size: int
    data_offset: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class MemberData:
    """The next bytes of the current member: a slice of what was fed, valid as long as that buffer is."""

    chunk: bytes | memoryview


@dataclass(frozen=True, slots=True)
class MemberEnd:
    """The current member's last byte has been delivered."""


@dataclass(frozen=True, slots=True)
class ArchiveEnd:
    """The two zero blocks that end the archive have been read; only zero blocks may follow."""


TarEvent = MemberStart | MemberData | MemberEnd | ArchiveEnd


class _State(Enum):
    HEADER = auto()  # collecting a 512-byte header block
    DATA = auto()  # passing member data through
    EXTENDED = auto()  # collecting the body of a pax ``x`` or GNU ``L`` header
    PADDING = auto()  # skipping to the next block boundary
    SECOND_ZERO = auto()  # one zero block read; the next must be zero too
    TRAILER = auto()  # after the end-of-archive marker: zeros only
    FAILED = auto()


class TarStream:
    """Feed it bytes with :meth:`feed`, then call :meth:`finish` once the input has ended.

    After a :class:`TarError` the stream stays failed: every later call raises it again, with no events.
    """

    def __init__(self) -> None:
        self._state = _State.HEADER
        self._block = bytearray()  # partial header, second zero block, or extended-header body
        self._left = 0  # bytes still due in DATA, EXTENDED or PADDING
        self._padding_after_data = 0
        self._extended_type = b""
        self._pending_path: str | None = None
        self._pending_size: int | None = None
        self._pending_longname: str | None = None
        self._trailer_bytes = 0
        self._failure: str | None = None
        self._fed = 0  # bytes fed by earlier calls: the archive offset of the current call's first byte

    def feed(self, data: bytes) -> list[TarEvent]:
        """Consume ``data`` (any length, including 0) and return the events it completes, in order."""
        if self._failure is not None:
            raise TarError(self._failure)
        events: list[TarEvent] = []
        try:
            self._feed(data, events)
            self._fed += len(data)
        except TarError as exc:
            self._state = _State.FAILED
            self._failure = str(exc)
            exc.events = events
            raise
        return events

    def finish(self) -> None:
        """Declare the end of input: raise :class:`TarError` unless the archive ended properly."""
        if self._failure is not None:
            raise TarError(self._failure)
        if self._state is not _State.TRAILER:
            self._fail("the archive is truncated before its end-of-archive marker")
        if self._trailer_bytes % BLOCK:
            self._fail("the archive ends with a partial block after its end-of-archive marker")

    # -- the state machine ---------------------------------------------------------------------------

    def _fail(self, message: str) -> NoReturn:
        self._state = _State.FAILED
        self._failure = message
        raise TarError(message)

    def _feed(self, data: bytes, events: list[TarEvent]) -> None:
        view = memoryview(data).cast("B")
        end = len(view)
        pos = 0
        while pos < end:
            state = self._state
            if state is _State.DATA:
                n = min(self._left, end - pos)
                whole = n == end and isinstance(data, bytes)  # hand back the caller's object: no copy
                events.append(MemberData(data if whole else view[pos : pos + n]))
                pos += n
                self._left -= n
                if self._left == 0:
                    events.append(MemberEnd())
                    self._left = self._padding_after_data
                    self._state = _State.PADDING if self._left else _State.HEADER
            elif state is _State.PADDING:
                n = min(self._left, end - pos)
                pos += n
                self._left -= n
                if self._left == 0:
                    self._state = _State.HEADER
            elif state is _State.HEADER:
                if not self._block and end - pos >= BLOCK:
                    header = view[pos : pos + BLOCK]
                    pos += BLOCK
                else:
                    pos = self._collect(view, pos, BLOCK)
                    if len(self._block) < BLOCK:
                        break
                    header = memoryview(bytes(self._block))
                    self._block.clear()
                self._on_header(header, events, self._fed + pos)
            elif state is _State.EXTENDED:
                pos = self._collect(view, pos, self._left)
                if len(self._block) < self._left:
                    break
                self._on_extended(bytes(self._block))
                self._block.clear()
                self._left = _padding(self._left)
                self._state = _State.PADDING if self._left else _State.HEADER
            elif state is _State.SECOND_ZERO:
                pos = self._collect(view, pos, BLOCK)
                if len(self._block) < BLOCK:
                    break
                if self._block != _ZERO_BLOCK:
                    self._fail("a lone zero block is followed by more data")
                self._block.clear()
                self._state = _State.TRAILER
                events.append(ArchiveEnd())
            elif state is _State.TRAILER:
                rest = view[pos:]
                if rest.tobytes().count(0) != len(rest):
                    self._fail("non-zero data follows the end-of-archive marker")
                self._trailer_bytes += len(rest)
                pos = end
            else:  # pragma: no cover - FAILED raises before the loop
                raise AssertionError(state)

    def _collect(self, view: memoryview, pos: int, want: int) -> int:
        """Append up to ``want - len(self._block)`` bytes from ``view[pos:]``; return the new position."""
        n = min(want - len(self._block), len(view) - pos)
        self._block += view[pos : pos + n]
        return pos + n

    def _on_header(self, header: memoryview, events: list[TarEvent], after: int) -> None:
        """Act on a complete header block; ``after`` is the archive offset just past it."""
        if header == _ZERO_BLOCK:
            if (self._pending_path, self._pending_size, self._pending_longname) != (None, None, None):
                self._fail("an extended header is not followed by a member")
            self._state = _State.SECOND_ZERO
            return
        raw = header.tobytes()
        _verify_checksum(raw)
        magic = raw[257:265]
        if magic not in (_POSIX_MAGIC, _GNU_MAGIC):
            self._fail("a header is not a ustar, pax or GNU tar header")
        typeflag = raw[156:157]
        size = _number(raw[124:136], "size")
        if size > MAX_MEMBER_SIZE:
            self._fail("a member declares an absurd size")
        if typeflag in (_PAX_TYPE, _GNU_LONGNAME_TYPE):
            self._start_extended(typeflag, size)
            return
        if typeflag not in _REGULAR_TYPES:
            self._fail(_REFUSED_TYPES.get(typeflag, "a member is not a regular file"))
        name = self._member_name(raw, magic)
        if self._pending_size is not None:
            size = self._pending_size
        self._pending_path = self._pending_size = self._pending_longname = None
        events.append(MemberStart(name, size, after))
        if size == 0:
            events.append(MemberEnd())
        else:
            self._state = _State.DATA
            self._left = size
            self._padding_after_data = _padding(size)

    def _member_name(self, raw: bytes, magic: bytes) -> str:
        if self._pending_path is not None:
            return self._pending_path
        if self._pending_longname is not None:
            return self._pending_longname
        name = _cstring(raw[0:100])
        if magic == _POSIX_MAGIC:
            prefix = _cstring(raw[345:500])
            if prefix:
                name = prefix + b"/" + name
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError:
            self._fail("a member name is not valid UTF-8")

    def _start_extended(self, typeflag: bytes, size: int) -> None:
        if size > MAX_EXTENDED_BYTES:
            self._fail("an extended header record is larger than 64 KiB")
        if typeflag == _PAX_TYPE and (self._pending_path is not None or self._pending_size is not None):
            self._fail("two pax headers precede one member")
        if typeflag == _GNU_LONGNAME_TYPE and self._pending_longname is not None:
            self._fail("two GNU long names precede one member")
        self._extended_type = typeflag
        self._left = size
        self._state = _State.EXTENDED
        if size == 0:
            self._on_extended(b"")
            self._state = _State.HEADER

    def _on_extended(self, body: bytes) -> None:
        if self._extended_type == _GNU_LONGNAME_TYPE:
            name = _cstring(body)
            if not name:
                self._fail("a GNU long name is empty")
            try:
                self._pending_longname = name.decode("utf-8")
            except UnicodeDecodeError:
                self._fail("a member name is not valid UTF-8")
            return
        for key, value in self._pax_records(body):
            if key == "path":
                self._pending_path = value or None
            elif key == "size":
                if not value.isascii() or not value.isdigit():
                    self._fail("a pax size record is not a decimal number")
                size = int(value)
                if size > MAX_MEMBER_SIZE:
                    self._fail("a member declares an absurd size")
                self._pending_size = size
            elif key.startswith("GNU.sparse."):
                self._fail("sparse files are not allowed")
            elif key in _PAX_IGNORED_KEYS or key.startswith(_PAX_IGNORED_PREFIXES):
                continue
            else:
                self._fail(f"a pax header carries the unsupported keyword {key[:40]!r}")

    def _pax_records(self, body: bytes) -> Iterator[tuple[str, str]]:
        """Split a pax body into ``(key, value)`` pairs.

        Each record is ``"<len> <key>=<value>\n"`` where ``len`` counts the whole record, digits included.
        """
        pos = 0
        while pos < len(body):
            space = body.find(b" ", pos, pos + 20)
            digits = body[pos:space] if space > pos else b""
            if not digits.isdigit():
                self._fail("a pax header record has no valid length")
            end = pos + int(digits)
            if end > len(body) or end <= space + 1 or body[end - 1 : end] != b"\n":
                self._fail("a pax header record has an inconsistent length")
            key, equals, value = body[space + 1 : end - 1].partition(b"=")
            if not equals or not key:
                self._fail("a pax header record is not of the form key=value")
            try:
                yield key.decode("utf-8"), value.decode("utf-8")
            except UnicodeDecodeError:
                self._fail("a pax header record is not valid UTF-8")
            pos = end


def _padding(size: int) -> int:
    """Bytes of padding that follow ``size`` bytes of member data up to the next block boundary."""
    return -size % BLOCK


def _cstring(field: bytes) -> bytes:
    """A NUL-terminated header string (the whole field when it fills it)."""
    nul = field.find(b"\0")
    return field if nul < 0 else field[:nul]


def _number(field: bytes, what: str) -> int:
    """A numeric header field: octal padded with spaces or NULs, or GNU base-256 (first byte 0x80)."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field[0] & 0x80:
        raise TarError(f"a header's {what} field is negative or not a number")
    digits = field.strip(b" \0")
    if not digits:
        return 0
    if digits.strip(b"01234567"):
        raise TarError(f"a header's {what} field is not an octal number")
    return int(digits, 8)


def _verify_checksum(header: bytes) -> None:
    """The checksum counts the header with its own field as spaces; old writers summed signed bytes."""
    stored = _number(header[148:156], "checksum")
    unsigned = sum(header) - sum(header[148:156]) + 8 * 0x20
    if stored == unsigned:
        return
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + b" " * 8 + header[156:])
    if stored != signed:
        raise TarError("a header checksum does not match, so the archive is corrupt")

"""Gateway checks 1 to 4 while a package streams in: the tar reader, the package reader and the builder.

Everything here feeds bytes and looks at events or verdicts; no server, no files except those the real ``tar``
binary needs.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import tracemalloc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfl_sftp.domain.build import build_package, manifest_json
from cfl_sftp.domain.errors import GatewayRejection, Reason
from cfl_sftp.domain.package import PackageLimits, PackageReader, ReadPackage
from cfl_sftp.domain.signature import load_manufacturer_key, verify_manifest_signature
from cfl_sftp.domain.tarstream import (
    ArchiveEnd,
    MemberData,
    MemberEnd,
    MemberStart,
    TarError,
    TarEvent,
    TarStream,
)
from tests.factory import (
    OMIT,
    SIGNING_KEY,
    Member,
    PackageSpec,
    build,
    build_with_tar,
    image_of,
    manifest_fields,
    manifest_of,
    new_ed25519_key,
    ota_image,
    public_pem,
)

NOTES = b"# Release notes\n\nFixes the clock drift.\n" * 20

# -- helpers ------------------------------------------------------------------------------------------------


@dataclass
class Sink:
    chunks: list[bytes] = field(default_factory=list)

    def write(self, data: bytes | memoryview) -> None:
        self.chunks.append(bytes(data))  # a sink that keeps bytes must copy them: it may be given a view

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def pieces(data: bytes, sizes: Iterable[int]) -> Iterator[bytes]:
    """``data`` cut into pieces of the given sizes, cycling through them."""
    sizes = list(sizes)
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        yield data[pos : pos + n]
        pos += n
        i += 1


@dataclass
class Read:
    """What the caller of a :class:`PackageReader` can observe."""

    package: ReadPackage | None
    rejection: GatewayRejection | None
    image: bytes
    notes: bytes
    size: int
    sha256: str

    @property
    def verdict(self) -> tuple[object, ...]:
        if self.rejection is not None:
            return (self.rejection.reason, self.rejection.public_message, self.size, self.sha256)
        return (self.package, self.image, self.notes, self.size, self.sha256)


def read(data: bytes, limits: PackageLimits | None = None, sizes: Iterable[int] | None = None) -> Read:
    image, notes = Sink(), Sink()
    reader = PackageReader(limits or PackageLimits(), image_sink=image, notes_sink=notes)
    for piece in [data] if sizes is None else pieces(data, sizes):
        reader.feed(piece)
    try:
        package, rejection = reader.finish(), None
    except GatewayRejection as exc:
        package, rejection = None, exc
    return Read(package, rejection, image.data, notes.data, reader.bytes_received, reader.package_sha256)


def accepted(data: bytes, limits: PackageLimits | None = None) -> ReadPackage:
    result = read(data, limits)
    assert result.rejection is None, result.rejection
    assert result.package is not None
    return result.package


def reason(data: bytes, limits: PackageLimits | None = None) -> Reason:
    result = read(data, limits)
    assert result.rejection is not None, "the package was accepted"
    return result.rejection.reason


def events(data: bytes, size: int | None = None) -> list[TarEvent]:
    """All events of a complete archive, with consecutive data joined, fed in pieces of ``size`` bytes."""
    stream = TarStream()
    out: list[TarEvent] = []
    for piece in [data] if size is None else pieces(data, [size]):
        for event in stream.feed(piece):
            if isinstance(event, MemberData) and out and isinstance(out[-1], MemberData):
                out[-1] = MemberData(bytes(out[-1].chunk) + bytes(event.chunk))
            elif isinstance(event, MemberData):
                out.append(MemberData(bytes(event.chunk)))
            else:
                out.append(event)
    stream.finish()
    return out


def tar_error(data: bytes) -> str:
    """The message of the TarError that ``data``, fed whole and then finished, ends with."""
    stream = TarStream()
    try:
        stream.feed(data)
        stream.finish()
    except TarError as exc:
        return str(exc)
    raise AssertionError("the archive was accepted")


def header(
    name: bytes = b"member",
    size: int = 0,
    *,
    typeflag: bytes = b"0",
    size_field: bytes | None = None,
    magic: bytes = b"ustar\x0000",
    prefix: bytes = b"",
    checksum_error: int = 0,
) -> bytes:
    """One hand-made tar header block with a correct checksum (unless told otherwise)."""
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = size_field if size_field is not None else b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[156:157] = typeflag
    block[257:265] = magic
    block[345 : 345 + len(prefix)] = prefix
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % (sum(block) + checksum_error)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def pax_body(records: dict[str, str]) -> bytes:
    out = b""
    for key, value in records.items():
        text = f" {key}={value}\n".encode()
        length = len(text) + 1
        while len(str(length)) + len(text) != length:
            length += 1
        out += str(length).encode() + text
    return out


END = bytes(1024)


def member(name: bytes, data: bytes) -> bytes:
    return header(name, len(data)) + padded(data)


# == the tar reader =========================================================================================


@pytest.mark.parametrize("tar_format", ["ustar", "gnu", "pax"])
def test_tar_stream_reports_members_of_every_accepted_format(tar_format):
    data = build(PackageSpec(release_notes=NOTES, tar_format=tar_format))
    got = events(data)
    names = [e.name for e in got if isinstance(e, MemberStart)]
    assert names == ["manifest.json", "manifest.sig", "firmware.bin", "release-notes.md"]
    assert got[-1] == ArchiveEnd()
    assert MemberData(image_of(PackageSpec())) in got
    assert MemberData(NOTES) in got


@pytest.mark.parametrize("size", [1, 2, 511, 512, 513, 1000, 10240])
def test_tar_stream_gives_the_same_events_whatever_the_piece_size(size):
    data = build(PackageSpec(release_notes=NOTES, image_name="L" * 120, tar_format="gnu"))
    assert events(data, size) == events(data)


def test_tar_stream_passes_member_data_through_without_copying():
    stream = TarStream()
    stream.feed(header(b"big", 4096 + 1000))
    whole = b"x" * 4096
    assert stream.feed(whole)[0].chunk is whole  # a piece that is all member data comes back as it is
    mixed = b"y" * 1000 + bytes(24) + END
    part = stream.feed(mixed)[0].chunk
    assert isinstance(part, memoryview)
    assert part.obj is mixed  # a slice of the caller's buffer, not a copy
    assert len(part) == 1000


def test_zero_size_member_starts_and_ends_at_once():
    assert events(member(b"empty", b"") + END) == [MemberStart("empty", 0), MemberEnd(), ArchiveEnd()]


def test_ustar_prefix_field_is_joined_to_the_name():
    data = header(b"name", 0, prefix=b"dir") + END
    assert events(data)[0] == MemberStart("dir/name", 0)


def test_octal_fields_padded_with_spaces_and_nuls_are_read():
    data = header(b"a", size_field=b"   12 \0\0\0\0\0\0") + padded(b"x" * 10) + END
    assert events(data)[0] == MemberStart("a", 10)


def test_gnu_base256_size_is_read():
    size_field = b"\x80" + (10).to_bytes(11, "big")
    data = header(b"a", size_field=size_field, magic=b"ustar  \0") + padded(b"x" * 10) + END
    assert events(data)[:2] == [MemberStart("a", 10), MemberData(b"x" * 10)]


def test_negative_base256_size_is_refused():
    assert "size" in tar_error(header(b"a", size_field=b"\xff" * 12) + END)


def test_absurd_size_is_refused():
    size_field = b"\x80" + (1 << 60).to_bytes(11, "big")
    assert "absurd" in tar_error(header(b"a", size_field=size_field, magic=b"ustar  \0"))


def test_non_octal_size_is_refused():
    assert "octal" in tar_error(header(b"a", size_field=b"00000000x12\0"))


def test_bad_header_checksum_is_refused():
    assert "checksum" in tar_error(header(b"a", 0, checksum_error=1) + END)


def test_header_without_ustar_magic_is_refused():
    assert "ustar" in tar_error(header(b"a", 0, magic=bytes(8)) + END)


@pytest.mark.parametrize(
    ("typeflag", "words"),
    [
        (b"1", "hard links"),
        (b"2", "symbolic links"),
        (b"3", "character devices"),
        (b"4", "block devices"),
        (b"5", "directories"),
        (b"6", "FIFOs"),
        (b"7", "regular file"),
        (b"g", "global"),
        (b"S", "sparse"),
        (b"K", "long link"),
        (b"V", "regular file"),
        (b"M", "regular file"),
        (b"Z", "regular file"),
    ],
)
def test_members_other_than_regular_files_are_refused(typeflag, words):
    assert words in tar_error(header(b"a", 0, typeflag=typeflag) + END)


def test_old_style_regular_file_type_nul_is_accepted():
    assert events(header(b"a", 0, typeflag=b"\0") + END)[0] == MemberStart("a", 0)


def test_pax_path_and_size_override_the_header():
    body = pax_body({"path": "p" * 200, "size": "3", "mtime": "1.5", "SCHILY.dev": "1", "LIBARCHIVE.x": "y"})
    pax = header(b"PaxHeader", len(body), typeflag=b"x") + padded(body)
    data = pax + header(b"short", 0) + padded(b"abc") + END
    assert events(data)[:2] == [MemberStart("p" * 200, 3), MemberData(b"abc")]


@pytest.mark.parametrize(
    "key", ["atime", "ctime", "uid", "gid", "uname", "gname", "comment", "charset", "hdrcharset"]
)
def test_harmless_pax_keys_are_ignored(key):
    body = pax_body({key: "0"})
    data = header(b"PaxHeader", len(body), typeflag=b"x") + padded(body) + member(b"a", b"x") + END
    assert events(data)[0] == MemberStart("a", 1)


@pytest.mark.parametrize(
    ("records", "words"),
    [
        ({"GNU.sparse.map": "0,1"}, "sparse"),
        ({"GNU.sparse.major": "1"}, "sparse"),
        ({"linkpath": "/etc/passwd"}, "keyword"),
        ({"security.whatever": "1"}, "keyword"),
        ({"size": "-1"}, "size"),
        ({"size": "12x"}, "size"),
    ],
)
def test_dangerous_or_unknown_pax_records_are_refused(records, words):
    body = pax_body(records)
    data = header(b"PaxHeader", len(body), typeflag=b"x") + padded(body) + member(b"a", b"x") + END
    assert words in tar_error(data)


@pytest.mark.parametrize("body", [b"5 a=b\n", b"x path=a\n", b"7 path=a\n", b"8 patha\n", b"10 path=a\n\n"])
def test_malformed_pax_records_are_refused(body):
    data = header(b"PaxHeader", len(body), typeflag=b"x") + padded(body) + member(b"a", b"x") + END
    assert "pax" in tar_error(data)


def test_two_pax_headers_before_one_member_are_refused():
    body = pax_body({"path": "a"})
    pax = header(b"PaxHeader", len(body), typeflag=b"x") + padded(body)
    assert "two pax headers" in tar_error(pax + pax + member(b"a", b"x") + END)


def test_two_gnu_long_names_before_one_member_are_refused():
    longname = header(b"././@LongLink", 4, typeflag=b"L", magic=b"ustar  \0") + padded(b"abc\0")
    assert "two GNU long names" in tar_error(longname + longname + member(b"a", b"x") + END)


def test_empty_gnu_long_name_is_refused():
    longname = header(b"././@LongLink", 1, typeflag=b"L", magic=b"ustar  \0") + padded(b"\0")
    assert "empty" in tar_error(longname + member(b"a", b"x") + END)


def test_member_name_that_is_not_utf8_is_refused():
    assert "UTF-8" in tar_error(member(b"caf\xe9", b"x") + END)


def test_pax_record_set_over_64_kib_is_refused():
    body = pax_body({"comment": "c" * 70_000})
    assert "64 KiB" in tar_error(header(b"PaxHeader", len(body), typeflag=b"x") + padded(body))


def test_gnu_long_name_is_used():
    name = b"n" * 300 + b"\0"
    data = header(b"././@LongLink", len(name), typeflag=b"L", magic=b"ustar  \0") + padded(name)
    data += header(b"n" * 99, 1, magic=b"ustar  \0") + padded(b"z") + END
    assert events(data)[0] == MemberStart("n" * 300, 1)


def test_gnu_long_name_over_64_kib_is_refused():
    assert "64 KiB" in tar_error(header(b"././@LongLink", 70_000, typeflag=b"L"))


def test_extended_header_followed_by_the_end_of_archive_is_refused():
    body = pax_body({"path": "a"})
    assert "not followed" in tar_error(header(b"PaxHeader", len(body), typeflag=b"x") + padded(body) + END)


def test_trailing_zero_blocks_after_the_end_are_accepted():
    assert events(member(b"a", b"x") + END + bytes(512 * 17))[-1] == ArchiveEnd()


@pytest.mark.parametrize("garbage", [b"\x01", bytes(511) + b"\x01", bytes(5000) + b"garbage"])
def test_non_zero_bytes_after_the_end_are_refused(garbage):
    assert "follows the end-of-archive marker" in tar_error(member(b"a", b"x") + END + garbage)


def test_partial_zero_block_after_the_end_is_refused():
    assert "partial block" in tar_error(member(b"a", b"x") + END + bytes(100))


def test_single_zero_block_followed_by_a_member_is_refused():
    assert "lone zero block" in tar_error(member(b"a", b"x") + bytes(512) + member(b"b", b"y") + END)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        header(b"a", 10)[:300],
        header(b"a", 10),
        header(b"a", 10) + b"x" * 5,
        header(b"a", 10) + b"x" * 10,
        member(b"a", b"x" * 10),
        member(b"a", b"x" * 10) + bytes(512),
        member(b"a", b"x" * 10) + bytes(1000),
    ],
)
def test_archive_that_stops_before_its_end_marker_is_truncated(data):
    stream = TarStream()
    stream.feed(data)
    with pytest.raises(TarError, match="truncated"):
        stream.finish()


def test_tar_error_is_sticky_and_later_calls_report_no_events():
    stream = TarStream()
    with pytest.raises(TarError):
        stream.feed(header(b"a", 0, checksum_error=3))
    with pytest.raises(TarError) as again:
        stream.feed(END)
    assert again.value.events == []
    with pytest.raises(TarError):
        stream.finish()


def test_tar_error_carries_the_events_completed_before_the_problem():
    stream = TarStream()
    with pytest.raises(TarError) as caught:
        stream.feed(member(b"a", b"xy") + header(b"b", 0, typeflag=b"2"))
    before = [e for e in caught.value.events if not isinstance(e, MemberData)]
    assert before == [MemberStart("a", 2), MemberEnd()]


# == the package reader: what passes =======================================================================


def test_valid_package_passes_checks_1_to_4_and_its_signature_verifies():
    data = build(PackageSpec())
    package = accepted(data)
    spec = PackageSpec()
    assert package.manifest_bytes == manifest_of(spec)
    assert package.manifest.image.sha256 == hashlib.sha256(image_of(spec)).hexdigest()
    assert package.manifest.release_notes is None
    assert package.package_size == len(data)
    assert package.package_sha256 == hashlib.sha256(data).hexdigest()
    key = load_manufacturer_key(public_pem(SIGNING_KEY))
    assert verify_manifest_signature(package.manifest_bytes, package.signature, [key]) == key


def test_ed25519_signed_package_passes_and_verifies():
    signer = new_ed25519_key()
    package = accepted(build(PackageSpec(key=signer)))
    assert len(package.signature) == 64
    key = load_manufacturer_key(public_pem(signer))
    assert verify_manifest_signature(package.manifest_bytes, package.signature, [key]) == key


def test_sinks_receive_exactly_the_image_and_the_release_notes():
    spec = PackageSpec(release_notes=NOTES, image_size=100_000)
    result = read(build(spec), sizes=[333, 4096, 7])
    assert result.rejection is None
    assert result.image == image_of(spec)
    assert result.notes == NOTES
    assert result.package is not None
    assert result.package.manifest.release_notes is not None


def test_size_and_hash_so_far_are_known_while_feeding():
    data = build(PackageSpec())
    reader = PackageReader(PackageLimits())
    reader.feed(data[:1000])
    assert reader.bytes_received == 1000
    assert reader.package_sha256 == hashlib.sha256(data[:1000]).hexdigest()


@pytest.mark.parametrize("tar_format", ["pax", "gnu", "ustar"])
def test_packages_written_by_python_tarfile_in_each_format_pass(tar_format):
    accepted(build(PackageSpec(tar_format=tar_format, release_notes=NOTES)))


@pytest.mark.parametrize("tar_format", ["pax", "gnu"])
def test_long_image_names_written_by_python_tarfile_pass(tar_format):
    name = "x" * 128
    spec = PackageSpec(
        tar_format=tar_format, image_name=name, release_notes=NOTES, release_notes_name="n" * 101
    )
    package = accepted(build(spec))
    assert package.manifest.image.name == name


@pytest.mark.parametrize("tar_format", ["gnu", "pax"])
@pytest.mark.parametrize("image_name", ["firmware.bin", "F" * 128])
def test_packages_written_by_the_real_tar_binary_pass(tmp_path, tar_format, image_name):
    spec = PackageSpec(image_name=image_name, release_notes=NOTES, release_notes_name="notes-" + "n" * 110)
    data = build_with_tar(spec, tmp_path, tar_format)
    if len(image_name) > 100:
        assert (b"././@LongLink" if tar_format == "gnu" else b"path=" + image_name.encode()) in data
    result = read(data)
    assert result.rejection is None, result.rejection
    assert result.image == image_of(spec)
    assert result.notes == NOTES


def test_package_cut_right_after_its_end_marker_passes():
    """tar pads to a 10240-byte record, but the zero blocks after the marker are optional."""
    accepted(build(PackageSpec(truncate_to=END_AT + 1024)))


def test_trailing_zero_blocks_after_the_archive_pass():
    accepted(build(PackageSpec(trailing=bytes(512 * 40))))


def test_package_exactly_at_the_size_limit_passes():
    data = build(PackageSpec())
    accepted(data, PackageLimits(max_package_bytes=len(data)))


def test_release_notes_exactly_at_their_limit_pass():
    accepted(build(PackageSpec(release_notes=NOTES)), PackageLimits(max_release_notes_bytes=len(NOTES)))


def test_a_plain_image_without_ota_header_is_not_header_checked():
    accepted(build(PackageSpec(image=b"opaque firmware bytes" * 10)))


# == check 1: too-large =====================================================================================


def test_package_over_the_size_limit_is_too_large_whatever_else_is_wrong():
    data = b"\x01garbage that is not a tar at all" * 100
    assert reason(data, PackageLimits(max_package_bytes=len(data) - 1)) is Reason.TOO_LARGE


def test_package_over_the_limit_is_too_large_even_with_a_broken_manifest():
    data = build(PackageSpec(manifest_bytes=b"{not json"))
    assert reason(data, PackageLimits(max_package_bytes=len(data) - 1)) is Reason.TOO_LARGE


def test_bytes_past_the_limit_are_counted_and_hashed_but_not_passed_on():
    data = build(PackageSpec(image_size=50_000))
    image_start = data.index(image_of(PackageSpec(image_size=50_000)))
    limit = image_start + 1000
    result = read(data, PackageLimits(max_package_bytes=limit), sizes=[4096])
    assert result.rejection is not None
    assert result.rejection.reason is Reason.TOO_LARGE
    assert result.size == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.image == image_of(PackageSpec(image_size=50_000))[:1000]


def test_release_notes_declared_over_their_limit_are_too_large_and_never_reach_the_sink():
    limits = PackageLimits(max_release_notes_bytes=len(NOTES) - 1)
    result = read(build(PackageSpec(release_notes=NOTES)), limits)
    assert result.rejection is not None
    assert result.rejection.reason is Reason.TOO_LARGE
    assert "release notes" in result.rejection.public_message
    assert result.notes == b""


def test_schema_error_comes_before_release_notes_too_large():
    spec = PackageSpec(release_notes=NOTES, manifest_overrides={"purpose": "bugfix"})
    assert reason(build(spec), PackageLimits(max_release_notes_bytes=10)) is Reason.BAD_MANIFEST


def test_broken_container_comes_before_release_notes_too_large():
    spec = PackageSpec(release_notes=NOTES, trailing=b"junk" * 128)
    assert reason(build(spec), PackageLimits(max_release_notes_bytes=10)) is Reason.BAD_CONTAINER


# == check 2: bad-container =================================================================================


def _swap(i: int, j: int):
    def edit(members: list[Member]) -> list[Member]:
        members[i], members[j] = members[j], members[i]
        return members

    return edit


def _end_marker_offset(data: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.getmembers()
        return tar.offset


END_AT = _end_marker_offset(build(PackageSpec()))
"""Where the default package's end-of-archive marker starts."""

BAD_CONTAINERS = {
    "empty file": PackageSpec(truncate_to=0),
    "not a tar": PackageSpec(truncate_to=0, trailing=b"PK\x03\x04 a zip file, not a tar" * 40),
    "truncated in the manifest header": PackageSpec(truncate_to=100),
    "truncated in the image": PackageSpec(truncate_to=3000),
    "truncated before the end marker": PackageSpec(truncate_to=END_AT),
    "truncated after one zero block": PackageSpec(truncate_to=END_AT + 512),
    "truncated in the second zero block": PackageSpec(truncate_to=END_AT + 700),
    "cut inside the zero blocks after the end": PackageSpec(truncate_to=END_AT + 1024 + 100),
    "trailing garbage": PackageSpec(trailing=b"garbage"),
    "trailing garbage after zero blocks": PackageSpec(trailing=bytes(4096) + b"\x01"),
    "dot-dot member": PackageSpec(members=lambda ms: [*ms, Member("../x", b"x")]),
    "dot-dot inside a path": PackageSpec(members=lambda ms: [*ms, Member("a/../../x", b"x")]),
    "absolute member": PackageSpec(members=lambda ms: [*ms, Member("/etc/cron.d/x", b"x")]),
    "dot-dot image the manifest names": PackageSpec(image_name="../firmware.bin"),
    "absolute image the manifest names": PackageSpec(image_name="/firmware.bin"),
    "symlink member": PackageSpec(
        members=lambda ms: [*ms, Member("link", type=tarfile.SYMTYPE, linkname="/")]
    ),
    "hard link member": PackageSpec(
        members=lambda ms: [*ms, Member("hard", type=tarfile.LNKTYPE, linkname="manifest.json")]
    ),
    "directory member": PackageSpec(members=lambda ms: [Member("dir", type=tarfile.DIRTYPE), *ms]),
    "fifo member": PackageSpec(members=lambda ms: [*ms, Member("fifo", type=tarfile.FIFOTYPE)]),
    "extra member": PackageSpec(members=lambda ms: [*ms, Member("extra.txt", b"hello")]),
    "extra empty member": PackageSpec(members=lambda ms: [*ms, Member("extra.txt", b"")]),
    "undeclared release notes": PackageSpec(members=lambda ms: [*ms, Member("release-notes.md", NOTES)]),
    "missing image": PackageSpec(members=lambda ms: ms[:2]),
    "missing signature": PackageSpec(members=lambda ms: [ms[0], ms[2]]),
    "missing manifest": PackageSpec(members=lambda ms: ms[1:]),
    "missing release notes": PackageSpec(release_notes=NOTES, members=lambda ms: ms[:3]),
    "no members at all": PackageSpec(members=lambda ms: []),
    "signature before manifest": PackageSpec(members=_swap(0, 1)),
    "image before signature": PackageSpec(members=_swap(1, 2)),
    "notes before image": PackageSpec(release_notes=NOTES, members=_swap(2, 3)),
    "image under another name": PackageSpec(members=lambda ms: [*ms[:2], Member("other.bin", ms[2].data)]),
    "image under a path": PackageSpec(members=lambda ms: [*ms[:2], Member("dir/firmware.bin", ms[2].data)]),
    "manifest under a path": PackageSpec(members=lambda ms: [Member("./manifest.json", ms[0].data), *ms[1:]]),
    "duplicate manifest": PackageSpec(members=lambda ms: [ms[0], ms[1], ms[0], ms[2]]),
    "image named like the signature": PackageSpec(image_name="manifest.sig"),
    "image longer than declared": PackageSpec(image_member=image_of(PackageSpec()) + b"x"),
    "notes longer than declared": PackageSpec(release_notes=NOTES, notes_member=NOTES + b"x"),
    "manifest over 64 KiB": PackageSpec(manifest_overrides={"x-padding": "p" * 65_536}),
    "signature over 1 KiB": PackageSpec(signature=b"s" * 1025),
    "short image and trailing garbage": PackageSpec(image_member=b"short", trailing=b"junk"),
    "bad schema and an extra member": PackageSpec(
        manifest_overrides={"purpose": "bugfix"}, members=lambda ms: [*ms, Member("extra", b"x")]
    ),
}


@pytest.mark.parametrize("spec", BAD_CONTAINERS.values(), ids=BAD_CONTAINERS.keys())
def test_broken_container_is_bad_container(spec):
    result = read(build(spec))
    assert result.rejection is not None
    assert result.rejection.reason is Reason.BAD_CONTAINER
    assert result.rejection.public_message.endswith(".")


def test_member_names_in_messages_are_quoted_and_short():
    result = read(build(PackageSpec(members=lambda ms: [Member("\n" + "x" * 500, b""), *ms])))
    assert result.rejection is not None
    assert "\n" not in result.rejection.public_message
    assert len(result.rejection.public_message) < 300


def test_gnu_long_name_that_differs_from_the_manifest_is_bad_container():
    spec = PackageSpec(tar_format="gnu", members=lambda ms: [*ms[:2], Member("y" * 150, ms[2].data)])
    assert reason(build(spec)) is Reason.BAD_CONTAINER


def test_manifest_too_broken_to_learn_the_layout_is_bad_manifest():
    assert reason(build(PackageSpec(manifest_bytes=b"{not json"))) is Reason.BAD_MANIFEST


def test_broken_layout_is_decided_when_the_manifest_ends_even_if_the_archive_breaks_later():
    spec = PackageSpec(manifest_bytes=b'{"image": 1}', trailing=b"garbage")
    assert reason(build(spec)) is Reason.BAD_MANIFEST


def test_empty_manifest_member_is_bad_manifest():
    assert reason(build(PackageSpec(manifest_bytes=b""))) is Reason.BAD_MANIFEST


# == check 3: bad-manifest ==================================================================================


@pytest.mark.parametrize(
    "overrides",
    [
        {"purpose": "bugfix"},
        {"manufacturer_id": "1a2b"},
        {"firmware_version": "10"},
        {"format": "cfl-package/2"},
        {"unknown": 1},
        {"image": {"sha256": "A" * 64}},
        {"image": {"extra": 1}},
        {"released": OMIT},
        {"image": {"size": 1024.0}},
    ],
)
def test_manifest_breaking_the_schema_in_a_sound_container_is_bad_manifest(overrides):
    assert reason(build(PackageSpec(manifest_overrides=overrides))) is Reason.BAD_MANIFEST


def test_manifest_with_duplicate_keys_is_bad_manifest():
    raw = manifest_of(PackageSpec()).replace(b'"purpose": "', b'"purpose": "x", "purpose": "')
    assert reason(build(PackageSpec(manifest_bytes=raw))) is Reason.BAD_MANIFEST


def test_manifest_with_x_fields_passes():
    accepted(build(PackageSpec(manifest_overrides={"x-build": {"ci": "run 42"}})))


# == check 4: hash-mismatch and header-mismatch =============================================================


def test_image_shorter_than_declared_is_hash_mismatch():
    image = image_of(PackageSpec())
    result = read(build(PackageSpec(image_member=image[:-1])))
    assert result.rejection is not None
    assert result.rejection.reason is Reason.HASH_MISMATCH
    assert "1023" in result.rejection.public_message


def test_empty_image_member_is_hash_mismatch():
    assert reason(build(PackageSpec(image_member=b""))) is Reason.HASH_MISMATCH


def test_release_notes_shorter_than_declared_is_hash_mismatch():
    assert reason(build(PackageSpec(release_notes=NOTES, notes_member=NOTES[:-5]))) is Reason.HASH_MISMATCH


def test_image_with_other_bytes_of_the_same_size_is_hash_mismatch():
    image = bytearray(image_of(PackageSpec()))
    image[-1] ^= 1
    assert reason(build(PackageSpec(image_member=bytes(image)))) is Reason.HASH_MISMATCH


def test_release_notes_with_other_bytes_are_hash_mismatch():
    other = NOTES.replace(b"clock", b"clack")
    assert reason(build(PackageSpec(release_notes=NOTES, notes_member=other))) is Reason.HASH_MISMATCH


def test_schema_error_comes_before_a_short_image():
    spec = PackageSpec(image_member=b"short", manifest_overrides={"purpose": "bugfix"})
    assert reason(build(spec)) is Reason.BAD_MANIFEST


OTA_MISMATCHES = {
    "manufacturer": ota_image("1A2C", "00000010", 1024, (0x100, 0x100)),
    "file version": ota_image("1A2B", "00000011", 1024, (0x100, 0x100)),
    "hardware range": ota_image("1A2B", "00000010", 1024, (0x101, 0x200)),
    "wildcard manufacturer": ota_image("1A2B", "00000010", 1024, manufacturer_code=0xFFFF),
    "destination": ota_image("1A2B", "00000010", 1024, destination=bytes(8)),
    "total size": ota_image("1A2B", "00000010", 1024, total_image_size=1025),
    "truncated header": ota_image("1A2B", "00000010", 50),
    "header length": ota_image("1A2B", "00000010", 1024, header_length=70),
}


@pytest.mark.parametrize("image", OTA_MISMATCHES.values(), ids=OTA_MISMATCHES.keys())
def test_ota_header_disagreeing_with_the_manifest_is_header_mismatch(image):
    assert reason(build(PackageSpec(image=image))) is Reason.HEADER_MISMATCH


def test_hash_is_checked_before_the_ota_header():
    bad_header = OTA_MISMATCHES["manufacturer"]
    spec = PackageSpec(image=bad_header, image_member=bad_header[:-1] + b"\0")
    assert reason(build(spec)) is Reason.HASH_MISMATCH


# == the verdict does not depend on how the bytes arrive ===================================================

CHUNKING_CASES: list[tuple[bytes, PackageLimits]] = [
    (build(PackageSpec(release_notes=NOTES, image_size=3000)), PackageLimits()),
    (build(PackageSpec(tar_format="gnu", image_name="g" * 120, release_notes=NOTES)), PackageLimits()),
    (build(PackageSpec(trailing=bytes(2048))), PackageLimits()),
    (build(PackageSpec(image_member=image_of(PackageSpec())[:-7])), PackageLimits()),
    (build(PackageSpec(image_member=image_of(PackageSpec()) + b"!")), PackageLimits()),
    (build(PackageSpec(truncate_to=2500)), PackageLimits()),
    (build(PackageSpec(trailing=bytes(700) + b"x")), PackageLimits()),
    (build(PackageSpec(manifest_bytes=b"[]", trailing=b"x")), PackageLimits()),
    (build(PackageSpec(manifest_overrides={"device_type": "TOASTER"})), PackageLimits()),
    (build(PackageSpec(image=OTA_MISMATCHES["file version"])), PackageLimits()),
    (
        build(PackageSpec(members=lambda ms: [*ms[:2], Member("s", type=tarfile.SYMTYPE, linkname="/")])),
        PackageLimits(),
    ),
    (build(PackageSpec(release_notes=NOTES)), PackageLimits(max_release_notes_bytes=100)),
    (build(PackageSpec()), PackageLimits(max_package_bytes=3000)),
    (build(PackageSpec(image_member=b"")), PackageLimits()),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(range(len(CHUNKING_CASES))),
    sizes=st.lists(st.integers(min_value=1, max_value=1500), min_size=1, max_size=40),
)
def test_verdict_is_the_same_whether_fed_whole_or_in_random_pieces(case, sizes):
    data, limits = CHUNKING_CASES[case]
    assert read(data, limits, sizes).verdict == read(data, limits).verdict


@pytest.mark.parametrize("case", range(len(CHUNKING_CASES)))
def test_verdict_is_the_same_when_fed_one_byte_at_a_time(case):
    data, limits = CHUNKING_CASES[case]
    assert read(data, limits, [1]).verdict == read(data, limits).verdict


# == memory and finish ======================================================================================


class CountingSink:
    def __init__(self) -> None:
        self.size = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self.sha256.update(data)


def test_memory_stays_bounded_while_a_64_mib_image_streams_through():
    piece = 1 << 20
    image_size = 64 * piece
    header_bytes = ota_image("1A2B", "00000010", 100, (0x100, 0x100), total_image_size=image_size)[:60]
    block = bytes(range(256)) * (piece // 256)
    first = header_bytes + block[len(header_bytes) :]
    digest = hashlib.sha256(first)
    for _ in range(63):
        digest.update(block)
    spec = PackageSpec(
        image=b"unused", manifest_overrides={"image": {"size": image_size, "sha256": digest.hexdigest()}}
    )
    head = build(PackageSpec(image=b"unused", manifest_bytes=manifest_of(spec), members=lambda ms: ms[:2]))
    with tarfile.open(fileobj=io.BytesIO(head)) as tar:
        tar.getmembers()
        head = head[: tar.offset]  # manifest.json and manifest.sig, without the end-of-archive marker
    info = tarfile.TarInfo(spec.image_name)
    info.size = image_size
    tail = END + bytes(8192)

    sink = CountingSink()
    reader = PackageReader(PackageLimits(), image_sink=sink)
    tracemalloc.start()
    try:
        reader.feed(head + info.tobuf(tarfile.PAX_FORMAT))
        reader.feed(first)
        for _ in range(63):
            reader.feed(block)
        reader.feed(tail)
        package = reader.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert package.manifest.image.size == image_size
    assert sink.size == image_size
    assert sink.sha256.hexdigest() == digest.hexdigest()
    assert peak < 4 * piece, f"peak {peak} bytes while streaming a {image_size}-byte image"


def test_finish_gives_the_same_verdict_twice_and_feeding_after_it_is_an_error():
    reader = PackageReader(PackageLimits())
    reader.feed(b"not a package")
    with pytest.raises(GatewayRejection) as first:
        reader.finish()
    with pytest.raises(GatewayRejection) as second:
        reader.finish()
    assert first.value.reason is second.value.reason is Reason.BAD_CONTAINER
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


# == building packages ======================================================================================


def _build(spec: PackageSpec, key=None, notes: bytes | None = None) -> tuple[bytes, bytes]:
    fields = manifest_fields(spec)
    fields.pop("image")
    fields.pop("release_notes", None)
    out = io.BytesIO()
    manifest = build_package(
        out,
        fields,
        io.BytesIO(image_of(spec)),
        spec.image_name,
        key or SIGNING_KEY,
        release_notes=io.BytesIO(notes) if notes is not None else None,
        release_notes_name="release-notes.md" if notes is not None else None,
    )
    return out.getvalue(), manifest


def test_built_package_passes_the_reader_and_its_signature_verifies():
    data, manifest = _build(PackageSpec(), notes=NOTES)
    result = read(data)
    assert result.package is not None
    assert result.package.manifest_bytes == manifest
    assert result.notes == NOTES
    key = load_manufacturer_key(public_pem(SIGNING_KEY))
    verify_manifest_signature(manifest, result.package.signature, [key])


def test_built_manifest_is_sorted_indented_utf8_and_fills_in_the_files():
    spec = PackageSpec(specifications=("Spécification",))
    _, manifest = _build(spec)
    assert manifest == manifest_json(manifest_fields(spec))
    assert manifest.startswith(b'{\n  "device_type": "ESME",\n')
    assert "Spécification".encode() in manifest
    assert f'"sha256": "{hashlib.sha256(image_of(spec)).hexdigest()}"'.encode() in manifest


def test_built_tar_holds_regular_files_with_neutral_metadata_in_order():
    data, _ = _build(PackageSpec(), notes=NOTES)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["manifest.json", "manifest.sig", "firmware.bin", "release-notes.md"]
    assert {(i.type, i.mode, i.mtime, i.uid, i.gid, i.uname, i.gname) for i in infos} == {
        (tarfile.REGTYPE, 0o644, 0, 0, 0, "", "")
    }


def test_building_twice_with_ed25519_gives_identical_bytes_matching_the_factory():
    key = new_ed25519_key()
    first, _ = _build(PackageSpec(), key=key)
    second, _ = _build(PackageSpec(), key=key)
    assert first == second
    assert first == build(PackageSpec(key=key))


def test_building_reads_inputs_from_their_current_position():
    image = image_of(PackageSpec())
    fields = manifest_fields(PackageSpec())
    source = io.BytesIO(b"skipped" + image)
    source.seek(7)
    out = io.BytesIO()
    build_package(out, fields, source, "firmware.bin", SIGNING_KEY)
    assert read(out.getvalue()).image == image


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"purpose": "bugfix"}, "purpose"),
        ({"release_notes": {"name": "n"}}, "release notes"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_building_refuses_a_manifest_the_gateway_would_refuse(changes, words):
    fields = {**manifest_fields(PackageSpec()), **changes}
    with pytest.raises(ValueError, match=words):
        build_package(io.BytesIO(), fields, io.BytesIO(image_of(PackageSpec())), "firmware.bin", SIGNING_KEY)


def test_building_refuses_release_notes_without_a_name():
    with pytest.raises(ValueError, match="name"):
        build_package(
            io.BytesIO(), manifest_fields(PackageSpec()), io.BytesIO(b"img"), "firmware.bin", SIGNING_KEY,
            release_notes=io.BytesIO(NOTES),
        )

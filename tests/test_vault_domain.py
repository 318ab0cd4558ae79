"""The vault's cryptography on bytes: key rings and wrapped keys, and the segmented AEAD of sealed objects."""

from __future__ import annotations

import base64
import functools
import io
import itertools
import random
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfl_sftp.domain.errors import VaultError
from cfl_sftp.domain.vault import (
    CIPHERTEXT_SEGMENT_SIZE,
    HEADER_SIZE,
    SEGMENT_SIZE,
    KeyRing,
    SegmentedDecryptor,
    SegmentedEncryptor,
    WrappedKey,
    ciphertext_offset_of_segment,
    decrypt_all,
    decrypt_range,
    decrypt_segment,
    generate_key_line,
    new_data_key,
    plaintext_size,
    segment_count,
)

KIB = 1024
MIB = 1024 * KIB
SIZES = [0, 1, SEGMENT_SIZE - 1, SEGMENT_SIZE, SEGMENT_SIZE + 1, 3 * SEGMENT_SIZE, 3 * MIB + 12_345]
BINDING = b"cfl-release-note:0f" + b"0" * 62
KEY = bytes(range(32))


@functools.cache
def plaintext(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def seal(data: bytes, key: bytes = KEY, binding: bytes = BINDING, piece: int | None = None) -> bytes:
    encryptor = SegmentedEncryptor(key, binding)
    out = [encryptor.header()]
    step = piece or max(len(data), 1)
    out += [encryptor.update(data[at : at + step]) for at in range(0, len(data), step)]
    out.append(encryptor.finalize())
    return b"".join(out)


@functools.cache
def sealed(size: int) -> bytes:
    return seal(plaintext(size))


def open_all(ciphertext: bytes, key: bytes = KEY, binding: bytes = BINDING) -> bytes:
    return b"".join(decrypt_all(io.BytesIO(ciphertext), key, binding))


def reader(ciphertext: bytes) -> Callable[[int, int], bytes]:
    return lambda offset, length: ciphertext[offset : offset + length]


def open_range(
    ciphertext: bytes, offset: int, length: int, key: bytes = KEY, binding: bytes = BINDING
) -> bytes:
    return decrypt_range(reader(ciphertext), len(ciphertext), key, binding, offset, length)


def segments_of(ciphertext: bytes) -> tuple[bytes, list[bytes]]:
    body = ciphertext[HEADER_SIZE:]
    return ciphertext[:HEADER_SIZE], [
        body[at : at + CIPHERTEXT_SEGMENT_SIZE] for at in range(0, len(body), CIPHERTEXT_SEGMENT_SIZE)
    ]


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x80]) + data[at + 1 :]


def ring(*ids: str) -> KeyRing:
    return KeyRing.parse("\n".join(generate_key_line(kek_id) for kek_id in ids))


def refuses(action: Callable[[], object]) -> VaultError:
    with pytest.raises(VaultError) as caught:
        action()
    return caught.value


# --- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_an_object_fed_whole_decrypts_to_its_plaintext(size: int) -> None:
    assert open_all(sealed(size)) == plaintext(size)


@pytest.mark.parametrize("size", SIZES)
def test_the_ciphertext_size_gives_the_plaintext_size(size: int) -> None:
    ciphertext = sealed(size)
    count = max(1, -(-size // SEGMENT_SIZE))
    assert len(ciphertext) == HEADER_SIZE + size + 16 * count
    assert segment_count(len(ciphertext)) == count
    assert plaintext_size(len(ciphertext)) == size


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.sampled_from(SIZES), cuts=st.lists(st.integers(min_value=0, max_value=4 * MIB), max_size=12))
def test_an_object_fed_in_pieces_of_any_size_decrypts_to_its_plaintext(size: int, cuts: list[int]) -> None:
    data = plaintext(size)
    points = sorted({cut % (size + 1) for cut in cuts} | {0, size})
    encryptor = SegmentedEncryptor(KEY, BINDING)
    out = [encryptor.header()]
    emitted = 0
    for start, stop in itertools.pairwise(points):
        out.append(encryptor.update(data[start:stop]))
        emitted += len(out[-1])
        assert emitted % CIPHERTEXT_SEGMENT_SIZE == 0
        held_back = stop - emitted // CIPHERTEXT_SEGMENT_SIZE * SEGMENT_SIZE
        assert held_back <= SEGMENT_SIZE
    out.append(encryptor.finalize())
    ciphertext = b"".join(out)
    assert len(ciphertext) == len(sealed(size))
    assert open_all(ciphertext) == data


def test_an_object_fed_one_byte_at_a_time_decrypts() -> None:
    data = plaintext(SEGMENT_SIZE + 300)[: SEGMENT_SIZE + 300]
    encryptor = SegmentedEncryptor(KEY, BINDING)
    out = [encryptor.header()]
    out += [encryptor.update(data[at : at + 1]) for at in range(len(data))]
    out.append(encryptor.finalize())
    assert open_all(b"".join(out)) == data


def test_the_encryptor_takes_memoryviews_and_bytearrays() -> None:
    data = plaintext(SEGMENT_SIZE * 2 + 5)
    encryptor = SegmentedEncryptor(KEY, BINDING)
    out = [encryptor.header(), encryptor.update(memoryview(data)[:100])]
    out.append(encryptor.update(bytearray(data[100:])))
    out.append(encryptor.finalize())
    assert open_all(b"".join(out)) == data


def test_two_objects_with_the_same_key_and_plaintext_differ() -> None:
    assert seal(b"release notes") != seal(b"release notes")


def test_an_empty_object_is_a_header_and_one_empty_authenticated_segment() -> None:
    ciphertext = sealed(0)
    assert len(ciphertext) == HEADER_SIZE + 16
    assert open_all(ciphertext) == b""
    with pytest.raises(VaultError):
        open_all(ciphertext[:-1])


def test_decrypt_all_copes_with_a_stream_that_returns_short_reads() -> None:
    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def read(self, size: int = -1) -> bytes:
            return self._data.read(min(size, 1000))

    data = plaintext(3 * SEGMENT_SIZE)
    assert b"".join(decrypt_all(Trickle(seal(data)), KEY, BINDING)) == data


def test_the_object_format_is_as_documented() -> None:
    """Decrypt with nothing but AES-GCM and HKDF, as a reader in another language would."""
    data = plaintext(SEGMENT_SIZE + 10)
    header, segments = segments_of(seal(data))
    assert header[:5] == b"CFLV\x01"
    segment_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=header[5:], info=b"cfl-sftp vault segment key v1"
    ).derive(KEY)
    aead = AESGCM(segment_key)
    first = aead.decrypt(bytes(11) + b"\x00", segments[0], header + BINDING)
    last = aead.decrypt((1).to_bytes(11, "big") + b"\x01", segments[1], header + BINDING)
    assert first + last == data


def test_the_encryptor_refuses_to_go_on_after_finalize() -> None:
    encryptor = SegmentedEncryptor(KEY, BINDING)
    encryptor.finalize()
    with pytest.raises(ValueError, match="after finalize"):
        encryptor.update(b"x")
    with pytest.raises(ValueError, match="twice"):
        encryptor.finalize()


def test_a_data_key_of_the_wrong_length_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SegmentedEncryptor(KEY[:16], BINDING)


def test_new_data_keys_are_32_random_bytes() -> None:
    assert len(new_data_key()) == 32
    assert new_data_key() != new_data_key()


# --- random access -----------------------------------------------------------------------------------------

BIG = 5 * SEGMENT_SIZE + 777


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=BIG + 10), st.integers(min_value=0, max_value=BIG + 10))
def test_any_range_decrypts_to_the_same_bytes_as_the_plaintext(offset: int, length: int) -> None:
    assert open_range(sealed(BIG), offset, length) == plaintext(BIG)[offset : offset + length]


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, SEGMENT_SIZE),
        (SEGMENT_SIZE, SEGMENT_SIZE),
        (SEGMENT_SIZE - 1, 2),
        (5 * SEGMENT_SIZE, 777),
        (5 * SEGMENT_SIZE + 776, 100),
        (BIG, 10),
        (BIG + 100, 10),
        (123, 0),
        (0, BIG),
    ],
)
def test_ranges_at_the_segment_boundaries_and_the_end_decrypt(offset: int, length: int) -> None:
    assert open_range(sealed(BIG), offset, length) == plaintext(BIG)[offset : offset + length]


def test_a_range_reads_only_the_header_and_the_segments_it_needs() -> None:
    ciphertext = sealed(BIG)
    reads: list[tuple[int, int]] = []

    def read_at(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return ciphertext[offset : offset + length]

    decrypt_range(read_at, len(ciphertext), KEY, BINDING, 2 * SEGMENT_SIZE + 10, SEGMENT_SIZE)
    assert reads == [(0, HEADER_SIZE), (ciphertext_offset_of_segment(2), 2 * CIPHERTEXT_SEGMENT_SIZE)]


def test_a_range_past_the_end_reads_nothing() -> None:
    def read_at(offset: int, length: int) -> bytes:
        raise AssertionError("read")

    assert decrypt_range(read_at, len(sealed(BIG)), KEY, BINDING, BIG, 100) == b""


def test_a_negative_offset_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="negative"):
        open_range(sealed(1), -1, 1)


def test_segments_decrypt_one_at_a_time_in_any_order() -> None:
    header, segments = segments_of(sealed(BIG))
    decryptor = SegmentedDecryptor(KEY, BINDING, header)
    order = [5, 0, 3, 1, 4, 2]
    pieces = {i: decryptor.decrypt_segment(i, segments[i], is_last=i == 5) for i in order}
    assert b"".join(pieces[i] for i in range(6)) == plaintext(BIG)
    assert decrypt_segment(KEY, BINDING, header, 5, segments[5], is_last=True) == pieces[5]


def test_segment_offsets_follow_the_fixed_layout() -> None:
    assert ciphertext_offset_of_segment(0) == HEADER_SIZE
    assert ciphertext_offset_of_segment(3) == HEADER_SIZE + 3 * (SEGMENT_SIZE + 16)


@pytest.mark.parametrize(
    "size", [0, HEADER_SIZE, HEADER_SIZE + 15, HEADER_SIZE + CIPHERTEXT_SEGMENT_SIZE + 3]
)
def test_a_ciphertext_size_no_object_can_have_is_refused(size: int) -> None:
    refuses(lambda: plaintext_size(size))


# --- tampering ---------------------------------------------------------------------------------------------

TAMPERED = 3 * SEGMENT_SIZE + 100  # four segments, the last one short


def tamper_cases() -> dict[str, Callable[[bytes], bytes]]:
    def segment_at(i: int) -> int:
        return ciphertext_offset_of_segment(i)

    def swap(ciphertext: bytes, i: int, j: int) -> bytes:
        header, segments = segments_of(ciphertext)
        segments[i], segments[j] = segments[j], segments[i]
        return header + b"".join(segments)

    other = seal(plaintext(TAMPERED)[::-1])  # same key and binding, another object

    return {
        "magic": lambda c: flip(c, 0),
        "version": lambda c: flip(c, 4),
        "salt": lambda c: flip(c, HEADER_SIZE - 1),
        "first-segment-first-byte": lambda c: flip(c, segment_at(0)),
        "middle-segment-byte": lambda c: flip(c, segment_at(1) + 5000),
        "middle-segment-tag": lambda c: flip(c, segment_at(2) - 1),
        "last-segment-byte": lambda c: flip(c, segment_at(3)),
        "last-segment-tag": lambda c: flip(c, len(c) - 1),
        "last-segment-dropped": lambda c: c[: segment_at(3)],
        "truncated-inside-a-segment": lambda c: c[: segment_at(2) + 100],
        "one-byte-short": lambda c: c[:-1],
        "segment-appended": lambda c: c + c[segment_at(1) : segment_at(2)],
        "byte-appended": lambda c: c + b"\x00",
        "two-segments-swapped": lambda c: swap(c, 0, 1),
        "segment-from-another-object": lambda c: (
            c[: segment_at(1)] + other[segment_at(1) : segment_at(2)] + c[segment_at(2) :]
        ),
        "header-from-another-object": lambda c: other[:HEADER_SIZE] + c[HEADER_SIZE:],
    }


TAMPER_CASES = tamper_cases()


@pytest.mark.parametrize("case", sorted(TAMPER_CASES))
def test_a_tampered_object_does_not_decrypt(case: str) -> None:
    ciphertext = TAMPER_CASES[case](sealed(TAMPERED))
    refuses(lambda: open_all(ciphertext))


@pytest.mark.parametrize("case", sorted(TAMPER_CASES))
def test_a_tampered_object_does_not_decrypt_by_ranges(case: str) -> None:
    ciphertext = TAMPER_CASES[case](sealed(TAMPERED))

    def read_everything() -> bytes:
        size = plaintext_size(len(ciphertext))
        return b"".join(open_range(ciphertext, at, 40_000) for at in range(0, size + 1, 40_000))

    refuses(read_everything)


def test_a_segment_is_not_released_when_its_own_tag_fails() -> None:
    ciphertext = flip(sealed(TAMPERED), ciphertext_offset_of_segment(1) + 3)
    assert open_range(ciphertext, 0, SEGMENT_SIZE) == plaintext(TAMPERED)[:SEGMENT_SIZE]
    refuses(lambda: open_range(ciphertext, SEGMENT_SIZE - 10, 20))


def test_an_object_does_not_decrypt_under_another_binding() -> None:
    ciphertext = sealed(TAMPERED)
    refuses(lambda: open_all(ciphertext, binding=b"cfl-release-note:another-image"))
    refuses(lambda: open_range(ciphertext, 0, 10, binding=b""))


def test_an_object_does_not_decrypt_under_another_data_key() -> None:
    ciphertext = sealed(TAMPERED)
    refuses(lambda: open_all(ciphertext, key=new_data_key()))
    refuses(lambda: open_range(ciphertext, 0, 10, key=new_data_key()))


def test_a_refusal_shows_users_nothing_but_a_generic_message() -> None:
    error = refuses(lambda: open_all(flip(sealed(TAMPERED), 100)))
    assert str(error) == error.public_message == VaultError.public_message
    assert any("did not authenticate" in note for note in error.__notes__)


# --- key rings ---------------------------------------------------------------------------------------------

KEY_A = base64.b64encode(b"A" * 32).decode()
KEY_B = base64.b64encode(b"B" * 32).decode()


def test_a_key_ring_skips_blank_lines_and_comments_and_wraps_with_its_first_key() -> None:
    keyring = KeyRing.parse(f"# the vault's keys\n\nkek-2 {KEY_B}\n   # old\nkek-1 {KEY_A}\n")
    assert keyring.wrapping_key_id == "kek-2"
    assert keyring.key_ids == ("kek-2", "kek-1")
    assert "kek-1" in keyring
    assert "kek-3" not in keyring


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (f"kek-1 {KEY_A}\n\nkek-2 !!!!\n", 3),
        (f"kek-1 {base64.b64encode(b'x' * 16).decode()}\n", 1),
        (f"# ring\nkek-1 {KEY_A}\nkek-1 {KEY_B}\n", 3),
        (f"kek/1 {KEY_A}\n", 1),
        (f"kek-1 {KEY_A} extra\n", 1),
        (f"kek-1 {KEY_A}\nkek-2\n", 2),
        (f"{'k' * 65} {KEY_A}\n", 1),
        ("# only a comment\n\n", 1),
    ],
    ids=["bad-base64", "short-key", "duplicate-id", "bad-id", "three-fields", "no-key", "long-id", "empty"],
)
def test_a_bad_key_ring_names_the_line_at_fault(text: str, line: int) -> None:
    with pytest.raises(ValueError, match=rf"^line {line}: ") as caught:
        KeyRing.parse(text)
    assert KEY_A not in str(caught.value)
    assert KEY_B not in str(caught.value)


def test_a_duplicate_key_id_names_both_lines() -> None:
    with pytest.raises(ValueError, match="line 4: key id 'kek-1' is already on line 2"):
        KeyRing.parse(f"\nkek-1 {KEY_A}\nkek-2 {KEY_B}\nkek-1 {KEY_B}\n")


def test_a_key_ring_never_shows_its_keys() -> None:
    keyring = KeyRing.parse(f"kek-1 {KEY_A}\n")
    assert KEY_A not in repr(keyring)
    assert "A" * 32 not in repr(keyring)


def test_generated_key_lines_parse_into_distinct_keys() -> None:
    first, second = generate_key_line("kek-1"), generate_key_line("kek-2")
    assert first.startswith("kek-1 ")
    assert first.split()[1] != second.split()[1]
    assert KeyRing.parse(f"{first}\n{second}\n").key_ids == ("kek-1", "kek-2")


def test_generate_key_line_refuses_a_bad_key_id() -> None:
    with pytest.raises(ValueError, match="not a key id"):
        generate_key_line("kek 1")


# --- wrapped keys ------------------------------------------------------------------------------------------

CONTEXT = b"cfl-release-note:" + b"ab" * 32


def test_a_wrapped_key_unwraps_with_its_context() -> None:
    keyring = ring("kek-1")
    data_key = new_data_key()
    wrapped = keyring.wrap(data_key, CONTEXT)
    assert wrapped.kek_id == "kek-1"
    assert data_key not in wrapped.blob
    assert keyring.unwrap(wrapped, CONTEXT) == data_key


def test_a_wrapped_key_survives_its_database_column() -> None:
    keyring = ring("kek-1")
    data_key = new_data_key()
    text = keyring.wrap(data_key, CONTEXT).to_str()
    assert text.startswith("kek-1:")
    assert keyring.unwrap(WrappedKey.from_str(text), CONTEXT) == data_key


@pytest.mark.parametrize("text", ["", "kek-1", "kek 1:AAAA", "kek-1:!!!!", ":AAAA"])
def test_a_column_that_is_not_a_wrapped_key_is_refused(text: str) -> None:
    refuses(lambda: WrappedKey.from_str(text))


def test_wrapping_twice_gives_different_blobs() -> None:
    keyring = ring("kek-1")
    data_key = new_data_key()
    assert keyring.wrap(data_key, CONTEXT) != keyring.wrap(data_key, CONTEXT)


def test_a_wrapped_key_does_not_unwrap_for_another_context() -> None:
    keyring = ring("kek-1")
    wrapped = keyring.wrap(new_data_key(), CONTEXT)
    refuses(lambda: keyring.unwrap(wrapped, b"cfl-release-note:" + b"cd" * 32))


def test_a_ring_that_lacks_the_key_id_does_not_unwrap() -> None:
    wrapped = ring("kek-1").wrap(new_data_key(), CONTEXT)
    error = refuses(lambda: ring("kek-2").unwrap(wrapped, CONTEXT))
    assert any("kek-1" in note for note in error.__notes__)


def test_a_ring_with_the_same_key_id_but_another_key_does_not_unwrap() -> None:
    wrapped = ring("kek-1").wrap(new_data_key(), CONTEXT)
    refuses(lambda: ring("kek-1").unwrap(wrapped, CONTEXT))


@pytest.mark.parametrize("at", [0, 1, 20, 60])
def test_an_altered_wrapped_key_does_not_unwrap(at: int) -> None:
    keyring = ring("kek-1")
    wrapped = keyring.wrap(new_data_key(), CONTEXT)
    refuses(lambda: keyring.unwrap(WrappedKey(wrapped.kek_id, flip(wrapped.blob, at)), CONTEXT))


def test_a_wrapped_key_relabelled_to_another_kek_of_the_ring_does_not_unwrap() -> None:
    keyring = KeyRing.parse(f"kek-2 {KEY_A}\nkek-1 {KEY_A}\n")
    wrapped = keyring.wrap(new_data_key(), CONTEXT)
    refuses(lambda: keyring.unwrap(WrappedKey("kek-1", wrapped.blob), CONTEXT))


def test_a_rotated_ring_still_unwraps_old_wraps_and_wraps_under_the_new_key() -> None:
    old_line, new_line = generate_key_line("kek-1"), generate_key_line("kek-2")
    data_key = new_data_key()
    wrapped = KeyRing.parse(old_line).wrap(data_key, CONTEXT)

    rotated = KeyRing.parse(f"{new_line}\n{old_line}\n")
    assert rotated.unwrap(wrapped, CONTEXT) == data_key
    assert rotated.wrap(data_key, CONTEXT).kek_id == "kek-2"


def test_a_key_rewrapped_during_rotation_opens_once_the_old_key_is_dropped() -> None:
    old_line, new_line = generate_key_line("kek-1"), generate_key_line("kek-2")
    data_key = new_data_key()
    wrapped = KeyRing.parse(old_line).wrap(data_key, CONTEXT)

    rewrapped = KeyRing.parse(f"{new_line}\n{old_line}\n").rewrap(wrapped, CONTEXT)
    finished = KeyRing.parse(new_line)
    assert rewrapped.kek_id == "kek-2"
    assert finished.unwrap(rewrapped, CONTEXT) == data_key
    refuses(lambda: finished.unwrap(wrapped, CONTEXT))


def test_a_sealed_note_opens_only_through_its_wrapped_key_and_context() -> None:
    """The pieces together, as storage uses them: seal, wrap, store; unwrap, open a range."""
    keyring = ring("kek-1")
    data_key = new_data_key()
    note = b"# Release notes\nFixes the tariff switch at midnight.\n"
    column = keyring.wrap(data_key, CONTEXT).to_str()
    ciphertext = seal(note, key=data_key, binding=b"object-1")

    opened = keyring.unwrap(WrappedKey.from_str(column), CONTEXT)
    assert open_range(ciphertext, 2, 15, key=opened, binding=b"object-1") == note[2:17]
    refuses(lambda: open_range(ciphertext, 0, 10, key=opened, binding=b"object-2"))

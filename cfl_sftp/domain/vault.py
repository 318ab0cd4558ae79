"""The release-note vault's cryptography (SPEC 7): key rings, wrapped data keys, segmented streaming AEAD.

Every sealed object (a release note, an upload being spooled, a held package) is encrypted under its own
random 32-byte data key, and the data key is stored only wrapped by a key-encryption key (KEK) of the
:class:`KeyRing`. Destroying an object's wrapped key destroys the object, and rotating the KEK re-wraps
61-byte keys rather than re-encrypting files.

The object itself is AES-256-GCM in segments of at most 64 KiB of plaintext, each authenticated on its own
(the STREAM construction, as in Tink's AES-GCM-HKDF streaming AEAD), so a reader can seek to any segment and
release its plaintext as soon as that segment, and nothing else, has authenticated. The format, version 1::

    header   = "CFLV" || 0x01 || salt                    37 bytes; salt: 32 random bytes per object
    segment  = AES-256-GCM(segment key, nonce, plaintext, aad) = ciphertext || 16-byte tag
    object   = header || segment 0 || segment 1 || ... || segment n-1

    segment key = HKDF-SHA256(ikm = data key, salt = salt, info = "cfl-sftp vault segment key v1", L = 32)
    nonce       = segment index (11 bytes, big-endian) || 0x01 on the last segment, 0x00 on the others
    aad         = header || binding

Every segment but the last holds exactly 64 KiB of plaintext (65,552 bytes of ciphertext); the last holds 0 to
64 KiB, and an empty object is one empty last segment. So the ciphertext's size alone gives the plaintext's
size and every segment's offset. What each part defeats: the index in the nonce, reordering; the last flag,
truncation at a segment boundary and appended segments; the per-object salt (hence key), moving segments
between objects even under one data key; the caller's ``binding`` (the object's identity) in the AAD, moving
a whole object to another identity; the tag, any altered byte. Each failure is a :class:`VaultError`.

This module opens no file and writes nothing anywhere. It returns plaintext to its caller and nowhere else:
callers must keep plaintext in memory only, never in a file, a temporary file, a log or the database (SPEC 7).
Reading the ciphertext (``read_at`` callables, binary streams) and storing it and the wrapped keys are the
``storage`` layer's work.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cfl_sftp.domain.errors import VaultError

DATA_KEY_SIZE = 32
"""Data keys and KEKs are AES-256 keys."""

SEGMENT_SIZE = 64 * 1024
"""Plaintext bytes in every segment but the last."""

TAG_SIZE = 16
CIPHERTEXT_SEGMENT_SIZE = SEGMENT_SIZE + TAG_SIZE

MAGIC = b"CFLV"
FORMAT_VERSION = 1
SALT_SIZE = 32
HEADER_SIZE = len(MAGIC) + 1 + SALT_SIZE

KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")

_SEGMENT_KEY_INFO = b"cfl-sftp vault segment key v1"
_INDEX_SIZE = 11
_WRAP_LABEL = b"cfl-sftp vault key wrap v1\x00"
_WRAP_FORMAT = 1
_WRAP_NONCE_SIZE = 12
_WRAPPED_BLOB_SIZE = 1 + _WRAP_NONCE_SIZE + DATA_KEY_SIZE + TAG_SIZE


def _refusal(detail: str) -> VaultError:
    """A :class:`VaultError` whose public message stays generic; ``detail`` is a note for logs and tests."""
    error = VaultError()
    error.add_note(detail)
    return error


def _check_key(key: bytes, what: str) -> None:
    if len(key) != DATA_KEY_SIZE:
        raise ValueError(f"{what} is {DATA_KEY_SIZE} bytes, not {len(key)}")


def new_data_key() -> bytes:
    """A fresh random data key for one object."""
    return secrets.token_bytes(DATA_KEY_SIZE)


# --- key-encryption keys -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A data key encrypted under the KEK ``kek_id``: ``blob`` is 0x01 || 12-byte nonce || AES-GCM output.

    Storage keeps ``kek_id`` in its own indexed column as well, so rotation can find the keys still under an
    old KEK.
    """

    kek_id: str
    blob: bytes

    def to_str(self) -> str:
        """``<kek id>:<base64 blob>`` (about 90 characters) for one text column."""
        return f"{self.kek_id}:{base64.b64encode(self.blob).decode('ascii')}"

    @classmethod
    def from_str(cls, text: str) -> WrappedKey:
        """The inverse of :meth:`to_str`; :class:`VaultError` when the text is not one."""
        kek_id, colon, encoded = text.partition(":")
        if not colon or not KEY_ID_PATTERN.fullmatch(kek_id):
            raise _refusal("wrapped key: not '<kek id>:<base64>'")
        try:
            blob = base64.b64decode(encoded.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error):
            raise _refusal("wrapped key: bad base64") from None
        return cls(kek_id=kek_id, blob=blob)


def _wrap_aad(kek_id: str, context: bytes) -> bytes:
    """The label, the KEK's id and the caller's context: a wrapped key opens only where it was wrapped for."""
    return _WRAP_LABEL + kek_id.encode("ascii") + b"\x00" + context


class KeyRing:
    """The KEKs this node holds: the first wraps, every one unwraps (SPEC 7).

    Parsed from the key-ring file's text; the key material never leaves this object (``repr`` shows only the
    ids), and no error message quotes it.
    """

    __slots__ = ("_keks", "_key_ids")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("a key ring holds at least one key")
        keks: dict[str, AESGCM] = {}
        for kek_id, key in keys:
            if not KEY_ID_PATTERN.fullmatch(kek_id):
                raise ValueError(f"{kek_id!r} is not a key id ([A-Za-z0-9._-], 1 to 64 characters)")
            if kek_id in keks:
                raise ValueError(f"key id {kek_id!r} appears twice")
            _check_key(key, f"key {kek_id!r}")
            keks[kek_id] = AESGCM(key)
        self._keks = keks
        self._key_ids = tuple(kek_id for kek_id, _ in keys)

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """One ``<key id> <base64 of 32 bytes>`` per line; blank lines and ``#`` comments are skipped.

        A ``ValueError`` names the 1-based line at fault (never its key).
        """
        keys: list[tuple[str, bytes]] = []
        first_line: dict[str, int] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(f"line {number}: expected '<key id> <base64 key>'")
            kek_id, encoded = fields
            if not KEY_ID_PATTERN.fullmatch(kek_id):
                raise ValueError(f"line {number}: a key id is 1 to 64 of A-Z a-z 0-9 . _ -")
            if kek_id in first_line:
                raise ValueError(f"line {number}: key id {kek_id!r} is already on line {first_line[kek_id]}")
            try:
                key = base64.b64decode(encoded.encode("ascii"), validate=True)
            except (UnicodeEncodeError, binascii.Error):
                raise ValueError(f"line {number}: key {kek_id!r} is not base64") from None
            if len(key) != DATA_KEY_SIZE:
                raise ValueError(f"line {number}: key {kek_id!r} is {len(key)} bytes, not {DATA_KEY_SIZE}")
            first_line[kek_id] = number
            keys.append((kek_id, key))
        if not keys:
            raise ValueError("line 1: the key ring holds no key")
        return cls(keys)

    @property
    def wrapping_key_id(self) -> str:
        """The id of the KEK that wraps new data keys: the ring's first."""
        return self._key_ids[0]

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every KEK id, the wrapping one first."""
        return self._key_ids

    def __contains__(self, kek_id: object) -> bool:
        return kek_id in self._keks

    def wrap(self, data_key: bytes, context: bytes) -> WrappedKey:
        """Encrypt ``data_key`` under the wrapping KEK, bound to ``context`` (AES-256-GCM, random nonce)."""
        _check_key(data_key, "a data key")
        kek_id = self.wrapping_key_id
        nonce = secrets.token_bytes(_WRAP_NONCE_SIZE)
        sealed = self._keks[kek_id].encrypt(nonce, data_key, _wrap_aad(kek_id, context))
        return WrappedKey(kek_id=kek_id, blob=bytes([_WRAP_FORMAT]) + nonce + sealed)

    def unwrap(self, wrapped: WrappedKey, context: bytes) -> bytes:
        """The data key; :class:`VaultError` for a KEK the ring lacks, another context or an altered byte."""
        kek = self._keks.get(wrapped.kek_id)
        if kek is None:
            raise _refusal(f"no key {wrapped.kek_id!r} in the key ring")
        blob = wrapped.blob
        if len(blob) != _WRAPPED_BLOB_SIZE or blob[0] != _WRAP_FORMAT:
            raise _refusal("wrapped key: unknown format")
        nonce, sealed = blob[1 : 1 + _WRAP_NONCE_SIZE], blob[1 + _WRAP_NONCE_SIZE :]
        try:
            return kek.decrypt(nonce, sealed, _wrap_aad(wrapped.kek_id, context))
        except InvalidTag:
            raise _refusal(f"wrapped key under {wrapped.kek_id!r} did not authenticate") from None

    def rewrap(self, wrapped: WrappedKey, context: bytes) -> WrappedKey:
        """``wrapped``'s data key wrapped anew under the wrapping KEK, for ``vault rotate-key``."""
        return self.wrap(self.unwrap(wrapped, context), context)

    def __repr__(self) -> str:
        return f"KeyRing(key_ids={self._key_ids!r})"


def generate_key_line(key_id: str) -> str:
    """A new key-ring line ``<key id> <base64 of 32 random bytes>``, without a newline."""
    if not KEY_ID_PATTERN.fullmatch(key_id):
        raise ValueError(f"{key_id!r} is not a key id ([A-Za-z0-9._-], 1 to 64 characters)")
    return f"{key_id} {base64.b64encode(secrets.token_bytes(DATA_KEY_SIZE)).decode('ascii')}"


# --- segmented AEAD ----------------------------------------------------------------------------------------


def _segment_cipher(data_key: bytes, header: bytes) -> AESGCM:
    """The object's own AES key: random salts make it unique even if a data key were ever reused."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=DATA_KEY_SIZE, salt=header[-SALT_SIZE:], info=_SEGMENT_KEY_INFO
    )
    return AESGCM(hkdf.derive(data_key))


def _nonce(index: int, is_last: bool) -> bytes:
    return index.to_bytes(_INDEX_SIZE, "big") + (b"\x01" if is_last else b"\x00")


class SegmentedEncryptor:
    """Encrypts one object fed in pieces of any size: ``header()``, then ``update()`` as bytes arrive, then
    ``finalize()`` once; the concatenation of what they return is the object.

    It holds back at most one segment of plaintext, because a segment can be sealed as "not last" only once
    a byte after it is known to exist.
    """

    __slots__ = ("_aad", "_buffer", "_cipher", "_finished", "_header", "_index")

    def __init__(self, data_key: bytes, binding: bytes) -> None:
        _check_key(data_key, "a data key")
        self._header = MAGIC + bytes([FORMAT_VERSION]) + secrets.token_bytes(SALT_SIZE)
        self._cipher = _segment_cipher(data_key, self._header)
        self._aad = self._header + binding
        self._buffer = bytearray()
        self._index = 0
        self._finished = False

    def header(self) -> bytes:
        """The object's first bytes."""
        return self._header

    def _seal(self, plaintext: bytes | bytearray | memoryview, is_last: bool) -> bytes:
        sealed = self._cipher.encrypt(_nonce(self._index, is_last), plaintext, self._aad)
        self._index += 1
        return sealed

    def update(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """The ciphertext of every segment that ``plaintext`` completes (often empty)."""
        if self._finished:
            raise ValueError("update() after finalize()")
        view = memoryview(plaintext).cast("B")
        buffer = self._buffer
        if len(buffer) + len(view) <= SEGMENT_SIZE:
            buffer += view
            return b""
        out: list[bytes] = []
        if buffer:
            fill = SEGMENT_SIZE - len(buffer)
            buffer += view[:fill]
            view = view[fill:]
            out.append(self._seal(buffer, is_last=False))
            buffer.clear()
        while len(view) > SEGMENT_SIZE:
            out.append(self._seal(view[:SEGMENT_SIZE], is_last=False))
            view = view[SEGMENT_SIZE:]
        buffer += view
        return b"".join(out)

    def finalize(self) -> bytes:
        """The last segment, flagged last (an empty object's is empty); nothing may follow it."""
        if self._finished:
            raise ValueError("finalize() twice")
        self._finished = True
        sealed = self._seal(self._buffer, is_last=True)
        self._buffer.clear()
        return sealed


class SegmentedDecryptor:
    """Opens the segments of one object, in any order, given its header: the key is derived once."""

    __slots__ = ("_aad", "_cipher")

    def __init__(self, data_key: bytes, binding: bytes, header: bytes) -> None:
        _check_key(data_key, "a data key")
        if len(header) != HEADER_SIZE or header[: len(MAGIC)] != MAGIC:
            raise _refusal("not a sealed object (bad header)")
        if header[len(MAGIC)] != FORMAT_VERSION:
            raise _refusal(f"sealed object format {header[len(MAGIC)]} is not supported")
        header = bytes(header)
        self._cipher = _segment_cipher(data_key, header)
        self._aad = header + binding

    def decrypt_segment(self, index: int, segment_ciphertext: bytes | memoryview, *, is_last: bool) -> bytes:
        """Segment ``index``'s plaintext, only once its tag has checked."""
        size = len(segment_ciphertext)
        if (
            index < 0
            or size > CIPHERTEXT_SEGMENT_SIZE
            or size < TAG_SIZE
            or (not is_last and size != CIPHERTEXT_SEGMENT_SIZE)
        ):
            raise _refusal(f"segment {index}: impossible size {size}")
        try:
            return self._cipher.decrypt(_nonce(index, is_last), segment_ciphertext, self._aad)
        except InvalidTag:
            raise _refusal(f"segment {index} did not authenticate") from None


def segment_count(ciphertext_size: int) -> int:
    """How many segments an object of ``ciphertext_size`` bytes has; :class:`VaultError` if none can."""
    body = ciphertext_size - HEADER_SIZE
    full, rest = divmod(body, CIPHERTEXT_SEGMENT_SIZE)
    if body < TAG_SIZE or 0 < rest < TAG_SIZE:
        raise _refusal(f"no sealed object is {ciphertext_size} bytes long")
    return full + (1 if rest else 0)


def plaintext_size(ciphertext_size: int) -> int:
    """The plaintext size of an object of ``ciphertext_size`` bytes (before any segment is authenticated)."""
    count = segment_count(ciphertext_size)
    return ciphertext_size - HEADER_SIZE - count * TAG_SIZE


def ciphertext_offset_of_segment(index: int) -> int:
    """Where segment ``index`` starts in the object."""
    if index < 0:
        raise ValueError("segment indices start at 0")
    return HEADER_SIZE + index * CIPHERTEXT_SEGMENT_SIZE


def decrypt_segment(
    data_key: bytes, binding: bytes, header: bytes, index: int, segment_ciphertext: bytes, *, is_last: bool
) -> bytes:
    """One segment's plaintext; prefer a :class:`SegmentedDecryptor` when opening several."""
    decryptor = SegmentedDecryptor(data_key, binding, header)
    return decryptor.decrypt_segment(index, segment_ciphertext, is_last=is_last)


def _read_exactly(read_at: Callable[[int, int], bytes], offset: int, length: int) -> bytes:
    data = read_at(offset, length)
    if len(data) != length:
        raise _refusal(f"short read: {len(data)} of {length} bytes at {offset}")
    return data


def decrypt_range(  # noqa: PLR0917  # the storage layer's reader passes these six in order
    read_at: Callable[[int, int], bytes],
    ciphertext_size: int,
    data_key: bytes,
    binding: bytes,
    offset: int,
    length: int,
) -> bytes:
    """Up to ``length`` plaintext bytes from ``offset``, reading only the segments that hold them.

    ``read_at(offset, length)`` returns that many ciphertext bytes (one call for the header, one for the
    segments). The result is shorter than ``length`` only at the end of the object, and empty from there on.
    Every segment it draws from has authenticated before a byte of it is returned; a segment is decrypted
    whole, so reads aligned to 64 KiB do the least work.
    """
    if offset < 0 or length < 0:
        raise ValueError("offset and length are not negative")
    end = min(offset + length, plaintext_size(ciphertext_size))
    if offset >= end:
        return b""
    decryptor = SegmentedDecryptor(data_key, binding, _read_exactly(read_at, 0, HEADER_SIZE))
    last = segment_count(ciphertext_size) - 1
    first, final = offset // SEGMENT_SIZE, (end - 1) // SEGMENT_SIZE
    start = ciphertext_offset_of_segment(first)
    stop = min(ciphertext_offset_of_segment(final + 1), ciphertext_size)
    ciphertext = memoryview(_read_exactly(read_at, start, stop - start))
    pieces = []
    for index in range(first, final + 1):
        at = (index - first) * CIPHERTEXT_SEGMENT_SIZE
        segment = ciphertext[at : at + CIPHERTEXT_SEGMENT_SIZE]
        pieces.append(decryptor.decrypt_segment(index, segment, is_last=index == last))
    skip, keep = offset - first * SEGMENT_SIZE, end - final * SEGMENT_SIZE
    if first == final:
        return pieces[0][skip:keep]
    pieces[0] = pieces[0][skip:]
    pieces[-1] = pieces[-1][:keep]
    return b"".join(pieces)


class CiphertextStream(Protocol):
    """Anything with a binary ``read``: an open file, a socket file, ``io.BytesIO``."""

    def read(self, size: int, /) -> bytes: ...


def _read_up_to(source: CiphertextStream, size: int) -> bytes:
    """``size`` bytes, or fewer only at the end of the stream (``read`` may return short pieces)."""
    data = source.read(size)
    if len(data) == size or not data:
        return data
    pieces = [data]
    got = len(data)
    while got < size:
        more = source.read(size - got)
        if not more:
            break
        pieces.append(more)
        got += len(more)
    return b"".join(pieces)


def decrypt_all(source: CiphertextStream, data_key: bytes, binding: bytes) -> Iterator[bytes]:
    """A whole object's plaintext, one segment at a time, reading ``source`` from its header to its end.

    Each piece is yielded once its segment has authenticated; whether the object is complete (not truncated,
    nothing appended) is known only at the end, so a :class:`VaultError` may come after some pieces: a caller
    that acts on the whole object must wait for the iteration to finish.
    """
    header = _read_up_to(source, HEADER_SIZE)
    if len(header) != HEADER_SIZE:
        raise _refusal("truncated header")
    decryptor = SegmentedDecryptor(data_key, binding, header)
    index = 0
    current = _read_up_to(source, CIPHERTEXT_SEGMENT_SIZE)
    while True:
        full = len(current) == CIPHERTEXT_SEGMENT_SIZE
        following = _read_up_to(source, CIPHERTEXT_SEGMENT_SIZE) if full else b""
        is_last = not following
        yield decryptor.decrypt_segment(index, current, is_last=is_last)
        if is_last:
            return
        current = following
        index += 1

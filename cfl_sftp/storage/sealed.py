"""Sealed files on disk: release notes in the vault, uploads in progress and held packages in the spool.

Every sealed file has its own random data key (AES-256-GCM in authenticated segments, :mod:`cfl_sftp.domain
.vault`), wrapped by the key ring's wrapping key. The segments are bound to the object's id, so a file swapped
on disk fails; the wrapped key is bound to a ``context`` the caller chooses (for a release note: its image's
SHA-256), so a note moved to another image in the database fails to unwrap. The wrapped keys live in the
``vault_objects`` table; the key-encryption keys never do. A discarded object's file is deleted and its data
key, which existed only in memory and in its row, goes with it.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from cfl_sftp.domain.errors import VaultError
from cfl_sftp.domain.vault import (
    KeyRing,
    SegmentedEncryptor,
    WrappedKey,
    decrypt_range,
    plaintext_size,
)
from cfl_sftp.storage.files import ScratchClaim, WriteBehind, fsync_dir
from cfl_sftp.storage.models import VaultObjectRow

log = structlog.get_logger(__name__)

DATA_KEY_BYTES = 32


def note_context(image_sha256: str) -> bytes:
    return f"cfl-release-note:{image_sha256}".encode()


def spool_context(object_id: str) -> bytes:
    return f"cfl-spool:{object_id}".encode()


@dataclass(frozen=True, slots=True)
class SealedObject:
    """A finished sealed file, ready to be recorded."""

    object_id: str
    kind: str
    path: Path
    data_key: bytes
    plaintext_size: int

    def row(self, keyring: KeyRing, context: bytes, now: dt.datetime) -> VaultObjectRow:
        wrapped = keyring.wrap(self.data_key, context)
        return VaultObjectRow(
            object_id=self.object_id,
            kind=self.kind,
            wrapped_key=wrapped.to_str(),
            kek_id=wrapped.kek_id,
            created_at=now,
        )


class SealedWriter:
    """Encrypts a stream into a new file; ``close()`` fsyncs it and returns the :class:`SealedObject`."""

    def __init__(self, folder: Path, kind: str) -> None:
        self.object_id = secrets.token_hex(16)
        self.kind = kind
        self.path = folder / f"{self.object_id}.sealed"
        self._key = secrets.token_bytes(DATA_KEY_BYTES)
        self._encryptor = SegmentedEncryptor(self._key, self.object_id.encode())
        self._file = self.path.open("xb")
        self._size = 0
        self._writeback = WriteBehind(self._file)  # flushed to disk as it grows: close() has little left to do
        self._file.write(self._encryptor.header())

    @property
    def plaintext_size(self) -> int:
        return self._size

    def write(self, data: bytes | memoryview) -> None:
        self._size += len(data)
        out = self._encryptor.update(data)
        if out:
            self._file.write(out)
            self._writeback.wrote(len(out))

    def close(self) -> SealedObject:
        self._file.write(self._encryptor.finalize())
        try:
            self._writeback.sync()
        finally:
            self._file.close()
        return SealedObject(self.object_id, self.kind, self.path, self._key, self._size)

    def discard(self) -> None:
        if not self._file.closed:
            self._writeback.stop()
            self._file.close()
        self.path.unlink(missing_ok=True)


class SealedFolder:
    """A folder of sealed files: ``tmp/<owner>/`` while being written (each process in its own, see
    :mod:`cfl_sftp.storage.files`), ``<id[:2]>/<id>.sealed`` once committed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_root = root / "tmp"
        self.tmp = self.tmp_root
        self._claim: ScratchClaim | None = None

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tmp_root.mkdir(exist_ok=True, mode=0o700)

    def use_scratch(self, claim: ScratchClaim) -> None:
        self._claim = claim
        self.tmp = self.tmp_root / claim.owner

    def writer(self, kind: str) -> SealedWriter:
        if self._claim is not None:
            self._claim.acquire()
        self.tmp.mkdir(exist_ok=True, mode=0o700)  # (again, if a sweep took it while this node was cut off)
        return SealedWriter(self.tmp, kind)

    def committed(self) -> Iterator[tuple[str, Path]]:
        """``(object_id, path)`` of every committed object in the folder."""
        for shard in self.root.iterdir():
            if shard.is_dir() and len(shard.name) == 2:
                for path in shard.glob("*.sealed"):
                    yield path.name.removesuffix(".sealed"), path

    def path_of(self, object_id: str) -> Path:
        return self.root / object_id[:2] / f"{object_id}.sealed"

    def commit(self, obj: SealedObject) -> Path:
        """Give a closed object its final name by a hard link (atomic, durable); the caller unlinks the temp
        name once the database has recorded the object, so a failed commit can be tried again."""
        final = self.path_of(obj.object_id)
        final.parent.mkdir(exist_ok=True, mode=0o700)
        os.link(obj.path, final)
        fsync_dir(final.parent)
        return final

    def remove(self, object_id: str) -> None:
        self.path_of(object_id).unlink(missing_ok=True)


def _log_unreadable(object_id: str, exc: VaultError) -> None:
    """Say why a sealed object did not open (the client only hears that the file could not be read). The
    reason names key ids and segment numbers, never key material or plaintext."""
    reason = "; ".join(getattr(exc, "__notes__", ())) or exc.public_message
    log.warning("vault_object_unreadable", object_id=object_id, reason=reason)


class SealedReader:
    """Random-access plaintext reads of one committed object; plaintext stays in memory."""

    def __init__(self, path: Path, object_id: str, data_key: bytes) -> None:
        self._file = path.open("rb")
        self._ciphertext_size = os.fstat(self._file.fileno()).st_size
        self._object_id = object_id
        self._key = data_key
        try:
            self.size = plaintext_size(self._ciphertext_size)
        except VaultError:
            self._file.close()
            raise

    @classmethod
    def open(cls, path: Path, row: VaultObjectRow, keyring: KeyRing, context: bytes) -> SealedReader:
        try:
            return cls(path, row.object_id, keyring.unwrap(WrappedKey.from_str(row.wrapped_key), context))
        except VaultError as exc:
            _log_unreadable(row.object_id, exc)
            raise

    def _read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self._file.fileno(), length, offset)

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        try:
            return decrypt_range(
                self._read_at, self._ciphertext_size, self._key, self._object_id.encode(), offset, length
            )
        except VaultError as exc:
            _log_unreadable(self._object_id, exc)
            raise

    def chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        offset = 0
        while offset < self.size:
            data = self.read(offset, chunk_size)
            if not data:
                break
            offset += len(data)
            yield data

    def close(self) -> None:
        self._file.close()

"""What an SFTP handle points at: a file to read, a package being uploaded, or a staging file being written.

Reads of library images come straight from the content-addressed file with ``pread``; release notes and held
packages are decrypted segment by segment in a worker thread, so plaintext exists only in the reply being built.
Package uploads are fed to the gateway in batches by a worker thread of their own, so the event loop only queues
bytes.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import asyncssh

from cfl_sftp.domain.receipt import Receipt
from cfl_sftp.intake import PackageUpload
from cfl_sftp.staging import StagingWriter

INLINE_READ_LIMIT = 256 * 1024
UPLOAD_BATCH_BYTES = 1 << 20
UPLOAD_BATCHES_IN_FLIGHT = 4


class ReadHandle:
    """A file opened for reading. ``seek`` answers ``ranges@asyncssh.com``: our files have no holes."""

    size: int

    async def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence in (getattr(os, "SEEK_DATA", -1), getattr(os, "SEEK_HOLE", -1)):
            if offset >= self.size:  # as lseek(2): no data at or past the end (the ranges loop stops here)
                raise OSError(errno.ENXIO, "No data past the end of the file")
            return offset if whence == getattr(os, "SEEK_DATA", -1) else self.size
        return offset

    async def close(self) -> None:
        return None


class BytesHandle(ReadHandle):
    """Small bytes held in memory (receipts, manifests, generated listings)."""

    def __init__(self, content: bytes, on_close: Callable[[int], None] | None = None) -> None:
        self._content = content
        self.size = len(content)
        self.bytes_served = 0
        self._on_close = on_close

    async def read(self, offset: int, length: int) -> bytes:
        data = self._content[offset : offset + length]
        self.bytes_served += len(data)
        return data

    async def close(self) -> None:
        if self._on_close is not None:
            self._on_close(self.bytes_served)


class LibraryFileHandle(ReadHandle):
    """An image in the library folder, read with ``pread`` (small reads inline, large ones in a thread)."""

    def __init__(self, path: Path, size: int, on_close: Callable[[int], None] | None = None) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self.size = size
        self.bytes_served = 0
        self._on_close = on_close

    async def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        if length <= INLINE_READ_LIMIT:
            data = os.pread(self._fd, length, offset)
        else:
            data = await asyncio.to_thread(os.pread, self._fd, length, offset)
        self.bytes_served += len(data)
        return data

    async def close(self) -> None:
        os.close(self._fd)
        if self._on_close is not None:
            self._on_close(self.bytes_served)


class RangeReader(Protocol):
    """Plaintext at any offset of a sealed file (``SealedReader``, ``StagingReader``)."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class DecryptingHandle(ReadHandle):
    """A sealed file (release note, held package, staging file) decrypted in memory as it is read."""

    def __init__(self, reader: RangeReader, on_close: Callable[[int], None] | None = None) -> None:
        self._reader = reader
        self.size = reader.size
        self.bytes_served = 0
        self._on_close = on_close

    async def read(self, offset: int, length: int) -> bytes:
        data = await asyncio.to_thread(self._reader.read, offset, length)
        self.bytes_served += len(data)
        return data

    async def close(self) -> None:
        await asyncio.to_thread(self._reader.close)
        if self._on_close is not None:
            self._on_close(self.bytes_served)


@dataclass
class ProcessedName:
    """A ``*.cfl`` the gateway has run on: stat answers its size for a while (SPEC 4, after the verdict)."""

    size: int
    expires: float


def no_ranges(offset: int, whence: int = os.SEEK_SET) -> int:
    """``seek`` of a handle open for writing: ``ranges@asyncssh.com`` answers only on files open for reading."""
    raise asyncssh.SFTPOpUnsupported("Data ranges are answered only for files open for reading")


class PackageHandle:
    """A ``*.cfl`` being uploaded. Writes must come in order (every SFTP client sends them so).

    asyncssh serves a session's requests one at a time, so a WRITE that waits for the gateway's feed stops the
    whole session from reading the next request. Batches therefore go to a worker of this upload's own, which
    keeps their order, and the loop waits only when :data:`UPLOAD_BATCHES_IN_FLIGHT` batches are queued: memory
    stays bounded per upload while the network and the feed (hashing, the encrypted spool, the image file)
    overlap on two cores.
    """

    seek = staticmethod(no_ranges)

    def __init__(self, upload: PackageUpload, name: str) -> None:
        self.upload = upload
        self.name = name
        self.next_offset = 0
        self.out_of_order = False
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._in_flight: deque[asyncio.Future[None]] = deque()
        self._worker: ThreadPoolExecutor | None = None
        self._failed: BaseException | None = None
        self._feed_failed = False  # set by the worker thread

    async def write(self, offset: int, data: bytes) -> None:
        if self._failed is not None:  # a batch was not fed: the package has a hole, and can only be abandoned
            raise self._failed
        if offset != self.next_offset:
            # Never seen from real clients; refuse rather than guess (the close will reject the package).
            self.out_of_order = True
            raise asyncssh.SFTPFailure("Packages are written front to back; this write is out of order.")
        self.next_offset += len(data)
        self._batch.append(data)  # kept as received: no copy on the event loop
        self._batch_bytes += len(data)
        if self._batch_bytes >= UPLOAD_BATCH_BYTES:
            await self._flush()

    def _write_all(self, chunks: list[bytes]) -> None:
        # One piece per batch: the feed's per-call work (tar parsing, sealing, hashing) is paid per MiB, not per
        # WRITE (32 KiB from OpenSSH's sftp); joining costs one memcpy. After a failed batch nothing more is fed:
        # the stream has a hole, and the upload can only be abandoned.
        if self._feed_failed:
            raise asyncssh.SFTPFailure("An earlier part of this package could not be stored")
        try:
            self.upload.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        except BaseException:
            self._feed_failed = True
            raise

    async def _flush(self) -> None:
        """Queue the batch for this upload's worker; wait for the oldest one once too many are queued."""
        while len(self._in_flight) >= UPLOAD_BATCHES_IN_FLIGHT:
            oldest = self._in_flight[0]
            try:
                await asyncio.shield(oldest)  # a cancelled WRITE leaves the batch tracked, for abort to wait on
            except Exception as exc:
                self._failed = exc
                raise
            finally:
                if oldest.done() and self._in_flight and self._in_flight[0] is oldest:
                    self._in_flight.popleft()
        if self._batch:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="cfl-upload")
            loop = asyncio.get_running_loop()
            self._in_flight.append(loop.run_in_executor(self._worker, self._write_all, batch))

    async def drain(self) -> None:
        """Feed what is left; raise the first error of any batch once every batch has finished."""
        if self._failed is None:
            await self._flush()
        failures = [r for r in await self._settle() if isinstance(r, BaseException)]
        if self._failed is not None:
            raise self._failed
        if failures:
            raise failures[0]

    async def _settle(self) -> list[object]:
        pending, self._in_flight = list(self._in_flight), deque()
        try:
            return await asyncio.gather(*pending, return_exceptions=True)
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=False)
                self._worker = None

    async def complete(self) -> Receipt:
        await self.drain()
        return await asyncio.to_thread(self.upload.complete)

    async def abort(self) -> None:
        await self._settle()  # the upload is being thrown away: its batches' errors no longer matter
        await asyncio.to_thread(self.upload.abort)


class StagingHandle:
    """A staging file open for writing (and possibly reading back what earlier sessions wrote)."""

    seek = staticmethod(no_ranges)

    def __init__(self, writer: StagingWriter, *, append: bool = False) -> None:
        self.writer = writer
        self.append = append

    async def write(self, offset: int, data: bytes) -> None:
        if self.append:  # SSH_FXF_APPEND: every write goes to the end, whatever its offset (asyncssh sends 0)
            offset = self.writer.next_offset
        await asyncio.to_thread(self.writer.write, offset, data)

    async def close(self) -> None:
        await asyncio.to_thread(self.writer.close)

    async def abort(self) -> None:
        await asyncio.to_thread(self.writer.abort)

"""The gateway at work: one package upload from its first byte to its receipt (SPEC 4).

A :class:`PackageUpload` is fed the bytes as the client writes them. Each piece goes through the package reader
(which hashes and checks as it goes) and, for the image and release-note members, into a temp image file and a
sealed note; and into the encrypted spool (kept if the package is held). So ``complete()`` has nothing left to
read: it asks the library, decides, and commits.

Each image byte is written to disk once. As soon as the manifest has been read (the package's first member), the
library is asked whether check 9 would hold the package. Only if it would (or the question cannot be answered)
is the whole package spooled; otherwise the spool keeps every byte but the image's content (tar headers, the
manifest, the signature, the release notes, padding: still sealed), and the image goes to its temp file alone.
If the verdict is ``held`` all the same (another session or node added that image or version meanwhile), the
whole package is sealed again at verdict time from the spool and the image file, so every held package is stored
whole and encrypted, as before; only then does the verdict's time grow with the package.

Commit is atomic in the sense of SPEC 4. Files are put in place first (an image under its hash, a sealed note,
a held package), then one database transaction records the rows, the receipt and the audit entry. If that
transaction fails, the files placed for it are removed again; if the process dies in between, the files are
unreferenced and the start-up sweep removes them. When the database refuses an insert because another session
or node added the same image meanwhile, the verdict is taken again, and the package is held.

``complete()`` blocks (disk, fsync, database): the SFTP layer runs it in a worker thread.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cfl_sftp.deployment import Deployment
from cfl_sftp.domain.errors import GatewayRejection, Outcome, Reason
from cfl_sftp.domain.gateway import UploadRules, Verdict, already_in_library, decide, rejected
from cfl_sftp.domain.model import Manifest
from cfl_sftp.domain.package import PackageLimits, PackageReader, ReadPackage
from cfl_sftp.domain.receipt import Receipt, new_upload_id
from cfl_sftp.domain.signature import verify_manifest_signature
from cfl_sftp.policy import PolicySnapshot
from cfl_sftp.storage import audit_store
from cfl_sftp.storage.audit_store import AuditEvent
from cfl_sftp.storage.files import WriteBehind
from cfl_sftp.storage.library_repo import LibraryRepository, image_ref
from cfl_sftp.storage.models import DeviceModelRow, HeldPackageRow, ImageRow, UploadRow, VaultObjectRow
from cfl_sftp.storage.sealed import SealedObject, SealedReader, SealedWriter, note_context, spool_context

log = structlog.get_logger(__name__)

_COMMIT_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Uploader:
    """Who is uploading, as the receipt and the audit entry name them."""

    user: str
    organisation: str
    peer: str


def rules_from(snapshot: PolicySnapshot, deployment: Deployment, organisation: str) -> UploadRules:
    limits = deployment.config.gateway
    return UploadRules(
        uploader_organisation=organisation,
        keys_for_manufacturer=snapshot.keys_for_manufacturer,
        may_upload_for=snapshot.may_upload_for,
        admitted_purposes=limits.admitted_purposes,
        require_product_list=limits.require_product_list,
        in_product_list=snapshot.in_product_list,
    )


class _ImageFile:
    """The image member, written in clear to a temp file (images are not secret), handed to the disk as it grows
    (:class:`~cfl_sftp.storage.files.WriteBehind`), so the feed does not wait for the disk."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("xb")
        self._writeback = WriteBehind(self._file)

    def write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._writeback.wrote(len(data))

    def close(self) -> None:
        """Make the file durable (the verdict may place it in the library) and close it."""
        try:
            self._writeback.sync()
        finally:
            self._file.close()

    def drop(self) -> None:
        """Close without making it durable: it is being thrown away."""
        if not self._file.closed:
            self._writeback.stop()
            self._file.close()


_PACKAGE_HASHERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cfl-package-sha256")
_HASH_BESIDE_BYTES = 64 << 10
"""Smaller pieces are hashed in line: handing them to another thread would cost more than hashing them."""


class _PackageDigest:
    """The package's SHA-256, computed in another thread while the reader parses the same piece, hashes the image
    and writes it: every byte is hashed twice (the package and the image), and the two need not take turns on
    one core. ``hashlib`` releases the GIL while it hashes. At most one piece is in flight per upload, so the
    pieces are hashed in order and an upload's memory stays bounded."""

    def __init__(self) -> None:
        self._sha256 = hashlib.sha256()
        self._pending: Future[None] | None = None

    def update(self, data: bytes, /) -> None:
        self._wait()
        if len(data) < _HASH_BESIDE_BYTES:
            self._sha256.update(data)
        else:
            self._pending = _PACKAGE_HASHERS.submit(self._sha256.update, bytes(data))  # bytes: never mutated

    def hexdigest(self) -> str:
        self._wait()
        return self._sha256.hexdigest()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()


IN_PROGRESS_SUFFIX = ".upload.json"
"""Beside an SFTP upload's temp image: who is uploading what, so that if the node dies, whoever sweeps its scratch
folder can audit the ``partial-upload`` (:mod:`cfl_sftp.recovery`)."""


class PackageUpload:
    """A ``*.cfl`` being written. Feed it with :meth:`write`; end it with :meth:`complete` or :meth:`abort`.

    ``session`` is given for an upload over SFTP: the upload is then announced in the node's scratch folder
    while it is in progress (:data:`IN_PROGRESS_SUFFIX`). ``spool=False`` keeps no spool at all, for a package
    that can only end with :meth:`complete_as_replacement` (a held package being released is already stored)."""

    def __init__(self, deployment: Deployment, uploader: Uploader, file_name: str, *,
                 session: str | None = None, spool: bool = True) -> None:
        self._deployment = deployment
        self.uploader = uploader
        self.file_name = file_name
        self.received_at = dt.datetime.now(dt.UTC)
        limits = deployment.config.gateway
        self._max_bytes = limits.max_package_bytes
        self._spool: SealedWriter | None = deployment.spool.writer("upload") if spool else None
        self._image_left_out = False  # the spool leaves out the image content (see the module docstring)
        self._forecast_asked = False
        self._image_path = deployment.data.new_tmp_path("image")
        self._image_file = _ImageFile(self._image_path)
        self._announcement = self._image_path.with_suffix(IN_PROGRESS_SUFFIX) if session is not None else None
        if self._announcement is not None:
            self._announcement.write_text(json.dumps({
                "user": uploader.user, "organisation": uploader.organisation, "peer": uploader.peer,
                "file_name": file_name, "session": session,
            }))
        self._notes: SealedWriter = deployment.vault.writer("release-note")
        self._reader = PackageReader(
            PackageLimits(limits.max_package_bytes, limits.max_release_notes_bytes),
            image_sink=self._image_file,
            notes_sink=self._notes,
            package_digest=_PackageDigest(),
        )
        self._whole: SealedObject | None = None  # the whole package sealed again at verdict time, if needed
        self._finished = False

    @property
    def size(self) -> int:
        return self._reader.bytes_received

    def write(self, data: bytes) -> None:
        """Take the next bytes of the package, in order. Bytes past the size limit are counted, not kept."""
        start = self._reader.bytes_received
        self._reader.feed(data)
        room = self._max_bytes - start
        if self._spool is None or room <= 0:
            return
        if not self._forecast_asked and self._reader.manifest is not None:
            self._forecast_asked = True
            self._image_left_out = not self._may_be_held(self._reader.manifest)
        self._spool_frame(self._spool, start, memoryview(data)[:room])

    def _spool_frame(self, spool: SealedWriter, start: int, piece: memoryview) -> None:
        """Spool the piece that begins at package offset ``start``, less any image content if that is left out.

        The reader has already been fed the piece, so it knows where the image content lies if it begins here.
        """
        span = self._reader.image_span if self._image_left_out else None
        if span is None:
            spool.write(piece)
            return
        cut_from = min(max(span[0] - start, 0), len(piece))
        cut_to = min(max(span[1] - start, 0), len(piece))
        if cut_from > 0:
            spool.write(piece[:cut_from])
        if cut_to < len(piece):
            spool.write(piece[cut_to:])

    def _may_be_held(self, manifest: Manifest) -> bool:
        """Would check 9 hold a package with this manifest, as the library stands now? True if unsure."""
        try:
            with self._deployment.db.reading() as session:
                return already_in_library(manifest, LibraryRepository(session)) is not None
        except Exception as exc:  # the database is unreachable: spool everything, as the verdict may need it
            log.warning("spool_forecast_failed", file_name=self.file_name, error=type(exc).__name__)
            return True

    def abort(self) -> None:
        """Discard everything: a partial upload never reaches the gateway and leaves nothing behind."""
        if self._finished:
            return
        self._finished = True
        if self._spool is not None:
            self._spool.discard()
        self._notes.discard()
        self._image_file.drop()
        self._image_path.unlink(missing_ok=True)
        if self._announcement is not None:
            self._announcement.unlink(missing_ok=True)

    def complete(self) -> Receipt:
        """Run the gateway on what was written, commit the outcome and return the receipt (blocking)."""
        if self._finished:
            raise RuntimeError("upload already ended")
        if self._spool is None:
            raise RuntimeError("an upload without a spool can only complete as a replacement")
        self._finished = True
        try:
            self._image_file.close()
            spooled = self._spool.close()
            notes = self._notes.close()
        except BaseException:
            self._finished = False
            self.abort()
            raise
        try:
            package: ReadPackage | None = self._reader.finish()
            verdict = None
        except GatewayRejection as exc:
            package, verdict = None, rejected(exc)
        try:
            return self._commit(package, verdict, spooled, notes)
        finally:
            # The verdict does not wait for the filesystem to free a large file's blocks.
            whole = [self._whole.path] if self._whole is not None else []
            for leftover in (self._image_path, spooled.path, notes.path, *whole):
                self._deployment.data.discard(leftover)
            if self._announcement is not None:
                self._announcement.unlink(missing_ok=True)

    # -- committing ------------------------------------------------------------------------------------

    def _decide(self, package: ReadPackage) -> Verdict:
        snapshot = self._deployment.policy()
        rules = rules_from(snapshot, self._deployment, self.uploader.organisation)
        with self._deployment.db.reading() as session:
            return decide(package, rules, LibraryRepository(session))

    def _commit(
        self, package: ReadPackage | None, verdict: Verdict | None, spooled: SealedObject, notes: SealedObject
    ) -> Receipt:
        for _attempt in range(_COMMIT_ATTEMPTS):
            if package is not None:
                verdict = self._decide(package)
            assert verdict is not None
            try:
                if verdict.outcome is Outcome.ACCEPTED:
                    assert package is not None
                    return self._commit_accepted(package, verdict, notes)
                if verdict.outcome is Outcome.HELD:
                    assert package is not None
                    return self._commit_held(package, verdict, spooled)
                return self._commit_rejected(verdict)
            except IntegrityError:
                if package is None:
                    raise
                log.info("gateway_race_retry", file_name=self.file_name)
        raise RuntimeError("the library kept changing during the gateway's commit")

    def _finish_txn(self, session: Session, verdict: Verdict, upload_id: str) -> Receipt:
        """Append the audit entry and the upload row with its receipt, in the caller's transaction."""
        image_path = verdict.image.path if verdict.image is not None else None
        seq = audit_store.append(
            session,
            AuditEvent(
                event="package-received",
                actor=self.uploader.user,
                organisation=self.uploader.organisation,
                peer=self.uploader.peer,
                details={
                    "upload_id": upload_id,
                    "file_name": self.file_name,
                    "size": self.size,
                    "package_sha256": self._reader.package_sha256,
                    "outcome": verdict.outcome.value,
                    "reason": verdict.reason.value,
                    "image_path": image_path,
                },
            ),
        )
        receipt = Receipt(
            upload_id=upload_id,
            file_name=self.file_name,
            uploader=self.uploader.user,
            organisation=self.uploader.organisation,
            received_at=self.received_at,
            size=self.size,
            package_sha256=self._reader.package_sha256,
            outcome=verdict.outcome,
            reason=verdict.reason,
            message=verdict.message,
            image_path=image_path,
            audit_seq=seq,
        )
        session.add(
            UploadRow(
                upload_id=upload_id,
                file_name=self.file_name,
                uploader=self.uploader.user,
                organisation=self.uploader.organisation,
                received_at=self.received_at,
                size=self.size,
                package_sha256=self._reader.package_sha256,
                outcome=verdict.outcome.value,
                reason=verdict.reason.value,
                image_path=image_path,
                audit_seq=seq,
                receipt=receipt.to_json(),
            )
        )
        session.flush()
        log.info(
            "package_received",
            upload_id=upload_id,
            file_name=self.file_name,
            outcome=verdict.outcome.value,
            reason=verdict.reason.value,
            size=self.size,
            audit_seq=seq,
        )
        return receipt

    def _commit_rejected(self, verdict: Verdict) -> Receipt:
        upload_id = new_upload_id(self.received_at)
        with self._deployment.db.writing() as session:
            return self._finish_txn(session, verdict, upload_id)

    def _whole_package(self, spooled: SealedObject) -> SealedObject:
        """The spooled package if it is whole; else the whole package sealed again from the spool and the image
        file (once, whatever the commit attempts), so a held package is stored exactly as it was uploaded."""
        span = self._reader.image_span if self._image_left_out else None
        if span is None:
            return spooled
        if self._whole is None:
            log.info("held_package_respooled", file_name=self.file_name, size=self.size)
            self._whole = _splice(
                self._deployment.spool.writer("upload"), spooled, span[0], self._image_path,
                self._reader.package_sha256,
            )
        return self._whole

    def _commit_held(self, package: ReadPackage, verdict: Verdict, spooled: SealedObject) -> Receipt:
        deployment = self._deployment
        upload_id = new_upload_id(self.received_at)
        now = dt.datetime.now(dt.UTC)
        spooled = self._whole_package(spooled)
        final = deployment.spool.commit(spooled)
        try:
            with deployment.db.writing() as session:
                receipt = self._finish_txn(session, verdict, upload_id)
                repo = LibraryRepository(session)
                assert verdict.image is not None
                m = verdict.image
                conflicting = (
                    repo.image_row_with_sha256(package.manifest.image.sha256)
                    if verdict.reason is Reason.DUPLICATE_IMAGE
                    else repo.current_image_row(m.device_model, m.firmware_version)
                )
                assert conflicting is not None
                session.add(spooled.row(deployment.keyring, spool_context(spooled.object_id), now))
                session.flush()
                session.add(
                    HeldPackageRow(
                        upload_id=upload_id,
                        organisation=self.uploader.organisation,
                        file_name=self.file_name,
                        size=self.size,
                        reason=verdict.reason.value,
                        image_id=conflicting.id,
                        vault_object=spooled.object_id,
                        held_at=now,
                    )
                )
            return receipt
        except BaseException:
            final.unlink(missing_ok=True)
            raise

    def _commit_accepted(self, package: ReadPackage, verdict: Verdict, notes: SealedObject) -> Receipt:
        upload_id = new_upload_id(self.received_at)
        with self._placed_in_library(package, notes):
            with self._deployment.db.writing() as session:
                receipt = self._finish_txn(session, verdict, upload_id)
                add_to_library(session, self._deployment, package, notes, upload_id)
            return receipt

    @contextlib.contextmanager
    def _placed_in_library(self, package: ReadPackage, notes: SealedObject) -> Iterator[None]:
        """Put the image and sealed note in place for the transaction in the block; undo if it fails."""
        deployment = self._deployment
        m = package.manifest
        placed_image = deployment.data.place_image(self._image_path, m.image.sha256)
        note_path = deployment.vault.commit(notes) if m.release_notes is not None else None
        try:
            yield
        except BaseException:
            # Another session may have committed the same image meanwhile and now relies on this file.
            if placed_image and not self._image_recorded(m.image.sha256):
                deployment.data.remove_image(m.image.sha256)
            if note_path is not None:
                note_path.unlink(missing_ok=True)
            raise
        # An orphan sweep may have taken an older, unrecorded copy of these bytes just before our commit (see
        # cfl_sftp.recovery): our temp file still holds them.
        if not deployment.data.image_path(m.image.sha256).exists():
            deployment.data.place_image(self._image_path, m.image.sha256)

    def _image_recorded(self, sha256: str) -> bool:
        try:
            with self._deployment.db.reading() as session:
                return LibraryRepository(session).image_row_with_sha256(sha256) is not None
        except Exception:  # the database is unreachable: keep the file; the library sweep removes strays
            return True

    def complete_as_replacement(self, held_upload_id: str, operator_reason: str) -> ImageRow:
        """Admit this package (a held ``version-conflict``, re-read) in place of the library's current image.

        Checks 1 to 5 run again, so a package whose signing key was withdrawn meanwhile is refused. The old image
        is retired, not deleted; the release is one audited transaction.
        """
        if self._finished:
            raise RuntimeError("upload already ended")
        self._finished = True
        self._image_file.close()
        if self._spool is not None:
            self._spool.discard()
        notes = self._notes.close()
        try:
            package = self._reader.finish()
            m = package.manifest
            verify_manifest_signature(
                package.manifest_bytes,
                package.signature,
                self._deployment.policy().keys_for_manufacturer(m.device_model.manufacturer_id),
            )
            with self._placed_in_library(package, notes):
                with self._deployment.db.writing() as session:
                    repo = LibraryRepository(session)
                    if repo.image_row_with_sha256(m.image.sha256) is not None:
                        raise GatewayRejection(
                            Reason.DUPLICATE_IMAGE, "The library already holds these exact bytes."
                        )
                    old = repo.current_image_row(m.device_model, m.firmware_version)
                    now = dt.datetime.now(dt.UTC)
                    if old is not None:
                        old.retired = True
                        old.retired_at = now
                        session.flush()
                    image = add_to_library(session, self._deployment, package, notes, held_upload_id)
                    held = session.get(HeldPackageRow, held_upload_id)
                    if held is not None:
                        held_object = session.get(VaultObjectRow, held.vault_object)
                        session.delete(held)
                        session.flush()
                        if held_object is not None:
                            session.delete(held_object)
                    audit_store.append(
                        session,
                        AuditEvent(
                            event="held-released",
                            actor="operator",
                            organisation=self.uploader.organisation,
                            peer="local",
                            details={
                                "upload_id": held_upload_id,
                                "reason": operator_reason,
                                "image_path": image_ref(image).path,
                                "sha256": image.sha256,
                                "retired_sha256": old.sha256 if old is not None else None,
                            },
                        ),
                    )
                return image
        finally:
            self._image_path.unlink(missing_ok=True)
            notes.path.unlink(missing_ok=True)


def _splice(writer: SealedWriter, frame: SealedObject, image_at: int, image_path: Path,
            package_sha256: str) -> SealedObject:
    """Seal into ``writer`` the spooled frame with the image file's bytes put back at ``image_at``.

    The result is checked against the uploaded package's SHA-256: a held package must be the bytes received.
    """
    digest = hashlib.sha256()

    def put(chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            digest.update(chunk)
            writer.write(chunk)

    try:
        reader = SealedReader(frame.path, frame.object_id, frame.data_key)
        try:
            put(_sealed_range(reader, 0, image_at))
            with image_path.open("rb") as image:
                put(file_chunks(image, 1 << 20))
            put(_sealed_range(reader, image_at, reader.size))
        finally:
            reader.close()
        if digest.hexdigest() != package_sha256:
            raise RuntimeError("the held package sealed again from its spool differs from the upload")
        return writer.close()
    except BaseException:
        writer.discard()
        raise


def _sealed_range(reader: SealedReader, start: int, stop: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    offset = start
    while offset < stop:
        data = reader.read(offset, min(chunk_size, stop - offset))
        if not data:
            raise RuntimeError("the spool ended early")
        offset += len(data)
        yield data


def add_to_library(
    session: Session, deployment: Deployment, package: ReadPackage, notes: SealedObject, upload_id: str
) -> ImageRow:
    """Insert the rows of a new library image (its files are already in place) in the caller's transaction."""
    m = package.manifest
    model = m.device_model
    now = dt.datetime.now(dt.UTC)
    if session.get(DeviceModelRow, (model.manufacturer_id, model.model_id, model.hardware_version)) is None:
        session.add(
            DeviceModelRow(
                manufacturer_id=model.manufacturer_id,
                model_id=model.model_id,
                hardware_version=model.hardware_version,
                device_type=m.device_type.value,
            )
        )
    if m.release_notes is not None:
        session.add(notes.row(deployment.keyring, note_context(m.image.sha256), now))
        session.flush()
    image = ImageRow(
        sha256=m.image.sha256,
        size=m.image.size,
        device_type=m.device_type.value,
        manufacturer_id=model.manufacturer_id,
        model_id=model.model_id,
        hardware_version=model.hardware_version,
        firmware_version=m.firmware_version,
        purpose=m.purpose.value,
        released=m.released.isoformat(),
        image_name=m.image.name,
        manifest=package.manifest_bytes,
        signature=package.signature,
        release_notes_name=m.release_notes.name if m.release_notes else None,
        release_notes_size=m.release_notes.size if m.release_notes else None,
        release_notes_sha256=m.release_notes.sha256 if m.release_notes else None,
        release_notes_object=notes.object_id if m.release_notes else None,
        upload_id=upload_id,
        added_at=now,
    )
    session.add(image)
    session.flush()
    return image


def feed_chunks(upload: PackageUpload, chunks: Iterable[bytes]) -> Receipt:
    """Feed bytes from anywhere (a local file, a staging file) through the gateway and complete the upload."""
    try:
        for chunk in chunks:
            upload.write(chunk)
    except BaseException:
        upload.abort()
        raise
    return upload.complete()


def file_chunks(source: BinaryIO, chunk_size: int = 256 * 1024) -> Iterator[bytes]:
    while chunk := source.read(chunk_size):
        yield chunk

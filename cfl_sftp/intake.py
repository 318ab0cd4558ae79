"""The gateway at work: one package upload from its first byte to its receipt (SPEC 4).

A :class:`PackageUpload` is fed the bytes as the client writes them. Each piece goes three ways at once: into the
encrypted spool copy of the whole package (kept if the package is held), through the package reader (which
hashes and checks as it goes), and, for the image and release-note members, into a temp image file and a
sealed note. So ``complete()`` has nothing left to read: it asks the library, decides, and commits.

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
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cfl_sftp.deployment import Deployment
from cfl_sftp.domain.errors import GatewayRejection, Outcome, Reason
from cfl_sftp.domain.gateway import UploadRules, Verdict, decide, rejected
from cfl_sftp.domain.package import PackageLimits, PackageReader, ReadPackage
from cfl_sftp.domain.receipt import Receipt, new_upload_id
from cfl_sftp.domain.signature import verify_manifest_signature
from cfl_sftp.policy import PolicySnapshot
from cfl_sftp.storage import audit_store
from cfl_sftp.storage.audit_store import AuditEvent
from cfl_sftp.storage.library_repo import LibraryRepository, image_ref
from cfl_sftp.storage.models import DeviceModelRow, HeldPackageRow, ImageRow, UploadRow, VaultObjectRow
from cfl_sftp.storage.sealed import SYNC_EVERY_BYTES, SealedObject, SealedWriter, note_context, spool_context

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


class _FileSink:
    """The image member, written in clear to a temp file (images are not secret), flushed to disk as it grows."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self._unsynced = 0

    def write(self, data: bytes | memoryview) -> None:
        self.handle.write(data)
        self._unsynced += len(data)
        if self._unsynced >= SYNC_EVERY_BYTES:
            self.handle.flush()
            os.fdatasync(self.handle.fileno())
            self._unsynced = 0


IN_PROGRESS_SUFFIX = ".upload.json"
"""Beside an SFTP upload's temp image: who is uploading what, so that if the node dies, whoever sweeps its scratch
folder can audit the ``partial-upload`` (:mod:`cfl_sftp.recovery`)."""


class PackageUpload:
    """A ``*.cfl`` being written. Feed it with :meth:`write`; end it with :meth:`complete` or :meth:`abort`.

    ``session`` is given for an upload over SFTP: the upload is then announced in the node's scratch folder
    while it is in progress (:data:`IN_PROGRESS_SUFFIX`)."""

    def __init__(self, deployment: Deployment, uploader: Uploader, file_name: str, *,
                 session: str | None = None) -> None:
        self._deployment = deployment
        self.uploader = uploader
        self.file_name = file_name
        self.received_at = dt.datetime.now(dt.UTC)
        limits = deployment.config.gateway
        self._max_bytes = limits.max_package_bytes
        self._spool: SealedWriter = deployment.spool.writer("upload")
        self._image_path = deployment.data.new_tmp_path("image")
        self._image_file = self._image_path.open("xb")
        self._announcement = self._image_path.with_suffix(IN_PROGRESS_SUFFIX) if session is not None else None
        if self._announcement is not None:
            self._announcement.write_text(json.dumps({
                "user": uploader.user, "organisation": uploader.organisation, "peer": uploader.peer,
                "file_name": file_name, "session": session,
            }))
        self._notes: SealedWriter = deployment.vault.writer("release-note")
        self._reader = PackageReader(
            PackageLimits(limits.max_package_bytes, limits.max_release_notes_bytes),
            image_sink=_FileSink(self._image_file),
            notes_sink=self._notes,
        )
        self._finished = False

    @property
    def size(self) -> int:
        return self._reader.bytes_received

    def write(self, data: bytes) -> None:
        """Take the next bytes of the package, in order. Bytes past the size limit are counted, not kept."""
        room = self._max_bytes - self._reader.bytes_received
        if room > 0:
            self._spool.write(data[:room] if len(data) > room else data)
        self._reader.feed(data)

    def abort(self) -> None:
        """Discard everything: a partial upload never reaches the gateway and leaves nothing behind."""
        if self._finished:
            return
        self._finished = True
        self._spool.discard()
        self._notes.discard()
        self._image_file.close()
        self._image_path.unlink(missing_ok=True)
        if self._announcement is not None:
            self._announcement.unlink(missing_ok=True)

    def complete(self) -> Receipt:
        """Run the gateway on what was written, commit the outcome and return the receipt (blocking)."""
        if self._finished:
            raise RuntimeError("upload already ended")
        self._finished = True
        try:
            self._image_file.flush()
            os.fsync(self._image_file.fileno())
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
            for leftover in (self._image_path, spooled.path, notes.path):
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

    def _commit_held(self, package: ReadPackage, verdict: Verdict, spooled: SealedObject) -> Receipt:
        deployment = self._deployment
        upload_id = new_upload_id(self.received_at)
        now = dt.datetime.now(dt.UTC)
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
        self._image_file.flush()
        os.fsync(self._image_file.fileno())
        self._image_file.close()
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

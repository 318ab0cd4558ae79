"""Operator decisions on held packages (SPEC 10 ``held``): list, release a version conflict, purge.

Purging deletes the sealed package and its wrapped data key, so the bytes are gone for good. Releasing re-reads
the sealed package through the same gateway reader as an upload and admits it as the replacement of the image it
conflicts with; a held ``duplicate-image`` cannot be released (the library already has those bytes).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cfl_sftp.deployment import Deployment
from cfl_sftp.domain.errors import CflError, Reason
from cfl_sftp.intake import PackageUpload, Uploader
from cfl_sftp.storage import audit_store
from cfl_sftp.storage.audit_store import AuditEvent
from cfl_sftp.storage.library_repo import LibraryRepository, image_ref
from cfl_sftp.storage.models import HeldPackageRow, ImageRow, UploadRow, VaultObjectRow
from cfl_sftp.storage.sealed import SealedReader, spool_context


class HeldPackageError(CflError):
    """An operator asked for something a held package does not allow."""


@dataclass(frozen=True, slots=True)
class HeldPackage:
    upload_id: str
    organisation: str
    uploader: str
    file_name: str
    size: int
    reason: str
    held_at: dt.datetime
    image_path: str


def list_held(deployment: Deployment, organisation: str | None = None) -> list[HeldPackage]:
    with deployment.db.reading() as session:
        result = []
        for row in LibraryRepository(session).held(organisation):
            upload = session.get(UploadRow, row.upload_id)
            image = session.get(ImageRow, row.image_id)
            assert upload is not None
            assert image is not None
            result.append(
                HeldPackage(
                    upload_id=row.upload_id,
                    organisation=row.organisation,
                    uploader=upload.uploader,
                    file_name=row.file_name,
                    size=row.size,
                    reason=row.reason,
                    held_at=row.held_at,
                    image_path=image_ref(image).path,
                )
            )
        return result


def _held_row(session_get: HeldPackageRow | None, upload_id: str) -> HeldPackageRow:
    if session_get is None:
        raise HeldPackageError(f"no held package {upload_id}")
    return session_get


def purge(deployment: Deployment, upload_id: str) -> None:
    """Delete a held package, its data key and its file; audited as ``held-purged``."""
    with deployment.db.writing() as session:
        held = _held_row(session.get(HeldPackageRow, upload_id), upload_id)
        object_id = held.vault_object
        audit_store.append(
            session,
            AuditEvent(
                event="held-purged",
                actor="operator",
                organisation=held.organisation,
                peer="local",
                details={"upload_id": upload_id, "file_name": held.file_name, "reason": held.reason},
            ),
        )
        session.delete(held)
        session.flush()
        vault_row = session.get(VaultObjectRow, object_id)
        if vault_row is not None:
            session.delete(vault_row)
    deployment.spool.remove(object_id)


def release(deployment: Deployment, upload_id: str, reason: str) -> ImageRow:
    """Admit a held ``version-conflict`` package in place of the current image of that version."""
    if not reason.strip():
        raise HeldPackageError("a release needs a --reason")
    with deployment.db.reading() as session:
        held = _held_row(session.get(HeldPackageRow, upload_id), upload_id)
        if held.reason != Reason.VERSION_CONFLICT.value:
            raise HeldPackageError(
                f"held package {upload_id} is a {held.reason}: only a version-conflict can be released"
            )
        upload = session.get(UploadRow, upload_id)
        vault_row = session.get(VaultObjectRow, held.vault_object)
        assert upload is not None
        assert vault_row is not None
    reader = SealedReader.open(
        deployment.spool.path_of(vault_row.object_id), vault_row, deployment.keyring,
        spool_context(vault_row.object_id),
    )
    replacement = PackageUpload(  # no spool: the package is already stored, and stays so until the release
        deployment, Uploader(upload.uploader, upload.organisation, "local"), held.file_name, spool=False
    )
    try:
        for chunk in reader.chunks():
            replacement.write(chunk)
    except BaseException:
        replacement.abort()
        raise
    finally:
        reader.close()
    image = replacement.complete_as_replacement(upload_id, reason)
    deployment.spool.remove(vault_row.object_id)
    return image

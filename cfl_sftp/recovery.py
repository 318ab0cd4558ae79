"""What a crash can leave behind, and the sweeps that clear it (SPEC 9: a ``kill -9`` leaves no partial image, no
orphan row and no orphan file).

Every change that puts a file in place does it in this order: write and fsync the file in the process's own
scratch folder, link it to its final name, then commit the database rows that refer to it. Deleting goes the
other way: rows first, then files. So a crash can leave only:

* files in a dead process's scratch folders (uploads in progress, sealed parts): :func:`sweep_dead_scratch`
  removes the folders of every process whose lock is free (:mod:`cfl_sftp.storage.files`), after auditing each
  SFTP upload that was in progress there as a ``partial-upload``;
* a placed file with no row (library image, vault or spool object): :func:`sweep_orphans` removes it once it is
  older than :data:`ORPHAN_GRACE_SECONDS` (by ``ctime``, which linking sets), so a file that another node has
  just placed and is about to commit is never touched. A candidate is first moved into this process's trash,
  the database is asked again, and a file that meanwhile gained a row goes back;
* never a row without its file. Should one appear anyway (a file deleted by hand, a restored backup that does
  not match), the sweep logs it loudly and changes nothing: rows are the record, and deleting them would hide
  the loss.

The sweeps run at start and every :data:`SWEEP_SECONDS` on every node; two nodes sweeping at once only find
less to do. They block (disk, database): the service runs them in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog
from sqlalchemy import select

from cfl_sftp.deployment import Deployment
from cfl_sftp.intake import IN_PROGRESS_SUFFIX
from cfl_sftp.storage import audit_store
from cfl_sftp.storage.audit_store import AuditEvent
from cfl_sftp.storage.models import ImageRow, VaultObjectRow

log = structlog.get_logger(__name__)

ORPHAN_GRACE_SECONDS = 3600.0
"""A placed file younger than this is never an orphan: its commit may still be on its way (a commit takes
milliseconds; the margin covers clocks, slow shared filesystems and long database waits)."""

SWEEP_SECONDS = 600.0
_QUERY_CHUNK = 500
RELEASE_NOTE_KIND = "release-note"


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one sweep found: removed orphan files and rows whose file is missing (logged, never deleted)."""

    dead_owners: tuple[str, ...] = ()
    orphan_images: tuple[str, ...] = ()
    orphan_objects: tuple[str, ...] = ()
    missing_images: tuple[str, ...] = ()
    missing_objects: tuple[str, ...] = ()


def _audit_partial_uploads(deployment: Deployment, owner: str) -> None:
    """A dead node's uploads in progress are partial uploads (SPEC 4): audit each before its files go."""
    events = []
    for announcement in sorted((deployment.data.tmp_root / owner).glob(f"*{IN_PROGRESS_SUFFIX}")):
        try:
            upload = json.loads(announcement.read_text())
            events.append(AuditEvent("partial-upload", upload["user"], upload["organisation"], upload["peer"], {
                "file_name": upload["file_name"], "session": upload["session"], "node": owner,
                "reason": "node-died",
            }))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # written when the host died: nothing to tell
    if events:
        with deployment.db.writing() as session:
            audit_store.append_many(session, events)
        log.info("partial_uploads_of_dead_node", node=owner, files=[e.details["file_name"] for e in events])


def sweep_dead_scratch(deployment: Deployment) -> tuple[str, ...]:
    swept = deployment.sweep_dead_scratch(
        ORPHAN_GRACE_SECONDS, lambda owner: _audit_partial_uploads(deployment, owner)
    )
    if swept:
        log.info("dead_scratch_swept", owners=swept)
    return tuple(swept)


def _chunks(keys: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(keys), _QUERY_CHUNK):
        yield keys[start : start + _QUERY_CHUNK]


def _recorded_images(deployment: Deployment, keys: list[str]) -> set[str]:
    found: set[str] = set()
    with deployment.db.reading() as session:
        for chunk in _chunks(keys):
            found.update(session.execute(select(ImageRow.sha256).where(ImageRow.sha256.in_(chunk))).scalars())
    return found


def _recorded_objects(deployment: Deployment, keys: list[str]) -> set[str]:
    found: set[str] = set()
    with deployment.db.reading() as session:
        for chunk in _chunks(keys):
            query = select(VaultObjectRow.object_id).where(VaultObjectRow.object_id.in_(chunk))
            found.update(session.execute(query).scalars())
    return found


def _old(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_ctime < cutoff
    except FileNotFoundError:
        return False


def _remove_orphans(
    deployment: Deployment, files: dict[str, Path], recorded: Iterable[str], cutoff: float, lookup: str
) -> tuple[str, ...]:
    """Move each old file without a row into our trash, ask the database again, put back what gained a row."""
    known = set(recorded)
    moved: dict[str, tuple[Path, Path]] = {}
    trash = deployment.data.trash
    trash.mkdir(parents=True, exist_ok=True)
    for key, path in files.items():
        if key in known or not _old(path, cutoff):
            continue
        target = trash / secrets.token_hex(16)
        try:
            os.rename(path, target)
        except FileNotFoundError:
            continue  # another node swept it first
        except OSError:  # vault_dir on another filesystem: check again and delete in place
            target = path
        moved[key] = (path, target)
    if not moved:
        return ()
    again = (_recorded_images if lookup == "images" else _recorded_objects)(deployment, list(moved))
    removed = []
    for key, (path, target) in moved.items():
        if key in again:
            if target != path:
                with contextlib.suppress(FileExistsError):
                    os.link(target, path)
                target.unlink(missing_ok=True)
            continue
        target.unlink(missing_ok=True)
        removed.append(key)
    return tuple(sorted(removed))


def sweep_orphans(deployment: Deployment, *, now: float | None = None) -> SweepReport:
    """Remove orphan files older than the grace period; log rows whose file is missing (blocking)."""
    cutoff = (now if now is not None else time.time()) - ORPHAN_GRACE_SECONDS
    images = dict(deployment.data.library_files())
    notes = dict(deployment.vault.committed())
    spooled = dict(deployment.spool.committed())
    with deployment.db.reading() as session:
        image_keys = set(session.execute(select(ImageRow.sha256)).scalars())
        objects = {row.object_id: row.kind for row in session.execute(select(VaultObjectRow.object_id,
                                                                               VaultObjectRow.kind))}
    orphan_images = _remove_orphans(deployment, images, image_keys, cutoff, "images")
    orphan_objects = _remove_orphans(deployment, notes, objects, cutoff, "objects") + _remove_orphans(
        deployment, spooled, objects, cutoff, "objects"
    )
    # Rows whose file was not listed: look again (the file may have been placed after the listing).
    missing_images = [
        k for k in image_keys if k not in images and not deployment.data.image_path(k).exists()
    ]
    missing_objects = [
        k for k, kind in objects.items()
        if k not in (notes if kind == RELEASE_NOTE_KIND else spooled)
        and not (deployment.vault if kind == RELEASE_NOTE_KIND else deployment.spool).path_of(k).exists()
    ]
    # ... and drop rows deleted meanwhile (rows go before their files when something is removed).
    if missing_images:
        missing_images = sorted(_recorded_images(deployment, missing_images))
    if missing_objects:
        missing_objects = sorted(_recorded_objects(deployment, missing_objects))
    report = SweepReport(
        orphan_images=orphan_images,
        orphan_objects=orphan_objects,
        missing_images=tuple(missing_images),
        missing_objects=tuple(missing_objects),
    )
    if orphan_images or orphan_objects:
        log.info("orphan_files_removed", images=list(orphan_images), objects=list(orphan_objects))
    if missing_images or missing_objects:
        log.error(
            "recorded_files_missing",
            images=list(missing_images[:20]),
            objects=list(missing_objects[:20]),
            images_missing=len(missing_images),
            objects_missing=len(missing_objects),
            hint="rows are kept; restore the files from backup (docs/operating.md, after a crash)",
        )
    return report


def sweep(deployment: Deployment, *, now: float | None = None) -> SweepReport:
    """Both sweeps: dead processes' scratch folders, then orphan and missing files."""
    dead = sweep_dead_scratch(deployment)
    report = sweep_orphans(deployment, now=now)
    return SweepReport(dead, report.orphan_images, report.orphan_objects, report.missing_images,
                       report.missing_objects)

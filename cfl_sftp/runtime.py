"""The running service's shared state: policy in force, library catalogue, users' views, sessions, uploads.

Requests read immutable snapshots (policy, catalogue, views) through single references that a reload swaps, so
the read path takes no lock. Blocking work (database, disk, crypto) runs in worker threads; this module's
methods that the event loop calls directly only look things up in memory.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import gc
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncssh
import structlog

from cfl_sftp.audit_writer import AuditWriter
from cfl_sftp.availability import DatabaseAvailability
from cfl_sftp.catalogue import Catalogue, CatalogueImage, library_version, load_catalogue
from cfl_sftp.config import Config, SessionLimits
from cfl_sftp.deployment import Deployment
from cfl_sftp.domain.entitlement import EstateView, build_estate_view, can_see_images
from cfl_sftp.domain.model import OrganisationKind, Role
from cfl_sftp.domain.receipt import Receipt
from cfl_sftp.intake import PackageUpload, Uploader, feed_chunks
from cfl_sftp.policy import PolicySnapshot
from cfl_sftp.sftp import audit_folder, auth
from cfl_sftp.sftp.activity import SessionActivity
from cfl_sftp.sftp.errors import no_such_file
from cfl_sftp.sftp.handles import (
    BytesHandle,
    DecryptingHandle,
    LibraryFileHandle,
    PackageHandle,
    ProcessedName,
    ReadHandle,
)
from cfl_sftp.sftp.limits import AbuseGuard
from cfl_sftp.sftp.tree import (
    ImageFile,
    LibraryTree,
    ManifestFile,
    Node,
    ReleaseNoteFile,
    StaticFile,
    library_paths,
)
from cfl_sftp.sftp.view import EntitledFolders, UserView, build_entitled_folders
from cfl_sftp.staging import StagingArea, StagingFile
from cfl_sftp.storage import audit_store
from cfl_sftp.storage.audit_store import AuditEvent
from cfl_sftp.storage.library_repo import LibraryRepository
from cfl_sftp.storage.models import HeldPackageRow, UploadRow, VaultObjectRow
from cfl_sftp.storage.sealed import SealedReader, note_context, spool_context

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    user: str
    organisation: str
    peer: str
    session_id: str


@dataclass(frozen=True, slots=True)
class ListedFile:
    """A receipt or held package as ``/receipts`` and ``/held`` list it."""

    name: str
    content: bytes
    size: int
    mtime: dt.datetime
    key: str = ""


def settle_heap() -> None:
    """Exempt what is alive at start-up (modules, the first policy set) from garbage collection, once per process
    (``serve`` calls it once the service has started).

    A full collection walks every tracked object while holding the GIL, so the event loop waits for it. Called
    once, before any session, this costs nothing: there is no cyclic garbage to strand. It is not repeated
    at each policy install, because whatever cyclic garbage were alive then (closed SSH connections waiting for
    the collector) would never be freed; later sets are cheap to walk anyway, as their estates are arrays.
    ``gc.freeze`` itself is O(1).
    """
    gc.freeze()


FolderKey = tuple[str, frozenset[Role]]
"""An organisation and a role set: everything entitlement reads of a user."""


@dataclass(frozen=True, slots=True)
class TreeCache:
    """The library catalogue and the users' trees built from it, replaced as one reference: a catalogue refresh
    runs in a worker thread, and must never leave a new catalogue paired with trees built from the old one."""

    catalogue: Catalogue
    library: LibraryTree
    """The catalogue laid out as folders, shared by every view (kept when only the policy changes)."""
    views: dict[str, UserView | None] = field(default_factory=dict)
    folders: dict[FolderKey, asyncio.Future[EntitledFolders]] = field(default_factory=dict)

    @classmethod
    def of(cls, catalogue: Catalogue) -> TreeCache:
        """A new catalogue's cache (O(images): call it where the catalogue was loaded, off the loop)."""
        return cls(catalogue, LibraryTree.of(catalogue))


def _forget_failed_build(
    folders: dict[FolderKey, asyncio.Future[EntitledFolders]], key: FolderKey, done: asyncio.Future[EntitledFolders]
) -> None:
    """A build that failed is not cached: the next request tries again."""
    if (done.cancelled() or done.exception() is not None) and folders.get(key) is done:
        del folders[key]


class Runtime:
    """Everything the SFTP sessions of one node share."""

    def __init__(self, deployment: Deployment, snapshot: PolicySnapshot) -> None:
        self.deployment = deployment
        self.staging = StagingArea(deployment)
        self._snapshot = snapshot
        self._trees = TreeCache.of(Catalogue(version=(0, 0, 0), images=()))
        self._estate: EstateView = build_estate_view(snapshot, dt.datetime.now(dt.UTC).date())
        self.credentials = auth.CredentialBook()
        self._uploads: dict[tuple[str, str], PackageHandle] = {}
        self._processed: dict[tuple[str, str], ProcessedName] = {}
        self._connections: dict[str, dict[str, asyncssh.SSHServerConnection]] = {}
        self.sessions: dict[str, SessionActivity] = {}
        """Every authenticated connection by session id: what the idle timeout and a stop look at."""
        self._close_reasons: dict[str, dict[str, object]] = {}
        self.stopping = False
        """Set when a stop begins: no new SFTP channel is opened from then on."""
        self._tasks: set[asyncio.Future[Any]] = set()
        self.database = DatabaseAvailability()
        self.audit_writer = AuditWriter(deployment.db, self.database)
        self._library_paths: frozenset[str] = frozenset()
        self.guard = AbuseGuard(lambda: self.deployment.config.limits, self.audit_soon, deployment.db)
        # The gateway asks the deployment for the policy in force: make that this runtime's snapshot.
        deployment.policy = lambda: self._snapshot

    # -- policy and catalogue --------------------------------------------------------------------------

    @property
    def limits(self) -> SessionLimits:
        return self.deployment.config.limits

    def install_config(self, config: Config) -> None:
        """Put a re-read configuration in force (``[gateway]``/``[limits]``; SIGHUP): one reference swap.

        Every limit is read from ``deployment.config`` when it is applied, so the next request, login or
        package sees the new values; users' views depend on ``admitted_purposes``, so they are rebuilt.
        """
        self.deployment.config = config
        self._drop_views()

    @property
    def snapshot(self) -> PolicySnapshot:
        return self._snapshot

    def install_policy(
        self, snapshot: PolicySnapshot, on: dt.date | None = None, *, estate: EstateView | None = None
    ) -> None:
        """Put a validated policy set in force (one reference swap) and drop derived caches.

        ``estate`` is the set's view for today when the caller built it off the loop (O(spans): large estates).
        """
        estate = estate or build_estate_view(snapshot, on or dt.datetime.now(dt.UTC).date())
        previous = self._snapshot
        self._snapshot, self._estate = snapshot, estate
        self._drop_views()
        for user in list(self._connections):
            now, before = snapshot.user(user), previous.user(user)
            # Gone, disabled, or moved to another organisation (its sessions act for the old one): close.
            if now is None or (before is not None and before.organisation != now.organisation):
                self.close_sessions_of(user)
        self.credentials.close_refused(snapshot)

    def refresh_catalogue_now(self) -> None:
        """Blocking: load the catalogue if the library changed (worker thread or start-up)."""
        with self.deployment.db.reading() as session:
            version = library_version(session)
            if version == self._trees.catalogue.version:
                return
            catalogue = load_catalogue(session)
        self._library_paths = library_paths(catalogue)
        self._trees = TreeCache.of(catalogue)  # one reference: never a new catalogue with an old cache

    def _drop_views(self) -> None:
        """Every user's tree is rebuilt at its next request (policy, catalogue or ``[gateway]`` changed)."""
        self._trees = TreeCache(self._trees.catalogue, self._trees.library)

    def library_changed(self) -> None:
        self.track_task(asyncio.ensure_future(asyncio.to_thread(self.refresh_catalogue_now)))

    def track_task(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_for_tasks(self, timeout: float) -> int:
        """Wait (bounded) for the tasks in flight: session handlers ending, audit checks, refreshes.

        Returns how many are still running at the timeout.
        """
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout)
        return len(pending)

    # -- users -----------------------------------------------------------------------------------------

    def key_allowed(self, username: str, key: asyncssh.SSHKey) -> bool:
        return auth.key_allowed(self._snapshot, username, key.public_data)

    def ca_allowed(self, username: str, key: asyncssh.SSHKey) -> bool:
        return auth.ca_trusted(self._snapshot, key.public_data)

    def organisation_of(self, username: str) -> str | None:
        """The organisation a user acts for under the set in force; ``None`` when it has no access at all."""
        snapshot = self._snapshot
        user = snapshot.user(username)
        if user is None or snapshot.organisation(user.organisation) is None:
            return None
        return user.organisation

    async def view_for(self, username: str) -> UserView | None:
        """The user's tree under the policy, estates and catalogue in force; ``None`` once it has no access.

        Filtering the catalogue costs about 0.1 s at 5,000 images, and every view goes after a reload or a library
        change: it runs in a worker thread (the loop keeps serving meanwhile), once per organisation and role set,
        since entitlement reads nothing else of a user. A request that started under the old generation gets the
        view it asked for; only the current generation's cache is filled.
        """
        trees = self._trees
        views, folders = trees.views, trees.folders
        if username in views:
            return views[username]
        snapshot, estate = self._snapshot, self._estate
        user = snapshot.user(username)
        organisation = snapshot.organisation(user.organisation) if user is not None else None
        if user is None or organisation is None:
            views[username] = None
            return None
        images = updates = None
        if can_see_images(user, organisation):
            key = (organisation.id, user.roles)
            future = folders.get(key)
            if future is None:
                admitted = self.deployment.config.gateway.admitted_purposes
                future = folders[key] = asyncio.ensure_future(asyncio.to_thread(
                    build_entitled_folders, snapshot, estate, trees.library, user, organisation, admitted))
                future.add_done_callback(functools.partial(_forget_failed_build, folders, key))
            images, updates = await asyncio.shield(future)
        view = UserView(
            user=username,
            organisation=organisation.id,
            images=images,
            updates=updates,
            uploader=Role.UPLOADER in user.roles,
            auditor=Role.AUDITOR in user.roles and organisation.kind is OrganisationKind.AUDITOR,
        )
        views[username] = view
        return view

    def session_info(self, username: str, session_id: str, peer: str) -> SessionInfo | None:
        organisation = self.organisation_of(username)
        if organisation is None:
            return None
        return SessionInfo(username, organisation, peer, session_id)

    def session_opened(self, username: str, session_id: str, peer: str, conn: asyncssh.SSHServerConnection) -> None:
        self._connections.setdefault(username, {})[session_id] = conn
        self.sessions[session_id] = SessionActivity(session_id, conn)
        log.info("login_accepted", session=session_id, user=username, peer=peer)
        self.audit_soon(AuditEvent("login-accepted", username, self.organisation_of(username) or "", peer, {
            "session": session_id}))

    def session_closed(self, username: str, session_id: str, peer: str) -> None:
        conns = self._connections.get(username, {})
        conns.pop(session_id, None)
        if not conns:
            self._connections.pop(username, None)
        self.sessions.pop(session_id, None)
        why = self._close_reasons.pop(session_id, {})
        log.info("session_closed", session=session_id, user=username, peer=peer, **why)
        self.audit_soon(AuditEvent("session-closed", username, self.organisation_of(username) or "", peer, {
            "session": session_id, **why}))

    def close_session(self, session: SessionActivity, reason: str, **details: object) -> None:
        """Close a session for a reason of the service's own (idle, stopping); its ``session-closed`` entry
        says why (``details.reason``)."""
        if session.session_id in self._close_reasons:
            return  # closing already
        self._close_reasons[session.session_id] = {"reason": reason, **details}
        session.conn.close()

    def close_sessions_of(self, username: str) -> None:
        for conn in list(self._connections.get(username, {}).values()):
            conn.close()

    # -- audit -----------------------------------------------------------------------------------------

    def _append_audit(self, event: AuditEvent) -> int:
        with self.deployment.db.writing() as session:
            return audit_store.append(session, event)

    def audit_soon(self, event: AuditEvent) -> None:
        """Record an entry without making the caller wait; it shares a group commit with its neighbours."""
        self.audit_writer.submit(event)

    async def audit(self, event: AuditEvent) -> int:
        """Append now and wait for the ``seq``. A database outage seen here stops new logins at once."""
        try:
            return await asyncio.to_thread(self._append_audit, event)
        except Exception as exc:
            self.database.failed(exc, "audit")
            raise

    def note_invisible_read(self, session: SessionInfo, path: str, action: str) -> None:
        """A read answered ``NO_SUCH_FILE``: if the path exists for someone else, audit ``access-denied``.

        The answer never waits on this: library paths are looked up in memory, receipts and held packages
        in a worker thread after the answer has gone.
        """
        parts = [p for p in path.split("/") if p]
        if not parts:
            return
        event = AuditEvent("access-denied", session.user, session.organisation, session.peer,
                           {"action": action, "path": path[:512], "session": session.session_id})
        if parts[0] in ("images", "updates"):
            if "/images/" + "/".join(parts[1:]) in self._library_paths or len(parts) == 1:
                self.audit_soon(event)
            return
        if parts[0] in ("receipts", "held") and len(parts) == 2:
            self.track_task(asyncio.ensure_future(self._audit_if_upload_exists(parts[1], event)))

    async def _audit_if_upload_exists(self, name: str, event: AuditEvent) -> None:
        upload_id = name.removesuffix(".json") if name.endswith(".json") else name[:27]

        def exists() -> bool:
            with self.deployment.db.reading() as db:
                return db.get(UploadRow, upload_id) is not None

        try:
            if await asyncio.to_thread(exists):
                self.audit_soon(event)
        except Exception:
            log.exception("access_check_failed")

    # -- uploads ---------------------------------------------------------------------------------------

    def upload_in_progress(self, username: str, name: str) -> bool:
        return (username, name) in self._uploads

    def begin_upload(self, username: str, name: str, handle: PackageHandle) -> None:
        self._uploads[(username, name)] = handle
        self._processed.pop((username, name), None)

    def end_upload(self, username: str, name: str) -> None:
        self._uploads.pop((username, name), None)

    def processed_name(self, username: str, name: str) -> ProcessedName | None:
        entry = self._processed.get((username, name))
        if entry is not None and entry.expires < time.monotonic():
            self._processed.pop((username, name), None)
            return None
        return entry

    def record_processed(self, username: str, name: str, entry: ProcessedName) -> None:
        self._processed[(username, name)] = entry

    def forget_processed(self, username: str, name: str) -> bool:
        return self._processed.pop((username, name), None) is not None

    def partial_upload(self, session: SessionInfo, handle: PackageHandle) -> None:
        """Queued, not awaited: a session's end must not depend on the database answering at once."""
        log.info("partial_upload", file_name=handle.name, bytes_received=handle.next_offset)
        self.audit_soon(AuditEvent("partial-upload", session.user, session.organisation, session.peer, {
            "file_name": handle.name, "bytes_received": handle.next_offset, "session": session.session_id}))

    async def run_gateway_on_staged(self, session: SessionInfo, staged: StagingFile, new_name: str) -> Receipt:
        """A staging file renamed to ``*.cfl``: read it through the gateway, then it leaves ``/incoming``."""

        def run() -> Receipt:
            reader = self.staging.reader(staged)
            upload = PackageUpload(self.deployment, Uploader(session.user, session.organisation, session.peer),
                                   new_name)
            try:
                receipt = feed_chunks(upload, reader.chunks())
            finally:
                reader.close()
            self.staging.remove(session.user, staged.name)
            return receipt

        receipt = await asyncio.to_thread(run)
        self.library_changed()
        return receipt

    # -- reading ---------------------------------------------------------------------------------------

    async def open_node(self, node: Node, session: SessionInfo) -> ReadHandle:
        if isinstance(node, StaticFile):
            return BytesHandle(node.content)
        if isinstance(node, ManifestFile):
            return await self._open_manifest(node.image, session)
        if isinstance(node, ImageFile):
            return await self._open_image(node.image, session)
        if isinstance(node, ReleaseNoteFile):
            return await self._open_note(node.image, session)
        raise no_such_file()

    async def _open_manifest(self, image: CatalogueImage, session: SessionInfo) -> ReadHandle:
        path = f"{image.ref.folder}/manifest.json"
        seq = await self.audit(AuditEvent("manifest-downloaded", session.user, session.organisation, session.peer, {
            "path": path, "image_sha256": image.sha256, "session": session.session_id}))

        def closed(served: int) -> None:
            self.audit_soon(AuditEvent("manifest-downloaded", session.user, session.organisation, session.peer, {
                "path": path, "image_sha256": image.sha256, "session": session.session_id,
                "bytes_served": served, "opened_seq": seq}))

        return BytesHandle(image.manifest, closed)

    async def _open_image(self, image: CatalogueImage, session: SessionInfo) -> ReadHandle:
        path = self.deployment.data.image_path(image.sha256)
        seq = await self.audit(AuditEvent("image-downloaded", session.user, session.organisation, session.peer, {
            "path": image.ref.path, "sha256": image.sha256, "session": session.session_id}))

        def closed(served: int) -> None:
            self.audit_soon(AuditEvent("image-downloaded", session.user, session.organisation, session.peer, {
                "path": image.ref.path, "sha256": image.sha256, "session": session.session_id,
                "bytes_served": served, "opened_seq": seq}))

        return LibraryFileHandle(path, image.size, closed)

    async def _open_note(self, image: CatalogueImage, session: SessionInfo) -> ReadHandle:
        object_id = image.release_notes_object
        if object_id is None:
            raise no_such_file()

        def open_reader() -> SealedReader:
            with self.deployment.db.reading() as db:
                row = db.get(VaultObjectRow, object_id)
            if row is None:
                raise no_such_file()
            return SealedReader.open(self.deployment.vault.path_of(object_id), row, self.deployment.keyring,
                                     note_context(image.sha256))

        reader = await asyncio.to_thread(open_reader)
        await self.audit(AuditEvent("release-note-read", session.user, session.organisation, session.peer, {
            "path": f"{image.ref.folder}/{image.release_notes_name}", "image_sha256": image.sha256,
            "session": session.session_id}))
        return DecryptingHandle(reader)

    async def receipts(self, organisation: str) -> list[ListedFile]:
        def load() -> list[ListedFile]:
            with self.deployment.db.reading() as db:
                return [
                    ListedFile(f"{row.upload_id}.json", row.receipt, len(row.receipt), row.received_at)
                    for row in LibraryRepository(db).uploads_of(organisation)
                ]

        return await asyncio.to_thread(load)

    async def receipt(self, organisation: str, name: str) -> ListedFile | None:
        if not name.endswith(".json"):
            return None
        upload_id = name.removesuffix(".json")

        def load() -> ListedFile | None:
            with self.deployment.db.reading() as db:
                row = db.get(UploadRow, upload_id)
                if row is None or row.organisation != organisation:
                    return None
                return ListedFile(name, row.receipt, len(row.receipt), row.received_at)

        return await asyncio.to_thread(load)

    async def held_files(self, organisation: str) -> list[ListedFile]:
        def load() -> list[ListedFile]:
            with self.deployment.db.reading() as db:
                return [
                    ListedFile(f"{row.upload_id}-{row.file_name}", b"", row.size, row.held_at, row.upload_id)
                    for row in LibraryRepository(db).held(organisation)
                ]

        return await asyncio.to_thread(load)

    async def held_file(self, organisation: str, name: str) -> ListedFile | None:
        for held in await self.held_files(organisation):
            if held.name == name:
                return held
        return None

    async def open_held(self, organisation: str, name: str) -> ReadHandle:
        held = await self.held_file(organisation, name)
        if held is None:
            raise no_such_file()

        def open_reader() -> SealedReader:
            with self.deployment.db.reading() as db:
                row = db.get(HeldPackageRow, held.key)
                vault_row = db.get(VaultObjectRow, row.vault_object) if row is not None else None
            if vault_row is None:
                raise no_such_file()
            return SealedReader.open(self.deployment.spool.path_of(vault_row.object_id), vault_row,
                                     self.deployment.keyring, spool_context(vault_row.object_id))

        return DecryptingHandle(await asyncio.to_thread(open_reader))

    # -- audit folders (served in full by the audit trail's own module) ---------------------------------

    async def audit_stat(self, parts: tuple[str, ...]) -> asyncssh.SFTPAttrs:
        return await audit_folder.stat(self.deployment, parts)

    def audit_listing(self, parts: tuple[str, ...]) -> AsyncIterator[asyncssh.SFTPName]:
        return audit_folder.listing(self.deployment, parts)

    async def open_audit(self, parts: tuple[str, ...]) -> ReadHandle:
        return await audit_folder.open_file(self.deployment, parts)

"""The virtual filesystem over SFTP: every ``asyncssh.SFTPServer`` hook, mapped onto the domain (SPEC 4, 5).

Rules this class keeps, whatever the request:

* Everything outside ``/incoming`` is read-only: a write, ``mkdir``, ``remove``, ``rename``, ``setstat``,
  ``symlink`` or ``link`` there is ``PERMISSION_DENIED``, whether or not the path exists for the user.
* A read request on anything the user may not see is ``NO_SUCH_FILE`` at once (``opendir`` included).
* Paths are resolved lexically; nothing here ever touches a host path named by a client.
* Every default hook of ``SFTPServer`` acts on the host filesystem, so each one is overridden here; a test keeps
  an allow-list of them so a new asyncssh hook cannot slip through.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import posixpath
import re
import stat as stat_mod
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import asyncssh
import structlog

from cfl_sftp.availability import ServiceUnavailable
from cfl_sftp.domain.errors import Outcome
from cfl_sftp.intake import PackageUpload, Uploader
from cfl_sftp.sftp.errors import no_such_file, permission_denied, sftp_errors, translate
from cfl_sftp.sftp.handles import (
    BytesHandle,
    DecryptingHandle,
    PackageHandle,
    ProcessedName,
    ReadHandle,
    StagingHandle,
)
from cfl_sftp.sftp.tree import EPOCH, Folder, Node
from cfl_sftp.sftp.view import UserView
from cfl_sftp.storage.audit_store import AuditEvent

if TYPE_CHECKING:
    from cfl_sftp.runtime import Runtime, SessionInfo

log = structlog.get_logger(__name__)

INCOMING_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
PROCESSED_NAME_SECONDS = 600

FXF_READ = asyncssh.FXF_READ
FXF_WRITE = asyncssh.FXF_WRITE
FXF_APPEND = asyncssh.FXF_APPEND
FXF_CREAT = asyncssh.FXF_CREAT
FXF_TRUNC = asyncssh.FXF_TRUNC
FXF_EXCL = asyncssh.FXF_EXCL

DIR_MODE = stat_mod.S_IFDIR | 0o555
INCOMING_DIR_MODE = stat_mod.S_IFDIR | 0o755
FILE_MODE = stat_mod.S_IFREG | 0o444
OWN_FILE_MODE = stat_mod.S_IFREG | 0o644


def split_path(path: bytes) -> tuple[str, ...]:
    """Lexical resolution against ``/``: ``..`` never climbs above the root; bad UTF-8 names nothing."""
    try:
        text = path.decode("utf-8")
    except UnicodeDecodeError:
        raise no_such_file() from None
    if "\x00" in text:
        raise no_such_file()
    normal = posixpath.normpath(posixpath.join("/", text))
    return tuple(part for part in normal.split("/") if part)


def _attrs(mode: int, size: int, mtime: dt.datetime) -> asyncssh.SFTPAttrs:
    seconds = int(mtime.timestamp())
    return asyncssh.SFTPAttrs(
        type=asyncssh.FILEXFER_TYPE_DIRECTORY if stat_mod.S_ISDIR(mode) else asyncssh.FILEXFER_TYPE_REGULAR,
        size=size,
        uid=0,
        gid=0,
        owner="cfl",
        group="cfl",
        permissions=mode,
        atime=seconds,
        mtime=seconds,
    )


def _node_attrs(node: Node) -> asyncssh.SFTPAttrs:
    if isinstance(node, Folder):
        return _attrs(DIR_MODE, 0, node.mtime)
    return _attrs(FILE_MODE, node.size, node.mtime)


MAX_PACKET_LENGTH = 256 * 1024
"""What ``limits@openssh.com`` offers, as OpenSSH's sftp-server does: asyncssh's clients use the offered read
length as their block size, and asyncssh's own 4 MiB meant a whole 4 MiB image per request, buffered in full
in every one of 200 simultaneous sessions."""
MAX_READ_LENGTH = MAX_WRITE_LENGTH = MAX_PACKET_LENGTH - 1024


class LibrarySFTPServer(asyncssh.SFTPServer):
    """One SFTP session of one authenticated user."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], runtime: Runtime, session: SessionInfo) -> None:
        super().__init__(chan)
        self._runtime = runtime
        self._session = session
        self._open_files = 0
        self.ending = False  # set by the handler when the session ends with handles still open

    # -- who and what ----------------------------------------------------------------------------------

    @property
    def user(self) -> str:
        return self._session.user

    @property
    def open_files_limit(self) -> int:
        """The most files a session may hold open (what ``limits@openssh.com`` reports)."""
        return self._runtime.limits.open_files_per_session

    async def _view(self) -> UserView:
        self._runtime.database.require()  # SPEC 9: during an outage only open handles keep working
        view = await self._runtime.view_for(self.user)
        if view is None:  # removed, disabled or organisation gone: access ends at the next request
            self._runtime.close_sessions_of(self.user)
            raise asyncssh.SFTPPermissionDenied("Access has been withdrawn")
        return view

    def _denied(self, action: str, path: bytes | str) -> asyncssh.SFTPError:
        """A refused write: audited as ``access-denied`` without making the answer wait (SPEC 8)."""
        if not self._runtime.database.available:
            return translate(ServiceUnavailable())  # nothing could be audited
        shown = path.decode("utf-8", "replace") if isinstance(path, bytes) else path
        s = self._session
        self._runtime.audit_soon(
            AuditEvent("access-denied", s.user, s.organisation, s.peer,
                       {"action": action, "path": shown[:512], "session": s.session_id})
        )
        return permission_denied()

    def _uploader(self) -> Uploader:
        return Uploader(self.user, self._session.organisation, self._session.peer)

    def _resolve_tree(self, view: UserView, parts: tuple[str, ...]) -> Node | None:
        """A node of ``/images`` or ``/updates``, or None."""
        top = {"images": view.images, "updates": view.updates}.get(parts[0])
        node: Node | None = top
        for part in parts[1:]:
            if not isinstance(node, Folder):
                return None
            node = node.child(part)
        return node

    def _is_incoming(self, parts: tuple[str, ...], view: UserView) -> bool:
        return view.uploader and len(parts) >= 1 and parts[0] == "incoming"

    # -- attributes ------------------------------------------------------------------------------------

    async def _stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        view = await self._view()
        parts = split_path(path)
        if not parts:
            return _attrs(DIR_MODE, 0, EPOCH)
        head = parts[0]
        if head not in view.top_level():
            raise no_such_file()
        if head in ("images", "updates"):
            node = self._resolve_tree(view, parts)
            if node is None:
                raise no_such_file()
            return _node_attrs(node)
        if len(parts) == 1:
            return _attrs(INCOMING_DIR_MODE if head == "incoming" else DIR_MODE, 0, EPOCH)
        if head == "audit":
            return await self._runtime.audit_stat(parts)
        if len(parts) != 2:
            raise no_such_file()
        name = parts[1]
        if head == "incoming":
            processed = self._runtime.processed_name(self.user, name)
            if processed is not None:
                return _attrs(OWN_FILE_MODE, processed.size, dt.datetime.now(dt.UTC))
            if name.endswith(".cfl"):
                raise no_such_file()
            staged = await asyncio.to_thread(self._runtime.staging.get, self.user, name)
            if staged is None:
                raise no_such_file()
            return _attrs(OWN_FILE_MODE, staged.size, staged.created_at)
        if head == "receipts":
            receipt = await self._runtime.receipt(self._session.organisation, name)
            if receipt is None:
                raise no_such_file()
            return _attrs(FILE_MODE, len(receipt.content), receipt.mtime)
        if head == "held":
            held = await self._runtime.held_file(self._session.organisation, name)
            if held is None:
                raise no_such_file()
            return _attrs(FILE_MODE, held.size, held.mtime)
        if head == "audit":
            return await self._runtime.audit_stat(parts)
        raise no_such_file()

    @sftp_errors
    async def stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        return await self._stat_noting(path, "stat")

    @sftp_errors
    async def lstat(self, path: bytes) -> asyncssh.SFTPAttrs:
        return await self._stat_noting(path, "lstat")

    async def _stat_noting(self, path: bytes, action: str) -> asyncssh.SFTPAttrs:
        try:
            return await self._stat(path)
        except asyncssh.SFTPNoSuchFile:
            self._note_invisible(path, action)
            raise

    def _note_invisible(self, path: bytes, action: str) -> None:
        """After a ``NO_SUCH_FILE`` answer to a read: the runtime audits it if the path exists for others."""
        try:
            parts = split_path(path)
        except asyncssh.SFTPError:
            return
        self._runtime.note_invisible_read(self._session, "/" + "/".join(parts), action)

    @sftp_errors
    async def fstat(self, file_obj: object) -> asyncssh.SFTPAttrs:
        if isinstance(file_obj, ReadHandle):
            return _attrs(FILE_MODE, file_obj.size, dt.datetime.now(dt.UTC))
        if isinstance(file_obj, PackageHandle):
            return _attrs(OWN_FILE_MODE, file_obj.next_offset, dt.datetime.now(dt.UTC))
        if isinstance(file_obj, StagingHandle):
            return _attrs(OWN_FILE_MODE, file_obj.writer.next_offset, dt.datetime.now(dt.UTC))
        raise asyncssh.SFTPFailure("Invalid handle")

    def format_user(self, uid: int | None) -> str:
        return "cfl"

    def format_group(self, gid: int | None) -> str:
        return "cfl"

    # -- listing ---------------------------------------------------------------------------------------

    def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        """Never called: our handler answers OPENDIR with :meth:`opendir`, which may wait for the user's view."""
        raise asyncssh.SFTPOpUnsupported("opendir is answered by LibrarySFTPServer.opendir")

    @sftp_errors
    async def opendir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        """Check existence now (``opendir`` answers ``NO_SUCH_FILE`` at once); list lazily."""
        try:
            return await self._listing(path)
        except asyncssh.SFTPNoSuchFile:
            self._note_invisible(path, "opendir")
            raise

    async def _listing(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        view = await self._view()
        parts = split_path(path)
        if not parts:
            names = view.top_level()
            return self._names([(n, _attrs(INCOMING_DIR_MODE if n == "incoming" else DIR_MODE, 0, EPOCH))
                                for n in names])
        head = parts[0]
        if head not in view.top_level():
            raise no_such_file()
        if head in ("images", "updates"):
            node = self._resolve_tree(view, parts)
            if not isinstance(node, Folder):
                raise no_such_file()
            return self._names([(name, _node_attrs(child)) for name, child in node.entries()])
        if len(parts) != 1:
            if head == "audit":
                return self._runtime.audit_listing(parts)
            raise no_such_file()
        return self._dynamic_listing(head)

    async def _names(
        self, entries: list[tuple[str, asyncssh.SFTPAttrs]]
    ) -> AsyncIterator[asyncssh.SFTPName]:
        yield asyncssh.SFTPName(b".", attrs=_attrs(DIR_MODE, 0, EPOCH))
        yield asyncssh.SFTPName(b"..", attrs=_attrs(DIR_MODE, 0, EPOCH))
        for name, attrs in entries:
            yield asyncssh.SFTPName(name.encode(), attrs=attrs)

    async def _dynamic_listing(self, head: str) -> AsyncIterator[asyncssh.SFTPName]:
        org = self._session.organisation
        entries: list[tuple[str, asyncssh.SFTPAttrs]] = []
        try:
            if head == "incoming":
                staged = await asyncio.to_thread(self._runtime.staging.files_of, self.user)
                entries = [(s.name, _attrs(OWN_FILE_MODE, s.size, s.created_at)) for s in staged]
            elif head == "receipts":
                entries = [
                    (r.name, _attrs(FILE_MODE, len(r.content), r.mtime))
                    for r in await self._runtime.receipts(org)
                ]
            elif head == "held":
                entries = [(h.name, _attrs(FILE_MODE, h.size, h.mtime)) for h in await self._runtime.held_files(org)]
            elif head == "audit":
                entries = [(n, _attrs(DIR_MODE, 0, EPOCH)) for n in ("checkpoints", "entries")]
        except Exception as exc:
            raise translate(exc) from None
        async for name in self._names(entries):
            yield name

    # -- opening, reading, writing ---------------------------------------------------------------------

    @sftp_errors
    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        view = await self._view()
        parts = split_path(path)
        writing = bool(pflags & (FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC))
        if writing and not self._is_incoming(parts, view):
            raise self._denied("open-for-writing", path)
        if self._open_files >= self._runtime.limits.open_files_per_session:
            raise asyncssh.SFTPFailure("Too many open files in this session")
        try:
            handle = await (self._open_incoming(parts, pflags) if self._is_incoming(parts, view) and len(parts) == 2
                            else self._open_for_reading(view, parts))
        except asyncssh.SFTPNoSuchFile:
            self._note_invisible(path, "open")
            raise
        self._open_files += 1
        return handle

    async def _open_for_reading(self, view: UserView, parts: tuple[str, ...]) -> object:
        if not parts or parts[0] not in view.top_level():
            raise no_such_file()
        head = parts[0]
        if head in ("images", "updates"):
            node = self._resolve_tree(view, parts)
            if node is None or isinstance(node, Folder):
                raise no_such_file() if node is None else asyncssh.SFTPFailure("Is a directory")
            return await self._runtime.open_node(node, self._session)
        if len(parts) == 2 and head == "receipts":
            receipt = await self._runtime.receipt(self._session.organisation, parts[1])
            if receipt is None:
                raise no_such_file()
            return BytesHandle(receipt.content)
        if len(parts) == 2 and head == "held":
            return await self._runtime.open_held(self._session.organisation, parts[1])
        if head == "audit":
            return await self._runtime.open_audit(parts)
        raise no_such_file()

    async def _open_incoming(self, parts: tuple[str, ...], pflags: int) -> object:
        name = parts[1]
        if not INCOMING_NAME.match(name):
            raise asyncssh.SFTPPermissionDenied("Names in /incoming are letters, digits and . _ + -")
        writing = bool(pflags & (FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC))
        if name.endswith(".cfl"):
            if pflags & FXF_APPEND or self._runtime.upload_in_progress(self.user, name):
                raise self._denied("open-package", f"/incoming/{name}")
            if not writing:
                # A processed name answers stat for a while but is never readable.
                if self._runtime.processed_name(self.user, name) is not None:
                    raise permission_denied()
                raise no_such_file()
            upload = await asyncio.to_thread(PackageUpload, self._runtime.deployment, self._uploader(), name,
                                             session=self._session.session_id)
            handle = PackageHandle(upload, name)
            self._runtime.begin_upload(self.user, name, handle)
            return handle
        staged = await asyncio.to_thread(self._runtime.staging.get, self.user, name)
        if not writing:
            if staged is None:
                raise no_such_file()
            reader = await asyncio.to_thread(self._runtime.staging.reader, staged)
            return DecryptingHandle(reader)
        if staged is None and not pflags & FXF_CREAT:
            raise no_such_file()
        if staged is not None and pflags & FXF_EXCL:
            raise asyncssh.SFTPFailure("File already exists")
        truncate = bool(pflags & FXF_TRUNC) or staged is None
        writer = await asyncio.to_thread(
            self._runtime.staging.open_writer, self.user, self._session.organisation, name, truncate=truncate
        )
        return StagingHandle(writer, append=bool(pflags & FXF_APPEND))

    @sftp_errors
    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        if not isinstance(file_obj, ReadHandle):
            raise asyncssh.SFTPFailure("The file is not open for reading")
        # A larger request gets a short read, as from OpenSSH's sftp-server; every client asks again for the rest.
        return await file_obj.read(offset, min(size, MAX_READ_LENGTH))

    @sftp_errors
    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        if isinstance(file_obj, PackageHandle | StagingHandle):
            await file_obj.write(offset, data)
            return len(data)
        raise self._denied("write", "")

    @sftp_errors
    async def close(self, file_obj: object) -> None:
        self._open_files = max(0, self._open_files - 1)
        if self.ending:
            # asyncssh closes every open handle at session end with no error handling around the calls: one
            # failure would leave the others (and their uploads in progress) behind.
            try:
                await self._close_handle(file_obj)
            except Exception:
                log.exception("close_at_session_end_failed")
            return
        await self._close_handle(file_obj)

    async def _close_handle(self, file_obj: object) -> None:
        if isinstance(file_obj, PackageHandle):
            await self._close_package(file_obj)
        elif isinstance(file_obj, StagingHandle):
            await file_obj.close()  # what arrived of a staging file is kept, also at session end: resumable
        elif isinstance(file_obj, ReadHandle):
            await file_obj.close()

    async def _close_package(self, handle: PackageHandle) -> None:
        runtime = self._runtime
        try:
            if self.ending or handle.out_of_order:
                await handle.abort()
                runtime.partial_upload(self._session, handle)
                return
            receipt = await handle.complete()
        except BaseException:
            await handle.abort()
            raise
        finally:
            runtime.end_upload(self.user, handle.name)
        runtime.record_processed(self.user, handle.name, ProcessedName(receipt.size, time.monotonic()
                                                                       + PROCESSED_NAME_SECONDS))
        runtime.library_changed()
        if receipt.outcome is Outcome.REJECTED:
            raise asyncssh.SFTPFailure(f"Package rejected ({receipt.reason.value}); see /receipts/"
                                       f"{receipt.upload_id}.json")

    def exit(self) -> None:
        return None

    # -- changes: allowed only in /incoming ------------------------------------------------------------

    async def _incoming_name(self, path: bytes) -> str:
        """The file name when ``path`` is directly in this uploader's ``/incoming``; else refuse."""
        view = await self._view()
        parts = split_path(path)
        if not self._is_incoming(parts, view) or len(parts) != 2:
            raise self._denied("change", path)
        return parts[1]

    @sftp_errors
    async def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        name = await self._incoming_name(path)
        if self._runtime.processed_name(self.user, name) is not None:
            return
        if name.endswith(".cfl") or await asyncio.to_thread(self._runtime.staging.get, self.user, name) is None:
            raise no_such_file()

    @sftp_errors
    async def lsetstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        await self.setstat(path, attrs)

    @sftp_errors
    async def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        if isinstance(file_obj, PackageHandle | StagingHandle):
            return
        raise self._denied("fsetstat", "")

    @sftp_errors
    async def remove(self, path: bytes) -> None:
        name = await self._incoming_name(path)
        if name.endswith(".cfl"):
            if self._runtime.forget_processed(self.user, name):
                return
            if self._runtime.upload_in_progress(self.user, name):
                raise permission_denied()
            raise no_such_file()
        if not await asyncio.to_thread(self._runtime.staging.remove, self.user, name):
            raise no_such_file()

    async def _rename(self, old: bytes, new: bytes, *, overwrite: bool) -> None:
        old_name = await self._incoming_name(old)
        new_name = await self._incoming_name(new)
        if not INCOMING_NAME.match(new_name):
            raise asyncssh.SFTPPermissionDenied("Names in /incoming are letters, digits and . _ + -")
        if old_name.endswith(".cfl") or self._runtime.upload_in_progress(self.user, new_name):
            raise permission_denied()
        if not new_name.endswith(".cfl"):
            if not await asyncio.to_thread(
                self._runtime.staging.rename, self.user, old_name, new_name, overwrite=overwrite
            ):
                raise no_such_file()
            return
        staged = await asyncio.to_thread(self._runtime.staging.get, self.user, old_name)
        if staged is None:
            raise no_such_file()
        receipt = await self._runtime.run_gateway_on_staged(self._session, staged, new_name)
        self._runtime.record_processed(
            self.user, new_name, ProcessedName(receipt.size, time.monotonic() + PROCESSED_NAME_SECONDS)
        )
        if receipt.outcome is Outcome.REJECTED:
            raise asyncssh.SFTPFailure(f"Package rejected ({receipt.reason.value}); see /receipts/"
                                       f"{receipt.upload_id}.json")

    @sftp_errors
    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._rename(oldpath, newpath, overwrite=False)

    @sftp_errors
    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._rename(oldpath, newpath, overwrite=True)

    @sftp_errors
    async def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        raise self._denied("mkdir", path)

    @sftp_errors
    async def rmdir(self, path: bytes) -> None:
        raise self._denied("rmdir", path)

    @sftp_errors
    async def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        raise self._denied("symlink", newpath)

    @sftp_errors
    async def link(self, oldpath: bytes, newpath: bytes) -> None:
        raise self._denied("link", newpath)

    # -- the rest of the protocol ----------------------------------------------------------------------

    @sftp_errors
    async def realpath(self, path: bytes) -> bytes:
        """Lexical, like the tree itself: it reveals nothing about what exists."""
        return ("/" + "/".join(split_path(path))).encode()

    @sftp_errors
    async def readlink(self, path: bytes) -> bytes:
        await self._stat_noting(path, "readlink")  # NO_SUCH_FILE for what the user cannot see
        raise asyncssh.SFTPFailure("Not a symbolic link")

    def _vfs(self) -> asyncssh.SFTPVFSAttrs:
        quota = self._runtime.deployment.config.gateway.staging_quota_bytes
        return asyncssh.SFTPVFSAttrs(
            bsize=4096, frsize=4096, blocks=quota // 4096, bfree=quota // 4096, bavail=quota // 4096,
            files=0, ffree=0, favail=0, fsid=0, flag=0, namemax=128,
        )

    @sftp_errors
    async def statvfs(self, path: bytes) -> asyncssh.SFTPVFSAttrs:
        await self._stat(path)
        return self._vfs()

    @sftp_errors
    async def fstatvfs(self, file_obj: object) -> asyncssh.SFTPVFSAttrs:
        return self._vfs()

    @sftp_errors
    async def fsync(self, file_obj: object) -> None:
        return None

    @sftp_errors
    async def lock(self, file_obj: object, offset: int, length: int, flags: int) -> None:
        raise asyncssh.SFTPOpUnsupported("Byte-range locks are not supported")

    @sftp_errors
    async def unlock(self, file_obj: object, offset: int, length: int) -> None:
        raise asyncssh.SFTPOpUnsupported("Byte-range locks are not supported")

    @sftp_errors
    async def open56(
        self, path: bytes, desired_access: int, flags: int, attrs: asyncssh.SFTPAttrs
    ) -> object:
        raise asyncssh.SFTPOpUnsupported("SFTP version 3 only")

    def map_path(self, path: bytes) -> bytes:
        raise asyncssh.SFTPNoSuchFile("No such file")

    def reverse_map_path(self, path: bytes) -> bytes:
        raise asyncssh.SFTPNoSuchFile("No such file")

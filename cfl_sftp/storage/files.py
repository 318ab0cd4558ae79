"""The data folder on disk: the content-addressed image library and each process's own scratch space.

Layout under ``data_dir``::

    library/<sha256[:2]>/<sha256>   image bytes, named by their hash (immutable once placed)
    tmp/<owner>/                    files this process is writing; moved into place with an atomic link
    tmp/<owner>.lock                held (``flock``) by the owner for as long as it runs
    trash/<owner>/                  files this process is deleting in the background

Every process that writes (each service node, each CLI run) works in scratch folders of its own, named by its
owner id, here and in the sealed folders (``vault_dir/tmp/<owner>``, ``spool/tmp/<owner>``): several nodes share
one ``data_dir``, so none may clear a folder another is writing in. The owner holds an exclusive ``flock`` on
its lock file; the kernel (or, on NFSv4, the server's lease) drops it when the process dies, however it dies.
:func:`sweep_dead_scratch` removes the folders of owners whose lock is free: a crashed node's uploads in progress
are partial uploads and leave nothing behind.

Files are written to scratch on the same filesystem, fsynced, then linked to their final name, so a reader never
sees a partial image. Every name is built from a hash or a server-made id, never from user input.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

# Deleting a large file can take a noticeable time (ext4 with `discard`: ~165 ms per GiB). Nothing waits for it:
# the file is first renamed into `trash/` (instant, atomic) and unlinked by this one background worker.
_janitor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfl-janitor")

LOCK_SUFFIX = ".lock"


def new_owner_id() -> str:
    """An id unique without coordination (host name, process id, random suffix): a node's, or a CLI run's."""
    return f"{socket.gethostname()[:100]}-{os.getpid()}-{secrets.token_hex(3)}"


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SYNC_EVERY_BYTES = 32 << 20
"""A growing scratch file is handed to the disk each time this much more has been written (:class:`WriteBehind`)."""


class WriteBehind:
    """Writes a growing file's data to disk behind its writer, so the writer never waits for a full disk flush.

    Each time :data:`SYNC_EVERY_BYTES` more have been written, an ``fdatasync`` of the file is started in a
    thread of its own while the writer goes on; the writer waits only if the previous one is still running
    (so at most about twice that much is ever unsynced: the disk is slower than the feed). The final
    :meth:`sync` therefore has little left to write, and the time from an upload's close to its verdict does
    not grow with the package's size. A failed background flush (a full disk) is raised at the next wait.
    """

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._unsynced = 0
        self._flushing: threading.Thread | None = None
        self._error: OSError | None = None

    def wrote(self, size: int) -> None:
        """Count ``size`` more bytes written to the file; start a background flush if enough are pending."""
        self._unsynced += size
        if self._unsynced < SYNC_EVERY_BYTES:
            return
        self._file.flush()  # into the page cache, so the flush below covers them
        self._wait()
        self._unsynced = 0
        self._flushing = threading.Thread(
            target=self._fdatasync, args=(self._file.fileno(),), name="cfl-writeback", daemon=True
        )
        self._flushing.start()

    def sync(self) -> None:
        """Make everything written so far durable (``fsync``); raise a background flush's error."""
        self._file.flush()
        self._wait()
        os.fsync(self._file.fileno())
        self._unsynced = 0

    def stop(self) -> None:
        """Wait for a background flush (the file may then be closed), ignoring its outcome: it is discarded."""
        with contextlib.suppress(OSError):
            self._wait()

    def _fdatasync(self, fd: int) -> None:
        try:
            os.fdatasync(fd)
        except OSError as exc:
            self._error = exc

    def _wait(self) -> None:
        if self._flushing is not None:
            self._flushing.join()
            self._flushing = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive ``flock`` on ``path`` (which must exist), or None if another process holds it
    or the file is gone."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class ScratchClaim:
    """One owner's lock on its scratch folders (one per filesystem root), held while the process runs."""

    def __init__(self, owner: str, lock_dir: Path) -> None:
        self.owner = owner
        self._lock_path = lock_dir / f"{owner}{LOCK_SUFFIX}"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Create and lock the lock file, unless held already (so cheap enough to call before each use).

        A sweeper may remove a lock file between our open and our lock (it saw it free): then the locked inode
        is no longer the one on disk, and we start again."""
        while self._fd is None:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
            else:
                os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        self._lock_path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


class DataFolder:
    """Paths and atomic moves inside ``data_dir``. :meth:`use_scratch` says whose ``tmp/`` and ``trash/`` to use;
    the claim is taken at the first file written, so a process that only reads leaves no folder behind."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.library = root / "library"
        self.tmp_root = root / "tmp"
        self.trash_root = root / "trash"
        self.tmp = self.tmp_root
        self.trash = self.trash_root
        self._claim: ScratchClaim | None = None

    def prepare(self) -> None:
        for folder in (self.root, self.library, self.tmp_root, self.trash_root):
            folder.mkdir(parents=True, exist_ok=True, mode=0o750)

    def use_scratch(self, claim: ScratchClaim) -> None:
        """Write in ``tmp/<owner>`` and delete through ``trash/<owner>`` from now on."""
        self._claim = claim
        self.tmp = self.tmp_root / claim.owner
        self.trash = self.trash_root / claim.owner

    def _scratch(self, folder: Path) -> Path:
        if self._claim is not None:
            self._claim.acquire()
        folder.mkdir(exist_ok=True, mode=0o750)  # (again, if a sweep took it while this node was cut off)
        return folder

    def discard(self, path: Path) -> None:
        """Remove ``path`` without waiting for the filesystem to free its blocks."""
        target = self._scratch(self.trash) / secrets.token_hex(16)
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return
        except OSError:  # another filesystem (vault_dir may be elsewhere): delete in place
            _janitor.submit(path.unlink, missing_ok=True)
            return
        _janitor.submit(target.unlink, missing_ok=True)

    @staticmethod
    def wait_for_discards() -> None:
        """Block until every file discarded so far is gone (the janitor works in order): for whoever must see
        the folders settled, such as a check that no plaintext is left on disk."""
        _janitor.submit(lambda: None).result()

    def new_tmp_path(self, suffix: str) -> Path:
        return self._scratch(self.tmp) / f"{secrets.token_hex(16)}.{suffix}"

    def image_path(self, sha256: str) -> Path:
        return self.library / sha256[:2] / sha256

    def library_files(self) -> Iterator[tuple[str, Path]]:
        """``(sha256, path)`` of every file in the library folder."""
        for shard in self.library.iterdir():
            if shard.is_dir() and len(shard.name) == 2:
                for path in shard.iterdir():
                    yield path.name, path

    def place_image(self, tmp_path: Path, sha256: str) -> bool:
        """Link a fully written, fsynced temp file to its library name; False if that name already existed.

        A hard link, not a rename: the temp file stays until the caller's commit is done, so a commit that the
        database refuses can be tried again. The caller removes the temp name afterwards. An existing file is
        touched: the orphan sweep leaves recently changed files alone, and this one is about to be recorded.
        """
        final = self.image_path(sha256)
        final.parent.mkdir(exist_ok=True)
        try:
            os.link(tmp_path, final)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                os.utime(final)
                return False
            return self.place_image(tmp_path, sha256)  # swept between our link and our touch: place ours
        fsync_dir(final.parent)
        return True

    def remove_image(self, sha256: str) -> None:
        self.image_path(sha256).unlink(missing_ok=True)


def sweep_dead_scratch(lock_dir: Path, scratch_roots: Iterable[Path], *, keep: str, grace_seconds: float,
                       now: float | None = None, before_removal: Callable[[str], None] | None = None) -> list[str]:
    """Remove the scratch folders of every owner but ``keep`` whose lock is free (the process is gone), and
    loose files older than ``grace_seconds`` (left by versions before per-owner scratch). Returns the owners
    swept. ``before_removal(owner)`` runs while the dead owner's lock is held; if it raises, that owner's
    folders stay for the next sweep."""
    roots = list(scratch_roots)
    owners: set[str] = set()
    for root in roots:
        with contextlib.suppress(FileNotFoundError):
            owners.update(p.name for p in root.iterdir() if p.is_dir())
    with contextlib.suppress(FileNotFoundError):
        owners.update(p.name.removesuffix(LOCK_SUFFIX) for p in lock_dir.iterdir() if p.name.endswith(LOCK_SUFFIX))
    owners.discard(keep)
    swept = []
    for owner in sorted(owners):
        lock_path = lock_dir / f"{owner}{LOCK_SUFFIX}"
        fd = _try_lock(lock_path)
        if fd is None and lock_path.exists():
            continue  # its owner is alive
        try:
            if before_removal is not None:
                before_removal(owner)
            for root in roots:
                shutil.rmtree(root / owner, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
        finally:
            if fd is not None:
                os.close(fd)
        swept.append(owner)
    cutoff = (now if now is not None else time.time()) - grace_seconds
    for root in roots:
        with contextlib.suppress(FileNotFoundError):
            for entry in root.iterdir():
                if entry.is_file() and not entry.name.endswith(LOCK_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat().st_ctime < cutoff:
                            entry.unlink()
    return swept

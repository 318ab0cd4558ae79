"""The data folder on disk: the content-addressed image library and scratch space for uploads.

Layout under ``data_dir``::

    library/<sha256[:2]>/<sha256>   image bytes, named by their hash (immutable once placed)
    tmp/                            files being written; moved into place with an atomic rename

Files are written to ``tmp/`` on the same filesystem, fsynced, then renamed, so a reader never sees a partial
image and a crash leaves at most a stray file in ``tmp/`` (removed at start-up). Every name is built from a hash
or a server-made id, never from user input.
"""

from __future__ import annotations

import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Deleting a large file can take a noticeable time (ext4 with `discard`: ~165 ms per GiB). Nothing waits for it:
# the file is first renamed into `trash/` (instant, atomic) and unlinked by this one background worker.
_janitor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfl-janitor")


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DataFolder:
    """Paths and atomic moves inside ``data_dir``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.library = root / "library"
        self.tmp = root / "tmp"
        self.trash = root / "trash"

    def prepare(self) -> None:
        for folder in (self.root, self.library, self.tmp, self.trash):
            folder.mkdir(parents=True, exist_ok=True, mode=0o750)

    def discard(self, path: Path) -> None:
        """Remove ``path`` without waiting for the filesystem to free its blocks."""
        target = self.trash / secrets.token_hex(16)
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return
        except OSError:  # another filesystem (vault_dir may be elsewhere): delete in place
            _janitor.submit(path.unlink, missing_ok=True)
            return
        _janitor.submit(target.unlink, missing_ok=True)

    def empty_trash(self) -> None:
        for entry in self.trash.iterdir():
            entry.unlink(missing_ok=True)

    def clear_tmp(self) -> int:
        """Remove what a crashed process left in ``tmp/`` and ``trash/``; only safe while no upload is in
        progress."""
        self.empty_trash()
        removed = 0
        for entry in self.tmp.iterdir():
            if entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
        return removed

    def new_tmp_path(self, suffix: str) -> Path:
        return self.tmp / f"{secrets.token_hex(16)}.{suffix}"

    def image_path(self, sha256: str) -> Path:
        return self.library / sha256[:2] / sha256

    def place_image(self, tmp_path: Path, sha256: str) -> bool:
        """Link a fully written, fsynced temp file to its library name; False if that name already existed.

        A hard link, not a rename: the temp file stays until the caller's commit is done, so a commit that the
        database refuses can be tried again. The caller removes the temp name afterwards.
        """
        final = self.image_path(sha256)
        final.parent.mkdir(exist_ok=True)
        try:
            os.link(tmp_path, final)
        except FileExistsError:
            return False
        fsync_dir(final.parent)
        return True

    def remove_image(self, sha256: str) -> None:
        self.image_path(sha256).unlink(missing_ok=True)

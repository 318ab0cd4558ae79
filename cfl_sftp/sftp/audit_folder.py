"""What ``/audit`` serves to auditors (SPEC 5, 8): checkpoints, the verifier key and the entries by UTC day.

::

    /audit/checkpoints/<tree size>     a signed checkpoint (C2SP signed note), exactly as stored
    /audit/checkpoints/latest          the newest of them
    /audit/checkpoints/key.vkey        the C2SP verifier key that opens them, and a newline
    /audit/entries/<YYYY-MM-DD>.jsonl  that UTC day's entries in seq order, each the hashed bytes and a newline

The server resolves ``/audit`` itself and hands deeper paths here, only for users whose view grants ``audit``.
Existence is decided before anything is returned (``opendir`` fails at once); the database is read in worker
threads. A name that is not exactly one this folder lists (``007``, ``2025-1-1.jsonl``) does not exist.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import AsyncIterator

import asyncssh

from cfl_sftp import audit_trail
from cfl_sftp.deployment import Deployment
from cfl_sftp.sftp.errors import no_such_file, translate
from cfl_sftp.sftp.handles import BytesHandle, ReadHandle
from cfl_sftp.sftp.server import DIR_MODE, FILE_MODE, _attrs
from cfl_sftp.sftp.tree import EPOCH

CHECKPOINTS = "checkpoints"
ENTRIES = "entries"
LATEST = "latest"
VERIFIER_KEY = "key.vkey"
LISTING_PAGE = 1000

_TREE_SIZE = re.compile(r"[1-9][0-9]{0,18}")
_DAY_FILE = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})\.jsonl")


def _folder_attrs() -> asyncssh.SFTPAttrs:
    return _attrs(DIR_MODE, 0, EPOCH)


def _file_attrs(content_size: int, mtime: dt.datetime) -> asyncssh.SFTPAttrs:
    return _attrs(FILE_MODE, content_size, mtime)


def _verifier_key_file(deployment: Deployment) -> bytes:
    return (audit_trail.AuditSigner.load(deployment.config).vkey + "\n").encode()


def _day_of(name: str) -> dt.date | None:
    match = _DAY_FILE.fullmatch(name)
    if match is None:
        return None
    try:
        day = dt.date.fromisoformat(match.group(1))
    except ValueError:
        return None
    return day if day.isoformat() == match.group(1) else None


def _checkpoint_file(deployment: Deployment, name: str) -> tuple[bytes, dt.datetime] | None:
    """Blocking: the content and time of ``key.vkey``, ``latest`` or ``<tree size>``."""
    if name == VERIFIER_KEY:
        return _verifier_key_file(deployment), EPOCH
    if name == LATEST:
        row = audit_trail.latest_checkpoint(deployment)
    elif _TREE_SIZE.fullmatch(name) and int(name) < 1 << 63:
        row = audit_trail.checkpoint_at(deployment, int(name))
    else:
        return None
    return None if row is None else (row.note.encode(), row.created_at)


async def stat(deployment: Deployment, parts: tuple[str, ...]) -> asyncssh.SFTPAttrs:
    """Attributes of ``/audit/checkpoints``, ``/audit/entries`` or a file in them."""
    if len(parts) == 2 and parts[1] in (CHECKPOINTS, ENTRIES):
        return _folder_attrs()
    if len(parts) == 3 and parts[1] == CHECKPOINTS:
        found = await asyncio.to_thread(_checkpoint_file, deployment, parts[2])
        if found is not None:
            return _file_attrs(len(found[0]), found[1])
    elif len(parts) == 3 and parts[1] == ENTRIES:
        day = _day_of(parts[2])
        stats = await asyncio.to_thread(audit_trail.day_file, deployment, day) if day is not None else None
        if stats is not None:  # the size comes from the database without reading the entries
            return _file_attrs(stats.size, stats.mtime)
    raise no_such_file()


async def open_file(deployment: Deployment, parts: tuple[str, ...]) -> ReadHandle:
    """A read handle on a file of this folder: its bytes are taken whole when it is opened."""
    if len(parts) == 2 and parts[1] in (CHECKPOINTS, ENTRIES):
        raise asyncssh.SFTPFailure("Is a directory")
    if len(parts) == 3 and parts[1] == CHECKPOINTS:
        found = await asyncio.to_thread(_checkpoint_file, deployment, parts[2])
        if found is not None:
            return BytesHandle(found[0])
    elif len(parts) == 3 and parts[1] == ENTRIES:
        day = _day_of(parts[2])
        content = await asyncio.to_thread(audit_trail.day_content, deployment, day) if day is not None else b""
        if content:
            return BytesHandle(content)
    raise no_such_file()


def listing(deployment: Deployment, parts: tuple[str, ...]) -> AsyncIterator[asyncssh.SFTPName]:
    """The names in ``/audit/checkpoints`` or ``/audit/entries``; ``NO_SUCH_FILE`` now for anything else."""
    if parts == ("audit", CHECKPOINTS):
        return _translated(_checkpoint_names(deployment))
    if parts == ("audit", ENTRIES):
        return _translated(_day_names(deployment))
    raise no_such_file()


async def _translated(names: AsyncIterator[asyncssh.SFTPName]) -> AsyncIterator[asyncssh.SFTPName]:
    """A listing read during ``readdir``, outside the server's own error boundary: keep failures safe."""
    try:
        async for name in names:
            yield name
    except Exception as exc:
        raise translate(exc) from None


def _dots() -> list[asyncssh.SFTPName]:
    return [asyncssh.SFTPName(name, attrs=_folder_attrs()) for name in (b".", b"..")]


async def _checkpoint_names(deployment: Deployment) -> AsyncIterator[asyncssh.SFTPName]:
    for name in _dots():
        yield name
    vkey = await asyncio.to_thread(_verifier_key_file, deployment)
    yield asyncssh.SFTPName(VERIFIER_KEY.encode(), attrs=_file_attrs(len(vkey), EPOCH))
    latest = await asyncio.to_thread(audit_trail.latest_checkpoint, deployment)
    if latest is None:
        return
    yield asyncssh.SFTPName(LATEST.encode(), attrs=_file_attrs(len(latest.note.encode()), latest.created_at))
    after = 0
    while after < latest.tree_size:
        page = await asyncio.to_thread(audit_trail.checkpoints_after, deployment, after, LISTING_PAGE)
        if not page:
            return
        for row in page:
            yield asyncssh.SFTPName(str(row.tree_size).encode(),
                                    attrs=_file_attrs(len(row.note.encode()), row.created_at))
        after = page[-1].tree_size


async def _day_names(deployment: Deployment) -> AsyncIterator[asyncssh.SFTPName]:
    for name in _dots():
        yield name
    for day in await asyncio.to_thread(audit_trail.day_files, deployment):
        yield asyncssh.SFTPName(day.name.encode(), attrs=_file_attrs(day.size, day.mtime))

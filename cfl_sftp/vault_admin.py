"""Rotating the vault's key-encryption key (SPEC 7, ``cfl-sftp vault rotate-key [--finish]``), and the heartbeat
by which each running node records the KEK it wraps new data keys with.

A rotation re-wraps the 61-byte wrapped data keys in ``vault_objects``; no sealed file is re-encrypted. It
moves in three steps, and each may be interrupted and run again:

1. **A new key goes first in the ring.** ``rotate-key`` writes the key-ring file anew with a fresh key line
   first (the wrapping key) and every old line after it, atomically (a 0600 temp file, fsynced, renamed over the
   old one). A ring that already holds more than one key is a rotation in progress: a rerun continues it.
2. **Every data key is re-wrapped** under the new key, in batches of :data:`REWRAP_BATCH_ROWS` rows, each batch
   one transaction with its ``key-rotated`` audit entry. This starts only once every live node (seen in the
   last :data:`NODE_LIVE_SECONDS`) wraps with the new key, that is, has loaded the new ring and so can unwrap
   what is re-wrapped. Rows that nodes still wrap under an old key meanwhile are picked up by step 3.
3. **``--finish`` drops the old keys**: it re-wraps what is left, refuses while a live node still wraps with an
   old key, then, in one transaction that holds back every other writer of ``vault_objects``, checks that no
   row is left under an old key, records the audit entry and rewrites the ring with only its first line.

So at every moment every row is wrapped under a key of the ring on disk, and every node can read every note.

Each row's wrap context is derived from what it belongs to, never from its own columns: a release note's is
``note_context`` of the SHA-256 of the image whose ``release_notes_object`` it is; any other object is in the
spool (upload, held package, staging part), whose context is ``spool_context`` of its id. A row whose key does
not unwrap (tampered, moved to another image, or under a key the ring lacks) is left as it is, logged by id,
and makes ``--finish`` refuse: dropping its key would destroy it for good.

What this module leaves to others: telling running nodes to reload the ring (``SIGHUP``), and calling
:func:`record_node_heartbeat` from the service. Key material is never logged, printed or audited; only key ids.
A ring given as ``credential:NAME`` (a systemd credential) cannot be rewritten here: the operator hands every
node a new credential (docs/vault.md), and these functions do the re-wrapping.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from cfl_sftp.deployment import Deployment, KeyFileError, load_keyring, read_secret_file
from cfl_sftp.domain.errors import CflError, VaultError
from cfl_sftp.domain.vault import KeyRing, WrappedKey, generate_key_line
from cfl_sftp.storage import audit_store
from cfl_sftp.storage.audit_store import AuditEvent
from cfl_sftp.storage.files import fsync_dir
from cfl_sftp.storage.models import ImageRow, NodeRow, VaultObjectRow
from cfl_sftp.storage.sealed import note_context, spool_context

log = structlog.get_logger(__name__)

REWRAP_BATCH_ROWS = 500
"""Rows re-wrapped per transaction: short enough not to hold up gateway commits (a few ms on SQLite)."""

NODE_LIVE_SECONDS = 60
"""A node whose heartbeat is older than this is dead (SPEC 9)."""

NODE_HEARTBEAT_SECONDS = 15
"""How often a running node should call :func:`record_node_heartbeat`: well inside :data:`NODE_LIVE_SECONDS`."""

_MAX_PASSES = 10
_CREDENTIAL_PREFIX = "credential:"


class RotationRefused(CflError):
    """A rotation step that cannot be taken now; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class RewrapBatch:
    """One batch: how many rows moved to the wrapping key, which did not unwrap, and where the next starts."""

    rewrapped: int
    unreadable: tuple[str, ...]
    last_object_id: str | None
    """The cursor for the next batch; None when no row was left after ``after``."""


@dataclass(frozen=True, slots=True)
class RewrapReport:
    wrapping_key_id: str
    rewrapped: int
    unreadable: tuple[str, ...]
    """Object ids still under an old key because their data key did not unwrap."""


@dataclass(frozen=True, slots=True)
class RotationReport:
    """What ``vault rotate-key`` did."""

    new_key_id: str
    old_key_ids: tuple[str, ...]
    key_added: bool
    rewrap: RewrapReport


@dataclass(frozen=True, slots=True)
class FinishReport:
    """What ``vault rotate-key --finish`` did."""

    kept_key_id: str
    dropped_key_ids: tuple[str, ...]
    ring_rewritten: bool
    """False when there was nothing to drop, or for a ``credential:`` ring (the operator drops the lines)."""
    rewrap: RewrapReport


# -- node heartbeats ------------------------------------------------------------------------------------


def record_node_heartbeat(deployment: Deployment, node_id: str, now: dt.datetime | None = None) -> None:
    """Record that ``node_id`` is alive and wraps with ``deployment.keyring``'s wrapping key (blocking).

    The service calls it at start, every :data:`NODE_HEARTBEAT_SECONDS` (in a worker thread), and at once
    after it reloads the key ring, so that a rotation can go on without waiting for the next beat.
    """
    moment = now or dt.datetime.now(dt.UTC)
    kek_id = deployment.keyring.wrapping_key_id
    with deployment.db.writing() as session:
        row = session.get(NodeRow, node_id)
        if row is None:
            session.add(NodeRow(node_id=node_id, kek_id=kek_id, started_at=moment, last_seen=moment))
        else:
            row.kek_id = kek_id
            row.last_seen = moment


def node_stopped(deployment: Deployment, node_id: str) -> None:
    """Remove a node's heartbeat when it stops cleanly, so that a rotation need not wait for it to go stale."""
    with deployment.db.writing() as session:
        session.execute(delete(NodeRow).where(NodeRow.node_id == node_id))


def nodes_behind(session: Session, wrapping_key_id: str, now: dt.datetime) -> list[NodeRow]:
    """Live nodes that wrap with another key than ``wrapping_key_id`` (their ring is not the one on disk)."""
    cutoff = now - dt.timedelta(seconds=NODE_LIVE_SECONDS)
    query = (
        select(NodeRow)
        .where(NodeRow.last_seen >= cutoff, NodeRow.kek_id != wrapping_key_id)
        .order_by(NodeRow.node_id)
    )
    return list(session.execute(query).scalars())


def _describe_nodes(nodes: Sequence[NodeRow], now: dt.datetime) -> str:
    return ", ".join(
        f"{n.node_id} (wraps with {n.kek_id}, seen {max(0, int((now - n.last_seen).total_seconds()))} s ago)"
        for n in nodes
    )


# -- the key-ring file ----------------------------------------------------------------------------------


def _ring_path(deployment: Deployment) -> Path | None:
    """The key-ring file, or None for a systemd credential (which only systemd may replace)."""
    spec = deployment.config.vault_key
    return None if spec.startswith(_CREDENTIAL_PREFIX) else Path(spec)


def _load_ring(deployment: Deployment) -> KeyRing:
    """The ring as it is on disk now (refusing a file that others may read), made the deployment's own."""
    try:
        keyring = load_keyring(deployment.config.vault_key)
    except (KeyFileError, OSError) as exc:
        raise RotationRefused(str(exc)) from exc
    deployment.keyring = keyring
    return keyring


def _ring_text(path: Path) -> str:
    try:
        return read_secret_file(path).decode("utf-8")
    except (KeyFileError, UnicodeDecodeError) as exc:
        raise RotationRefused(f"vault key ring {path}: {exc}") from exc


def _key_lines(ring_text: str) -> list[str]:
    return [line.strip() for line in ring_text.splitlines() if line.strip() and not line.strip().startswith("#")]


def write_keyring_file(path: Path, content: str) -> None:
    """Replace the key-ring file atomically: a 0600 temp file beside it, fsynced, renamed over it, the folder
    fsynced. The file keeps its owner and group (an operator may run the CLI as root for a service user); a
    symbolic link is followed, so the file it names is replaced and the link stays."""
    path = path.resolve()
    info = path.stat()
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by an interrupted run: they hold keys
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            with contextlib.suppress(PermissionError):
                os.fchown(handle.fileno(), info.st_uid, info.st_gid)
            handle.write(content.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def new_key_id(keyring: KeyRing, today: dt.date | None = None) -> str:
    """``kek-YYYYMMDD-<6 hex>``: says when it was made, and never repeats a key id seen before."""
    day = today or dt.datetime.now(dt.UTC).date()
    while True:
        key_id = f"kek-{day:%Y%m%d}-{secrets.token_hex(3)}"
        if key_id not in keyring:
            return key_id


def _rotation_event(step: str, new_key_id: str, old_key_ids: Sequence[str], rows: int) -> AuditEvent:
    return AuditEvent(
        event="key-rotated",
        actor="operator",
        organisation="",
        peer="local",
        details={
            "step": step,
            "new_key_id": new_key_id,
            "old_key_ids": sorted(old_key_ids),
            "rows_rewrapped": rows,
        },
    )


def add_wrapping_key(deployment: Deployment) -> tuple[KeyRing, bool]:
    """Step 1: put a new key first in the ring unless a rotation is already in progress (the ring holds more
    than one key). Returns the ring now on disk and whether a key was added."""
    keyring = _load_ring(deployment)
    if len(keyring.key_ids) > 1:
        return keyring, False
    path = _ring_path(deployment)
    if path is None:
        raise RotationRefused(
            f"vault_key is {deployment.config.vault_key}, a systemd credential, which cfl-sftp cannot rewrite: "
            "make a ring with a new key line first and the current line after it, give it to every node as "
            "the new credential and restart them, then run `cfl-sftp vault rotate-key` again (see docs/vault.md)"
        )
    old_text = _ring_text(path)
    key_id = new_key_id(keyring)
    content = generate_key_line(key_id) + "\n" + old_text + ("" if old_text.endswith("\n") else "\n")
    with deployment.db.writing() as session:
        audit_store.append(session, _rotation_event("key-added", key_id, keyring.key_ids, 0))
        write_keyring_file(path, content)
    keyring = _load_ring(deployment)
    if keyring.wrapping_key_id != key_id:  # pragma: no cover - another process rewrote the ring meanwhile
        raise RotationRefused(f"the key ring changed while {key_id} was being added: run the command again")
    log.info("vault_key_added", key_id=key_id, old_key_ids=list(keyring.key_ids[1:]))
    return keyring, True


# -- re-wrapping ----------------------------------------------------------------------------------------


def _why(exc: VaultError) -> str:
    return "; ".join(getattr(exc, "__notes__", ())) or exc.public_message


def _rewrapped(keyring: KeyRing, row: VaultObjectRow, contexts: Sequence[bytes]) -> WrappedKey | None:
    """The row's data key under the wrapping key, or None when it unwraps in none of ``contexts``."""
    reasons = []
    try:
        wrapped = WrappedKey.from_str(row.wrapped_key)
    except VaultError as exc:
        reasons.append(_why(exc))
    else:
        for context in contexts:
            try:
                return keyring.rewrap(wrapped, context)
            except VaultError as exc:
                reasons.append(_why(exc))
    log.warning("vault_key_not_rewrapped", object_id=row.object_id, kind=row.kind, kek_id=row.kek_id,
                reason="; ".join(reasons))
    return None


def rewrap_batch(
    deployment: Deployment, keyring: KeyRing, after: str = "", limit: int = REWRAP_BATCH_ROWS
) -> RewrapBatch:
    """Step 2, one transaction: re-wrap up to ``limit`` rows not under the wrapping key whose object id sorts
    after ``after``, and append one ``key-rotated`` entry for them in the same transaction."""
    wrapping = keyring.wrapping_key_id
    with deployment.db.writing() as session:
        rows = list(
            session.execute(
                select(VaultObjectRow)
                .where(VaultObjectRow.kek_id != wrapping, VaultObjectRow.object_id > after)
                .order_by(VaultObjectRow.object_id)
                .limit(limit)
                .with_for_update()
            ).scalars()
        )
        if not rows:
            return RewrapBatch(0, (), None)
        images: dict[str, list[str]] = {}
        owners = select(ImageRow.release_notes_object, ImageRow.sha256).where(
            ImageRow.release_notes_object.in_([r.object_id for r in rows])
        )
        for object_id, sha256 in session.execute(owners):
            if object_id is not None:
                images.setdefault(object_id, []).append(sha256)
        old_keys: set[str] = set()
        unreadable: list[str] = []
        for row in rows:
            shas = images.get(row.object_id)
            contexts = [note_context(sha) for sha in shas] if shas else [spool_context(row.object_id)]
            wrapped = _rewrapped(keyring, row, contexts)
            if wrapped is None:
                unreadable.append(row.object_id)
                continue
            old_keys.add(row.kek_id)
            row.wrapped_key = wrapped.to_str()
            row.kek_id = wrapped.kek_id
        done = len(rows) - len(unreadable)
        if done:
            audit_store.append(session, _rotation_event("re-wrapped", wrapping, sorted(old_keys), done))
    return RewrapBatch(done, tuple(unreadable), rows[-1].object_id)


def rewrap_all(deployment: Deployment, keyring: KeyRing, batch_rows: int = REWRAP_BATCH_ROWS) -> RewrapReport:
    """Re-wrap every row not under the wrapping key, batch by batch, then again for rows that nodes added
    meanwhile under an old key, until a pass finds nothing more to move (or after a few passes)."""
    total = 0
    unreadable: tuple[str, ...] = ()
    for _pass in range(_MAX_PASSES):
        moved, cursor = 0, ""
        failed: list[str] = []
        while True:
            batch = rewrap_batch(deployment, keyring, cursor, batch_rows)
            if batch.last_object_id is None:
                break
            moved += batch.rewrapped
            failed += batch.unreadable
            cursor = batch.last_object_id
        total += moved
        unreadable = tuple(failed)
        if moved == 0:
            break
    if total:
        log.info("vault_keys_rewrapped", key_id=keyring.wrapping_key_id, rows=total, unreadable=len(unreadable))
    return RewrapReport(keyring.wrapping_key_id, total, unreadable)


def _refuse_nodes_behind(deployment: Deployment, keyring: KeyRing, what: str) -> None:
    now = dt.datetime.now(dt.UTC)
    with deployment.db.reading() as session:
        behind = nodes_behind(session, keyring.wrapping_key_id, now)
    if behind:
        raise RotationRefused(
            f"{what}: {len(behind)} running node(s) do not wrap with {keyring.wrapping_key_id} yet: "
            f"{_describe_nodes(behind, now)}; give them the new key ring, reload them (SIGHUP) and run this again"
        )


def rotate_key(deployment: Deployment) -> RotationReport:
    """``cfl-sftp vault rotate-key``: steps 1 and 2. :class:`RotationRefused` while a live node has not loaded
    the new ring (the key stays added; a rerun continues)."""
    keyring, added = add_wrapping_key(deployment)
    step = f"{keyring.wrapping_key_id} is the new wrapping key" if added else "rotation in progress"
    _refuse_nodes_behind(deployment, keyring, f"{step}, but nothing was re-wrapped")
    rewrap = rewrap_all(deployment, keyring)
    return RotationReport(keyring.wrapping_key_id, keyring.key_ids[1:], added, rewrap)


def finish_rotation(deployment: Deployment) -> FinishReport:
    """``cfl-sftp vault rotate-key --finish``: step 3. :class:`RotationRefused`, with the ring unchanged, while
    a row cannot be re-wrapped, a live node wraps with an old key, or a node wrapped a new row under one."""
    keyring = _load_ring(deployment)
    kept, old = keyring.wrapping_key_id, keyring.key_ids[1:]
    rewrap = rewrap_all(deployment, keyring)
    if rewrap.unreadable:
        raise RotationRefused(
            f"{len(rewrap.unreadable)} data key(s) under an old key did not unwrap (tampered, moved, or under a "
            "key the ring lacks; object ids in the log): dropping their key would destroy them, so the ring "
            "is left as it is"
        )
    _refuse_nodes_behind(deployment, keyring, "the old keys are still in use")
    path = _ring_path(deployment)
    if not old or path is None:
        return FinishReport(kept, old, False, rewrap)
    with deployment.db.writing() as session:
        if not deployment.db.is_sqlite:  # SQLite's writing transaction already excludes every other writer
            session.execute(text("LOCK TABLE vault_objects IN EXCLUSIVE MODE"))
        now = dt.datetime.now(dt.UTC)
        behind = nodes_behind(session, kept, now)
        if behind:
            raise RotationRefused(f"the old keys are still in use: {_describe_nodes(behind, now)}")
        left = session.execute(
            select(func.count()).select_from(VaultObjectRow).where(VaultObjectRow.kek_id != kept)
        ).scalar_one()
        if left:
            raise RotationRefused(
                f"{left} data key(s) were wrapped under an old key meanwhile: run `cfl-sftp vault rotate-key "
                "--finish` again"
            )
        first = _key_lines(_ring_text(path))[0]
        if first.split()[0] != kept:
            raise RotationRefused("the key ring changed while the rotation was being finished: run it again")
        audit_store.append(session, _rotation_event("old-keys-dropped", kept, old, rewrap.rewrapped))
        write_keyring_file(path, first + "\n")
    _load_ring(deployment)
    log.info("vault_old_keys_dropped", key_id=kept, dropped_key_ids=list(old))
    return FinishReport(kept, old, True, rewrap)

"""The audit trail as an application service over the database (SPEC 8): checkpoints, verify, prove, export.

``storage.audit_store`` appends entries in the transaction of the change they record and keeps the tree's
compact range in the ``audit_head`` row; ``domain.audit`` does the hashing and the signed notes. This module
puts the two together:

* :func:`make_checkpoint` signs the tree that ``audit_head`` describes and stores the note under its tree size.
  Ed25519 is deterministic, so every node that signs a given size writes the same row; the first insert wins
  and the others find it there.
* :func:`verify_trail` rebuilds the tree from the entries' bytes, streaming them in ``seq`` order (one
  :class:`~cfl_sftp.domain.audit.CompactRange`, O(n) hashes and O(log n) memory), and checks every checkpoint
  against it. It never trusts the stored ``leaf_hash`` column: that column only helps to *locate* a change once
  a signed root has shown the column itself to be the original one.
* :func:`prove_entry` gives an inclusion proof against the newest checkpoint that covers an entry, computed
  from the entries' bytes and checked against the signed root before it is handed out.
* :func:`export_entries` and the ``/audit`` folder's readers hand out the entries' exact bytes.

Nothing here decides *when* to sign (the service's background task does), and nothing here prints: the CLI
and the SFTP layer present what these functions return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key
from sqlalchemy import Executable, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from cfl_sftp.config import Config
from cfl_sftp.deployment import Deployment, KeyFileError, read_secret_file
from cfl_sftp.domain.audit import (
    EMPTY_ROOT,
    HASH_SIZE,
    Checkpoint,
    CheckpointError,
    CompactRange,
    leaf_hash,
    open_checkpoint,
    sign_checkpoint,
    verifier_key,
    verify_inclusion,
)
from cfl_sftp.storage.db import Database
from cfl_sftp.storage.models import AuditEntryRow, AuditHeadRow, CheckpointRow

log = structlog.get_logger(__name__)

BATCH_ROWS = 10_000
"""Entries fetched from the database at a time while streaming (verify, prove, export)."""

UNSIGNED_WARNING_AGE = dt.timedelta(hours=1)
"""The service signs within 60 s; entries this old with no checkpoint deserve a warning."""

Progress = Callable[[int, int], None]
"""``progress(entries_done, entries_total)``, called once per batch while verifying."""


class AuditTrailError(Exception):
    """The trail cannot answer the request; the message is one line for an operator."""


class NotCovered(AuditTrailError):
    """No signed checkpoint covers the entry yet (or the entry does not exist)."""


class TrailNotVerified(AuditTrailError):
    """The entries or checkpoints have been changed outside the service.

    ``first_bad`` is the ``seq`` of the first bad entry when the evidence names it. Otherwise the change lies
    somewhere in ``bad_range`` (inclusive), between the last checkpoint that verified and the first that did
    not. ``checkpoint`` is the tree size of the checkpoint at fault, when a checkpoint is.
    """

    def __init__(
        self,
        message: str,
        *,
        first_bad: int | None = None,
        bad_range: tuple[int, int] | None = None,
        checkpoint: int | None = None,
    ) -> None:
        super().__init__(message)
        self.first_bad = first_bad
        self.bad_range = bad_range
        self.checkpoint = checkpoint


# -- the signing key -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditSigner:
    """The log's identity: its origin (also the key name) and its Ed25519 key, loaded from ``audit_key``."""

    origin: str
    private_key: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def load(cls, config: Config) -> AuditSigner:
        """Read ``config.audit_key`` (PKCS#8 PEM, mode 0600); :class:`KeyFileError` on any problem."""
        return cls(config.audit_origin, load_audit_key(config.audit_key))

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def vkey(self) -> str:
        """The C2SP verifier key ``<origin>+<key id>+<base64(0x01 || public key)>`` (``key.vkey``)."""
        return verifier_key(self.origin, self.public_key)

    def sign(self, size: int, root: bytes) -> str:
        return sign_checkpoint(self.origin, size, root, self.private_key)


def load_audit_key(path: Path) -> Ed25519PrivateKey:
    """The audit signing key; refuses a file that group or others may read, as every key file."""
    pem = read_secret_file(path)
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnicodeError) as exc:
        raise KeyFileError(f"audit key {path} is not an unencrypted PKCS#8 PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"audit key {path} is not an Ed25519 key")
    return key


# -- reading the database ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _snapshot(db: Database) -> Iterator[Session]:
    """One read transaction that sees one state of the trail throughout.

    SQLite's read transactions are snapshots already (WAL); PostgreSQL's default (read committed) would let the
    head row and the entries come from different moments, so ask for repeatable read there.
    """
    with db.reading() as session:
        if not db.is_sqlite:
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        yield session


def _stream(session: Session, stmt: Executable) -> Iterator[Any]:
    """The rows of ``stmt``, fetched ``BATCH_ROWS`` at a time (a cursor, not a list)."""
    for batch in session.execute(stmt.execution_options(yield_per=BATCH_ROWS)).partitions():
        yield from batch


def _head(session: Session) -> CompactRange:
    """The tree as ``audit_head`` records it (the empty tree before the first entry)."""
    head = session.execute(select(AuditHeadRow)).scalar_one_or_none()
    if head is None:
        return CompactRange()
    tree = CompactRange.from_bytes(head.compact_range)
    if tree.size != head.size:
        raise TrailNotVerified(f"the tree head is damaged: it says {head.size} entries, its range {tree.size}")
    return tree


# -- checkpoints ---------------------------------------------------------------------------------------------


def make_checkpoint(
    deployment: Deployment, now: dt.datetime, signer: AuditSigner | None = None
) -> CheckpointRow | None:
    """Sign the current tree and store the checkpoint, unless one of that size is stored already.

    Returns the stored checkpoint of the current size (this call's or an earlier one's, from any node), or
    None while the trail is empty. The tree is read from ``audit_head``: O(1), no entry is read. Entries
    appended meanwhile do not matter: the note commits to the first ``size`` entries, which never change.
    """
    with deployment.db.reading() as session:
        tree = _head(session)
        if tree.size == 0:
            return None
        stored = session.get(CheckpointRow, tree.size)
    if stored is not None:
        return stored
    signer = signer or AuditSigner.load(deployment.config)
    note = signer.sign(tree.size, tree.root())
    with deployment.db.writing() as session:
        values = {"tree_size": tree.size, "note": note, "created_at": now}
        insert = sqlite_insert if session.get_bind().dialect.name == "sqlite" else postgresql_insert
        inserted = session.execute(
            insert(CheckpointRow).values(values).on_conflict_do_nothing().returning(CheckpointRow.tree_size)
        ).scalar_one_or_none()
        stored = session.get(CheckpointRow, tree.size)
    assert stored is not None
    if stored.note != note:
        # Another node signed this size with another key or origin: verify will refuse one of the two.
        log.error("checkpoint_differs", tree_size=tree.size)
    elif inserted is not None:
        log.info("checkpoint_signed", tree_size=tree.size, root=tree.root().hex())
    return stored


def latest_checkpoint(deployment: Deployment) -> CheckpointRow | None:
    with deployment.db.reading() as session:
        return session.execute(
            select(CheckpointRow).order_by(CheckpointRow.tree_size.desc()).limit(1)
        ).scalar_one_or_none()


def checkpoint_at(deployment: Deployment, size: int) -> CheckpointRow | None:
    with deployment.db.reading() as session:
        return session.get(CheckpointRow, size)


def checkpoints_after(deployment: Deployment, size: int, limit: int) -> list[CheckpointRow]:
    """Up to ``limit`` checkpoints larger than ``size``, smallest first (for listings, page by page)."""
    with deployment.db.reading() as session:
        stmt = (
            select(CheckpointRow)
            .where(CheckpointRow.tree_size > size)
            .order_by(CheckpointRow.tree_size)
            .limit(limit)
        )
        return list(session.execute(stmt).scalars())


# -- verify --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """A trail that verified: ``entries`` in all, the first ``covered`` of them under a signed checkpoint."""

    entries: int
    root: bytes
    checkpoints: int
    covered: int
    warnings: tuple[str, ...] = ()

    @property
    def uncovered(self) -> int:
        """Entries newer than the newest checkpoint: not yet provable, not yet tamper-evident."""
        return self.entries - self.covered


@dataclass(slots=True)
class _Evidence:
    """The earliest entry known to be bad, and why."""

    seq: int
    reason: str


class _TrailWalk:
    """Rebuilds the tree one stored row at a time and checks each checkpoint as the tree reaches its size.

    Pure computation over what the caller reads (sans-IO): rows in ``seq`` order, checkpoints in size order.
    Two trees grow side by side: ``tree`` from the entries' bytes (the truth) and ``recorded`` from the stored
    ``leaf_hash`` column. The second is never trusted; but when its root equals a signed root, the column is
    the original, and comparing the two names exactly which entry changed.
    """

    def __init__(self, vkey: str, checkpoints: Iterator[tuple[int, str]]) -> None:
        self._vkey = vkey
        self._checkpoints = checkpoints
        self._next: tuple[int, Checkpoint] | None = None
        self.tree = CompactRange()
        self.recorded = CompactRange()
        self.checkpoints = 0
        self.last_good = 0  # size of the newest checkpoint that matched (0: the empty tree, trivially)
        self.mismatch: tuple[int, bool] | None = None  # (size, recorded tree matched it) of the first failure
        self.evidence: _Evidence | None = None
        self.first_diff: int | None = None  # first seq after last_good whose stored leaf hash differs
        self.diffs = 0  # entries whose stored leaf hash differs from their bytes' hash
        self.first_diff_anywhere: int | None = None
        self._advance()

    def _advance(self) -> None:
        for size, note in self._checkpoints:
            try:
                checkpoint = open_checkpoint(note, self._vkey)
            except CheckpointError as exc:
                raise TrailNotVerified(f"checkpoint {size} does not verify: {exc}", checkpoint=size) from None
            if checkpoint.size != size:
                raise TrailNotVerified(
                    f"checkpoint {size} is stored under the wrong size (it signs {checkpoint.size})",
                    checkpoint=size,
                )
            self.checkpoints += 1
            if size == 0:
                if checkpoint.root != EMPTY_ROOT:
                    raise TrailNotVerified("checkpoint 0 does not sign the empty tree", checkpoint=0)
                continue
            self._next = (size, checkpoint)
            return
        self._next = None

    def _found(self, seq: int, reason: str) -> None:
        if self.evidence is None or seq < self.evidence.seq:
            self.evidence = _Evidence(seq, reason)

    def row(self, seq: int, entry: bytes, stored_leaf: bytes) -> None:
        position = self.tree.size + 1
        if seq > position:
            self._found(position, "missing: removed" if seq == position + 1 else f"missing, up to {seq - 1}")
        elif seq < position:
            self._found(position, f"a row numbered {seq} was inserted")
        claim = _claimed_seq(entry)
        if claim is None:
            self._found(seq, "not an audit entry")
        elif claim != seq:
            self._found(seq, f"it holds the entry of seq {claim}")
            if self.last_good < claim < seq:
                self._found(claim, f"seq {claim} appears again at seq {seq}: an entry was inserted, copied or moved")
        leaf = leaf_hash(entry)
        if stored_leaf != leaf:
            self.diffs += 1
            if self.first_diff is None:
                self.first_diff = seq
            if self.first_diff_anywhere is None:
                self.first_diff_anywhere = seq
        self.tree.append(leaf)
        self.recorded.append(stored_leaf if len(stored_leaf) == HASH_SIZE else bytes(HASH_SIZE))
        while self._next is not None and self._next[0] == self.tree.size:
            self._check(*self._next)
            self._advance()

    def _check(self, size: int, checkpoint: Checkpoint) -> None:
        if checkpoint.root == self.tree.root():
            if self.mismatch is not None:
                first = self.mismatch[0]
                raise TrailNotVerified(
                    f"checkpoint {first} does not match the entries, yet the later checkpoint {size} does: the "
                    "two are inconsistent (the audit key signed two different histories)",
                    checkpoint=first,
                )
            self.last_good = size
            self.first_diff = None
            self.evidence = None  # nothing up to here is bad: the signed root proves every entry's bytes
        elif self.mismatch is None:
            self.mismatch = (size, checkpoint.root == self.recorded.root())

    def finish(self, head: CompactRange) -> VerifyReport:
        entries = self.tree.size
        if self._next is not None:
            size = self._next[0]
            self._found(entries + 1, f"missing: checkpoint {size} covers {size} entries, the trail holds {entries}")
            if self.mismatch is None:
                self.mismatch = (size, False)
        if self.mismatch is not None:
            raise self._failure(*self.mismatch)
        # Every checkpoint verified. What is left is not covered by any: check it against the head.
        if head.size > entries:
            self._found(entries + 1, f"missing: the tree head records {head.size} entries")
        elif head.size < entries:
            self._found(head.size + 1, f"not appended by the service: the tree head ends at {head.size}")
        elif head.root() != self.tree.root():
            authentic = self.recorded.root() == head.root()
            if self.evidence is None and authentic and self.first_diff is not None:
                self._found(self.first_diff, "changed: its hash differs from the one recorded when it was appended")
            if self.evidence is None:
                raise TrailNotVerified(
                    f"entries after the newest checkpoint ({self.last_good}) do not match the tree head: an entry "
                    f"between seq {self.last_good + 1} and seq {entries} has been changed",
                    bad_range=(self.last_good + 1, entries),
                )
        if self.evidence is not None:
            raise TrailNotVerified(
                f"first bad entry: seq {self.evidence.seq} ({self.evidence.reason}); it is newer than every "
                "checkpoint",
                first_bad=self.evidence.seq,
            )
        warnings = []
        if self.diffs:
            warnings.append(
                f"the stored leaf_hash of {self.diffs} entr{'y' if self.diffs == 1 else 'ies'} (first: seq "
                f"{self.first_diff_anywhere}) differs from the entry's hash; the entries themselves verify"
            )
        return VerifyReport(entries, self.tree.root(), self.checkpoints, self.last_good, tuple(warnings))

    def _failure(self, size: int, recorded_matches: bool) -> TrailNotVerified:
        lo = self.last_good + 1
        proven = (f"checkpoint {self.last_good} proves seq 1 to {self.last_good}" if self.last_good
                  else "no earlier checkpoint proves any entry")
        if recorded_matches and self.first_diff is not None:
            seq = self.first_diff
            return TrailNotVerified(
                f"first bad entry: seq {seq} (changed: checkpoint {size} signs its original hash)",
                first_bad=seq, checkpoint=size,
            )
        if self.evidence is not None and self.evidence.seq <= size:
            seq = self.evidence.seq
            unproven = "" if seq == lo else f"; {_span(lo, seq - 1)} show no change but are unproven ({proven})"
            return TrailNotVerified(
                f"first bad entry: seq {seq} ({self.evidence.reason}); checkpoint {size} does not match"
                f"{unproven}",
                first_bad=seq, bad_range=(lo, seq), checkpoint=size,
            )
        return TrailNotVerified(
            f"checkpoint {size} does not match the entries: the first bad entry is between seq {lo} and seq "
            f"{size} ({proven})",
            bad_range=(lo, size), checkpoint=size,
        )


def _span(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seq {first} to {last}"


def _claimed_seq(entry: bytes) -> int | None:
    """The ``seq`` an entry's own JSON gives, or None when the bytes are not an entry at all."""
    try:
        fields = json.loads(entry)
    except ValueError:
        return None
    seq = fields.get("seq") if isinstance(fields, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def verify_trail(deployment: Deployment, *, progress: Progress | None = None) -> VerifyReport:
    """Check the whole trail; return what verified, or raise :class:`TrailNotVerified` naming the first fault.

    Reads every entry once, in batches, in one read transaction. Checks: ``seq`` runs 1..n with no gap and
    every entry's own ``seq`` is its row's; every checkpoint's signature (by ``audit_key``, origin
    ``audit_origin``) and its root against the root recomputed from the entries at its size. Roots that each
    equal the recomputed prefix are consistent with one another by construction (both are prefixes of one
    leaf sequence); a checkpoint that fails while a later one matches is reported as inconsistent with it.
    Entries after the newest checkpoint are checked against the tree head and reported as uncovered.
    """
    vkey = AuditSigner.load(deployment.config).vkey
    with _snapshot(deployment.db) as session:
        head = _head(session)
        checkpoints = (
            (row.tree_size, row.note)
            for row in _stream(session, select(CheckpointRow.tree_size, CheckpointRow.note)
                               .order_by(CheckpointRow.tree_size))
        )
        walk = _TrailWalk(vkey, checkpoints)
        rows = select(AuditEntryRow.seq, AuditEntryRow.entry, AuditEntryRow.leaf_hash).order_by(AuditEntryRow.seq)
        result = session.execute(rows.execution_options(yield_per=BATCH_ROWS))
        for batch in result.partitions():
            for seq, entry, stored in batch:
                walk.row(seq, entry, stored)
            if progress is not None:
                progress(walk.tree.size, max(head.size, walk.tree.size))
        report = walk.finish(head)
        if report.uncovered:
            oldest = session.get(AuditEntryRow, report.covered + 1)
            if oldest is not None and oldest.time < dt.datetime.now(dt.UTC) - UNSIGNED_WARNING_AGE:
                stale = (f"seq {report.covered + 1} is from {oldest.time:%Y-%m-%d %H:%M}Z and no checkpoint covers "
                         "it: is the service stopped, or were checkpoints removed? Compare with an auditor's copy")
                report = dataclasses.replace(report, warnings=(*report.warnings, stale))
        return report


# -- prove ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """Entry ``seq`` is leaf ``seq - 1`` of the tree that ``checkpoint`` signs (RFC 9162 2.1.3)."""

    seq: int
    tree_size: int
    entry: bytes
    leaf_hash: bytes
    inclusion_path: tuple[bytes, ...]
    root_hash: bytes
    checkpoint: str

    @property
    def leaf_index(self) -> int:
        return self.seq - 1

    def as_json(self) -> dict[str, object]:
        """What ``cfl-sftp audit prove`` prints: hashes in hex, the entry and the note as text."""
        return {
            "seq": self.seq,
            "leaf_index": self.leaf_index,
            "tree_size": self.tree_size,
            "entry": self.entry.decode("utf-8"),
            "leaf_hash": self.leaf_hash.hex(),
            "inclusion_path": [p.hex() for p in self.inclusion_path],
            "root_hash": self.root_hash.hex(),
            "checkpoint": self.checkpoint,
        }


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges ``[lo, hi)`` whose subtree roots make leaf ``index``'s audit path, leaf's sibling first.

    RFC 9162 2.1.3.1 PATH, unrolled: at each level the tree of ``hi - lo`` leaves splits at the largest power of
    two below it, and the half without the leaf is one element of the path. The ranges are disjoint and, with
    the leaf, cover ``[0, size)``, so one pass over the leaves computes them all.
    """
    if not 0 <= index < size:
        raise ValueError(f"no leaf {index} in a tree of {size}")
    ranges = []
    lo, hi = 0, size
    while hi - lo > 1:
        split = 1 << ((hi - lo - 1).bit_length() - 1)
        if index < lo + split:
            ranges.append((lo + split, hi))
            hi = lo + split
        else:
            ranges.append((lo, lo + split))
            lo += split
    ranges.reverse()
    return ranges


def prove_entry(deployment: Deployment, seq: int) -> InclusionProof:
    """The inclusion proof of entry ``seq`` against the newest checkpoint whose tree holds it.

    Computed from the entries' bytes in one streaming pass over the first ``tree_size`` entries (O(tree_size)
    hashes, O(log) memory), and refused (:class:`TrailNotVerified`) unless the recomputed root is the signed
    one: a proof is never handed out for a trail that does not verify. :class:`NotCovered` when no checkpoint
    covers ``seq``.
    """
    vkey = AuditSigner.load(deployment.config).vkey
    with _snapshot(deployment.db) as session:
        stored = session.execute(
            select(CheckpointRow).where(CheckpointRow.tree_size >= max(seq, 1))
            .order_by(CheckpointRow.tree_size.desc()).limit(1)
        ).scalar_one_or_none()
        if seq < 1 or stored is None:
            newest = session.execute(select(func.max(CheckpointRow.tree_size))).scalar_one_or_none() or 0
            covers = f"the newest covers seq 1 to {newest}" if newest else "there is none yet"
            raise NotCovered(f"no checkpoint covers seq {seq} ({covers})")
        try:
            checkpoint = open_checkpoint(stored.note, vkey)
        except CheckpointError as exc:
            raise TrailNotVerified(f"checkpoint {stored.tree_size} does not verify: {exc}",
                                   checkpoint=stored.tree_size) from None
        size = stored.tree_size
        if checkpoint.size != size:
            raise TrailNotVerified(f"checkpoint {size} is stored under the wrong size", checkpoint=size)
        ranges = inclusion_ranges(seq - 1, size)
        by_start = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
        roots: list[bytes] = [b""] * len(ranges)
        tree, part = CompactRange(), CompactRange()
        pending = iter(by_start)
        current = next(pending, None)
        entry = b""
        rows = (
            select(AuditEntryRow.seq, AuditEntryRow.entry)
            .where(AuditEntryRow.seq <= size)
            .order_by(AuditEntryRow.seq)
        )
        for row_seq, row_entry in _stream(session, rows):
            index = tree.size
            if row_seq != index + 1:
                raise TrailNotVerified(f"entry {index + 1} is missing: run `cfl-sftp audit verify`",
                                       first_bad=index + 1)
            leaf = leaf_hash(row_entry)
            tree.append(leaf)
            if index == seq - 1:
                entry = row_entry
                continue
            assert current is not None
            part.append(leaf)
            if part.size == ranges[current][1] - ranges[current][0]:
                roots[current], part = part.root(), CompactRange()
                current = next(pending, None)
    if tree.size != size or tree.root() != checkpoint.root:
        raise TrailNotVerified(
            f"the entries do not match checkpoint {size}: run `cfl-sftp audit verify`", checkpoint=size
        )
    proof = InclusionProof(seq, size, entry, leaf_hash(entry), tuple(roots), checkpoint.root, stored.note)
    if not verify_inclusion(proof.leaf_hash, proof.leaf_index, size, proof.inclusion_path, proof.root_hash):
        raise AssertionError("computed an inclusion proof that does not verify")  # pragma: no cover
    return proof


# -- export and the day files --------------------------------------------------------------------------------


_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def parse_since(text: str) -> int | dt.datetime:
    """``--since``: a ``seq`` (digits) or an RFC 3339 time (a bare ``YYYY-MM-DD`` means 00:00 UTC)."""
    text = text.strip()
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
        text += "T00:00:00Z"
    refusal = ValueError(f"{text!r} is neither a seq nor an RFC 3339 time such as 2025-03-01T12:00:00Z")
    if not _RFC3339.fullmatch(text):
        raise refusal
    try:
        moment = dt.datetime.fromisoformat(text.upper().replace(" ", "T"))
    except ValueError:
        raise refusal from None
    return moment.astimezone(dt.UTC)


def export_entries(deployment: Deployment, since: int | dt.datetime | None = None) -> Iterator[bytes]:
    """The entries' exact bytes in ``seq`` order, from seq ``since`` or from the time ``since`` on.

    A generator that holds one read transaction open while the caller consumes it. With several nodes
    ``time`` need not grow with ``seq``, so a time selects entries *at or after* it, still in ``seq`` order.
    """
    stmt = select(AuditEntryRow.entry).order_by(AuditEntryRow.seq)
    if isinstance(since, int):
        stmt = stmt.where(AuditEntryRow.seq >= since)
    elif isinstance(since, dt.datetime):
        stmt = stmt.where(AuditEntryRow.time >= since)
    with deployment.db.reading() as session:
        for (entry,) in _stream(session, stmt):
            yield entry


@dataclass(frozen=True, slots=True)
class DayFile:
    """``/audit/entries/<day>.jsonl``: that UTC day's entries, each followed by a newline."""

    day: dt.date
    entries: int
    size: int
    mtime: dt.datetime

    @property
    def name(self) -> str:
        return f"{self.day.isoformat()}.jsonl"


def _day_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


def _day_file(session: Session, day: dt.date) -> DayFile | None:
    start, end = _day_bounds(day)
    count, size, mtime = session.execute(
        select(func.count(), func.sum(func.length(AuditEntryRow.entry)), func.max(AuditEntryRow.time))
        .where(AuditEntryRow.time >= start, AuditEntryRow.time < end)
    ).one()
    if not count:
        return None
    return DayFile(day, int(count), int(size) + int(count), mtime)


def day_file(deployment: Deployment, day: dt.date) -> DayFile | None:
    with deployment.db.reading() as session:
        return _day_file(session, day)


def day_files(deployment: Deployment) -> list[DayFile]:
    """Every UTC day that has entries, oldest first.

    Hops from day to day over the ``time`` index (one ``min(time)`` per day) instead of grouping every row, so
    the cost is that of the days' own sizes, with no dialect-specific date arithmetic.
    """
    files: list[DayFile] = []
    with deployment.db.reading() as session:
        after: dt.datetime | None = None
        while True:
            stmt = select(func.min(AuditEntryRow.time))
            if after is not None:
                stmt = stmt.where(AuditEntryRow.time >= after)
            first = session.execute(stmt).scalar_one_or_none()
            if first is None:
                return files
            day = first.astimezone(dt.UTC).date()
            found = _day_file(session, day)
            if found is not None:
                files.append(found)
            after = _day_bounds(day)[1]


def day_content(deployment: Deployment, day: dt.date) -> bytes:
    """The bytes of ``/audit/entries/<day>.jsonl``: exactly the hashed bytes, one entry per line."""
    start, end = _day_bounds(day)
    stmt = (
        select(AuditEntryRow.entry)
        .where(AuditEntryRow.time >= start, AuditEntryRow.time < end)
        .order_by(AuditEntryRow.seq)
    )
    with deployment.db.reading() as session:
        return b"".join(entry + b"\n" for (entry,) in _stream(session, stmt))

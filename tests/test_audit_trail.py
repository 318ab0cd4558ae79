"""The audit trail over a real deployment (SPEC 8): checkpoints, verify, prove, export and ``/audit`` over SFTP.

Entries come from real packages through the gateway (``PackageUpload``) or from ``audit_store.append_many``;
tampering is done as an intruder would, directly in the SQLite file with the ``sqlite3`` module. Proofs are
checked with nothing but ``hashlib`` (RFC 9162 2.1.3.2), as an auditor would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncssh
import pytest
from sqlalchemy import func, select
from structlog.testing import capture_logs

from cfl_sftp import audit_trail, service
from cfl_sftp.audit_trail import (
    AuditSigner,
    NotCovered,
    TrailNotVerified,
    export_entries,
    inclusion_ranges,
    make_checkpoint,
    parse_since,
    prove_entry,
    verify_trail,
)
from cfl_sftp.deployment import Deployment, KeyFileError
from cfl_sftp.domain.audit import inclusion_proof, leaf_hash, open_checkpoint, sign_checkpoint
from cfl_sftp.intake import PackageUpload, Uploader
from cfl_sftp.service import RunningService, start
from cfl_sftp.sftp import audit_folder
from cfl_sftp.storage import audit_store
from cfl_sftp.storage.audit_store import AuditEvent
from cfl_sftp.storage.models import AuditEntryRow, CheckpointRow
from tests.deployments import DeploymentUnderTest, make_deployment
from tests.factory import PackageSpec, build

ACME = Uploader("acme-release", "acme-meters", "127.0.0.1:50000")
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


# -- helpers -------------------------------------------------------------------------------------------------


def append(td: DeploymentUnderTest, count: int, now: dt.datetime | None = None) -> list[int]:
    events = [AuditEvent("policy-reloaded", "operator", "", "", {"n": i}) for i in range(count)]
    with td.deployment.db.writing() as session:
        return audit_store.append_many(session, events, now)


def checkpoint(td: DeploymentUnderTest) -> CheckpointRow:
    row = make_checkpoint(td.deployment, dt.datetime.now(dt.UTC))
    assert row is not None
    return row


def upload_packages(td: DeploymentUnderTest, count: int) -> None:
    """Real packages through the gateway: each one appends a ``package-received`` entry."""
    for i in range(count):
        job = PackageUpload(td.deployment, ACME, f"p{i}.cfl")
        job.write(build(PackageSpec(firmware_version=f"{0x20 + i:08X}")))
        job.complete()


def vkey(td: DeploymentUnderTest) -> str:
    return AuditSigner.load(td.deployment.config).vkey


@contextlib.contextmanager
def sqlite_file(td: DeploymentUnderTest) -> Iterator[sqlite3.Connection]:
    """The intruder's view: the database file itself, changed behind the service's back."""
    path = td.deployment.config.database_url.removeprefix("sqlite:///")
    connection = sqlite3.connect(path)
    try:
        yield connection
        connection.commit()
    finally:
        connection.close()


def entry_bytes(td: DeploymentUnderTest, seq: int) -> bytes:
    with sqlite_file(td) as db:
        return bytes(db.execute("SELECT entry FROM audit_entries WHERE seq = ?", (seq,)).fetchone()[0])


def edit_entry(td: DeploymentUnderTest, seq: int, *, fix_leaf_hash: bool = False) -> None:
    """Change one entry's bytes (a plausible edit: the JSON stays valid and keeps its seq)."""
    changed = entry_bytes(td, seq).replace(b'"operator"', b'"someone"').replace(b'"acme-release"', b'"someone"')
    assert changed != entry_bytes(td, seq)
    with sqlite_file(td) as db:
        db.execute("UPDATE audit_entries SET entry = ? WHERE seq = ?", (changed, seq))
        if fix_leaf_hash:
            db.execute("UPDATE audit_entries SET leaf_hash = ? WHERE seq = ?", (leaf_hash(changed), seq))


def failure(td: DeploymentUnderTest) -> TrailNotVerified:
    with pytest.raises(TrailNotVerified) as caught:
        verify_trail(td.deployment)
    return caught.value


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def root_from_inclusion_path(leaf: bytes, index: int, size: int, path: list[bytes]) -> bytes:
    """RFC 9162 2.1.3.2 written out with hashlib alone, as an auditor would (not the product's code)."""
    fn, sn, node = index, size - 1, leaf
    for sibling in path:
        assert sn > 0, "path too long"
        if fn & 1 or fn == sn:
            node = sha256(b"\x01" + sibling + node)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            node = sha256(b"\x01" + node + sibling)
        fn, sn = fn >> 1, sn >> 1
    assert sn == 0, "path too short"
    return node


# -- checkpoints ---------------------------------------------------------------------------------------------


def test_checkpoint_signs_the_tree_of_every_entry(td: DeploymentUnderTest) -> None:
    upload_packages(td, 2)
    append(td, 3)
    row = checkpoint(td)

    opened = open_checkpoint(row.note, vkey(td))
    with td.deployment.db.reading() as session:
        entries = list(session.execute(select(AuditEntryRow.entry).order_by(AuditEntryRow.seq)).scalars())
    assert (opened.origin, opened.size, row.tree_size) == ("cfl-sftp", 5, 5)
    level = [leaf_hash(e) for e in entries]  # RFC 9162 MTH, pairing neighbours level by level
    while len(level) > 1:
        paired = [sha256(b"\x01" + level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
        level = paired + ([level[-1]] if len(level) % 2 else [])
    assert opened.root == level[0]


def test_an_empty_trail_has_no_checkpoint(td: DeploymentUnderTest) -> None:
    assert make_checkpoint(td.deployment, dt.datetime.now(dt.UTC)) is None


def test_checkpoint_is_signed_once_per_tree_size(td: DeploymentUnderTest) -> None:
    append(td, 4)
    first = checkpoint(td)
    again = make_checkpoint(td.deployment, dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5))
    assert again is not None
    assert (again.tree_size, again.note, again.created_at) == (first.tree_size, first.note, first.created_at)


def test_two_nodes_signing_the_same_size_store_identical_checkpoints(td: DeploymentUnderTest) -> None:
    append(td, 7)
    other_node = Deployment.open(td.deployment.config)
    try:
        mine = checkpoint(td)
        with td.deployment.db.writing() as session:
            session.execute(CheckpointRow.__table__.delete())
        theirs = make_checkpoint(other_node, dt.datetime.now(dt.UTC))
    finally:
        other_node.close()
    assert theirs is not None
    assert (theirs.tree_size, theirs.note) == (mine.tree_size, mine.note)
    # And when both race for the same size, the second insert leaves the first row alone.
    signer = AuditSigner.load(td.deployment.config)
    opened = open_checkpoint(mine.note, signer.vkey)
    assert sign_checkpoint("cfl-sftp", 7, opened.root, signer.private_key) == mine.note
    with td.deployment.db.reading() as session:
        assert session.execute(select(func.count()).select_from(CheckpointRow)).scalar_one() == 1


def test_audit_key_readable_by_others_is_refused(td: DeploymentUnderTest) -> None:
    append(td, 1)
    td.deployment.config.audit_key.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        make_checkpoint(td.deployment, dt.datetime.now(dt.UTC))


def test_audit_key_that_is_not_ed25519_is_refused(td: DeploymentUnderTest) -> None:
    td.deployment.config.audit_key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyFileError, match="PKCS#8"):
        AuditSigner.load(td.deployment.config)


def test_verifier_key_is_c2sp_format(td: DeploymentUnderTest) -> None:
    signer = AuditSigner.load(td.deployment.config)
    name, key_id, material = signer.vkey.split("+", 2)
    raw = base64.b64decode(material)
    assert name == "cfl-sftp"
    assert raw == b"\x01" + signer.public_key
    assert key_id == sha256(b"cfl-sftp\n\x01" + signer.public_key)[:4].hex()


# -- verify: an untouched trail ------------------------------------------------------------------------------


def test_untouched_trail_verifies(td: DeploymentUnderTest) -> None:
    upload_packages(td, 3)
    checkpoint(td)
    append(td, 20)
    checkpoint(td)

    report = verify_trail(td.deployment)

    assert (report.entries, report.checkpoints, report.covered, report.uncovered) == (23, 2, 23, 0)
    assert report.warnings == ()


def test_entries_after_the_newest_checkpoint_are_reported_uncovered(td: DeploymentUnderTest) -> None:
    append(td, 10)
    checkpoint(td)
    append(td, 4)

    report = verify_trail(td.deployment)

    assert (report.entries, report.covered, report.uncovered) == (14, 10, 4)


def test_an_empty_trail_verifies(td: DeploymentUnderTest) -> None:
    report = verify_trail(td.deployment)
    assert (report.entries, report.checkpoints, report.uncovered) == (0, 0, 0)


def test_a_trail_without_any_checkpoint_verifies_as_uncovered(td: DeploymentUnderTest) -> None:
    append(td, 3)
    report = verify_trail(td.deployment)
    assert (report.checkpoints, report.covered, report.uncovered) == (0, 0, 3)


def test_old_entries_without_a_checkpoint_are_a_warning(td: DeploymentUnderTest) -> None:
    append(td, 2, dt.datetime.now(dt.UTC) - dt.timedelta(days=2))
    checkpoint(td)
    append(td, 3, dt.datetime.now(dt.UTC) - dt.timedelta(days=1))  # as if the checkpoints since were removed

    report = verify_trail(td.deployment)

    assert report.uncovered == 3
    assert len(report.warnings) == 1
    assert "seq 3 is from" in report.warnings[0]


def test_verify_streams_in_small_batches_and_reports_progress(
    td: DeploymentUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    for size in (3, 4, 9, 16, 17):
        append(td, size - verify_trail(td.deployment).entries)
        checkpoint(td)
    monkeypatch.setattr(audit_trail, "BATCH_ROWS", 4)
    seen: list[tuple[int, int]] = []

    report = verify_trail(td.deployment, progress=lambda done, total: seen.append((done, total)))

    assert (report.entries, report.checkpoints, report.covered) == (17, 5, 17)
    assert seen == [(4, 17), (8, 17), (12, 17), (16, 17), (17, 17)]


# -- verify: tampering ---------------------------------------------------------------------------------------


@pytest.mark.sqlite_only
def test_changed_entry_is_named(td: DeploymentUnderTest) -> None:
    upload_packages(td, 2)
    append(td, 10)
    checkpoint(td)
    edit_entry(td, 7)

    problem = failure(td)

    assert problem.first_bad == 7
    assert "seq 7" in str(problem)


@pytest.mark.sqlite_only
def test_changed_package_entry_is_named(td: DeploymentUnderTest) -> None:
    upload_packages(td, 3)
    checkpoint(td)
    edit_entry(td, 2)
    assert failure(td).first_bad == 2


@pytest.mark.sqlite_only
def test_changed_entry_with_a_matching_leaf_hash_is_located_between_checkpoints(td: DeploymentUnderTest) -> None:
    append(td, 4)
    checkpoint(td)
    append(td, 8)
    checkpoint(td)
    edit_entry(td, 7, fix_leaf_hash=True)  # the intruder covers its tracks in the leaf_hash column too

    problem = failure(td)

    assert problem.first_bad is None
    assert problem.bad_range == (5, 12)
    assert problem.checkpoint == 12
    assert "between seq 5 and seq 12" in str(problem)


@pytest.mark.sqlite_only
def test_removed_entry_is_named(td: DeploymentUnderTest) -> None:
    append(td, 12)
    checkpoint(td)
    with sqlite_file(td) as db:
        db.execute("DELETE FROM audit_entries WHERE seq = 7")

    problem = failure(td)

    assert problem.first_bad == 7
    assert "seq 7 (missing" in str(problem)


@pytest.mark.sqlite_only
def test_removed_entry_with_later_ones_renumbered_is_named(td: DeploymentUnderTest) -> None:
    append(td, 12)
    checkpoint(td)
    with sqlite_file(td) as db:
        db.execute("DELETE FROM audit_entries WHERE seq = 7")
        db.execute("UPDATE audit_entries SET seq = -seq WHERE seq > 7")
        db.execute("UPDATE audit_entries SET seq = -seq - 1 WHERE seq < 0")

    assert failure(td).first_bad == 7


@pytest.mark.sqlite_only
def test_removed_newest_entries_are_named(td: DeploymentUnderTest) -> None:
    append(td, 12)
    checkpoint(td)
    with sqlite_file(td) as db:
        db.execute("DELETE FROM audit_entries WHERE seq > 10")

    assert failure(td).first_bad == 11


@pytest.mark.sqlite_only
@pytest.mark.sqlite_only
def test_inserted_entry_is_named(td: DeploymentUnderTest) -> None:
    append(td, 12)
    checkpoint(td)
    forged = entry_bytes(td, 7).replace(b'"operator"', b'"intruder"')
    with sqlite_file(td) as db:  # make room at seq 7, as an intruder who wants no gap would
        db.execute("UPDATE audit_entries SET seq = -seq WHERE seq >= 7")
        db.execute("UPDATE audit_entries SET seq = -seq + 1 WHERE seq < 0")
        db.execute("INSERT INTO audit_entries (seq, time, event, entry, leaf_hash) "
                   "SELECT 7, time, event, ?, ? FROM audit_entries WHERE seq = 8",
                   (forged, leaf_hash(forged)))

    problem = failure(td)

    assert problem.first_bad == 7
    assert "seq 7" in str(problem)


@pytest.mark.sqlite_only
@pytest.mark.sqlite_only
def test_swapped_entries_are_named(td: DeploymentUnderTest) -> None:
    append(td, 12)
    checkpoint(td)
    sixth, ninth = entry_bytes(td, 6), entry_bytes(td, 9)
    with sqlite_file(td) as db:
        db.execute("UPDATE audit_entries SET entry = ? WHERE seq = 6", (ninth,))
        db.execute("UPDATE audit_entries SET entry = ? WHERE seq = 9", (sixth,))

    assert failure(td).first_bad == 6


@pytest.mark.sqlite_only
def test_reordered_rows_are_named(td: DeploymentUnderTest) -> None:
    append(td, 12)
    checkpoint(td)
    with sqlite_file(td) as db:  # swap whole rows, leaf_hash column and all
        db.execute("UPDATE audit_entries SET seq = -1 WHERE seq = 6")
        db.execute("UPDATE audit_entries SET seq = 6 WHERE seq = 9")
        db.execute("UPDATE audit_entries SET seq = 9 WHERE seq = -1")

    assert failure(td).first_bad == 6


@pytest.mark.sqlite_only
def test_entry_before_the_last_good_checkpoint_is_proven_untouched(td: DeploymentUnderTest) -> None:
    append(td, 5)
    checkpoint(td)
    append(td, 5)
    checkpoint(td)
    with sqlite_file(td) as db:
        db.execute("DELETE FROM audit_entries WHERE seq = 8")

    problem = failure(td)

    assert problem.first_bad == 8
    assert problem.bad_range == (6, 8)
    assert "checkpoint 5 proves seq 1 to 5" in str(problem)


@pytest.mark.sqlite_only
def test_changed_entry_after_the_newest_checkpoint_fails_against_the_tree_head(td: DeploymentUnderTest) -> None:
    append(td, 5)
    checkpoint(td)
    append(td, 5)
    edit_entry(td, 8)

    problem = failure(td)

    assert problem.first_bad == 8
    assert "newer than every checkpoint" in str(problem)


@pytest.mark.sqlite_only
@pytest.mark.sqlite_only
def test_row_added_after_the_tree_head_is_named(td: DeploymentUnderTest) -> None:
    append(td, 5)
    checkpoint(td)
    forged = entry_bytes(td, 5).replace(b'"seq":5', b'"seq":6')
    with sqlite_file(td) as db:
        db.execute("INSERT INTO audit_entries (seq, time, event, entry, leaf_hash) "
                   "SELECT 6, time, event, ?, ? FROM audit_entries WHERE seq = 5", (forged, leaf_hash(forged)))

    problem = failure(td)

    assert problem.first_bad == 6
    assert "not appended by the service" in str(problem)


@pytest.mark.sqlite_only
def test_a_changed_leaf_hash_column_alone_is_only_a_warning(td: DeploymentUnderTest) -> None:
    append(td, 6)
    checkpoint(td)
    with sqlite_file(td) as db:
        db.execute("UPDATE audit_entries SET leaf_hash = ? WHERE seq = 3", (bytes(32),))

    report = verify_trail(td.deployment)

    assert report.covered == 6
    assert len(report.warnings) == 1
    assert "seq 3" in report.warnings[0]


@pytest.mark.sqlite_only
def test_checkpoint_with_a_bad_signature_fails(td: DeploymentUnderTest) -> None:
    append(td, 6)
    note = checkpoint(td).note
    body, signature = note.rsplit(" ", 1)
    raw = bytearray(base64.b64decode(signature))
    raw[-1] ^= 1
    with sqlite_file(td) as db:
        db.execute("UPDATE checkpoints SET note = ?", (f"{body} {base64.b64encode(raw).decode()}\n",))

    problem = failure(td)

    assert problem.checkpoint == 6
    assert "checkpoint 6 does not verify" in str(problem)


@pytest.mark.sqlite_only
def test_checkpoint_stored_under_another_size_fails(td: DeploymentUnderTest) -> None:
    append(td, 6)
    checkpoint(td)
    with sqlite_file(td) as db:
        db.execute("UPDATE checkpoints SET tree_size = 5")

    assert "wrong size" in str(failure(td))


def test_checkpoint_of_another_history_is_inconsistent_with_the_later_ones(td: DeploymentUnderTest) -> None:
    append(td, 10)
    checkpoint(td)
    # A key holder signs a size-5 tree that is not a prefix of the stored one: a fork.
    signer = AuditSigner.load(td.deployment.config)
    fork = signer.sign(5, sha256(b"another history"))
    with td.deployment.db.writing() as session:
        session.add(CheckpointRow(tree_size=5, note=fork, created_at=dt.datetime.now(dt.UTC)))

    problem = failure(td)

    assert problem.checkpoint == 5
    assert "inconsistent" in str(problem)


def test_checkpoint_signed_by_another_key_fails(td: DeploymentUnderTest, tmp_path: Path) -> None:
    append(td, 4)
    checkpoint(td)
    other = make_deployment(tmp_path / "other")
    try:
        td.deployment.config.audit_key.write_bytes(other.deployment.config.audit_key.read_bytes())
    finally:
        other.deployment.close()

    assert failure(td).checkpoint == 4


# -- prove ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", [1, 2, 6, 11, 13])
@pytest.mark.sqlite_only
def test_proof_checks_with_plain_hashlib_against_the_signed_checkpoint(td: DeploymentUnderTest, seq: int) -> None:
    upload_packages(td, 2)
    append(td, 11)
    checkpoint(td)

    proof = prove_entry(td.deployment, seq).as_json()

    entry = str(proof["entry"]).encode("utf-8")
    assert entry == entry_bytes(td, seq)
    assert (proof["seq"], proof["leaf_index"], proof["tree_size"]) == (seq, seq - 1, 13)
    leaf = sha256(b"\x00" + entry)
    assert proof["leaf_hash"] == leaf.hex()
    path = [bytes.fromhex(p) for p in proof["inclusion_path"]]  # type: ignore[attr-defined]
    root = root_from_inclusion_path(leaf, seq - 1, 13, path)
    assert root.hex() == proof["root_hash"]
    signed = open_checkpoint(str(proof["checkpoint"]), vkey(td))
    assert (signed.size, signed.root) == (13, root)


def test_proof_is_against_the_newest_checkpoint_that_covers_the_entry(td: DeploymentUnderTest) -> None:
    append(td, 5)
    checkpoint(td)
    append(td, 5)
    checkpoint(td)
    append(td, 2)

    assert prove_entry(td.deployment, 3).tree_size == 10
    assert prove_entry(td.deployment, 10).tree_size == 10
    with pytest.raises(NotCovered, match="seq 1 to 10"):
        prove_entry(td.deployment, 11)
    with pytest.raises(NotCovered):
        prove_entry(td.deployment, 0)


def test_no_proof_without_a_checkpoint(td: DeploymentUnderTest) -> None:
    append(td, 2)
    with pytest.raises(NotCovered, match="none yet"):
        prove_entry(td.deployment, 1)


@pytest.mark.sqlite_only
def test_no_proof_for_a_trail_that_does_not_verify(td: DeploymentUnderTest) -> None:
    append(td, 8)
    checkpoint(td)
    edit_entry(td, 2)
    with pytest.raises(TrailNotVerified):
        prove_entry(td.deployment, 5)


def test_streamed_inclusion_path_is_the_rfc_9162_path() -> None:
    leaves = [sha256(bytes([i])) for i in range(40)]
    for size in range(1, 41):
        for index in range(size):
            ranges = inclusion_ranges(index, size)
            streamed = [audit_trail_root(leaves[lo:hi]) for lo, hi in ranges]
            assert streamed == inclusion_proof(leaves, index, size), (index, size)


def audit_trail_root(leaves: list[bytes]) -> bytes:
    from cfl_sftp.domain.audit import root_from_leaf_hashes

    return root_from_leaf_hashes(leaves)


# -- export --------------------------------------------------------------------------------------------------


def test_export_gives_the_exact_bytes_in_seq_order(td: DeploymentUnderTest) -> None:
    upload_packages(td, 1)
    append(td, 4)
    with td.deployment.db.reading() as session:
        stored = list(session.execute(select(AuditEntryRow.entry).order_by(AuditEntryRow.seq)).scalars())
    assert list(export_entries(td.deployment)) == stored
    assert list(export_entries(td.deployment, 3)) == stored[2:]


def test_export_since_a_time_selects_entries_at_or_after_it(td: DeploymentUnderTest) -> None:
    append(td, 2, T0)
    append(td, 3, T0 + dt.timedelta(hours=1))
    append(td, 1, T0 - dt.timedelta(days=1))  # a node with a slow clock: time need not grow with seq

    since = parse_since("2026-03-01T12:30:00Z")
    exported = [json.loads(e)["seq"] for e in export_entries(td.deployment, since)]

    assert exported == [3, 4, 5]
    assert [json.loads(e)["seq"] for e in export_entries(td.deployment, parse_since("2026-03-01"))] == [1, 2, 3, 4, 5]


def test_since_accepts_seq_and_rfc_3339_only() -> None:
    assert parse_since("42") == 42
    assert parse_since("2026-03-01T13:00:00+01:00") == T0
    assert parse_since("2026-03-01t12:00:00.5z") == T0 + dt.timedelta(milliseconds=500)
    for bad in ("yesterday", "2026-03-01T12:00:00", "-3", "2026-13-01T00:00:00Z"):
        with pytest.raises(ValueError, match="neither a seq nor an RFC 3339 time"):
            parse_since(bad)


# -- the /audit folder ---------------------------------------------------------------------------------------


@pytest.mark.sqlite_only
async def test_audit_folder_resolves_only_names_it_lists(td: DeploymentUnderTest) -> None:
    append(td, 3, T0)
    checkpoint(td)
    d = td.deployment

    day = await audit_folder.stat(d, ("audit", "entries", "2026-03-01.jsonl"))
    content = await (await audit_folder.open_file(d, ("audit", "entries", "2026-03-01.jsonl"))).read(0, 1 << 20)
    assert day.size == len(content) == sum(len(entry_bytes(td, s)) + 1 for s in (1, 2, 3))
    assert (await audit_folder.stat(d, ("audit", "checkpoints", "3"))).size == len(checkpoint(td).note.encode())
    for missing in (("audit", "checkpoints", "03"), ("audit", "checkpoints", "4"), ("audit", "entries", "x"),
                    ("audit", "checkpoints", "9" * 19), ("audit", "entries", "２０２６-03-01.jsonl"),
                    ("audit", "entries", "2026-03-02.jsonl"), ("audit", "entries", "2026-3-01.jsonl"),
                    ("audit", "other"), ("audit", "checkpoints", "3", "x")):
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await audit_folder.stat(d, missing)
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await audit_folder.open_file(d, missing)
    with pytest.raises(asyncssh.SFTPNoSuchFile):
        audit_folder.listing(d, ("audit", "checkpoints", "3"))  # at once, not at the first readdir


async def test_day_files_split_entries_by_utc_day(td: DeploymentUnderTest) -> None:
    append(td, 2, T0)
    append(td, 1, T0 + dt.timedelta(days=2))
    append(td, 1, T0 + dt.timedelta(hours=1))

    names = [n.filename async for n in audit_folder.listing(td.deployment, ("audit", "entries"))]
    second = await audit_folder.open_file(td.deployment, ("audit", "entries", "2026-03-01.jsonl"))

    assert names == [b".", b"..", b"2026-03-01.jsonl", b"2026-03-03.jsonl"]
    assert [json.loads(line)["seq"] for line in (await second.read(0, 1 << 20)).splitlines()] == [1, 2, 4]


@contextlib.asynccontextmanager
async def running_service(tmp_path: Path) -> AsyncIterator[tuple[DeploymentUnderTest, RunningService]]:
    td = make_deployment(tmp_path, settings={"listen": '["127.0.0.1:0"]'})
    running = await start(td.deployment.config, td.deployment)
    try:
        yield td, running
    finally:
        await running.stop()


@contextlib.asynccontextmanager
async def sftp_as(td: DeploymentUnderTest, running: RunningService, user: str) -> AsyncIterator[asyncssh.SFTPClient]:
    async with asyncssh.connect(
        "127.0.0.1", running.ports[0], username=user, client_keys=[str(td.key_path(user))], known_hosts=None,
    ) as conn, conn.start_sftp_client() as sftp:
        yield sftp


def audit_rows(td: DeploymentUnderTest) -> list[AuditEntryRow]:
    with td.deployment.db.reading() as session:
        return list(session.execute(select(AuditEntryRow).order_by(AuditEntryRow.seq)).scalars())


async def until(condition: object, timeout: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_auditor_reads_checkpoints_key_and_todays_entries_over_sftp(tmp_path: Path) -> None:
    async with running_service(tmp_path) as (td, running), sftp_as(td, running, "auditor") as sftp:
        await asyncio.to_thread(upload_packages, td, 1)
        await until(lambda: any(r.event == "login-accepted" for r in audit_rows(td)))
        row = await asyncio.to_thread(checkpoint, td)

        latest = await (await sftp.open("/audit/checkpoints/latest", "rb")).read()
        numbered = await (await sftp.open(f"/audit/checkpoints/{row.tree_size}", "rb")).read()
        key = await (await sftp.open("/audit/checkpoints/key.vkey", "rb")).read()
        today = dt.datetime.now(dt.UTC).date().isoformat()
        day = await (await sftp.open(f"/audit/entries/{today}.jsonl", "rb")).read()
        listed = {n.filename: n for n in await sftp.readdir("/audit/checkpoints")}
        days = await sftp.listdir("/audit/entries")
        rows = await asyncio.to_thread(audit_rows, td)

    assert latest == numbered == row.note.encode()
    assert key == (vkey(td) + "\n").encode()
    assert open_checkpoint(latest.decode(), key.decode().strip()).size == row.tree_size
    assert day == b"".join(r.entry + b"\n" for r in rows if r.time.date().isoformat() == today)
    assert {"key.vkey", "latest", str(row.tree_size)} <= set(listed)
    assert listed[str(row.tree_size)].attrs.size == len(latest)
    assert str(listed["latest"].longname).split()[1:3] == ["cfl", "cfl"]
    assert f"{today}.jsonl" in days


async def test_auditor_missing_audit_folder_fails_at_opendir(tmp_path: Path) -> None:
    async with running_service(tmp_path) as (td, running), sftp_as(td, running, "auditor") as sftp:
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp._handler.opendir(b"/audit/nothing")  # one OPENDIR request, no READDIR
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp._handler.opendir(b"/audit/checkpoints/latest")
        assert await sftp._handler.opendir(b"/audit/entries")


async def test_auditor_can_stat_audit_files(tmp_path: Path) -> None:
    async with running_service(tmp_path) as (td, running), sftp_as(td, running, "auditor") as sftp:
        await until(lambda: any(r.event == "login-accepted" for r in audit_rows(td)))
        note = (await asyncio.to_thread(checkpoint, td)).note
        today = dt.datetime.now(dt.UTC).date().isoformat()
        rows = await asyncio.to_thread(audit_rows, td)
        assert (await sftp.stat("/audit/checkpoints")).type == asyncssh.FILEXFER_TYPE_DIRECTORY
        assert (await sftp.stat("/audit/checkpoints/latest")).size == len(note.encode())
        assert (await sftp.lstat("/audit/checkpoints/key.vkey")).size == len(vkey(td)) + 1
        assert (await sftp.stat(f"/audit/entries/{today}.jsonl")).size == sum(
            len(r.entry) + 1 for r in rows if r.time.date().isoformat() == today)
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp.stat("/audit/checkpoints/999")


async def test_supplier_sees_no_audit_folder(tmp_path: Path) -> None:
    async with running_service(tmp_path) as (td, running):
        await asyncio.to_thread(append, td, 2)
        await asyncio.to_thread(checkpoint, td)
        async with sftp_as(td, running, "northern-ops") as sftp:
            for path in ("/audit", "/audit/checkpoints", "/audit/checkpoints/latest", "/audit/entries"):
                with pytest.raises(asyncssh.SFTPNoSuchFile):
                    await sftp.stat(path)
                with pytest.raises(asyncssh.SFTPNoSuchFile):
                    await sftp.open(path, "rb")
            with pytest.raises(asyncssh.SFTPNoSuchFile):
                await sftp._handler.opendir(b"/audit/checkpoints")
            assert "audit" not in await sftp.listdir("/")


# -- the service signs -----------------------------------------------------------------------------------------


async def test_service_signs_soon_after_new_entries_and_at_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "CHECKPOINT_SECONDS", 0.05)
    async with running_service(tmp_path) as (td, _):
        await asyncio.to_thread(append, td, 3)
        await until(lambda: audit_trail.latest_checkpoint(td.deployment) is not None)
        assert audit_trail.latest_checkpoint(td.deployment).tree_size == 3  # type: ignore[union-attr]
        monkeypatch.setattr(service, "CHECKPOINT_SECONDS", 3600.0)
        await asyncio.sleep(0.1)  # the task is now asleep for an hour
        await asyncio.to_thread(append, td, 2)
    reopened = Deployment.open(td.deployment.config)
    try:
        assert audit_trail.latest_checkpoint(reopened).tree_size == 5  # type: ignore[union-attr]
        assert verify_trail(reopened).uncovered == 0
    finally:
        reopened.close()


async def test_service_refuses_to_start_with_an_exposed_audit_key(tmp_path: Path) -> None:
    td = make_deployment(tmp_path, settings={"listen": '["127.0.0.1:0"]'})
    td.deployment.config.audit_key.chmod(0o640)
    try:
        with pytest.raises(KeyFileError):
            await start(td.deployment.config, td.deployment)
    finally:
        td.deployment.close()


# -- secrets -------------------------------------------------------------------------------------------------


async def test_no_secret_reaches_an_audit_entry_or_a_log_line(tmp_path: Path) -> None:
    marker = b"release-note-marker-5e1f7a"
    with capture_logs() as logs:
        async with running_service(tmp_path) as (td, running):
            package = build(PackageSpec(release_notes=b"# Fixes\n" + marker + b"\n"))
            await asyncio.to_thread(_upload, td, package)
            await asyncio.to_thread(running.runtime.refresh_catalogue_now)
            async with sftp_as(td, running, "northern-ops") as sftp:
                notes = await (await sftp.open(
                    "/images/ESME/1A2B/0001/0100/00000010/release-notes.md", "rb")).read()
            async with sftp_as(td, running, "auditor") as sftp:
                await (await sftp.open("/audit/checkpoints/key.vkey", "rb")).read()
            await asyncio.to_thread(checkpoint, td)
            await asyncio.to_thread(verify_trail, td.deployment)
            await asyncio.to_thread(prove_entry, td.deployment, 1)
            td.deployment.config.audit_key.chmod(0o644)
            with pytest.raises(KeyFileError):
                await asyncio.to_thread(verify_trail, td.deployment)
            td.deployment.config.audit_key.chmod(0o600)
        entries = b"\n".join(r.entry for r in audit_rows(td))
    assert marker in notes  # the note was read, so a leak had its chance

    keyring_line = Path(td.deployment.config.vault_key).read_text().strip()
    pem = td.deployment.config.audit_key.read_text()
    secrets = [marker.decode(), keyring_line, keyring_line.split()[-1], pem]
    secrets += [line for line in pem.splitlines() if line and not line.startswith("-----")]
    logged = "\n".join(repr(event) for event in logs)
    events = {e["event"] for e in logs}
    assert {"checkpoint_signed", "service_started"} <= events  # the capture saw this code's logs
    assert b"release-note-read" in entries
    for secret in secrets:
        assert secret not in logged
        assert secret.encode() not in entries


def _upload(td: DeploymentUnderTest, package: bytes) -> None:
    job = PackageUpload(td.deployment, ACME, "notes.cfl")
    job.write(package)
    job.complete()


@pytest.mark.sqlite_only
def test_database_file_holds_no_audit_key(td: DeploymentUnderTest) -> None:
    append(td, 3)
    checkpoint(td)
    pem = td.deployment.config.audit_key.read_text()
    body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
    raw_private = base64.b64decode(body)[-32:]
    database = Path(td.deployment.config.database_url.removeprefix("sqlite:///"))
    stored = database.read_bytes() + (Path(f"{database}-wal").read_bytes() if Path(f"{database}-wal").exists() else b"")
    assert raw_private not in stored
    assert body.encode() not in stored
    assert os.stat(td.deployment.config.audit_key).st_mode & 0o077 == 0

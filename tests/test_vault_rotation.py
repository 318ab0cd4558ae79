"""Rotating the vault's key-encryption key (SPEC 7, ``cfl-sftp vault rotate-key [--finish]``) on real deployments.

Each test builds its library through the gateway (release notes, a held package, a staging file), runs the
command as an operator would (``cfl_sftp.cli.main`` in process, or the service functions it calls), then opens
every sealed object with the key ring that is on disk at that moment. The tests that involve a node read the
notes over SFTP from a real server; what ``SIGHUP`` should do to a node (read the ring again, record the key it
now wraps with) is done by :func:`reload_node`.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, update
from structlog.testing import capture_logs

from cfl_sftp import vault_admin
from cfl_sftp.cli import main
from cfl_sftp.deployment import Deployment, KeyFileError, load_keyring
from cfl_sftp.domain.errors import VaultError
from cfl_sftp.domain.vault import KeyRing, generate_key_line
from cfl_sftp.intake import PackageUpload, Uploader
from cfl_sftp.staging import StagingArea
from cfl_sftp.storage.models import (
    AuditEntryRow,
    Base,
    HeldPackageRow,
    ImageRow,
    NodeRow,
    StagingPartRow,
    VaultObjectRow,
)
from cfl_sftp.storage.sealed import SealedReader, note_context, spool_context
from cfl_sftp.vault_admin import (
    NODE_LIVE_SECONDS,
    RewrapReport,
    add_wrapping_key,
    node_stopped,
    record_node_heartbeat,
    rewrap_batch,
)
from tests.deployments import DeploymentUnderTest, make_deployment
from tests.factory import PackageSpec, build
from tests.sftp_support import IMAGE_DIR, SftpServer, read_all

ACME = Uploader("acme-release", "acme-meters", "127.0.0.1:50000")
NOTE_NAME = "release-notes.md"


def notes_of(version: str) -> bytes:
    return f"# Release notes for {version}\n".encode() + b"Fixes the tariff switch.\n" * 50


def spec(version: str) -> PackageSpec:
    return PackageSpec(firmware_version=version, release_notes=notes_of(version))


def feed(deployment: Deployment, package: bytes, name: str = "p.cfl") -> None:
    upload = PackageUpload(deployment, ACME, name)
    upload.write(package)
    upload.complete()


def seed_library(td: DeploymentUnderTest, versions: tuple[str, ...] = ("00000010", "00000011")) -> None:
    """Notes for each version, a held duplicate, and a staging file: every kind of sealed object."""
    for version in versions:
        feed(td.deployment, build(spec(version)), f"{version}.cfl")
    feed(td.deployment, build(spec(versions[0])), "again.cfl")
    writer = StagingArea(td.deployment).open_writer("acme-release", "acme-meters", "part.tmp", truncate=True)
    writer.write(0, b"staged bytes")
    writer.close()


def cli(td: DeploymentUnderTest, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["vault", "rotate-key", "--config", str(td.config_path), *args])
    out, err = capsys.readouterr()
    return code, out, err


def ring_path(td: DeploymentUnderTest) -> Path:
    return Path(td.deployment.config.vault_key)


def ring_lines(td: DeploymentUnderTest) -> list[str]:
    return ring_path(td).read_text().splitlines()


def ring_on_disk(td: DeploymentUnderTest) -> KeyRing:
    return load_keyring(td.deployment.config.vault_key)


def rows(deployment: Deployment) -> list[VaultObjectRow]:
    with deployment.db.reading() as session:
        return list(session.execute(select(VaultObjectRow).order_by(VaultObjectRow.object_id)).scalars())


def plaintext_of_every_object(deployment: Deployment, keyring: KeyRing) -> dict[str, bytes]:
    """Every sealed object opened with ``keyring`` in the context of what it belongs to."""
    with deployment.db.reading() as session:
        notes = dict(session.execute(select(ImageRow.release_notes_object, ImageRow.sha256)).all())
        spooled = set(session.execute(select(HeldPackageRow.vault_object)).scalars())
        spooled |= set(session.execute(select(StagingPartRow.vault_object)).scalars())
    found = {}
    for row in rows(deployment):
        if row.object_id in notes:
            path, context = deployment.vault.path_of(row.object_id), note_context(notes[row.object_id])
        else:
            assert row.object_id in spooled, row.object_id
            path, context = deployment.spool.path_of(row.object_id), spool_context(row.object_id)
        reader = SealedReader.open(path, row, keyring, context)
        try:
            found[row.object_id] = b"".join(reader.chunks())
        finally:
            reader.close()
    return found


def key_rotated_entries(deployment: Deployment) -> list[dict[str, object]]:
    with deployment.db.reading() as session:
        entries = session.execute(
            select(AuditEntryRow.entry).where(AuditEntryRow.event == "key-rotated").order_by(AuditEntryRow.seq)
        ).scalars()
        return [json.loads(e) for e in entries]


def reload_node(deployment: Deployment, node_id: str = "node-1") -> None:
    """What ``SIGHUP`` does to a running node: read the key ring again, record the key it now wraps with."""
    deployment.keyring = load_keyring(deployment.config.vault_key)
    record_node_heartbeat(deployment, node_id)


# -- rotate-key -------------------------------------------------------------------------------------------


def test_rotate_key_puts_a_new_wrapping_key_first_and_keeps_the_old_line(
    td: DeploymentUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    old_lines = ring_lines(td)

    code, out, _ = cli(td, capsys)

    assert code == 0
    lines = ring_lines(td)
    assert lines[1:] == old_lines
    new_id = lines[0].split()[0]
    assert new_id != "kek-1"
    assert ring_on_disk(td).key_ids == (new_id, "kek-1")
    assert ring_path(td).stat().st_mode & 0o777 == 0o600
    assert f"added {new_id} as the wrapping key" in out
    assert [p.name for p in ring_path(td).parent.iterdir() if p.name.endswith(".tmp")] == []


def test_rewritten_ring_keeps_its_symbolic_link_and_its_owner(
    td: DeploymentUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = td.root / "secrets"
    elsewhere.mkdir(mode=0o700)
    target = elsewhere / "vault.keyring"
    ring_path(td).rename(target)
    ring_path(td).symlink_to(target)
    owner = (target.stat().st_uid, target.stat().st_gid)
    if os.geteuid() == 0:  # root runs the CLI for a service user: the file stays that user's
        owner = (65534, 65534)
        os.chown(target, *owner)

    assert cli(td, capsys)[0] == 0

    assert ring_path(td).is_symlink()
    assert len(target.read_text().splitlines()) == 2
    assert (target.stat().st_uid, target.stat().st_gid) == owner
    assert target.stat().st_mode & 0o777 == 0o600


def test_rotation_rewraps_every_data_key_and_every_object_still_opens(
    td: DeploymentUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_library(td)
    old_ring = ring_on_disk(td)
    before = plaintext_of_every_object(td.deployment, old_ring)
    assert len(before) == 4  # two notes, one held package, one staging part

    code, out, _ = cli(td, capsys)

    assert code == 0
    new_ring = ring_on_disk(td)
    assert {row.kek_id for row in rows(td.deployment)} == {new_ring.wrapping_key_id}
    assert "re-wrapped 4 data key(s)" in out
    assert plaintext_of_every_object(td.deployment, new_ring) == before
    assert set(before.values()) >= {notes_of("00000010"), notes_of("00000011"), b"staged bytes"}
    with pytest.raises(VaultError):  # the keys really moved: the old ring alone no longer opens them
        plaintext_of_every_object(td.deployment, old_ring)


def test_rotate_key_waits_for_live_nodes_to_load_the_new_ring_before_rewrapping(
    td: DeploymentUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_library(td)
    record_node_heartbeat(td.deployment, "node-1")  # wraps with kek-1

    code, _, err = cli(td, capsys)

    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert "node-1 (wraps with kek-1" in err
    assert len(ring_on_disk(td).key_ids) == 2  # the key is added; the rerun continues
    assert {row.kek_id for row in rows(td.deployment)} == {"kek-1"}

    reload_node(td.deployment)
    code, out, _ = cli(td, capsys)

    assert code == 0
    assert "continuing the rotation" in out
    assert len(ring_on_disk(td).key_ids) == 2
    assert {row.kek_id for row in rows(td.deployment)} == {ring_on_disk(td).wrapping_key_id}


def test_interrupted_rotation_leaves_every_object_readable_and_a_rerun_continues(
    td: DeploymentUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_library(td, ("00000010", "00000011", "00000012", "00000013"))
    expected = plaintext_of_every_object(td.deployment, ring_on_disk(td))
    keyring, added = add_wrapping_key(td.deployment)
    assert added

    first = rewrap_batch(td.deployment, keyring, limit=2)  # then the process dies

    assert first.rewrapped == 2
    assert len({row.kek_id for row in rows(td.deployment)}) == 2
    restarted = Deployment.open(td.deployment.config)  # a node (re)started now reads the ring on disk
    try:
        assert plaintext_of_every_object(restarted, restarted.keyring) == expected
    finally:
        restarted.close()

    code, out, _ = cli(td, capsys)

    assert code == 0
    assert "continuing the rotation" in out
    assert ring_on_disk(td).key_ids == keyring.key_ids  # no third key
    assert {row.kek_id for row in rows(td.deployment)} == {keyring.wrapping_key_id}
    assert plaintext_of_every_object(td.deployment, ring_on_disk(td)) == expected


# -- --finish ---------------------------------------------------------------------------------------------


def test_finish_leaves_only_the_new_key_and_every_object_still_opens(
    td: DeploymentUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_library(td)
    expected = plaintext_of_every_object(td.deployment, ring_on_disk(td))
    assert cli(td, capsys)[0] == 0
    first_line = ring_lines(td)[0]

    code, out, _ = cli(td, capsys, "--finish")

    assert code == 0
    assert ring_lines(td) == [first_line]
    assert ring_path(td).stat().st_mode & 0o777 == 0o600
    assert "dropped kek-1" in out
    assert plaintext_of_every_object(td.deployment, ring_on_disk(td)) == expected


def test_finish_is_refused_while_a_live_node_wraps_with_an_old_key(
    td: DeploymentUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_library(td)
    assert cli(td, capsys)[0] == 0
    lagging = dataclasses.replace(td.deployment, keyring=KeyRing.parse(ring_lines(td)[1]))
    record_node_heartbeat(lagging, "node-2")  # a node that was not given the new ring
    before = ring_path(td).read_text()

    code, _, err = cli(td, capsys, "--finish")

    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert "node-2 (wraps with kek-1" in err
    assert ring_path(td).read_text() == before


def test_finish_ignores_a_node_silent_for_60_seconds(
    td: DeploymentUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_library(td)
    assert cli(td, capsys)[0] == 0
    lagging = dataclasses.replace(td.deployment, keyring=KeyRing.parse(ring_lines(td)[1]))
    record_node_heartbeat(lagging, "node-2", dt.datetime.now(dt.UTC) - dt.timedelta(seconds=NODE_LIVE_SECONDS + 1))

    code, _, _ = cli(td, capsys, "--finish")

    assert code == 0
    assert len(ring_lines(td)) == 1


def test_finish_first_rewraps_keys_a_lagging_node_wrapped_under_the_old_key(
    td: DeploymentUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(td, capsys)[0] == 0
    lagging = dataclasses.replace(td.deployment, keyring=KeyRing.parse(ring_lines(td)[1]))
    feed(lagging, build(spec("00000020")))  # accepted by a node still on the old ring
    assert {row.kek_id for row in rows(td.deployment)} == {"kek-1"}

    code, out, _ = cli(td, capsys, "--finish")

    assert code == 0
    assert "re-wrapped 1 data key(s)" in out
    ring = ring_on_disk(td)
    assert ring.key_ids == (ring.wrapping_key_id,)
    assert list(plaintext_of_every_object(td.deployment, ring).values()) == [notes_of("00000020")]


def test_finish_refuses_when_a_key_under_an_old_key_appears_after_its_last_batch(
    td: DeploymentUnderTest, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli(td, capsys)[0] == 0
    lagging = dataclasses.replace(td.deployment, keyring=KeyRing.parse(ring_lines(td)[1]))
    rewrap_all = vault_admin.rewrap_all

    def rewrap_then_a_node_commits(deployment: Deployment, keyring: KeyRing) -> RewrapReport:
        report = rewrap_all(deployment, keyring)
        feed(lagging, build(spec("00000020")))  # between the last batch and the check
        return report

    monkeypatch.setattr(vault_admin, "rewrap_all", rewrap_then_a_node_commits)
    before = ring_path(td).read_text()

    code, _, err = cli(td, capsys, "--finish")

    assert code == 1
    assert "1 data key(s) were wrapped under an old key meanwhile" in err
    assert ring_path(td).read_text() == before
    monkeypatch.undo()
    assert cli(td, capsys, "--finish")[0] == 0
    assert list(plaintext_of_every_object(td.deployment, ring_on_disk(td)).values()) == [notes_of("00000020")]


def test_finish_with_a_single_key_has_nothing_to_drop(
    td: DeploymentUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    before = ring_path(td).read_text()

    code, out, _ = cli(td, capsys, "--finish")

    assert code == 0
    assert "nothing to drop" in out
    assert ring_path(td).read_text() == before


# -- what does not unwrap is never destroyed --------------------------------------------------------------


def swap_release_notes(deployment: Deployment) -> None:
    with deployment.db.writing() as session:
        first, second = session.execute(select(ImageRow).order_by(ImageRow.id)).scalars().all()[:2]
        a, b = first.release_notes_object, second.release_notes_object
        session.execute(update(ImageRow).where(ImageRow.id == first.id).values(release_notes_object=None))
        session.execute(update(ImageRow).where(ImageRow.id == second.id).values(release_notes_object=a))
        session.execute(update(ImageRow).where(ImageRow.id == first.id).values(release_notes_object=b))


def test_data_key_that_does_not_unwrap_stays_under_its_key_and_blocks_finish(
    td: DeploymentUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_library(td)
    swap_release_notes(td.deployment)  # each note now claims to belong to the other image

    with capture_logs() as logs:
        code, _, err = cli(td, capsys)

    assert code == 1
    assert "2 data key(s) did not unwrap" in err
    kept = [row for row in rows(td.deployment) if row.kek_id == "kek-1"]
    assert len(kept) == 2
    refusals = [e for e in logs if e["event"] == "vault_key_not_rewrapped"]
    assert {e["object_id"] for e in refusals} == {row.object_id for row in kept}
    assert all("did not authenticate" in e["reason"] for e in refusals)

    code, _, err = cli(td, capsys, "--finish")

    assert code == 1
    assert "did not unwrap" in err
    assert "kek-1" in ring_on_disk(td)

    swap_release_notes(td.deployment)  # put right: nothing was lost, and the rotation can end
    assert cli(td, capsys, "--finish")[0] == 0
    assert len(plaintext_of_every_object(td.deployment, ring_on_disk(td))) == 4


# -- audit ------------------------------------------------------------------------------------------------


def test_every_rotation_step_is_audited_without_key_material(
    td: DeploymentUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    seed_library(td)
    old_key = ring_lines(td)[0].split()[1]
    with capture_logs() as logs:
        assert cli(td, capsys)[0] == 0
        new_id, new_key = ring_lines(td)[0].split()
        assert cli(td, capsys, "--finish")[0] == 0
    out, err = capsys.readouterr()

    entries = key_rotated_entries(td.deployment)
    steps = [e["details"]["step"] for e in entries]  # type: ignore[index]
    assert steps == ["key-added", "re-wrapped", "old-keys-dropped"]
    for entry in entries:
        details = entry["details"]
        assert details["new_key_id"] == new_id  # type: ignore[index]
        assert details["old_key_ids"] == ["kek-1"]  # type: ignore[index]
        assert entry["actor"] == "operator"
    assert entries[1]["details"]["rows_rewrapped"] == 4  # type: ignore[index]
    with td.deployment.db.reading() as session:
        trail = b"".join(session.execute(select(AuditEntryRow.entry)).scalars())
    written = [trail, repr(logs).encode(), (out + err).encode()]
    for key in (old_key, new_key):
        for form in (key.encode(), base64.b64decode(key), base64.b64decode(key).hex().encode()):
            assert not any(form in text for text in written)


# -- the key ring's own protection ------------------------------------------------------------------------


def test_key_ring_readable_by_others_is_refused(td: DeploymentUnderTest, capsys: pytest.CaptureFixture[str]) -> None:
    os.chmod(ring_path(td), 0o644)
    before = ring_path(td).read_text()

    with pytest.raises(KeyFileError, match="chmod 600"):
        load_keyring(td.deployment.config.vault_key)
    with pytest.raises(KeyFileError):
        Deployment.open(td.deployment.config)
    code, _, err = cli(td, capsys)

    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert "readable by group or others" in err
    assert ring_path(td).read_text() == before


def test_key_ring_as_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    credential = credentials / "vault.keyring"
    credential.write_text(generate_key_line("kek-1") + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    td = make_deployment(tmp_path, settings={"vault_key": '"credential:vault.keyring"'})
    try:
        seed_library(td)
        assert td.deployment.keyring.key_ids == ("kek-1",)
        expected = plaintext_of_every_object(td.deployment, td.deployment.keyring)

        code, _, err = cli(td, capsys)  # cfl-sftp cannot rewrite a credential: the operator gives a new one

        assert code == 1
        assert "systemd credential" in err
        assert "docs/vault.md" in err
        assert len(credential.read_text().splitlines()) == 1

        credential.write_text(generate_key_line("kek-2") + "\n" + credential.read_text())
        code, out, _ = cli(td, capsys)

        assert code == 0
        assert "re-wrapped 4 data key(s) under kek-2" in out
        code, out, _ = cli(td, capsys, "--finish")

        assert code == 0
        assert "remove the lines of kek-1 from the credential" in out
        credential.write_text(credential.read_text().splitlines()[0] + "\n")
        reopened = Deployment.open(td.deployment.config)
        try:
            assert reopened.keyring.key_ids == ("kek-2",)
            assert plaintext_of_every_object(reopened, reopened.keyring) == expected
        finally:
            reopened.close()

        monkeypatch.delenv("CREDENTIALS_DIRECTORY")
        with pytest.raises(KeyFileError, match="CREDENTIALS_DIRECTORY"):
            load_keyring("credential:vault.keyring")
    finally:
        td.deployment.close()


# -- nodes ------------------------------------------------------------------------------------------------


def test_node_heartbeat_records_the_key_the_node_wraps_with(td: DeploymentUnderTest) -> None:
    record_node_heartbeat(td.deployment, "node-1")
    add_wrapping_key(td.deployment)  # the deployment now holds the new ring, as after a reload
    record_node_heartbeat(td.deployment, "node-1")

    with td.deployment.db.reading() as session:
        node = session.get(NodeRow, "node-1")
    assert node is not None
    assert node.kek_id == td.deployment.keyring.wrapping_key_id != "kek-1"
    assert node.started_at <= node.last_seen
    assert dt.datetime.now(dt.UTC) - node.last_seen < dt.timedelta(seconds=10)

    node_stopped(td.deployment, "node-1")
    with td.deployment.db.reading() as session:
        assert session.get(NodeRow, "node-1") is None


def test_upgraded_database_matches_the_models(td: DeploymentUnderTest) -> None:
    with td.deployment.db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


# -- a whole rotation while the service runs ----------------------------------------------------------------


async def read_note(server: SftpServer, version: str) -> bytes:
    async with server.sftp("northern-ops") as sftp:
        return await read_all(sftp, f"{IMAGE_DIR.removesuffix('00000010')}{version}/{NOTE_NAME}")


async def test_notes_read_over_sftp_at_every_step_of_a_rotation(
    sftp_server: SftpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    td, node = sftp_server.td, sftp_server.td.deployment
    versions = ("00000010", "00000011")
    for version in versions:
        await sftp_server.seed(spec(version), name=f"{version}.cfl")
    reload_node(node, sftp_server.service.node_id)

    async def every_note_reads() -> None:
        for version in versions:
            assert await read_note(sftp_server, version) == notes_of(version)

    await every_note_reads()
    assert cli(td, capsys)[0] == 1  # the key is added, but node-1 has not loaded it: nothing re-wrapped
    await every_note_reads()
    reload_node(node, sftp_server.service.node_id)  # what the service's SIGHUP does
    assert cli(td, capsys)[0] == 0
    await every_note_reads()
    await sftp_server.seed(spec("00000012"), name="late.cfl")  # wrapped by the node under the new key
    assert cli(td, capsys, "--finish")[0] == 0
    await every_note_reads()
    reload_node(node, sftp_server.service.node_id)
    await every_note_reads()
    assert await read_note(sftp_server, "00000012") == notes_of("00000012")
    assert node.keyring.key_ids == (node.keyring.wrapping_key_id,)

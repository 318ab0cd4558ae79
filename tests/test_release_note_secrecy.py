"""Release notes stay secret (SPEC 7): plaintext exists only in memory while an entitled user reads it.

Everything here goes through a real server on 127.0.0.1 with asyncssh's client. Release notes carry a random
marker; after packages are accepted, held, staged and cut off, and a note is read (whole and in pieces), no file
of the deployment (database with its ``-wal``/``-shm``, data, vault, spool, keys), no log line and no temp file
made meanwhile may hold the marker. Tampered notes (an altered byte, a note moved to another image, a file
swapped on disk, a wrong key-encryption key) fail with an SFTP status, a log event says why without quoting a
secret, and the server goes on serving.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from sqlalchemy import select, update
from structlog.testing import capture_logs

from cfl_sftp.deployment import Deployment
from cfl_sftp.domain.vault import HEADER_SIZE, SEGMENT_SIZE, generate_key_line
from cfl_sftp.service import start
from cfl_sftp.storage.models import ImageRow, VaultObjectRow
from tests.factory import PackageSpec, build, image_of
from tests.sftp_support import (
    IMAGE_DIR,
    IMAGE_PATH,
    SEEDED_ESME,
    SftpServer,
    read_all,
    receipt_named,
    sftp_answer,
    start_sftp_server,
    write_all,
)

NOTE_PATH = f"{IMAGE_DIR}/release-notes.md"
UNREADABLE = "The file could not be read."


def marked_notes(marker: bytes, lines: int) -> bytes:
    return b"# Release notes\n" + b"".join(b"%s fixes item %06d\n" % (marker, i) for i in range(lines))


# -- searching for the marker -------------------------------------------------------------------------------


def regular_files(root: Path) -> Iterator[Path]:
    for folder, _dirs, names in os.walk(root, onerror=lambda _error: None):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                yield path


def holds(path: Path, needle: bytes, piece: int = 1 << 20) -> bool:
    """Whether the file's bytes (read in pieces that overlap by the needle's length) or its name hold it."""
    if needle in os.fsencode(path):
        return True
    try:
        with path.open("rb") as handle:
            tail = b""
            while chunk := handle.read(piece):
                if needle in tail + chunk:
                    return True
                tail = chunk[-len(needle) :]
    except OSError:  # vanished or unreadable meanwhile (another process's temp file)
        return False
    return False


def files_holding(needle: bytes, paths: Iterable[Path]) -> list[Path]:
    return [path for path in paths if holds(path, needle)]


def temp_snapshot() -> dict[Path, tuple[int, int]]:
    """Every file in the system temp folder, with its inode and modification time."""
    found = {}
    for path in regular_files(Path(tempfile.gettempdir())):
        try:
            info = path.stat()
        except OSError:
            continue
        found[path] = (info.st_ino, info.st_mtime_ns)
    return found


def temp_files_changed_since(before: dict[Path, tuple[int, int]]) -> list[Path]:
    """Temp files created (or rewritten) since ``before`` was taken: what this test may have left there."""
    return [path for path, identity in temp_snapshot().items() if before.get(path) != identity]


# -- helpers ------------------------------------------------------------------------------------------------


async def upload(sftp: asyncssh.SFTPClient, path: str, data: bytes) -> None:
    """Open, write, close: the close answers with the gateway's verdict for a ``*.cfl``."""
    handle = await sftp.open(path, "wb")
    try:
        await handle.write(data)
    finally:
        await handle.close()


async def restart(server: SftpServer, deployment: Deployment | None = None) -> None:
    """Stop the service and start it again (on a new port) over ``deployment``: a node restarted now."""
    await server.service.stop()
    server.service = await start(server.td.deployment.config, deployment or server.td.deployment)


def note_object(server: SftpServer, firmware_version: str = "00000010") -> str:
    with server.td.deployment.db.reading() as session:
        object_id = session.execute(
            select(ImageRow.release_notes_object).where(
                ImageRow.device_type == "ESME", ImageRow.firmware_version == firmware_version
            )
        ).scalar_one()
    assert object_id is not None
    return object_id


def unreadable_events(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == "vault_object_unreadable"]


async def assert_still_serving(server: SftpServer) -> None:
    """A later good request works, on a new connection: the failure cost the server nothing."""
    async with server.sftp("northern-ops") as sftp:
        assert await read_all(sftp, IMAGE_PATH) == image_of(SEEDED_ESME)


# -- secrecy ------------------------------------------------------------------------------------------------


async def test_release_note_plaintext_is_never_stored_logged_or_left_in_a_temp_file(
    sftp_server: SftpServer, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    marker = secrets.token_hex(16).encode()
    notes = marked_notes(marker, 6_000)  # about 300 KiB: several 64 KiB segments
    package = build(PackageSpec(release_notes=notes))
    cut_off = build(PackageSpec(firmware_version="00000011", release_notes=marked_notes(marker, 70_000)))
    before = temp_snapshot()
    server = sftp_server

    with capture_logs() as logs:
        async with server.sftp("acme-release") as sftp:
            await upload(sftp, "/incoming/accepted.cfl", package)
            await upload(sftp, "/incoming/held.cfl", package)
            await write_all(sftp, "/incoming/staged.part", package)
            await write_all(sftp, "/incoming/renamed.part", package)
            await sftp.rename("/incoming/renamed.part", "/incoming/renamed.cfl")
            outcomes = [(await receipt_named(sftp, name))["reason"]
                        for name in ("accepted.cfl", "held.cfl", "renamed.cfl")]
        assert outcomes == ["accepted", "duplicate-image", "duplicate-image"]

        conn = await server.connect("acme-release")
        sftp = await conn.start_sftp_client()
        partial = await sftp.open("/incoming/cut.cfl", "wb")
        await partial.write(cut_off[: len(cut_off) // 2])  # 2 MiB of it, notes included, reached the server
        conn.abort()
        await conn.wait_closed()
        assert await server.wait_for_audit("partial-upload")
        assert server.stray_files() == []

        async with server.sftp("northern-ops") as sftp:
            assert await read_all(sftp, NOTE_PATH) == notes
            async with sftp.open(NOTE_PATH, "rb") as note:
                middle = len(notes) // 2 - 37
                assert await note.read(1000, middle) == notes[middle : middle + 1000]
                assert await note.read(10, SEGMENT_SIZE - 5) == notes[SEGMENT_SIZE - 5 : SEGMENT_SIZE + 5]
                await note.seek(len(notes) - 100)
                assert await note.read() == notes[-100:]

        on_disk = list(regular_files(server.td.root))
        assert any(p.name.endswith("-wal") for p in on_disk)  # searched while the database is open
        assert files_holding(marker, on_disk) == []

    await server.service.stop()
    out, err = capfd.readouterr()
    assert files_holding(marker, regular_files(server.td.root)) == []
    assert marker not in repr(logs).encode()
    assert any(entry["event"] == "package_received" for entry in logs)  # the capture did capture
    assert marker not in (out + err).encode()
    assert marker not in caplog.text.encode()
    assert files_holding(marker, temp_files_changed_since(before)) == []


async def test_release_notes_over_the_limit_are_too_large_over_sftp(tmp_path: Path) -> None:
    server = await start_sftp_server(tmp_path, {"max_release_notes_bytes": "4096"})
    try:
        marker = secrets.token_hex(16).encode()
        notes = marked_notes(marker, 200)
        assert len(notes) > 4096
        async with server.sftp("acme-release") as sftp:
            status, message = await sftp_answer(upload(sftp, "/incoming/big-notes.cfl", build(
                PackageSpec(release_notes=notes))))
            receipt = await receipt_named(sftp, "big-notes.cfl")

        assert status == asyncssh.FX_FAILURE
        assert "too-large" in message
        assert (receipt["outcome"], receipt["reason"]) == ("rejected", "too-large")
        with server.td.deployment.db.reading() as session:
            assert session.execute(select(VaultObjectRow)).first() is None
        assert list(regular_files(server.td.deployment.vault.root)) == []
        assert files_holding(marker, regular_files(server.td.root)) == []
    finally:
        await server.service.stop()


# -- tampering ----------------------------------------------------------------------------------------------


async def test_altered_note_ciphertext_fails_the_read_and_the_server_goes_on(seeded_server: SftpServer) -> None:
    object_id = note_object(seeded_server)
    path = seeded_server.td.deployment.vault.path_of(object_id)
    sealed = bytearray(path.read_bytes())
    sealed[HEADER_SIZE + 3] ^= 0x01
    path.write_bytes(sealed)

    with capture_logs() as logs:
        async with seeded_server.sftp("northern-ops") as sftp:
            status, message = await sftp_answer(read_all(sftp, NOTE_PATH))
            assert await read_all(sftp, IMAGE_PATH) == image_of(SEEDED_ESME)  # same session, next request

    assert (status, message) == (asyncssh.FX_FAILURE, UNREADABLE)
    events = unreadable_events(logs)
    assert [(e["object_id"], e["reason"]) for e in events] == [(object_id, "segment 0 did not authenticate")]
    assert b"tariff switch" not in repr(logs).encode()  # the note's text (tests.sftp_support.SEEDED_ESME)
    await assert_still_serving(seeded_server)


async def test_note_moved_to_another_image_fails_to_decrypt(sftp_server: SftpServer) -> None:
    await sftp_server.seed(SEEDED_ESME)
    await sftp_server.seed(PackageSpec(firmware_version="00000011", release_notes=b"Other notes.\n"), name="b.cfl")
    first, second = note_object(sftp_server, "00000010"), note_object(sftp_server, "00000011")
    with sftp_server.td.deployment.db.writing() as session:
        for version, moved in (("00000010", None), ("00000011", first), ("00000010", second)):
            session.execute(
                update(ImageRow).where(ImageRow.firmware_version == version).values(release_notes_object=moved)
            )
    await restart(sftp_server)  # the catalogue is read anew from the database

    with capture_logs() as logs:
        async with sftp_server.sftp("northern-ops") as sftp:
            answers = [await sftp_answer(read_all(sftp, NOTE_PATH)),
                       await sftp_answer(read_all(sftp, NOTE_PATH.replace("00000010", "00000011")))]

    assert answers == [(asyncssh.FX_FAILURE, UNREADABLE)] * 2
    events = unreadable_events(logs)
    assert {e["object_id"] for e in events} == {first, second}
    assert all(e["reason"] == "wrapped key under 'kek-1' did not authenticate" for e in events)
    await assert_still_serving(sftp_server)


async def test_note_files_swapped_on_disk_fail_to_decrypt(sftp_server: SftpServer) -> None:
    await sftp_server.seed(SEEDED_ESME)
    await sftp_server.seed(PackageSpec(firmware_version="00000011", release_notes=b"Other notes.\n"), name="b.cfl")
    vault = sftp_server.td.deployment.vault
    first, second = (vault.path_of(note_object(sftp_server, v)) for v in ("00000010", "00000011"))
    parked = first.with_name("parked")
    first.rename(parked)
    second.rename(first)
    parked.rename(second)

    with capture_logs() as logs:
        async with sftp_server.sftp("northern-ops") as sftp:
            answer = await sftp_answer(read_all(sftp, NOTE_PATH))

    assert answer == (asyncssh.FX_FAILURE, UNREADABLE)
    assert [e["reason"] for e in unreadable_events(logs)] == ["segment 0 did not authenticate"]
    await assert_still_serving(sftp_server)


async def test_wrong_key_encryption_key_fails_the_read_and_the_server_goes_on(seeded_server: SftpServer) -> None:
    ring = Path(seeded_server.td.deployment.config.vault_key)
    wrong = generate_key_line("kek-1")  # the same id, other key material
    ring.write_text(wrong + "\n")
    await restart(seeded_server, Deployment.open(seeded_server.td.deployment.config))

    with capture_logs() as logs:
        async with seeded_server.sftp("northern-ops") as sftp:
            answer = await sftp_answer(read_all(sftp, NOTE_PATH))

    assert answer == (asyncssh.FX_FAILURE, UNREADABLE)
    events = unreadable_events(logs)
    assert [e["reason"] for e in events] == ["wrapped key under 'kek-1' did not authenticate"]
    assert wrong.split()[1].encode() not in repr(logs).encode()
    await assert_still_serving(seeded_server)

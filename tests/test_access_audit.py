"""Accesses that matter become audit entries (SPEC 8): manifest downloads and refused writes."""

from __future__ import annotations

import asyncio

import asyncssh
import pytest

from tests.sftp_support import SftpServer

FOLDER = "/images/ESME/1A2B/0001/0100/00000010"


async def test_manifest_download_is_audited_at_open_and_completed_at_close(seeded_server: SftpServer) -> None:
    async with seeded_server.sftp("northern-ops") as sftp, sftp.open(f"{FOLDER}/manifest.json", "rb") as handle:
        body = await handle.read()
    entries = await seeded_server.wait_for_audit("manifest-downloaded", count=2)
    assert [e["details"].get("bytes_served") for e in entries] == [None, len(body)]
    assert {e["actor"] for e in entries} == {"northern-ops"}
    assert entries[1]["details"]["opened_seq"] == entries[0]["seq"]


async def test_a_refused_write_is_audited_as_access_denied(seeded_server: SftpServer) -> None:
    async with seeded_server.sftp("northern-ops") as sftp:
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.mkdir("/images/new")
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.remove(f"{FOLDER}/manifest.json")
    entries = await seeded_server.wait_for_audit("access-denied", count=2)
    assert sorted((e["details"]["action"], e["details"]["path"]) for e in entries) == [
        ("change", f"{FOLDER}/manifest.json"),
        ("mkdir", "/images/new"),
    ]


async def test_reading_what_exists_for_others_is_audited_and_a_random_path_is_not(
    seeded_server: SftpServer,
) -> None:
    async with seeded_server.sftp("southern-ops") as sftp:
        for call in (sftp.stat(f"{FOLDER}/manifest.json"), sftp.stat("/images/ESME/1A2B/0001/0100/99999999")):
            with pytest.raises(asyncssh.SFTPNoSuchFile):
                await call
    entries = await seeded_server.wait_for_audit("access-denied", count=1)
    await asyncio.sleep(0.2)
    entries = seeded_server.audit_events("access-denied")
    assert [(e["actor"], e["details"]["action"], e["details"]["path"]) for e in entries] == [
        ("southern-ops", "stat", f"{FOLDER}/manifest.json"),
    ]

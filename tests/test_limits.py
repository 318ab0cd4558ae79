"""Abuse limits (SPEC 9 ``[limits]``) through a real server: each refusal is enforced, logged and audited."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh
import pytest

from tests.sftp_support import CLIENT_TIMEOUT, SftpServer, start_sftp_server


async def connect_with(server: SftpServer, user: str, key: asyncssh.SSHKey | str) -> asyncssh.SSHClientConnection:
    return await asyncio.wait_for(
        asyncssh.connect("127.0.0.1", server.port, username=user, client_keys=[key], known_hosts=None,
                         agent_path=None, config=None, preferred_auth="publickey"),
        CLIENT_TIMEOUT,
    )


async def test_an_address_is_banned_after_too_many_failed_logins(tmp_path: Path) -> None:
    server = await start_sftp_server(tmp_path, {"failed_logins_per_address": "2", "ban_seconds": "60"})
    try:
        stranger = asyncssh.generate_private_key("ssh-ed25519")
        for _ in range(2):
            with pytest.raises(asyncssh.PermissionDenied):
                await connect_with(server, "northern-ops", stranger)
        await asyncio.sleep(0.2)  # the server sees each connection end
        with pytest.raises((OSError, asyncssh.Error)):
            await connect_with(server, "northern-ops", str(server.key("northern-ops")))  # even a good key
        banned = await server.wait_for_audit("address-banned")
        assert [(e["peer"], e["details"]["failed_logins"]) for e in banned] == [("127.0.0.1", 2)]
        refused = await server.wait_for_audit("session-refused")
        assert refused[0]["details"]["reason"] == "address-banned"
    finally:
        await server.service.stop()


async def test_sessions_past_the_per_user_limit_are_refused(tmp_path: Path) -> None:
    server = await start_sftp_server(tmp_path, {"sessions_per_user": "1"})
    try:
        async with await connect_with(server, "northern-ops", str(server.key("northern-ops"))) as first:
            second = await connect_with(server, "northern-ops", str(server.key("northern-ops")))
            with pytest.raises((asyncssh.Error, OSError)):
                await asyncio.wait_for(second.start_sftp_client(), CLIENT_TIMEOUT)
            second.close()
            sftp = await first.start_sftp_client()  # the first session is untouched
            assert "images" in await sftp.listdir("/")
        refused = await server.wait_for_audit("session-refused")
        assert [(e["actor"], e["details"]["reason"]) for e in refused] == [("northern-ops", "sessions-per-user")]
    finally:
        await server.service.stop()


async def test_unauthenticated_connections_are_capped(tmp_path: Path) -> None:
    server = await start_sftp_server(tmp_path, {"unauthenticated_connections": "1"})
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)  # says nothing: unauthenticated
        await reader.readline()  # the server's SSH banner
        with pytest.raises((OSError, asyncssh.Error)):
            await connect_with(server, "northern-ops", str(server.key("northern-ops")))
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.2)
        async with await connect_with(server, "northern-ops", str(server.key("northern-ops"))):
            pass  # room again once the silent connection is gone
        refused = await server.wait_for_audit("session-refused")
        assert refused[0]["details"]["reason"] == "unauthenticated-connections"
    finally:
        await server.service.stop()

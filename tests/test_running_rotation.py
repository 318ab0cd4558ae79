"""``vault rotate-key`` against a running service: the node reloads its key ring on SIGHUP and reports it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from cfl_sftp.config import load_config
from cfl_sftp.deployment import Deployment
from cfl_sftp.vault_admin import RotationRefused, finish_rotation, rotate_key
from tests.sftp_support import SEEDED_ESME, SftpServer, read_all

NOTE_PATH = "/images/ESME/1A2B/0001/0100/00000010/release-notes.md"
T = TypeVar("T")


async def as_operator(config_path: Path, command: Callable[[Deployment], T]) -> T:
    """Run a CLI step as the operator would: its own deployment handle, in a thread."""

    def run() -> T:
        deployment = Deployment.open(load_config(config_path))
        try:
            return command(deployment)
        finally:
            deployment.close()

    return await asyncio.to_thread(run)


async def test_rotation_waits_for_the_node_then_notes_stay_readable(seeded_server: SftpServer) -> None:
    server = seeded_server
    config = server.td.config_path
    await asyncio.sleep(0.2)  # the node's first heartbeat
    with pytest.raises(RotationRefused):
        await as_operator(config, rotate_key)  # the node still wraps with the old key

    server.service.hangup()  # what `systemctl reload` sends
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        try:
            await as_operator(config, rotate_key)
            break
        except RotationRefused:
            assert loop.time() < deadline, "the node never reported the new wrapping key"
            await asyncio.sleep(0.1)
    async with server.sftp("northern-ops") as sftp:
        assert await read_all(sftp, NOTE_PATH) == SEEDED_ESME.release_notes

    await as_operator(config, finish_rotation)
    server.service.hangup()
    await asyncio.sleep(0.3)
    async with server.sftp("northern-ops") as sftp:
        assert await read_all(sftp, NOTE_PATH) == SEEDED_ESME.release_notes

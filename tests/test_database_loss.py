"""Losing the database (SPEC 9): while a node cannot reach it, the node refuses new logins, answers requests with
``SSH_FX_FAILURE`` (never a disconnect or a crash), lets open downloads finish, and recovers by itself; the
audit trail keeps no gap.

PostgreSQL is reached through :class:`DatabaseLink`, a TCP forwarder the test cuts (every connection dropped,
new ones refused) and restores. A SQLite database is "lost" when another process holds its write lock longer
than the node's busy timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from cfl_sftp import audit_writer
from cfl_sftp.audit_writer import AuditWriter
from cfl_sftp.service import start
from cfl_sftp.storage.audit_store import AuditEvent
from cfl_sftp.storage.db import Database
from cfl_sftp.storage.models import AuditEntryRow
from tests.databases import fresh_postgresql_database
from tests.deployments import DeploymentUnderTest, make_deployment
from tests.factory import PackageSpec, build, image_of
from tests.sftp_support import TEST_SETTINGS, SftpServer, read_all, sftp_status, wait_visible, write_all
from tests.test_crash_recovery import assert_files_match_rows

WAIT_SECONDS = 20.0
SPEC = PackageSpec(image_size=3 << 20)
NEXT = PackageSpec(firmware_version="00000020")
NEXT_IMAGE = "/images/ESME/1A2B/0001/0100/00000020/firmware.bin"
FOLDER = "/images/ESME/1A2B/0001/0100/00000010"
IMAGE = f"{FOLDER}/firmware.bin"


class DatabaseLink:
    """A TCP forwarder to the database, in a thread with its own event loop (the node's database calls run in
    worker threads and must not depend on the test's loop). ``cut()`` drops every connection and refuses new
    ones; ``restore()`` forwards again on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]

    def __enter__(self) -> DatabaseLink:
        self._thread.start()
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _restore(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    def cut(self) -> None:
        self._run(self._cut())

    def restore(self) -> None:
        self._run(self._restore())


def through(link: DatabaseLink, url: str) -> str:
    return make_url(url).set(host="127.0.0.1", port=link.port).render_as_string(hide_password=False)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while not condition():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


def audit_entries(td: DeploymentUnderTest) -> list[dict[str, Any]]:
    with td.deployment.db.reading() as db:
        return [json.loads(e) for e in db.execute(select(AuditEntryRow.entry).order_by(AuditEntryRow.seq)).scalars()]


@contextlib.asynccontextmanager
async def node_on(td: DeploymentUnderTest, tmp_path: Path) -> Any:
    service = await start(td.deployment.config, td.deployment)
    (tmp_path / "client").mkdir()
    server = SftpServer(td, service, tmp_path / "client")
    try:
        await server.seed(SPEC, name="big.cfl")
        yield server
    finally:
        await service.stop()


async def refused_login(server: SftpServer) -> asyncssh.DisconnectError:
    with pytest.raises(asyncssh.DisconnectError) as refused:
        await server.connect("northern-ops")
    return refused.value


async def assert_outage_then_recovery(server: SftpServer, lose: Callable[[], None], regain: Callable[[], None]) -> None:
    """The behaviour SPEC 9 asks for, whatever the database: run with an open download across an outage."""
    runtime = server.service.runtime
    image = image_of(SPEC)
    package = build(NEXT)
    async with server.sftp("northern-ops") as sftp, server.sftp("acme-release") as uploader:
        download = await sftp.open(IMAGE, "rb")
        first = await download.read(1 << 20, 0)
        upload = await uploader.open("/incoming/next.cfl", "wb")
        await upload.write(package, 0)
        await asyncio.to_thread(lose)

        # A request that needs the database fails with FAILURE; the session stays open.
        assert await sftp_status(sftp.open(f"{FOLDER}/manifest.json", "rb")) == asyncssh.FX_FAILURE
        await wait_until(lambda: not runtime.database.available, "the node sees the outage")
        # Now every new request fails, even those the node could answer from memory ...
        assert await sftp_status(sftp.stat(IMAGE)) == asyncssh.FX_FAILURE
        assert await sftp_status(sftp.listdir("/images")) == asyncssh.FX_FAILURE
        assert await sftp_status(sftp.mkdir("/images/x")) == asyncssh.FX_FAILURE
        # ... new logins are refused before authentication (nothing could be audited) ...
        refused = await refused_login(server)
        assert refused.code == asyncssh.DISC_SERVICE_NOT_AVAILABLE
        # ... and the download already open finishes.
        rest = await download.read(len(image), len(first))
        await download.close()
        assert first + rest == image
        # An upload closed now cannot get its verdict: it fails and leaves nothing (SPEC 4: atomic).
        assert await sftp_status(upload.close()) == asyncssh.FX_FAILURE
        assert not [t for t in server.service.tasks if t.done()], "a background task of the node died"

        await asyncio.to_thread(regain)
        await wait_until(lambda: runtime.database.available, "the node sees the database again")
        # The same sessions work again, and so do new logins: no restart.
        assert (await sftp.stat(IMAGE)).size == len(image)
        assert [u.file_name for u in await asyncio.to_thread(server.uploads)] == ["big.cfl"]
        await write_all(uploader, "/incoming/next.cfl", package)
        await wait_visible(sftp, NEXT_IMAGE)
    async with server.sftp("northern-ops") as again:
        assert await read_all(again, IMAGE) == image

    closed = await server.wait_for_audit("session-closed", count=3)
    assert len(closed) == 3
    entries = await asyncio.to_thread(audit_entries, server.td)
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    served = [e["details"] for e in entries if e["event"] == "image-downloaded" and "bytes_served" in e["details"]]
    assert len(image) in [d["bytes_served"] for d in served], "the download finished during the outage is audited"
    await asyncio.to_thread(assert_files_match_rows, server.td.deployment)


@pytest.fixture
def postgresql_url() -> Iterator[str]:
    with fresh_postgresql_database() as url:
        yield url


async def test_postgresql_outage_fails_requests_refuses_logins_and_recovers(
    tmp_path: Path, postgresql_url: str
) -> None:
    target = make_url(postgresql_url)
    with DatabaseLink(target.host or "127.0.0.1", target.port or 5432) as link:
        td = await asyncio.to_thread(
            make_deployment, tmp_path, database_url=through(link, postgresql_url), settings=TEST_SETTINGS
        )
        async with node_on(td, tmp_path) as server:
            await assert_outage_then_recovery(server, link.cut, link.restore)


async def test_sqlite_locked_past_the_busy_timeout_fails_requests_and_recovers(tmp_path: Path) -> None:
    td = make_deployment(tmp_path, settings=TEST_SETTINGS)
    short_busy_timeout(td)
    holder = sqlite3.connect(str(make_url(td.deployment.config.database_url).database), isolation_level=None,
                             check_same_thread=False)

    def lock() -> None:
        holder.execute("BEGIN EXCLUSIVE")  # another process writing for longer than the node will wait

    def unlock() -> None:
        holder.execute("ROLLBACK")

    try:
        async with node_on(td, tmp_path) as server:
            await assert_outage_then_recovery(server, lock, unlock)
    finally:
        holder.close()


# -- the audit writer across an outage -----------------------------------------------------------------------


@contextlib.contextmanager
def sqlite_locked(td: DeploymentUnderTest) -> Iterator[None]:
    holder = sqlite3.connect(str(make_url(td.deployment.config.database_url).database), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def short_busy_timeout(td: DeploymentUnderTest) -> None:
    td.deployment.db.dispose()
    td.deployment.db = Database(td.deployment.config.database_url, sqlite_busy_seconds=0.2)


@pytest.mark.sqlite_only
async def test_entries_queued_during_an_outage_are_written_after_it_with_their_own_time(
    td: DeploymentUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    short_busy_timeout(td)
    monkeypatch.setattr(audit_writer, "DELAYED_SECONDS", 0.0)  # any delay counts: the outage here is short
    writer = AuditWriter(td.deployment.db)
    with sqlite_locked(td):
        writer.submit(AuditEvent("session-closed", "northern-ops", "northern-energy", "127.0.0.1:1", {"n": 1}))
        assert await writer.flush() is False
        assert not writer.availability.available
        writer.submit(AuditEvent("session-closed", "northern-ops", "northern-energy", "127.0.0.1:1", {"n": 2}))
        assert await writer.flush() is False
    assert await writer.flush() is True
    assert writer.availability.available

    entries = audit_entries(td)
    assert [(e["seq"], e["details"]["n"]) for e in entries] == [(1, 1), (2, 2)]
    assert all(e["details"]["occurred_at"] < e["time"] for e in entries)


async def test_the_queue_is_bounded_and_counts_what_it_drops(
    td: DeploymentUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_writer, "MAX_QUEUED", 3)
    writer = AuditWriter(td.deployment.db)
    for n in range(5):
        writer.submit(AuditEvent("session-closed", "northern-ops", "northern-energy", "127.0.0.1:1", {"n": n}))
    assert (writer.queued, writer.dropped) == (3, 2)
    assert await writer.flush()
    assert [e["details"]["n"] for e in audit_entries(td)] == [0, 1, 2]


@pytest.mark.sqlite_only
async def test_an_empty_queue_probes_the_database_to_end_an_outage(td: DeploymentUnderTest) -> None:
    short_busy_timeout(td)
    writer = AuditWriter(td.deployment.db)
    with sqlite_locked(td):
        writer.submit(AuditEvent("session-closed", "northern-ops", "northern-energy", "127.0.0.1:1", {}))
        assert await writer.flush() is False
        writer._queue.clear()  # nothing left to write: the next flush must still find out
        assert await writer.flush() is False
        assert not writer.availability.available
    assert await writer.flush() is True
    assert writer.availability.available
    assert audit_entries(td) == []

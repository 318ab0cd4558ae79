"""The service's life as systemd drives it: ready, reload, graceful stop, idle sessions (SPEC 9).

The signal tests run a real ``cfl-sftp serve`` process with ``$NOTIFY_SOCKET`` pointing at a datagram socket
that the test owns, as systemd's would be, and read the JSON log lines it prints. The reload and idle tests run
the service in the test's own loop (``tests/sftp_support.py``), where the runtime can be looked at directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from sqlalchemy import func, select
from structlog.testing import capture_logs

from cfl_sftp.config import load_config
from cfl_sftp.deployment import Deployment
from cfl_sftp.event_loop import loop_kind
from cfl_sftp.intake import PackageUpload, Uploader, feed_chunks
from cfl_sftp.sdnotify import Notifier, monotonic_usec, watchdog_seconds
from cfl_sftp.sftp.activity import (
    DRAIN_IDLE_SECONDS,
    IDLE,
    STOP_TIMEOUT,
    STOPPING,
    SessionActivity,
    drained_sessions,
    idle_sessions,
)
from cfl_sftp.storage.models import AuditEntryRow, CheckpointRow, UploadRow
from tests.deployments import DeploymentUnderTest, make_deployment
from tests.factory import PackageSpec, build
from tests.sftp_support import (
    CLIENT_TIMEOUT,
    IMAGE_PATH,
    SSH_OPTIONS,
    TEST_SETTINGS,
    SftpServer,
    require_binary,
    start_sftp_server,
)

WAIT = 30.0
"""Bound on every wait for the service (a message, a log line, an exit); a test that hangs fails instead."""

IMAGE = PackageSpec(image_size=256 << 10)


# -- a stand-in for systemd's notification socket ---------------------------------------------------------


class NotifySocket:
    """A datagram socket the test owns; each message the service sends is parsed into its ``KEY=value`` lines."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self._socket.setblocking(False)
        self.received: list[dict[str, str]] = []

    async def next(self, timeout: float = WAIT) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self._socket, 65536), timeout)
        message = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.received.append(message)
        return message

    async def until(self, key: str, timeout: float = WAIT) -> dict[str, str]:
        """The next message that carries ``key`` (others are kept in :attr:`received`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            message = await self.next(max(0.1, deadline - loop.time()))
            if key in message:
                return message

    def close(self) -> None:
        self._socket.close()


@contextlib.contextmanager
def notify_socket() -> Iterator[NotifySocket]:
    """An abstract socket (``@name``, as systemd often passes): no path, so no length limit or clean-up."""
    sock = NotifySocket(f"@cfl-sftp-test-{secrets.token_hex(8)}")
    try:
        yield sock
    finally:
        sock.close()


# -- a real `cfl-sftp serve` process ---------------------------------------------------------------------


class ServeProcess:
    """``cfl-sftp serve`` in a subprocess; its stdout (JSON lines) is collected as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.logs: list[dict[str, Any]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.logs.append(json.loads(line))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [entry for entry in self.logs if entry.get("event") == name]

    async def log_event(self, name: str, timeout: float = WAIT) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.events(name):
            assert loop.time() < deadline, f"no {name} in the log: {self.logs[-5:]}"
            assert self.proc.returncode is None or not self._reader.done(), f"the service ended: {self.logs[-5:]}"
            await asyncio.sleep(0.05)
        return self.events(name)[0]

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def exit_code(self, timeout: float = WAIT) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, timeout)
        return code

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


@contextlib.asynccontextmanager
async def serving(td: DeploymentUnderTest, notify: NotifySocket,
                  env: dict[str, str] | None = None) -> AsyncIterator[ServeProcess]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cfl_sftp.cli", "serve", "--config", str(td.config_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, "NOTIFY_SOCKET": notify.address, **(env or {})},
    )
    service = ServeProcess(proc)
    try:
        yield service
    finally:
        service.kill()  # only if the test left it running
        await asyncio.wait_for(proc.wait(), WAIT)


def deployment_for_serve(tmp_path: Path, **limits: int) -> DeploymentUnderTest:
    """A deployment on an ephemeral port with one image (``IMAGE``) in its library; the test's handle is closed
    so that the service process is the only user of the database while it runs."""
    settings = {**TEST_SETTINGS, **{key: str(value) for key, value in limits.items()}}
    td = make_deployment(tmp_path, settings=settings)
    upload = PackageUpload(td.deployment, Uploader("acme-release", "acme-meters", "127.0.0.1:1"), "seed.cfl")
    data = build(IMAGE)
    feed_chunks(upload, iter([data]))
    td.deployment.close()
    return td


def port_of(ready: dict[str, str]) -> int:
    found = re.search(r"ports (\d+)", ready["STATUS"])
    assert found, ready
    return int(found.group(1))


async def connect(td: DeploymentUnderTest, port: int, user: str) -> asyncssh.SSHClientConnection:
    return await asyncio.wait_for(
        asyncssh.connect("127.0.0.1", port, username=user, client_keys=[str(td.key_path(user))],
                         known_hosts=None, agent_path=None, config=None, preferred_auth="publickey"),
        CLIENT_TIMEOUT,
    )


async def open_remote(
    td: DeploymentUnderTest, port: int, user: str, path: str, mode: str
) -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClientFile]:
    """A session of ``user`` holding ``path`` open: a transfer under way when the test signals the service."""
    conn = await connect(td, port, user)
    sftp = await conn.start_sftp_client()
    return conn, await sftp.open(path, mode)


def database_after(td: DeploymentUnderTest) -> Deployment:
    return Deployment.open(load_config(td.config_path))


def audit_entries(deployment: Deployment, event: str) -> list[dict[str, Any]]:
    with deployment.db.reading() as db:
        rows = db.execute(select(AuditEntryRow.entry).where(AuditEntryRow.event == event)).scalars()
        return [json.loads(row) for row in rows]


# -- sd_notify on its own ----------------------------------------------------------------------------------


async def test_notifier_speaks_to_an_abstract_socket_and_to_a_path() -> None:
    folder = Path(tempfile.mkdtemp(prefix="cfl-notify-", dir="/tmp"))  # short: socket paths stop at 108 bytes
    try:
        for address in (f"@cfl-sftp-test-{secrets.token_hex(8)}", str(folder / "notify")):
            receiver = NotifySocket(address)
            try:
                notifier = Notifier(address)
                before = monotonic_usec()
                assert notifier.reloading("Reloading\nnow")
                message = await receiver.next()
                notifier.close()
            finally:
                receiver.close()
            assert message["RELOADING"] == "1"
            assert before <= int(message["MONOTONIC_USEC"]) <= monotonic_usec()
            assert message["STATUS"] == "Reloading now"  # one line: a newline would start another field
    finally:
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


def test_notifier_outside_systemd_does_nothing_and_an_absent_listener_does_not_raise() -> None:
    assert not Notifier(None).ready("Serving")
    assert not Notifier(f"@cfl-sftp-nobody-{secrets.token_hex(8)}").ready("Serving")  # logged, not raised


# -- the activity rules, on a clock of the test's own --------------------------------------------------------


class FakeChannel:
    def __init__(self, files: int = 0, pending: bool = False) -> None:
        self.files, self.pending = files, pending

    def open_files(self) -> int:
        return self.files

    def output_pending(self) -> bool:
        return self.pending


def activity_at(clock: list[float], channel: FakeChannel) -> SessionActivity:
    session = SessionActivity("s1", conn=object(), clock=lambda: clock[0])  # type: ignore[arg-type]
    session.attach(channel)
    return session


def test_a_request_in_progress_or_output_waiting_is_never_idle() -> None:
    clock, channel = [100.0], FakeChannel()
    session = activity_at(clock, channel)
    session.request_started()
    clock[0] += 3600
    assert idle_sessions([session], clock[0], 900) == []
    session.request_ended()
    channel.pending = True  # a slow client has not taken the answer yet
    clock[0] += 3600
    assert idle_sessions([session], clock[0], 900) == []
    channel.pending = False
    assert idle_sessions([session], clock[0], 900) == [session]


def test_bytes_of_a_request_arriving_reset_the_idle_clock() -> None:
    clock = [0.0]
    session = activity_at(clock, FakeChannel())
    clock[0] = 899
    session.touched()
    clock[0] = 1000
    assert idle_sessions([session], clock[0], 900) == []
    clock[0] = 1799
    assert idle_sessions([session], clock[0], 900) == [session]


def test_a_stop_closes_what_has_nothing_in_progress_and_what_went_quiet_with_a_file_open() -> None:
    clock = [0.0]
    between_files = activity_at(clock, FakeChannel(files=0))
    downloading = activity_at(clock, FakeChannel(files=1))
    assert drained_sessions([between_files, downloading], clock[0], 900) == [between_files]
    downloading.request_started()
    clock[0] += DRAIN_IDLE_SECONDS * 10
    assert drained_sessions([downloading], clock[0], 900) == []  # answering a request: let it finish
    downloading.request_ended()
    clock[0] += DRAIN_IDLE_SECONDS
    assert drained_sessions([downloading], clock[0], 900) == [downloading]


# -- ready, reload, stop: a real `cfl-sftp serve` ------------------------------------------------------------


async def test_the_suite_runs_its_services_on_the_loop_serve_runs_on() -> None:
    # tests/conftest.py gives pytest-asyncio the serve loop's factory: in-process services run as they ship.
    assert loop_kind(asyncio.get_running_loop()) == ("uvloop" if find_spec("uvloop") else "asyncio")


async def test_ready_is_sent_once_the_port_accepts_ssh(tmp_path: Path) -> None:
    td = await asyncio.to_thread(deployment_for_serve, tmp_path)
    with notify_socket() as notify:
        async with serving(td, notify) as service:
            ready = await notify.until("READY")
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(ready))
            banner = await asyncio.wait_for(reader.readline(), WAIT)
            writer.close()
            assert banner.startswith(b"SSH-2.0-")
            assert ready["READY"] == "1"
            assert "policy" in ready["STATUS"]
            assert notify.received[0] != ready, "STATUS says what it is doing while it starts"
            started = await service.log_event("service_started")  # SPEC 9: digests to compare nodes by
            assert started["config_digest"] == hashlib.sha256(td.config_path.read_bytes()).hexdigest()
            assert len(started["policy_digest"]) == 64
            assert started["event_loop"] == ("uvloop" if find_spec("uvloop") else "asyncio")  # the faster loop
            service.signal(signal.SIGTERM)
            assert await service.exit_code() == 0


async def test_the_watchdog_is_fed_from_the_start_while_systemd_asks_for_it(tmp_path: Path) -> None:
    td = await asyncio.to_thread(deployment_for_serve, tmp_path)
    with notify_socket() as notify:
        async with serving(td, notify, env={"WATCHDOG_USEC": "400000"}) as service:
            first = await notify.until("WATCHDOG")
            assert not any("READY" in message for message in notify.received), "pings start before the start ends"
            await notify.until("READY")
            pings = [first, await notify.until("WATCHDOG"), await notify.until("WATCHDOG")]
            assert all(ping["WATCHDOG"] == "1" for ping in pings)
            service.signal(signal.SIGTERM)
            assert await service.exit_code() == 0


def test_a_watchdog_meant_for_another_process_or_malformed_is_not_ours() -> None:
    mine = str(os.getpid())
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": mine}) == 30.0
    assert watchdog_seconds({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_seconds({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_seconds({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_seconds({}) is None


async def test_sighup_reloads_limits_and_gateway_between_reloading_and_ready(tmp_path: Path) -> None:
    td = await asyncio.to_thread(deployment_for_serve, tmp_path)
    image_dir = IMAGE_PATH.rsplit("/", 1)[0]
    with notify_socket() as notify:
        async with serving(td, notify) as service:
            port = port_of(await notify.until("READY"))
            async with await connect(td, port, "northern-ops") as first, await connect(td, port, "northern-ops"):
                sftp = await first.start_sftp_client()
                assert "firmware.bin" in await sftp.listdir(image_dir)  # and two sessions are allowed

            text = td.config_path.read_text()
            text = text.replace("sessions_per_user = 64", "sessions_per_user = 1")
            text = text.replace('admitted_purposes = ["compliance", "security-fix", "defect-fix"]',
                                'admitted_purposes = ["compliance", "defect-fix"]')
            td.config_path.write_text(text)
            before = monotonic_usec()
            service.signal(signal.SIGHUP)
            reloading = await notify.until("RELOADING")
            assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
            assert (await notify.until("READY"))["READY"] == "1"
            reloaded = await service.log_event("config_reloaded")
            assert sorted(reloaded["changed"]) == ["gateway", "limits"]

            async with await connect(td, port, "northern-ops") as first:
                sftp = await first.start_sftp_client()
                with pytest.raises(asyncssh.SFTPNoSuchFile):  # security-fix images are no longer admitted
                    await sftp.listdir(image_dir)
                second = await connect(td, port, "northern-ops")
                with pytest.raises((asyncssh.Error, OSError)):
                    await asyncio.wait_for(second.start_sftp_client(), CLIENT_TIMEOUT)
                second.close()
            service.signal(signal.SIGTERM)
            assert await service.exit_code() == 0


async def test_sigterm_lets_a_download_finish_then_exits_0_with_a_final_checkpoint(tmp_path: Path) -> None:
    td = await asyncio.to_thread(deployment_for_serve, tmp_path, stop_timeout_seconds=60)
    with notify_socket() as notify:
        async with serving(td, notify) as service:
            port = port_of(await notify.until("READY"))
            conn, remote = await open_remote(td, port, "northern-ops", IMAGE_PATH, "rb")
            head = await remote.read(32 << 10)

            service.signal(signal.SIGTERM)
            stopping = await notify.until("STOPPING")
            with pytest.raises(ConnectionRefusedError):  # no new connection from the moment the stop began
                await asyncio.open_connection("127.0.0.1", port)
            rest = await asyncio.wait_for(remote.read(), CLIENT_TIMEOUT)
            await remote.close()
            await asyncio.wait_for(conn.wait_closed(), WAIT)  # then the server closes the finished session

            assert await service.exit_code() == 0
            assert int(stopping["EXTEND_TIMEOUT_USEC"]) >= 60_000_000
    assert len(head + rest) == IMAGE.image_size
    deployment = await asyncio.to_thread(database_after, td)
    try:
        closed = audit_entries(deployment, "session-closed")
        assert [e["details"]["reason"] for e in closed] == [STOPPING]
        served = [e["details"].get("bytes_served") for e in audit_entries(deployment, "image-downloaded")]
        assert IMAGE.image_size in served
        with deployment.db.reading() as db:
            entries = db.execute(select(func.count()).select_from(AuditEntryRow)).scalar_one()
            newest = db.execute(select(func.max(CheckpointRow.tree_size))).scalar_one()
        assert newest == entries  # the last checkpoint covers every entry, the stop's own included
    finally:
        deployment.close()


@pytest.mark.parametrize(("stop_timeout", "signals"), [(2, 1), (600, 2)], ids=["at-the-timeout", "at-a-second-sigterm"])
async def test_sigterm_closes_a_session_still_busy_at_the_stop_timeout_and_its_upload_is_partial(
    tmp_path: Path, stop_timeout: int, signals: int
) -> None:
    td = await asyncio.to_thread(deployment_for_serve, tmp_path, stop_timeout_seconds=stop_timeout)
    with notify_socket() as notify:
        async with serving(td, notify) as service:
            port = port_of(await notify.until("READY"))
            conn, remote = await open_remote(td, port, "acme-release", "/incoming/slow.cfl", "wb")
            await remote.write(b"\0" * 1024)

            async def trickle() -> int:
                """An upload that never ends: 1 KiB every 0.2 s until the server cuts it off (bounded)."""
                for step in range(1, 600):
                    try:
                        await remote.write(b"\0" * 1024, step * 1024)
                    except (asyncssh.Error, OSError):
                        return step
                    await asyncio.sleep(0.2)
                raise AssertionError("the upload was never cut off")

            writing = asyncio.ensure_future(trickle())
            service.signal(signal.SIGTERM)
            await notify.until("STOPPING")
            if signals == 2:
                await asyncio.sleep(0.5)  # the upload goes on through the drain...
                service.signal(signal.SIGTERM)  # ...until the operator insists
            assert await asyncio.wait_for(writing, WAIT) > 1
            assert await service.exit_code() == 0
            assert service.events("sessions_closed_at_stop_timeout")
            assert bool(service.events("service_stop_hurried")) == (signals == 2)
            conn.close()
    deployment = await asyncio.to_thread(database_after, td)
    try:
        assert [e["details"]["reason"] for e in audit_entries(deployment, "session-closed")] == [STOP_TIMEOUT]
        assert [e["details"]["file_name"] for e in audit_entries(deployment, "partial-upload")] == ["slow.cfl"]
        with deployment.db.reading() as db:
            uploads = db.execute(select(UploadRow.file_name)).scalars().all()
        assert uploads == ["seed.cfl"]  # nothing of the cut-off package reached the gateway
        assert [p for p in deployment.spool.root.rglob("*") if p.is_file()] == []
    finally:
        deployment.close()


# -- SIGHUP's configuration reload, in the test's own loop ---------------------------------------------------


async def test_a_config_that_does_not_load_keeps_the_one_in_force(sftp_server: SftpServer) -> None:
    service = sftp_server.service
    in_force = service.config
    sftp_server.td.config_path.write_text("[limits\nsessions_per_user = 1\n")
    with capture_logs() as logs:
        await service.reload()
    refused = [e for e in logs if e["event"] == "config_refused"]
    assert refused
    assert "cfl-sftp.toml" in refused[0]["reason"]
    assert service.config is in_force
    assert any(e["event"] == "service_reloaded" for e in logs)  # the rest of the reload still ran


async def test_a_changed_listen_or_database_url_is_named_and_waits_for_a_restart(sftp_server: SftpServer) -> None:
    service = sftp_server.service
    path = sftp_server.td.config_path
    text = path.read_text().replace('listen = ["127.0.0.1:0"]', 'listen = ["127.0.0.1:2299"]')
    path.write_text('database_url = "sqlite:////nowhere/else.sqlite3"\n'
                    + text.replace("idle_timeout_seconds = 900", "idle_timeout_seconds = 30"))
    with capture_logs() as logs:
        await service.reload()
    warning = next(e for e in logs if e["event"] == "config_needs_restart")
    assert warning["keys"] == ["listen", "database_url"]
    assert warning["log_level"] == "warning"
    assert service.config.listen == ("127.0.0.1:0",)
    assert service.config.database_url.endswith("cfl-sftp.sqlite3")
    assert service.config.limits.idle_timeout_seconds == 30  # what can change did


# -- idle sessions ---------------------------------------------------------------------------------------


@pytest.fixture
async def idle_server(tmp_path: Path, sftp_template: Path) -> AsyncIterator[SftpServer]:
    server = await start_sftp_server(tmp_path, {"idle_timeout_seconds": "2"})
    try:
        await server.seed(IMAGE)
        yield server
    finally:
        await server.service.stop()


def closes_for(server: SftpServer, user: str) -> Callable[[], list[str]]:
    def reasons() -> list[str]:
        return [e["details"].get("reason", "") for e in server.audit_events("session-closed") if e["actor"] == user]
    return reasons


async def test_idle_sessions_are_closed_and_audited_but_active_ones_are_not(idle_server: SftpServer) -> None:
    server = idle_server
    idle = await server.connect("southern-ops")
    await idle.start_sftp_client()
    async with server.sftp("northern-ops") as busy:
        remote = await busy.open(IMAGE_PATH, "rb")
        received = b""
        started = time.monotonic()
        # A download slower than the idle timeout is a long transfer, not idleness: 8 KiB every 0.5 s for 5 s.
        while time.monotonic() - started < 5:
            chunk: bytes = await asyncio.wait_for(remote.read(8 << 10), CLIENT_TIMEOUT)
            received += chunk
            await asyncio.sleep(0.5)
        await asyncio.wait_for(idle.wait_closed(), WAIT)
        assert await busy.stat("/")  # the active session is still served
        await remote.close()
    assert len(received) >= 8 * (8 << 10)
    await server.wait_for_audit("session-closed", 2)
    assert closes_for(server, "southern-ops")() == [IDLE]
    assert IDLE not in closes_for(server, "northern-ops")()


async def test_an_idle_openssh_sftp_session_is_closed(idle_server: SftpServer) -> None:
    argv = [require_binary("sftp"), *SSH_OPTIONS, "-i", str(idle_server.key("northern-ops")),
            "-P", str(idle_server.port), "-b", "-", "northern-ops@127.0.0.1"]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"ls /\n")  # one command, then nothing: the batch waits for more on its open stdin
        await proc.stdin.drain()
        closes = await idle_server.wait_for_audit("session-closed", 1, timeout=WAIT)
        assert [e["details"]["reason"] for e in closes] == [IDLE]
        proc.stdin.write(b"ls /\n")  # the next command finds the session gone
        proc.stdin.close()
        out, _ = await asyncio.wait_for(proc.communicate(), WAIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert out.count(b"images") == 1
    assert proc.returncode != 0

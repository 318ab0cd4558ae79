"""SSH: public-key and certificate authentication against the policy in force (decided by :mod:`.auth`), and SFTP
as the only thing a session may do.

No passwords, keyboard-interactive, shell, exec (so no legacy SCP protocol), port or agent forwarding. The SFTP
subsystem runs our own handler subclass, which differs from asyncssh's in seven documented ways:

* it accepts a WRITE that carries bytes after its declared data (rclone 1.60 sends such packets; OpenSSH's
  server ignores the extra bytes, and so do we);
* it tells our server when a session ends with handles still open, so that a package in progress is discarded
  instead of sent to the gateway;
* its ``limits@openssh.com`` reply offers OpenSSH's sftp-server's lengths, not asyncssh's, and the open-file
  limit the server enforces, not the host's;
* it answers OPENDIR through our server's async ``opendir`` (a user's view may be being built in a thread);
* it answers a READ only once earlier replies have drained, so memory per session stays bounded;
* it sends an exit status when the session ends, as OpenSSH's sftp-server does by exiting (``scp`` fails a
  finished transfer without one);
* it hands each reply's framing and fields to the channel as pieces (see :mod:`.wire`), where asyncssh copies a
  READ reply's data three times to frame it.

Each request it answers, and each byte of request that arrives, is reported to the connection's
:class:`~.activity.SessionActivity`, which the idle timeout and a graceful stop read.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import secrets
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

import asyncssh
import asyncssh.connection
import structlog
from asyncssh.channel import SSHChannel
from asyncssh.packet import Byte, SSHPacket, UInt32
from asyncssh.saslprep import saslprep
from asyncssh.sftp import (
    SFTPLimits,
    SFTPServerHandler,
)
from asyncssh.stream import SSHReader, SSHServerStreamSession, SSHWriter

from cfl_sftp.logs import asyncssh_packets_logged
from cfl_sftp.sftp.activity import SessionActivity
from cfl_sftp.sftp.auth import ConnectionAuth
from cfl_sftp.sftp.server import MAX_PACKET_LENGTH, MAX_READ_LENGTH, MAX_WRITE_LENGTH, LibrarySFTPServer

if TYPE_CHECKING:
    from cfl_sftp.runtime import Runtime, SessionInfo

log = structlog.get_logger(__name__)

SFTP_VERSION = 3
FXP_READ = 5  # SSH_FXP_READ (draft-ietf-secsh-filexfer-02)
FXP_WRITE = 6  # SSH_FXP_WRITE
FXP_OPENDIR = 11  # SSH_FXP_OPENDIR


class LibrarySFTPHandler(SFTPServerHandler):
    """asyncssh's SFTP server handler with the changes above."""

    def __init__(
        self, server: LibrarySFTPServer, reader: SSHReader[bytes], writer: SSHWriter[bytes], version: int,
        activity: SessionActivity | None = None,
    ) -> None:
        super().__init__(server, reader, writer, version)
        self._activity = activity
        if activity is not None:
            activity.attach(self)

    # -- what the session's activity account asks (see .activity.ChannelActivity) -------------------------

    def open_files(self) -> int:
        return len(self._file_handles)

    def output_pending(self) -> bool:
        writer = self._writer
        return writer is not None and writer.channel.get_write_buffer_size() > 0

    def send_packet(self, pkttype: int, pktid: int | None, *args: bytes) -> None:
        """asyncssh's framing (length, type, fields) handed to the channel as pieces: its own joins the fields,
        prepends the type and then the length, three copies of a 255 KiB READ reply on its way out. The channel
        cuts its packets from the pieces (:mod:`.wire`)."""
        writer = self._writer
        if not writer:
            raise asyncssh.SFTPNoConnection("Connection not open")
        if writer.channel.is_closing():
            return
        writer.writelines((UInt32(1 + sum(map(len, args))) + Byte(pkttype), *args))
        if asyncssh_packets_logged(self.logger):
            self.log_sent_packet(pkttype, pktid, Byte(pkttype) + b"".join(args))

    async def _process_packet(self, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        activity = self._activity
        if activity is None:
            await super()._process_packet(pkttype, pktid, packet)
            return
        activity.request_started()
        try:
            await super()._process_packet(pkttype, pktid, packet)
        finally:
            activity.request_ended()

    async def _process_lenient_write(self, packet: SSHPacket) -> int:
        handle = packet.get_string()
        offset = packet.get_uint64()
        data = packet.get_string()
        # No packet.check_end(): trailing bytes after the data are ignored, as OpenSSH does.
        file_obj = self._file_handles.get(handle)
        if not file_obj:
            raise asyncssh.SFTPInvalidHandle("Invalid file handle")
        result = self._server.write(file_obj, offset, data)
        if inspect.isawaitable(result):
            result = await result
        return int(result)

    async def _process_limits(self, packet: SSHPacket) -> SFTPLimits:
        """``limits@openssh.com``: OpenSSH's sftp-server's lengths (see :data:`.server.MAX_PACKET_LENGTH`), and the
        open-file limit the server enforces per session (``open_files_per_session``), not the host's."""
        packet.check_end()
        server = self._server
        handles = server.open_files_limit if isinstance(server, LibrarySFTPServer) else 0
        return SFTPLimits(MAX_PACKET_LENGTH, MAX_READ_LENGTH, MAX_WRITE_LENGTH, handles)

    async def _process_read(self, packet: SSHPacket) -> tuple[bytes, bool]:
        """READ, once what the session already answered has left for the network.

        asyncssh answers each READ into the channel's send buffer without waiting for it to drain, so a client
        with many reads in flight and a small window (200 batch jobs at once) has the whole file buffered here,
        several MiB per session. Waiting for the buffer to fall below its low-water mark first bounds that to
        about one reply per session; the client's window, not our memory, keeps the pipe full.
        """
        writer = self._writer
        if writer is not None:
            await writer.drain()
        return await super()._process_read(packet)

    async def _process_opendir(self, packet: SSHPacket) -> bytes:
        """OPENDIR through our server's async ``opendir``: deciding whether a folder exists may have to wait for
        the user's view to be built off the loop, which asyncssh's synchronous ``scandir`` hook cannot."""
        path = packet.get_string()
        packet.check_end()
        server = self._server
        assert isinstance(server, LibrarySFTPServer)
        listing = await server.opendir(path)
        handle = self._get_next_handle()
        self._dir_handles[handle] = listing
        return handle

    _packet_handlers = {  # noqa: RUF012 - asyncssh looks the table up on the class
        **SFTPServerHandler._packet_handlers,
        FXP_READ: cast(Any, _process_read),
        FXP_OPENDIR: cast(Any, _process_opendir),
        FXP_WRITE: cast(Any, _process_lenient_write),
        b"limits@openssh.com": cast(Any, _process_limits),
    }

    async def _cleanup(self, exc: Exception | None) -> None:
        if self._activity is not None:
            self._activity.detach(self)
        server = self._server
        if isinstance(server, LibrarySFTPServer):
            server.ending = True
        writer = self._writer
        if writer is not None:
            # Report an exit status, as OpenSSH's sftp-server does by exiting: scp (SFTP mode) takes ssh's exit
            # code, which is 255 when the channel closes without one, and would fail a transfer that worked.
            chan = cast("asyncssh.SSHServerChannel[bytes]", writer.channel)
            with contextlib.suppress(OSError):
                chan.exit(0 if exc is None else 1)
        await super()._cleanup(exc)


class LibrarySession(SSHServerStreamSession[bytes]):
    """A session channel that can only start the ``sftp`` subsystem, served by :class:`LibrarySFTPHandler`."""

    def __init__(self, runtime: Runtime, session: SessionInfo) -> None:
        def factory(chan: SSHChannel[bytes]) -> LibrarySFTPServer:
            return LibrarySFTPServer(cast("asyncssh.SSHServerChannel[bytes]", chan), runtime, session)

        # No session factory and no SCP: shell and exec requests are refused by the base class.
        super().__init__(None, sftp_factory=factory, sftp_version=SFTP_VERSION, allow_scp=False)
        self._info = session
        self._runtime = runtime
        self._activity = runtime.sessions.get(session.session_id)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._activity is not None:
            self._activity.touched()  # a request arriving, however slowly, is not idleness
        super().data_received(data, datatype)

    def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
        return False

    def session_started(self) -> None:
        chan = cast("asyncssh.SSHServerChannel[bytes]", self._chan)
        if chan.get_subsystem() != "sftp":  # pragma: no cover - subsystem_requested refused it already
            chan.close()
            return
        reader: SSHReader[bytes] = SSHReader(self, chan)
        writer: SSHWriter[bytes] = SSHWriter(self, chan)
        server = cast(LibrarySFTPServer, self._init_sftp_server())
        handler = LibrarySFTPHandler(server, reader, writer, SFTP_VERSION, self._activity)
        # Every log line this session causes carries its id, user and peer: bind them in a context of the
        # session's own task (binding in a protocol callback would leak into every later connection).
        context = contextvars.copy_context()
        context.run(
            structlog.contextvars.bind_contextvars,
            session=self._info.session_id, user=self._info.user, peer=self._info.peer,
        )
        task = asyncio.get_running_loop().create_task(handler.run(), context=context)
        self._runtime.track_task(task)  # a stop waits for it: a session's end audits and discards uploads


class LibrarySSHServer(asyncssh.SSHServer):
    """One per connection: authenticates against the policy in force at that moment."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._conn: asyncssh.SSHServerConnection | None = None
        self._peer = "unknown"
        self._session_id = secrets.token_hex(6)
        self._user: str | None = None
        self._auth_attempted = False
        self._admitted = False
        self._auth = ConnectionAuth(lambda: runtime.snapshot)
        self._admission: asyncio.Task[bool] | None = None

    @property
    def _address(self) -> str:
        return self._peer.rpartition(":")[0] or self._peer

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "unknown"
        if not self._runtime.guard.admit_connection(self._address):  # banned, or too many unauthenticated
            conn.abort()
            return
        self._admitted = True
        self._auth.attach(conn)  # sees each certificate whole (asyncssh's hooks get only its CA key)
        conn.reload_config = _options_unchanged  # type: ignore[method-assign]

    def connection_lost(self, exc: Exception | None) -> None:
        self._runtime.credentials.discard(self._session_id)
        if self._user is not None:
            self._runtime.guard.session_ended(self._session_id)
            self._runtime.session_closed(self._user, self._session_id, self._peer)
            return
        if self._admitted:
            self._runtime.guard.ended_unauthenticated(self._address, failed_login=self._auth_attempted)
        if self._auth_attempted:
            # Counted per address and minute, never one entry per attempt (SPEC 8: no flooding the trail).
            self._runtime.audit_writer.login_refused(self._address)

    def begin_auth(self, username: str) -> bool:
        if not self._runtime.database.available:  # SPEC 9: nothing could be audited; not a failed login
            log.warning("session_refused", peer=self._address, reason="database-unreachable")
            raise asyncssh.ServiceNotAvailable("The service is temporarily unavailable; try again shortly.")
        return True  # always ask, so that valid and invalid user names look the same

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        self._auth_attempted = True
        return self._runtime.key_allowed(username, key)

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        self._auth_attempted = True
        return self._auth.certificate_vetted(key.public_data) and self._runtime.ca_allowed(username, key)

    def auth_completed(self) -> None:
        assert self._conn is not None
        self._user = self._conn.get_extra_info("username")
        assert self._user is not None
        if self._auth.credential is not None:
            self._runtime.credentials.add(self._session_id, self._user, self._auth.credential, self._conn.close)
        self._runtime.guard.authenticated()
        self._runtime.session_opened(self._user, self._session_id, self._peer, self._conn)
        organisation = self._runtime.organisation_of(self._user) or ""
        # sessions_per_user counts every node's sessions (a database question, asked in a worker thread); the
        # session channel waits for the answer (session_requested), and a refused connection is closed.
        conn = self._conn
        self._admission = self._runtime.guard.admit_session(
            self._address, self._user, organisation, self._session_id, self._peer)
        self._admission.add_done_callback(lambda task: None if _admitted(task) else conn.close())

    def session_requested(self) -> LibrarySession | bool | Coroutine[Any, Any, LibrarySession]:
        if self._user is None or self._runtime.stopping:
            return False
        if self._admission is not None and not self._admission.done():
            return self._session_once_admitted(self._admission)
        if self._admission is not None and not _admitted(self._admission):
            return False
        return self._new_session() or False

    async def _session_once_admitted(self, admission: asyncio.Task[bool]) -> LibrarySession:
        session = self._new_session() if await asyncio.shield(admission) else None
        if session is None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Session refused")
        return session

    def _new_session(self) -> LibrarySession | None:
        assert self._user is not None
        info = self._runtime.session_info(self._user, self._session_id, self._peer)
        if info is None:
            return None
        return LibrarySession(self._runtime, info)


async def _options_unchanged() -> None:
    """In place of ``SSHServerConnection.reload_config``: asyncssh rebuilds a connection's options at each login,
    in a worker thread, so that ``Match`` blocks of an sshd configuration file can apply to the user name. The
    service gives asyncssh no such file (``config`` unset, no ``rdns_lookup``), so the options could not change,
    and the rebuild cost a worker-thread hop per login for nothing."""


CACHED_USERNAME_LENGTH = 64
"""Longest user name whose prepared form is remembered (policy user names are far shorter)."""


@functools.lru_cache(maxsize=1024)
def _prepared_username(username: str) -> str:
    return saslprep(username)


def _saslprep_remembered(username: str) -> str:
    """asyncssh's ``saslprep`` of a user name, remembered for the last 1,024 short names (a failure is not
    remembered: it raises again, as asyncssh's own does)."""
    return _prepared_username(username) if len(username) <= CACHED_USERNAME_LENGTH else saslprep(username)


def prepare_usernames_once() -> None:
    """asyncssh runs the user name of every authentication request (two or three per login) through RFC 4013's
    SASLprep, a pure-Python table walk that cost about 2 % of a login's CPU; the answer for a name never
    changes, so it is remembered (idempotent; process-wide)."""
    asyncssh.connection.saslprep = _saslprep_remembered  # type: ignore[attr-defined,assignment]


def _admitted(task: asyncio.Task[bool]) -> bool:
    return not task.cancelled() and task.exception() is None and task.result()

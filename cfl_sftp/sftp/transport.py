"""The TCP side under asyncssh: each connection's writes leave for the socket once per turn of the event loop, and
its reads reach asyncssh in pieces of about one packet (:class:`PacketSizedReads`, which says why).

Every SSH packet reaches the transport on its own (from :mod:`.wire`, as a sealed header and body), so a 255 KiB
READ reply becomes 8 packets of 32 KiB: 8 system calls or more if each went to the socket at once.
:class:`CoalescingTransport` queues the writes a connection makes during one callback and passes them to the socket
in one ``writelines`` (one ``writev``) at the loop's next turn; on a 1 GiB download that is a few per cent less
server CPU per GB and 5-30 % more MB/s, as the client is woken once per reply (benchmarks/README.md). Nothing else
changes: the same bytes in the same order (queued bytes count in ``get_write_buffer_size``, and the queue never
exceeds :data:`QUEUE_LIMIT_BYTES`), and a close or EOF sends what is queued first. What bounds the bytes buffered
per connection is, as before, the SSH channel windows and our READ handler's wait for earlier replies to drain:
asyncssh ignores the transport's ``pause_writing``.

asyncssh accepts connections through our listener by its documented ``tunnel=`` hook for listeners that are
not plain TCP: :class:`DirectListener` hands each accepted connection straight to asyncssh, and
:mod:`.proxy`'s listener does so once the PROXY header is read (with the client's address as ``peername``).
What this module leaves to others: the PROXY protocol (:mod:`.proxy`), and everything above TCP (asyncssh).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, cast

SockAddr = tuple[Any, ...]

ConnectionFactory = Callable[[str, int], Any]
"""asyncssh's factory for a new SSH connection (an ``asyncio.Protocol``), given the original host and port."""

QUEUE_LIMIT_BYTES = 256 * 1024
"""At most one whole READ reply (255 KiB and its framing) waits for the loop's turn: past it the queue is written at
once, so a session that answers several READs in one callback holds no more than before."""


READ_PIECE_BYTES = 64 * 1024
"""Two of OpenSSH's 32 KiB channel packets with their framing: small enough that asyncssh's buffer stays short,
large enough that a download's small packets (window adjusts, READ requests) still arrive many to a call."""


class CoalescingTransport(asyncio.Transport):
    """The accepted TCP transport as asyncssh sees it: writes queued per loop turn; ``peername`` as given."""

    def __init__(self, transport: asyncio.Transport, peername: SockAddr | None = None) -> None:
        super().__init__()
        self._inner = transport
        self._peername = peername
        self._queued: list[bytes | bytearray | memoryview] = []
        self._queued_bytes = 0
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self._peername is not None:
            if name == "peername":
                return self._peername
            if name == "proxy_peername":
                return self._inner.get_extra_info("peername", default)
        return self._inner.get_extra_info(name, default)

    # -- writing --------------------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writelines((data,))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        """Queue each piece as it is: asyncssh, and :mod:`.wire` (a sealed packet's header and body apart), write
        new bytes and never touch them again."""
        for data in list_of_data:
            if data:
                self._queued.append(data)
                self._queued_bytes += len(data)
        if self._queued_bytes >= QUEUE_LIMIT_BYTES:
            self._flush()  # at most one reply waits: the socket transport buffers the rest, as without us
        elif self._queued and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        queued, self._queued, self._queued_bytes = self._queued, [], 0
        if queued and not self._inner.is_closing():
            self._inner.writelines(queued)

    def get_write_buffer_size(self) -> int:
        return self._queued_bytes + self._inner.get_write_buffer_size()

    def write_eof(self) -> None:
        self._flush()
        self._inner.write_eof()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def close(self) -> None:
        self._flush()  # as a socket transport's close: what was written is still sent
        self._inner.close()

    def abort(self) -> None:
        self._queued, self._queued_bytes = [], 0
        self._inner.abort()

    # -- the rest, as the socket transport --------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()


class PacketSizedReads(asyncio.Protocol):
    """The socket's protocol in front of asyncssh's connection: what a read returns is passed on in pieces of at
    most :data:`READ_PIECE_BYTES`.

    asyncssh appends each read to its input buffer and takes packets off the front by slicing, which copies the
    rest of the buffer twice per packet. A socket read returns up to 256 KiB of a fast upload, eight 32 KiB
    packets, so each byte was copied about nine times on its way in. In pieces of about one packet, the buffer
    never holds much more than one: the same bytes reach asyncssh in the same order, with a third of the copying
    (docs/decisions.md). The pieces are memoryviews of the read (no copy until asyncssh appends them).
    """

    def __init__(self, connection: asyncio.Protocol, transport: asyncio.Transport) -> None:
        self._connection = connection
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if len(data) <= READ_PIECE_BYTES:
            self._connection.data_received(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), READ_PIECE_BYTES):
            if start and self._closed_by_connection():
                return  # asyncssh ended the connection on an earlier piece: the rest is not for it
            self._connection.data_received(view[start : start + READ_PIECE_BYTES])  # type: ignore[arg-type]

    def _closed_by_connection(self) -> bool:
        """Whether the connection has given up its transport. asyncssh's ``_force_close`` (on a protocol or MAC
        error) drops its ``_transport`` at once but aborts the socket only at the loop's next turn, so the
        socket's own state would still say open for the rest of this read; unpatched, asyncssh would have
        stopped parsing there (private attribute: asyncssh is pinned below 2.25)."""
        return self._transport.is_closing() or getattr(self._connection, "_transport", self._transport) is None

    def eof_received(self) -> bool | None:
        return self._connection.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection.connection_lost(exc)

    def pause_writing(self) -> None:
        self._connection.pause_writing()

    def resume_writing(self) -> None:
        self._connection.resume_writing()


def hand_over(transport: asyncio.Transport, factory: ConnectionFactory, peer: SockAddr,
              peername: SockAddr | None = None) -> asyncio.Protocol:
    """Make asyncssh's connection for ``peer`` the protocol of ``transport``, reading through
    :class:`PacketSizedReads` and writing through a :class:`CoalescingTransport`; returns the protocol to feed
    bytes already read, if any."""
    connection: asyncio.Protocol = factory(str(peer[0]), int(peer[1]))
    reads = PacketSizedReads(connection, transport)
    transport.set_protocol(reads)
    connection.connection_made(CoalescingTransport(transport, peername))
    return reads


class _Accepted(asyncio.Protocol):
    """The protocol of a just-accepted connection, for the instant it takes to hand it to asyncssh."""

    def __init__(self, factory: ConnectionFactory) -> None:
        self._factory = factory

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's transports implement asyncio.Transport without deriving from it.
        stream = cast(asyncio.Transport, transport)
        peer = stream.get_extra_info("peername") or ("unknown", 0)
        hand_over(stream, self._factory, tuple(peer))


class ListeningServer:
    """What asyncssh's acceptor wraps: our TCP server, with the calls ``SSHAcceptor`` and the service make."""

    def __init__(self, server: asyncio.Server) -> None:
        self._server = server

    def get_addresses(self) -> list[SockAddr]:
        return [sock.getsockname() for sock in self._server.sockets]

    def get_port(self) -> int:
        ports = {address[1] for address in self.get_addresses()}
        return ports.pop() if len(ports) == 1 else 0

    def close(self) -> None:
        self._server.close()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class DirectListener:
    """``asyncssh.create_server(tunnel=DirectListener(backlog))``: plain TCP connections, written to through a
    :class:`CoalescingTransport` (asyncssh calls :meth:`create_server` with its own connection factory)."""

    def __init__(self, backlog: int) -> None:
        self._backlog = backlog

    async def create_server(self, session_factory: ConnectionFactory, listen_host: str,
                            listen_port: int) -> ListeningServer:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Accepted(session_factory), listen_host or None, listen_port,
                                          backlog=self._backlog)
        return ListeningServer(server)

    def close(self) -> None:
        """Part of asyncssh's tunnel contract; the servers made here are closed through their acceptors."""

    async def wait_closed(self) -> None:
        """Part of asyncssh's tunnel contract (see :meth:`close`)."""

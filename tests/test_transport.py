"""The transport asyncssh writes to (cfl_sftp/sftp/transport.py): writes of one loop turn leave together, in
order, and nothing written is lost at a close. Real TCP sockets on 127.0.0.1; the SSH side is covered by every
SFTP test, which all go through it."""

from __future__ import annotations

import asyncio

from cfl_sftp.sftp.transport import READ_PIECE_BYTES, CoalescingTransport, PacketSizedReads

PIECES = [b"SSH-2.0-", b"x" * 32768, b"", b"\x00" * 5, b"y" * 70000]


async def accepted_pair() -> tuple[asyncio.Transport, asyncio.StreamReader, asyncio.StreamWriter, asyncio.Server]:
    """A server-side socket transport and a client's reader and writer for the same connection."""
    accepted: asyncio.Future[asyncio.Transport] = asyncio.get_running_loop().create_future()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.set_result(transport)  # type: ignore[arg-type]

    server = await asyncio.get_running_loop().create_server(Accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return await accepted, reader, writer, server


async def test_writes_are_queued_until_the_loop_turns_then_arrive_in_order_and_a_close_sends_them_first() -> None:
    inner, reader, writer, server = await accepted_pair()
    transport = CoalescingTransport(inner)
    for piece in PIECES:
        transport.write(piece)
    assert transport.get_write_buffer_size() == sum(map(len, PIECES))  # queued bytes count for flow control
    assert inner.get_write_buffer_size() == 0  # nothing has reached the socket yet
    transport.close()
    assert await asyncio.wait_for(reader.read(), 10) == b"".join(PIECES)
    writer.close()
    server.close()


async def test_the_queue_is_written_at_the_next_turn_and_eof_follows_it() -> None:
    inner, reader, writer, server = await accepted_pair()
    transport = CoalescingTransport(inner, peername=("203.0.113.7", 4000))
    transport.writelines([b"one", b"two"])
    assert await asyncio.wait_for(reader.readexactly(6), 10) == b"onetwo"
    transport.write(b"three")
    transport.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == b"three"
    assert transport.get_extra_info("peername") == ("203.0.113.7", 4000)
    assert transport.get_extra_info("proxy_peername") == inner.get_extra_info("peername")
    transport.close()
    writer.close()
    server.close()


async def test_an_abort_drops_what_is_still_queued() -> None:
    inner, reader, writer, server = await accepted_pair()
    transport = CoalescingTransport(inner)
    transport.write(b"never sent")
    transport.abort()
    assert transport.get_write_buffer_size() == 0
    try:
        received = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        received = b""
    assert received == b""
    writer.close()
    server.close()


async def test_a_queue_past_one_reply_is_written_at_once() -> None:
    inner, reader, writer, server = await accepted_pair()
    transport = CoalescingTransport(inner)
    transport.write(b"z" * 200_000)
    assert transport.get_write_buffer_size() == 200_000  # one reply's worth waits for the loop's turn
    transport.write(b"z" * 100_000)  # past QUEUE_LIMIT_BYTES: handed to the socket transport now
    assert transport.get_write_buffer_size() == inner.get_write_buffer_size()
    transport.close()
    assert await asyncio.wait_for(reader.read(), 10) == b"z" * 300_000
    writer.close()
    server.close()


class _Recorder(asyncio.Protocol):
    """Stands where asyncssh's connection would: keeps each piece as it arrives. ``close_on`` closes as asyncssh's
    ``_force_close`` does on a protocol or MAC error: its ``_transport`` is dropped at once, the socket aborted only
    at the loop's next turn."""

    def __init__(self, transport: asyncio.Transport, close_on: int | None = None) -> None:
        self.pieces: list[bytes] = []
        self.ended = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = transport
        self._close_on = close_on

    def data_received(self, data: bytes) -> None:
        self.pieces.append(bytes(data))
        if len(self.pieces) == self._close_on and self._transport is not None:
            asyncio.get_running_loop().call_soon(self._transport.abort)
            self._transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


async def test_a_read_is_passed_on_in_pieces_of_at_most_two_packets() -> None:
    inner, _reader, writer, server = await accepted_pair()
    recorder = _Recorder(inner)
    pieces = PacketSizedReads(recorder, inner)
    read = bytes(range(256)) * 1000  # 256,000 bytes: what one socket read of an upload returns
    pieces.data_received(read)
    assert [len(piece) for piece in recorder.pieces] == [READ_PIECE_BYTES] * 3 + [len(read) - 3 * READ_PIECE_BYTES]
    assert b"".join(recorder.pieces) == read
    pieces.data_received(b"small")  # a read of at most one piece is passed on as it is
    assert recorder.pieces[-1] == b"small"
    writer.close()
    server.close()


async def test_a_large_upload_reaches_asyncssh_whole_and_in_order_over_a_real_socket() -> None:
    inner, _reader, writer, server = await accepted_pair()
    recorder = _Recorder(inner)
    inner.set_protocol(PacketSizedReads(recorder, inner))
    sent = bytes(range(256)) * 4096  # 1 MiB
    writer.write(sent)
    await writer.drain()
    writer.close()
    await asyncio.wait_for(recorder.ended, 10)
    assert b"".join(recorder.pieces) == sent
    assert max(map(len, recorder.pieces)) <= READ_PIECE_BYTES
    server.close()


async def test_no_piece_follows_once_asyncssh_has_closed_the_connection() -> None:
    inner, _reader, writer, server = await accepted_pair()
    recorder = _Recorder(inner, close_on=1)
    pieces = PacketSizedReads(recorder, inner)
    inner.set_protocol(pieces)
    pieces.data_received(b"z" * (3 * READ_PIECE_BYTES))  # one read of three pieces; the first closes
    assert not inner.is_closing()  # the socket itself is still open until the loop turns
    assert recorder.pieces == [b"z" * READ_PIECE_BYTES]
    await asyncio.wait_for(recorder.ended, 10)
    writer.close()
    server.close()

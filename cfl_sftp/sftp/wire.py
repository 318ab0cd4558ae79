"""Three changes to asyncssh's SSH packet layer, each to work it did for nothing on every packet.

**No empty ``MSG_IGNORE`` before each packet under AEAD and counter-mode ciphers.** asyncssh 2.24 sends one before
each packet once keys are in use (``SSHConnection.send_packet``). It is the countermeasure of RFC 4251 section
9.3.1 against chosen-plaintext attacks on CBC mode, where each packet's IV is the last cipher block of the one
before: an ignore packet in between makes that IV unpredictable. The AEAD and counter-mode ciphers
(``chacha20-poly1305@openssh.com``, ``aes*-gcm@openssh.com``, ``aes*-ctr``), asyncssh's default list, which
cfl-sftp offers unchanged, take a fresh nonce or counter per packet and gain nothing from it; OpenSSH sends
none. Every reply of ours paid for one: random padding, AES-GCM, a sequence number and queue space, on both ends
of the connection. A login is 32 packets of which 14 were these; a 1 GiB download is ~33,000 data packets and as
many of these. ``send_packet`` is wrapped so that this one packet (an empty ``MSG_IGNORE``, the only one asyncssh
sends by itself) is skipped while the connection sends with one of :data:`FRESH_IV_CIPHERS`. Any other packet,
and every packet under any other cipher (CBC, or one added to asyncssh later), goes through asyncssh's own code
unchanged.

**AES-GCM without copies of each packet around the cipher.** asyncssh seals a packet with a new ``AESGCM`` object
(a key schedule) each time, slices the sealed bytes into ciphertext and tag (two copies), and joins them again
to send; opening one joins the body and the tag to the ciphertext in two steps. On a download that is three
needless passes over every byte. :func:`drop_needless_packet_work` replaces ``GCMEncryption.encrypt_packet`` and
``decrypt_packet`` with the same computation over the same bytes: one ``AESGCM`` per key, the sealed packet
returned whole (header, ciphertext, tag; asyncssh appends the empty "MAC" for free), the packet to open joined
once. The nonce still advances exactly as asyncssh's ``GCMCipher`` does it, through its own ``_update_iv``, and a
new key (at each rekey) comes with a new ``GCMCipher`` and so a new ``AESGCM``. asyncssh also seals private keys
with this class, with no header and the tag wanted apart: that call goes to asyncssh's own code.

**Channel data without copies.** asyncssh copies each byte of a channel's output seven times between
``SSHChannel.write`` and the socket: into a ``bytearray`` send buffer, out of it a packet's worth at a time, into
the length-prefixed string, behind the channel number, behind the message type, between padding length and
padding, and behind the packet's length. A 1 GiB download is ~33,000 channel packets of 32 KiB, and those copies,
with the Python calls that make them, were about a sixth of the server's CPU per GB. Here
``SSHChannel.writelines`` queues the pieces it is given as they are (read-only views, no join), and
``_flush_send_buf`` cuts each packet's worth out of the queue as views and builds the padded packet in one join,
which the cipher seals and the transport takes as it comes (:func:`_send_channel_data`). That direct path runs
only where asyncssh's own ``send_packet`` would do exactly the same and nothing more: keys and login complete, no
rekey due, no compression, one of :data:`FRESH_IV_CIPHERS` and no packet log. Otherwise the packet goes through
asyncssh's ``send_packet`` (which defers it during a key exchange, or starts one), built from the same views.
Text channels, and ``write``, stay asyncssh's; their ``bytearray`` entries are sent by the same flush, without
the copy out.

All three rely on asyncssh internals (``send_packet``'s signature, the ``send_cipher`` extra info, ``GCMCipher``'s
``_key``, ``_iv`` and ``_update_iv``, the channel's send buffer and window, the connection's sequence, rekey and
padding state): asyncssh is pinned below 2.25, and tests/test_wire.py checks the behaviour on real connections,
per cipher, at each upgrade.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from typing import Any

from asyncssh.channel import SSHChannel
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_CHANNEL_EXTENDED_DATA, MSG_IGNORE
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import GCMEncryption
from asyncssh.packet import String, UInt32
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cfl_sftp.logs import asyncssh_packets_logged

FRESH_IV_CIPHERS = frozenset({
    "chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
    "aes128-ctr", "aes192-ctr", "aes256-ctr",
})
"""Ciphers whose packets need no ignore packet between them: a nonce or counter per packet, not a chained IV."""

_EMPTY = String(b"")
_send_packet = SSHConnection.send_packet
_encrypt_packet = GCMEncryption.encrypt_packet
_write = SSHChannel.write
_writelines = SSHChannel.writelines


def _send_packet_unless_needless_ignore(
    self: SSHConnection, pkttype: int, *args: bytes, handler: Any = None
) -> None:
    if pkttype == MSG_IGNORE and args == (_EMPTY,) and self.get_extra_info("send_cipher") in FRESH_IV_CIPHERS:
        return
    _send_packet(self, pkttype, *args, handler=handler)


def _aead(cipher: GCMCipher) -> AESGCM:
    """The cipher's ``AESGCM``, made once for its key (a key is used for one direction until the next rekey)."""
    aead: AESGCM | None = cipher.__dict__.get("_cfl_aead")
    if aead is None:
        aead = cipher.__dict__["_cfl_aead"] = AESGCM(cipher._key)
    return aead


def _encrypt_gcm_packet(self: GCMEncryption, seq: int, header: bytes, packet: bytes) -> tuple[bytes, bytes]:
    if not header:  # not an SSH packet: asyncssh sealing a private key, which wants the tag apart
        return _encrypt_packet(self, seq, header, packet)
    cipher = self._cipher
    sealed = _aead(cipher).encrypt(cipher._iv, packet, header)  # ciphertext and tag
    cipher._update_iv()
    return header, sealed  # asyncssh sends packet + mac: the same bytes as its own split; ours, both as they are


def _decrypt_gcm_packet(  # noqa: PLR0917 - asyncssh's own signature
    self: GCMEncryption, seq: int, first: bytes, rest: bytes, header_len: int, mac: bytes
) -> bytes | None:
    cipher = self._cipher
    try:
        opened: bytes | None = _aead(cipher).decrypt(
            cipher._iv, b"".join((first[header_len:], rest, mac)), first[:header_len]
        )
    except InvalidTag:
        opened = None
    cipher._update_iv()
    return opened


Piece = memoryview
"""A read-only view of bytes queued on a channel: slicing one for a packet copies nothing."""


def _queue_channel_data(
    self: SSHChannel[Any], list_of_data: Iterable[bytes | bytearray | memoryview], datatype: int | None = None
) -> None:
    """``SSHChannel.writelines`` (one call per SFTP reply: its framing and its data), the pieces queued unjoined.
    A piece that is not ``bytes`` is copied once, as asyncssh's ``write`` copies everything: its owner may reuse
    it. Text channels, and channels whose class rewrites ``write`` (asyncssh's TUN/TAP channels prefix each
    packet), keep asyncssh's own, which joins the pieces and calls ``write``."""
    if self._encoding or type(self).write is not _write:
        _writelines(self, list_of_data, datatype)
        return
    if self._send_state != "open":
        raise BrokenPipeError("Channel not open for sending")
    if datatype is not None and datatype not in self._write_datatypes:
        raise OSError("Invalid extended data type")
    # Every piece is checked before any is queued, as asyncssh's join fails before it queues anything.
    views = [memoryview(data if type(data) is bytes else bytes(memoryview(data))) for data in list_of_data]
    queued = sum(map(len, views))  # views of bytes: their length is their size in bytes
    if queued:
        queue: list[tuple[Piece | bytearray, int | None]] = self._send_buf  # type: ignore[assignment]
        queue.extend((view, datatype) for view in views if view)
        self._send_buf_len += queued
        self._flush_send_buf()


def _flush_channel_data(self: SSHChannel[Any]) -> None:
    """``SSHChannel._flush_send_buf``: as much queued data as the peer's window allows, each packet's worth cut out
    of the queue as views (several pieces of one data type may share a packet), then asyncssh's end of sending."""
    queue: list[tuple[Piece | bytearray, int | None]] = self._send_buf  # type: ignore[assignment]
    while queue and self._send_window:
        room = min(self._send_window, self._send_pktsize)
        datatype = queue[0][1]
        pieces: list[Piece] = []
        size = 0
        while queue and size < room and queue[0][1] == datatype:
            piece = memoryview(queue[0][0])  # asyncssh's write() queued a bytearray, which no one else holds
            if len(piece) > room - size:
                pieces.append(piece[: room - size])
                queue[0] = (piece[room - size :], datatype)
                size = room
            else:
                pieces.append(piece)
                del queue[0]
                size += len(piece)
        self._send_buf_len -= size
        self._send_window -= size
        if datatype is None:
            _send_channel_data(self, MSG_CHANNEL_DATA, (UInt32(size), *pieces))
        else:
            _send_channel_data(self, MSG_CHANNEL_EXTENDED_DATA, (UInt32(datatype), UInt32(size), *pieces))
    self._pause_resume_writing()
    if not queue:
        if self._send_state == "eof_pending":
            self.send_packet(MSG_CHANNEL_EOF)
            self._send_state = "eof"
        elif self._send_state == "close_pending":
            self._close_send()


def _sends_directly(conn: SSHConnection, channel: SSHChannel[Any]) -> bool:
    """Whether asyncssh's ``send_packet`` would, for a channel packet now, only pad, seal and send it: not defer it
    (keys or login pending), not start a key exchange, not compress it, not precede it with an ignore packet, not
    dump it to the log."""
    return bool(
        conn._kex_complete and conn._auth_complete and not conn._compressor
        and conn._rekey_bytes_sent < conn._rekey_bytes
        and not (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)
        and conn.get_extra_info("send_cipher") in FRESH_IV_CIPHERS
        and not asyncssh_packets_logged(channel.logger)
    )


def _send_channel_data(channel: SSHChannel[Any], pkttype: int, fields: tuple[bytes | Piece, ...]) -> None:
    """One channel data packet, its payload given in pieces: padded, sealed and sent with one copy of the data
    (the join) where :func:`_sends_directly`, through asyncssh's ``send_packet`` otherwise."""
    if channel._send_chan is None:
        return  # as asyncssh's SSHChannel.send_packet: the channel was never confirmed
    conn: SSHConnection = channel._conn  # type: ignore[assignment]
    if not _sends_directly(conn, channel):
        conn.send_packet(pkttype, UInt32(channel._send_chan), *fields, handler=channel)  # type: ignore[arg-type]
        return
    blocksize = conn._send_blocksize
    padlen = -(conn._send_enchdrlen + 5 + sum(map(len, fields))) % blocksize
    if padlen < 4:
        padlen += blocksize
    packet = b"".join((bytes((padlen, pkttype)), UInt32(channel._send_chan), *fields, os.urandom(padlen)))
    seq = conn._send_seq
    sealed, mac = conn._send_encryption.encrypt_packet(seq, UInt32(len(packet)), packet)  # type: ignore[union-attr]
    transport = conn._transport
    if transport:
        with contextlib.suppress(ConnectionError):  # as asyncssh's _send: connection_lost reports the loss
            transport.writelines((sealed, mac))
    conn._send_seq = (seq + 1) & 0xFFFFFFFF
    conn._rekey_bytes_sent += len(packet)


def drop_needless_packet_work() -> None:
    """From now on, in this process: no empty ``MSG_IGNORE`` but under CBC ciphers, AES-GCM packets sealed and
    opened without extra copies, and channel data sent with one copy (idempotent)."""
    SSHConnection.send_packet = _send_packet_unless_needless_ignore  # type: ignore[method-assign]
    GCMEncryption.encrypt_packet = _encrypt_gcm_packet  # type: ignore[method-assign]
    GCMEncryption.decrypt_packet = _decrypt_gcm_packet  # type: ignore[method-assign]
    SSHChannel.writelines = _queue_channel_data  # type: ignore[method-assign,assignment]
    SSHChannel._flush_send_buf = _flush_channel_data  # type: ignore[method-assign]

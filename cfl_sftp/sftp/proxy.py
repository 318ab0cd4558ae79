"""PROXY protocol (v2, and v1 text) in front of the SSH listener (SPEC 9 ``proxy_protocol = true``).

Behind a TCP load balancer every connection comes from the balancer; the balancer's PROXY header names the
client. Two parts:

* :func:`parse_proxy_header` is pure code on bytes (no socket, no clock): give it what has arrived so far and it
  answers "need more", a :class:`ProxyHeader`, or raises :class:`ProxyHeaderError` as soon as the bytes cannot
  become a valid header (so garbage and a bare ``SSH-2.0-`` banner are refused at their first bytes).
* :class:`ProxyProtocolListener` plugs that parser under asyncssh through ``asyncssh.create_server(tunnel=...)``,
  asyncssh's documented hook for listeners that are not plain TCP: it accepts TCP connections itself, reads the
  header (the server sends nothing, not even its SSH banner, before the header is complete), then hands the
  connection to asyncssh with a transport whose ``peername`` is the client's address. So every
  ``conn.get_extra_info("peername")`` (limits, bans, logs, audit, certificate ``source-address``) sees the real
  client, and the balancer's own address stays readable as ``proxy_peername``.

A ``LOCAL`` command (v2; v1's ``UNKNOWN``) is a balancer's health check or its own connection: it is served with
the TCP connection's own endpoints, as the PROXY protocol specification asks. An address family we do not route
(``AF_UNIX``, ``UNSPEC``) is treated the same way. IPv4-mapped IPv6 sources are reported as IPv4, so a ban on
``192.0.2.1`` holds whichever way the client reached the balancer. TLVs after the addresses are skipped.

A connection from a peer outside ``trusted_proxies`` (when the operator lists any) is refused before anything
is read from it: whoever can reach the port directly could otherwise claim any client address in a header.

What this module leaves to others: deciding whether an address is banned or over a limit (:mod:`.limits`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import structlog

from cfl_sftp.sftp.transport import ConnectionFactory, ListeningServer, SockAddr, hand_over

log = structlog.get_logger(__name__)

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107
"""The longest v1 line, CRLF included (the specification's bound)."""
V2_MAX_ADDRESS_BLOCK = 4096
"""Addresses plus TLVs we accept after the 16-byte v2 prefix; HAProxy sends 12 (IPv4) or 36 (IPv6) plus a few TLVs."""

HEADER_TIMEOUT_SECONDS = 5.0
"""A connection whose header is not complete by then is closed: a balancer sends it at once."""

class ProxyHeaderError(ValueError):
    """The bytes received cannot be (the start of) a valid PROXY header; ``reason`` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header: ``length`` bytes of the stream were the header, the rest is the client's."""

    version: int
    length: int
    source: SockAddr | None
    """The client as a socket address (``(host, port)`` or ``(host, port, 0, 0)``); None for LOCAL/UNKNOWN."""
    destination: SockAddr | None


def _address(packed: bytes, port: int) -> SockAddr:
    ip = ipaddress.ip_address(packed)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return (str(ip.ipv4_mapped), port)
    if isinstance(ip, ipaddress.IPv6Address):
        return (str(ip), port, 0, 0)
    return (str(ip), port)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    version_command, family_protocol, length = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError("bad-version", f"PROXY v2 header with version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError("bad-command", f"PROXY v2 header with command {command}")
    if length > V2_MAX_ADDRESS_BLOCK:
        raise ProxyHeaderError("too-long", f"PROXY v2 header declares {length} bytes of addresses")
    if len(data) < 16 + length:
        return None
    total = 16 + length
    if command == 0:  # LOCAL: the balancer's own connection; the address block is ignored
        return ProxyHeader(2, total, None, None)
    family, protocol = family_protocol >> 4, family_protocol & 0x0F
    if protocol == 2:
        raise ProxyHeaderError("bad-protocol", "PROXY v2 header for a datagram connection")
    if family == 1:
        size, width = 12, 4
    elif family == 2:
        size, width = 36, 16
    elif family in (0, 3):  # UNSPEC, AF_UNIX: nothing we can route; use the connection's endpoints
        return ProxyHeader(2, total, None, None)
    else:
        raise ProxyHeaderError("bad-family", f"PROXY v2 header with address family {family}")
    if protocol != 1:
        raise ProxyHeaderError("bad-protocol", f"PROXY v2 header with transport protocol {protocol}")
    if length < size:
        raise ProxyHeaderError("short-addresses", f"PROXY v2 address block of {length} bytes, {size} needed")
    block = data[16 : 16 + size]
    source_port, destination_port = struct.unpack_from("!HH", block, 2 * width)
    return ProxyHeader(2, total, _address(block[:width], source_port),
                       _address(block[width : 2 * width], destination_port))


def _v1_port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError("bad-port", f"PROXY v1 header with port {text[:8]!r}")
    return int(text)


def _v1_address(text: str, family: str) -> bytes:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError("bad-address", f"PROXY v1 header with address {text[:48]!r}") from None
    if (family == "TCP4") != isinstance(ip, ipaddress.IPv4Address):
        raise ProxyHeaderError("bad-address", f"PROXY v1 {family} header with address {text[:48]!r}")
    return ip.packed


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH or b"\n" in data[:V1_MAX_LENGTH]:
            raise ProxyHeaderError("bad-line", "PROXY v1 header without CRLF within 107 bytes")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("bad-line", "PROXY v1 header that is not ASCII") from None
    words = line.split(" ")
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return ProxyHeader(1, end + 2, None, None)
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("bad-line", "PROXY v1 header is not PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    source = _v1_address(words[2], words[1])
    destination = _v1_address(words[3], words[1])
    return ProxyHeader(1, end + 2, _address(source, _v1_port(words[4])),
                       _address(destination, _v1_port(words[5])))


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``; None while more bytes are needed.

    Raises :class:`ProxyHeaderError` as soon as ``data`` cannot be the start of a valid v2 or v1 header.
    """
    for signature, parse in ((V2_SIGNATURE, _parse_v2), (V1_PREFIX, _parse_v1)):
        common = min(len(data), len(signature))
        if data[:common] == signature[:common]:
            return parse(data) if len(data) >= len(signature) else None
    raise ProxyHeaderError("no-header", "the connection did not start with a PROXY protocol header")


# -- the asyncio side -----------------------------------------------------------------------------------


RefusalHook = Callable[[str, str], None]
"""Called with (TCP peer address, reason) when a connection is closed for want of a valid header."""

WAITING_CAP_REASON = "unauthenticated-connections"
"""The reason given to the refusal hook when too many connections are still waiting for their header."""
UNTRUSTED_REASON = "untrusted-proxy"
"""The reason given to the refusal hook for a connection from outside ``trusted_proxies``."""

Networks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]


def is_trusted(address: str, trusted: Networks) -> bool:
    """Whether a connection from ``address`` may send a PROXY header: every peer when ``trusted`` is empty."""
    if not trusted:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in trusted)


class _Waiting:
    """Connections of one listener whose header has not arrived: they hold a socket each, and count towards the
    node's ``unauthenticated_connections`` cap like a connection still in its SSH handshake."""

    def __init__(self, cap: Callable[[], int]) -> None:
        self.cap = cap
        self.count = 0


class _HeaderReader(asyncio.Protocol):
    """Reads one PROXY header, then gives the transport to a new asyncssh connection."""

    def __init__(self, factory: ConnectionFactory, refused: RefusalHook, timeout: float, waiting: _Waiting,
                 trusted: Networks) -> None:
        self._factory = factory
        self._trusted = trusted
        self._refused = refused
        self._waiting = waiting
        self._counted = False
        self._timeout = timeout
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done = False

    def _tcp_peer(self) -> SockAddr:
        assert self._transport is not None
        peer = self._transport.get_extra_info("peername")
        return tuple(peer) if peer else ("unknown", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP server makes stream transports only. No isinstance check: uvloop's transports implement the
        # asyncio.Transport interface without deriving from it, and an assert here failed every connection
        # before it could read its header (no SSH banner) when serving on uvloop.
        self._transport = cast(asyncio.Transport, transport)
        if not is_trusted(str(self._tcp_peer()[0]), self._trusted):
            self._refuse(UNTRUSTED_REASON, "the peer is not in trusted_proxies")
            return
        if self._waiting.count >= self._waiting.cap():
            self._refuse(WAITING_CAP_REASON, "too many connections waiting for their PROXY header")
            return
        self._waiting.count += 1
        self._counted = True
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._timed_out)

    def _stop_waiting(self) -> None:
        self._done = True
        if self._counted:
            self._counted = False
            self._waiting.count -= 1
        if self._timer is not None:
            self._timer.cancel()

    def _refuse(self, reason: str, message: str) -> None:
        self._stop_waiting()
        peer = self._tcp_peer()
        log.warning("proxy_header_refused", peer=f"{peer[0]}:{peer[1]}", reason=reason, message=message,
                    bytes_received=len(self._buffer))
        self._refused(str(peer[0]), reason)
        assert self._transport is not None
        self._transport.abort()

    def _timed_out(self) -> None:
        if not self._done:
            self._refuse("header-timeout", f"no complete PROXY header within {self._timeout:g} s")

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buffer += data
        try:
            header = parse_proxy_header(self._buffer)
        except ProxyHeaderError as exc:
            self._refuse(exc.reason, str(exc))
            return
        if header is not None:
            self._hand_over(header)

    def _hand_over(self, header: ProxyHeader) -> None:
        self._stop_waiting()  # from here the SSH layer's own cap counts it until it authenticates
        transport = self._transport
        assert transport is not None
        peer = header.source or self._tcp_peer()
        connection = hand_over(transport, self._factory, peer, peername=peer)
        rest = self._buffer[header.length :]
        self._buffer = b""
        if rest and not transport.is_closing():
            connection.data_received(rest)

    def eof_received(self) -> bool | None:
        return None  # close: a connection that ends before its header is finished is simply gone

    def connection_lost(self, exc: Exception | None) -> None:
        done = self._done
        self._stop_waiting()
        if not done and self._buffer:
            peer = self._tcp_peer()
            log.info("proxy_header_incomplete", peer=f"{peer[0]}:{peer[1]}", bytes_received=len(self._buffer))


class ProxyProtocolListener:
    """``asyncssh.create_server(tunnel=ProxyProtocolListener(...))``: TCP connections that start with a PROXY
    header (asyncssh calls :meth:`create_server` with its own connection factory)."""

    def __init__(self, refused: RefusalHook, cap: Callable[[], int], timeout: float | None = None,
                 trusted: Networks = (), backlog: int = 100) -> None:
        self._refused = refused
        self._trusted = trusted
        self._backlog = backlog
        self._waiting = _Waiting(cap)
        self._timeout = timeout

    async def create_server(self, session_factory: ConnectionFactory, listen_host: str,
                            listen_port: int) -> ListeningServer:
        timeout = self._timeout if self._timeout is not None else HEADER_TIMEOUT_SECONDS
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _HeaderReader(session_factory, self._refused, timeout, self._waiting, self._trusted),
            listen_host or None,
            listen_port,
            backlog=self._backlog,
        )
        return ListeningServer(server)

    def close(self) -> None:
        """Part of asyncssh's tunnel contract; the servers made here are closed through their acceptors."""

    async def wait_closed(self) -> None:
        """Part of asyncssh's tunnel contract (see :meth:`close`)."""

"""PROXY protocol (SPEC 9 ``proxy_protocol = true``): the parser on bytes, then a real server behind raw headers.

The parser tests feed bytes, whole and byte by byte, with no event loop. The server tests send real headers (as
HAProxy's ``send-proxy-v2`` does) on a TCP connection and run a real asyncssh client over the same socket, so the
address the header names is what the service logs, limits and audits.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from pathlib import Path

import asyncssh
import pytest

from cfl_sftp.config import ConfigError, load_config
from cfl_sftp.sftp import proxy
from cfl_sftp.sftp.proxy import ProxyHeader, ProxyHeaderError, is_trusted, parse_proxy_header
from tests.sftp_support import CLIENT_TIMEOUT, SftpServer, start_sftp_server

V2 = proxy.V2_SIGNATURE


def v2_header(source: str, source_port: int, destination: str = "192.0.2.10", destination_port: int = 22,
              *, command: int = 1, tlvs: bytes = b"") -> bytes:
    """A PROXY v2 header as HAProxy writes it (``send-proxy-v2``), with optional TLVs after the addresses."""
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", source_port, destination_port) + tlvs
    return V2 + bytes([0x20 | command, family]) + struct.pack("!H", len(block)) + block


def feed_bytewise(data: bytes) -> tuple[int, ProxyHeader]:
    """Feed ``data`` one byte more at a time: how many bytes it took, and the header then."""
    for end in range(1, len(data) + 1):
        header = parse_proxy_header(data[:end])
        if header is not None:
            return end, header
    raise AssertionError("no header after every byte")


# -- the parser ------------------------------------------------------------------------------------------


def test_v2_ipv4_header_names_the_client_and_its_length() -> None:
    data = v2_header("203.0.113.7", 51000) + b"SSH-2.0-client\r\n"
    header = parse_proxy_header(data)
    assert header == ProxyHeader(2, 28, ("203.0.113.7", 51000), ("192.0.2.10", 22))
    assert data[header.length :] == b"SSH-2.0-client\r\n"


def test_v2_ipv6_header_gives_a_socket_style_address() -> None:
    header = parse_proxy_header(v2_header("2001:db8::5", 4000, "2001:db8::1", 2222))
    assert header is not None
    assert header.source == ("2001:db8::5", 4000, 0, 0)
    assert header.length == 16 + 36


def test_v2_ipv4_mapped_source_is_reported_as_ipv4() -> None:
    header = parse_proxy_header(v2_header("::ffff:198.51.100.9", 1234, "::ffff:192.0.2.1"))
    assert header is not None
    assert header.source == ("198.51.100.9", 1234)


def test_v2_header_completes_only_at_its_last_byte_when_fragmented() -> None:
    data = v2_header("203.0.113.7", 51000, tlvs=b"\x05\x00\x03abc")  # a unique-id TLV, skipped
    taken, header = feed_bytewise(data + b"SSH-2.0-x\r\n")
    assert taken == len(data) == header.length
    assert header.source == ("203.0.113.7", 51000)


def test_v2_local_command_uses_the_connection_itself() -> None:
    header = parse_proxy_header(v2_header("203.0.113.7", 1, command=0))
    assert header is not None
    assert header.source is None
    assert header.length == 28


def test_v2_unspec_and_unix_families_use_the_connection_itself() -> None:
    unspec = V2 + b"\x21\x00\x00\x00"
    unix = V2 + b"\x21\x31" + struct.pack("!H", 216) + bytes(216)
    assert parse_proxy_header(unspec) == ProxyHeader(2, 16, None, None)
    assert parse_proxy_header(unix) == ProxyHeader(2, 232, None, None)


@pytest.mark.parametrize(("data", "reason"), [
    (b"SSH-2.0-OpenSSH_9.2\r\n", "no-header"),
    (b"\r\n\r\n\x00\r\nQUIX\n", "no-header"),
    (b"GET / HTTP/1.1\r\n", "no-header"),
    (V2 + b"\x11\x11\x00\x0c" + bytes(12), "bad-version"),
    (V2 + b"\x22\x11\x00\x0c" + bytes(12), "bad-command"),
    (V2 + b"\x21\x12\x00\x0c" + bytes(12), "bad-protocol"),
    (V2 + b"\x21\x41\x00\x0c" + bytes(12), "bad-family"),
    (V2 + b"\x21\x11\x00\x08" + bytes(8), "short-addresses"),
    (V2 + b"\x21\x21\x00\x0c" + bytes(12), "short-addresses"),
    (V2 + b"\x21\x11\xff\xff", "too-long"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n", "bad-line"),
    (b"PROXY TCP4 1.2.3.999 5.6.7.8 80 22\r\n", "bad-address"),
    (b"PROXY TCP4 ::1 ::1 80 22\r\n", "bad-address"),
    (b"PROXY TCP6 1.2.3.4 5.6.7.8 80 22\r\n", "bad-address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 22\r\n", "bad-port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 22\r\n", "bad-port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 22\n", "bad-line"),
    (b"PROXY " + b"A" * 120, "bad-line"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xff 22\r\n", "bad-line"),
])
def test_garbage_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyHeaderError) as caught:
        parse_proxy_header(data)
    assert caught.value.reason == reason


def test_garbage_is_refused_at_its_first_wrong_byte() -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(b"S")
    assert parse_proxy_header(b"\r\n\r") is None  # still a possible v2 signature
    assert parse_proxy_header(b"PRO") is None  # still a possible v1 line


def test_v1_header_is_accepted_and_fragments_complete_at_crlf() -> None:
    line = b"PROXY TCP4 198.51.100.22 192.0.2.10 35646 22\r\n"
    taken, header = feed_bytewise(line + b"SSH-2.0-x\r\n")
    assert taken == len(line)
    assert header == ProxyHeader(1, len(line), ("198.51.100.22", 35646), ("192.0.2.10", 22))
    six = parse_proxy_header(b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 22\r\n")
    assert six is not None
    assert six.source == ("2001:db8::7", 65535, 0, 0)


def test_v1_unknown_uses_the_connection_itself() -> None:
    line = b"PROXY UNKNOWN whatever follows\r\n"
    assert parse_proxy_header(line + b"SSH-2.0-x") == ProxyHeader(1, len(line), None, None)


# -- a real server behind raw headers ----------------------------------------------------------------------


async def start_proxied(tmp_path: Path, settings: dict[str, str] | None = None) -> SftpServer:
    return await start_sftp_server(tmp_path, {"proxy_protocol": "true", **(settings or {})})


async def connect_via(server: SftpServer, header: bytes, user: str,
                      key: asyncssh.SSHKey | str | None = None) -> asyncssh.SSHClientConnection:
    """Open TCP, send ``header`` as a balancer would, then run asyncssh's client over that socket."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT)
    sock.sendall(header)
    sock.setblocking(False)
    return await asyncio.wait_for(
        asyncssh.connect(sock=sock, username=user, client_keys=[key or str(server.key(user))], known_hosts=None,
                         agent_path=None, config=None, preferred_auth="publickey"),
        CLIENT_TIMEOUT,
    )


async def closes_without_banner(server: SftpServer, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes: what it sent back (nothing, when it refused)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    received = await asyncio.wait_for(reader.read(), CLIENT_TIMEOUT)
    writer.close()
    return received


async def test_the_headers_client_address_is_logged_and_audited(tmp_path: Path) -> None:
    server = await start_proxied(tmp_path)
    try:
        async with await connect_via(server, v2_header("203.0.113.7", 51000), "northern-ops") as conn:
            sftp = await conn.start_sftp_client()
            assert "images" in await sftp.listdir("/")
        accepted = await server.wait_for_audit("login-accepted")
        assert [e["peer"] for e in accepted] == ["203.0.113.7:51000"]
        closed = await server.wait_for_audit("session-closed")
        assert [e["peer"] for e in closed] == ["203.0.113.7:51000"]
    finally:
        await server.service.stop()


async def test_a_v1_header_works_too(tmp_path: Path) -> None:
    server = await start_proxied(tmp_path)
    try:
        header = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 22\r\n"
        async with await connect_via(server, header, "northern-ops") as conn:
            await conn.start_sftp_client()
        accepted = await server.wait_for_audit("login-accepted")
        assert [e["peer"] for e in accepted] == ["2001:db8::7:40000"]
    finally:
        await server.service.stop()


async def test_a_connection_without_a_header_gets_no_banner_and_is_audited(tmp_path: Path) -> None:
    server = await start_proxied(tmp_path)
    try:
        assert await closes_without_banner(server, b"SSH-2.0-OpenSSH_9.2\r\n") == b""
        refused = await server.wait_for_audit("session-refused")
        assert [(e["peer"], e["details"]["reason"]) for e in refused] == [("127.0.0.1", "bad-proxy-header")]
        async with await connect_via(server, v2_header("203.0.113.8", 1), "northern-ops"):
            pass  # the server keeps serving
    finally:
        await server.service.stop()


async def test_connections_waiting_for_their_header_count_towards_the_unauthenticated_cap(tmp_path: Path) -> None:
    """A flood of connections that send no header must not hold sockets past ``unauthenticated_connections``."""
    server = await start_proxied(tmp_path, {"unauthenticated_connections": "2"})
    waiting = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    try:
        assert await closes_without_banner(server, b"") == b""  # the third is closed at once
        refused = await server.wait_for_audit("session-refused")
        assert [e["details"]["reason"] for e in refused] == ["unauthenticated-connections"]
        for _, writer in waiting:  # once those go, a real client gets in again
            writer.close()
            await writer.wait_closed()
        for _ in range(50):
            try:
                async with await connect_via(server, v2_header("203.0.113.9", 1), "northern-ops"):
                    break
            except (OSError, asyncssh.Error):
                await asyncio.sleep(0.1)
        else:
            pytest.fail("no login once the waiting connections had gone")
    finally:
        for _, writer in waiting:
            writer.close()
        await server.service.stop()


async def test_a_header_not_finished_in_time_is_closed_without_banner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy, "HEADER_TIMEOUT_SECONDS", 0.3)
    server = await start_proxied(tmp_path)
    try:
        assert await closes_without_banner(server, v2_header("203.0.113.7", 1)[:20]) == b""
        refused = await server.wait_for_audit("session-refused")
        assert [e["details"]["reason"] for e in refused] == ["bad-proxy-header"]
    finally:
        await server.service.stop()


async def test_a_local_health_check_gets_the_ssh_banner(tmp_path: Path) -> None:
    server = await start_proxied(tmp_path)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(v2_header("0.0.0.0", 0, command=0))
        banner = await asyncio.wait_for(reader.readline(), CLIENT_TIMEOUT)
        assert banner.startswith(b"SSH-2.0-")
        writer.close()
    finally:
        await server.service.stop()


async def test_a_ban_falls_on_the_headers_address_not_the_balancers(tmp_path: Path) -> None:
    server = await start_proxied(tmp_path, {"failed_logins_per_address": "2", "ban_seconds": "60"})
    try:
        stranger = asyncssh.generate_private_key("ssh-ed25519")
        for port in (1000, 1001):
            with pytest.raises(asyncssh.PermissionDenied):
                await connect_via(server, v2_header("203.0.113.66", port), "northern-ops", stranger)
        banned = await server.wait_for_audit("address-banned")
        assert [e["peer"] for e in banned] == ["203.0.113.66"]
        with pytest.raises((OSError, asyncssh.Error)):
            await connect_via(server, v2_header("203.0.113.66", 1002), "northern-ops")
        async with await connect_via(server, v2_header("203.0.113.67", 1003), "northern-ops"):
            pass  # another client through the same balancer is not banned
    finally:
        await server.service.stop()


async def test_only_listed_balancers_may_send_a_header(tmp_path: Path) -> None:
    """With ``trusted_proxies`` set, a connection from elsewhere is refused before its header is read."""
    server = await start_proxied(tmp_path, {"trusted_proxies": '["192.0.2.0/24", "2001:db8::1"]'})
    try:
        assert await closes_without_banner(server, v2_header("203.0.113.9", 5)) == b""
        refused = await server.wait_for_audit("session-refused")
        assert [(e["peer"], e["details"]["reason"]) for e in refused] == [("127.0.0.1", "untrusted-proxy")]
        assert server.audit_events("login-accepted") == []
    finally:
        await server.service.stop()
    trusted = await start_proxied(tmp_path / "trusted", {"trusted_proxies": '["127.0.0.0/8"]'})
    try:
        async with await connect_via(trusted, v2_header("203.0.113.9", 5), "northern-ops"):
            pass
        accepted = await trusted.wait_for_audit("login-accepted")
        assert [e["peer"] for e in accepted] == ["203.0.113.9:5"]
    finally:
        await trusted.service.stop()


@pytest.mark.parametrize(("address", "trusted"), [
    ("10.0.0.5", True), ("10.0.1.77", True), ("10.0.2.1", False), ("::ffff:10.0.0.5", True),
    ("2001:db8::1", True), ("2001:db8::2", False), ("unknown", False),
])
def test_trusted_proxies_match_addresses_and_networks(address: str, trusted: bool) -> None:
    networks = [ipaddress.ip_network(n) for n in ("10.0.0.5/32", "10.0.1.0/24", "2001:db8::1/128")]
    assert is_trusted(address, networks) is trusted
    assert is_trusted(address, [])  # nothing listed: every peer (the port is firewalled instead)


@pytest.mark.parametrize("value", ['"10.0.0.5"', '["10.0.0.300"]', '["balancer.example"]', "[5]"])
def test_a_bad_trusted_proxies_value_is_a_clear_configuration_error(tmp_path: Path, value: str) -> None:
    path = tmp_path / "cfl-sftp.toml"
    path.write_text(f"proxy_protocol = true\ntrusted_proxies = {value}\n")
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_config(path)


def test_a_trusted_network_written_as_ipv4_mapped_ipv6_matches_ipv4_peers(tmp_path: Path) -> None:
    """Peers are compared as IPv4 (a mapped source is reported as IPv4), so the configuration is read the same way."""
    path = tmp_path / "cfl-sftp.toml"
    path.write_text('proxy_protocol = true\ntrusted_proxies = ["::ffff:10.0.0.0/104", "::ffff:192.0.2.7"]\n')
    trusted = load_config(path).trusted_proxies
    assert [str(n) for n in trusted] == ["10.0.0.0/8", "192.0.2.7/32"]
    assert is_trusted("10.1.2.3", trusted)
    assert is_trusted("::ffff:192.0.2.7", trusted)
    assert not is_trusted("192.0.2.8", trusted)

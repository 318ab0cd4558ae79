"""asyncssh's packet layer as the service changes it (cfl_sftp.sftp.wire), on real connections over loopback.

asyncssh's empty MSG_IGNORE before every packet is dropped where the cipher needs none: counted from asyncssh's
own packet log (debug level 3), what each end received. AES-GCM is sealed and opened with fewer copies: OpenSSH's
client, which has its own implementation, moves a package and an image through the service under each cipher.
The service applies the changes when it starts, process-wide, so every connection of this process (the asyncssh
test clients' too) is under them.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncssh
import pytest
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA

from cfl_sftp.sftp.wire import FRESH_IV_CIPHERS, drop_needless_packet_work
from tests.factory import PackageSpec, image_of
from tests.sftp_support import (
    CLIENT_TIMEOUT,
    SftpServer,
    built,
    receipt_named,
    require_binary,
    run_client,
    wait_visible,
)


def _received_ignores(records: list[logging.LogRecord]) -> int:
    return sum(record.getMessage().split("] ", 1)[-1].startswith("Received MSG_IGNORE") for record in records)


def _packet_log() -> None:
    logging.getLogger("asyncssh").setLevel(logging.DEBUG)
    asyncssh.set_debug_level(3)


class _AnyoneServer(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False  # no authentication: this server only carries packets


async def _stock_session(tmp_path: Path, cipher: str) -> list[str]:
    """A login and a listing on a plain asyncssh server, both ends limited to ``cipher``."""
    server = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")], encryption_algs=[cipher],
        server_factory=_AnyoneServer, sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(tmp_path)),
        allow_scp=False, gss_host=None,
    )
    try:
        port = server.sockets[0].getsockname()[1]
        async with asyncssh.connect(
            "127.0.0.1", port, username="anyone", known_hosts=None, agent_path=None, config=None, client_keys=None,
            encryption_algs=[cipher],
        ) as conn, conn.start_sftp_client() as sftp:
            return sorted(set(await sftp.listdir(".")) - {".", ".."})
    finally:
        server.close()
        await server.wait_closed()


async def test_a_login_and_listing_on_the_service_carry_no_ignore_packet(
    sftp_server: SftpServer, asyncssh_records: list[logging.LogRecord]
) -> None:
    _packet_log()
    async with sftp_server.sftp("northern-ops") as sftp:
        assert "images" in await asyncio.wait_for(sftp.listdir("/"), CLIENT_TIMEOUT)
    received = [r.getMessage() for r in asyncssh_records if "Received" in r.getMessage()]
    assert len(received) > 20  # the packet log was on: key exchange, login, channel and SFTP packets
    assert _received_ignores(asyncssh_records) == 0


@pytest.mark.parametrize(("cipher", "ignores_kept"), [("aes128-gcm@openssh.com", False), ("aes256-ctr", False),
                                                       ("chacha20-poly1305@openssh.com", False), ("aes128-cbc", True)])
async def test_the_ignore_packets_stay_only_under_a_cbc_cipher(
    tmp_path: Path, asyncssh_records: list[logging.LogRecord], cipher: str, ignores_kept: bool
) -> None:
    drop_needless_packet_work()
    (tmp_path / "meter.bin").write_bytes(b"x")
    _packet_log()
    assert await asyncio.wait_for(_stock_session(tmp_path, cipher), CLIENT_TIMEOUT) == ["meter.bin"]
    # RFC 4251 9.3.1's countermeasure: one before each packet after key exchange, from both ends
    assert (_received_ignores(asyncssh_records) > 10) is ignores_kept


@pytest.mark.parametrize("cipher", sorted(FRESH_IV_CIPHERS))
async def test_openssh_moves_a_package_and_an_image_under_each_cipher_the_service_offers(
    sftp_server: SftpServer, cipher: str
) -> None:
    """OpenSSH's own client seals what we open and opens what we seal: a package up, its image down, byte for byte,
    across many packets each way (the image spans several 255 KiB READ replies)."""
    spec = PackageSpec(firmware_version=f"0000{sorted(FRESH_IV_CIPHERS).index(cipher):04X}", image_size=700_001)
    local = sftp_server.tmp / "upload.cfl"
    local.write_bytes(built(spec))
    image_path = f"/images/ESME/1A2B/0001/0100/{spec.firmware_version}/firmware.bin"
    downloaded = sftp_server.tmp / "firmware.bin"
    put = await (await sftp_server.start_openssh(
        "acme-release", [f"put {local} /incoming/package.cfl"], ["-o", f"Ciphers={cipher}"])).finish()
    assert put.ok, put.describe()
    async with sftp_server.sftp("northern-ops") as sftp:
        await wait_visible(sftp, image_path)
    get = await (await sftp_server.start_openssh(
        "northern-ops", [f"get {image_path} {downloaded}"], ["-o", f"Ciphers={cipher}"])).finish()
    assert get.ok, get.describe()
    assert downloaded.read_bytes() == image_of(spec)


async def test_packets_follow_the_keys_through_many_rekeys(
    sftp_server: SftpServer, asyncssh_records: list[logging.LogRecord]
) -> None:
    """Each new key comes with a new cipher object: a package up and its image down on one connection whose client
    asks for new keys every 64 KiB it sends."""
    logging.getLogger("asyncssh").setLevel(logging.DEBUG)
    asyncssh.set_debug_level(1)
    spec = PackageSpec(firmware_version="000000A1", image_size=600_000)
    image_path = f"/images/ESME/1A2B/0001/0100/{spec.firmware_version}/firmware.bin"
    async with await asyncio.wait_for(asyncssh.connect(
        "127.0.0.1", sftp_server.port, username="acme-release", client_keys=[str(sftp_server.key("acme-release"))],
        known_hosts=None, agent_path=None, config=None, encryption_algs=["aes128-gcm@openssh.com"],
        rekey_bytes=64 * 1024,
    ), CLIENT_TIMEOUT) as conn, conn.start_sftp_client() as sftp:
        async with sftp.open("/incoming/rekey.cfl", "wb") as upload:
            await asyncio.wait_for(upload.write(built(spec)), CLIENT_TIMEOUT)
        assert (await receipt_named(sftp, "rekey.cfl"))["outcome"] == "accepted"
    async with sftp_server.sftp("northern-ops") as sftp:
        await wait_visible(sftp, image_path)
        async with sftp.open(image_path, "rb") as image:
            assert await asyncio.wait_for(image.read(), CLIENT_TIMEOUT) == image_of(spec)
    completed = [r for r in asyncssh_records if r.getMessage().endswith("Completed key exchange")]
    assert len(completed) > 2 * 8  # both ends, at least every 64 KiB of the 600 KB package


async def test_a_private_key_asyncssh_seals_with_aes_gcm_still_opens_in_openssh(tmp_path: Path) -> None:
    """asyncssh seals passphrase-protected keys with the same class: that call keeps asyncssh's own layout."""
    drop_needless_packet_work()
    key_path = tmp_path / "id_ed25519"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(
        str(key_path), passphrase="meter-secret", cipher_name="aes256-gcm@openssh.com"
    )
    key_path.chmod(0o600)
    run = await run_client([require_binary("ssh-keygen"), "-y", "-P", "meter-secret", "-f", str(key_path)])
    assert run.ok, run.describe()
    assert run.stdout.startswith("ssh-ed25519 ")
    assert asyncssh.read_private_key(str(key_path), "meter-secret").export_public_key().startswith(b"ssh-ed25519 ")


_STDOUT_PIECES = (b"a" * 70_000, b"", b"b" * 5, b"c" * 33_000)
_STDERR_PIECES = (b"e" * 40_000,)


async def _piecewise_writer(process: asyncssh.SSHServerProcess[bytes]) -> None:
    """Writes stdout in pieces of every kind the channel takes, then mutates the bytearray it handed over while
    the client's small window still holds most of it back; stderr in between."""
    reused = bytearray(b"r" * 50_000)
    process.stdout.writelines([*_STDOUT_PIECES[:2], reused, memoryview(b"m" * 3_000), *_STDOUT_PIECES[2:]])
    reused[:] = b"X" * len(reused)  # its owner reuses it: what was written must not change
    process.stderr.writelines(_STDERR_PIECES)
    process.stdout.write(b"w" * 20_000)
    await process.stdout.drain()
    process.exit(0)


@pytest.mark.parametrize(("cipher", "server_rekey_bytes", "direct_only"), [
    ("aes128-gcm@openssh.com", None, True), ("chacha20-poly1305@openssh.com", None, True),
    ("aes128-ctr", None, True), ("aes128-cbc", None, False), ("aes128-gcm@openssh.com", 16 * 1024, False),
])
async def test_channel_data_written_in_pieces_arrives_whole_through_a_small_window(
    monkeypatch: pytest.MonkeyPatch, cipher: str, server_rekey_bytes: int | None, direct_only: bool
) -> None:
    """Channel data queued as pieces (bytes, bytearray, memoryview, empty) and cut into packets by the window and
    the peer's packet size reaches the client byte for byte, stdout and stderr apart: sent directly under the
    fresh-IV ciphers, through asyncssh's send_packet under CBC and whenever the server's keys are due for renewal
    (every 16 KiB)."""
    drop_needless_packet_work()
    through_send_packet: list[int] = []
    send_packet = SSHConnection.send_packet

    def counting_send_packet(self: SSHConnection, pkttype: int, *args: bytes, handler: object = None) -> None:
        if pkttype in {MSG_CHANNEL_DATA, MSG_CHANNEL_EXTENDED_DATA}:
            through_send_packet.append(pkttype)
        send_packet(self, pkttype, *args, handler=handler)

    monkeypatch.setattr(SSHConnection, "send_packet", counting_send_packet)
    server = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")], encryption_algs=[cipher],
        server_factory=_AnyoneServer, process_factory=_piecewise_writer, encoding=None, gss_host=None,
        **({"rekey_bytes": server_rekey_bytes} if server_rekey_bytes else {}),
    )
    try:
        port = server.sockets[0].getsockname()[1]
        async with asyncssh.connect(
            "127.0.0.1", port, username="anyone", known_hosts=None, agent_path=None, config=None, client_keys=None,
            encryption_algs=[cipher],
        ) as conn:
            result = await asyncio.wait_for(
                conn.run("pieces", encoding=None, window=8192, max_pktsize=3000), CLIENT_TIMEOUT
            )
    finally:
        server.close()
        await server.wait_closed()
    expected_stdout = b"".join((*_STDOUT_PIECES[:2], b"r" * 50_000, b"m" * 3_000, *_STDOUT_PIECES[2:], b"w" * 20_000))
    assert result.exit_status == 0
    assert result.stdout == expected_stdout
    assert result.stderr == b"".join(_STDERR_PIECES)
    # about 70 packets of at most 3000 bytes; none of them through asyncssh's send_packet where it would only
    # have padded and sealed them, some where it had more to do (an ignore packet first, a key exchange)
    assert (not through_send_packet) is direct_only


async def test_openssh_downloads_an_image_while_asking_for_new_keys_every_32_kib(sftp_server: SftpServer) -> None:
    """OpenSSH's client renews the keys in the middle of a download (it asks every 32 KiB; the exchanges come as
    fast as the round trips allow): the replies queued around each exchange, sent directly or held back by
    asyncssh until it ends, arrive whole and in order under OpenSSH's default cipher."""
    spec = PackageSpec(firmware_version="000000B2", image_size=3_000_001)
    local = sftp_server.tmp / "upload.cfl"
    local.write_bytes(built(spec))
    image_path = f"/images/ESME/1A2B/0001/0100/{spec.firmware_version}/firmware.bin"
    downloaded = sftp_server.tmp / "firmware.bin"
    put = await (await sftp_server.start_openssh("acme-release", [f"put {local} /incoming/package.cfl"])).finish()
    assert put.ok, put.describe()
    async with sftp_server.sftp("northern-ops") as sftp:
        await wait_visible(sftp, image_path)
    get = await (await sftp_server.start_openssh(
        "northern-ops", [f"get {image_path} {downloaded}"], ["-o", "RekeyLimit=32K", "-v"])).finish()
    assert get.ok, get.describe()
    assert downloaded.read_bytes() == image_of(spec)
    assert get.stderr.count("SSH2_MSG_NEWKEYS received") > 2  # the first keys, then renewed keys mid-download

"""Every SFTP client SPEC 5 names, against a real server: upload a package, download the image it adds.

One test per client: a manufacturer's uploader puts a fresh package into ``/incoming`` (the gateway accepts it),
then ``northern-ops``, a supplier entitled to the image, downloads it with the same client and gets the manufacturer's
bytes exactly. Also: the server's memory does not grow with the size of a download.
"""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.factory import PackageSpec, image_of
from tests.sftp_support import (
    BIG_SPEC,
    SftpServer,
    built,
    read_all,
    receipt_named,
    wait_visible,
)

Transfer = Callable[[SftpServer, str, Path, str], Awaitable[None]]

# -- one upload and one download per client ------------------------------------------------------------


async def openssh_put(server: SftpServer, user: str, local: Path, remote: str) -> None:
    run = await server.openssh(user, f"put {local} {remote}")
    assert run.ok, run.describe()


async def openssh_get(server: SftpServer, user: str, local: Path, remote: str) -> None:
    run = await server.openssh(user, f"get {remote} {local}")
    assert run.ok, run.describe()


async def scp_put(server: SftpServer, user: str, local: Path, remote: str) -> None:
    run = await server.scp(user, str(local), f":{remote}")
    assert run.ok, run.describe()


async def scp_get(server: SftpServer, user: str, local: Path, remote: str) -> None:
    run = await server.scp(user, f":{remote}", str(local))
    assert run.ok, run.describe()


async def asyncssh_put(server: SftpServer, user: str, local: Path, remote: str) -> None:
    async with server.sftp(user) as sftp:
        await asyncio.wait_for(sftp.put(str(local), remote), 60)


async def asyncssh_get(server: SftpServer, user: str, local: Path, remote: str) -> None:
    async with server.sftp(user) as sftp:
        await asyncio.wait_for(sftp.get(remote, str(local)), 60)


async def paramiko_put(server: SftpServer, user: str, local: Path, remote: str) -> None:
    def put() -> int:
        with server.paramiko(user) as client:
            return int(client.put(str(local), remote).st_size)  # stats the file after closing it

    assert await asyncio.to_thread(put) == local.stat().st_size


async def paramiko_get(server: SftpServer, user: str, local: Path, remote: str) -> None:
    def get() -> None:
        with server.paramiko(user) as client:
            client.get(remote, str(local))

    await asyncio.to_thread(get)


async def rclone_put(server: SftpServer, user: str, local: Path, remote: str) -> None:
    run = await server.rclone(user, "copyto", str(local), f"srv:{remote}")
    assert run.ok, run.describe()


async def rclone_get(server: SftpServer, user: str, local: Path, remote: str) -> None:
    run = await server.rclone(user, "copyto", f"srv:{remote}", str(local))
    assert run.ok, run.describe()


async def lftp_put(server: SftpServer, user: str, local: Path, remote: str) -> None:
    run = await server.lftp(user, f"put {local} -o {remote}")
    assert run.ok, run.describe()


async def lftp_get(server: SftpServer, user: str, local: Path, remote: str) -> None:
    run = await server.lftp(user, f"get {remote} -o {local}")
    assert run.ok, run.describe()


CLIENTS: dict[str, tuple[Transfer, Transfer]] = {
    "openssh-sftp": (openssh_put, openssh_get),
    "scp": (scp_put, scp_get),
    "asyncssh": (asyncssh_put, asyncssh_get),
    "paramiko": (paramiko_put, paramiko_get),
    "rclone": (rclone_put, rclone_get),
    "lftp": (lftp_put, lftp_get),
}

# A distinct image per client (so each is accepted, not held), of a size that is not a multiple of any client's
# block size: the last WRITE is short (rclone 1.60 sends it with trailing bytes after the declared data).
SPECS = {
    name: PackageSpec(firmware_version=f"000001{index:02X}", image_size=100_000 + index * 7_919,
                      release_notes=b"# Notes\n" * (index + 1))
    for index, name in enumerate(CLIENTS)
}


@pytest.mark.parametrize("client", list(CLIENTS))
async def test_client_uploads_a_package_and_the_entitled_supplier_downloads_the_image(
    sftp_server: SftpServer, client: str
) -> None:
    put, get = CLIENTS[client]
    spec = SPECS[client]
    package = built(spec)
    local = sftp_server.tmp / "upload.cfl"
    local.write_bytes(package)

    await put(sftp_server, "acme-release", local, "/incoming/package.cfl")

    async with sftp_server.sftp("acme-release") as sftp:
        receipt = await receipt_named(sftp, "package.cfl")
    assert (receipt["outcome"], receipt["reason"]) == ("accepted", "accepted"), receipt
    assert receipt["size"] == len(package)
    assert receipt["package_sha256"] == hashlib.sha256(package).hexdigest()
    image_path = f"/images/ESME/1A2B/0001/0100/{spec.firmware_version}/firmware.bin"
    assert receipt["image_path"] == image_path

    async with sftp_server.sftp("northern-ops") as sftp:
        await wait_visible(sftp, image_path)
    downloaded = sftp_server.tmp / "firmware.bin"
    await get(sftp_server, "northern-ops", downloaded, image_path)
    assert downloaded.read_bytes() == image_of(spec)

    notes = sftp_server.tmp / "release-notes.md"
    await get(sftp_server, "northern-ops", notes, image_path.replace("firmware.bin", "release-notes.md"))
    assert notes.read_bytes() == spec.release_notes


async def test_rclone_lists_and_checks_sizes_like_a_sync_client(sftp_server: SftpServer) -> None:
    """rclone stats after uploading and lists before syncing: a processed name answers its size, is not listed."""
    package = built(SPECS["rclone"])
    source = sftp_server.tmp / "outbox"
    source.mkdir()
    (source / "package.cfl").write_bytes(package)
    run = await sftp_server.rclone("acme-release", "copy", str(source), "srv:/incoming")
    assert run.ok, run.describe()
    listing = await sftp_server.rclone("acme-release", "lsf", "srv:/incoming")
    assert listing.ok, listing.describe()
    assert listing.stdout == ""
    size = await sftp_server.rclone("acme-release", "size", "--json", "srv:/receipts")
    assert size.ok, size.describe()
    assert '"count":1' in size.stdout.replace(" ", "")


async def test_lftp_resumes_a_staging_file_and_renames_it_to_a_package(sftp_server: SftpServer) -> None:
    package = built(SPECS["lftp"])
    half = sftp_server.tmp / "half.cfl"
    half.write_bytes(package[: len(package) // 2])
    whole = sftp_server.tmp / "whole.cfl"
    whole.write_bytes(package)
    run = await sftp_server.lftp(
        "acme-release",
        f"put {half} -o /incoming/package.part",
        f"put -c {whole} -o /incoming/package.part",  # -c: continue the transfer from the remote size
    )
    assert run.ok, run.describe()
    assert sftp_server.staging_rows() == 2, "the second put did not append (one sealed part per write session)"
    run = await sftp_server.lftp("acme-release", "mv /incoming/package.part /incoming/package.cfl")
    assert run.ok, run.describe()
    async with sftp_server.sftp("acme-release") as sftp:
        receipt = await receipt_named(sftp, "package.cfl")
    assert (receipt["outcome"], receipt["size"]) == ("accepted", len(package))
    assert receipt["package_sha256"] == hashlib.sha256(package).hexdigest()


# -- memory --------------------------------------------------------------------------------------------


async def test_server_memory_does_not_grow_with_the_size_of_a_download(sftp_server: SftpServer) -> None:
    await sftp_server.seed(BIG_SPEC)
    path = f"/images/ESME/1A2B/0001/0100/{BIG_SPEC.firmware_version}/firmware.bin"
    size = BIG_SPEC.image_size
    expected = hashlib.sha256(image_of(BIG_SPEC)).hexdigest()
    chunk = 1 << 20  # the copies of one chunk on its way through SSH bound the peak: a few MiB
    digest = hashlib.sha256()
    async with sftp_server.sftp("northern-ops") as sftp:
        assert (await sftp.stat(path)).size == size
        tracemalloc.start()
        try:
            async with sftp.open(path, "rb") as f:
                baseline = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                offset = 0
                while offset < size:
                    data: bytes = await asyncio.wait_for(f.read(chunk, offset), 30)
                    assert data, "short read"
                    digest.update(data)
                    offset += len(data)
                peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert await read_all(sftp, f"/images/ESME/1A2B/0001/0100/{BIG_SPEC.firmware_version}/SHA256SUMS")
    assert digest.hexdigest() == expected
    growth = peak - baseline
    # Client and server share this process, so this bounds both (about 8 MiB is seen: a few copies of a 1 MiB
    # chunk on its way through SFTP and SSH); a server that held the file would add 64 MiB.
    assert growth < size // 4, f"peak grew by {growth / (1 << 20):.1f} MiB while serving {size >> 20} MiB"

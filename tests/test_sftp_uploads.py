"""Uploads into ``/incoming`` over a real SFTP server (SPEC 4): the gateway on close and on rename, what a
processed name answers, partial uploads, staging files and their quota, and that a gateway run never makes
another session wait.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import asyncssh
import pytest

from tests.factory import PackageSpec, build, image_of
from tests.sftp_support import (
    BIG_SPEC,
    IMAGE_PATH,
    SEEDED_ESME,
    SftpServer,
    built,
    raw,
    read_all,
    receipt_named,
    sftp_status,
    start_sftp_server,
    write_all,
)

FX_OK = asyncssh.FX_OK
FX_NO_SUCH_FILE = asyncssh.FX_NO_SUCH_FILE
FX_PERMISSION_DENIED = asyncssh.FX_PERMISSION_DENIED
FX_FAILURE = asyncssh.FX_FAILURE

NEW_SPEC = PackageSpec(firmware_version="00000020")
BAD_SIGNATURE = PackageSpec(firmware_version="00000021", signature=b"\x30\x06\x02\x01\x01\x02\x01\x01")


def package(spec: PackageSpec = NEW_SPEC) -> bytes:
    return built(spec)


def local_file(server: SftpServer, name: str, data: bytes) -> str:
    path = server.tmp / name
    path.write_bytes(data)
    return str(path)


# -- the verdict on close -------------------------------------------------------------------------------


async def test_openssh_put_of_a_rejected_package_fails_and_the_receipt_says_why(sftp_server: SftpServer) -> None:
    local = local_file(sftp_server, "bad.cfl", package(BAD_SIGNATURE))
    run = await sftp_server.openssh("acme-release", f"put {local} /incoming/bad.cfl", "ls /incoming")
    assert run.returncode != 0, run.describe()
    assert "ls /incoming" not in run.stdout  # batch mode stopped at the failed put
    async with sftp_server.sftp("acme-release") as sftp:
        receipt = await receipt_named(sftp, "bad.cfl")
        assert await sftp.listdir("/incoming") == [".", ".."]
    assert (receipt["outcome"], receipt["reason"]) == ("rejected", "bad-signature")
    assert receipt["uploader"] == "acme-release"
    assert receipt["organisation"] == "acme-meters"
    assert receipt["size"] == len(package(BAD_SIGNATURE))
    assert receipt["package_sha256"] == hashlib.sha256(package(BAD_SIGNATURE)).hexdigest()
    assert receipt["message"]
    assert sftp_server.image_count() == 0


async def test_asyncssh_sees_a_rejected_package_as_a_failed_close(sftp_server: SftpServer) -> None:
    async with sftp_server.sftp("acme-release") as sftp:
        with pytest.raises(asyncssh.SFTPFailure):
            await write_all(sftp, "/incoming/bad-asyncssh.cfl", package(BAD_SIGNATURE))
        with pytest.raises(asyncssh.SFTPFailure):
            await sftp.put(local_file(sftp_server, "bad.cfl", package(BAD_SIGNATURE)), "/incoming/bad-put.cfl")
    reasons = {row.file_name: (row.outcome, row.reason) for row in sftp_server.uploads()}
    assert reasons == {name: ("rejected", "bad-signature") for name in ("bad-asyncssh.cfl", "bad-put.cfl")}


async def test_paramiko_put_of_a_rejected_package_returns_and_only_the_receipt_tells(
    sftp_server: SftpServer,
) -> None:
    """paramiko ignores the status of CLOSE (``SFTPFile._close`` swallows ``IOError``), and its size check after
    the close passes because a processed name answers ``stat`` with the bytes received (SPEC 4). So ``put``
    returns; the receipt is where the rejection shows. The server did answer the CLOSE with a failure: the same
    request from asyncssh raises (test above)."""
    local = local_file(sftp_server, "bad.cfl", package(BAD_SIGNATURE))

    def put() -> int:
        with sftp_server.paramiko("acme-release") as client:
            return int(client.put(local, "/incoming/bad-paramiko.cfl").st_size)

    assert await asyncio.to_thread(put) == len(package(BAD_SIGNATURE))
    async with sftp_server.sftp("acme-release") as sftp:
        receipt = await receipt_named(sftp, "bad-paramiko.cfl")
    assert (receipt["outcome"], receipt["reason"]) == ("rejected", "bad-signature")


async def test_held_package_closes_ok_and_is_readable_decrypted_under_held(seeded_server: SftpServer) -> None:
    duplicate = build(SEEDED_ESME)  # the library already holds this image
    local = local_file(seeded_server, "dup.cfl", duplicate)
    run = await seeded_server.openssh("acme-release", f"put -p {local} /incoming/dup.cfl")  # -p: FSETSTAT too
    assert run.ok, run.describe()
    async with seeded_server.sftp("acme-release") as sftp:
        receipt = await receipt_named(sftp, "dup.cfl")
        held_name = f"{receipt['upload_id']}-dup.cfl"
        assert await sftp.listdir("/held") == [".", "..", held_name]
        assert (await sftp.stat(f"/held/{held_name}")).size == len(duplicate)
        assert await read_all(sftp, f"/held/{held_name}") == duplicate
        assert await sftp_status(sftp.remove(f"/held/{held_name}")) == FX_PERMISSION_DENIED
    assert (receipt["outcome"], receipt["reason"]) == ("held", "duplicate-image")
    assert receipt["image_path"] == IMAGE_PATH
    async with seeded_server.sftp("map-upload") as sftp:  # another organisation's uploader
        assert await sftp.listdir("/held") == [".", ".."]
        assert await sftp.listdir("/receipts") == [".", ".."]
        for path in (f"/held/{held_name}", f"/receipts/{receipt['upload_id']}.json"):
            assert await sftp_status(sftp.stat(path)) == FX_NO_SUCH_FILE
            assert await sftp_status(sftp.open(path, "rb")) == FX_NO_SUCH_FILE
    stored = [p.read_bytes() for p in seeded_server.spool_files()]
    assert stored
    assert all(duplicate[:512] not in blob for blob in stored)  # held packages are kept encrypted


async def test_processed_name_answers_stat_with_its_size_but_is_not_listed_nor_readable(
    sftp_server: SftpServer,
) -> None:
    first, second = package(NEW_SPEC), package(BAD_SIGNATURE)
    async with sftp_server.sftp("acme-release") as sftp:
        await write_all(sftp, "/incoming/pkg.cfl", first)
        assert (await sftp.stat("/incoming/pkg.cfl")).size == len(first)
        assert (await sftp.lstat("/incoming/pkg.cfl")).size == len(first)
        assert await sftp.listdir("/incoming") == [".", ".."]
        assert await sftp_status(sftp.open("/incoming/pkg.cfl", "rb")) == FX_PERMISSION_DENIED
        await sftp.setstat("/incoming/pkg.cfl", asyncssh.SFTPAttrs(mtime=1_700_000_000, atime=1_700_000_000))
        await sftp.chmod("/incoming/pkg.cfl", 0o600)
        assert await sftp_status(sftp.stat("/incoming/other.cfl")) == FX_NO_SUCH_FILE

        # A new upload under the same name replaces it (and here is rejected: a failed close).
        assert await sftp_status(write_all(sftp, "/incoming/pkg.cfl", second)) == FX_FAILURE
        assert (await sftp.stat("/incoming/pkg.cfl")).size == len(second)
        receipts = [row for row in sftp_server.uploads() if row.file_name == "pkg.cfl"]
        assert [(r.outcome, r.size) for r in receipts] == [("accepted", len(first)), ("rejected", len(second))]
    async with sftp_server.sftp("map-upload") as sftp:  # another uploader: the name is not its own
        assert await sftp_status(sftp.stat("/incoming/pkg.cfl")) == FX_NO_SUCH_FILE


async def test_paramiko_put_confirms_the_upload_by_stat_and_succeeds(sftp_server: SftpServer) -> None:
    local = local_file(sftp_server, "pkg.cfl", package())

    def put() -> int:
        with sftp_server.paramiko("acme-release") as client:
            attrs = client.put(local, "/incoming/pkg.cfl")  # stats the file after closing it
            return int(attrs.st_size)

    assert await asyncio.to_thread(put) == len(package())
    assert [(r.file_name, r.outcome) for r in sftp_server.uploads()] == [("pkg.cfl", "accepted")]


async def test_an_empty_package_runs_the_gateway_and_is_rejected_as_bad_container(sftp_server: SftpServer) -> None:
    async with sftp_server.sftp("acme-release") as sftp:
        f = await sftp.open("/incoming/empty.cfl", "wb")
        assert await sftp_status(f.close()) == FX_FAILURE
        receipt = await receipt_named(sftp, "empty.cfl")
        assert (await sftp.stat("/incoming/empty.cfl")).size == 0
    assert (receipt["outcome"], receipt["reason"], receipt["size"]) == ("rejected", "bad-container", 0)
    empty = local_file(sftp_server, "empty", b"")
    touched = await sftp_server.openssh("acme-release", f"put {empty} /incoming/touched.cfl")
    assert not touched.ok, touched.describe()
    assert [(r.file_name, r.reason) for r in sftp_server.uploads()] == [
        ("empty.cfl", "bad-container"), ("touched.cfl", "bad-container")]


# -- packages in progress -------------------------------------------------------------------------------


def assert_nothing_left(server: SftpServer, uploads_before: int, spool_before: list[Path]) -> None:
    assert len(server.uploads()) == uploads_before, "a partial upload produced a receipt"
    assert server.image_count() == 0
    assert server.stray_files() == []
    assert server.spool_files() == spool_before


async def test_a_dropped_connection_while_a_package_is_open_leaves_nothing_and_frees_the_name(
    sftp_server: SftpServer,
) -> None:
    data = package()
    spool_before = sftp_server.spool_files()
    conn = await sftp_server.connect("acme-release")
    sftp = await conn.start_sftp_client()
    f = await sftp.open("/incoming/pkg.cfl", "wb")
    await f.write(data[: len(data) // 2])
    async with sftp_server.sftp("acme-release") as other:  # a second session of the same user
        assert await sftp_status(other.open("/incoming/pkg.cfl", "wb")) == FX_PERMISSION_DENIED
        assert await other.listdir("/incoming") == [".", ".."]  # in progress: not listed
    conn.abort()
    await asyncio.wait_for(conn.wait_closed(), 10)

    entries = await sftp_server.wait_for_audit("partial-upload")
    assert [(e["actor"], e["details"]["file_name"]) for e in entries] == [("acme-release", "pkg.cfl")]
    assert entries[0]["details"]["bytes_received"] == len(data) // 2
    assert_nothing_left(sftp_server, 0, spool_before)
    async with sftp_server.sftp("acme-release") as sftp2:
        assert await sftp_status(sftp2.stat("/incoming/pkg.cfl")) == FX_NO_SUCH_FILE
        await write_all(sftp2, "/incoming/pkg.cfl", data)  # the name is free again
    assert [(r.file_name, r.outcome) for r in sftp_server.uploads()] == [("pkg.cfl", "accepted")]


async def test_a_session_that_ends_cleanly_with_a_package_open_discards_it(sftp_server: SftpServer) -> None:
    """No CLOSE came for the handle: the end of the session is not a close, whatever the reason it ended."""
    data = package()
    spool_before = sftp_server.spool_files()
    async with sftp_server.sftp("acme-release") as sftp:
        f = await sftp.open("/incoming/pkg.cfl", "wb")
        await f.write(data)  # every byte, but never closed
    entries = await sftp_server.wait_for_audit("partial-upload")
    assert [(e["details"]["file_name"], e["details"]["bytes_received"]) for e in entries] == [
        ("pkg.cfl", len(data))]
    assert_nothing_left(sftp_server, 0, spool_before)


async def test_killing_the_openssh_client_mid_upload_is_a_partial_upload(sftp_server: SftpServer) -> None:
    data = build(PackageSpec(firmware_version="00000030", image_size=2 << 20))
    local = local_file(sftp_server, "slow.cfl", data)
    spool_before = sftp_server.spool_files()
    # -l 4000: at most 4000 Kbit/s, so the 2 MiB transfer is still running when the client is killed
    client = await sftp_server.start_openssh("acme-release", [f"put {local} /incoming/slow.cfl"], ["-l", "4000"])
    runtime = sftp_server.service.runtime
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not runtime.upload_in_progress("acme-release", "slow.cfl"):
        assert loop.time() < deadline, "the upload never started"
        assert client.proc.returncode is None, "the client finished before it could be killed"
        await asyncio.sleep(0.01)
    client.kill()
    await client.finish()
    entries = await sftp_server.wait_for_audit("partial-upload")
    assert [e["details"]["file_name"] for e in entries] == ["slow.cfl"]
    assert 0 <= entries[0]["details"]["bytes_received"] < len(data)
    assert_nothing_left(sftp_server, 0, spool_before)
    assert not runtime.upload_in_progress("acme-release", "slow.cfl")


async def test_opening_a_package_for_append_is_permission_denied(sftp_server: SftpServer) -> None:
    async with sftp_server.sftp("acme-release") as sftp:
        for mode in ("ab", "a+b"):
            assert await sftp_status(sftp.open("/incoming/pkg.cfl", mode)) == FX_PERMISSION_DENIED
        flags = asyncssh.FXF_WRITE | asyncssh.FXF_APPEND | asyncssh.FXF_CREAT
        assert await sftp_status(raw(sftp).open(b"/incoming/pkg.cfl", flags, asyncssh.SFTPAttrs())) == (
            FX_PERMISSION_DENIED)
    assert sftp_server.uploads() == []


# -- a gateway run never makes another session wait -----------------------------------------------------

async def test_a_gateway_run_on_a_large_package_does_not_delay_a_download_in_another_session(
    seeded_server: SftpServer,
) -> None:
    """While one session's close waits for the gateway's verdict on a 64 MiB package (fsync, commit: a few tenths
    of a second), another session downloads a small image from start (OPEN) to end (CLOSE). The download must
    finish first: a server that ran the gateway on the event loop, or made sessions queue behind it, fails."""
    big = built(BIG_SPEC)
    loop = asyncio.get_running_loop()
    async with seeded_server.sftp("northern-ops") as reader, seeded_server.sftp("acme-release") as uploader:
        f = await uploader.open("/incoming/big.cfl", "wb")
        await asyncio.wait_for(f.write(big), 120)  # every WRITE acknowledged: only the CLOSE is left
        closing = asyncio.ensure_future(f.close())
        await asyncio.sleep(0)  # the CLOSE request is sent
        started = loop.time()
        downloaded = await read_all(reader, IMAGE_PATH)
        download_seconds = loop.time() - started
        close_was_done = closing.done()
        await asyncio.wait_for(closing, 60)
        close_seconds = loop.time() - started
        receipt = await receipt_named(uploader, "big.cfl")
    assert downloaded == image_of(SEEDED_ESME)
    assert not close_was_done, (
        f"the download ({download_seconds:.3f} s) ended only after the gateway's verdict ({close_seconds:.3f} s)"
    )
    assert (receipt["outcome"], receipt["size"]) == ("accepted", len(big))


# -- staging files --------------------------------------------------------------------------------------


async def test_paramiko_upload_then_plain_rename_to_cfl_runs_the_gateway(sftp_server: SftpServer) -> None:
    local = local_file(sftp_server, "pkg.cfl", package())

    def upload_and_rename() -> tuple[list[str], int]:
        with sftp_server.paramiko("acme-release") as client:
            client.put(local, "/incoming/pkg.cfl.part")
            listed = sorted(client.listdir("/incoming"))
            client.rename("/incoming/pkg.cfl.part", "/incoming/pkg.cfl")  # SSH_FXP_RENAME
            return listed, int(client.stat("/incoming/pkg.cfl").st_size or 0)

    listed, size = await asyncio.to_thread(upload_and_rename)
    assert listed == ["pkg.cfl.part"]
    assert size == len(package())
    async with sftp_server.sftp("acme-release") as sftp:
        receipt = await receipt_named(sftp, "pkg.cfl")
        assert await sftp.listdir("/incoming") == [".", ".."]
    assert (receipt["outcome"], receipt["size"]) == ("accepted", len(package()))
    assert sftp_server.staging_rows() == 0


async def test_openssh_rename_of_a_staging_file_to_cfl_runs_the_gateway(sftp_server: SftpServer) -> None:
    good = local_file(sftp_server, "good", package())
    bad = local_file(sftp_server, "bad", package(BAD_SIGNATURE))
    run = await sftp_server.openssh("acme-release", f"put {good} /incoming/good.tmp",
                                    "rename /incoming/good.tmp /incoming/good.cfl",  # posix-rename@openssh.com
                                    f"put {bad} /incoming/bad.tmp")
    assert run.ok, run.describe()
    failed = await sftp_server.openssh("acme-release", "rename /incoming/bad.tmp /incoming/bad.cfl")
    assert not failed.ok, failed.describe()
    reasons = {row.file_name: (row.outcome, row.reason) for row in sftp_server.uploads()}
    assert reasons == {"good.cfl": ("accepted", "accepted"), "bad.cfl": ("rejected", "bad-signature")}
    assert sftp_server.staging_rows() == 0


async def test_staging_files_are_private_readable_appendable_and_removable(sftp_server: SftpServer) -> None:
    data = package()
    half = len(data) // 2
    first_half = local_file(sftp_server, "part.bin", data[:half])
    full = local_file(sftp_server, "full.bin", data)
    back = sftp_server.tmp / "back.bin"
    run = await sftp_server.openssh(
        "acme-release",
        f"put {first_half} /incoming/resume.bin",
        f"put -a {full} /incoming/resume.bin",  # resumes: writes from the remote size on
        f"get /incoming/resume.bin {back}",
        "ls -l /incoming",
    )
    assert run.ok, run.describe()
    assert back.read_bytes() == data
    assert "resume.bin" in run.stdout
    assert sftp_server.staging_rows() == 2, "put -a did not append (one sealed part per write session)"
    for other in ("map-upload", "northern-ops"):
        async with sftp_server.sftp(other) as sftp:
            assert await sftp.listdir("/incoming") == [".", ".."]
            assert await sftp_status(sftp.stat("/incoming/resume.bin")) == FX_NO_SUCH_FILE
            assert await sftp_status(sftp.open("/incoming/resume.bin", "rb")) == FX_NO_SUCH_FILE
            assert await sftp_status(sftp.remove("/incoming/resume.bin")) == FX_NO_SUCH_FILE
    async with sftp_server.sftp("acme-release") as sftp:
        assert (await sftp.stat("/incoming/resume.bin")).size == len(data)
        async with sftp.open("/incoming/resume.bin", "ab") as f:
            await f.write(b"tail")
        assert await read_all(sftp, "/incoming/resume.bin") == data + b"tail"
        await sftp.remove("/incoming/resume.bin")
        assert await sftp.listdir("/incoming") == [".", ".."]
        assert await sftp_status(sftp.remove("/incoming/resume.bin")) == FX_NO_SUCH_FILE
    assert sftp_server.staging_rows() == 0
    assert sftp_server.uploads() == []


async def test_staging_writes_past_the_quota_fail(tmp_path: Path) -> None:
    server = await start_sftp_server(tmp_path, {"staging_quota_bytes": "100000"})
    try:
        async with server.sftp("acme-release") as sftp:
            await write_all(sftp, "/incoming/a.bin", b"a" * 60_000)
            assert await sftp_status(write_all(sftp, "/incoming/b.bin", b"b" * 50_000)) == FX_FAILURE
            assert await sftp_status(write_all(sftp, "/incoming/c.bin", b"c" * 40_000)) == FX_OK
            async with sftp.open("/incoming/c.bin", "ab") as f:
                assert await sftp_status(f.write(b"more")) == FX_FAILURE
            await sftp.remove("/incoming/a.bin")
            await write_all(sftp, "/incoming/d.bin", b"d" * 50_000)  # room again
            sizes = {n: (await sftp.stat(f"/incoming/{n}")).size or 0 for n in await sftp.listdir("/incoming")
                     if n not in (".", "..")}
        assert sizes.get("c.bin") == 40_000
        assert sizes.get("d.bin") == 50_000
        assert sum(sizes.values()) <= 100_000
    finally:
        await server.service.stop()


BAD_NAMES = ["-leading-dash", ".hidden", "with space", "caf\u00e9.bin", "x" * 129, "semi;colon", "a*b", "~"]


async def test_names_outside_the_incoming_pattern_are_refused(sftp_server: SftpServer) -> None:
    async with sftp_server.sftp("acme-release") as sftp:
        await write_all(sftp, "/incoming/ok.bin", b"ok")
        for name in BAD_NAMES:
            path = f"/incoming/{name}"
            assert await sftp_status(sftp.open(path, "wb")) == FX_PERMISSION_DENIED, name
            assert await sftp_status(sftp.open(path + ".cfl", "wb")) == FX_PERMISSION_DENIED, name
            if name:
                assert await sftp_status(sftp.rename("/incoming/ok.bin", path)) == FX_PERMISSION_DENIED, name
        assert await sftp.listdir("/incoming") == [".", "..", "ok.bin"]
        await write_all(sftp, "/incoming/" + "A" * 128, b"longest name")  # 128 characters is allowed
    assert sftp_server.uploads() == []


async def test_handles_open_at_once_share_one_staging_quota(tmp_path: Path) -> None:
    server = await start_sftp_server(tmp_path, {"staging_quota_bytes": "1000"})
    try:
        async with server.sftp("acme-release") as sftp:
            async with sftp.open("/incoming/one.bin", "wb") as first, sftp.open("/incoming/two.bin", "wb") as second:
                assert await sftp_status(first.write(b"1" * 900)) == FX_OK
                assert await sftp_status(second.write(b"2" * 900)) == FX_FAILURE
                assert await sftp_status(second.write(b"2" * 100)) == FX_OK
            sizes = {n: (await sftp.stat(f"/incoming/{n}")).size or 0 for n in ("one.bin", "two.bin")}
        assert sizes == {"one.bin": 900, "two.bin": 100}
    finally:
        await server.service.stop()

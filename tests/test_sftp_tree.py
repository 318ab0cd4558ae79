"""The virtual tree over a real SFTP server (SPEC 2, 5): what exists for whom, read-only outside ``/incoming``,
every ``SFTPServer`` hook and protocol extension kept to the same rules.

Status codes come from asyncssh's client, which exposes them; OpenSSH's ``sftp`` shows listings as users see them.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import re
from dataclasses import replace
from pathlib import Path

import asyncssh
import pytest
from asyncssh.sftp import SFTPLimits

from cfl_sftp.domain.model import Purpose
from cfl_sftp.sftp.server import LibrarySFTPServer
from tests.factory import PackageSpec, build, image_of, manifest_of
from tests.sftp_support import (
    CHF_IMAGE_DIR,
    IMAGE_DIR,
    IMAGE_PATH,
    SEEDED_CHF,
    SEEDED_ESME,
    SftpServer,
    raw,
    read_all,
    receipt_named,
    sftp_answer,
    sftp_status,
    start_sftp_server,
    write_all,
)

FX_OK = asyncssh.FX_OK
FX_NO_SUCH_FILE = asyncssh.FX_NO_SUCH_FILE
FX_PERMISSION_DENIED = asyncssh.FX_PERMISSION_DENIED
FX_FAILURE = asyncssh.FX_FAILURE

# -- every hook of asyncssh.SFTPServer is ours ---------------------------------------------------------

HARMLESS_INHERITED = {
    # Accessors of the session, no filesystem behind them.
    "channel": "the SSH channel of the session",
    "connection": "the SSH connection of the session",
    "env": "the environment the client sent",
    "logger": "asyncssh's logger for the session",
    # Formatting only: names come from format_user/format_group, which are overridden.
    "format_longname": "builds `ls -l` text from attrs and format_user/format_group",
    "convert_attrs": "turns an os.stat_result into SFTPAttrs; our hooks never return one",
}


def test_every_public_hook_of_asyncssh_sftpserver_is_overridden_or_known_harmless() -> None:
    public = {name for name, _ in inspect.getmembers(asyncssh.SFTPServer) if not name.startswith("_")}
    overridden = {name for name in public if name in LibrarySFTPServer.__dict__}
    unreviewed = public - overridden - set(HARMLESS_INHERITED)

    assert unreviewed == set(), (
        f"asyncssh.SFTPServer has hooks that LibrarySFTPServer neither overrides nor lists as harmless: "
        f"{sorted(unreviewed)} (a default hook acts on the host filesystem)"
    )
    assert set(HARMLESS_INHERITED) <= public, "the harmless list names hooks asyncssh no longer has"
    assert not set(HARMLESS_INHERITED) & overridden, "a hook listed as harmless is also overridden"
    for must_be_ours in ("open", "open56", "remove", "rename", "posix_rename", "mkdir", "rmdir", "setstat",
                         "fsetstat", "lsetstat", "symlink", "link", "readlink", "realpath", "statvfs",
                         "fstatvfs", "scandir", "lock", "unlock", "map_path", "reverse_map_path"):
        assert must_be_ours in overridden, must_be_ours


# -- protocol extensions outside those hooks -----------------------------------------------------------


async def test_limits_extension_reports_the_open_file_limit_the_server_enforces(tmp_path: Path) -> None:
    server = await start_sftp_server(tmp_path, {"open_files_per_session": "3"})
    try:
        await server.seed(SEEDED_ESME)
        async with server.sftp("northern-ops") as sftp:
            assert sftp.limits.max_read_len > 0
            assert sftp.limits.max_write_len > 0
            packet = await raw(sftp)._make_request(b"limits@openssh.com")
            limits = SFTPLimits.decode(packet)
            assert limits.max_open_handles == 3
            assert limits.max_read_len == sftp.limits.max_read_len == 255 * 1024  # as OpenSSH's sftp-server
            assert limits.max_write_len == 255 * 1024

            handles = [await sftp.open(IMAGE_PATH, "rb") for _ in range(3)]
            assert await sftp_status(sftp.open(IMAGE_PATH, "rb")) == FX_FAILURE
            await handles.pop().close()
            handles.append(await sftp.open(IMAGE_PATH, "rb"))
            for handle in handles:
                await handle.close()
    finally:
        await server.service.stop()


async def test_a_read_longer_than_the_offered_length_is_short_and_the_rest_reads_on(tmp_path: Path) -> None:
    """As OpenSSH's sftp-server: a READ past 255 KiB answers 255 KiB; asking on from there gets the rest."""
    server = await start_sftp_server(tmp_path)
    try:
        image = PackageSpec(image_size=600_000)
        await server.seed(image)
        async with server.sftp("northern-ops") as sftp:
            handle = await raw(sftp).open(IMAGE_PATH.encode(), asyncssh.FXF_READ, asyncssh.SFTPAttrs())
            received = b""
            for _ in range(3):  # one READ per request, as the protocol sends it (asyncssh's file API would split)
                data, _at_end = await raw(sftp).read(handle, len(received), 1 << 20)
                received += data
                assert len(data) == min(255 * 1024, image.image_size - len(received) + len(data))
        assert received == image_of(image)
    finally:
        await server.service.stop()


async def test_ranges_extension_on_an_image_answers_one_range_covering_the_file(
    seeded_server: SftpServer,
) -> None:
    size = len(image_of(SEEDED_ESME))
    async with seeded_server.sftp("northern-ops") as sftp:
        assert raw(sftp)._supports_ranges
        async with sftp.open(IMAGE_PATH, "rb") as f:
            whole = [r async for r in f.request_ranges(0, size)]
            tail = [r async for r in f.request_ranges(100, size * 4)]
            past_end = [r async for r in f.request_ranges(size + 10, 50)]
    assert whole == [(0, size)]
    assert tail == [(100, size - 100)]
    assert past_end == []


async def test_ranges_extension_on_an_upload_handle_answers_unsupported_not_an_internal_error(
    sftp_server: SftpServer,
) -> None:
    async with sftp_server.sftp("acme-release") as sftp:
        package_file = await sftp.open("/incoming/pkg.cfl", "wb")
        staging_file = await sftp.open("/incoming/staging.part", "wb")
        for f in (package_file, staging_file):
            await f.write(b"abc")
            code, message = await sftp_answer(raw(sftp).request_ranges(f.handle, 0, 3))
            assert code == asyncssh.FX_OP_UNSUPPORTED
            assert "exception" not in message.lower()
        # both handles still work after the refused request
        await staging_file.close()
        assert await read_all(sftp, "/incoming/staging.part") == b"abc"
        assert await sftp_status(package_file.close()) == FX_FAILURE  # three bytes: bad-container
        assert (await receipt_named(sftp, "pkg.cfl"))["reason"] == "bad-container"


async def test_copy_data_from_an_image_into_images_is_permission_denied(seeded_server: SftpServer) -> None:
    async with seeded_server.sftp("northern-ops") as sftp:
        assert sftp.supports_remote_copy
        async with sftp.open(IMAGE_PATH, "rb") as src:
            for target in (f"{IMAGE_DIR}/copy.bin", IMAGE_PATH, "/images/new.bin", "/updates/x.bin"):
                assert await sftp_status(sftp.remote_copy(src, target)) == FX_PERMISSION_DENIED, target
        # with two handles the server did grant (both for reading), the write half of copy-data is refused
        async with sftp.open(IMAGE_PATH, "rb") as src, sftp.open(f"{IMAGE_DIR}/manifest.json", "rb") as dst:
            code = await sftp_status(raw(sftp).copy_data(src.handle, 0, 0, dst.handle, 0))
        assert code == FX_PERMISSION_DENIED
        assert await read_all(sftp, f"{IMAGE_DIR}/manifest.json") == manifest_of(SEEDED_ESME)
        assert await sftp.listdir(IMAGE_DIR) == [".", "..", "SHA256SUMS", "firmware.bin", "manifest.json",
                                                 "manifest.sig", "release-notes.md"]


async def test_copy_data_into_incoming_obeys_the_upload_rules(seeded_server: SftpServer) -> None:
    package = build(PackageSpec(firmware_version="00000020"))
    async with seeded_server.sftp("northern-ops") as sftp:  # a supplier who may upload, not for 1A2B
        # An image is not a package: the gateway runs on the copy's close and rejects it.
        async with sftp.open(IMAGE_PATH, "rb") as src:
            dst = await sftp.open("/incoming/copied.cfl", "wb")
            await raw(sftp).copy_data(src.handle, 0, 0, dst.handle, 0)
            assert await sftp_status(dst.close()) == FX_FAILURE
        receipt = await receipt_named(sftp, "copied.cfl")
        assert (receipt["outcome"], receipt["reason"]) == ("rejected", "bad-container")
        assert receipt["size"] == len(image_of(SEEDED_ESME))

    async with seeded_server.sftp("acme-release") as sftp:
        # A real package copied from a staging file into a *.cfl is accepted like an upload.
        await write_all(sftp, "/incoming/staged.bin", package)
        async with sftp.open("/incoming/staged.bin", "rb") as src, sftp.open("/incoming/copied-pkg.cfl", "wb") as dst:
            await sftp.remote_copy(src, dst)
        receipt = await receipt_named(sftp, "copied-pkg.cfl")
        assert (receipt["outcome"], receipt["reason"]) == ("accepted", "accepted")
        assert receipt["size"] == len(package)

        # A package in progress cannot be the target of a second copy (opening it again is refused).
        src = await sftp.open("/incoming/staged.bin", "rb")
        busy = await sftp.open("/incoming/busy.cfl", "wb")
        assert await sftp_status(sftp.open("/incoming/busy.cfl", "wb")) == FX_PERMISSION_DENIED
        await src.close()
        assert await sftp_status(busy.close()) == FX_FAILURE  # empty package: bad-container


# -- what a user may not see does not exist -------------------------------------------------------------

MISSING = "/images/ESME/1A2B/0001/0100/0000FFFF/firmware.bin"

INVISIBLE = {
    # user: paths that exist for someone else, with a random missing path beside each
    "northern-ops": [
        (f"{CHF_IMAGE_DIR}/firmware.bin", MISSING),
        (CHF_IMAGE_DIR, "/images/ESME/1A2B/0001/0100/0000FFFF"),
        ("/images/CHF", "/images/GSME"),
        ("/audit", "/no-such-folder"),
        ("/audit/checkpoints", "/no-such-folder/checkpoints"),
    ],
    "southern-ops": [
        (IMAGE_PATH, "/images/CHF/1A2B/0002/0100/0000FFFF/firmware.bin"),
        (IMAGE_DIR, "/images/CHF/1A2B/0002/0100/0000FFFF"),
        (f"{CHF_IMAGE_DIR}/release-notes.md", f"{CHF_IMAGE_DIR}/no-such-notes.md"),
        ("/incoming", "/no-such-folder"),
        ("/receipts", "/no-such-folder"),
        ("/held", "/no-such-folder"),
        ("/audit", "/no-such-folder"),
    ],
    "auditor": [
        (IMAGE_PATH, "/no-such-folder/firmware.bin"),
        ("/images", "/no-such-folder"),
        ("/incoming", "/no-such-folder"),
    ],
}


async def _read_answers(sftp: asyncssh.SFTPClient, path: str) -> dict[str, tuple[int, str]]:
    handler = raw(sftp)
    encoded = path.encode()
    return {
        "stat": await sftp_answer(sftp.stat(path)),
        "lstat": await sftp_answer(sftp.lstat(path)),
        "open": await sftp_answer(handler.open(encoded, asyncssh.FXF_READ, asyncssh.SFTPAttrs())),
        "opendir": await sftp_answer(handler.opendir(encoded)),
        "readlink": await sftp_answer(sftp.readlink(path)),
        "statvfs": await sftp_answer(sftp.statvfs(path)),
    }


@pytest.mark.parametrize("user", sorted(INVISIBLE))
async def test_what_a_user_may_not_see_answers_exactly_as_a_missing_path(seeded_server: SftpServer,
                                                                          user: str) -> None:
    async with seeded_server.sftp(user) as sftp:
        for hidden, missing in INVISIBLE[user]:
            hidden_answers = await _read_answers(sftp, hidden)
            missing_answers = await _read_answers(sftp, missing)
            assert hidden_answers == missing_answers, (hidden, missing)
            assert {code for code, _ in hidden_answers.values()} == {FX_NO_SUCH_FILE}, (hidden, hidden_answers)
            assert await sftp.realpath(hidden + "/./x/..") == hidden
            assert await sftp.realpath(missing + "/../" + missing.rsplit("/", 1)[1]) == missing


async def test_opendir_of_an_invisible_folder_fails_at_opendir_not_at_readdir(seeded_server: SftpServer) -> None:
    async with seeded_server.sftp("northern-ops") as sftp:
        handler = raw(sftp)
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await handler.opendir(CHF_IMAGE_DIR.encode())
        visible = await handler.opendir(IMAGE_DIR.encode())
        names, _ = await handler.readdir(visible)
        await handler.close(visible)
    assert {n.filename for n in names} >= {b"firmware.bin", b"manifest.json", b"SHA256SUMS"}


async def test_the_same_paths_exist_for_the_entitled_user(seeded_server: SftpServer) -> None:
    """The invisible paths above are real: the control that keeps the non-existence checks meaningful."""
    async with seeded_server.sftp("southern-ops") as sftp:
        assert (await sftp.stat(f"{CHF_IMAGE_DIR}/firmware.bin")).size == len(image_of(SEEDED_CHF))
    async with seeded_server.sftp("northern-ops") as sftp:
        assert (await sftp.stat(IMAGE_PATH)).size == len(image_of(SEEDED_ESME))
        assert await sftp.listdir("/incoming") == [".", ".."]
        assert (await sftp.stat("/receipts")).type == asyncssh.FILEXFER_TYPE_DIRECTORY
        with pytest.raises(asyncssh.SFTPFailure):
            await sftp.readlink(IMAGE_PATH)  # exists, not a link: a different answer from a missing path


async def test_realpath_is_lexical_and_never_climbs_above_the_root(seeded_server: SftpServer) -> None:
    async with seeded_server.sftp("southern-ops") as sftp:
        assert await sftp.realpath(".") == "/"
        assert await sftp.realpath("../../etc/passwd") == "/etc/passwd"
        assert await sftp.realpath("/images/../incoming//x/.") == "/incoming/x"
        assert await sftp.realpath("no/such/thing") == "/no/such/thing"
        assert await sftp_status(sftp.stat("/etc/passwd")) == FX_NO_SUCH_FILE
        assert await sftp_status(sftp.stat("../../etc/passwd")) == FX_NO_SUCH_FILE


# -- read-only outside /incoming -------------------------------------------------------------------------

READ_ONLY_TARGETS = [
    IMAGE_PATH,  # exists for northern-ops, not for southern-ops
    f"{CHF_IMAGE_DIR}/firmware.bin",  # exists for southern-ops, not for northern-ops
    IMAGE_DIR,
    "/images",
    "/images/index.json",
    "/images/new-file",
    "/updates/x",
    "/receipts/x.json",
    "/held/x.cfl",
    "/audit/x",
    "/",
    "/no-such-folder/x",
]


async def _write_answers(sftp: asyncssh.SFTPClient, path: str) -> dict[str, int]:
    handler = raw(sftp)
    staging = "/incoming/staging.bin"
    attrs = asyncssh.SFTPAttrs(permissions=0o600)
    return {
        "open-write": await sftp_status(sftp.open(path, "wb")),
        "open-append": await sftp_status(sftp.open(path, "ab")),
        "open-create-excl": await sftp_status(sftp.open(path, "xb")),
        "mkdir": await sftp_status(sftp.mkdir(path)),
        "rmdir": await sftp_status(sftp.rmdir(path)),
        "remove": await sftp_status(sftp.remove(path)),
        "rename-from": await sftp_status(sftp.rename(path, "/incoming/renamed.bin")),
        "rename-to": await sftp_status(sftp.rename(staging, path)),
        "posix-rename-from": await sftp_status(sftp.posix_rename(path, "/incoming/renamed.bin")),
        "posix-rename-to": await sftp_status(sftp.posix_rename(staging, path)),
        "setstat": await sftp_status(sftp.setstat(path, attrs)),
        "lsetstat": await sftp_status(sftp.setstat(path, attrs, follow_symlinks=False)),
        "symlink": await sftp_status(handler.symlink(b"/incoming/staging.bin", path.encode())),
        "symlink-to": await sftp_status(handler.symlink(path.encode(), b"/incoming/link")),
        "hardlink": await sftp_status(sftp.link(staging, path)),
        "hardlink-from": await sftp_status(sftp.link(path, "/incoming/link")),
    }


@pytest.mark.parametrize("user", ["northern-ops", "southern-ops"])
async def test_every_write_outside_incoming_is_permission_denied_whether_or_not_the_path_exists(
    seeded_server: SftpServer, user: str
) -> None:
    async with seeded_server.sftp(user) as sftp:
        if user == "northern-ops":
            await write_all(sftp, "/incoming/staging.bin", b"staged bytes")
        for path in READ_ONLY_TARGETS:
            answers = await _write_answers(sftp, path)
            wrong = {op: code for op, code in answers.items() if code != FX_PERMISSION_DENIED}
            assert wrong == {}, f"{user} {path}: {wrong}"
        if user == "northern-ops":
            assert await read_all(sftp, "/incoming/staging.bin") == b"staged bytes"
            assert await read_all(sftp, IMAGE_PATH) == image_of(SEEDED_ESME)


async def test_plain_rename_from_paramiko_outside_incoming_is_permission_denied(seeded_server: SftpServer) -> None:
    import asyncio

    import paramiko

    def attempt() -> dict[str, str]:
        answers = {}
        with seeded_server.paramiko("northern-ops") as client:
            with client.open("/incoming/staging.bin", "wb") as f:
                f.write(b"x")
            for label, old, new in [
                ("image-to-incoming", IMAGE_PATH, "/incoming/stolen.bin"),
                ("incoming-to-images", "/incoming/staging.bin", f"{IMAGE_DIR}/evil.bin"),
                ("invisible", f"{CHF_IMAGE_DIR}/firmware.bin", "/incoming/stolen.bin"),
                ("posix", "/incoming/staging.bin", "/images/evil.bin"),
            ]:
                try:
                    if label == "posix":
                        client.posix_rename(old, new)
                    else:
                        client.rename(old, new)  # SSH_FXP_RENAME
                    answers[label] = "ok"
                except PermissionError:
                    answers[label] = "permission-denied"
                except (OSError, paramiko.SFTPError) as exc:
                    answers[label] = f"other: {exc!r}"
        return answers

    answers = await asyncio.to_thread(attempt)
    assert answers == dict.fromkeys(answers, "permission-denied")
    assert set(answers) == {"image-to-incoming", "incoming-to-images", "invisible", "posix"}


async def test_write_requests_on_a_read_handle_are_permission_denied(seeded_server: SftpServer) -> None:
    async with seeded_server.sftp("northern-ops") as sftp:
        handler = raw(sftp)
        async with sftp.open(IMAGE_PATH, "rb") as f:
            assert await sftp_status(handler.write(f.handle, 0, b"evil")) == FX_PERMISSION_DENIED
            assert await sftp_status(f.setstat(asyncssh.SFTPAttrs(size=1))) == FX_PERMISSION_DENIED
            assert await sftp_status(f.truncate(0)) == FX_PERMISSION_DENIED
        assert await read_all(sftp, IMAGE_PATH) == image_of(SEEDED_ESME)


async def test_mkdir_in_incoming_is_refused_and_setstat_on_own_files_is_accepted(sftp_server: SftpServer) -> None:
    async with sftp_server.sftp("acme-release") as sftp:
        assert await sftp_status(sftp.mkdir("/incoming/sub")) == FX_PERMISSION_DENIED
        assert await sftp_status(sftp.mkdir("/incoming")) == FX_PERMISSION_DENIED
        await write_all(sftp, "/incoming/notes.txt", b"hello")
        await sftp.setstat("/incoming/notes.txt", asyncssh.SFTPAttrs(permissions=0o600, mtime=1, atime=1))
        await sftp.chmod("/incoming/notes.txt", 0o600)
        assert (await sftp.stat("/incoming/notes.txt")).size == 5
        assert await sftp_status(sftp.setstat("/incoming/absent.txt", asyncssh.SFTPAttrs(mtime=1))) == (
            FX_NO_SUCH_FILE
        )
        assert await sftp.listdir("/incoming") == [".", "..", "notes.txt"]


async def test_openssh_listings_show_owner_and_group_cfl_never_host_users(seeded_server: SftpServer) -> None:
    async with seeded_server.sftp("northern-ops") as sftp:
        await write_all(sftp, "/incoming/staging.bin", b"x" * 10)
    run = await seeded_server.openssh("northern-ops", "ls -l /", f"ls -l {IMAGE_DIR}", "ls -l /incoming",
                                      "ls -la /images")
    assert run.ok, run.describe()
    listed = [line for line in run.stdout.splitlines() if line[:1] in ("-", "d")]
    assert len(listed) >= 5 + 5 + 1 + 1, run.stdout
    for line in listed:
        assert re.match(r"^[-d][-rwx]{9}\s+(\d+\s+)?cfl\s+cfl\s+\d+\s", line), line
    assert "root" not in run.stdout
    assert any(line.endswith(" firmware.bin") and line.startswith("-r--r--r--") for line in listed)
    assert any(line.endswith(" staging.bin") for line in listed)


# -- what the tree holds --------------------------------------------------------------------------------


async def test_sha256sums_lists_exactly_the_other_files_of_the_folder_with_their_hashes(
    seeded_server: SftpServer,
) -> None:
    for user, folder, with_notes in [("northern-ops", IMAGE_DIR, True), ("southern-ops", CHF_IMAGE_DIR, False)]:
        async with seeded_server.sftp(user) as sftp:
            names = sorted(n for n in await sftp.listdir(folder) if n not in (".", ".."))
            sums = (await read_all(sftp, f"{folder}/SHA256SUMS")).decode()
            files = {name: await read_all(sftp, f"{folder}/{name}") for name in names if name != "SHA256SUMS"}
        lines = sums.splitlines()
        assert all(len(line.split("  ")) == 2 for line in lines), sums
        listed = {name: digest for digest, name in (line.split("  ") for line in lines)}
        assert listed == {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        assert ("release-notes.md" in listed) is with_notes, (user, sums)


async def test_index_json_lists_exactly_the_images_the_user_is_entitled_to(seeded_server: SftpServer) -> None:
    expected = {
        "northern-ops": [f"{IMAGE_DIR}/firmware.bin"],
        "southern-ops": [f"{CHF_IMAGE_DIR}/firmware.bin"],
        "northern-gas": [],
    }
    for user, paths in expected.items():
        async with seeded_server.sftp(user) as sftp:
            index = json.loads(await read_all(sftp, "/images/index.json"))
            assert [entry["path"] for entry in index] == paths, user
            for entry in index:
                image = await read_all(sftp, entry["path"])
                assert entry["sha256"] == hashlib.sha256(image).hexdigest()
                assert entry["size"] == len(image)
                assert set(entry) == {"path", "sha256", "size", "device_type", "manufacturer_id", "model_id",
                                      "hardware_version", "firmware_version", "purpose", "released"}
    esme = json.loads(await _read_as(seeded_server, "northern-ops", "/images/index.json"))[0]
    assert (esme["device_type"], esme["manufacturer_id"], esme["model_id"], esme["hardware_version"],
            esme["firmware_version"], esme["purpose"], esme["released"]) == (
        "ESME", "1A2B", "0001", "0100", "00000010", "security-fix", "2026-01-15")


async def _read_as(server: SftpServer, user: str, path: str) -> bytes:
    async with server.sftp(user) as sftp:
        return await read_all(sftp, path)


async def test_release_notes_are_readable_only_with_the_release_notes_role(seeded_server: SftpServer) -> None:
    notes = f"{IMAGE_DIR}/release-notes.md"
    async with seeded_server.sftp("northern-ops") as sftp:
        assert await read_all(sftp, notes) == SEEDED_ESME.release_notes
        assert "release-notes.md" in await sftp.listdir(IMAGE_DIR)
    for user in ("northern-gas", "southern-ops"):
        async with seeded_server.sftp(user) as sftp:
            assert await sftp_status(sftp.stat(notes)) == FX_NO_SUCH_FILE
            assert await sftp_status(sftp.open(notes, "rb")) == FX_NO_SUCH_FILE
    # southern-ops sees the CHF folder, but not its notes: no role
    async with seeded_server.sftp("southern-ops") as sftp:
        assert "release-notes.md" not in await sftp.listdir(CHF_IMAGE_DIR)
        assert await sftp_status(sftp.open(f"{CHF_IMAGE_DIR}/release-notes.md", "rb")) == FX_NO_SUCH_FILE
    read = await seeded_server.wait_for_audit("release-note-read")
    assert [e["actor"] for e in read] == ["northern-ops"]


async def test_first_listings_at_once_by_users_of_one_organisation_with_different_roles_stay_their_own(
    seeded_server: SftpServer,
) -> None:
    """Views are built off the loop and shared per organisation and role set: two users of one Supplier asking
    at the same moment, after the library changed, must still each get the tree of their own roles."""
    async with seeded_server.sftp("northern-ops") as ops, seeded_server.sftp("northern-gas") as gas:
        ops_root, gas_root, ops_images, gas_images = await asyncio.gather(
            ops.listdir("/"), gas.listdir("/"), ops.listdir("/images"), gas.listdir("/images"))
        assert sorted(ops_root) == [".", "..", "held", "images", "incoming", "receipts", "updates"]
        assert sorted(gas_root) == [".", "..", "images", "updates"]
        assert ops_images == [".", "..", "ESME", "index.json"]
        assert gas_images == [".", "..", "index.json"]  # gas-supplier: no ESME; the CHF model is southern's
        assert "release-notes.md" in await ops.listdir(IMAGE_DIR)
        assert await sftp_status(gas.stat(IMAGE_DIR)) == FX_NO_SUCH_FILE


async def test_a_reloaded_gateway_section_changes_the_images_an_open_session_lists(seeded_server: SftpServer) -> None:
    """``admitted_purposes`` is part of entitlement (SPEC 2): a SIGHUP that narrows it rebuilds every tree, the
    trees shared by users of one organisation and role set included."""
    runtime = seeded_server.service.runtime
    async with seeded_server.sftp("northern-ops") as sftp:
        assert "ESME" in await sftp.listdir("/images")
        config = runtime.deployment.config
        runtime.install_config(replace(config, gateway=replace(config.gateway,
                                                                admitted_purposes=frozenset({Purpose.COMPLIANCE}))))
        assert "ESME" not in await sftp.listdir("/images")  # the seeded image is a security-fix
        assert await sftp_status(sftp.stat(IMAGE_PATH)) == FX_NO_SUCH_FILE


async def test_southern_supplier_does_not_see_the_esme_image_anywhere(seeded_server: SftpServer) -> None:
    async with seeded_server.sftp("southern-ops") as sftp:
        assert await sftp.listdir("/images") == [".", "..", "CHF", "index.json"]
        assert "ESME" not in await sftp.listdir("/updates")
        for path in ("/images/ESME", "/updates/ESME", IMAGE_PATH, IMAGE_PATH.replace("/images/", "/updates/")):
            assert await sftp_status(sftp.stat(path)) == FX_NO_SUCH_FILE
        index = json.loads(await read_all(sftp, "/images/index.json"))
    assert [(e["device_type"], e["model_id"]) for e in index] == [("CHF", "0002")]


async def test_updates_hold_only_images_newer_than_the_estate_firmware(seeded_server: SftpServer) -> None:
    # northern-energy: one ESME device on 00000005 and one of unknown firmware (counts as older than anything);
    # southern-power: one CHF device on 00000001.
    await seeded_server.seed(PackageSpec(firmware_version="00000003"), name="old-esme.cfl")
    await seeded_server.seed(PackageSpec(model_id="0002", device_type="CHF", firmware_version="00000001"),
                             name="current-chf.cfl")
    async with seeded_server.sftp("southern-ops") as sftp:
        images = await sftp.listdir("/images/CHF/1A2B/0002/0100")
        updates = await sftp.listdir("/updates/CHF/1A2B/0002/0100")
        assert "index.json" not in await sftp.listdir("/updates")
        assert await sftp_status(sftp.stat("/updates/CHF/1A2B/0002/0100/00000001")) == FX_NO_SUCH_FILE
        update_image = await read_all(sftp, "/updates/CHF/1A2B/0002/0100/00000010/firmware.bin")
    assert sorted(images) == [".", "..", "00000001", "00000010"]
    assert sorted(updates) == [".", "..", "00000010"]
    assert update_image == image_of(SEEDED_CHF)
    async with seeded_server.sftp("northern-ops") as sftp:
        updates = await sftp.listdir("/updates/ESME/1A2B/0001/0100")
        assert "release-notes.md" in await sftp.listdir("/updates/ESME/1A2B/0001/0100/00000010")
    # 00000003 is older than the device on 00000005, but the device of unknown firmware counts as older still
    assert sorted(updates) == [".", "..", "00000003", "00000010"]


async def test_openssh_get_downloads_the_entitled_image_byte_for_byte(seeded_server: SftpServer) -> None:
    local = seeded_server.tmp / "firmware.bin"
    run = await seeded_server.openssh("northern-ops", f"get {IMAGE_PATH} {local}",
                                      f"get {IMAGE_DIR}/SHA256SUMS {seeded_server.tmp / 'sums'}")
    assert run.ok, run.describe()
    assert local.read_bytes() == image_of(SEEDED_ESME)
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    assert f"{digest}  firmware.bin\n" in (seeded_server.tmp / "sums").read_text()
    refused = await seeded_server.openssh("southern-ops", f"get {IMAGE_PATH} {seeded_server.tmp / 'no.bin'}")
    assert not refused.ok
    assert not (seeded_server.tmp / "no.bin").exists()
    downloads = await seeded_server.wait_for_audit("image-downloaded", 2)
    assert {e["actor"] for e in downloads} == {"northern-ops"}

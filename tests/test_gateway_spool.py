"""The gateway's spool (issue 9): an upload expected to be accepted spools only the package's frame, not its
image; a package held all the same (a race) is stored whole and byte-exact; nothing is left behind otherwise.

Real deployments (SQLite and, when CI provides it, PostgreSQL), PackageUpload driven directly as the SFTP layer
drives it. Whether the image was left out is seen on disk: the size of the spool's temp file.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from cfl_sftp.domain.errors import Outcome, Reason
from cfl_sftp.held import release
from cfl_sftp.intake import PackageUpload
from cfl_sftp.storage.files import SYNC_EVERY_BYTES, WriteBehind
from cfl_sftp.storage.models import HeldPackageRow, VaultObjectRow
from cfl_sftp.storage.sealed import SealedReader, spool_context
from tests.deployments import DeploymentUnderTest
from tests.factory import PackageSpec, build
from tests.test_gateway import ACME, assert_nothing_partial, count, files_under, upload

IMAGE_SIZE = 3 << 20
"""Large enough that a spool holding the image cannot be mistaken for one without it."""


def held_bytes(td: DeploymentUnderTest, upload_id: str) -> bytes:
    """The held package as the ``/held`` folder serves it: the sealed spool object, decrypted."""
    d = td.deployment
    with d.db.reading() as session:
        held = session.get(HeldPackageRow, upload_id)
        assert held is not None
        row = session.get(VaultObjectRow, held.vault_object)
        assert row is not None
    reader = SealedReader.open(d.spool.path_of(row.object_id), row, d.keyring, spool_context(row.object_id))
    try:
        return b"".join(reader.chunks())
    finally:
        reader.close()


def spooled_size(td: DeploymentUnderTest) -> int:
    """Bytes in the spool's temp folder: the uploads in progress."""
    return sum(p.stat().st_size for p in files_under(td.deployment.spool.tmp))


def fed(td: DeploymentUnderTest, package: bytes, name: str, piece: int) -> PackageUpload:
    job = PackageUpload(td.deployment, ACME, name)
    for start in range(0, len(package), piece):
        job.write(package[start : start + piece])
    return job


def test_upload_expected_to_be_accepted_spools_its_frame_only(td: DeploymentUnderTest) -> None:
    package = build(PackageSpec(image_size=IMAGE_SIZE, release_notes=b"notes"))
    job = fed(td, package, "new.cfl", 256 * 1024)
    assert spooled_size(td) < len(package) - IMAGE_SIZE + (64 << 10)
    assert job.complete().outcome is Outcome.ACCEPTED
    assert_nothing_partial(td)


def test_upload_expected_to_be_held_spools_everything_and_is_stored_exactly(td: DeploymentUnderTest) -> None:
    package = build(PackageSpec(image_size=IMAGE_SIZE))
    upload(td, package, "first.cfl")
    job = fed(td, package, "again.cfl", 256 * 1024)
    assert spooled_size(td) > IMAGE_SIZE  # (the last, partial segment is sealed at close)
    receipt = job.complete()
    assert (receipt.outcome, receipt.reason) == (Outcome.HELD, Reason.DUPLICATE_IMAGE)
    assert held_bytes(td, receipt.upload_id) == package
    assert_nothing_partial(td)


@pytest.mark.parametrize("piece", [1 << 20, 512, 4096 + 7, 10**9])
def test_package_held_by_a_race_is_stored_whole_and_exact(td: DeploymentUnderTest, piece: int) -> None:
    """The library gains the same image between the manifest being read and the verdict: the spool left the
    image out, so the verdict seals the whole package again; it must be the bytes uploaded."""
    package = build(PackageSpec(image_size=IMAGE_SIZE, release_notes=b"race notes"))
    job = fed(td, package, "late.cfl", piece)
    assert spooled_size(td) < len(package) - IMAGE_SIZE + (64 << 10)
    assert upload(td, package, "early.cfl").outcome is Outcome.ACCEPTED

    receipt = job.complete()
    assert (receipt.outcome, receipt.reason) == (Outcome.HELD, Reason.DUPLICATE_IMAGE)
    assert held_bytes(td, receipt.upload_id) == package
    assert count(td, HeldPackageRow) == 1
    assert_nothing_partial(td)


def test_version_conflict_held_by_a_race_can_be_released(td: DeploymentUnderTest) -> None:
    package = build(PackageSpec(image_size=IMAGE_SIZE, variant=1))
    job = fed(td, package, "late.cfl", 64 * 1024)
    upload(td, build(PackageSpec()), "first.cfl")

    receipt = job.complete()
    assert (receipt.outcome, receipt.reason) == (Outcome.HELD, Reason.VERSION_CONFLICT)
    assert held_bytes(td, receipt.upload_id) == package
    image = release(td.deployment, receipt.upload_id, "re-issued build")
    assert image.size == IMAGE_SIZE
    assert_nothing_partial(td)


def test_rejected_upload_with_its_image_left_out_leaves_nothing(td: DeploymentUnderTest) -> None:
    spec = PackageSpec(image_size=IMAGE_SIZE)
    package = bytearray(build(spec))
    package[len(package) // 2] ^= 0xFF  # inside the image: its SHA-256 no longer matches the manifest
    job = fed(td, bytes(package), "bad.cfl", 256 * 1024)
    assert spooled_size(td) < len(package) - IMAGE_SIZE + (64 << 10)
    receipt = job.complete()
    assert (receipt.outcome, receipt.reason) == (Outcome.REJECTED, Reason.HASH_MISMATCH)
    assert_nothing_partial(td)


def test_aborted_upload_with_its_image_left_out_leaves_nothing(td: DeploymentUnderTest) -> None:
    package = build(PackageSpec(image_size=IMAGE_SIZE, release_notes=b"notes"))
    job = fed(td, package[: len(package) // 2], "cut.cfl", 256 * 1024)
    job.abort()
    assert_nothing_partial(td)


@pytest.mark.sqlite_only
def test_library_lookup_that_fails_spools_everything(td: DeploymentUnderTest) -> None:
    """If the library cannot say whether the package would be held, the whole package is spooled, so a held
    verdict needs no second sealing. The lookup is made to fail by hiding the images table for a moment."""
    package = build(PackageSpec(image_size=IMAGE_SIZE))
    upload(td, package, "first.cfl")
    database = sqlite3.connect(str(make_url(td.deployment.config.database_url).database), isolation_level=None)
    try:
        database.execute("ALTER TABLE images RENAME TO images_hidden")
        job = fed(td, package, "again.cfl", 256 * 1024)
        database.execute("ALTER TABLE images_hidden RENAME TO images")
    finally:
        database.close()
    assert spooled_size(td) > IMAGE_SIZE
    receipt = job.complete()
    assert (receipt.outcome, receipt.reason) == (Outcome.HELD, Reason.DUPLICATE_IMAGE)
    assert held_bytes(td, receipt.upload_id) == package
    assert_nothing_partial(td)


def test_upload_without_a_spool_writes_none_and_can_only_replace(td: DeploymentUnderTest) -> None:
    """What ``held release`` uses to re-read a held package: no spool file at all."""
    package = build(PackageSpec(image_size=IMAGE_SIZE))
    job = PackageUpload(td.deployment, ACME, "released.cfl", spool=False)
    job.write(package)
    assert files_under(td.deployment.spool.tmp) == []
    with pytest.raises(RuntimeError):
        job.complete()
    job.abort()
    assert_nothing_partial(td)


def test_write_behind_flushes_keep_every_byte(tmp_path: Path) -> None:
    """Several background flushes overlap the writes; the file holds exactly what was written, in order."""
    path = tmp_path / "grown"
    piece = bytes(range(256)) * 4096  # 1 MiB
    total = 0
    with path.open("xb") as file:
        writeback = WriteBehind(file)
        for n in range(2 * SYNC_EVERY_BYTES // len(piece) + 3):
            data = piece[n % 256 :] + piece[: n % 256]
            file.write(data)
            writeback.wrote(len(data))
            total += len(data)
        writeback.sync()
    assert path.stat().st_size == total
    with path.open("rb") as file:
        for n in range(total // len(piece)):
            assert file.read(len(piece)) == piece[n % 256 :] + piece[: n % 256]


def test_package_hash_computed_beside_the_reader_is_the_hash_of_every_byte_in_order(td: DeploymentUnderTest) -> None:
    """Pieces large enough to be hashed in another thread and small ones hashed in line, interleaved."""
    package = build(PackageSpec(image_size=IMAGE_SIZE, release_notes=b"notes"))
    job = PackageUpload(td.deployment, ACME, "mixed.cfl")
    sizes = [100, 1 << 20, 7, 65536, 65535, 300_000]
    start = 0
    while start < len(package):
        piece = sizes[start % len(sizes)]
        job.write(package[start : start + piece])
        start += piece
    receipt = job.complete()
    assert receipt.outcome is Outcome.ACCEPTED
    assert receipt.package_sha256 == hashlib.sha256(package).hexdigest()

"""The gateway end to end on a real deployment: every outcome and reason code of SPEC 4, with what it leaves.

Each test feeds a real signed package (tests.factory) through ``PackageUpload`` as the SFTP layer does, then
checks the receipt, the library folder, the vault and the database.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select

from cfl_sftp.domain.errors import Outcome, Reason
from cfl_sftp.domain.receipt import Receipt
from cfl_sftp.held import HeldPackageError, list_held, purge, release
from cfl_sftp.intake import PackageUpload, Uploader
from cfl_sftp.storage.models import (
    AuditEntryRow,
    HeldPackageRow,
    ImageRow,
    UploadRow,
    VaultObjectRow,
)
from tests.deployments import DeploymentUnderTest, make_deployment
from tests.factory import OMIT, Member, PackageSpec, build, image_of, new_ed25519_key

ACME = Uploader("acme-release", "acme-meters", "127.0.0.1:50000")


def upload(td: DeploymentUnderTest, package: bytes, name: str = "pkg.cfl", who: Uploader = ACME,
           piece: int = 64 * 1024) -> Receipt:
    job = PackageUpload(td.deployment, who, name)
    for start in range(0, len(package), piece):
        job.write(package[start : start + piece])
    return job.complete()


def count(td: DeploymentUnderTest, model: type) -> int:
    with td.deployment.db.reading() as session:
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def assert_nothing_partial(td: DeploymentUnderTest) -> None:
    """Every file on disk is referenced by a row, and no temp file is left."""
    d = td.deployment
    assert files_under(d.data.tmp) == []
    assert files_under(d.vault.tmp) == []
    assert files_under(d.spool.tmp) == []
    with d.db.reading() as session:
        shas = set(session.execute(select(ImageRow.sha256)).scalars())
        objects = set(session.execute(select(VaultObjectRow.object_id)).scalars())
    assert {p.name for p in files_under(d.data.library)} == shas
    sealed = {p.name.removesuffix(".sealed") for p in files_under(d.vault.root) + files_under(d.spool.root)}
    assert sealed == objects


def receipt_on_record(td: DeploymentUnderTest, receipt: Receipt) -> dict[str, object]:
    with td.deployment.db.reading() as session:
        row = session.get(UploadRow, receipt.upload_id)
        assert row is not None
        entry = session.get(AuditEntryRow, receipt.audit_seq)
        assert entry is not None
        assert json.loads(entry.entry)["details"]["upload_id"] == receipt.upload_id
        result: dict[str, object] = json.loads(row.receipt)
        return result


# -- accepted ------------------------------------------------------------------------------------------


def test_valid_package_is_accepted_into_the_library(td: DeploymentUnderTest) -> None:
    spec = PackageSpec(release_notes=b"# Notes\nsecret-marker-7f3a\n")
    receipt = upload(td, build(spec))

    assert (receipt.outcome, receipt.reason) == (Outcome.ACCEPTED, Reason.ACCEPTED)
    assert receipt.image_path == "/images/ESME/1A2B/0001/0100/00000010/firmware.bin"
    stored = receipt_on_record(td, receipt)
    assert stored["outcome"] == "accepted"
    assert stored["audit_seq"] == receipt.audit_seq
    assert stored["file_name"] == "pkg.cfl"
    assert stored["organisation"] == "acme-meters"
    image = image_of(spec)
    assert td.deployment.data.image_path(receipt_image_sha(td)).read_bytes() == image
    assert count(td, ImageRow) == 1
    assert_nothing_partial(td)


def receipt_image_sha(td: DeploymentUnderTest) -> str:
    with td.deployment.db.reading() as session:
        return session.execute(select(ImageRow.sha256)).scalar_one()


def test_release_notes_are_stored_only_encrypted(td: DeploymentUnderTest) -> None:
    marker = b"unique-marker-c0ffee-41"
    upload(td, build(PackageSpec(release_notes=b"# Notes\n" + marker * 100)))
    td.deployment.data.wait_for_discards()  # the spool copy is still being deleted in the background
    for path in files_under(td.root):
        assert marker not in path.read_bytes(), path


def test_map_allowed_to_upload_for_the_manufacturer_is_accepted(td: DeploymentUnderTest) -> None:
    receipt = upload(td, build(PackageSpec()), who=Uploader("map-upload", "meter-assets", "peer"))
    assert receipt.outcome is Outcome.ACCEPTED


def test_empty_package_is_rejected_as_bad_container(td: DeploymentUnderTest) -> None:
    receipt = upload(td, b"")
    assert (receipt.outcome, receipt.reason) == (Outcome.REJECTED, Reason.BAD_CONTAINER)
    assert_nothing_partial(td)


# -- held ----------------------------------------------------------------------------------------------


def test_package_seen_twice_is_held_as_duplicate_image_and_not_added_twice(td: DeploymentUnderTest) -> None:
    package = build(PackageSpec())
    first = upload(td, package, "first.cfl")
    second = upload(td, package, "again.cfl")

    assert (second.outcome, second.reason) == (Outcome.HELD, Reason.DUPLICATE_IMAGE)
    assert second.image_path == first.image_path
    assert count(td, ImageRow) == 1
    held = list_held(td.deployment)
    assert [(h.upload_id, h.reason) for h in held] == [(second.upload_id, "duplicate-image")]
    assert_nothing_partial(td)


def test_same_version_with_other_bytes_is_held_as_version_conflict(td: DeploymentUnderTest) -> None:
    upload(td, build(PackageSpec()))
    receipt = upload(td, build(PackageSpec(variant=1)))
    assert (receipt.outcome, receipt.reason) == (Outcome.HELD, Reason.VERSION_CONFLICT)
    assert receipt.image_path == "/images/ESME/1A2B/0001/0100/00000010/firmware.bin"
    assert count(td, ImageRow) == 1
    assert_nothing_partial(td)


def test_held_package_is_kept_encrypted(td: DeploymentUnderTest) -> None:
    marker = b"held-marker-5e5e5e"
    upload(td, build(PackageSpec()))
    upload(td, build(PackageSpec(variant=1, release_notes=marker)))
    td.deployment.data.wait_for_discards()
    for path in files_under(td.root):
        assert marker not in path.read_bytes(), path


def test_releasing_a_version_conflict_retires_the_old_image(td: DeploymentUnderTest) -> None:
    upload(td, build(PackageSpec()))
    held = upload(td, build(PackageSpec(variant=1)))
    image = release(td.deployment, held.upload_id, "manufacturer re-issued the build")

    assert image.sha256 != receipt_image_sha_retired(td)
    with td.deployment.db.reading() as session:
        rows = session.execute(select(ImageRow.retired).order_by(ImageRow.id)).scalars().all()
        events = session.execute(select(AuditEntryRow.event).order_by(AuditEntryRow.seq)).scalars().all()
    assert rows == [True, False]
    assert events[-1] == "held-released"
    assert count(td, HeldPackageRow) == 0
    assert_nothing_partial(td)


def receipt_image_sha_retired(td: DeploymentUnderTest) -> str:
    with td.deployment.db.reading() as session:
        return session.execute(select(ImageRow.sha256).where(ImageRow.retired.is_(True))).scalar_one()


def test_retired_image_still_counts_as_a_duplicate(td: DeploymentUnderTest) -> None:
    original = build(PackageSpec())
    upload(td, original)
    held = upload(td, build(PackageSpec(variant=1)))
    release(td.deployment, held.upload_id, "replacement")
    again = upload(td, original, "original-again.cfl")
    assert (again.outcome, again.reason) == (Outcome.HELD, Reason.DUPLICATE_IMAGE)


def test_held_duplicate_image_cannot_be_released_only_purged(td: DeploymentUnderTest) -> None:
    package = build(PackageSpec())
    upload(td, package)
    held = upload(td, package, "again.cfl")
    with pytest.raises(HeldPackageError):
        release(td.deployment, held.upload_id, "please")
    purge(td.deployment, held.upload_id)
    assert list_held(td.deployment) == []
    with td.deployment.db.reading() as session:
        events = session.execute(select(AuditEntryRow.event).order_by(AuditEntryRow.seq)).scalars().all()
    assert events[-1] == "held-purged"
    assert_nothing_partial(td)


def test_same_package_completed_concurrently_is_accepted_once_and_held_once(td: DeploymentUnderTest) -> None:
    package = build(PackageSpec())
    jobs = [PackageUpload(td.deployment, ACME, f"race-{n}.cfl") for n in range(2)]
    for job in jobs:
        job.write(package)
    receipts: list[Receipt] = []
    barrier = threading.Barrier(2)

    def complete(job: PackageUpload) -> None:
        barrier.wait()
        receipts.append(job.complete())

    threads = [threading.Thread(target=complete, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(r.outcome.value for r in receipts) == ["accepted", "held"]
    assert count(td, ImageRow) == 1
    assert_nothing_partial(td)


# -- rejected ------------------------------------------------------------------------------------------


def _symlink_member(members: list[Member]) -> list[Member]:
    return [*members, Member("evil", type=b"2", linkname="/etc/passwd")]


REJECTIONS = [
    pytest.param(PackageSpec(members=_symlink_member), Reason.BAD_CONTAINER, id="symlink-member"),
    pytest.param(PackageSpec(members=lambda m: [*m, Member("../x", b"x")]), Reason.BAD_CONTAINER, id="dotdot"),
    pytest.param(PackageSpec(members=lambda m: [m[0], m[2], m[1]]), Reason.BAD_CONTAINER, id="reordered"),
    pytest.param(PackageSpec(truncate_to=1500), Reason.BAD_CONTAINER, id="truncated"),
    pytest.param(PackageSpec(manifest_bytes=b"{not json"), Reason.BAD_MANIFEST, id="broken-manifest"),
    pytest.param(PackageSpec(manifest_overrides={"purpose": "fun"}), Reason.BAD_MANIFEST, id="bad-purpose"),
    pytest.param(PackageSpec(manifest_overrides={"released": OMIT}), Reason.BAD_MANIFEST, id="missing-field"),
    pytest.param(PackageSpec(image_member=b"x" * 1000), Reason.HASH_MISMATCH, id="member-shorter"),
    pytest.param(PackageSpec(manifest_overrides={"firmware_version": "00000011"}), Reason.HEADER_MISMATCH,
                 id="ota-version"),
    pytest.param(PackageSpec(key=new_ed25519_key()), Reason.BAD_SIGNATURE, id="foreign-signature"),
    pytest.param(PackageSpec(signature=b"\x00" * 64), Reason.BAD_SIGNATURE, id="garbage-signature"),
]


@pytest.mark.parametrize(("spec", "reason"), REJECTIONS)
def test_bad_package_is_rejected_with_its_reason_and_leaves_nothing(
    td: DeploymentUnderTest, spec: PackageSpec, reason: Reason
) -> None:
    receipt = upload(td, build(spec))
    assert (receipt.outcome, receipt.reason) == (Outcome.REJECTED, reason)
    assert receipt_on_record(td, receipt)["reason"] == reason.value
    assert count(td, ImageRow) == 0
    assert count(td, HeldPackageRow) == 0
    assert_nothing_partial(td)


def test_device_model_held_under_another_type_is_bad_manifest(td: DeploymentUnderTest) -> None:
    upload(td, build(PackageSpec()))
    receipt = upload(td, build(PackageSpec(device_type="CHF", firmware_version="00000011")))
    assert (receipt.outcome, receipt.reason) == (Outcome.REJECTED, Reason.BAD_MANIFEST)
    assert count(td, ImageRow) == 1


def test_uploader_not_allowed_for_manufacturer_is_rejected(td: DeploymentUnderTest) -> None:
    receipt = upload(td, build(PackageSpec()), who=Uploader("other-release", "other-meters", "peer"))
    assert (receipt.outcome, receipt.reason) == (Outcome.REJECTED, Reason.MANUFACTURER_NOT_ALLOWED)
    assert_nothing_partial(td)


def test_package_over_the_size_limit_is_too_large(tmp_path: Path) -> None:
    td = make_deployment(tmp_path, settings={"max_package_bytes": "8192"})
    receipt = upload(td, build(PackageSpec(image_size=16 * 1024)))
    assert (receipt.outcome, receipt.reason) == (Outcome.REJECTED, Reason.TOO_LARGE)
    assert receipt.size > 8192
    assert_nothing_partial(td)


def test_release_notes_over_their_limit_are_too_large(tmp_path: Path) -> None:
    td = make_deployment(tmp_path, settings={"max_release_notes_bytes": "100"})
    receipt = upload(td, build(PackageSpec(release_notes=b"n" * 101)))
    assert (receipt.outcome, receipt.reason) == (Outcome.REJECTED, Reason.TOO_LARGE)
    assert_nothing_partial(td)


def test_purpose_not_admitted_is_rejected(tmp_path: Path) -> None:
    td = make_deployment(tmp_path, settings={"admitted_purposes": '["compliance"]'})
    receipt = upload(td, build(PackageSpec(purpose="defect-fix")))
    assert (receipt.outcome, receipt.reason) == (Outcome.REJECTED, Reason.PURPOSE_NOT_ADMITTED)


def test_product_list_when_required(tmp_path: Path) -> None:
    td = make_deployment(tmp_path, settings={"require_product_list": "true"})
    spec = PackageSpec()
    receipt = upload(td, build(spec))
    assert (receipt.outcome, receipt.reason) == (Outcome.REJECTED, Reason.NOT_IN_PRODUCT_LIST)

    import hashlib

    sha = hashlib.sha256(image_of(spec)).hexdigest()
    (td.root / "policies" / "product-list.csv").write_text(
        f"manufacturer_id,model_id,hardware_version,firmware_version,image_sha256\n1A2B,0001,0100,00000010,{sha}\n"
    )
    receipt = upload(td, build(spec))
    assert receipt.outcome is Outcome.ACCEPTED


def test_aborted_upload_leaves_nothing_and_records_nothing(td: DeploymentUnderTest) -> None:
    job = PackageUpload(td.deployment, ACME, "cut.cfl")
    package = build(PackageSpec(release_notes=b"partial"))
    job.write(package[: len(package) // 2])
    job.abort()
    assert count(td, UploadRow) == 0
    assert_nothing_partial(td)


def test_audit_seq_has_no_gap_across_outcomes(td: DeploymentUnderTest) -> None:
    package = build(PackageSpec())
    receipts = [upload(td, package, "a.cfl"), upload(td, package, "b.cfl"), upload(td, b"junk", "c.cfl")]
    assert [r.audit_seq for r in receipts] == [1, 2, 3]

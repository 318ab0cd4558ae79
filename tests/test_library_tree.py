"""The shared library tree and one organisation's sight of it (SPEC 5), on in-memory catalogue images."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

from cfl_sftp.catalogue import Catalogue, CatalogueImage
from cfl_sftp.domain.model import DeviceModel, DeviceType, ImageRef, Purpose
from cfl_sftp.sftp.tree import (
    EPOCH,
    Entitlement,
    Folder,
    ImageFile,
    LibraryTree,
    ReleaseNoteFile,
    StaticFile,
    entitled_folder,
    index_entry,
)

DAY = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)


def image(n: int, device_type: DeviceType, model: DeviceModel, firmware: str, *, notes: bool = False,
          days: int = 0) -> CatalogueImage:
    return CatalogueImage(
        id=n, ref=ImageRef(device_type, model, firmware, f"fw-{n}.bin"), sha256=hashlib.sha256(bytes([n])).hexdigest(),
        size=1000 + n, purpose=Purpose.SECURITY_FIX, released="2026-01-15", manifest=b'{"n": %d}' % n,
        signature=b"sig%d" % n, release_notes_name="notes.md" if notes else None,
        release_notes_size=10 if notes else None,
        release_notes_sha256=hashlib.sha256(b"notes").hexdigest() if notes else None,
        release_notes_object="obj" if notes else None, added_at=DAY + dt.timedelta(days=days),
    )


A = DeviceModel("1A2B", "0001", "0100")
B = DeviceModel("1A2B", "0002", "0100")
C = DeviceModel("3C4D", "0001", "0200")
# Deliberately not in path order: the tree sorts them.
CATALOGUE = Catalogue(version=(1, 1, 1), images=(
    image(1, DeviceType.ESME, B, "00000002", days=5),
    image(2, DeviceType.ESME, A, "00000001", notes=True, days=1),
    image(3, DeviceType.GSME, C, "00000007", days=3),
    image(4, DeviceType.ESME, A, "00000003", days=2),
))
TREE = LibraryTree.of(CATALOGUE)


def sight_of(ids: set[int], *, with_notes: bool = False, with_index: bool = True) -> Folder:
    positions = [p for p, i in enumerate(TREE.images) if i.id in ids]
    return entitled_folder(Entitlement.of(TREE, positions, with_notes=with_notes, with_index=with_index))


def walk(folder: Folder, path: str) -> object:
    node: object = folder
    for part in path.split("/"):
        if not isinstance(node, Folder):
            return None
        node = node.child(part)
    return node


def names(folder: object) -> list[str]:
    assert isinstance(folder, Folder)
    return [name for name, _ in folder.entries()]


def test_images_are_laid_out_in_path_order_and_each_folder_covers_its_own_images() -> None:
    assert [i.id for i in TREE.images] == [2, 4, 1, 3]
    esme = TREE.root.folders["ESME"]
    assert (esme.first, esme.end) == (0, 3)
    model_a = esme.folders["1A2B"].folders["0001"]
    assert (model_a.first, model_a.end) == (0, 2)
    gsme = TREE.root.folders["GSME"]
    assert (gsme.first, gsme.end) == (3, 4)


def test_a_folder_exists_only_when_it_holds_an_entitled_image() -> None:
    top = sight_of({4, 3})
    assert names(top) == ["ESME", "GSME", "index.json"]
    assert names(walk(top, "ESME/1A2B")) == ["0001"]  # model 0002 holds only image 1
    assert walk(top, "ESME/1A2B/0002") is None
    assert names(walk(top, "ESME/1A2B/0001/0100")) == ["00000003"]
    assert walk(top, "ESME/1A2B/0001/0100/00000001") is None
    assert walk(top, "ESME/1A2B/0001/0100/00000001/fw-2.bin") is None
    assert walk(top, "nothing") is None


def test_a_sight_of_nothing_is_an_empty_top_folder_with_an_empty_index() -> None:
    top = sight_of(set())
    assert names(top) == ["index.json"]
    assert top.mtime == EPOCH
    index = top.child("index.json")
    assert isinstance(index, StaticFile)
    assert index.content == b"[]\n"
    assert names(sight_of(set(), with_index=False)) == []


def test_a_folder_mtime_is_its_newest_entitled_image() -> None:
    top = sight_of({2, 4, 3})
    assert top.mtime == DAY + dt.timedelta(days=3)
    esme = walk(top, "ESME")
    assert isinstance(esme, Folder)
    assert esme.mtime == DAY + dt.timedelta(days=2)  # image 1 (day 5) is not entitled
    assert sight_of({1, 2}).child("ESME").mtime == DAY + dt.timedelta(days=5)  # type: ignore[union-attr]


def test_index_json_is_exactly_what_json_dumps_writes_for_the_entitled_images() -> None:
    for ids in ({1}, {1, 2, 3, 4}, {2, 3}):
        index = sight_of(ids).child("index.json")
        assert isinstance(index, StaticFile)
        expected = [index_entry(i) for i in TREE.images if i.id in ids]
        assert index.content == (json.dumps(expected, indent=1) + "\n").encode()
        assert index.mtime == max(i.added_at for i in TREE.images if i.id in ids)
    assert walk(sight_of({1}), "ESME").child("index.json") is None  # type: ignore[union-attr]


def test_release_notes_and_their_checksum_line_show_only_to_a_notes_reader() -> None:
    folder = "ESME/1A2B/0001/0100/00000001"
    plain, reader = walk(sight_of({2}), folder), walk(sight_of({2}, with_notes=True), folder)
    assert names(plain) == ["SHA256SUMS", "fw-2.bin", "manifest.json", "manifest.sig"]
    assert names(reader) == ["SHA256SUMS", "fw-2.bin", "manifest.json", "manifest.sig", "notes.md"]
    assert isinstance(reader.child("notes.md"), ReleaseNoteFile)  # type: ignore[union-attr]
    assert plain.child("notes.md") is None  # type: ignore[union-attr]
    sums_plain = plain.child("SHA256SUMS").content.decode()  # type: ignore[union-attr]
    sums_reader = reader.child("SHA256SUMS").content.decode()  # type: ignore[union-attr]
    assert "notes.md" not in sums_plain
    assert sums_reader.splitlines() == sorted([*sums_plain.splitlines(),
                                               f"{hashlib.sha256(b'notes').hexdigest()}  notes.md"],
                                              key=lambda line: line.split("  ")[1])
    assert isinstance(plain.child("fw-2.bin"), ImageFile)  # type: ignore[union-attr]

"""A user's view of the library as folders and files (SPEC 5).

The library is laid out once per catalogue as a :class:`LibraryTree` that every user shares. What one
organisation and role set may see is an :class:`Entitlement`: which of the tree's images it holds, kept as two
arrays of integers. A user's ``/images`` and ``/updates`` are the shared tree seen through its entitlement: a
folder exists for it when it holds at least one entitled image, and its mtime is that of its newest entitled
image. So what a user may not see does not exist for it, and a view costs a few objects however large the
library, instead of a tree of its own: building one is a pass over the catalogue, and the garbage collector,
whose full passes hold the GIL and so the event loop, has almost nothing of it to walk.

The nodes say what to serve, not how: the SFTP layer opens an :class:`ImageFile` from the library folder and a
:class:`ReleaseNoteFile` through the vault.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate, groupby
from types import MappingProxyType
from typing import Any

from cfl_sftp.catalogue import Catalogue, CatalogueImage

EPOCH = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class StaticFile:
    """Small generated or stored bytes: manifest.json, manifest.sig, SHA256SUMS, index.json, receipts."""

    content: bytes
    mtime: dt.datetime

    @property
    def size(self) -> int:
        return len(self.content)


@dataclass(frozen=True, slots=True)
class ImageFile:
    image: CatalogueImage

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def mtime(self) -> dt.datetime:
        return self.image.added_at


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """An image's ``manifest.json``: served from memory, its download audited like the image's."""

    image: CatalogueImage

    @property
    def content(self) -> bytes:
        return self.image.manifest

    @property
    def size(self) -> int:
        return len(self.image.manifest)

    @property
    def mtime(self) -> dt.datetime:
        return self.image.added_at


@dataclass(frozen=True, slots=True)
class ReleaseNoteFile:
    image: CatalogueImage

    @property
    def size(self) -> int:
        return self.image.release_notes_size or 0

    @property
    def mtime(self) -> dt.datetime:
        return self.image.added_at


FileNode = StaticFile | ManifestFile | ImageFile | ReleaseNoteFile


# -- the shared tree -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LibraryFolder:
    """A folder of the whole library. Its images are ``LibraryTree.images[first:end]``: images are sorted by
    path, and the paths under one folder share its prefix, so they are contiguous."""

    first: int
    end: int
    folders: Mapping[str, LibraryFolder]
    files: Mapping[str, FileNode]
    """A firmware-version folder's files as a release-notes reader sees them (other folders have none)."""
    files_without_notes: Mapping[str, FileNode]
    """The same without the release notes and their line in ``SHA256SUMS``, for every other reader."""


_NOTHING: Mapping[str, Any] = MappingProxyType({})
_LEVELS = 5
"""Device type, manufacturer, model, hardware version, firmware version."""


@dataclass(frozen=True, slots=True)
class LibraryTree:
    """Every current image laid out as folders, built once per catalogue (O(images)) and shared by all views.

    A firmware-version folder holds one image: a device model's firmware version has one current image (SPEC 4,
    check 9)."""

    images: tuple[CatalogueImage, ...]
    """Sorted by path."""
    root: LibraryFolder
    index_entries: tuple[str, ...]
    """Each image's entry of ``index.json``, already formatted as it appears in the file."""

    @classmethod
    def of(cls, catalogue: Catalogue) -> LibraryTree:
        images = tuple(sorted(catalogue.images, key=lambda i: i.ref.path))
        parts = [_folder_names(image) for image in images]
        root = _lay_out(images, parts, 0, len(images), 0)
        return cls(images, root, tuple(_index_entry_text(image) for image in images))


def _folder_names(image: CatalogueImage) -> tuple[str, ...]:
    m = image.device_model
    return image.device_type.value, m.manufacturer_id, m.model_id, m.hardware_version, image.firmware_version


def _lay_out(
    images: tuple[CatalogueImage, ...], parts: list[tuple[str, ...]], first: int, end: int, depth: int
) -> LibraryFolder:
    """The folder at ``depth`` holding ``images[first:end]``; only the dicts it needs (fewer objects to walk)."""
    if depth == _LEVELS:
        files: dict[str, FileNode] = {}
        without: dict[str, FileNode] = {}
        for image in images[first:end]:  # one, unless the library broke check 9: then show them all
            with_notes, without_notes = _image_files(image)
            files.update(with_notes)
            without.update(without_notes)
        return LibraryFolder(first, end, _NOTHING, files, files if without == files else without)
    folders: dict[str, LibraryFolder] = {}
    for name, group in groupby(range(first, end), key=lambda p: parts[p][depth]):
        positions = list(group)
        folders[name] = _lay_out(images, parts, positions[0], positions[-1] + 1, depth + 1)
    return LibraryFolder(first, end, folders, _NOTHING, _NOTHING)


def _sums(entries: Iterable[tuple[str, str]], mtime: dt.datetime) -> StaticFile:
    text = "".join(f"{digest}  {name}\n" for digest, name in sorted(entries, key=lambda s: s[1]))
    return StaticFile(text.encode(), mtime)


def _image_files(image: CatalogueImage) -> tuple[dict[str, FileNode], dict[str, FileNode]]:
    """A firmware-version folder's files with and without the release notes."""
    files: dict[str, FileNode] = {
        image.ref.image_name: ImageFile(image),
        "manifest.json": ManifestFile(image),
        "manifest.sig": StaticFile(image.signature, image.added_at),
    }
    sums = [
        (image.sha256, image.ref.image_name),
        (hashlib.sha256(image.manifest).hexdigest(), "manifest.json"),
        (hashlib.sha256(image.signature).hexdigest(), "manifest.sig"),
    ]
    without_notes = {**files, "SHA256SUMS": _sums(sums, image.added_at)}
    if image.release_notes_name and image.release_notes_sha256:
        files[image.release_notes_name] = ReleaseNoteFile(image)
        sums.append((image.release_notes_sha256, image.release_notes_name))
    files["SHA256SUMS"] = _sums(sums, image.added_at)
    return files, without_notes


def index_entry(image: CatalogueImage) -> dict[str, object]:
    m = image.device_model
    return {
        "path": image.ref.path,
        "sha256": image.sha256,
        "size": image.size,
        "device_type": image.device_type.value,
        "manufacturer_id": m.manufacturer_id,
        "model_id": m.model_id,
        "hardware_version": m.hardware_version,
        "firmware_version": image.firmware_version,
        "purpose": image.purpose.value,
        "released": image.released,
    }


def _index_entry_text(image: CatalogueImage) -> str:
    """One entry as ``json.dumps(entries, indent=1)`` writes it inside the list: one more space per line."""
    return " " + json.dumps(index_entry(image), indent=1).replace("\n", "\n ")


def index_json(entries: Iterable[str]) -> bytes:
    """``index.json`` of the given entries: the same bytes as ``json.dumps([...], indent=1)`` and a newline."""
    body = ",\n".join(entries)
    return (f"[\n{body}\n]\n" if body else "[]\n").encode()


# -- one organisation's and role set's sight of it ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entitlement:
    """Which images of a :class:`LibraryTree` one organisation and role set may see, in ``/images`` or
    ``/updates``: a few arrays and bytes, which the garbage collector does not walk."""

    tree: LibraryTree
    positions: array[int]
    """The entitled images' positions in ``tree.images``, ascending."""
    counts: array[int]
    """``counts[i]``: how many of ``tree.images[:i]`` are entitled, so a folder's share is two lookups."""
    with_notes: bool
    index: StaticFile | None
    _mtimes: dict[int, dt.datetime] = field(default_factory=dict)
    """Folder mtimes computed so far, by the folder's range (folders with one range have one mtime)."""

    @classmethod
    def of(cls, tree: LibraryTree, entitled: Iterable[int], *, with_notes: bool, with_index: bool) -> Entitlement:
        positions = array("q", sorted(entitled))
        marks = bytearray(len(tree.images))
        for position in positions:
            marks[position] = 1
        counts = array("q", accumulate(marks, initial=0))
        index = None
        if with_index:
            newest = max((tree.images[p].added_at for p in positions), default=EPOCH)
            index = StaticFile(index_json(tree.index_entries[p] for p in positions), newest)
        return cls(tree, positions, counts, with_notes, index)

    def holds(self, folder: LibraryFolder) -> bool:
        return self.counts[folder.end] > self.counts[folder.first]

    def mtime(self, folder: LibraryFolder) -> dt.datetime:
        """The newest entitled image's ``added_at`` under ``folder`` (:data:`EPOCH` when it holds none)."""
        key = folder.first * (len(self.counts) + 1) + folder.end
        known = self._mtimes.get(key)
        if known is None:
            images = self.tree.images
            start = bisect_left(self.positions, folder.first)
            stop = bisect_left(self.positions, folder.end, start)
            known = max((images[p].added_at for p in self.positions[start:stop]), default=EPOCH)
            self._mtimes[key] = known
        return known


@dataclass(frozen=True, slots=True)
class Folder:
    """A folder of ``/images`` or ``/updates`` as one user sees it (made per request; cheap)."""

    shared: LibraryFolder
    sight: Entitlement
    top: bool = False

    @property
    def mtime(self) -> dt.datetime:
        return self.sight.mtime(self.shared)

    def child(self, name: str) -> Node | None:
        """The entry ``name`` if the user may see it, else ``None`` (exactly as for a name that does not exist)."""
        sub = self.shared.folders.get(name)
        if sub is not None:
            return Folder(sub, self.sight) if self.sight.holds(sub) else None
        if self.top and name == "index.json":
            return self.sight.index
        return self._files().get(name)

    def entries(self) -> list[tuple[str, Node]]:
        """Every entry the user may see, sorted by name."""
        found: list[tuple[str, Node]] = [
            (name, Folder(sub, self.sight)) for name, sub in self.shared.folders.items() if self.sight.holds(sub)
        ]
        found.extend(self._files().items())
        if self.top and self.sight.index is not None:
            found.append(("index.json", self.sight.index))
        found.sort(key=lambda entry: entry[0])
        return found

    def _files(self) -> Mapping[str, FileNode]:
        """Only firmware-version folders have files, and a user reaches only those that hold an entitled image."""
        return self.shared.files if self.sight.with_notes else self.shared.files_without_notes


def entitled_folder(sight: Entitlement) -> Folder:
    """``/images`` or ``/updates`` of ``sight``: it exists even when it holds nothing."""
    return Folder(sight.tree.root, sight, top=True)


Node = Folder | FileNode


def library_paths(catalogue: Catalogue) -> frozenset[str]:
    """Every ``/images`` path that exists for someone: folders and files (``/updates`` maps onto these)."""
    paths: set[str] = {"/images", "/images/index.json"}
    for image in catalogue.images:
        m = image.device_model
        folder = "/images"
        for part in (image.device_type.value, m.manufacturer_id, m.model_id, m.hardware_version,
                     image.firmware_version):
            folder = f"{folder}/{part}"
            paths.add(folder)
        names = [image.ref.image_name, "manifest.json", "manifest.sig", "SHA256SUMS"]
        if image.release_notes_name:
            names.append(image.release_notes_name)
        paths.update(f"{folder}/{name}" for name in names)
    return frozenset(paths)

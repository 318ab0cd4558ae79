"""A user's view of the library as folders and files (SPEC 5), built once per policy set and library version.

``/images`` and ``/updates`` are built here from the catalogue images a user is entitled to; nothing else is in
them, so what a user may not see does not exist for it. The nodes say what to serve, not how: the SFTP layer
opens an :class:`ImageFile` from the library folder and a :class:`ReleaseNoteFile` through the vault.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

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


@dataclass(slots=True)
class Folder:
    children: dict[str, Node] = field(default_factory=dict)
    mtime: dt.datetime = EPOCH

    def folder(self, name: str, mtime: dt.datetime) -> Folder:
        node = self.children.get(name)
        if not isinstance(node, Folder):
            node = Folder()
            self.children[name] = node
        node.mtime = max(node.mtime, mtime)
        return node


Node = Folder | StaticFile | ManifestFile | ImageFile | ReleaseNoteFile


def _image_folder(image: CatalogueImage, with_notes: bool) -> dict[str, Node]:
    files: dict[str, Node] = {
        image.ref.image_name: ImageFile(image),
        "manifest.json": ManifestFile(image),
        "manifest.sig": StaticFile(image.signature, image.added_at),
    }
    sums = [
        (image.sha256, image.ref.image_name),
        (hashlib.sha256(image.manifest).hexdigest(), "manifest.json"),
        (hashlib.sha256(image.signature).hexdigest(), "manifest.sig"),
    ]
    if with_notes and image.release_notes_name and image.release_notes_sha256:
        files[image.release_notes_name] = ReleaseNoteFile(image)
        sums.append((image.release_notes_sha256, image.release_notes_name))
    text = "".join(f"{digest}  {name}\n" for digest, name in sorted(sums, key=lambda s: s[1]))
    files["SHA256SUMS"] = StaticFile(text.encode(), image.added_at)
    return files


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


def build_library_folder(images: Iterable[CatalogueImage], *, with_notes: bool, with_index: bool) -> Folder:
    """The ``/images`` (or ``/updates``, without index) folder holding exactly ``images``."""
    top = Folder()
    entitled = sorted(images, key=lambda i: i.ref.path)
    for image in entitled:
        m = image.device_model
        folder = top
        for part in (image.device_type.value, m.manufacturer_id, m.model_id, m.hardware_version):
            folder = folder.folder(part, image.added_at)
        leaf = folder.folder(image.firmware_version, image.added_at)
        leaf.children.update(_image_folder(image, with_notes))
    top.mtime = max((i.added_at for i in entitled), default=EPOCH)
    if with_index:
        body = [index_entry(i) for i in entitled]
        top.children["index.json"] = StaticFile((json.dumps(body, indent=1) + "\n").encode(), top.mtime)
    return top


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

"""A user's whole tree (SPEC 5): which top-level folders its roles grant and what ``/images`` holds for it."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from cfl_sftp.domain.entitlement import EstateView, is_entitled, is_update
from cfl_sftp.domain.model import Purpose, Role
from cfl_sftp.policy import PolicySnapshot
from cfl_sftp.policy.snapshot import Organisation, User
from cfl_sftp.sftp.tree import Entitlement, Folder, LibraryTree, entitled_folder


@dataclass(frozen=True, slots=True)
class UserView:
    """Built once per (policy set, library version, user) and shared by that user's sessions."""

    user: str
    organisation: str
    images: Folder | None
    updates: Folder | None
    uploader: bool
    auditor: bool

    def top_level(self) -> list[str]:
        names = []
        if self.auditor:
            names.append("audit")
        if self.uploader:
            names += ["held", "incoming"]
        if self.images is not None:
            names.append("images")
        if self.uploader:
            names.append("receipts")
        if self.updates is not None:
            names.append("updates")
        return names


EntitledFolders = tuple[Folder, Folder]


def build_entitled_folders(  # noqa: PLR0917 - one generation's inputs, captured together by the caller
    snapshot: PolicySnapshot,
    estate: EstateView,
    library: LibraryTree,
    user: User,
    organisation: Organisation,
    admitted: Collection[Purpose],
) -> EntitledFolders:
    """``/images`` and ``/updates`` for an organisation and role set (SPEC 5): O(images), run in a worker thread.

    Entitlement reads nothing of a user but its roles, so every user of one organisation with the same roles
    shares the result.
    """
    images = library.images
    entitled = [
        position
        for position, image in enumerate(images)
        if is_entitled(user, organisation, snapshot.roles, estate, image.device_type, image.device_model,
                       image.purpose, admitted)
    ]
    newer = [p for p in entitled if is_update(estate, organisation.id, images[p].device_model,
                                              images[p].firmware_version)]
    reads_notes = Role.RELEASE_NOTES in user.roles
    return (
        entitled_folder(Entitlement.of(library, entitled, with_notes=reads_notes, with_index=True)),
        entitled_folder(Entitlement.of(library, newer, with_notes=reads_notes, with_index=False)),
    )

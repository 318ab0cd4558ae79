"""A user's whole tree (SPEC 5): which top-level folders its roles grant and what ``/images`` holds for it."""

from __future__ import annotations

from dataclasses import dataclass

from cfl_sftp.sftp.tree import Folder


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

"""One deployment's parts, built from its configuration: database, data folders, key ring and policy.

The CLI and the SFTP service both start from a :class:`Deployment`, so that they act on the same things in the
same way.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cfl_sftp.config import Config
from cfl_sftp.domain.vault import KeyRing
from cfl_sftp.policy import PolicySnapshot, load_policy_set
from cfl_sftp.storage.db import Database
from cfl_sftp.storage.files import DataFolder, ScratchClaim, new_owner_id, sweep_dead_scratch
from cfl_sftp.storage.sealed import SealedFolder


class KeyFileError(Exception):
    """A key file is missing, unreadable or readable by others."""


def read_secret_file(path: Path) -> bytes:
    """Read a key file, refusing one that group or others may read (SPEC 7: mode 0600)."""
    try:
        info = path.stat()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise KeyFileError(f"key file {path} is readable by group or others: chmod 600 it")
    return path.read_bytes()


def load_keyring(spec: str) -> KeyRing:
    """A key ring from a file path or ``credential:NAME`` (``$CREDENTIALS_DIRECTORY/NAME`` under systemd)."""
    if spec.startswith("credential:"):
        folder = os.environ.get("CREDENTIALS_DIRECTORY")
        if not folder:
            raise KeyFileError(f"{spec}: $CREDENTIALS_DIRECTORY is not set (LoadCredential= in the unit)")
        path = Path(folder) / spec.removeprefix("credential:")
        text = path.read_bytes()
    else:
        text = read_secret_file(Path(spec))
    try:
        return KeyRing.parse(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise KeyFileError(f"vault key ring {spec}: {exc}") from exc


@dataclass
class Deployment:
    config: Config
    db: Database
    data: DataFolder
    vault: SealedFolder
    spool: SealedFolder
    keyring: KeyRing
    policy: Callable[[], PolicySnapshot]
    scratch: ScratchClaim

    @property
    def owner_id(self) -> str:
        """This process's id for its scratch folders; a service node uses it as its node id too."""
        return self.scratch.owner

    @classmethod
    def open(cls, config: Config, *, policy: Callable[[], PolicySnapshot] | None = None) -> Deployment:
        """Open (and prepare) a deployment; the database must already be migrated (see ``Database``)."""
        data = DataFolder(config.data_dir)
        data.prepare()
        vault = SealedFolder(config.vault_dir)
        vault.prepare()
        spool = SealedFolder(config.spool_dir)
        spool.prepare()
        if policy is None:
            policies_dir = config.policies_dir

            def policy() -> PolicySnapshot:
                return load_policy_set(policies_dir)

        deployment = cls(
            config=config,
            db=Database(config.database_url),
            data=data,
            vault=vault,
            spool=spool,
            keyring=load_keyring(config.vault_key),
            policy=policy,
            scratch=ScratchClaim(new_owner_id(), data.tmp_root),
        )
        for folder in (data, vault, spool):
            folder.use_scratch(deployment.scratch)  # claimed at the first file written
        return deployment

    def sweep_dead_scratch(
        self, grace_seconds: float, before_removal: Callable[[str], None] | None = None
    ) -> list[str]:
        """Remove what processes that died left in their scratch folders (see :mod:`cfl_sftp.storage.files`)."""
        roots = [self.data.tmp_root, self.data.trash_root, self.vault.tmp_root, self.spool.tmp_root]
        return sweep_dead_scratch(self.data.tmp_root, roots, keep=self.owner_id, grace_seconds=grace_seconds,
                                  before_removal=before_removal)

    def close(self) -> None:
        self.db.dispose()
        self.scratch.release()

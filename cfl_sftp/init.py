"""``cfl-sftp init``: a new deployment folder with defaults, fresh keys, empty policies and a migrated database."""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cfl_sftp.config import DEFAULT_CONFIG_NAME, DEFAULT_CONFIG_TOML, load_config
from cfl_sftp.domain.vault import generate_key_line
from cfl_sftp.storage.db import Database

POLICY_EXAMPLES: dict[str, str] = {
    "organisations.toml": """\
# Organisations (SPEC 6). An empty set lets nobody in. Example:
#
# [[organisation]]
# id = "acme-meters"
# name = "Acme Meters Ltd"
# kind = "manufacturer"            # supplier, manufacturer, map or auditor
# manufacturer_ids = ["1A2B"]
#
# [[organisation]]
# id = "northern-energy"
# name = "Northern Energy"
# kind = "supplier"
# may_upload_for = []              # suppliers and MAPs: manufacturer ids they may upload for
""",
    "users.toml": """\
# Users (SPEC 6). Keys are plain OpenSSH public key lines. Example:
#
# [[user]]
# name = "acme-release"
# organisation = "acme-meters"
# roles = ["uploader"]
# keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... release@acme"]
# enabled = true
""",
    "roles.toml": """\
# Device types each supplier role may see (SPEC 6). Example:
#
# [roles.import-supplier]
# device_types = ["ESME", "CHF", "IHD", "PPMID", "CAD", "HCALCS"]
#
# [roles.gas-supplier]
# device_types = ["GSME", "GPF", "CHF", "IHD", "PPMID", "CAD", "HCALCS"]
""",
}

POLICY_README = """\
This folder is the policy set in force (SPEC 6); the service picks up changes by itself.

  organisations.toml, users.toml, roles.toml   commented examples beside this file
  manufacturer-keys/<manufacturer_id>/*.pem    public keys (or X.509 certificates) of manufacturers
  estates/<organisation id>.csv                one supplier's devices; header:
      device_id,manufacturer_id,model_id,hardware_version,firmware_version,since
  user-ca.pub, revoked-keys, product-list.csv  optional

Check a change before it goes live with:  cfl-sftp policy check
"""


class InitError(Exception):
    """The target folder cannot hold a new deployment."""


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_keys(keys_dir: Path) -> None:
    """Host keys, the vault key ring and the audit signing key, each mode 0600."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ed = asyncssh.generate_private_key("ssh-ed25519")
    _write_secret(keys_dir / "ssh_host_ed25519_key", ed.export_private_key())
    (keys_dir / "ssh_host_ed25519_key.pub").write_bytes(ed.export_public_key())
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=3072)
    _write_secret(keys_dir / "ssh_host_rsa_key", rsa.export_private_key())
    (keys_dir / "ssh_host_rsa_key.pub").write_bytes(rsa.export_public_key())
    _write_secret(keys_dir / "vault.keyring", (generate_key_line("kek-1") + "\n").encode())
    audit = ed25519.Ed25519PrivateKey.generate()
    _write_secret(
        keys_dir / "audit.key",
        audit.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def init_deployment(directory: Path, *, with_policy_examples: bool = True) -> Path:
    """Create a deployment in an empty or new ``directory``; return the config file's path."""
    if directory.exists() and any(directory.iterdir()):
        raise InitError(f"{directory} is not empty")
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / DEFAULT_CONFIG_NAME
    config_path.write_text(DEFAULT_CONFIG_TOML, encoding="utf-8")
    policies = directory / "policies"
    policies.mkdir()
    if with_policy_examples:
        for name, text in POLICY_EXAMPLES.items():
            (policies / name).write_text(text, encoding="utf-8")
        (policies / "README").write_text(POLICY_README, encoding="utf-8")
    write_keys(directory / "keys")
    config = load_config(config_path)
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    db = Database(config.database_url)
    try:
        db.upgrade()
    finally:
        db.dispose()
    return config_path

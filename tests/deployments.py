"""Real test deployments: ``cfl-sftp init`` in a temp folder, a small policy set, real SQLite (or PostgreSQL).

``make_deployment(tmp_path)`` gives a :class:`~cfl_sftp.deployment.Deployment` whose policies name:

* ``acme-meters`` (manufacturer ``1A2B``) with user ``acme-release`` (uploader);
* ``meter-assets`` (a MAP allowed to upload for ``1A2B``) with ``map-upload`` (uploader);
* ``other-meters`` (manufacturer ``3C4D``) with ``other-release`` (uploader): may not upload for ``1A2B``;
* ``northern-energy`` (supplier) with ``northern-ops`` (import-supplier, release-notes, uploader) and
  ``northern-gas`` (gas-supplier); its estate holds ESME ``1A2B/0001/0100`` devices;
* ``southern-power`` (supplier) with ``southern-ops`` (import-supplier), estate of GSME ``1A2B/0002/0100``;
* ``industry-audit`` (auditor) with ``auditor``.

Each user has a fresh Ed25519 key pair under ``<tmp>/clients/<user>`` (mode 0600).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from cfl_sftp.config import load_config
from cfl_sftp.deployment import Deployment
from cfl_sftp.init import init_deployment
from tests.factory import SIGNING_KEY, public_pem

USERS: dict[str, tuple[str, list[str]]] = {
    "acme-release": ("acme-meters", ["uploader"]),
    "map-upload": ("meter-assets", ["uploader"]),
    "other-release": ("other-meters", ["uploader"]),
    "northern-ops": ("northern-energy", ["import-supplier", "release-notes", "uploader"]),
    "northern-gas": ("northern-energy", ["gas-supplier"]),
    "southern-ops": ("southern-power", ["import-supplier"]),
    "auditor": ("industry-audit", ["auditor"]),
}

ORGANISATIONS = """\
[[organisation]]
id = "acme-meters"
name = "Acme Meters"
kind = "manufacturer"
manufacturer_ids = ["1A2B"]

[[organisation]]
id = "meter-assets"
name = "Meter Assets"
kind = "map"
may_upload_for = ["1A2B"]

[[organisation]]
id = "other-meters"
name = "Other Meters"
kind = "manufacturer"
manufacturer_ids = ["3C4D"]

[[organisation]]
id = "northern-energy"
name = "Northern Energy"
kind = "supplier"

[[organisation]]
id = "southern-power"
name = "Southern Power"
kind = "supplier"

[[organisation]]
id = "industry-audit"
name = "Industry Audit"
kind = "auditor"
"""

ROLES = """\
[roles.import-supplier]
device_types = ["ESME", "CHF", "IHD", "PPMID", "CAD", "HCALCS"]

[roles.gas-supplier]
device_types = ["GSME", "GPF", "CHF", "IHD", "PPMID", "CAD", "HCALCS"]
"""

HEADER = "device_id,manufacturer_id,model_id,hardware_version,firmware_version,since\n"


@dataclass
class DeploymentUnderTest:
    root: Path
    config_path: Path
    deployment: Deployment
    clients: Path

    def key_path(self, user: str) -> Path:
        return self.clients / user


def write_policies(policies: Path, clients: Path) -> None:
    clients.mkdir(mode=0o700, exist_ok=True)
    (policies / "organisations.toml").write_text(ORGANISATIONS)
    (policies / "roles.toml").write_text(ROLES)
    users = []
    for name, (organisation, roles) in USERS.items():
        key = asyncssh.generate_private_key("ssh-ed25519")
        path = clients / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.export_private_key())
        public = key.export_public_key().decode().strip()
        users.append(
            f'[[user]]\nname = "{name}"\norganisation = "{organisation}"\nroles = {json.dumps(roles)}\n'
            f"keys = [{json.dumps(public)}]\n"
        )
    (policies / "users.toml").write_text("\n".join(users))
    keys = policies / "manufacturer-keys" / "1A2B"
    keys.mkdir(parents=True, exist_ok=True)
    (keys / "acme.pem").write_bytes(public_pem(SIGNING_KEY))
    estates = policies / "estates"
    estates.mkdir(exist_ok=True)
    (estates / "northern-energy.csv").write_text(
        HEADER + "E0000001,1A2B,0001,0100,00000005,\nE0000002,1A2B,0001,0100,,\n"
    )
    (estates / "southern-power.csv").write_text(HEADER + "G0000001,1A2B,0002,0100,00000001,\n")


def make_deployment(
    tmp_path: Path, *, database_url: str | None = None, settings: dict[str, str] | None = None
) -> DeploymentUnderTest:
    """``settings`` replaces values in the generated config, e.g. ``{"max_package_bytes": "4096"}``."""
    root = tmp_path / "deployment"
    config_path = init_deployment(root, with_policy_examples=False)
    text = config_path.read_text()
    if database_url:
        text = f'database_url = "{database_url}"\n' + text
    for key, value in (settings or {}).items():
        text, count = re.subn(rf"^{re.escape(key)} = .*$", f"{key} = {value}", text, flags=re.MULTILINE)
        assert count == 1, f"no setting {key} in the default config"
    config_path.write_text(text)
    write_policies(root / "policies", tmp_path / "clients")
    config = load_config(config_path)
    deployment = Deployment.open(config)
    deployment.db.upgrade_if_empty()
    return DeploymentUnderTest(root, config_path, deployment, tmp_path / "clients")

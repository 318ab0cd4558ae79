"""``cfl-sftp demo``: a ready deployment that shows the product in five minutes (SPEC 10).

It creates (or reuses) a folder with a manufacturer, two Suppliers with estates (one device moved between them by
a Change of Supplier), an auditor, a user of each role with its own key pair, a manufacturer signing key, one
image with release notes already in the library, and local packages that show each gateway outcome. Then it
serves the deployment on loopback and prints ``sftp`` commands that work when pasted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import struct
import sys
from pathlib import Path

import asyncssh
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from cfl_sftp.config import load_config
from cfl_sftp.deployment import Deployment
from cfl_sftp.domain.build import build_package
from cfl_sftp.init import init_deployment
from cfl_sftp.intake import PackageUpload, Uploader, feed_chunks, file_chunks
from cfl_sftp.logs import configure_logging
from cfl_sftp.service import serve as serve_config

MANUFACTURER_ID = "1A2B"
ESME_MODEL = ("1A2B", "0001", "0100")
GSME_MODEL = ("1A2B", "0002", "0100")

USERS = {
    # name: (organisation, roles)
    "acme-release": ("acme-meters", ["uploader"]),
    "northern-ops": ("northern-energy", ["import-supplier", "release-notes"]),
    "southern-gas": ("southern-power", ["gas-supplier"]),
    "ofgem-audit": ("industry-audit", ["auditor"]),
}

ORGANISATIONS = """\
[[organisation]]
id = "acme-meters"
name = "Acme Meters Ltd"
kind = "manufacturer"
manufacturer_ids = ["1A2B"]

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

ESTATE_HEADER = "device_id,manufacturer_id,model_id,hardware_version,firmware_version,since\n"


def ota_image(manufacturer_id: str, firmware_version: str, size: int, seed: bytes) -> bytes:
    """A ZigBee OTA upgrade file whose header agrees with the manifest, padded to ``size`` bytes."""
    header_length = 56
    header = struct.pack(
        "<IHHHHHIH32sI",
        0x0BEEF11E, 0x0100, header_length, 0x0000, int(manufacturer_id, 16), 0x0000,
        int(firmware_version, 16), 0x0002, b"cfl-sftp demo image".ljust(32, b"\0"), size,
    )
    body = bytearray()
    block = seed
    while len(header) + len(body) < size:
        block = hashlib.sha256(block).digest()
        body += block
    return (header + bytes(body))[:size]


def _manifest(model: tuple[str, str, str], device_type: str, version: str, purpose: str) -> dict[str, object]:
    return {
        "format": "cfl-package/1",
        "manufacturer_id": model[0],
        "model_id": model[1],
        "hardware_version": model[2],
        "device_type": device_type,
        "firmware_version": version,
        "purpose": purpose,
        "specifications": ["SMETS2 v5.0", "GBCS v4.0"],
        "released": "2026-11-02",
    }


def _package(
    out: Path, key: ed25519.Ed25519PrivateKey, manifest: dict[str, object], image: bytes, notes: bytes | None
) -> None:
    with out.open("wb") as handle:
        build_package(
            handle, manifest, io.BytesIO(image), f"firmware-{manifest['firmware_version']}.ota", key,
            release_notes=io.BytesIO(notes) if notes is not None else None,
            release_notes_name="release-notes.md" if notes is not None else None,
        )


def _write_private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def create_demo(directory: Path, port: int) -> Path:
    """Build the demo deployment in ``directory`` (new); return its config path."""
    config_path = init_deployment(directory, with_policy_examples=False)
    text = config_path.read_text().replace('listen = ["127.0.0.1:2222"]', f'listen = ["127.0.0.1:{port}"]')
    config_path.write_text(text)
    policies = directory / "policies"
    (policies / "organisations.toml").write_text(ORGANISATIONS)
    (policies / "roles.toml").write_text(ROLES)

    clients = directory / "clients"
    clients.mkdir(mode=0o700)
    users = []
    for name, (organisation, roles) in USERS.items():
        key = asyncssh.generate_private_key("ssh-ed25519", comment=f"{name}@cfl-demo")
        _write_private(clients / name, key.export_private_key())
        public = key.export_public_key().decode().strip()
        (clients / f"{name}.pub").write_text(public + "\n")
        users.append(
            f'[[user]]\nname = "{name}"\norganisation = "{organisation}"\nroles = {json.dumps(roles)}\n'
            f"keys = [{json.dumps(public)}]\n"
        )
    (policies / "users.toml").write_text("\n".join(users))

    estates = policies / "estates"
    estates.mkdir()
    today = dt.datetime.now(dt.UTC).date()
    switch = today + dt.timedelta(days=7)
    (estates / "northern-energy.csv").write_text(
        ESTATE_HEADER
        + "".join(f"E{n:07d},{','.join(ESME_MODEL)},00000100,\n" for n in range(1, 4))
        + f"E0000004,{','.join(ESME_MODEL)},,\n"
    )
    (estates / "southern-power.csv").write_text(
        ESTATE_HEADER
        + f"G0000001,{','.join(GSME_MODEL)},00000100,\n"
        # A Change of Supplier: this meter moves to Southern Power next week, with no policy edit on the day.
        + f"E0000003,{','.join(ESME_MODEL)},00000100,{switch.isoformat()}\n"
    )

    signing = ed25519.Ed25519PrivateKey.generate()
    manufacturer = directory / "manufacturer"
    manufacturer.mkdir(mode=0o700)
    _write_private(
        manufacturer / "acme-signing-key.pem",
        signing.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
    )
    keys_dir = policies / "manufacturer-keys" / MANUFACTURER_ID
    keys_dir.mkdir(parents=True)
    (keys_dir / "acme-2026.pem").write_bytes(
        signing.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    packages = directory / "packages"
    packages.mkdir()
    notes = b"# ESME firmware 00000200\n\nFixes a tariff-switching defect. Confidential until deployed.\n"
    first_image = ota_image(MANUFACTURER_ID, "00000200", 48 * 1024, b"esme-200")
    _package(packages / "esme-00000200.cfl", signing, _manifest(ESME_MODEL, "ESME", "00000200", "security-fix"),
             first_image, notes)
    _package(packages / "esme-00000300.cfl", signing, _manifest(ESME_MODEL, "ESME", "00000300", "defect-fix"),
             ota_image(MANUFACTURER_ID, "00000300", 64 * 1024, b"esme-300"), None)
    # The same version as the library's, with other bytes: held as a version conflict.
    _package(packages / "esme-00000200-rebuild.cfl", signing,
             _manifest(ESME_MODEL, "ESME", "00000200", "security-fix"),
             ota_image(MANUFACTURER_ID, "00000200", 40 * 1024, b"esme-200-rebuild"), None)
    _package(packages / "gsme-00000105.cfl", signing, _manifest(GSME_MODEL, "GSME", "00000105", "compliance"),
             ota_image(MANUFACTURER_ID, "00000105", 32 * 1024, b"gsme-105"), None)
    # Signed with a key nobody registered: rejected as bad-signature.
    _package(packages / "gsme-00000106-unsigned.cfl", ed25519.Ed25519PrivateKey.generate(),
             _manifest(GSME_MODEL, "GSME", "00000106", "compliance"),
             ota_image(MANUFACTURER_ID, "00000106", 32 * 1024, b"gsme-106"), None)

    config = load_config(config_path)
    deployment = Deployment.open(config)
    try:
        for seeded in ("esme-00000200.cfl", "gsme-00000105.cfl"):
            with (packages / seeded).open("rb") as source:
                upload = PackageUpload(deployment, Uploader("acme-release", "acme-meters", "demo-setup"), seeded)
                feed_chunks(upload, file_chunks(source))
    finally:
        deployment.close()
    return config_path


def write_known_hosts(directory: Path, port: int) -> Path:
    known = directory / "clients" / "known_hosts"
    lines = []
    for pub in sorted((directory / "keys").glob("ssh_host_*_key.pub")):
        lines.append(f"[127.0.0.1]:{port} {pub.read_text().split()[0]} {pub.read_text().split()[1]}")
    known.write_text("\n".join(lines) + "\n")
    return known


def instructions(directory: Path, port: int) -> str:
    d = directory.resolve()
    known = d / "clients" / "known_hosts"

    def sftp(user: str) -> str:
        return (f"sftp -P {port} -i {shlex.quote(str(d / 'clients' / user))} "
                f"-o UserKnownHostsFile={shlex.quote(str(known))} -o IdentitiesOnly=yes {user}@127.0.0.1")

    pkg = d / "packages"
    cli = shutil.which("cfl-sftp") or str(Path(sys.argv[0]).resolve())
    return f"""
cfl-sftp demo is serving {d} on 127.0.0.1:{port}. Try, in another terminal:

  # A Supplier's batch job: what Northern Energy may download (images, index.json, release notes)
  {sftp('northern-ops')} <<< 'ls -l /images/ESME/1A2B/0001/0100/00000200
get /images/index.json /tmp/index.json
get /images/ESME/1A2B/0001/0100/00000200/release-notes.md /tmp/release-notes.md'

  # Southern Power's gas team sees its GSME image and no ESME one (its ESME meter moves in a week)
  {sftp('southern-gas')} <<< 'ls /images
ls -l /images/GSME/1A2B/0002/0100/00000105
get /images/index.json /tmp/southern-index.json'

  # The manufacturer uploads a new version (accepted), a conflicting rebuild (held) and a bad signature
  # (rejected: the close fails, the receipt says why)
  {sftp('acme-release')} <<< 'put {pkg / 'esme-00000300.cfl'} /incoming/
put {pkg / 'esme-00000200-rebuild.cfl'} /incoming/
-put {pkg / 'gsme-00000106-unsigned.cfl'} /incoming/
ls -l /receipts
ls -l /held'
  # then read a receipt:  get /receipts/<upload_id>.json -   (inside sftp)

  # Operators:  {cli} library list --config {d / 'cfl-sftp.toml'}
  #             {cli} held list --config {d / 'cfl-sftp.toml'}

Stop with Ctrl-C.
"""


def run_demo(directory: Path, port: int, *, serve: bool = True) -> int:
    configure_logging(level="warning")
    if not (directory / "cfl-sftp.toml").exists():
        print(f"creating the demo in {directory} ...")
        create_demo(directory, port)
    else:
        text = (directory / "cfl-sftp.toml").read_text()
        text = re.sub(r'listen = \["127\.0\.0\.1:\d+"\]', f'listen = ["127.0.0.1:{port}"]', text)
        (directory / "cfl-sftp.toml").write_text(text)
    write_known_hosts(directory, port)
    print(instructions(directory, port))
    if not serve:
        return 0
    return serve_config(load_config(directory / "cfl-sftp.toml"))


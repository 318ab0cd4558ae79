"""The ``cfl-sftp`` command as an operator runs it: a real process, real files, exit codes of SPEC 10."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cfl_sftp.intake import PackageUpload, Uploader
from tests.deployments import DeploymentUnderTest, make_deployment
from tests.factory import (
    SIGNING_KEY,
    PackageSpec,
    build,
    image_of,
    manifest_fields,
    new_ed25519_key,
    private_pem,
    public_pem,
)


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cfl_sftp.cli", *args],
        check=False, capture_output=True, text=True, timeout=120, cwd=cwd,
    )


def feed(td: DeploymentUnderTest, package: bytes, name: str = "p.cfl") -> None:
    job = PackageUpload(td.deployment, Uploader("acme-release", "acme-meters", "test"), name)
    job.write(package)
    job.complete()


def test_help_lists_every_command() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for command in ("demo", "init", "serve", "package", "policy", "library", "held", "audit", "vault", "db"):
        assert command in result.stdout


def test_usage_error_exits_2() -> None:
    assert cli("library", "frobnicate").returncode == 2


def test_init_makes_a_deployment_and_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    target = tmp_path / "new"
    assert cli("init", str(target)).returncode == 0
    assert (target / "cfl-sftp.toml").is_file()
    assert (target / "keys" / "vault.keyring").stat().st_mode & 0o777 == 0o600
    assert (target / "data" / "cfl-sftp.sqlite3").is_file()
    again = cli("init", str(target))
    assert again.returncode == 1
    assert "not empty" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_package_build_then_verify(tmp_path: Path) -> None:
    spec = PackageSpec()
    fields = {k: v for k, v in manifest_fields(spec).items() if k not in ("image", "release_notes")}
    (tmp_path / "manifest.json").write_text(json.dumps(fields))
    (tmp_path / "firmware.bin").write_bytes(image_of(spec))
    (tmp_path / "notes.md").write_text("# Notes\n")
    (tmp_path / "key.pem").write_bytes(private_pem(SIGNING_KEY))
    keys = tmp_path / "keys" / "1A2B"
    keys.mkdir(parents=True)
    (keys / "acme.pem").write_bytes(public_pem(SIGNING_KEY))
    out = tmp_path / "out.cfl"
    built = cli("package", "build", "--manifest", str(tmp_path / "manifest.json"), "--image",
                str(tmp_path / "firmware.bin"), "--release-notes", str(tmp_path / "notes.md"),
                "--key", str(tmp_path / "key.pem"), "-o", str(out))
    assert built.returncode == 0, built.stderr
    verified = cli("package", "verify", str(out), "--keys", str(tmp_path / "keys"))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "ESME" in verified.stdout


def test_package_verify_names_the_reason_and_exits_1(tmp_path: Path) -> None:
    keys = tmp_path / "keys" / "1A2B"
    keys.mkdir(parents=True)
    (keys / "acme.pem").write_bytes(public_pem(SIGNING_KEY))
    package = tmp_path / "foreign.cfl"
    package.write_bytes(build(PackageSpec(key=new_ed25519_key())))
    result = cli("package", "verify", str(package), "--keys", str(tmp_path / "keys"))
    assert result.returncode == 1
    assert result.stderr.strip() == "bad-signature"


def test_library_list_json_describes_each_image(tmp_path: Path) -> None:
    td = make_deployment(tmp_path)
    feed(td, build(PackageSpec()))
    result = cli("library", "list", "--json", "--config", str(td.config_path))
    assert result.returncode == 0, result.stderr
    [item] = json.loads(result.stdout)
    assert item["path"] == "/images/ESME/1A2B/0001/0100/00000010/firmware.bin"
    assert item["retired"] is False
    assert set(item) == {"path", "sha256", "size", "device_type", "manufacturer_id", "model_id",
                         "hardware_version", "firmware_version", "purpose", "upload_id", "added_at", "retired"}


def test_held_list_release_and_purge(tmp_path: Path) -> None:
    td = make_deployment(tmp_path)
    feed(td, build(PackageSpec()), "a.cfl")
    feed(td, build(PackageSpec(variant=1)), "b.cfl")
    feed(td, build(PackageSpec(firmware_version="00000011")), "c.cfl")
    feed(td, build(PackageSpec(firmware_version="00000011")), "d.cfl")
    config = str(td.config_path)
    listed = cli("held", "list", "--config", config)
    assert listed.returncode == 0
    lines = listed.stdout.strip().splitlines()
    conflict = next(line.split()[0] for line in lines if "version-conflict" in line)
    duplicate = next(line.split()[0] for line in lines if "duplicate-image" in line)

    refused = cli("held", "release", duplicate, "--reason", "x", "--config", config)
    assert refused.returncode == 1
    assert "only a version-conflict" in refused.stderr
    assert cli("held", "release", conflict, "--reason", "rebuilt by the manufacturer", "--config",
               config).returncode == 0
    assert cli("held", "purge", duplicate, "--config", config).returncode == 0
    assert cli("held", "list", "--config", config).stdout.strip() == "no held packages"
    assert cli("held", "purge", "nope", "--config", config).returncode == 1


def test_policy_check_prints_file_line_reason(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "users.toml").write_text('[[user]]\nname = "x"\norganisation = "nowhere"\nroles = []\nkeys = []\n')
    result = cli("policy", "check", str(policies))
    assert result.returncode == 1
    assert result.stderr.startswith("users.toml:1:")


def test_db_upgrade_is_idempotent(tmp_path: Path) -> None:
    td = make_deployment(tmp_path)
    result = cli("db", "upgrade", "--config", str(td.config_path))
    assert result.returncode == 0
    assert "database at revision" in result.stdout


@pytest.mark.parametrize("command", [["library", "list"], ["held", "list"]])
def test_missing_config_is_a_one_line_refusal(tmp_path: Path, command: list[str]) -> None:
    result = cli(*command, "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1

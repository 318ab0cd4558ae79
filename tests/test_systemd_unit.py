"""``systemd/cfl-sftp.service`` (SPEC 9): how systemd starts, reloads and stops the service, and its sandbox.

What the unit promises is checked against the code that keeps the promise: the signals and notifications it
relies on are driven for real in ``tests/test_service_lifecycle.py``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cfl_sftp.config import SessionLimits
from cfl_sftp.service import SESSION_END_SECONDS

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "cfl-sftp.service"
MAX_EXPOSURE = 1.5  # SPEC 9; Debian's own ssh.service rates 9.6


def unit_settings(section: str) -> dict[str, list[str]]:
    """``Key=value`` lines of one section; a key may repeat (``LoadCredential=``), so each maps to a list."""
    settings: dict[str, list[str]] = {}
    current = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        if current == section:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_unit_is_notify_reloads_with_sighup_and_leaves_time_for_a_graceful_stop() -> None:
    service = unit_settings("Service")
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]  # only the service itself may say READY
    assert re.fullmatch(r"\S*kill -HUP \$MAINPID", service["ExecReload"][0])
    assert service["ExecStart"][0].endswith("cfl-sftp serve")
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["KillMode"] == ["mixed"]
    stop_seconds = int(service["TimeoutStopSec"][0])
    assert stop_seconds > SessionLimits().stop_timeout_seconds + SESSION_END_SECONDS


def test_the_unit_runs_as_its_own_user_with_keys_as_credentials_no_core_and_no_swap() -> None:
    service = unit_settings("Service")
    assert service["User"] == ["cfl-sftp"]
    assert service["Group"] == ["cfl-sftp"]
    credentials = {value.split(":", 1)[0] for value in service["LoadCredential"]}
    assert credentials == {"vault.keyring", "audit.key", "ssh_host_ed25519_key", "ssh_host_rsa_key"}
    assert all(":/etc/cfl-sftp/credentials/" in value for value in service["LoadCredential"])
    assert service["LimitCORE"] == ["0"]  # release notes are plaintext in memory while they are served
    assert service["MemorySwapMax"] == ["0"]
    header = UNIT.read_text()
    # The configuration the unit's header gives names each credential where systemd puts it.
    assert 'vault_key = "credential:vault.keyring"' in header
    for name in credentials - {"vault.keyring"}:
        assert f"/run/credentials/cfl-sftp.service/{name}" in header


def test_systemd_analyze_rates_the_sandbox_at_most_1_5() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    found = re.search(r"Overall exposure level for cfl-sftp\.service: (\d+(?:\.\d+)?)", result.stdout)
    assert found, result.stdout[-2000:] + result.stderr[-2000:]
    assert float(found.group(1)) <= MAX_EXPOSURE

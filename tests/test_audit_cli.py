"""``cfl-sftp audit verify|prove|export`` as an operator runs them, and the recipes ``docs/audit.md`` gives
auditors, run exactly as written there against real output."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cfl_sftp.audit_trail import AuditSigner
from cfl_sftp.cli import main
from tests.deployments import DeploymentUnderTest
from tests.test_audit_trail import T0, append, checkpoint, edit_entry, entry_bytes, upload_packages

DOCS = Path(__file__).parent.parent / "docs" / "audit.md"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cfl_sftp.cli", *args],
        check=False, capture_output=True, text=True, timeout=120, cwd=cwd,
    )


def audit(td: DeploymentUnderTest, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("audit", *args, "--config", str(td.config_path))


def recipe(title: str) -> str:
    """The fenced code block of docs/audit.md whose first line is ``# <title> ...``."""
    blocks = re.findall(r"^```(?:python|sh)\n(.*?)^```", DOCS.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    found = [b for b in blocks if b.startswith(f"# {title} ")]
    assert len(found) == 1, f"docs/audit.md has no single block starting with # {title}"
    return found[0]


def run_recipe(title: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = cwd / title
    script.write_text(recipe(title), encoding="utf-8")
    if title.endswith(".py"):
        argv = [sys.executable, str(script), *args]
    else:
        for tool in ("jq", "xxd", "sha256sum", "openssl", "base64"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is not installed")
        argv = ["sh", str(script), *args]
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120, cwd=cwd)


# -- the commands ----------------------------------------------------------------------------------------


def test_help_lists_the_audit_commands() -> None:
    result = cli("audit", "--help")
    assert result.returncode == 0
    for command in ("verify", "prove", "export"):
        assert command in result.stdout
    assert "audit" in cli("--help").stdout


def test_verify_of_an_untouched_trail_exits_0_and_reports_uncovered_entries(td: DeploymentUnderTest) -> None:
    upload_packages(td, 2)
    append(td, 6)
    checkpoint(td)
    append(td, 3)

    result = audit(td, "verify")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # quiet in scripts: no progress bar when stderr is not a terminal
    assert "audit trail verified: 11 entries, 1 checkpoint(s)" in result.stdout
    assert "seq 9 to 11 (3 entries) not yet covered by a checkpoint" in result.stdout


@pytest.mark.sqlite_only
def test_verify_of_a_changed_entry_exits_1_naming_its_seq(td: DeploymentUnderTest) -> None:
    append(td, 10)
    checkpoint(td)
    edit_entry(td, 4)

    result = audit(td, "verify")

    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "audit trail does not verify: first bad entry: seq 4 " in result.stderr


@pytest.mark.sqlite_only
def test_verify_of_a_removed_entry_exits_1_naming_its_seq(td: DeploymentUnderTest) -> None:
    import sqlite3

    append(td, 10)
    checkpoint(td)
    with sqlite3.connect(td.deployment.config.database_url.removeprefix("sqlite:///")) as db:
        db.execute("DELETE FROM audit_entries WHERE seq = 9")

    result = audit(td, "verify")

    assert result.returncode == 1
    assert "first bad entry: seq 9 (missing: removed)" in result.stderr


def test_verify_draws_progress_only_on_a_terminal(
    td: DeploymentUnderTest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    append(td, 5)
    checkpoint(td)
    assert main(["audit", "verify", "--config", str(td.config_path)]) == 0
    assert capsys.readouterr().err == ""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["audit", "verify", "--config", str(td.config_path)]) == 0
    assert "verifying 5 / 5 entries (100%)" in terminal.getvalue()


def test_verify_refuses_an_audit_key_others_can_read(td: DeploymentUnderTest) -> None:
    append(td, 1)
    td.deployment.config.audit_key.chmod(0o644)

    result = audit(td, "verify")

    assert result.returncode == 1
    assert "chmod 600" in result.stderr


@pytest.mark.sqlite_only
def test_prove_prints_the_proof_as_json(td: DeploymentUnderTest) -> None:
    append(td, 9)
    checkpoint(td)

    result = audit(td, "prove", "4")

    assert result.returncode == 0, result.stderr
    proof = json.loads(result.stdout)
    assert set(proof) == {"seq", "leaf_index", "tree_size", "entry", "leaf_hash", "inclusion_path", "root_hash",
                          "checkpoint"}
    assert (proof["seq"], proof["leaf_index"], proof["tree_size"]) == (4, 3, 9)
    assert proof["entry"].encode() == entry_bytes(td, 4)


def test_prove_exits_1_when_no_checkpoint_covers_the_entry(td: DeploymentUnderTest) -> None:
    append(td, 3)
    checkpoint(td)
    append(td, 1)

    result = audit(td, "prove", "4")

    assert result.returncode == 1
    assert result.stdout == ""
    assert "no checkpoint covers seq 4" in result.stderr


@pytest.mark.sqlite_only
def test_export_prints_the_exact_bytes_from_a_seq_or_a_time(
    td: DeploymentUnderTest, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    append(td, 2, T0)
    append(td, 2, T0.replace(hour=14))
    every = [entry_bytes(td, seq) for seq in range(1, 5)]

    assert main(["audit", "export", "--config", str(td.config_path)]) == 0
    assert capsysbinary.readouterr().out == b"".join(e + b"\n" for e in every)
    assert main(["audit", "export", "--since", "2", "--config", str(td.config_path)]) == 0
    assert capsysbinary.readouterr().out == b"".join(e + b"\n" for e in every[1:])
    assert main(["audit", "export", "--since", "2026-03-01T13:00:00Z", "--config", str(td.config_path)]) == 0
    assert capsysbinary.readouterr().out == b"".join(e + b"\n" for e in every[2:])


def test_export_refuses_a_since_that_is_neither_seq_nor_time(td: DeploymentUnderTest) -> None:
    result = audit(td, "export", "--since", "last tuesday")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--since" in result.stderr


# -- the recipes of docs/audit.md ------------------------------------------------------------------------


@pytest.fixture
def proof_file(td: DeploymentUnderTest, tmp_path: Path) -> Path:
    upload_packages(td, 1)
    append(td, 12)
    checkpoint(td)
    result = audit(td, "prove", "6")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "proof.json"
    path.write_text(result.stdout, encoding="utf-8")
    return path


def forge(proof_file: Path) -> Path:
    proof = json.loads(proof_file.read_text(encoding="utf-8"))
    proof["entry"] = proof["entry"].replace("operator", "intruder")
    # The forger recomputes the leaf hash too: what gives it away is the path, which it cannot forge.
    proof["leaf_hash"] = hashlib.sha256(b"\x00" + proof["entry"].encode()).hexdigest()
    forged = proof_file.with_name("forged.json")
    forged.write_text(json.dumps(proof), encoding="utf-8")
    return forged


@pytest.mark.parametrize("title", ["check-proof.py", "check-proof.sh"])
def test_documented_proof_check_accepts_a_real_proof(title: str, proof_file: Path, tmp_path: Path) -> None:
    result = run_recipe(title, str(proof_file), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "seq 6 is" in result.stdout


@pytest.mark.parametrize("title", ["check-proof.py", "check-proof.sh"])
def test_documented_proof_check_refuses_a_changed_entry(title: str, proof_file: Path, tmp_path: Path) -> None:
    result = run_recipe(title, str(forge(proof_file)), cwd=tmp_path)
    assert result.returncode != 0
    assert "root differs" in result.stdout + result.stderr


def test_documented_proof_check_refuses_a_proof_for_another_root(proof_file: Path, tmp_path: Path) -> None:
    proof = json.loads(proof_file.read_text(encoding="utf-8"))
    proof["inclusion_path"][0] = "00" * 32
    proof_file.write_text(json.dumps(proof), encoding="utf-8")
    for title in ("check-proof.py", "check-proof.sh"):
        result = run_recipe(title, str(proof_file), cwd=tmp_path)
        assert result.returncode != 0
        assert "root differs" in result.stdout + result.stderr


@pytest.mark.parametrize("title", ["check-checkpoint.py", "check-checkpoint.sh"])
def test_documented_signature_check_accepts_the_served_note(
    title: str, td: DeploymentUnderTest, tmp_path: Path
) -> None:
    append(td, 5)
    (tmp_path / "latest").write_text(checkpoint(td).note, encoding="utf-8")
    (tmp_path / "key.vkey").write_text(AuditSigner.load(td.deployment.config).vkey + "\n", encoding="utf-8")

    result = run_recipe(title, "latest", "key.vkey", cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("title", ["check-checkpoint.py", "check-checkpoint.sh"])
def test_documented_signature_check_refuses_a_changed_note(
    title: str, td: DeploymentUnderTest, tmp_path: Path
) -> None:
    append(td, 5)
    note = checkpoint(td).note
    (tmp_path / "latest").write_text(note.replace("\n5\n", "\n6\n", 1), encoding="utf-8")
    (tmp_path / "key.vkey").write_text(AuditSigner.load(td.deployment.config).vkey + "\n", encoding="utf-8")

    result = run_recipe(title, "latest", "key.vkey", cwd=tmp_path)

    assert result.returncode != 0

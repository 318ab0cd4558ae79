"""Loading and validating ``policies/`` (SPEC 6): every problem reported with its file, line and reason."""

from __future__ import annotations

import base64
import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from cfl_sftp.domain.entitlement import build_estate_view
from cfl_sftp.domain.errors import PolicyError, PolicyProblem
from cfl_sftp.domain.model import DeviceModel, DeviceType, OrganisationKind, Role
from cfl_sftp.policy import load_manufacturer_keys, load_policy_set, parse_public_key_line, policy_digest
from cfl_sftp.policy import loader as loader_module

EXAMPLE_SET = Path(__file__).resolve().parent.parent / "policies"
HEADER = "device_id,manufacturer_id,model_id,hardware_version,firmware_version,since\n"
ESME = DeviceModel("1A2B", "0001", "0100")
TODAY = dt.date(2026, 11, 24)


def openssh_key(comment: str = "someone@example") -> str:
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}"


def public_pem() -> bytes:
    return (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


ALICE_KEY = openssh_key("alice@example")

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
may_upload_for = ["3C4D"]

[[organisation]]
id = "meterco"
name = "MeterCo"
kind = "map"
may_upload_for = ["1A2B"]

[[organisation]]
id = "industry-audit"
name = "Industry Audit"
kind = "auditor"
"""

USERS = f"""\
[[user]]
name = "alice"
organisation = "northern-energy"
roles = ["import-supplier"]
keys = ["{ALICE_KEY}"]

[[user]]
name = "bob"
organisation = "southern-power"
roles = ["gas-supplier"]
keys = []
enabled = false
"""

ROLES = """\
[roles.import-supplier]
device_types = ["ESME", "CHF"]

[roles.gas-supplier]
device_types = ["GSME", "GPF"]
"""


def write_set(directory: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return directory


def valid_files(extra: dict[str, str | bytes] | None = None, **toml: str | bytes) -> dict[str, str | bytes]:
    """The valid set above; ``users=...`` replaces ``users.toml``, ``extra`` adds or replaces any file."""
    files: dict[str, str | bytes] = {
        "organisations.toml": ORGANISATIONS,
        "users.toml": USERS,
        "roles.toml": ROLES,
    }
    files.update({f"{name}.toml": content for name, content in toml.items()})
    files.update(extra or {})
    return files


def problems_of(directory: Path) -> list[PolicyProblem]:
    with pytest.raises(PolicyError) as caught:
        load_policy_set(directory, today=TODAY)
    return caught.value.errors


def only_problem(directory: Path) -> PolicyProblem:
    problems = problems_of(directory)
    assert len(problems) == 1, problems
    return problems[0]


# -- valid sets -----------------------------------------------------------------------------------------------


def test_the_example_policy_set_in_the_repository_loads_cleanly() -> None:
    snapshot = load_policy_set(EXAMPLE_SET, today=TODAY)

    assert snapshot.organisation("acme-meters") is not None
    assert snapshot.user("northern-ops") is not None
    assert snapshot.user("northern-leaver") is None  # disabled in the example
    assert snapshot.keys_for_manufacturer("1A2B")
    assert snapshot.next_transition == dt.date(2027, 1, 4)


def test_an_empty_policy_folder_is_valid_and_lets_nobody_in(tmp_path: Path) -> None:
    snapshot = load_policy_set(tmp_path, today=TODAY)

    assert snapshot.users == {}
    assert snapshot.user("alice") is None
    assert snapshot.organisation("northern-energy") is None
    assert not snapshot.may_upload_for("acme-meters", "1A2B")
    assert snapshot.keys_for_manufacturer("1A2B") == ()
    assert not snapshot.in_product_list(ESME, "00000001", "0" * 64)
    assert build_estate_view(snapshot, TODAY).lowest_firmware == {}
    assert snapshot.next_transition is None


def test_a_missing_policy_folder_is_refused(tmp_path: Path) -> None:
    problem = only_problem(tmp_path / "nowhere")

    assert (problem.file, problem.line) == (".", 1)


def test_a_valid_set_is_read_into_the_snapshot(tmp_path: Path) -> None:
    snapshot = load_policy_set(write_set(tmp_path, valid_files()), today=TODAY)

    alice = snapshot.user("alice")
    assert alice is not None
    assert alice.organisation == "northern-energy"
    assert alice.roles == frozenset({Role.IMPORT_SUPPLIER})
    assert alice.enabled
    assert snapshot.roles[Role.GAS_SUPPLIER] == frozenset({DeviceType.GSME, DeviceType.GPF})
    northern = snapshot.organisation("northern-energy")
    assert northern is not None
    assert northern.kind is OrganisationKind.SUPPLIER


def test_user_keys_are_kept_as_type_and_base64_without_the_comment(tmp_path: Path) -> None:
    snapshot = load_policy_set(write_set(tmp_path, valid_files()), today=TODAY)

    alice = snapshot.user("alice")
    assert alice is not None
    assert alice.keys == (" ".join(ALICE_KEY.split()[:2]),)


def test_a_disabled_user_is_known_but_not_let_in(tmp_path: Path) -> None:
    snapshot = load_policy_set(write_set(tmp_path, valid_files()), today=TODAY)

    assert "bob" in snapshot.users
    assert snapshot.user("bob") is None


def test_manufacturers_upload_for_their_own_ids_and_others_only_for_ids_granted(tmp_path: Path) -> None:
    snapshot = load_policy_set(write_set(tmp_path, valid_files()), today=TODAY)

    assert snapshot.may_upload_for("acme-meters", "1A2B")
    assert not snapshot.may_upload_for("acme-meters", "3C4D")
    assert snapshot.may_upload_for("meterco", "1A2B")
    assert snapshot.may_upload_for("southern-power", "3C4D")
    assert not snapshot.may_upload_for("northern-energy", "1A2B")
    assert not snapshot.may_upload_for("industry-audit", "1A2B")
    assert not snapshot.may_upload_for("no-such-organisation", "1A2B")


def test_readme_hidden_and_backup_files_are_ignored(tmp_path: Path) -> None:
    files = valid_files({"README.md": "# notes\n", ".git/HEAD": "ref\n", "users.toml~": "junk ["})
    snapshot = load_policy_set(write_set(tmp_path, files), today=TODAY)

    assert snapshot.user("alice") is not None


def test_a_utf8_byte_order_mark_and_crlf_line_ends_are_accepted(tmp_path: Path) -> None:
    estate = ("\ufeff" + HEADER + "E1,1A2B,0001,0100,00000100,\n").replace("\n", "\r\n")
    files = valid_files({"estates/northern-energy.csv": estate.encode("utf-8")})
    snapshot = load_policy_set(write_set(tmp_path, files), today=TODAY)

    assert build_estate_view(snapshot, TODAY).holds("northern-energy", ESME)


# -- TOML files -----------------------------------------------------------------------------------------------


def test_a_toml_syntax_error_is_reported_on_its_line(tmp_path: Path) -> None:
    users = '[[user]]\nname = "alice"\norganisation = \nroles = []\n'
    problem = only_problem(write_set(tmp_path, valid_files(users=users)))

    assert (problem.file, problem.line) == ("users.toml", 3)
    assert problem.reason.startswith("invalid TOML: ")


def test_a_toml_error_at_the_end_of_the_file_is_reported_on_its_last_line(tmp_path: Path) -> None:
    problem = only_problem(write_set(tmp_path, valid_files(roles="# roles\n[roles.import-supplier\n")))

    assert (problem.file, problem.line) == ("roles.toml", 2)


def test_invalid_utf8_is_reported_on_the_line_of_the_bad_byte(tmp_path: Path) -> None:
    users = USERS.encode().replace(b'"alice"', b'"al\xffice"')
    problem = only_problem(write_set(tmp_path, valid_files(users=users)))

    assert problem == PolicyProblem("users.toml", 2, "not valid UTF-8")


def test_an_unknown_key_is_reported_at_its_tables_header(tmp_path: Path) -> None:
    users = USERS.replace('roles = ["gas-supplier"]', 'roles = ["gas-supplier"]\ncolour = "blue"')
    problem = only_problem(write_set(tmp_path, valid_files(users=users)))

    assert (problem.file, problem.line) == ("users.toml", 7)
    assert "unknown key 'colour'" in problem.reason


def test_an_unknown_top_level_table_is_reported_on_its_line(tmp_path: Path) -> None:
    problem = only_problem(write_set(tmp_path, valid_files(users=USERS + '\n[[users]]\nname = "x"\n')))

    assert (problem.file, problem.line) == ("users.toml", 14)
    assert "unknown key 'users'" in problem.reason


def test_a_missing_required_key_is_reported(tmp_path: Path) -> None:
    problem = only_problem(write_set(tmp_path, valid_files(users='[[user]]\nname = "carol"\nroles = []\n')))

    assert problem == PolicyProblem("users.toml", 1, "missing key 'organisation'")


def test_a_value_of_the_wrong_type_is_reported(tmp_path: Path) -> None:
    users = USERS.replace("enabled = false", 'enabled = "no"')
    problem = only_problem(write_set(tmp_path, valid_files(users=users)))

    assert problem == PolicyProblem("users.toml", 7, "'enabled' must be true or false")


def test_a_user_of_an_unknown_organisation_is_refused(tmp_path: Path) -> None:
    users = USERS.replace('organisation = "southern-power"', 'organisation = "western-gas"')
    problem = only_problem(write_set(tmp_path, valid_files(users=users)))

    assert problem == PolicyProblem("users.toml", 7, "unknown organisation 'western-gas'")


def test_a_duplicate_user_is_reported_at_its_second_table(tmp_path: Path) -> None:
    users = USERS + '\n[[user]]\nname = "alice"\norganisation = "southern-power"\nroles = []\n'
    problem = only_problem(write_set(tmp_path, valid_files(users=users)))

    assert problem == PolicyProblem("users.toml", 14, "duplicate user 'alice' (first at line 1)")


@pytest.mark.parametrize("name", ["Alice", "-alice", "alice smith", "a" * 65, ""])
def test_a_user_name_outside_the_allowed_pattern_is_refused(tmp_path: Path, name: str) -> None:
    problem = only_problem(write_set(tmp_path, valid_files(users=USERS.replace('"alice"', f'"{name}"'))))

    assert (problem.file, problem.line) == ("users.toml", 1)
    assert "does not match" in problem.reason


def test_an_unknown_role_is_refused(tmp_path: Path) -> None:
    users = USERS.replace('["gas-supplier"]', '["gas-supplier", "admin"]')
    problem = only_problem(write_set(tmp_path, valid_files(users=users)))

    assert (problem.file, problem.line) == ("users.toml", 7)
    assert problem.reason.startswith("unknown role 'admin'")


def test_roles_that_do_not_fit_the_organisation_kind_are_allowed(tmp_path: Path) -> None:
    users = USERS.replace('roles = ["gas-supplier"]', 'roles = ["gas-supplier", "auditor", "uploader"]')
    snapshot = load_policy_set(write_set(tmp_path, valid_files(users=users)), today=TODAY)

    assert "bob" in snapshot.users


def test_a_malformed_key_line_is_refused(tmp_path: Path) -> None:
    users = USERS.replace("keys = []", 'keys = ["ssh-ed25519 AAAA!!notbase64 bob@example"]')
    problem = only_problem(write_set(tmp_path, valid_files(users=users)))

    assert problem == PolicyProblem("users.toml", 7, "key 1: key data is not valid base64")


def test_a_key_whose_data_is_of_another_type_is_refused(tmp_path: Path) -> None:
    blob = ALICE_KEY.split()[1]
    users = USERS.replace("keys = []", f'keys = ["ecdsa-sha2-nistp256 {blob}"]')
    problem = only_problem(write_set(tmp_path, valid_files(users=users)))

    assert problem == PolicyProblem("users.toml", 7, "key 1: key data does not match its key type")


def test_a_key_with_options_is_refused(tmp_path: Path) -> None:
    users = USERS.replace("keys = []", f"keys = ['from=\"10.0.0.1\",no-pty {ALICE_KEY}']")
    problem = only_problem(write_set(tmp_path, valid_files(users=users)))

    assert (problem.file, problem.line) == ("users.toml", 7)
    assert problem.reason.startswith("key 1: key options are not allowed")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("", "empty key line"),
        ("ssh-ed25519", "key data missing"),
        ("ssh-dss AAAAB3NzaC1kc3M= old@example", "unknown key type 'ssh-dss'"),
        ("ssh-ed25519-cert-v01@openssh.com AAAA", "a certificate is not a key"),
        ("-----BEGIN OPENSSH PRIVATE KEY----- b3BlbnNzaC1rZXktdjE=", "this is a private key"),
    ],
)
def test_each_kind_of_bad_key_line_has_its_reason(line: str, reason: str) -> None:
    with pytest.raises(ValueError, match=r"^" + reason.replace("(", r"\(")):
        parse_public_key_line(line)


def test_a_truncated_ed25519_key_is_refused() -> None:
    blob = base64.b64decode(ALICE_KEY.split()[1])[:-1]

    with pytest.raises(ValueError, match="truncated"):
        parse_public_key_line(f"ssh-ed25519 {base64.b64encode(blob).decode()}")


def test_an_rsa_key_shorter_than_2048_bits_is_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()

    with pytest.raises(ValueError, match="at least 2048 bits"):
        parse_public_key_line(line)


def test_a_key_problem_never_quotes_the_key_data(tmp_path: Path) -> None:
    secret = "-----BEGIN OPENSSH PRIVATE KEY-----b3BlbnNzaC1rZXktdjEAAAAABG5vbmU"
    users = USERS.replace("keys = []", f'keys = ["{secret}"]')
    problem = only_problem(write_set(tmp_path, valid_files(users=users)))

    assert "b3BlbnNzaC1rZXktdjE" not in problem.reason


def test_organisation_fields_are_validated(tmp_path: Path) -> None:
    organisations = ORGANISATIONS + (
        '\n[[organisation]]\nid = "Bad_Id"\nname = "x"\nkind = "vendor"\n'
        '\n[[organisation]]\nid = "lower-hex"\nname = "x"\nkind = "manufacturer"\nmanufacturer_ids = ["1a2b"]\n'
        '\n[[organisation]]\nid = "own-ids"\nname = "x"\nkind = "supplier"\nmanufacturer_ids = ["5E6F"]\n'
    )
    problems = problems_of(write_set(tmp_path, valid_files(organisations=organisations)))

    assert [(p.line, p.reason.split(" (")[0]) for p in problems] == [
        (29, "unknown kind 'vendor'"),
        (29, "id 'Bad_Id' is not a slug"),
        (34, "'manufacturer_ids': '1a2b' is not a manufacturer id"),
        (40, "'manufacturer_ids' is for manufacturer organisations"),
    ]


def test_a_duplicate_organisation_id_is_refused(tmp_path: Path) -> None:
    organisations = ORGANISATIONS + '\n[[organisation]]\nid = "meterco"\nname = "Again"\nkind = "map"\n'
    problem = only_problem(write_set(tmp_path, valid_files(organisations=organisations)))

    assert problem == PolicyProblem("organisations.toml", 29, "duplicate organisation id 'meterco' (first at line 18)")


def test_a_manufacturer_id_belongs_to_one_manufacturer_only(tmp_path: Path) -> None:
    organisations = ORGANISATIONS + (
        '\n[[organisation]]\nid = "copycat"\nname = "C"\nkind = "manufacturer"\nmanufacturer_ids = ["1A2B"]\n'
    )
    problem = only_problem(write_set(tmp_path, valid_files(organisations=organisations)))

    assert problem == PolicyProblem(
        "organisations.toml", 29, "manufacturer id 1A2B already belongs to organisation 'acme-meters'"
    )


def test_roles_toml_accepts_only_supplier_roles_and_known_device_types(tmp_path: Path) -> None:
    roles = ROLES + '\n[roles.uploader]\ndevice_types = ["ESME"]\n\n[roles.boss]\ndevice_types = []\n'
    roles = roles.replace('["GSME", "GPF"]', '["GSME", "WATER"]')
    problems = problems_of(write_set(tmp_path, valid_files(roles=roles)))

    assert [(p.line, p.reason.split(" (")[0]) for p in problems] == [
        (4, "unknown device type 'WATER'"),
        (7, "only the supplier roles"),
        (10, "unknown role 'boss'"),
    ]


# -- other files ----------------------------------------------------------------------------------------------


def test_an_unknown_file_or_folder_in_the_set_is_an_error(tmp_path: Path) -> None:
    files = valid_files({"revoked-keys.txt": "SHA256:x\n", "archive/old.toml": ""})
    problems = problems_of(write_set(tmp_path, files))

    assert [(p.file, p.line) for p in problems] == [("archive", 1), ("revoked-keys.txt", 1)]


def test_an_unreadable_file_is_reported_at_line_1(tmp_path: Path) -> None:
    write_set(tmp_path, valid_files())
    (tmp_path / "users.toml").unlink()
    (tmp_path / "users.toml").mkdir()
    problem = only_problem(tmp_path)

    assert (problem.file, problem.line) == ("users.toml", 1)
    assert problem.reason.startswith("cannot read: ")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files of mode 000")
def test_a_file_without_read_permission_is_reported_at_line_1(tmp_path: Path) -> None:
    write_set(tmp_path, valid_files())
    (tmp_path / "roles.toml").chmod(0)
    try:
        problem = only_problem(tmp_path)
    finally:
        (tmp_path / "roles.toml").chmod(0o644)

    assert problem == PolicyProblem("roles.toml", 1, "cannot read: Permission denied")


def test_an_unreadable_organisations_file_does_not_make_every_user_unknown(tmp_path: Path) -> None:
    problem = only_problem(write_set(tmp_path, valid_files(organisations="[[organisation]\n")))

    assert problem.file == "organisations.toml"


def test_manufacturer_keys_are_read_by_manufacturer_id(tmp_path: Path) -> None:
    files = valid_files({"manufacturer-keys/1A2B/a.pem": public_pem(), "manufacturer-keys/1A2B/b.pem": public_pem()})
    snapshot = load_policy_set(write_set(tmp_path, files), today=TODAY)

    assert len(snapshot.keys_for_manufacturer("1A2B")) == 2
    assert snapshot.keys_for_manufacturer("3C4D") == ()


def test_a_malformed_manufacturer_key_is_reported_naming_its_file(tmp_path: Path) -> None:
    files = valid_files({"manufacturer-keys/1A2B/broken.pem": b"-----BEGIN PUBLIC KEY-----\nAAAA\n"})
    problem = only_problem(write_set(tmp_path, files))

    assert problem == PolicyProblem("manufacturer-keys/1A2B/broken.pem", 1, "not a valid PEM public key")


def test_manufacturer_keys_live_in_folders_named_by_manufacturer_id(tmp_path: Path) -> None:
    files = valid_files({"manufacturer-keys/acme/a.pem": public_pem(), "manufacturer-keys/1A2B/a.crt": b""})
    problems = problems_of(write_set(tmp_path, files))

    assert [(p.file, p.line) for p in problems] == [
        ("manufacturer-keys/1A2B/a.crt", 1),
        ("manufacturer-keys/acme", 1),
    ]


def test_load_manufacturer_keys_reads_a_keys_folder_on_its_own(tmp_path: Path) -> None:
    (tmp_path / "keys" / "1A2B").mkdir(parents=True)
    (tmp_path / "keys" / "1A2B" / "k.pem").write_bytes(public_pem())

    assert list(load_manufacturer_keys(tmp_path / "keys")) == ["1A2B"]
    assert load_manufacturer_keys(tmp_path / "missing") == {}


def test_the_product_list_is_read_and_answers_by_model_version_and_hash(tmp_path: Path) -> None:
    digest = "AB" * 32
    product_list = (
        f"manufacturer_id,model_id,hardware_version,firmware_version,image_sha256\n1A2B,0001,0100,00000200,{digest}\n"
    )
    snapshot = load_policy_set(write_set(tmp_path, valid_files({"product-list.csv": product_list})), today=TODAY)

    assert snapshot.in_product_list(ESME, "00000200", digest.lower())
    assert not snapshot.in_product_list(ESME, "00000201", digest.lower())


def test_bad_product_list_rows_are_reported_on_their_lines(tmp_path: Path) -> None:
    product_list = (
        "manufacturer_id,model_id,hardware_version,firmware_version,image_sha256\n"
        "# a comment\n"
        f"1A2B,0001,0100,200,{'a' * 64}\n"
        "1A2B,0001,0100,00000200\n"
    )
    problems = problems_of(write_set(tmp_path, valid_files({"product-list.csv": product_list})))

    assert problems == [
        PolicyProblem("product-list.csv", 3, "firmware_version '200' is not 8 upper-case hex digits"),
        PolicyProblem("product-list.csv", 4, "expected 5 comma-separated fields, found 4"),
    ]


def test_revoked_keys_are_read_as_fingerprints_or_kept_as_a_binary_krl(tmp_path: Path) -> None:
    fingerprint = "SHA256:" + "A" * 43
    text_set = write_set(tmp_path / "text", valid_files({"revoked-keys": f"# revoked\n{fingerprint}\n"}))
    # An empty KRL as ssh-keygen -k writes it: magic, format 1, version, date, flags, reserved, comment.
    krl = b"SSHKRL\n\0" + (1).to_bytes(4, "big") + bytes(24) + bytes(4) + bytes(4)
    binary_set = write_set(tmp_path / "binary", valid_files({"revoked-keys": krl}))

    assert load_policy_set(text_set, today=TODAY).revoked_fingerprints == frozenset({fingerprint})
    assert load_policy_set(binary_set, today=TODAY).revoked_krl == krl


def test_a_binary_krl_that_cannot_be_parsed_is_refused_at_line_1(tmp_path: Path) -> None:
    krl = b"SSHKRL\n\0" + bytes(range(40))
    problem = only_problem(write_set(tmp_path, valid_files({"revoked-keys": krl})))

    assert (problem.file, problem.line) == ("revoked-keys", 1)
    assert problem.reason.startswith("not a valid OpenSSH KRL")


def test_a_revoked_keys_line_that_is_no_fingerprint_is_refused(tmp_path: Path) -> None:
    problem = only_problem(write_set(tmp_path, valid_files({"revoked-keys": "\nMD5:aa:bb\n"})))

    assert (problem.file, problem.line) == ("revoked-keys", 2)


def test_user_ca_keys_are_read_and_bad_lines_reported(tmp_path: Path) -> None:
    good = write_set(tmp_path / "good", valid_files({"user-ca.pub": f"# CA\n{ALICE_KEY}\n"}))
    bad = write_set(tmp_path / "bad", valid_files({"user-ca.pub": f"{ALICE_KEY}\ncert-authority {ALICE_KEY}\n"}))

    assert load_policy_set(good, today=TODAY).user_ca_keys == (" ".join(ALICE_KEY.split()[:2]),)
    assert only_problem(bad).line == 2


# -- estates --------------------------------------------------------------------------------------------------


def test_a_bad_hex_field_in_an_estate_row_is_reported_on_its_line(tmp_path: Path) -> None:
    estate = HEADER + "E1,1A2B,0001,0100,00000100,\nE2,1A2G,0001,0100,00000100,\n"
    problem = only_problem(write_set(tmp_path, valid_files({"estates/northern-energy.csv": estate})))

    assert problem == PolicyProblem(
        "estates/northern-energy.csv", 3, "manufacturer_id '1A2G' is not 4 upper-case hex digits"
    )


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("E1,1A2B,0001,0100,100,", "firmware_version '100' is not 8 upper-case hex digits or empty"),
        ("E1,1A2B,0001,0100,,2026-02-30", "since '2026-02-30' is not a date YYYY-MM-DD or empty"),
        ("E1,1A2B,0001,0100,,20260101", "since '20260101' is not a date YYYY-MM-DD or empty"),
        ("E1,1A2B,0001,0100,", "expected 6 comma-separated fields, found 5"),
        ('"E1",1A2B,0001,0100,,', "device_id (value not shown) must be 1 to 64"),
    ],
)
def test_each_bad_estate_field_has_its_reason(tmp_path: Path, row: str, reason: str) -> None:
    problem = only_problem(write_set(tmp_path, valid_files({"estates/northern-energy.csv": HEADER + row + "\n"})))

    assert problem.line == 2
    assert problem.reason.startswith(reason)


def test_an_estate_with_a_wrong_header_is_refused_at_the_header_line(tmp_path: Path) -> None:
    estate = "# Northern's meters\ndevice,manufacturer_id,model_id,hardware_version,firmware_version,since\n"
    problem = only_problem(write_set(tmp_path, valid_files({"estates/northern-energy.csv": estate})))

    assert (problem.file, problem.line) == ("estates/northern-energy.csv", 2)
    assert problem.reason.startswith("the header must be exactly")


def test_an_estate_must_belong_to_a_known_supplier(tmp_path: Path) -> None:
    files = valid_files({"estates/acme-meters.csv": HEADER, "estates/nobody.csv": HEADER})
    problems = problems_of(write_set(tmp_path, files))

    assert problems == [
        PolicyProblem("estates/acme-meters.csv", 1, "estates belong to suppliers; 'acme-meters' is a manufacturer"),
        PolicyProblem("estates/nobody.csv", 1, "no organisation 'nobody' in organisations.toml"),
    ]


def test_a_device_listed_twice_in_one_estate_is_refused(tmp_path: Path) -> None:
    estate = HEADER + "E1,1A2B,0001,0100,,\nE2,1A2B,0001,0100,,\nE1,1A2B,0001,0100,,2026-01-01\n"
    problem = only_problem(write_set(tmp_path, valid_files({"estates/northern-energy.csv": estate})))

    assert problem == PolicyProblem("estates/northern-energy.csv", 4, "device E1 is listed twice (first at line 2)")


def test_the_same_device_with_the_same_since_in_two_estates_is_refused(tmp_path: Path) -> None:
    files = valid_files(
        {
            "estates/northern-energy.csv": HEADER + "E1,1A2B,0001,0100,,2026-06-01\n",
            "estates/southern-power.csv": HEADER + "E0,1A2B,0001,0100,,\n# moved\nE1,1A2B,0001,0100,,2026-06-01\n",
        }
    )
    problem = only_problem(write_set(tmp_path, files))

    assert problem.file == "estates/southern-power.csv"
    assert problem.line == 4
    assert problem.reason.startswith(
        "device E1 is also in estates/northern-energy.csv (line 2) with the same since (2026-06-01)"
    )


def test_a_device_in_two_estates_with_different_since_is_a_change_of_supplier(tmp_path: Path) -> None:
    files = valid_files(
        {
            "estates/northern-energy.csv": HEADER + "E1,1A2B,0001,0100,,\n",
            "estates/southern-power.csv": HEADER + "E1,1A2B,0001,0100,,2026-12-01\n",
        }
    )
    snapshot = load_policy_set(write_set(tmp_path, files), today=TODAY)

    assert build_estate_view(snapshot, TODAY).holds("northern-energy", ESME)
    assert build_estate_view(snapshot, dt.date(2026, 12, 1)).holds("southern-power", ESME)
    assert not build_estate_view(snapshot, dt.date(2026, 12, 1)).holds("northern-energy", ESME)
    assert snapshot.next_transition == dt.date(2026, 12, 1)


def test_estates_with_and_without_comments_give_the_same_view(tmp_path: Path) -> None:
    rows = [f"E{n},1A2B,{n % 3:04X},0100,{n:08X},{'2026-01-01' if n % 2 else ''}\n" for n in range(50)]
    plain = write_set(tmp_path / "plain", valid_files({"estates/northern-energy.csv": HEADER + "".join(rows)}))
    commented = write_set(
        tmp_path / "commented",
        valid_files({"estates/northern-energy.csv": "# comment\n" + HEADER + "\n".join(rows) + "\n\n"}),
    )

    plain_view = build_estate_view(load_policy_set(plain, today=TODAY), TODAY)
    commented_view = build_estate_view(load_policy_set(commented, today=TODAY), TODAY)
    assert plain_view.lowest_firmware == commented_view.lowest_firmware
    assert len(plain_view.lowest_firmware["northern-energy"]) == 3


def test_a_large_clean_estate_is_read_without_visiting_rows_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def row_by_row(*args: object) -> None:
        raise AssertionError("the row-by-row reader ran")

    monkeypatch.setattr(loader_module, "_estate_slow", row_by_row)
    rows = "".join(f"00-DB-12-{n:010X},1A2B,{n % 7:04X},0100,{n % 5:08X},\n" for n in range(100_000))
    snapshot = load_policy_set(
        write_set(tmp_path, valid_files({"estates/northern-energy.csv": HEADER + rows})), today=TODAY
    )

    assert snapshot.estates.device_counts["northern-energy"] == 100_000
    assert snapshot.estates.span_count == 7
    assert build_estate_view(snapshot, TODAY).lowest_of("northern-energy", ESME) == 0


# -- reporting ------------------------------------------------------------------------------------------------


def test_every_problem_in_every_file_is_reported_together(tmp_path: Path) -> None:
    files = valid_files(
        {"estates/northern-energy.csv": HEADER + "E1,1A2B,0001,0100,,\nE2,zz,0001,0100,,\n"},
        users=USERS.replace('"northern-energy"', '"nobody"').replace("enabled = false", "enabled = 1"),
        roles="[roles.import-supplier]\ndevice_types = 3\n",
    )
    problems = problems_of(write_set(tmp_path, files))

    assert [(p.file, p.line) for p in problems] == [
        ("users.toml", 1),
        ("users.toml", 7),
        ("roles.toml", 1),
        ("estates/northern-energy.csv", 3),
    ]


def test_past_the_limit_a_file_s_problems_are_counted_not_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader_module, "MAX_PROBLEMS_PER_FILE", 2)
    estate = HEADER + "".join(f"E{n},XXXX,0001,0100,,\n" for n in range(5))
    problems = problems_of(write_set(tmp_path, valid_files({"estates/northern-energy.csv": estate})))

    assert [p.line for p in problems] == [2, 3, 1]
    assert problems[-1].reason == "3 more problem(s) in this file not listed"


def test_problems_print_as_file_line_reason(tmp_path: Path) -> None:
    problem = only_problem(write_set(tmp_path, valid_files(users=USERS.replace("alice", "Alice"))))

    assert str(problem).startswith("users.toml:1: user name 'Alice'")


# -- digest ---------------------------------------------------------------------------------------------------


def test_the_digest_is_the_same_for_the_same_files_and_changes_with_any_of_them(tmp_path: Path) -> None:
    first = write_set(tmp_path / "a", valid_files())
    same = write_set(tmp_path / "b", valid_files())
    changed = write_set(tmp_path / "c", valid_files(roles=ROLES + "\n"))

    digest = load_policy_set(first, today=TODAY).digest
    assert load_policy_set(same, today=TODAY).digest == digest
    assert load_policy_set(changed, today=TODAY).digest != digest


def test_policy_digest_matches_the_loaded_snapshot_and_ignores_documentation(tmp_path: Path) -> None:
    directory = write_set(tmp_path, valid_files())
    digest = load_policy_set(directory, today=TODAY).digest
    (directory / "README.md").write_text("notes\n")

    assert policy_digest(directory) == digest


def test_policy_digest_notices_an_unexpected_file(tmp_path: Path) -> None:
    directory = write_set(tmp_path, valid_files())
    before = policy_digest(directory)
    (directory / "users.bak").write_text("")

    assert policy_digest(directory) != before

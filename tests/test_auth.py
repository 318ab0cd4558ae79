"""Authentication (SPEC 5, 6): plain keys, OpenSSH user certificates, and revocation by fingerprint or KRL.

Decisions are tested on bytes first (certificates and KRLs made by OpenSSH's own ``ssh-keygen``, and our KRL
reading checked against ``ssh-keygen -Q``), then through a real server on loopback with asyncssh clients.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import asyncssh
import asyncssh.connection
import pytest
from asyncssh.saslprep import SASLPrepError, saslprep

from cfl_sftp.domain.entitlement import NO_ESTATES
from cfl_sftp.domain.model import OrganisationKind, Role
from cfl_sftp.policy import Organisation, PolicySnapshot, User
from cfl_sftp.policy.krl import (
    CERT_KEY_ID,
    KRL_MAGIC,
    SECTION_CERTIFICATES,
    SECTION_EXTENSION,
    SECTION_SIGNATURE,
    RevokedKeys,
    parse_krl,
    sha256_fingerprint,
)
from cfl_sftp.service import RunningService, start
from cfl_sftp.sftp.auth import (
    Authenticator,
    Credential,
    CredentialBook,
    OpenSSHCertificate,
    Refusal,
    authenticator_for,
    is_certificate,
    parse_certificate,
)
from cfl_sftp.sftp.ssh import _prepared_username, prepare_usernames_once
from tests.deployments import DeploymentUnderTest, make_deployment

HOUR = 3600
CONNECT_TIMEOUT = 30.0


def ssh_keygen() -> str:
    path = shutil.which("ssh-keygen")
    if path is None:
        pytest.skip("ssh-keygen is not installed (Debian: apt-get install openssh-client)")
    return path


def blob_of(line: bytes | str) -> bytes:
    """The key (or certificate) blob of an OpenSSH public key line."""
    text = line.decode() if isinstance(line, bytes) else line
    return base64.b64decode(text.split()[1])


def new_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def certify(
    ca: asyncssh.SSHKey,
    key: asyncssh.SSHKey,
    principals: Sequence[str] = ("northern-ops",),
    *,
    serial: int = 0,
    key_id: str = "northern-ops@ca",
    valid_after: int | None = None,
    valid_before: int | None = None,
    source_address: Sequence[str] | None = None,
    force_command: str | None = None,
) -> asyncssh.SSHCertificate:
    now = int(time.time())
    return ca.generate_user_certificate(
        key, key_id, serial=serial, principals=list(principals),
        valid_after=now - HOUR if valid_after is None else valid_after,
        valid_before=now + HOUR if valid_before is None else valid_before,
        source_address=source_address, force_command=force_command,
    )


def cert_of(certificate: asyncssh.SSHCertificate) -> OpenSSHCertificate:
    return parse_certificate(certificate.public_data)


def key_line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode().strip()


def snapshot(
    *,
    keys: Sequence[str] = (),
    cas: Sequence[str] = (),
    fingerprints: Sequence[str] = (),
    krl: bytes | None = None,
    enabled: bool = True,
) -> PolicySnapshot:
    """A one-user policy: ``northern-ops`` of supplier ``northern-energy``."""
    normalised = tuple(" ".join(line.split()[:2]) for line in keys)
    return PolicySnapshot(
        organisations=MappingProxyType(
            {"northern-energy": Organisation("northern-energy", "Northern Energy", OrganisationKind.SUPPLIER)}
        ),
        users=MappingProxyType({
            "northern-ops": User("northern-ops", "northern-energy", frozenset({Role.IMPORT_SUPPLIER}), normalised,
                                 enabled),
        }),
        roles=MappingProxyType({}),
        manufacturer_keys=MappingProxyType({}),
        estates=NO_ESTATES,
        digest="test",
        user_ca_keys=tuple(" ".join(line.split()[:2]) for line in cas),
        revoked_fingerprints=frozenset(fingerprints),
        revoked_krl=krl,
    )


# -- OpenSSH tooling -----------------------------------------------------------------------------------------


@dataclass
class Keygen:
    """``ssh-keygen`` in a private folder: key pairs, certificates and KRLs exactly as OpenSSH makes them."""

    folder: Path
    binary: str

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.binary, *args], cwd=self.folder, capture_output=True, text=True, check=False)

    def key(self, name: str) -> Path:
        self.run("-q", "-t", "ed25519", "-N", "", "-C", name, "-f", name)
        return self.folder / f"{name}.pub"

    def certificate(self, ca: str, user: str, *options: str) -> Path:
        done = self.run("-q", "-s", ca, *options, f"{user}.pub")
        assert done.returncode == 0, done.stderr
        return self.folder / f"{user}-cert.pub"

    def krl(self, name: str, *args: str, spec: str | None = None) -> bytes:
        sources = list(args)
        if spec is not None:
            (self.folder / f"{name}.spec").write_text(spec)
            sources.append(f"{name}.spec")
        done = self.run("-k", "-f", name, *sources)
        assert done.returncode == 0, done.stderr
        return (self.folder / name).read_bytes()

    def revoked_by_openssh(self, krl: str, key_file: Path) -> bool:
        """``ssh-keygen -Q``: exit 1 when the KRL revokes the key or certificate in ``key_file``."""
        done = self.run("-Q", "-f", krl, str(key_file))
        assert done.returncode in (0, 1), done.stderr
        return done.returncode == 1


@pytest.fixture
def keygen(tmp_path: Path) -> Keygen:
    folder = tmp_path / "keygen"
    folder.mkdir()
    return Keygen(folder, ssh_keygen())


# -- certificates on bytes ---------------------------------------------------------------------------------


def test_certificate_fields_are_read_as_ssh_keygen_wrote_them(keygen: Keygen) -> None:
    ca_pub, user_pub = keygen.key("ca"), keygen.key("alice")
    cert = keygen.certificate(
        "ca", "alice", "-I", "alice@example", "-n", "alice,backup", "-z", "42",
        "-V", "20300101:20300201", "-O", "source-address=10.0.0.0/8,192.0.2.7",
    )

    parsed = parse_certificate(blob_of(cert.read_text()))

    assert parsed.key_type == "ssh-ed25519-cert-v01@openssh.com"
    assert parsed.public_key == blob_of(user_pub.read_text())
    assert parsed.ca_key == blob_of(ca_pub.read_text())
    assert (parsed.serial, parsed.key_id, parsed.principals) == (42, "alice@example", ("alice", "backup"))
    assert parsed.cert_type == 1
    assert parsed.valid_before - parsed.valid_after == 31 * 24 * HOUR
    assert [str(n) for n in parsed.source_addresses() or ()] == ["10.0.0.0/8", "192.0.2.7/32"]
    assert parsed.fingerprint == sha256_fingerprint(blob_of(user_pub.read_text()))


def test_a_certificate_of_an_rsa_key_yields_the_plain_rsa_key() -> None:
    ca, key = new_key(), asyncssh.generate_private_key("ssh-rsa", key_size=2048)

    parsed = cert_of(certify(ca, key))

    assert parsed.public_key == key.public_data
    assert parsed.ca_key == ca.public_data


def test_a_plain_key_is_not_a_certificate_and_a_truncated_one_is_malformed() -> None:
    certificate = certify(new_key(), new_key()).public_data

    assert not is_certificate(new_key().public_data)
    assert is_certificate(certificate)
    with pytest.raises(ValueError, match="truncated"):
        parse_certificate(certificate[:-10])


# -- KRLs on bytes -----------------------------------------------------------------------------------------


def test_krl_revocations_agree_with_ssh_keygen(keygen: Keygen) -> None:
    keygen.key("ca")
    keygen.key("other-ca")
    spec = "serial: 5\nserial: 9-12\nserial: 100\nserial: 102\nserial: 104\nid: stolen-laptop\n"
    cases: list[tuple[str, Path]] = []
    for name, serial, key_id in [
        ("s5", "5", "a"), ("s6", "6", "a"), ("s10", "10", "a"), ("s13", "13", "a"), ("s102", "102", "a"),
        ("s103", "103", "a"), ("stolen", "7", "stolen-laptop"), ("zero", "0", "a"),
    ]:
        keygen.key(name)
        cases.append((name, keygen.certificate("ca", name, "-I", key_id, "-n", "alice", "-z", serial)))
    keygen.key("revoked-key")
    cases.append(("revoked-key", keygen.certificate("ca", "revoked-key", "-I", "a", "-n", "alice", "-z", "1")))
    keygen.key("o5")
    cases.append(("other-ca-serial-5", keygen.certificate("other-ca", "o5", "-I", "a", "-n", "alice", "-z", "5")))
    cases.append(("plain key", keygen.folder / "s5.pub"))
    cases.append(("plain revoked key", keygen.folder / "revoked-key.pub"))
    data = keygen.krl("krl", "-s", "ca.pub", spec=spec)
    assert keygen.run("-k", "-u", "-f", "krl", "revoked-key.pub").returncode == 0
    revoked = RevokedKeys.of((), (keygen.folder / "krl").read_bytes())

    for name, path in cases:
        blob = blob_of(path.read_text())
        if is_certificate(blob):
            cert = parse_certificate(blob)
            ours = revoked.revokes_certificate(cert.public_key, cert.ca_key, cert.serial, cert.key_id)
        else:
            ours = revoked.revokes_key(blob)
        assert ours == keygen.revoked_by_openssh("krl", path), name
    assert data.startswith(KRL_MAGIC)


def test_krl_revokes_by_sha256_hash_as_ssh_keygen(keygen: Keygen) -> None:
    hashed = keygen.key("hashed")
    fingerprint = keygen.run("-lf", str(hashed)).stdout.split()[1]

    krl = parse_krl(keygen.krl("krl", spec=f"hash: {fingerprint}\n"))

    assert krl.revokes_key(blob_of(hashed.read_text()))
    assert keygen.revoked_by_openssh("krl", hashed)


def test_a_key_id_revoked_for_any_ca_revokes_it_under_every_ca() -> None:
    ids = _section(CERT_KEY_ID, _string(b"lost-token"))
    krl = parse_krl(_krl(_section(SECTION_CERTIFICATES, _string(b"") + _string(b"") + ids)))

    assert krl.revokes_certificate(new_key().public_data, 3, "lost-token")
    assert not krl.revokes_certificate(new_key().public_data, 3, "other-token")


def _krl(*sections: bytes) -> bytes:
    header = KRL_MAGIC + (1).to_bytes(4, "big") + bytes(24) + bytes(4) + bytes(4)
    return header + b"".join(sections)


def _section(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + len(body).to_bytes(4, "big") + body


def _string(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_krl(_section(SECTION_SIGNATURE, _string(b"key"))), "signed KRLs"),
        (_krl(_section(SECTION_EXTENSION, _string(b"x@example") + b"\x01" + _string(b""))), "critical extension"),
        (_krl(_section(9, b"")), "unknown KRL section"),
        (_krl(_section(5, _string(b"short"))), "not 32"),
        (_krl()[:-3], "truncated"),
        (b"SSHKRL\n\0" + (2).to_bytes(4, "big"), "version 2"),
    ],
    ids=["signed", "critical-extension", "unknown-section", "bad-hash-length", "truncated", "format-2"],
)
def test_a_krl_we_cannot_honour_is_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_krl(data)


def test_a_non_critical_krl_extension_is_skipped() -> None:
    data = _krl(_section(SECTION_EXTENSION, _string(b"bloom@example") + b"\x00" + _string(b"bits")))

    assert parse_krl(data).keys == frozenset()


# -- decisions over a snapshot -------------------------------------------------------------------------------


def test_a_listed_key_lets_its_user_in_and_others_do_not() -> None:
    listed, other = new_key(), new_key()
    auth = Authenticator(snapshot(keys=[key_line(listed)]))

    assert auth.check_key("northern-ops", listed.public_data) is None
    assert auth.check_key("northern-ops", other.public_data) is Refusal.KEY_NOT_LISTED
    assert auth.check_key("nobody", listed.public_data) is Refusal.UNKNOWN_USER


def test_a_disabled_user_is_refused_whatever_its_key() -> None:
    listed = new_key()

    auth = Authenticator(snapshot(keys=[key_line(listed)], enabled=False))

    assert auth.check_key("northern-ops", listed.public_data) is Refusal.UNKNOWN_USER


def test_a_key_revoked_by_fingerprint_line_is_refused() -> None:
    listed = new_key()
    auth = Authenticator(snapshot(keys=[key_line(listed)], fingerprints=[listed.get_fingerprint("sha256")]))

    assert auth.check_key("northern-ops", listed.public_data) is Refusal.KEY_REVOKED


def test_a_valid_certificate_from_a_trusted_ca_lets_its_principal_in() -> None:
    ca = new_key()
    auth = Authenticator(snapshot(cas=[key_line(ca)]))

    assert auth.check_certificate("northern-ops", cert_of(certify(ca, new_key())), "127.0.0.1", time.time()) is None
    assert auth.trusts_ca(ca.public_data)


@pytest.mark.parametrize(
    ("make", "refusal"),
    [
        (lambda ca, other: certify(other, new_key()), Refusal.CA_NOT_TRUSTED),
        (lambda ca, other: certify(ca, new_key(), ["someone-else"]), Refusal.WRONG_PRINCIPAL),
        (lambda ca, other: certify(ca, new_key(), []), Refusal.WRONG_PRINCIPAL),
        (lambda ca, other: certify(ca, new_key(), valid_before=int(time.time()) - 60), Refusal.EXPIRED),
        (lambda ca, other: certify(ca, new_key(), valid_after=int(time.time()) + HOUR,
                                    valid_before=int(time.time()) + 2 * HOUR), Refusal.NOT_YET_VALID),
        (lambda ca, other: certify(ca, new_key(), source_address=["10.0.0.0/8"]), Refusal.SOURCE_ADDRESS),
        (lambda ca, other: certify(ca, new_key(), force_command="/bin/sh"), Refusal.UNSUPPORTED_OPTION),
        (lambda ca, other: ca.generate_host_certificate(new_key(), "host", principals=["northern-ops"]),
         Refusal.NOT_A_USER_CERTIFICATE),
    ],
    ids=["untrusted-ca", "wrong-principal", "no-principal", "expired", "not-yet-valid", "source-address",
         "force-command", "host-certificate"],
)
def test_a_certificate_is_refused_when(make: object, refusal: Refusal) -> None:
    ca, other = new_key(), new_key()
    auth = Authenticator(snapshot(cas=[key_line(ca)]))
    certificate = make(ca, other)  # type: ignore[operator]

    assert auth.check_certificate("northern-ops", cert_of(certificate), "127.0.0.1", time.time()) is refusal


def test_source_address_admits_listed_networks_including_ipv4_mapped_peers() -> None:
    ca = new_key()
    auth = Authenticator(snapshot(cas=[key_line(ca)]))
    cert = cert_of(certify(ca, new_key(), source_address=["127.0.0.0/8", "2001:db8::/32"]))

    for peer in ("127.0.0.1", "::ffff:127.0.0.5", "2001:db8::1"):
        assert auth.check_certificate("northern-ops", cert, peer, time.time()) is None, peer
    assert auth.check_certificate("northern-ops", cert, "192.0.2.1", time.time()) is Refusal.SOURCE_ADDRESS


def test_a_certificate_is_refused_when_its_key_or_its_ca_is_revoked_by_fingerprint() -> None:
    ca, key = new_key(), new_key()
    cert = cert_of(certify(ca, key))
    by_key = Authenticator(snapshot(cas=[key_line(ca)], fingerprints=[key.get_fingerprint("sha256")]))
    by_ca = Authenticator(snapshot(cas=[key_line(ca)], fingerprints=[ca.get_fingerprint("sha256")]))

    assert by_key.check_certificate("northern-ops", cert, None, time.time()) is Refusal.CERTIFICATE_REVOKED
    assert by_ca.check_certificate("northern-ops", cert, None, time.time()) is Refusal.CERTIFICATE_REVOKED
    assert not by_ca.trusts_ca(ca.public_data)


def test_a_certificate_revoked_by_serial_in_a_krl_is_refused(keygen: Keygen) -> None:
    ca = new_key()
    (keygen.folder / "ca.pub").write_bytes(ca.export_public_key())
    krl = keygen.krl("krl", "-s", "ca.pub", spec="serial: 7\n")
    auth = Authenticator(snapshot(cas=[key_line(ca)], krl=krl))

    revoked = cert_of(certify(ca, new_key(), serial=7))
    kept = cert_of(certify(ca, new_key(), serial=8))

    assert auth.check_certificate("northern-ops", revoked, None, time.time()) is Refusal.CERTIFICATE_REVOKED
    assert auth.check_certificate("northern-ops", kept, None, time.time()) is None


def test_an_open_session_is_rechecked_without_its_validity_period() -> None:
    ca = new_key()
    expired = cert_of(certify(ca, new_key(), valid_before=int(time.time()) - 1))
    auth = Authenticator(snapshot(cas=[key_line(ca)]))

    assert auth.check_credential("northern-ops", Credential(expired.public_key, expired, "127.0.0.1")) is None


def test_the_credential_book_closes_only_sessions_the_new_policy_refuses() -> None:
    kept, dropped = new_key(), new_key()
    book = CredentialBook()
    closed: list[str] = []
    book.add("s1", "northern-ops", Credential(kept.public_data), lambda: closed.append("s1"))
    book.add("s2", "northern-ops", Credential(dropped.public_data), lambda: closed.append("s2"))

    result = book.close_refused(snapshot(keys=[key_line(kept)]))

    assert result == ["s2"]
    assert closed == ["s2"]
    assert len(book) == 1


def test_the_authenticator_is_built_once_per_snapshot() -> None:
    policy = snapshot()

    assert authenticator_for(policy) is authenticator_for(policy)
    assert authenticator_for(snapshot()) is not authenticator_for(policy)


# -- through a real server ---------------------------------------------------------------------------------


@dataclass
class Server:
    td: DeploymentUnderTest
    service: RunningService

    @property
    def port(self) -> int:
        return self.service.ports[0]

    @property
    def policies(self) -> Path:
        return self.td.deployment.config.policies_dir

    async def logs_in(self, user: str, client_keys: object) -> bool:
        """Whether ``user`` gets an SFTP session with these client keys (asyncssh's ``client_keys`` forms)."""
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    "127.0.0.1", self.port, username=user, client_keys=client_keys, known_hosts=None,
                    agent_path=None, config=None, preferred_auth="publickey",
                ),
                CONNECT_TIMEOUT,
            )
        except asyncssh.PermissionDenied:
            return False
        async with conn:
            sftp = await asyncio.wait_for(conn.start_sftp_client(), CONNECT_TIMEOUT)
            names = await sftp.listdir("/")
            sftp.exit()
        return "images" in names


@pytest.fixture
def ca() -> asyncssh.SSHKey:
    return new_key()


@pytest.fixture
async def server(tmp_path: Path, ca: asyncssh.SSHKey) -> AsyncIterator[Server]:
    """A running service whose ``user-ca.pub`` trusts ``ca``; ``prepare_policies`` may add files first."""
    td = make_deployment(tmp_path, settings={"listen": '["127.0.0.1:0"]'})
    (td.deployment.config.policies_dir / "user-ca.pub").write_text(key_line(ca) + " test-ca\n")
    service = await start(td.deployment.config, td.deployment)
    try:
        yield Server(td, service)
    finally:
        await service.stop()


async def test_a_certificate_from_a_trusted_ca_logs_its_principal_in(server: Server, ca: asyncssh.SSHKey) -> None:
    key = new_key()

    assert await server.logs_in("northern-ops", [(key, certify(ca, key))])


async def test_an_expired_certificate_is_refused(server: Server, ca: asyncssh.SSHKey) -> None:
    key = new_key()
    expired = certify(ca, key, valid_after=int(time.time()) - 2 * HOUR, valid_before=int(time.time()) - HOUR)

    assert not await server.logs_in("northern-ops", [(key, expired)])


async def test_a_certificate_for_another_principal_is_refused(server: Server, ca: asyncssh.SSHKey) -> None:
    key = new_key()

    assert not await server.logs_in("northern-ops", [(key, certify(ca, key, ["southern-ops"]))])


async def test_a_certificate_whose_source_address_excludes_the_client_is_refused(
    server: Server, ca: asyncssh.SSHKey
) -> None:
    key = new_key()
    elsewhere = certify(ca, key, source_address=["10.0.0.0/8"])
    here = certify(ca, key, source_address=["127.0.0.0/8"])

    assert not await server.logs_in("northern-ops", [(key, elsewhere)])
    assert await server.logs_in("northern-ops", [(key, here)])


async def test_a_certificate_from_a_ca_not_in_user_ca_pub_is_refused(server: Server) -> None:
    key = new_key()

    assert not await server.logs_in("northern-ops", [(key, certify(new_key(), key))])


async def test_a_key_revoked_by_fingerprint_line_cannot_log_in(tmp_path: Path) -> None:
    td = make_deployment(tmp_path, settings={"listen": '["127.0.0.1:0"]'})
    key_file = str(td.key_path("northern-ops"))
    fingerprint = asyncssh.read_private_key(key_file).get_fingerprint("sha256")
    (td.deployment.config.policies_dir / "revoked-keys").write_text(f"# lost laptop\n{fingerprint}\n")
    service = await start(td.deployment.config, td.deployment)
    try:
        server = Server(td, service)
        assert not await server.logs_in("northern-ops", [key_file])
        assert await server.logs_in("southern-ops", [str(td.key_path("southern-ops"))])
    finally:
        await service.stop()


async def test_keys_and_certificates_revoked_by_a_krl_cannot_log_in(tmp_path: Path, keygen: Keygen) -> None:
    td = make_deployment(tmp_path, settings={"listen": '["127.0.0.1:0"]'})
    ca = new_key()
    (keygen.folder / "ca.pub").write_bytes(ca.export_public_key())
    key_file = td.key_path("northern-ops")
    (keygen.folder / "northern-ops.pub").write_bytes(asyncssh.read_private_key(key_file).export_public_key())
    krl = keygen.krl("krl", "-s", "ca.pub", "northern-ops.pub", spec="serial: 7\n")
    policies = td.deployment.config.policies_dir
    (policies / "revoked-keys").write_bytes(krl)
    (policies / "user-ca.pub").write_text(key_line(ca) + "\n")
    service = await start(td.deployment.config, td.deployment)
    try:
        server = Server(td, service)
        cert_key = new_key()
        assert not await server.logs_in("northern-ops", [str(key_file)])
        assert not await server.logs_in("northern-gas", [(cert_key, certify(ca, cert_key, ["northern-gas"],
                                                                            serial=7))])
        assert await server.logs_in("northern-gas", [(cert_key, certify(ca, cert_key, ["northern-gas"], serial=8))])
    finally:
        await service.stop()


def test_a_remembered_user_name_preparation_answers_as_saslprep_and_never_remembers_a_refusal() -> None:
    """asyncssh prepares each requested user name with SASLprep (RFC 4013); the service installs a function that
    remembers the answers (cfl_sftp.sftp.ssh.prepare_usernames_once). Checked on that function: asyncssh's own
    client prepares the name before sending it, so a login could not tell. A name with a prohibited character
    (here a control character) is refused each time; a long name is prepared every time, never remembered."""
    prepare_usernames_once()
    prepared = asyncssh.connection.saslprep  # type: ignore[attr-defined]
    for _ in range(2):
        assert prepared("north\u00adern-ops") == saslprep("north\u00adern-ops") == "northern-ops"
        assert prepared("\u2168-ops") == "IX-ops"  # compatibility mapping (NFKC)
        with pytest.raises(SASLPrepError):
            prepared("northern-ops\u0007")
    remembered = _prepared_username.cache_info().currsize
    long_name = "n" * 200 + "\u00ad"
    assert prepared(long_name) == prepared(long_name) == "n" * 200
    assert _prepared_username.cache_info().currsize == remembered

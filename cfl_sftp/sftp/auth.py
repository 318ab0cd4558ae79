"""Who may log in, decided from the policy in force: plain keys, OpenSSH user certificates, revocations (SPEC 5, 6).

A user logs in with a key listed under its ``keys`` in ``users.toml``, or with an OpenSSH user certificate that
a CA of ``user-ca.pub`` signed, whose principals include the user's name, whose validity period holds now, whose
``source-address`` (if any) admits the client's address, and that carries no other critical option. Neither the
key, nor the certificate, nor its CA may be revoked by ``revoked-keys`` (:mod:`cfl_sftp.policy.krl`). The user
must exist, be enabled and belong to an organisation that exists, whatever the credential.

Three layers, each usable alone:

* :func:`parse_certificate` and :class:`Authenticator`: bytes and one :class:`PolicySnapshot` in, a
  :class:`Refusal` (or None) out; no asyncssh, no I/O, no clock of their own. :func:`authenticator_for` keeps
  the one for the snapshot in force, so the work per snapshot (decoding keys, parsing the KRL) is done once.
* :class:`ConnectionAuth`, the asyncssh adapter of one connection. asyncssh's ``validate_ca_key`` hook is given
  only the CA key, never the certificate, so serial, key id and certified key could not be checked there.
  :meth:`ConnectionAuth.attach` therefore wraps the connection's ``validate_public_key`` (through which every
  offered key or certificate passes), vets a certificate in full before asyncssh looks at it, and makes the
  ``validate_ca_key`` hook answer yes only for a CA whose certificate was vetted that way. If a future asyncssh
  stopped calling that method, no certificate would be vetted and every certificate would be refused: the
  adapter fails closed. asyncssh still verifies the certificate's signature and repeats its own principal,
  validity and ``source-address`` checks (it would accept a certificate with no principals for any user: we
  refuse it, as OpenSSH's sshd does).
* :class:`CredentialBook`: which credential each open session authenticated with, so that a new policy set
  that removes or revokes it closes the session (SPEC 6).

What this module does not do: count failed logins or ban addresses, audit ``login-refused``, or check a
certificate's expiry during a session that is already open (as OpenSSH, validity is checked at login).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

from cfl_sftp.policy import PolicySnapshot
from cfl_sftp.policy.krl import RevokedKeys, WireReader, sha256_fingerprint

log = structlog.get_logger(__name__)

CERT_TYPE_USER = 1
CERT_SUFFIX = "-cert-v01@openssh.com"
FOREVER = (1 << 64) - 1

# Certificate key type -> (the certified key's own type, how many key fields follow the nonce).
_CERT_KEY_FIELDS: dict[str, tuple[str, int]] = {
    "ssh-ed25519-cert-v01@openssh.com": ("ssh-ed25519", 1),
    "ssh-rsa-cert-v01@openssh.com": ("ssh-rsa", 2),
    "ecdsa-sha2-nistp256-cert-v01@openssh.com": ("ecdsa-sha2-nistp256", 2),
    "ecdsa-sha2-nistp384-cert-v01@openssh.com": ("ecdsa-sha2-nistp384", 2),
    "ecdsa-sha2-nistp521-cert-v01@openssh.com": ("ecdsa-sha2-nistp521", 2),
    "sk-ssh-ed25519-cert-v01@openssh.com": ("sk-ssh-ed25519@openssh.com", 2),
    "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com": ("sk-ecdsa-sha2-nistp256@openssh.com", 3),
}

SOURCE_ADDRESS = "source-address"
KNOWN_CRITICAL_OPTIONS = frozenset({SOURCE_ADDRESS})
"""Critical options we honour. ``force-command`` is refused: this service runs SFTP only, and asyncssh would
turn the SFTP request into the forced command (which a session here may not run)."""

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refusal(StrEnum):
    """Why a key or certificate does not let a user in (for logs; the client is told nothing more)."""

    UNKNOWN_USER = "unknown-user"
    """No such user, or disabled, or its organisation is gone."""
    KEY_NOT_LISTED = "key-not-listed"
    KEY_REVOKED = "key-revoked"
    MALFORMED_CERTIFICATE = "malformed-certificate"
    NOT_A_USER_CERTIFICATE = "not-a-user-certificate"
    CA_NOT_TRUSTED = "ca-not-trusted"
    WRONG_PRINCIPAL = "wrong-principal"
    NOT_YET_VALID = "not-yet-valid"
    EXPIRED = "expired"
    SOURCE_ADDRESS = "source-address"
    UNSUPPORTED_OPTION = "unsupported-critical-option"
    CERTIFICATE_REVOKED = "certificate-revoked"
    POLICY_UNUSABLE = "revocation-list-unusable"


# -- certificates ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenSSHCertificate:
    """The fields of an OpenSSH certificate (``PROTOCOL.certkeys``) that authentication decides on.

    ``public_key`` is the certified key as a plain public key blob and ``ca_key`` the signing CA's; times are
    seconds since the epoch (``valid_before`` is :data:`FOREVER` for "forever"); ``critical_options`` maps
    each option's name to its undecoded data.
    """

    key_type: str
    public_key: bytes
    serial: int
    cert_type: int
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    critical_options: tuple[tuple[str, bytes], ...]
    ca_key: bytes

    @property
    def fingerprint(self) -> str:
        """The certified key's ``SHA256:`` fingerprint (what ``ssh-keygen -l`` prints for the certificate)."""
        return sha256_fingerprint(self.public_key)

    def source_addresses(self) -> tuple[IPNetwork, ...] | None:
        """The ``source-address`` networks, or None without that option; ``ValueError`` if unreadable."""
        for name, data in self.critical_options:
            if name == SOURCE_ADDRESS:
                reader = WireReader(data)
                text = reader.string().decode("ascii")
                reader.end()
                networks = tuple(ipaddress.ip_network(part.strip()) for part in text.split(","))
                if not networks:
                    raise ValueError("empty source-address")
                return networks
        return None


def is_certificate(key_data: bytes) -> bool:
    """Whether an SSH public key blob is an OpenSSH certificate (by its key type)."""
    try:
        key_type = WireReader(key_data).string()
    except ValueError:
        return False
    return key_type.endswith(CERT_SUFFIX.encode())


def _wire_string(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def parse_certificate(blob: bytes) -> OpenSSHCertificate:
    """Read an OpenSSH certificate blob; raise ``ValueError`` if it is none or malformed.

    The signature is not verified here (asyncssh does that when it decodes the certificate).
    """
    reader = WireReader(blob)
    try:
        key_type = reader.string().decode("ascii")
        if key_type not in _CERT_KEY_FIELDS:
            raise ValueError(f"unsupported certificate type {key_type[:64]!r}")
        plain_type, field_count = _CERT_KEY_FIELDS[key_type]
        reader.string()  # nonce
        fields = [reader.string() for _ in range(field_count)]
        serial = reader.uint64()
        cert_type = reader.uint32()
        key_id = reader.string().decode("utf-8")
        principal_reader = WireReader(reader.string())
        principals = []
        while principal_reader.remaining:
            principals.append(principal_reader.string().decode("utf-8"))
        valid_after = reader.uint64()
        valid_before = reader.uint64()
        options_reader = WireReader(reader.string())
        options = []
        while options_reader.remaining:
            options.append((options_reader.string().decode("ascii"), options_reader.string()))
        reader.string()  # extensions: none of them restricts an SFTP session
        reader.string()  # reserved
        ca_key = reader.string()
        reader.string()  # signature
        reader.end()
    except UnicodeDecodeError:
        raise ValueError("a certificate field is not valid text") from None
    if not ca_key:
        raise ValueError("the certificate names no CA key")
    public_key = _wire_string(plain_type.encode()) + b"".join(_wire_string(f) for f in fields)
    return OpenSSHCertificate(
        key_type=key_type,
        public_key=public_key,
        serial=serial,
        cert_type=cert_type,
        key_id=key_id,
        principals=tuple(principals),
        valid_after=valid_after,
        valid_before=valid_before,
        critical_options=tuple(options),
        ca_key=ca_key,
    )


def _address_in(peer: str | None, networks: tuple[IPNetwork, ...]) -> bool:
    if peer is None:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
    return any(address in network for network in networks)


# -- decisions over one snapshot -------------------------------------------------------------------------


def _key_blob(line: str) -> bytes | None:
    """The blob of a normalised ``"type base64"`` key line of the snapshot."""
    try:
        return base64.b64decode(line.split()[1], validate=True)
    except (IndexError, binascii.Error, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Credential:
    """What a session authenticated with: a plain key, or a certificate (with the client's address)."""

    public_key: bytes
    certificate: OpenSSHCertificate | None = None
    peer_ip: str | None = None

    @property
    def fingerprint(self) -> str:
        return sha256_fingerprint(self.public_key)


class Authenticator:
    """Authentication decisions over one :class:`PolicySnapshot`; cheap per request, whatever the policy size.

    Users' keys are decoded the first time each user is asked about; ``revoked-keys`` is parsed once.
    """

    def __init__(self, snapshot: PolicySnapshot) -> None:
        self.snapshot = snapshot
        self._user_keys: dict[str, frozenset[bytes]] = {}
        self._cas = frozenset(b for line in snapshot.user_ca_keys if (b := _key_blob(line)) is not None)
        self._revoked: RevokedKeys | None
        try:
            self._revoked = RevokedKeys.of(snapshot.revoked_fingerprints, snapshot.revoked_krl)
        except ValueError as exc:  # the loader refuses such a set; if one got through, let nobody in
            log.error("revoked_keys_unusable", reason=str(exc))
            self._revoked = None

    def _keys_of(self, username: str) -> frozenset[bytes]:
        keys = self._user_keys.get(username)
        if keys is None:
            user = self.snapshot.user(username)
            lines = user.keys if user is not None else ()
            keys = frozenset(b for line in lines if (b := _key_blob(line)) is not None)
            self._user_keys[username] = keys
        return keys

    def check_key(self, username: str, key: bytes) -> Refusal | None:
        """A plain public key blob offered for ``username``; None when it lets the user in."""
        if self._revoked is None:
            return Refusal.POLICY_UNUSABLE
        if self.snapshot.user(username) is None:
            return Refusal.UNKNOWN_USER
        if key not in self._keys_of(username):
            return Refusal.KEY_NOT_LISTED
        if self._revoked.revokes_key(key):
            return Refusal.KEY_REVOKED
        return None

    def trusts_ca(self, ca_key: bytes) -> bool:
        """The CA is in ``user-ca.pub`` and not revoked."""
        return self._revoked is not None and ca_key in self._cas and not self._revoked.revokes_key(ca_key)

    def check_certificate(
        self, username: str, certificate: OpenSSHCertificate, peer_ip: str | None, now: float | None
    ) -> Refusal | None:
        """A certificate offered for ``username`` from ``peer_ip`` at ``now`` (epoch seconds; None skips the
        validity period, for re-checking an open session against a new policy set)."""
        revoked = self._revoked
        if revoked is None:
            return Refusal.POLICY_UNUSABLE
        if certificate.cert_type != CERT_TYPE_USER:
            return Refusal.NOT_A_USER_CERTIFICATE
        if certificate.ca_key not in self._cas:
            return Refusal.CA_NOT_TRUSTED
        if self.snapshot.user(username) is None:
            return Refusal.UNKNOWN_USER
        if username not in certificate.principals:  # an empty list names nobody, as in sshd
            return Refusal.WRONG_PRINCIPAL
        if now is not None:
            if now < certificate.valid_after:
                return Refusal.NOT_YET_VALID
            if now >= certificate.valid_before:
                return Refusal.EXPIRED
        if any(name not in KNOWN_CRITICAL_OPTIONS for name, _ in certificate.critical_options):
            return Refusal.UNSUPPORTED_OPTION
        try:
            networks = certificate.source_addresses()
        except (ValueError, UnicodeDecodeError):
            return Refusal.SOURCE_ADDRESS
        if networks is not None and not _address_in(peer_ip, networks):
            return Refusal.SOURCE_ADDRESS
        if revoked.revokes_certificate(
            certificate.public_key, certificate.ca_key, certificate.serial, certificate.key_id
        ):
            return Refusal.CERTIFICATE_REVOKED
        return None

    def check_credential(self, username: str, credential: Credential) -> Refusal | None:
        """Whether an open session's credential would still let its user in (time aside)."""
        if credential.certificate is None:
            return self.check_key(username, credential.public_key)
        return self.check_certificate(username, credential.certificate, credential.peer_ip, now=None)


_in_force: tuple[PolicySnapshot, Authenticator] | None = None


def authenticator_for(snapshot: PolicySnapshot) -> Authenticator:
    """The :class:`Authenticator` of ``snapshot``, built once per snapshot (the last one asked is kept)."""
    global _in_force  # noqa: PLW0603 - one slot, swapped whole, like the snapshot reference it follows
    current = _in_force
    if current is not None and current[0] is snapshot:
        return current[1]
    authenticator = Authenticator(snapshot)
    _in_force = (snapshot, authenticator)
    return authenticator


def key_allowed(snapshot: PolicySnapshot, username: str, key: bytes) -> bool:
    """Whether a plain public key blob lets ``username`` in under ``snapshot`` (logs why not)."""
    refusal = authenticator_for(snapshot).check_key(username, key)
    if refusal is None:
        return True
    level = log.debug if refusal in (Refusal.KEY_NOT_LISTED, Refusal.UNKNOWN_USER) else log.info
    level("public_key_refused", user=username, reason=refusal.value, fingerprint=sha256_fingerprint(key))
    return False


def ca_trusted(snapshot: PolicySnapshot, ca_key: bytes) -> bool:
    """Whether ``snapshot`` trusts this CA for user certificates (in ``user-ca.pub``, not revoked)."""
    return authenticator_for(snapshot).trusts_ca(ca_key)


# -- one asyncssh connection -----------------------------------------------------------------------------

ValidatePublicKey = Callable[[str, bytes, bytes, bytes], Awaitable[bool]]


class ConnectionAuth:
    """Certificate vetting and the credential record for one SSH connection (see the module docstring)."""

    def __init__(self, policy: Callable[[], PolicySnapshot], clock: Callable[[], float] = time.time) -> None:
        self._policy = policy
        self._clock = clock
        self._peer_ip: str | None = None
        self._vetted: OpenSSHCertificate | None = None
        self.credential: Credential | None = None
        """The key or certificate that completed authentication (set when its signature was accepted)."""

    def attach(self, conn: Any) -> None:
        """Route ``conn``'s public-key checks through :meth:`_validate` (``conn``: an SSHServerConnection)."""
        peer = conn.get_extra_info("peername")
        self._peer_ip = str(peer[0]) if peer else None
        original: ValidatePublicKey = conn.validate_public_key

        async def validate_public_key(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
            return await self._validate(original, username, key_data, msg, signature)

        conn.validate_public_key = validate_public_key

    async def _validate(
        self, original: ValidatePublicKey, username: str, key_data: bytes, msg: bytes, signature: bytes
    ) -> bool:
        certificate = None
        if is_certificate(key_data):
            try:
                certificate = parse_certificate(key_data)
            except ValueError as exc:
                log.info("certificate_refused", user=username, reason=Refusal.MALFORMED_CERTIFICATE.value,
                         detail=str(exc))
                return False
            authenticator = authenticator_for(self._policy())
            refusal = authenticator.check_certificate(username, certificate, self._peer_ip, self._clock())
            if refusal is not None:
                log.info("certificate_refused", user=username, reason=refusal.value,
                         key_id=certificate.key_id[:128], serial=certificate.serial,
                         fingerprint=certificate.fingerprint)
                return False
            self._vetted = certificate
        try:
            accepted = await original(username, key_data, msg, signature)
        finally:
            self._vetted = None
        if accepted and msg:  # a signed request that asyncssh verified: this credential logs the user in
            if certificate is not None:
                self.credential = Credential(certificate.public_key, certificate, self._peer_ip)
            else:
                self.credential = Credential(key_data)
        return accepted

    def certificate_vetted(self, ca_key: bytes) -> bool:
        """For asyncssh's ``validate_ca_key``: a certificate by this CA passed every check just now."""
        return self._vetted is not None and self._vetted.ca_key == ca_key


# -- open sessions ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _OpenSession:
    username: str
    credential: Credential
    close: Callable[[], None]


class CredentialBook:
    """The credential of every open session, to close those a new policy set no longer admits (SPEC 6)."""

    def __init__(self) -> None:
        self._open: dict[str, _OpenSession] = {}

    def __len__(self) -> int:
        return len(self._open)

    def add(self, session_id: str, username: str, credential: Credential, close: Callable[[], None]) -> None:
        self._open[session_id] = _OpenSession(username, credential, close)

    def discard(self, session_id: str) -> None:
        self._open.pop(session_id, None)

    def close_refused(self, snapshot: PolicySnapshot) -> list[str]:
        """Close each session whose credential ``snapshot`` refuses; return their ids. O(open sessions)."""
        authenticator = authenticator_for(snapshot)
        closed = []
        for session_id, session in list(self._open.items()):
            refusal = authenticator.check_credential(session.username, session.credential)
            if refusal is None:
                continue
            log.info("session_closed_by_policy", session=session_id, user=session.username, reason=refusal.value,
                     fingerprint=session.credential.fingerprint)
            self._open.pop(session_id, None)
            session.close()
            closed.append(session_id)
        return closed

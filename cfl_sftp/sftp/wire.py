"""Two changes to asyncssh's SSH packet layer, each to work it did for nothing on every packet.

**No empty ``MSG_IGNORE`` before each packet under AEAD and counter-mode ciphers.** asyncssh 2.24 sends one before
each packet once keys are in use (``SSHConnection.send_packet``). It is the countermeasure of RFC 4251 section
9.3.1 against chosen-plaintext attacks on CBC mode, where each packet's IV is the last cipher block of the one
before: an ignore packet in between makes that IV unpredictable. The AEAD and counter-mode ciphers
(``chacha20-poly1305@openssh.com``, ``aes*-gcm@openssh.com``, ``aes*-ctr``), asyncssh's default list, which
cfl-sftp offers unchanged, take a fresh nonce or counter per packet and gain nothing from it; OpenSSH sends
none. Every reply of ours paid for one: random padding, AES-GCM, a sequence number and queue space, on both ends
of the connection. A login is 32 packets of which 14 were these; a 1 GiB download is ~33,000 data packets and as
many of these. ``send_packet`` is wrapped so that this one packet (an empty ``MSG_IGNORE``, the only one asyncssh
sends by itself) is skipped while the connection sends with one of :data:`FRESH_IV_CIPHERS`. Any other packet,
and every packet under any other cipher (CBC, or one added to asyncssh later), goes through asyncssh's own code
unchanged.

**AES-GCM without copies of each packet around the cipher.** asyncssh seals a packet with a new ``AESGCM`` object
(a key schedule) each time, slices the sealed bytes into ciphertext and tag (two copies), and joins them again
to send; opening one joins the body and the tag to the ciphertext in two steps. On a download that is three
needless passes over every byte. :func:`drop_needless_packet_work` replaces ``GCMEncryption.encrypt_packet`` and
``decrypt_packet`` with the same computation over the same bytes: one ``AESGCM`` per key, the sealed packet
returned whole (header, ciphertext, tag; asyncssh appends the empty "MAC" for free), the packet to open joined
once. The nonce still advances exactly as asyncssh's ``GCMCipher`` does it, through its own ``_update_iv``, and a
new key (at each rekey) comes with a new ``GCMCipher`` and so a new ``AESGCM``. asyncssh also seals private keys
with this class, with no header and the tag wanted apart: that call goes to asyncssh's own code.

Both rely on asyncssh internals (``send_packet``'s signature, the ``send_cipher`` extra info, ``GCMCipher``'s
``_key``, ``_iv`` and ``_update_iv``): asyncssh is pinned below 2.25, and tests/test_wire.py checks the
behaviour on real connections, per cipher, at each upgrade.
"""

from __future__ import annotations

from typing import Any

from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_IGNORE
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import GCMEncryption
from asyncssh.packet import String
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FRESH_IV_CIPHERS = frozenset({
    "chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
    "aes128-ctr", "aes192-ctr", "aes256-ctr",
})
"""Ciphers whose packets need no ignore packet between them: a nonce or counter per packet, not a chained IV."""

_EMPTY = String(b"")
_send_packet = SSHConnection.send_packet
_encrypt_packet = GCMEncryption.encrypt_packet


def _send_packet_unless_needless_ignore(
    self: SSHConnection, pkttype: int, *args: bytes, handler: Any = None
) -> None:
    if pkttype == MSG_IGNORE and args == (_EMPTY,) and self.get_extra_info("send_cipher") in FRESH_IV_CIPHERS:
        return
    _send_packet(self, pkttype, *args, handler=handler)


def _aead(cipher: GCMCipher) -> AESGCM:
    """The cipher's ``AESGCM``, made once for its key (a key is used for one direction until the next rekey)."""
    aead: AESGCM | None = cipher.__dict__.get("_cfl_aead")
    if aead is None:
        aead = cipher.__dict__["_cfl_aead"] = AESGCM(cipher._key)
    return aead


def _encrypt_gcm_packet(self: GCMEncryption, seq: int, header: bytes, packet: bytes) -> tuple[bytes, bytes]:
    if not header:  # not an SSH packet: asyncssh sealing a private key, which wants the tag apart
        return _encrypt_packet(self, seq, header, packet)
    cipher = self._cipher
    sealed = _aead(cipher).encrypt(cipher._iv, packet, header)  # ciphertext and tag
    cipher._update_iv()
    return header + sealed, b""  # asyncssh sends packet + mac: the same bytes as its own split


def _decrypt_gcm_packet(  # noqa: PLR0917 - asyncssh's own signature
    self: GCMEncryption, seq: int, first: bytes, rest: bytes, header_len: int, mac: bytes
) -> bytes | None:
    cipher = self._cipher
    try:
        opened: bytes | None = _aead(cipher).decrypt(
            cipher._iv, b"".join((first[header_len:], rest, mac)), first[:header_len]
        )
    except InvalidTag:
        opened = None
    cipher._update_iv()
    return opened


def drop_needless_packet_work() -> None:
    """From now on, in this process: no empty ``MSG_IGNORE`` but under CBC ciphers, and AES-GCM packets sealed and
    opened without extra copies (idempotent)."""
    SSHConnection.send_packet = _send_packet_unless_needless_ignore  # type: ignore[method-assign]
    GCMEncryption.encrypt_packet = _encrypt_gcm_packet  # type: ignore[method-assign]
    GCMEncryption.decrypt_packet = _decrypt_gcm_packet  # type: ignore[method-assign]

"""asyncssh's empty ``MSG_IGNORE`` before every packet, kept only where it protects something: CBC ciphers.

asyncssh 2.24 sends an empty ``SSH_MSG_IGNORE`` before each packet once keys are in use
(``SSHConnection.send_packet``). It is the countermeasure of RFC 4251 section 9.3.1 against chosen-plaintext
attacks on CBC mode, where each packet's IV is the last cipher block of the one before: an ignore packet in
between makes that IV unpredictable. The AEAD and counter-mode ciphers (``chacha20-poly1305@openssh.com``,
``aes*-gcm@openssh.com``, ``aes*-ctr``), the only ones cfl-sftp offers, take a fresh nonce or counter per packet
and gain nothing from it; OpenSSH sends none. Every reply of ours paid for one: random padding, AES-GCM, a
sequence number and queue space, on both ends of the connection. A login is 32 packets of which 14 were these;
a 1 GiB download is ~33,000 data packets and as many of these.

:func:`drop_needless_ignore_packets` wraps ``send_packet`` so that this one packet (an empty ``MSG_IGNORE``, the
only one asyncssh sends by itself) is skipped while the connection sends with one of :data:`FRESH_IV_CIPHERS`.
Any other packet, and every packet under any other cipher (CBC, or one added to asyncssh later), goes through
asyncssh's own code unchanged. The wrapper relies on
asyncssh's private ``send_packet`` signature and its ``send_cipher`` extra info: asyncssh is pinned below 2.25,
and tests/test_wire.py checks the behaviour on real connections at each upgrade.
"""

from __future__ import annotations

from typing import Any

from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_IGNORE
from asyncssh.packet import String

FRESH_IV_CIPHERS = frozenset({
    "chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
    "aes128-ctr", "aes192-ctr", "aes256-ctr",
})
"""Ciphers whose packets need no ignore packet between them: a nonce or counter per packet, not a chained IV."""

_EMPTY = String(b"")
_send_packet = SSHConnection.send_packet


def _send_packet_unless_needless_ignore(
    self: SSHConnection, pkttype: int, *args: bytes, handler: Any = None
) -> None:
    if pkttype == MSG_IGNORE and args == (_EMPTY,) and self.get_extra_info("send_cipher") in FRESH_IV_CIPHERS:
        return
    _send_packet(self, pkttype, *args, handler=handler)


def drop_needless_ignore_packets() -> None:
    """From now on, in this process, asyncssh sends its empty ``MSG_IGNORE`` only under CBC ciphers (idempotent)."""
    SSHConnection.send_packet = _send_packet_unless_needless_ignore  # type: ignore[method-assign]

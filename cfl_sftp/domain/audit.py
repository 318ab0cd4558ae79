"""The audit trail's cryptography (SPEC 8): canonical entries, the RFC 9162 Merkle tree, signed checkpoints.

An audit entry is one JSON object serialised as RFC 8785 (JCS) bytes; those exact bytes are the leaves of an
RFC 9162 Merkle tree. The service keeps a :class:`CompactRange` (the roots of the tree's perfect subtrees) so
that appending an entry costs O(log n) hashes, and periodically signs a checkpoint of the tree: a C2SP
``tlog-checkpoint`` body wrapped in a C2SP ``signed-note`` with an Ed25519 key whose name is the log's origin.
Proofs (inclusion of one entry, consistency of an older checkpoint with a newer one) let an auditor check the
trail with nothing but SHA-256.

This module is pure computation over bytes and values. It does not read entries from the database, allocate
``seq`` numbers, decide when to sign, or load keys: ``storage`` and the CLI do, and hand it what they read.
Verification functions return ``False`` (proofs) or raise :class:`CheckpointError` (notes) and never trust
their input: everything they parse may come from an attacker.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

HASH_SIZE = 32
"""SHA-256: every leaf hash, node hash, root and proof element is this long."""

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""The root of the empty tree (RFC 9162 2.1.1)."""

ENTRY_FIELDS = frozenset({"seq", "time", "event", "actor", "organisation", "peer", "details"})
"""The fields every entry carries (SPEC 8); an entry may carry more."""

AUDIT_EVENTS = frozenset(
    {
        "login-accepted",
        "login-refused",
        "address-banned",
        "session-refused",
        "session-closed",
        "package-received",
        "partial-upload",
        "staging-expired",
        "image-downloaded",
        "manifest-downloaded",
        "release-note-read",
        "access-denied",
        "policy-reloaded",
        "policy-refused",
        "held-released",
        "held-purged",
        "key-rotated",
    }
)
"""The ``event`` names of SPEC 8, for callers that want to check theirs against the contract."""

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


# --- entries -----------------------------------------------------------------------------------------------


def canonical_entry(fields: Mapping[str, object]) -> bytes:
    """The RFC 8785 bytes of one entry: what is hashed into the tree and what auditors download.

    JCS makes the bytes a function of the values alone (key order, number and string escaping are fixed), so
    anyone can re-serialise a parsed entry and get the leaf back. Raises ``ValueError`` when a field of SPEC 8
    is missing, or (``rfc8785.CanonicalizationError``, a ``ValueError``) when a value has no canonical form,
    such as an integer beyond 2**53 or a NaN.
    """
    missing = ENTRY_FIELDS - fields.keys()
    if missing:
        raise ValueError(f"audit entry lacks {', '.join(sorted(missing))}")
    # rfc8785 checks every value's type as it serialises, and raises on any it cannot represent.
    return rfc8785.dumps(dict(fields))  # type: ignore[arg-type]


# --- the Merkle tree (RFC 9162 2.1) -------------------------------------------------------------------------


def leaf_hash(entry: bytes) -> bytes:
    """SHA-256(0x00 || entry): the prefix keeps a leaf from ever being taken for an inner node."""
    return hashlib.sha256(_LEAF_PREFIX + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH of the tree whose leaves have these hashes; the empty tree's is SHA-256("").

    Computed level by level, pairing neighbours and carrying an odd last node up unchanged: that builds
    exactly RFC 9162's left-leaning tree (split at the largest power of two below n) without recursion, in
    n - 1 node hashes.
    """
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2): where RFC 9162 splits a tree of n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_proof(leaf_hashes: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """The audit path (RFC 9162 2.1.3.1, PATH) of leaf ``index`` in the tree of the first ``size`` leaves.

    The subtrees hashed along the way are disjoint, so this costs O(size) hashes in all.
    """
    if not 0 <= index < size <= len(leaf_hashes):
        raise ValueError(f"no leaf {index} in a tree of {size} (of {len(leaf_hashes)} known)")
    path: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(root_from_leaf_hashes(leaf_hashes[lo + k : hi]))
            hi = lo + k
        else:
            path.append(root_from_leaf_hashes(leaf_hashes[lo : lo + k]))
            lo += k
    path.reverse()
    return path


def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """Whether ``proof`` shows the leaf with ``leaf_hash`` at ``index`` in the tree of ``size`` with ``root``.

    The algorithm of RFC 9162 2.1.3.2, step for step.
    """
    if not 0 <= index < size or any(len(p) != HASH_SIZE for p in proof):
        return False
    fn, sn = index, size - 1
    r = leaf_hash
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def consistency_proof(leaf_hashes: Sequence[bytes], old_size: int, new_size: int) -> list[bytes]:
    """The proof (RFC 9162 2.1.4.1, SUBPROOF) that the first ``old_size`` leaves' tree is a prefix of the
    ``new_size`` one.

    Empty when there is nothing to prove (``old_size`` 0 or equal to ``new_size``). The subtrees hashed are
    disjoint, so this costs O(new_size) hashes in all.
    """
    if not 0 <= old_size <= new_size <= len(leaf_hashes):
        raise ValueError(f"no consistency proof from {old_size} to {new_size} (of {len(leaf_hashes)} known)")
    if old_size in (0, new_size):
        return []
    proof: list[bytes] = []
    lo, hi = 0, new_size
    complete = True  # SUBPROOF's b: the old tree is a whole subtree of the new one, whose root is known
    while hi != old_size:
        k = _split(hi - lo)
        if old_size - lo <= k:
            proof.append(root_from_leaf_hashes(leaf_hashes[lo + k : hi]))
            hi = lo + k
        else:
            proof.append(root_from_leaf_hashes(leaf_hashes[lo : lo + k]))
            lo += k
            complete = False
    if not complete:
        proof.append(root_from_leaf_hashes(leaf_hashes[lo:hi]))
    proof.reverse()
    return proof


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether ``proof`` shows that the tree (``old_size``, ``old_root``) is a prefix of (``new_size``,
    ``new_root``).

    The algorithm of RFC 9162 2.1.4.2 for 0 < old_size < new_size. The edge cases RFC 9162 leaves out: equal
    sizes need equal roots and an empty proof; the empty tree is a prefix of every tree, with an empty proof.
    """
    if not 0 <= old_size <= new_size or any(len(p) != HASH_SIZE for p in proof):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0


class CompactRange:
    """The right edge of the tree: its size and the roots of its perfect subtrees, largest (leftmost) first.

    A tree of n leaves is a row of perfect subtrees, one per set bit of n, so this is at most 64 hashes and
    is everything needed to append a leaf (O(log n) hashes, merging equal-sized subtrees like a binary
    counter's carries) and to compute the root. Mutable on purpose: storage loads it from its one row, appends
    the entries of a transaction and writes it back in that same transaction.
    """

    __slots__ = ("_hashes", "_size")

    _FORMAT = 1
    _HEADER = 9  # format byte, then the size as 8 bytes big-endian

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []

    @property
    def size(self) -> int:
        """The number of leaves appended."""
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        """The perfect subtrees' roots, left to right (``size``'s set bits, high to low)."""
        return tuple(self._hashes)

    def append(self, leaf_hash: bytes) -> None:
        """Add one leaf by its hash."""
        if len(leaf_hash) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {HASH_SIZE} bytes, not {len(leaf_hash)}")
        node = leaf_hash
        carries = self._size
        while carries & 1:
            node = node_hash(self._hashes.pop(), node)
            carries >>= 1
        self._hashes.append(node)
        self._size += 1

    def root(self) -> bytes:
        """The tree's MTH: the subtrees folded from the right, as RFC 9162 splits them."""
        if not self._hashes:
            return EMPTY_ROOT
        node = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            node = node_hash(left, node)
        return node

    def to_bytes(self) -> bytes:
        """One byte of format, the size (8 bytes big-endian), then the hashes: at most 2,057 bytes."""
        return bytes([self._FORMAT]) + self._size.to_bytes(8, "big") + b"".join(self._hashes)

    @classmethod
    def from_bytes(cls, data: bytes) -> CompactRange:
        """The inverse of :meth:`to_bytes`; ``ValueError`` unless the bytes are well formed."""
        if len(data) < cls._HEADER or data[0] != cls._FORMAT:
            raise ValueError("not a compact range")
        size = int.from_bytes(data[1 : cls._HEADER], "big")
        body = data[cls._HEADER :]
        if len(body) != HASH_SIZE * size.bit_count():
            raise ValueError(f"a compact range of size {size} holds {size.bit_count()} hashes")
        compact = cls()
        compact._size = size
        compact._hashes = [body[i : i + HASH_SIZE] for i in range(0, len(body), HASH_SIZE)]
        return compact

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self._size == other._size and self._hashes == other._hashes

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, root={self.root().hex()})"


# --- signed notes (C2SP signed-note) and checkpoints (C2SP tlog-checkpoint) ---------------------------------


class CheckpointError(Exception):
    """A signed note or checkpoint is malformed, or is not signed by the expected key."""


_SIGNATURE_ED25519 = 0x01
_KEY_ID_SIZE = 4
_SIGNATURE_PREFIX = "— "  # an em dash (U+2014) and a space
_MAX_SIGNATURES = 100  # as the reference implementation: a bound on work for a hostile note
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")
_KEY_ID_HEX = re.compile(r"[0-9a-f]{8}")


def _check_key_name(name: str) -> None:
    """C2SP signed-note: a key name is non-empty, with no Unicode space and no ``+``."""
    if not name or "+" in name or any(ch.isspace() for ch in name) or _CONTROL.search(name):
        raise ValueError(f"{name!r} is not a valid key name (non-empty, no spaces, no '+')")


def _b64decode(text: str) -> bytes:
    """Standard padded base64, refusing anything a re-encoding would not give back."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise CheckpointError("bad base64") from exc
    if base64.b64encode(raw).decode("ascii") != text:
        raise CheckpointError("non-canonical base64")
    return raw


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte key ID of an Ed25519 key: SHA-256(name || 0x0A || 0x01 || public key)[:4]."""
    _check_key_name(name)
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    material = name.encode("utf-8") + b"\n" + bytes([_SIGNATURE_ED25519]) + public_key
    return hashlib.sha256(material).digest()[:_KEY_ID_SIZE]


def verifier_key(name: str, public_key: bytes) -> str:
    """The C2SP verifier key ``<name>+<8-hex key id>+<base64(0x01 || public key)>``, served as key.vkey."""
    return f"{name}+{key_id(name, public_key).hex()}+{_b64(bytes([_SIGNATURE_ED25519]) + public_key)}"


@dataclass(frozen=True, slots=True)
class VerifierKey:
    """A parsed verifier key: whose (``name``), which (``key_id``) and the Ed25519 ``public_key`` itself."""

    name: str
    key_id: bytes
    public_key: bytes


def parse_verifier_key(vkey: str) -> VerifierKey:
    """Parse ``<name>+<hex id>+<base64 key>``, checking the algorithm and that the ID matches the key."""
    name, plus, rest = vkey.partition("+")
    hex_id, plus2, encoded = rest.partition("+")
    if not (plus and plus2):
        raise CheckpointError("a verifier key is <name>+<key id>+<key>")
    try:
        _check_key_name(name)
    except ValueError as exc:
        raise CheckpointError(f"verifier key: {exc}") from exc
    if not _KEY_ID_HEX.fullmatch(hex_id):
        raise CheckpointError("verifier key: the key id is not 8 lower-case hex digits")
    material = _b64decode(encoded)
    if len(material) != 33 or material[0] != _SIGNATURE_ED25519:
        raise CheckpointError("verifier key: not an Ed25519 key (type 0x01, 32 bytes)")
    public_key = material[1:]
    if key_id(name, public_key).hex() != hex_id:
        raise CheckpointError("verifier key: the key id does not match the key")
    return VerifierKey(name=name, key_id=bytes.fromhex(hex_id), public_key=public_key)


def _raw_public_key(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign_note(text: bytes, name: str, private_key: Ed25519PrivateKey) -> str:
    """A C2SP signed note: ``text``, a blank line, and ``— <name> <base64(key id || signature)>``.

    Ed25519 signatures are deterministic, so signing the same text with the same key gives the same note on
    every node: two checkpoints of one tree size are identical.
    """
    try:
        body = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("a note's text is UTF-8") from exc
    if not body.endswith("\n") or _CONTROL.search(body):
        raise ValueError("a note's text ends with a newline and has no other control characters")
    signature = key_id(name, _raw_public_key(private_key)) + private_key.sign(text)
    return f"{body}\n{_SIGNATURE_PREFIX}{name} {_b64(signature)}\n"


def open_note(note: str, verifier: str) -> bytes:
    """The text of ``note`` once a signature by ``verifier`` checks; :class:`CheckpointError` otherwise.

    As C2SP signed-note says: signatures by other keys are ignored, but a signature that claims to be by
    ``verifier`` (same name and key ID) and does not verify is an error, and so is any malformed line.
    """
    key = parse_verifier_key(verifier)
    split = note.rfind("\n\n")
    if split < 0 or _CONTROL.search(note):
        raise CheckpointError("malformed note: no signature block, or a control character")
    text, block = note[: split + 1], note[split + 2 :]
    if not block.endswith("\n"):
        raise CheckpointError("malformed note: the signatures do not end with a newline")
    lines = block[:-1].split("\n")
    if len(lines) > _MAX_SIGNATURES:
        raise CheckpointError(f"malformed note: more than {_MAX_SIGNATURES} signatures")
    public_key = Ed25519PublicKey.from_public_bytes(key.public_key)
    verified = False
    for line in lines:
        if not line.startswith(_SIGNATURE_PREFIX):
            raise CheckpointError("malformed note: a signature line does not start with '— '")
        name, space, encoded = line[len(_SIGNATURE_PREFIX) :].partition(" ")
        try:
            _check_key_name(name)
        except ValueError as exc:
            raise CheckpointError(f"malformed note: {exc}") from exc
        if not space or " " in encoded:
            raise CheckpointError("malformed note: a signature line is '— <name> <base64>'")
        signature = _b64decode(encoded)
        if len(signature) <= _KEY_ID_SIZE:
            raise CheckpointError("malformed note: a signature is too short")
        if name != key.name or signature[:_KEY_ID_SIZE] != key.key_id:
            continue
        try:
            public_key.verify(signature[_KEY_ID_SIZE:], text.encode("utf-8"))
        except InvalidSignature:
            raise CheckpointError(f"invalid signature for key {name}+{key.key_id.hex()}") from None
        verified = True
    if not verified:
        raise CheckpointError(f"the note has no signature by key {key.name}+{key.key_id.hex()}")
    return text.encode("utf-8")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What a verified checkpoint commits to: the log (``origin``), its tree ``size`` and ``root`` hash."""

    origin: str
    size: int
    root: bytes

    def body(self) -> bytes:
        """The tlog-checkpoint text that was signed."""
        return checkpoint_body(self.origin, self.size, self.root)


def checkpoint_body(origin: str, size: int, root: bytes) -> bytes:
    """``<origin>\\n<size>\\n<base64 root>\\n``: a C2SP tlog-checkpoint with no extension lines."""
    _check_key_name(origin)
    if not 0 <= size < 1 << 63:
        raise ValueError(f"tree size {size} is out of range")
    if len(root) != HASH_SIZE:
        raise ValueError(f"a root hash is {HASH_SIZE} bytes")
    return f"{origin}\n{size}\n{_b64(root)}\n".encode()


def sign_checkpoint(origin: str, size: int, root: bytes, private_key: Ed25519PrivateKey) -> str:
    """The signed checkpoint of the tree (``size``, ``root``), with the origin as the key name (SPEC 8)."""
    return sign_note(checkpoint_body(origin, size, root), origin, private_key)


def open_checkpoint(note: str, verifier: str) -> Checkpoint:
    """Verify a signed checkpoint against ``verifier`` and return what it commits to.

    Refuses (:class:`CheckpointError`) a note with no valid signature by that key, a checkpoint whose origin
    is not the key's name (SPEC 8 signs with key name = origin), and any body other than exactly origin, size
    and root: this log writes no extension lines, so a checkpoint with any is not one of its own.
    """
    text = open_note(note, verifier).decode("utf-8")
    lines = text.split("\n")
    if len(lines) != 4:
        raise CheckpointError("malformed checkpoint: expected origin, size and root lines only")
    origin, size_text, root_text, _ = lines
    if origin != parse_verifier_key(verifier).name:
        raise CheckpointError(f"checkpoint origin {origin!r} is not the verifier key's name")
    if not _DECIMAL.fullmatch(size_text) or int(size_text) >= 1 << 63:
        raise CheckpointError("malformed checkpoint: the tree size is not a canonical decimal")
    root = _b64decode(root_text)
    if len(root) != HASH_SIZE:
        raise CheckpointError(f"malformed checkpoint: the root hash is not {HASH_SIZE} bytes")
    return Checkpoint(origin=origin, size=int(size_text), root=root)

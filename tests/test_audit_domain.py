"""The audit trail's cryptography on bytes: RFC 9162 trees, proofs, compact ranges and signed checkpoints."""

from __future__ import annotations

import base64
import hashlib
import random
from collections.abc import Callable, Sequence

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from cfl_sftp.domain.audit import (
    EMPTY_ROOT,
    Checkpoint,
    CheckpointError,
    CompactRange,
    canonical_entry,
    checkpoint_body,
    consistency_proof,
    inclusion_proof,
    key_id,
    leaf_hash,
    node_hash,
    open_checkpoint,
    open_note,
    parse_verifier_key,
    root_from_leaf_hashes,
    sign_checkpoint,
    sign_note,
    verifier_key,
    verify_consistency,
    verify_inclusion,
)

# --- vectors -----------------------------------------------------------------------------------------------

# RFC 6962 / RFC 9162 reference leaves and roots (/work/shared/merkle-test-vectors.md, from Certificate
# Transparency's reference tests).
CT_LEAVES = [
    bytes.fromhex(h)
    for h in (
        *("", "00", "10", "2021", "3031", "40414243"),
        *("5051525354555657", "606162636465666768696a6b6c6d6e6f"),
    )
]
CT_ROOTS = {
    0: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}
_H96 = "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"
_H5F = "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"
_H6B = "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"
_HBC = "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"
_HCA = "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"
_H0E = "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"
# Certificate Transparency's reference inclusion and consistency proofs over the same leaves.
CT_INCLUSION = [
    (0, 1, []),
    (0, 8, [_H96, _H5F, _H6B]),
    (5, 8, [_HBC, _HCA, CT_ROOTS[4]]),
    (2, 3, [CT_ROOTS[2]]),
    (1, 5, [CT_ROOTS[1], _H5F, _HBC]),
]
CT_CONSISTENCY = [
    (1, 1, []),
    (1, 8, [_H96, _H5F, _H6B]),
    (6, 8, [_H0E, _HCA, CT_ROOTS[4]]),
    (2, 5, [_H5F, _HBC]),
]

# The example key and note of the reference signed-note implementation (golang.org/x/mod/sumdb/note,
# note_test.go): a signer that reproduces this note byte for byte interoperates with every C2SP verifier.
GO_SIGNER_SEED_B64 = "AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"  # 0x01 || Ed25519 seed
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    b"If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
)
GO_SIGNATURE_LINE = (
    "— PeterNeumann "
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
GO_NOTE = GO_TEXT.decode() + "\n" + GO_SIGNATURE_LINE
GO_OTHER_SIGNATURE_LINE = (
    "— EnochRoot "
    "rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"
)


def reference_root(hashes: Sequence[bytes]) -> bytes:
    """MTH exactly as RFC 9162 2.1.1 defines it, recursively: the yardstick for the fast versions."""
    if not hashes:
        return hashlib.sha256(b"").digest()
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return node_hash(reference_root(hashes[:k]), reference_root(hashes[k:]))


def random_leaf_hashes(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [leaf_hash(rng.randbytes(rng.randrange(0, 40))) for _ in range(n)]


def flipped(data: bytes, at: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@pytest.fixture(scope="module")
def log_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def log_vkey(log_key: Ed25519PrivateKey) -> str:
    return verifier_key("cfl-sftp", raw_public(log_key))


# --- entries -----------------------------------------------------------------------------------------------


def entry_fields(**extra: object) -> dict[str, object]:
    return {
        "seq": 1,
        "time": "2026-11-24T08:30:00.000000Z",
        "event": "login-accepted",
        "actor": "alice",
        "organisation": "acme",
        "peer": "192.0.2.1",
        "details": {},
        **extra,
    }


def test_canonical_entry_is_rfc_8785_with_sorted_keys_and_no_spaces() -> None:
    fields = entry_fields(details={"z": "é", "a": [1, 2.5, None, True]})
    assert (
        canonical_entry(fields)
        == (
            '{"actor":"alice","details":{"a":[1,2.5,null,true],"z":"é"},"event":"login-accepted",'
            '"organisation":"acme","peer":"192.0.2.1","seq":1,"time":"2026-11-24T08:30:00.000000Z"}'
        ).encode()
    )


def test_canonical_entry_does_not_depend_on_the_order_of_the_fields() -> None:
    fields = entry_fields(details={"b": 1, "a": 2})
    shuffled = dict(reversed(list(fields.items())))
    assert canonical_entry(shuffled) == canonical_entry(fields)


def test_canonical_entry_refuses_an_entry_without_the_fields_of_the_spec() -> None:
    fields = entry_fields()
    del fields["peer"]
    with pytest.raises(ValueError, match="peer"):
        canonical_entry(fields)


def test_canonical_entry_refuses_a_value_json_cannot_carry_exactly() -> None:
    with pytest.raises(ValueError, match="safe integer"):
        canonical_entry(entry_fields(details={"bytes_served": 2**60}))


# --- the tree ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", sorted(CT_ROOTS))
def test_root_of_the_reference_leaves_matches_the_published_root(n: int) -> None:
    hashes = [leaf_hash(leaf) for leaf in CT_LEAVES[:n]]
    assert root_from_leaf_hashes(hashes).hex() == CT_ROOTS[n]


@pytest.mark.parametrize("n", sorted(CT_ROOTS))
def test_compact_range_of_the_reference_leaves_matches_the_published_root(n: int) -> None:
    compact = CompactRange()
    for leaf in CT_LEAVES[:n]:
        compact.append(leaf_hash(leaf))
    assert compact.size == n
    assert compact.root().hex() == CT_ROOTS[n]


def test_the_empty_tree_has_the_hash_of_the_empty_string() -> None:
    assert root_from_leaf_hashes([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert CompactRange().root() == EMPTY_ROOT


def test_root_matches_the_recursive_definition_of_rfc_9162_for_every_size_up_to_64() -> None:
    hashes = random_leaf_hashes(64, seed=1)
    for n in range(65):
        assert root_from_leaf_hashes(hashes[:n]) == reference_root(hashes[:n]), n


def test_compact_range_gives_the_full_computations_root_after_every_append_up_to_64() -> None:
    for seed in range(3):
        hashes = random_leaf_hashes(64, seed=seed)
        compact = CompactRange()
        assert compact.root() == reference_root([])
        for n, leaf in enumerate(hashes, start=1):
            compact.append(leaf)
            assert compact.root() == reference_root(hashes[:n]), n


def test_compact_range_holds_one_hash_per_set_bit_of_its_size() -> None:
    compact = CompactRange()
    for n, leaf in enumerate(random_leaf_hashes(100, seed=4), start=1):
        compact.append(leaf)
        assert len(compact.hashes) == n.bit_count()


def test_compact_range_survives_a_round_trip_through_its_row() -> None:
    hashes = random_leaf_hashes(45, seed=5)
    compact = CompactRange()
    for leaf in hashes[:37]:
        compact.append(leaf)
    restored = CompactRange.from_bytes(compact.to_bytes())
    assert restored == compact
    for leaf in hashes[37:]:
        restored.append(leaf)
    assert restored.root() == reference_root(hashes)


def test_an_empty_compact_range_survives_a_round_trip() -> None:
    assert CompactRange.from_bytes(CompactRange().to_bytes()) == CompactRange()


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[:-1],
        lambda b: b + b"\x00" * 32,
        lambda b: b"\x02" + b[1:],
        lambda b: b[:5],
        lambda b: b"",
    ],
    ids=["short-hash", "extra-hash", "unknown-format", "truncated-size", "empty"],
)
def test_compact_range_refuses_bytes_that_are_not_one(mangle: Callable[[bytes], bytes]) -> None:
    compact = CompactRange()
    for leaf in random_leaf_hashes(7, seed=6):
        compact.append(leaf)
    with pytest.raises(ValueError, match="compact range"):
        CompactRange.from_bytes(mangle(compact.to_bytes()))


def test_compact_range_refuses_a_leaf_hash_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        CompactRange().append(b"\x00" * 31)


# --- inclusion proofs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("index", "size", "expected"), CT_INCLUSION)
def test_inclusion_proof_of_the_reference_leaves_matches_the_published_path(
    index: int, size: int, expected: list[str]
) -> None:
    hashes = [leaf_hash(leaf) for leaf in CT_LEAVES]
    proof = inclusion_proof(hashes, index, size)
    assert [p.hex() for p in proof] == expected
    assert verify_inclusion(hashes[index], index, size, proof, bytes.fromhex(CT_ROOTS[size]))


def test_inclusion_proofs_verify_for_every_index_of_every_size_up_to_40() -> None:
    hashes = random_leaf_hashes(40, seed=7)
    for size in range(1, 41):
        root = reference_root(hashes[:size])
        for index in range(size):
            proof = inclusion_proof(hashes, index, size)
            assert verify_inclusion(hashes[index], index, size, proof, root), (index, size)


def test_tampered_inclusion_proofs_fail_for_every_index_of_every_size_up_to_40() -> None:
    hashes = random_leaf_hashes(40, seed=8)
    for size in range(1, 41):
        root = reference_root(hashes[:size])
        for index in range(size):
            proof = inclusion_proof(hashes, index, size)
            leaf = hashes[index]
            assert not verify_inclusion(flipped(leaf), index, size, proof, root)
            assert not verify_inclusion(leaf, index, size, proof, flipped(root))
            assert not verify_inclusion(leaf, index, size, [*proof, leaf], root)
            assert not verify_inclusion(leaf, size, size, proof, root)
            if size > 1:
                assert not verify_inclusion(leaf, (index + 1) % size, size, proof, root)
            for at in range(len(proof)):
                assert not verify_inclusion(leaf, index, size, [*proof[:at], flipped(proof[at])], root)
                assert not verify_inclusion(leaf, index, size, proof[:at] + proof[at + 1 :], root)


def test_an_inclusion_proof_for_another_tree_size_fails() -> None:
    hashes = random_leaf_hashes(21, seed=9)
    proof = inclusion_proof(hashes, 3, 20)
    assert not verify_inclusion(hashes[3], 3, 19, proof, reference_root(hashes[:19]))
    assert not verify_inclusion(hashes[3], 3, 21, proof, reference_root(hashes[:21]))


@pytest.mark.parametrize(("index", "size"), [(0, 0), (5, 5), (-1, 3), (0, 11)])
def test_inclusion_proof_refuses_a_leaf_outside_the_tree(index: int, size: int) -> None:
    with pytest.raises(ValueError, match="no leaf"):
        inclusion_proof(random_leaf_hashes(10, seed=10), index, size)


# --- consistency proofs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new", "expected"), CT_CONSISTENCY)
def test_consistency_proof_of_the_reference_leaves_matches_the_published_proof(
    old: int, new: int, expected: list[str]
) -> None:
    hashes = [leaf_hash(leaf) for leaf in CT_LEAVES]
    proof = consistency_proof(hashes, old, new)
    assert [p.hex() for p in proof] == expected
    assert verify_consistency(old, new, bytes.fromhex(CT_ROOTS[old]), bytes.fromhex(CT_ROOTS[new]), proof)


def test_consistency_proofs_verify_for_every_pair_of_sizes_up_to_40() -> None:
    hashes = random_leaf_hashes(40, seed=11)
    roots = [reference_root(hashes[:n]) for n in range(41)]
    for new in range(41):
        for old in range(new + 1):
            proof = consistency_proof(hashes, old, new)
            assert verify_consistency(old, new, roots[old], roots[new], proof), (old, new)


def test_tampered_consistency_proofs_fail_for_every_pair_of_sizes_up_to_40() -> None:
    hashes = random_leaf_hashes(40, seed=12)
    roots = [reference_root(hashes[:n]) for n in range(41)]
    for new in range(1, 41):
        for old in range(1, new + 1):
            proof = consistency_proof(hashes, old, new)
            old_root, new_root = roots[old], roots[new]
            assert not verify_consistency(old, new, flipped(old_root), new_root, proof)
            assert not verify_consistency(old, new, old_root, flipped(new_root), proof)
            assert not verify_consistency(old, new, old_root, new_root, [*proof, old_root])
            if old != new:
                assert not verify_consistency(new, old, new_root, old_root, proof)
            for at in range(len(proof)):
                assert not verify_consistency(old, new, old_root, new_root, [*proof[:at], flipped(proof[at])])
                assert not verify_consistency(old, new, old_root, new_root, proof[:at] + proof[at + 1 :])


def test_a_rewritten_history_is_not_consistent_with_the_old_checkpoint() -> None:
    hashes = random_leaf_hashes(30, seed=13)
    old_root = reference_root(hashes[:17])
    rewritten = [*hashes[:9], leaf_hash(b"forged"), *hashes[10:]]
    proof = consistency_proof(rewritten, 17, 30)
    assert not verify_consistency(17, 30, old_root, reference_root(rewritten), proof)


def test_the_empty_tree_is_consistent_with_every_tree_by_an_empty_proof() -> None:
    hashes = random_leaf_hashes(5, seed=14)
    assert consistency_proof(hashes, 0, 5) == []
    assert verify_consistency(0, 5, EMPTY_ROOT, reference_root(hashes), [])
    assert not verify_consistency(0, 5, flipped(EMPTY_ROOT), reference_root(hashes), [])
    assert not verify_consistency(0, 5, EMPTY_ROOT, reference_root(hashes), [hashes[0]])


@pytest.mark.parametrize(("old", "new"), [(3, 2), (-1, 4), (2, 11)])
def test_consistency_proof_refuses_sizes_that_are_not_a_prefix(old: int, new: int) -> None:
    with pytest.raises(ValueError, match="no consistency proof"):
        consistency_proof(random_leaf_hashes(10, seed=15), old, new)


# --- signed notes and checkpoints ---------------------------------------------------------------------------


def go_signer() -> Ed25519PrivateKey:
    material = base64.b64decode(GO_SIGNER_SEED_B64)
    assert material[0] == 0x01
    return Ed25519PrivateKey.from_private_bytes(material[1:])


def test_key_id_and_verifier_key_match_the_reference_implementation() -> None:
    public = raw_public(go_signer())
    assert key_id("PeterNeumann", public).hex() == "c74f20a3"
    assert verifier_key("PeterNeumann", public) == GO_VKEY


def test_a_signed_note_matches_the_reference_implementation_byte_for_byte() -> None:
    assert sign_note(GO_TEXT, "PeterNeumann", go_signer()) == GO_NOTE


def test_the_reference_note_opens_and_another_keys_signature_is_ignored() -> None:
    assert open_note(GO_NOTE, GO_VKEY) == GO_TEXT
    assert open_note(GO_NOTE + GO_OTHER_SIGNATURE_LINE, GO_VKEY) == GO_TEXT


def test_a_note_with_only_another_keys_signature_does_not_open() -> None:
    with pytest.raises(CheckpointError, match="no signature by key"):
        open_note(GO_TEXT.decode() + "\n" + GO_OTHER_SIGNATURE_LINE, GO_VKEY)


@pytest.mark.parametrize(
    "note",
    [
        GO_TEXT.decode(),
        GO_TEXT.decode() + "\n",
        GO_NOTE[:-1],
        "\x01" + GO_NOTE,
        GO_TEXT.decode() + "\n" + GO_SIGNATURE_LINE.replace("PeterNeumann", "Peter Neumann"),
        GO_NOTE + "Unexpected line.\n",
        GO_TEXT.decode() + "\n" + GO_SIGNATURE_LINE * 101,
        GO_TEXT.decode() + "\n" + GO_SIGNATURE_LINE.replace("x08go", "x08g!"),
        GO_TEXT.decode() + "\n" + "— PeterNeumann AAAA\n",
    ],
    ids=[
        "no-signatures",
        "empty-signature-block",
        "no-final-newline",
        "control-character",
        "space-in-name",
        "unexpected-line",
        "too-many-signatures",
        "bad-base64",
        "signature-too-short",
    ],
)
def test_a_malformed_note_does_not_open(note: str) -> None:
    with pytest.raises(CheckpointError):
        open_note(note, GO_VKEY)


def test_a_note_whose_signature_by_the_expected_key_is_bad_does_not_open_even_beside_a_good_one() -> None:
    blob = base64.b64decode(GO_SIGNATURE_LINE.split()[2])
    bad_line = f"— PeterNeumann {base64.b64encode(flipped(blob, 10)).decode()}\n"
    with pytest.raises(CheckpointError, match="invalid signature"):
        open_note(GO_TEXT.decode() + "\n" + GO_SIGNATURE_LINE + bad_line, GO_VKEY)


def test_verifier_key_mangled_anywhere_is_refused() -> None:
    assert parse_verifier_key(GO_VKEY).name == "PeterNeumann"
    for start in range(len(GO_VKEY)):
        for stop in range(start + 1, len(GO_VKEY) + 1):
            if (start, stop) != (0, len(GO_VKEY)):
                with pytest.raises(CheckpointError):
                    parse_verifier_key(GO_VKEY[start:stop])
    for at in range(len(GO_VKEY)):
        mangled = GO_VKEY[:at] + chr(ord(GO_VKEY[at]) + 1) + GO_VKEY[at + 1 :]
        with pytest.raises(CheckpointError):
            parse_verifier_key(mangled)


def test_verifier_key_of_another_algorithm_is_refused_even_with_a_matching_id() -> None:
    public = raw_public(go_signer())
    material = b"\x02" + public
    fake_id = hashlib.sha256(b"PeterNeumann\n" + material).digest()[:4].hex()
    with pytest.raises(CheckpointError, match="Ed25519"):
        parse_verifier_key(f"PeterNeumann+{fake_id}+{base64.b64encode(material).decode()}")


def test_a_checkpoint_round_trips(log_key: Ed25519PrivateKey, log_vkey: str) -> None:
    root = reference_root(random_leaf_hashes(12, seed=16))
    note = sign_checkpoint("cfl-sftp", 12, root, log_key)
    assert open_checkpoint(note, log_vkey) == Checkpoint(origin="cfl-sftp", size=12, root=root)


def test_the_checkpoint_of_the_empty_tree_round_trips(log_key: Ed25519PrivateKey, log_vkey: str) -> None:
    note = sign_checkpoint("cfl-sftp", 0, EMPTY_ROOT, log_key)
    assert open_checkpoint(note, log_vkey) == Checkpoint("cfl-sftp", 0, EMPTY_ROOT)


def test_two_nodes_sign_identical_checkpoints_of_one_tree_size(log_key: Ed25519PrivateKey) -> None:
    pem = log_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    other_node_key = load_pem_private_key(pem, password=None)
    assert isinstance(other_node_key, Ed25519PrivateKey)
    root = reference_root(random_leaf_hashes(5, seed=17))
    first = sign_checkpoint("cfl-sftp", 5, root, log_key)
    assert sign_checkpoint("cfl-sftp", 5, root, log_key) == first
    assert sign_checkpoint("cfl-sftp", 5, root, other_node_key) == first


def test_a_signed_checkpoint_is_exactly_the_c2sp_format(log_key: Ed25519PrivateKey) -> None:
    root = reference_root(random_leaf_hashes(3, seed=18))
    note = sign_checkpoint("example.org/log", 3, root, log_key)

    body = b"example.org/log\n3\n" + base64.b64encode(root) + b"\n"
    assert checkpoint_body("example.org/log", 3, root) == body
    head, signature_line = note.encode().split(b"\n\n")
    assert head + b"\n" == body
    assert signature_line.startswith("\u2014 example.org/log ".encode())
    assert signature_line.endswith(b"\n")
    assert signature_line.count(b"\n") == 1
    blob = base64.b64decode(signature_line.rstrip(b"\n").split(b" ")[2], validate=True)
    assert len(blob) == 4 + 64
    public = raw_public(log_key)
    assert blob[:4] == hashlib.sha256(b"example.org/log" + b"\x0a" + b"\x01" + public).digest()[:4]
    Ed25519PublicKey.from_public_bytes(public).verify(blob[4:], body)  # raises if not a signature of body
    encoded_key = base64.b64encode(b"\x01" + public).decode()
    assert verifier_key("example.org/log", public) == f"example.org/log+{blob[:4].hex()}+{encoded_key}"


def _with_body(note: str, new_head: str) -> str:
    """``note`` with its body replaced but its signature line kept."""
    return new_head + "\n\n" + note.split("\n\n")[1]


@pytest.mark.parametrize(
    "alter",
    [
        lambda lines: [lines[0], str(int(lines[1]) + 1), lines[2]],
        lambda lines: [lines[0], lines[1], base64.b64encode(flipped(base64.b64decode(lines[2]))).decode()],
        lambda lines: ["cfl-sftq", lines[1], lines[2]],
    ],
    ids=["size", "root", "origin"],
)
def test_a_checkpoint_with_an_altered_body_is_refused(
    log_key: Ed25519PrivateKey, log_vkey: str, alter: Callable[[list[str]], list[str]]
) -> None:
    note = sign_checkpoint("cfl-sftp", 9, reference_root(random_leaf_hashes(9, seed=19)), log_key)
    lines = note.split("\n\n")[0].split("\n")
    with pytest.raises(CheckpointError):
        open_checkpoint(_with_body(note, "\n".join(alter(lines))), log_vkey)


def test_a_checkpoint_with_an_altered_signature_is_refused(log_key: Ed25519PrivateKey, log_vkey: str) -> None:
    note = sign_checkpoint("cfl-sftp", 9, reference_root(random_leaf_hashes(9, seed=20)), log_key)
    head, line = note.split("\n\n")
    prefix, encoded = line.rstrip("\n").rsplit(" ", 1)
    for at in (4, 20, 67):  # the signature's first, a middle and its last byte
        mangled = base64.b64encode(flipped(base64.b64decode(encoded), at)).decode()
        with pytest.raises(CheckpointError, match="invalid signature"):
            open_checkpoint(f"{head}\n\n{prefix} {mangled}\n", log_vkey)


def test_a_checkpoint_signed_by_another_key_of_the_same_name_is_refused(log_vkey: str) -> None:
    impostor = Ed25519PrivateKey.generate()
    note = sign_checkpoint("cfl-sftp", 1, leaf_hash(b"x"), impostor)
    with pytest.raises(CheckpointError, match="no signature by key"):
        open_checkpoint(note, log_vkey)


def test_a_forged_signature_carrying_the_right_key_id_is_refused(
    log_key: Ed25519PrivateKey, log_vkey: str
) -> None:
    impostor = Ed25519PrivateKey.generate()
    body = checkpoint_body("cfl-sftp", 1, leaf_hash(b"x"))
    blob = key_id("cfl-sftp", raw_public(log_key)) + impostor.sign(body)
    note = f"{body.decode()}\n— cfl-sftp {base64.b64encode(blob).decode()}\n"
    with pytest.raises(CheckpointError, match="invalid signature"):
        open_checkpoint(note, log_vkey)


def test_a_checkpoint_is_refused_against_a_verifier_key_of_another_name(log_key: Ed25519PrivateKey) -> None:
    note = sign_checkpoint("cfl-sftp", 1, leaf_hash(b"x"), log_key)
    with pytest.raises(CheckpointError):
        open_checkpoint(note, verifier_key("other-log", raw_public(log_key)))


def test_a_note_signed_by_the_log_key_but_for_another_origin_is_not_a_checkpoint_of_this_log(
    log_key: Ed25519PrivateKey, log_vkey: str
) -> None:
    body = checkpoint_body("other-log", 1, leaf_hash(b"x"))
    with pytest.raises(CheckpointError, match="origin"):
        open_checkpoint(sign_note(body, "cfl-sftp", log_key), log_vkey)


@pytest.mark.parametrize(
    "body",
    [
        "cfl-sftp\n012\n{root}\n",
        "cfl-sftp\n-1\n{root}\n",
        "cfl-sftp\n 12\n{root}\n",
        "cfl-sftp\n9223372036854775808\n{root}\n",
        "cfl-sftp\n12\n{short}\n",
        "cfl-sftp\n12\n{root}\nextension line\n",
        "cfl-sftp\n12\n",
    ],
    ids=["leading-zero", "negative", "space", "too-big", "short-root", "extension-line", "no-root"],
)
def test_a_signed_but_malformed_checkpoint_body_is_refused(
    log_key: Ed25519PrivateKey, log_vkey: str, body: str
) -> None:
    text = body.format(
        root=base64.b64encode(leaf_hash(b"x")).decode(), short=base64.b64encode(b"\x00" * 31).decode()
    )
    with pytest.raises(CheckpointError, match="malformed checkpoint"):
        open_checkpoint(sign_note(text.encode(), "cfl-sftp", log_key), log_vkey)


@pytest.mark.parametrize("origin", ["", "cfl sftp", "cfl+sftp", "cfl\nsftp"])
def test_checkpoint_body_refuses_an_origin_that_cannot_be_a_key_name(origin: str) -> None:
    with pytest.raises(ValueError, match="not a valid key name"):
        checkpoint_body(origin, 1, EMPTY_ROOT)


def test_checkpoint_body_refuses_a_root_that_is_not_a_sha256() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        checkpoint_body("cfl-sftp", 1, b"\x00" * 20)


def test_an_inclusion_proof_checks_against_a_verified_checkpoint(
    log_key: Ed25519PrivateKey, log_vkey: str
) -> None:
    """What ``cfl-sftp audit prove`` hands an auditor, checked the way the auditor checks it."""
    entries = [canonical_entry(entry_fields(seq=seq)) for seq in range(1, 14)]
    hashes = [leaf_hash(entry) for entry in entries]
    compact = CompactRange()
    for leaf in hashes:
        compact.append(leaf)
    checkpoint = open_checkpoint(sign_checkpoint("cfl-sftp", compact.size, compact.root(), log_key), log_vkey)
    proof = inclusion_proof(hashes, 6, checkpoint.size)
    assert verify_inclusion(leaf_hash(entries[6]), 6, checkpoint.size, proof, checkpoint.root)

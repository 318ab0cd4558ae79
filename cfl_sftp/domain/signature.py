"""Manufacturer signatures over ``manifest.json`` (SPEC 3, gateway check 5).

A manufacturer registers public keys (PEM public keys or X.509 certificates) under
``policies/manufacturer-keys/<manufacturer_id>/``. A signature is ECDSA P-256 with SHA-256 (DER encoded) or
Ed25519, over the exact bytes of ``manifest.json``. This module parses keys and checks signatures; finding the
keys for a manufacturer is the policy snapshot's job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from cfl_sftp.domain.errors import GatewayRejection, Reason

MAX_SIGNATURE_BYTES = 1024

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class ManufacturerKey:
    """A public key whose signatures the gateway accepts; ``fingerprint`` is SHA-256 of its SPKI DER, hex."""

    public_key: PublicKey
    fingerprint: str


def load_manufacturer_key(data: bytes) -> ManufacturerKey:
    """Parse a PEM public key or X.509 certificate; raise ``ValueError`` with a short reason otherwise."""
    key: object
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            key = x509.load_pem_x509_certificate(data).public_key()
        except ValueError as exc:
            raise ValueError("not a valid PEM X.509 certificate") from exc
    else:
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise ValueError("not a valid PEM public key") from exc
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("ECDSA keys must be on curve P-256")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError("only ECDSA P-256 and Ed25519 keys are accepted")
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return ManufacturerKey(public_key=key, fingerprint=hashlib.sha256(spki).hexdigest())


def load_signing_key(data: bytes) -> PrivateKey:
    """Parse an unencrypted PEM private key usable for manifests (ECDSA P-256 or Ed25519)."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError("not an unencrypted PEM private key") from exc
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise ValueError("only ECDSA P-256 and Ed25519 keys can sign manifests")


def sign_manifest(manifest_bytes: bytes, key: PrivateKey) -> bytes:
    """Sign the exact manifest bytes: DER ECDSA-SHA256 for P-256, raw 64 bytes for Ed25519."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(manifest_bytes)
    return key.sign(manifest_bytes, ec.ECDSA(hashes.SHA256()))


def verify_manifest_signature(
    manifest_bytes: bytes, signature: bytes, keys: Iterable[ManufacturerKey]
) -> ManufacturerKey:
    """Return the registered key that made ``signature``, or raise ``bad-signature``."""
    if 0 < len(signature) <= MAX_SIGNATURE_BYTES:
        for key in keys:
            try:
                if isinstance(key.public_key, ed25519.Ed25519PublicKey):
                    key.public_key.verify(signature, manifest_bytes)
                else:
                    key.public_key.verify(signature, manifest_bytes, ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                continue
            return key
    raise GatewayRejection(
        Reason.BAD_SIGNATURE,
        "The manifest signature does not verify against any key registered for this manufacturer.",
    )

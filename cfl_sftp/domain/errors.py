"""The one error family of the domain core.

Every refusal carries a stable ``reason`` code (the receipt's) and a ``public_message`` that is safe to show to
any user: it never names a host path, a key or an internal exception. Only the ``sftp`` layer turns these into
SFTP status codes.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """The gateway's stable reason codes (SPEC 4, receipt ``reason``)."""

    ACCEPTED = "accepted"
    DUPLICATE_IMAGE = "duplicate-image"
    VERSION_CONFLICT = "version-conflict"
    TOO_LARGE = "too-large"
    BAD_CONTAINER = "bad-container"
    BAD_MANIFEST = "bad-manifest"
    HASH_MISMATCH = "hash-mismatch"
    HEADER_MISMATCH = "header-mismatch"
    BAD_SIGNATURE = "bad-signature"
    MANUFACTURER_NOT_ALLOWED = "manufacturer-not-allowed"
    PURPOSE_NOT_ADMITTED = "purpose-not-admitted"
    NOT_IN_PRODUCT_LIST = "not-in-product-list"


class Outcome(StrEnum):
    """What the gateway did with a package."""

    ACCEPTED = "accepted"
    HELD = "held"
    REJECTED = "rejected"


class CflError(Exception):
    """Base of every error the domain core raises on purpose."""

    public_message: str = "The request could not be completed."

    def __init__(self, public_message: str | None = None) -> None:
        if public_message is not None:
            self.public_message = public_message
        super().__init__(self.public_message)


class GatewayRejection(CflError):
    """A package failed one of the gateway's checks; ``reason`` says which."""

    def __init__(self, reason: Reason, public_message: str) -> None:
        self.reason = reason
        super().__init__(public_message)

    def __repr__(self) -> str:
        return f"GatewayRejection({self.reason.value!r}, {self.public_message!r})"


class VaultError(CflError):
    """A sealed object could not be opened: wrong key, tampered or moved ciphertext."""

    public_message = "The file could not be read."


class PolicyError(CflError):
    """A policy set is invalid; ``errors`` lists every problem found."""

    def __init__(self, errors: list[PolicyProblem]) -> None:
        self.errors = errors
        super().__init__(f"{len(errors)} policy error(s)")


class PolicyProblem:
    """One policy error: the file (relative to ``policies/``), the 1-based line and why."""

    __slots__ = ("file", "line", "reason")

    def __init__(self, file: str, line: int, reason: str) -> None:
        self.file = file
        self.line = line
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"

    def __repr__(self) -> str:
        return f"PolicyProblem({self.file!r}, {self.line}, {self.reason!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PolicyProblem):
            return NotImplemented
        return (self.file, self.line, self.reason) == (other.file, other.line, other.reason)

    def __hash__(self) -> int:
        return hash((self.file, self.line, self.reason))

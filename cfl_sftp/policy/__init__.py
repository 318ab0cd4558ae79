"""The policy in force: ``policies/`` read, validated whole and held as one immutable snapshot (SPEC 6)."""

from cfl_sftp.policy.loader import (
    load_manufacturer_keys,
    load_policy_set,
    parse_public_key_line,
    policy_digest,
)
from cfl_sftp.policy.snapshot import Organisation, PolicySnapshot, ProductListEntry, User

__all__ = [
    "Organisation",
    "PolicySnapshot",
    "ProductListEntry",
    "User",
    "load_manufacturer_keys",
    "load_policy_set",
    "parse_public_key_line",
    "policy_digest",
]

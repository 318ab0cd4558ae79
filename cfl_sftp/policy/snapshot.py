"""The policy set in force as one immutable value (SPEC 6).

A request reads one :class:`PolicySnapshot`; a reload builds a new one (``loader.load_policy_set``) and the
service swaps a single reference, so the read path takes no lock and never sees half a policy. The snapshot
only answers questions; validating ``policies/`` is the loader's job, and deciding entitlements from the
estates is :mod:`cfl_sftp.domain.entitlement`'s.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from cfl_sftp.domain.entitlement import EstateTimeline
from cfl_sftp.domain.model import DeviceModel, DeviceType, OrganisationKind, Role
from cfl_sftp.domain.signature import ManufacturerKey


@dataclass(frozen=True, slots=True)
class Organisation:
    """An ``[[organisation]]`` of ``organisations.toml``.

    ``manufacturer_ids`` are a manufacturer's own ids; ``may_upload_for`` the manufacturer ids a Supplier or
    MAP may upload packages for.
    """

    id: str
    name: str
    kind: OrganisationKind
    manufacturer_ids: frozenset[str] = frozenset()
    may_upload_for: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class User:
    """A ``[[user]]`` of ``users.toml``; ``keys`` are OpenSSH public keys as ``"<type> <base64>"``."""

    name: str
    organisation: str
    roles: frozenset[Role]
    keys: tuple[str, ...] = ()
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class ProductListEntry:
    """A row of ``product-list.csv``: a firmware version the Central Products List knows, by image hash."""

    device_model: DeviceModel
    firmware_version: str
    image_sha256: str


@dataclass(frozen=True, slots=True, eq=False)
class PolicySnapshot:
    """One validated policy set. Compare two by :attr:`digest`, which nodes log so operators see they agree.

    ``product_list`` is None when ``product-list.csv`` is absent (then nothing is listed).
    ``user_ca_keys`` are the normalised lines of ``user-ca.pub``; ``revoked_fingerprints`` the ``SHA256:``
    lines of a text ``revoked-keys``, ``revoked_krl`` the bytes of a binary one (an OpenSSH KRL, left for the
    SSH layer to read). ``next_transition`` is the first UTC date after the load on which a dated estate row
    takes effect.
    """

    organisations: Mapping[str, Organisation]
    users: Mapping[str, User]
    roles: Mapping[Role, frozenset[DeviceType]]
    manufacturer_keys: Mapping[str, tuple[ManufacturerKey, ...]]
    estates: EstateTimeline
    digest: str
    product_list: frozenset[ProductListEntry] | None = None
    user_ca_keys: tuple[str, ...] = ()
    revoked_fingerprints: frozenset[str] = frozenset()
    revoked_krl: bytes | None = None
    next_transition: dt.date | None = None

    def user(self, name: str) -> User | None:
        """The user who may act now: None if unknown, disabled, or its organisation is gone."""
        user = self.users.get(name)
        if user is None or not user.enabled or user.organisation not in self.organisations:
            return None
        return user

    def organisation(self, organisation_id: str) -> Organisation | None:
        return self.organisations.get(organisation_id)

    def keys_for_manufacturer(self, manufacturer_id: str) -> tuple[ManufacturerKey, ...]:
        """The keys whose signatures the gateway accepts for ``manufacturer_id`` (check 5)."""
        return self.manufacturer_keys.get(manufacturer_id, ())

    def may_upload_for(self, organisation_id: str, manufacturer_id: str) -> bool:
        """Gateway check 6: a manufacturer uploads for its own ids, a Supplier or MAP for those granted."""
        organisation = self.organisations.get(organisation_id)
        if organisation is None:
            return False
        if organisation.kind is OrganisationKind.MANUFACTURER:
            return manufacturer_id in organisation.manufacturer_ids
        if organisation.kind in (OrganisationKind.SUPPLIER, OrganisationKind.MAP):
            return manufacturer_id in organisation.may_upload_for
        return False

    def in_product_list(self, device_model: DeviceModel, firmware_version: str, image_sha256: str) -> bool:
        """Gateway check 8; without a ``product-list.csv`` nothing is listed."""
        if self.product_list is None:
            return False
        return ProductListEntry(device_model, firmware_version, image_sha256.lower()) in self.product_list

"""``cfl-sftp.toml``: the deployment's configuration (SPEC 9).

Every limit lives in one frozen object built here and injected into the parts that enforce it. Paths in the file
are relative to the file's own folder, so a deployment directory can be moved as a whole.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cfl_sftp.domain.model import Purpose

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CONFIG_ENV = "CFL_SFTP_CONFIG"
DEFAULT_CONFIG_NAME = "cfl-sftp.toml"
GIB = 1 << 30
MIB = 1 << 20


class ConfigError(Exception):
    """The configuration file is missing or invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    """``[gateway]``: what the gateway admits and how much it stores per user."""

    max_package_bytes: int = GIB
    max_release_notes_bytes: int = 64 * MIB
    admitted_purposes: frozenset[Purpose] = frozenset(Purpose)
    require_product_list: bool = False
    staging_ttl_hours: int = 24
    staging_quota_bytes: int = 4 * GIB


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """``[limits]``: abuse limits on connections and sessions."""

    sessions_per_user: int = 64
    failed_logins_per_address: int = 10
    ban_seconds: int = 900
    unauthenticated_connections: int = 200
    idle_timeout_seconds: int = 900
    stop_timeout_seconds: int = 60
    open_files_per_session: int = 64


@dataclass(frozen=True, slots=True)
class Config:
    """A loaded ``cfl-sftp.toml`` with every path made absolute."""

    base_dir: Path
    listen: tuple[str, ...] = ("127.0.0.1:2222",)
    proxy_protocol: bool = False
    trusted_proxies: tuple[IPNetwork, ...] = ()
    """Where PROXY headers are believed from; empty: from any peer (the port must then be firewalled)."""
    host_keys: tuple[Path, ...] = ()
    data_dir: Path = Path("data")
    database_url: str = ""
    policies_dir: Path = Path("policies")
    vault_key: str = "keys/vault.keyring"
    vault_dir: Path = Path("data/vault")
    audit_key: Path = Path("keys/audit.key")
    audit_origin: str = "cfl-sftp"
    gateway: GatewayLimits = field(default_factory=GatewayLimits)
    limits: SessionLimits = field(default_factory=SessionLimits)
    path: Path | None = None
    """The file it was read from: ``SIGHUP`` reads it again."""

    @property
    def spool_dir(self) -> Path:
        """Uploads in progress and held packages (encrypted), beside the library on the shared data folder."""
        return self.data_dir / "spool"

    @property
    def library_dir(self) -> Path:
        return self.data_dir / "library"


_TOP_KEYS = {
    "listen", "proxy_protocol", "trusted_proxies", "host_keys", "data_dir", "database_url", "policies_dir", "vault_key",
    "vault_dir", "audit_key", "audit_origin", "gateway", "limits",
}


def default_config_path() -> Path:
    """``$CFL_SFTP_CONFIG``, else ``./cfl-sftp.toml`` (SPEC 10)."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME)


def load_config(path: Path) -> Config:
    """Read and validate ``path``; raise :class:`ConfigError` naming the offending key."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"no configuration file at {path}") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return replace(config_from_mapping(raw, path.resolve().parent), path=path.resolve())


RELOADABLE = ("gateway", "limits")
"""What ``SIGHUP`` puts in force from the file (SPEC 9); every other key needs a restart."""


def reloaded(current: Config, fresh: Config) -> tuple[Config, tuple[str, ...]]:
    """``current`` with ``fresh``'s ``[gateway]`` and ``[limits]``, and the other keys that differ.

    Those keys (``listen``, ``database_url``, paths, key names) keep their running value until a restart:
    the caller warns about them.
    """
    restart_only = tuple(
        f.name for f in fields(Config)
        if f.name not in (*RELOADABLE, "path") and getattr(current, f.name) != getattr(fresh, f.name)
    )
    return replace(current, gateway=fresh.gateway, limits=fresh.limits), restart_only


def config_from_mapping(raw: dict[str, Any], base_dir: Path) -> Config:
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s): {', '.join(sorted(unknown))}")

    def path_of(key: str, default: str) -> Path:
        value = raw.get(key, default)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be a non-empty string")
        return (base_dir / value).resolve()

    listen = raw.get("listen", ["127.0.0.1:2222"])
    if not isinstance(listen, list) or not listen or not all(isinstance(x, str) for x in listen):
        raise ConfigError("listen must be a non-empty list of \"host:port\" strings")
    host_keys = raw.get("host_keys", ["keys/ssh_host_ed25519_key", "keys/ssh_host_rsa_key"])
    if not isinstance(host_keys, list) or not all(isinstance(x, str) for x in host_keys):
        raise ConfigError("host_keys must be a list of paths")
    data_dir = path_of("data_dir", "data")
    database_url = raw.get("database_url", "")
    if not isinstance(database_url, str):
        raise ConfigError("database_url must be a string")
    if not database_url:
        database_url = f"sqlite:///{data_dir / 'cfl-sftp.sqlite3'}"
    vault_key = raw.get("vault_key", "keys/vault.keyring")
    if not isinstance(vault_key, str) or not vault_key:
        raise ConfigError("vault_key must be a path or credential:NAME")
    if not vault_key.startswith("credential:"):
        vault_key = str((base_dir / vault_key).resolve())
    vault_dir = path_of("vault_dir", str(data_dir / "vault"))
    origin = raw.get("audit_origin", "cfl-sftp")
    if not isinstance(origin, str) or not origin or any(c.isspace() for c in origin) or "+" in origin:
        raise ConfigError("audit_origin must be a non-empty string without spaces or '+'")
    proxy = raw.get("proxy_protocol", False)
    if not isinstance(proxy, bool):
        raise ConfigError("proxy_protocol must be true or false")
    trusted = _trusted_proxies(raw.get("trusted_proxies", []))
    return Config(
        base_dir=base_dir,
        listen=tuple(listen),
        proxy_protocol=proxy,
        trusted_proxies=trusted,
        host_keys=tuple((base_dir / k).resolve() for k in host_keys),
        data_dir=data_dir,
        database_url=database_url,
        policies_dir=path_of("policies_dir", "policies"),
        vault_key=vault_key,
        vault_dir=vault_dir,
        audit_key=path_of("audit_key", "keys/audit.key"),
        audit_origin=origin,
        gateway=_gateway_limits(raw.get("gateway", {})),
        limits=_session_limits(raw.get("limits", {})),
    )


def _positive_ints(table: object, cls: type[Any], section: str, skip: set[str]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table")
    names = {f.name for f in fields(cls)}
    unknown = set(table) - names
    if unknown:
        raise ConfigError(f"[{section}] unknown key(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in skip:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"[{section}] {key} must be a positive integer")
        values[key] = value
    return values


def _trusted_proxies(value: object) -> tuple[IPNetwork, ...]:
    """``trusted_proxies``: addresses or CIDR networks of the load balancers (``["10.0.0.5", "10.0.1.0/24"]``)."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError('trusted_proxies must be a list of addresses or networks, e.g. ["10.0.0.5", "10.0.1.0/24"]')
    networks: list[IPNetwork] = []
    for item in value:
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"trusted_proxies: {item!r} is not an IP address or network") from None
        mapped = network.network_address.ipv4_mapped if isinstance(network, ipaddress.IPv6Network) else None
        if mapped is not None and network.prefixlen >= 96:  # peers are compared as IPv4, as the PROXY layer sees them
            network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
        networks.append(network)
    return tuple(networks)


def _gateway_limits(table: object) -> GatewayLimits:
    skip = {"admitted_purposes", "require_product_list"}
    values = _positive_ints(table, GatewayLimits, "gateway", skip)
    assert isinstance(table, dict)
    if "admitted_purposes" in table:
        purposes = table["admitted_purposes"]
        valid = {p.value for p in Purpose}
        if not isinstance(purposes, list) or not all(isinstance(p, str) and p in valid for p in purposes):
            raise ConfigError(f"[gateway] admitted_purposes must list some of: {', '.join(sorted(valid))}")
        values["admitted_purposes"] = frozenset(Purpose(p) for p in purposes)
    if "require_product_list" in table:
        if not isinstance(table["require_product_list"], bool):
            raise ConfigError("[gateway] require_product_list must be true or false")
        values["require_product_list"] = table["require_product_list"]
    return GatewayLimits(**values)


def _session_limits(table: object) -> SessionLimits:
    return SessionLimits(**_positive_ints(table, SessionLimits, "limits", set()))


DEFAULT_CONFIG_TOML = """\
# cfl-sftp configuration (SPEC 9). Paths are relative to this file's folder.
listen = ["127.0.0.1:2222"]
proxy_protocol = false
trusted_proxies = []   # with proxy_protocol: the balancers' addresses or networks; [] believes any peer
host_keys = ["keys/ssh_host_ed25519_key", "keys/ssh_host_rsa_key"]
data_dir = "data"
# database_url = "postgresql+psycopg://cfl@db.example/cfl"   # default: SQLite at data/cfl-sftp.sqlite3
policies_dir = "policies"
vault_key = "keys/vault.keyring"      # or "credential:vault.keyring" under systemd
# vault_dir = "data/vault"
audit_key = "keys/audit.key"
audit_origin = "cfl-sftp"

[gateway]
max_package_bytes = 1073741824        # 1 GiB
max_release_notes_bytes = 67108864    # 64 MiB
admitted_purposes = ["compliance", "security-fix", "defect-fix"]
require_product_list = false
staging_ttl_hours = 24
staging_quota_bytes = 4294967296      # 4 GiB

[limits]
sessions_per_user = 64
failed_logins_per_address = 10
ban_seconds = 900
unauthenticated_connections = 200
idle_timeout_seconds = 900
stop_timeout_seconds = 60
open_files_per_session = 64
"""

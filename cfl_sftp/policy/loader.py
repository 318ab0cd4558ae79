"""Read ``policies/`` and validate it whole into one :class:`PolicySnapshot` (SPEC 6).

:func:`load_policy_set` reads every file of the set once, checks all of it, and either returns a snapshot or
raises :class:`PolicyError` listing every problem it found, each as (file relative to ``policies/``, 1-based
line of the offending entry, reason). The line is that of a TOML table's header (``[[user]]``), of a CSV row,
of the line a TOML syntax error or an invalid UTF-8 byte is on, and 1 when the whole file is at fault. It
never stops at the first problem, so an operator fixes a broken set in one pass; past
:data:`MAX_PROBLEMS_PER_FILE` in one file it says how many more there are instead of listing them.

What a set holds, and what is ignored: the files of SPEC 6 are read; hidden files and folders (``.git``,
Kubernetes' ``..data``), editor backups (``*~``), ``README*`` and ``*.md`` files are documentation and are
ignored; any other file or folder is an error, because a misnamed file (``revoked-keys.txt``) would otherwise
be silently out of force. The :attr:`~PolicySnapshot.digest` covers the name and bytes of every file read (and
the name of every unexpected one), so two nodes with the same digest enforce the same policy;
:func:`policy_digest` computes it without validating, for a watcher that polls for changes.

The CSV files are plain comma-separated values: no quoting, lines starting with ``#`` and blank lines are
ignored, and the header is the first other line. Estates with millions of rows are read by a fast path whose
work runs inside the regular expression engine and set operations; only a file with some problem, or with
comments or blank lines among its rows, is read row by row (which is also what finds each problem's line).
Deciding entitlements from the estates is :mod:`cfl_sftp.domain.entitlement`'s job; this module only turns
files into its :class:`Estate` values and maps its conflicts back to file and line.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime as dt
import hashlib
import re
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cfl_sftp.domain.entitlement import (
    ALWAYS,
    SUPPLIER_ROLES,
    UNKNOWN_FIRMWARE,
    Estate,
    EstateConflictError,
    EstateEntry,
    EstateTimeline,
    compile_estates,
)
from cfl_sftp.domain.errors import PolicyError, PolicyProblem
from cfl_sftp.domain.model import DeviceModel, DeviceType, OrganisationKind, Role
from cfl_sftp.domain.signature import ManufacturerKey, load_manufacturer_key
from cfl_sftp.policy.krl import KRL_MAGIC, parse_krl
from cfl_sftp.policy.snapshot import Organisation, PolicySnapshot, ProductListEntry, User

ORGANISATIONS_FILE = "organisations.toml"
USERS_FILE = "users.toml"
ROLES_FILE = "roles.toml"
PRODUCT_LIST_FILE = "product-list.csv"
USER_CA_FILE = "user-ca.pub"
REVOKED_KEYS_FILE = "revoked-keys"
ESTATES_DIR = "estates"
MANUFACTURER_KEYS_DIR = "manufacturer-keys"
TOP_LEVEL_FILES = frozenset(
    {ORGANISATIONS_FILE, USERS_FILE, ROLES_FILE, PRODUCT_LIST_FILE, USER_CA_FILE, REVOKED_KEYS_FILE}
)

ESTATE_HEADER = "device_id,manufacturer_id,model_id,hardware_version,firmware_version,since"
PRODUCT_LIST_HEADER = "manufacturer_id,model_id,hardware_version,firmware_version,image_sha256"

MAX_PROBLEMS_PER_FILE = 1000

_SLUG = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?")
_USER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HEX4 = re.compile(r"[0-9A-F]{4}")
_HEX8 = re.compile(r"[0-9A-F]{8}")
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
_SHOWN = re.compile(r"[A-Za-z0-9@._+:/-]{1,64}")
_TOML_AT_LINE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_AT_END = re.compile(r"\s*\(at end of document\)\s*$")

# The estate fast path (see the module docstring). Each pattern is anchored at line starts and each match ends
# with the line's newline, so "as many matches as lines" means every line matched from its start.
_ROW_DEVICE_ID = re.compile(r"^([A-Za-z0-9][A-Za-z0-9:._-]{0,63}),[^\n]*\n", re.MULTILINE)
_ROW_REST = re.compile(r"^[^,\n]*,([^\n]*)\n", re.MULTILINE)
_ESTATE_REST = re.compile(
    r"([0-9A-F]{4}),([0-9A-F]{4}),([0-9A-F]{4}),([0-9A-F]{8})?,([0-9]{4}-[0-9]{2}-[0-9]{2})?"
)

_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
_EC_POINT_BYTES = {"nistp256": 65, "nistp384": 97, "nistp521": 133}
MIN_RSA_BITS = 2048


# -- problems ------------------------------------------------------------------------------------------------


class _Problems:
    """Every problem found so far, at most :data:`MAX_PROBLEMS_PER_FILE` listed per file."""

    def __init__(self) -> None:
        self.found: list[PolicyProblem] = []
        self._per_file: Counter[str] = Counter()

    def add(self, file: str, line: int, reason: str) -> None:
        self._per_file[file] += 1
        count = self._per_file[file]
        if count <= MAX_PROBLEMS_PER_FILE:
            self.found.append(PolicyProblem(file, max(line, 1), reason))

    def count(self, file: str) -> int:
        return self._per_file[file]

    def finish(self) -> None:
        """Say how many problems were left unlisted, then raise if there were any."""
        for file, count in self._per_file.items():
            if count > MAX_PROBLEMS_PER_FILE:
                extra = count - MAX_PROBLEMS_PER_FILE
                self.found.append(PolicyProblem(file, 1, f"{extra} more problem(s) in this file not listed"))
        if self.found:
            raise PolicyError(self.found)


def _shown(value: object) -> str:
    """A value quoted for a reason, or a neutral word when it may be long or hold key material."""
    if isinstance(value, str) and _SHOWN.fullmatch(value):
        return repr(value)
    return "(value not shown)"


# -- reading the folder --------------------------------------------------------------------------------------


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.endswith(("~", ".md")) or name.upper().startswith("README")


@dataclass
class _Listing:
    """The files of a set (relative POSIX paths) and the unexpected ones, whose names the digest covers."""

    files: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _list_policy_files(directory: Path, problems: _Problems) -> _Listing:
    listing = _Listing()
    if not directory.is_dir():
        problems.add(".", 1, "the policy folder does not exist or is not a folder")
        return listing
    for entry in _entries(directory, ".", problems):
        name = entry.name
        if name in TOP_LEVEL_FILES:
            listing.files.append(name)  # a folder by this name fails when read, with the reason
        elif name == ESTATES_DIR:
            _list_estates(entry, listing, problems)
        elif name == MANUFACTURER_KEYS_DIR:
            _list_manufacturer_keys(entry, MANUFACTURER_KEYS_DIR, listing, problems)
        elif not _ignored(name):
            listing.unexpected.append(name)
            what = "folder" if entry.is_dir() else "file"
            problems.add(name, 1, f"unknown policy {what} (see SPEC 6 for the files a set holds)")
    listing.files.sort()
    return listing


def _entries(directory: Path, name: str, problems: _Problems) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except OSError as exc:
        problems.add(name, 1, f"cannot read the folder: {exc.strerror or type(exc).__name__}")
        return []


def _list_estates(directory: Path, listing: _Listing, problems: _Problems) -> None:
    if not directory.is_dir():
        problems.add(ESTATES_DIR, 1, "must be a folder of <organisation id>.csv files")
        return
    for entry in _entries(directory, ESTATES_DIR, problems):
        relative = f"{ESTATES_DIR}/{entry.name}"
        if _ignored(entry.name):
            continue
        if entry.name.endswith(".csv") and not entry.is_dir():
            listing.files.append(relative)
        else:
            listing.unexpected.append(relative)
            problems.add(relative, 1, "not an estate: estates/ holds <organisation id>.csv files only")


def _list_manufacturer_keys(directory: Path, prefix: str, listing: _Listing, problems: _Problems) -> None:
    if not directory.is_dir():
        problems.add(prefix, 1, "must be a folder of <manufacturer_id>/ folders")
        return
    for folder in _entries(directory, prefix, problems):
        relative = f"{prefix}/{folder.name}"
        if _ignored(folder.name):
            continue
        if not folder.is_dir() or not _HEX4.fullmatch(folder.name):
            listing.unexpected.append(relative)
            problems.add(relative, 1, "must be a folder named by a manufacturer id (4 upper-case hex digits)")
            continue
        for entry in _entries(folder, relative, problems):
            name = f"{relative}/{entry.name}"
            if _ignored(entry.name):
                continue
            if entry.name.endswith(".pem") and not entry.is_dir():
                listing.files.append(name)
            else:
                listing.unexpected.append(name)
                problems.add(name, 1, "not a key: manufacturer keys are *.pem files")


def _read_files(directory: Path, names: Iterable[str], problems: _Problems) -> dict[str, bytes]:
    contents: dict[str, bytes] = {}
    for name in names:
        try:
            contents[name] = (directory / name).read_bytes()
        except OSError as exc:
            problems.add(name, 1, f"cannot read: {exc.strerror or type(exc).__name__}")
    return contents


def _digest(listing: _Listing, contents: Mapping[str, bytes]) -> str:
    """SHA-256 over every file's name and bytes, in name order, each length-prefixed (no two sets collide)."""
    digest = hashlib.sha256(b"cfl-sftp policy set\n")
    files = set(listing.files)
    for name in sorted([*listing.files, *listing.unexpected]):
        encoded = name.encode("utf-8", "surrogateescape")
        digest.update(len(encoded).to_bytes(8, "big") + encoded)
        data = contents.get(name) if name in files else None
        if data is None:  # unreadable or unexpected: the name alone, so fixing it changes the digest
            digest.update(b"\xff" * 8)
        else:
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
    return digest.hexdigest()


def policy_digest(directory: Path) -> str:
    """The digest :func:`load_policy_set` would give the set now, without validating it (never raises)."""
    problems = _Problems()
    listing = _list_policy_files(directory, problems)
    return _digest(listing, _read_files(directory, listing.files, problems))


# -- text helpers --------------------------------------------------------------------------------------------


def _decode(problems: _Problems, name: str, data: bytes) -> str | None:
    """UTF-8 text without a byte-order mark; an invalid byte is reported on its line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.add(name, data.count(b"\n", 0, exc.start) + 1, "not valid UTF-8")
        return None
    return text.removeprefix("\ufeff")


class _Lines:
    """Line numbers of offsets in a text."""

    def __init__(self, text: str) -> None:
        self._newlines = [m.start() for m in re.finditer("\n", text)]

    def of(self, offset: int) -> int:
        return bisect.bisect_left(self._newlines, offset) + 1


def _parse_toml(problems: _Problems, name: str, data: bytes) -> tuple[dict[str, Any], str] | None:
    text = _decode(problems, name, data)
    if text is None:
        return None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        line = 1
        if at_line := _TOML_AT_LINE.search(message):
            line = int(at_line[1])
            message = f"{message[: at_line.start()]} (column {at_line[2]})"
        elif at_end := _TOML_AT_END.search(message):
            line = max(1, text.count("\n") + (0 if text.endswith("\n") else 1))
            message = f"{message[: at_end.start()]} (at end of file)"
        problems.add(name, line, f"invalid TOML: {message}")
        return None


def _key_line(text: str, key: str) -> int:
    """The line where a top-level ``key = ...`` or table ``[key...]`` is written; 1 if it cannot be found."""
    quoted = re.escape(key)
    pattern = rf"^[ \t]*(?:\[\[?[ \t]*)?(?:{quoted}|\"{quoted}\"|'{quoted}')[ \t]*[=.\]]"
    found = re.search(pattern, text, re.MULTILINE)
    return text.count("\n", 0, found.start()) + 1 if found else 1


def _array_table_lines(text: str, key: str, count: int) -> list[int]:
    """The header line of each ``[[key]]`` table, in order; if the array is written inline, its key's line."""
    quoted = re.escape(key)
    pattern = rf"^[ \t]*\[\[[ \t]*(?:{quoted}|\"{quoted}\"|'{quoted}')[ \t]*\]\]"
    lines = _Lines(text)
    found = [lines.of(m.start()) for m in re.finditer(pattern, text, re.MULTILINE)]
    if len(found) == count:
        return found
    return [_key_line(text, key)] * count


def _check_keys(
    report: Callable[[str], None],
    table: Mapping[str, object],
    allowed: Iterable[str],
    required: Iterable[str],
) -> None:
    known = set(allowed)
    for key in table:
        if key not in known:
            report(f"unknown key {_shown(key)} (allowed: {', '.join(sorted(known))})")
    for key in required:
        if key not in table:
            report(f"missing key '{key}'")


def _string(report: Callable[[str], None], table: Mapping[str, object], key: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        report(f"'{key}' must be a string")
        return None
    return value


def _strings(report: Callable[[str], None], table: Mapping[str, object], key: str) -> list[str] | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        report(f"'{key}' must be a list of strings")
        return None
    return value


def _tables(
    problems: _Problems, name: str, document: Mapping[str, Any], text: str, key: str
) -> list[tuple[int, Mapping[str, object]]]:
    """The ``[[key]]`` tables of a document that should hold nothing else, each with its header line."""
    for other in document:
        if other != key:
            reason = f"unknown key {_shown(other)} (expected [[{key}]] tables)"
            problems.add(name, _key_line(text, other), reason)
    entries = document.get(key, [])
    if not isinstance(entries, list):
        problems.add(name, _key_line(text, key), f"'{key}' must be an array of tables: write [[{key}]]")
        return []
    tables: list[tuple[int, Mapping[str, object]]] = []
    for line, entry in zip(_array_table_lines(text, key, len(entries)), entries, strict=True):
        if isinstance(entry, dict):
            tables.append((line, entry))
        else:
            problems.add(name, line, f"each '{key}' must be a table: write [[{key}]]")
    return tables


def _data_lines(text: str) -> Iterable[tuple[int, str]]:
    """(line number, line) of a text, without blank lines and ``#`` comments."""
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield number, line.removesuffix("\r")


# -- OpenSSH public keys -------------------------------------------------------------------------------------


def _ssh_strings(blob: bytes) -> list[bytes]:
    """Split an SSH wire-format public key blob into its length-prefixed fields."""
    fields: list[bytes] = []
    offset = 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise ValueError("key data is truncated")
        length = int.from_bytes(blob[offset : offset + 4], "big")
        offset += 4
        if offset + length > len(blob):
            raise ValueError("key data is truncated")
        fields.append(blob[offset : offset + length])
        offset += length
    return fields


def _check_key_blob(key_type: str, blob: bytes) -> None:
    """A structural check of the key blob: right type inside, right fields, plausible sizes."""
    fields = _ssh_strings(blob)
    if not fields or fields[0] != key_type.encode():
        raise ValueError("key data does not match its key type")
    if key_type in ("ssh-ed25519", "sk-ssh-ed25519@openssh.com"):
        expected = 2 if key_type == "ssh-ed25519" else 3
        if len(fields) != expected or len(fields[1]) != 32:
            raise ValueError("malformed Ed25519 key data")
    elif key_type == "ssh-rsa":
        if len(fields) != 3 or not fields[1] or not fields[2]:
            raise ValueError("malformed RSA key data")
        if int.from_bytes(fields[2], "big").bit_length() < MIN_RSA_BITS:
            raise ValueError(f"RSA keys must have at least {MIN_RSA_BITS} bits")
    else:
        curve = key_type.removeprefix("sk-").removeprefix("ecdsa-sha2-").removesuffix("@openssh.com")
        expected = 4 if key_type.startswith("sk-") else 3
        point = fields[2] if len(fields) > 2 else b""
        if (
            len(fields) != expected
            or fields[1] != curve.encode()
            or len(point) != _EC_POINT_BYTES[curve]
            or point[0] != 4
        ):
            raise ValueError("malformed ECDSA key data")


def parse_public_key_line(line: str) -> str:
    """Check one plain OpenSSH public key line (``type base64 [comment]``); return it as ``"type base64"``.

    Raises ``ValueError`` with a reason that never quotes the key data. Options (``from=``, ``command=``,
    ``restrict``...) are refused rather than ignored: a reader would believe they apply.
    """
    if "PRIVATE KEY" in line:
        raise ValueError("this is a private key: remove it from policies/ and replace that key")
    tokens = line.split()
    if not tokens:
        raise ValueError("empty key line")
    key_type = tokens[0]
    if key_type not in _KEY_TYPES:
        if key_type.endswith("-cert-v01@openssh.com"):
            raise ValueError("a certificate is not a key: trust its CA in user-ca.pub instead")
        if any(token in _KEY_TYPES for token in tokens[1:]):
            raise ValueError("key options are not allowed: give the plain public key line")
        raise ValueError(f"unknown key type {_shown(key_type)}")
    if len(tokens) < 2:
        raise ValueError("key data missing")
    try:
        blob = base64.b64decode(tokens[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("key data is not valid base64") from None
    _check_key_blob(key_type, blob)
    return f"{key_type} {base64.b64encode(blob).decode('ascii')}"


# -- the files -----------------------------------------------------------------------------------------------


@dataclass
class _Context:
    """What has been read so far; ``unusable`` names files that exist but could not be read or parsed, so
    that checks against them (an unknown organisation) are skipped rather than reported by the hundred."""

    contents: Mapping[str, bytes]
    problems: _Problems
    unusable: set[str] = field(default_factory=set)
    models: dict[tuple[str, str, str], DeviceModel] = field(default_factory=dict)
    entries: dict[str, EstateEntry | None] = field(default_factory=dict)
    """Estate row tails already read (estates share most of them: the same models, versions and dates)."""

    def toml(self, name: str) -> tuple[dict[str, Any], str] | None:
        data = self.contents.get(name)
        if data is None:
            return None
        parsed = _parse_toml(self.problems, name, data)
        if parsed is None:
            self.unusable.add(name)
        return parsed

    def text(self, name: str) -> str | None:
        data = self.contents.get(name)
        if data is None:
            return None
        text = _decode(self.problems, name, data)
        if text is None:
            self.unusable.add(name)
        return text

    def model(self, manufacturer_id: str, model_id: str, hardware_version: str) -> DeviceModel:
        """One shared :class:`DeviceModel` per distinct triple."""
        key = (manufacturer_id, model_id, hardware_version)
        model = self.models.get(key)
        if model is None:
            model = self.models[key] = DeviceModel(*key)
        return model


@dataclass
class _Organisations:
    valid: dict[str, Organisation]
    declared: dict[str, OrganisationKind | None]
    """Every id some entry declares, valid or not, with its kind when that is valid (for cross-checks)."""
    known: bool
    """False when ``organisations.toml`` could not be read or parsed: nothing can be checked against it."""

    def exists(self, organisation_id: str) -> bool:
        return not self.known or organisation_id in self.declared


def _hex4_list(report: Callable[[str], None], table: Mapping[str, object], key: str) -> frozenset[str]:
    values = _strings(report, table, key) or []
    for value in values:
        if not _HEX4.fullmatch(value):
            report(f"'{key}': {_shown(value)} is not a manufacturer id (4 upper-case hex digits)")
    return frozenset(values)


def _load_organisations(context: _Context) -> _Organisations:
    name = ORGANISATIONS_FILE
    parsed = context.toml(name)
    result = _Organisations(valid={}, declared={}, known=name not in context.unusable)
    if parsed is None:
        return result
    document, text = parsed
    problems = context.problems
    first_line: dict[str, int] = {}
    owner_of: dict[str, str] = {}
    allowed = ("id", "name", "kind", "manufacturer_ids", "may_upload_for")
    for line, table in _tables(problems, name, document, text, "organisation"):
        before = problems.count(name)

        def report(reason: str, line: int = line) -> None:
            problems.add(name, line, reason)

        _check_keys(report, table, allowed, ("id", "name", "kind"))
        organisation_id = _string(report, table, "id")
        display_name = _string(report, table, "name")
        kind_text = _string(report, table, "kind")
        kind: OrganisationKind | None = None
        if kind_text is not None:
            try:
                kind = OrganisationKind(kind_text)
            except ValueError:
                kinds = ", ".join(k.value for k in OrganisationKind)
                report(f"unknown kind {_shown(kind_text)} (one of {kinds})")
        if organisation_id is not None:
            if not _SLUG.fullmatch(organisation_id):
                report(f"id {_shown(organisation_id)} is not a slug (a-z, 0-9 and inner hyphens, at most 64)")
            elif organisation_id in first_line:
                first = first_line[organisation_id]
                report(f"duplicate organisation id '{organisation_id}' (first at line {first})")
            else:
                first_line[organisation_id] = line
                result.declared[organisation_id] = kind
        if display_name is not None and not display_name.strip():
            report("'name' must not be empty")
        manufacturer_ids = _hex4_list(report, table, "manufacturer_ids")
        may_upload_for = _hex4_list(report, table, "may_upload_for")
        if kind is OrganisationKind.MANUFACTURER:
            if not manufacturer_ids:
                report("a manufacturer needs 'manufacturer_ids' (its own manufacturer ids)")
            if "may_upload_for" in table:
                report("'may_upload_for' is for supplier and map organisations, not manufacturers")
            for manufacturer_id in sorted(manufacturer_ids):
                owner = owner_of.setdefault(manufacturer_id, organisation_id or "")
                if owner != (organisation_id or ""):
                    report(f"manufacturer id {manufacturer_id} already belongs to organisation '{owner}'")
        elif kind is not None:
            if "manufacturer_ids" in table:
                report("'manufacturer_ids' is for manufacturer organisations (use 'may_upload_for')")
            if "may_upload_for" in table and kind not in (OrganisationKind.SUPPLIER, OrganisationKind.MAP):
                report("'may_upload_for' is for supplier and map organisations")
        if problems.count(name) == before:
            assert organisation_id is not None
            assert display_name is not None
            assert kind is not None
            result.valid[organisation_id] = Organisation(
                organisation_id, display_name, kind, manufacturer_ids, may_upload_for
            )
    return result


def _load_users(context: _Context, organisations: _Organisations) -> dict[str, User]:
    name = USERS_FILE
    parsed = context.toml(name)
    if parsed is None:
        return {}
    document, text = parsed
    problems = context.problems
    users: dict[str, User] = {}
    first_line: dict[str, int] = {}
    for line, table in _tables(problems, name, document, text, "user"):
        before = problems.count(name)

        def report(reason: str, line: int = line) -> None:
            problems.add(name, line, reason)

        required = ("name", "organisation", "roles")
        _check_keys(report, table, (*required, "keys", "enabled"), required)
        user_name = _string(report, table, "name")
        if user_name is not None:
            if not _USER_NAME.fullmatch(user_name):
                report(f"user name {_shown(user_name)} does not match ^[a-z0-9][a-z0-9._-]{{0,63}}$")
            elif user_name in first_line:
                report(f"duplicate user '{user_name}' (first at line {first_line[user_name]})")
            else:
                first_line[user_name] = line
        organisation = _string(report, table, "organisation")
        if organisation is not None and not organisations.exists(organisation):
            report(f"unknown organisation {_shown(organisation)}")
        roles: set[Role] = set()
        for role in _strings(report, table, "roles") or []:
            try:
                roles.add(Role(role))
            except ValueError:
                report(f"unknown role {_shown(role)} (one of {', '.join(r.value for r in Role)})")
        keys: list[str] = []
        for index, key_line in enumerate(_strings(report, table, "keys") or [], start=1):
            try:
                normalised = parse_public_key_line(key_line)
            except ValueError as exc:
                report(f"key {index}: {exc}")
                continue
            if normalised not in keys:
                keys.append(normalised)
        enabled = table.get("enabled", True)
        if not isinstance(enabled, bool):
            report("'enabled' must be true or false")
        if problems.count(name) == before:
            assert user_name is not None
            assert organisation is not None
            assert isinstance(enabled, bool)
            users[user_name] = User(user_name, organisation, frozenset(roles), tuple(keys), enabled)
    return users


def _load_roles(context: _Context) -> dict[Role, frozenset[DeviceType]]:
    name = ROLES_FILE
    parsed = context.toml(name)
    if parsed is None:
        return {}
    document, text = parsed
    problems = context.problems
    for other in document:
        if other != "roles":
            reason = f"unknown key {_shown(other)} (expected [roles.<role>] tables)"
            problems.add(name, _key_line(text, other), reason)
    roles_table = document.get("roles", {})
    if not isinstance(roles_table, dict):
        problems.add(name, _key_line(text, "roles"), "'roles' must be a table of [roles.<role>] tables")
        return {}
    header = re.compile(
        r"^[ \t]*\[[ \t]*(?:roles|\"roles\"|'roles')[ \t]*\.[ \t]*"
        r"(?:\"([^\"]*)\"|'([^']*)'|([A-Za-z0-9_-]+))[ \t]*\]",
        re.MULTILINE,
    )
    lines = _Lines(text)
    header_lines: dict[str, int] = {}
    for found in header.finditer(text):
        header_lines.setdefault(found[1] or found[2] or found[3] or "", lines.of(found.start()))
    granted: dict[Role, frozenset[DeviceType]] = {}
    for role_name, table in roles_table.items():
        line = header_lines.get(role_name) or _key_line(text, role_name)

        def report(reason: str, line: int = line) -> None:
            problems.add(name, line, reason)

        try:
            role = Role(role_name)
        except ValueError:
            report(f"unknown role {_shown(role_name)} (one of {', '.join(r.value for r in SUPPLIER_ROLES)})")
            continue
        if role not in SUPPLIER_ROLES:
            report(f"only the supplier roles ({', '.join(sorted(SUPPLIER_ROLES))}) see device types")
            continue
        if not isinstance(table, dict):
            report(f"'roles.{role_name}' must be a table")
            continue
        _check_keys(report, table, ("device_types",), ("device_types",))
        device_types: set[DeviceType] = set()
        for device_type in _strings(report, table, "device_types") or []:
            try:
                device_types.add(DeviceType(device_type))
            except ValueError:
                report(f"unknown device type {_shown(device_type)} (one of {', '.join(DeviceType)})")
        granted[role] = frozenset(device_types)
    return granted


def _load_manufacturer_keys(
    context: _Context, names: Iterable[str]
) -> dict[str, tuple[ManufacturerKey, ...]]:
    keys: dict[str, list[ManufacturerKey]] = {}
    for name in sorted(names):
        data = context.contents.get(name)
        if data is None:
            continue
        try:
            key = load_manufacturer_key(data)
        except ValueError as exc:
            context.problems.add(name, 1, str(exc))
            continue
        keys.setdefault(name.split("/")[-2], []).append(key)
    return {manufacturer_id: tuple(found) for manufacturer_id, found in keys.items()}


def _header(
    context: _Context, name: str, text: str, expected: str
) -> tuple[int, int] | None:
    """Find the header (the first line that is no comment or blank) and check it is ``expected`` exactly.

    Returns (its line number, the offset where the rows begin).
    """
    offset = 0
    number = 0
    while offset < len(text):
        end = text.find("\n", offset)
        end = len(text) if end < 0 else end
        number += 1
        line = text[offset:end].removesuffix("\r")
        offset = end + 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line != expected:
            context.problems.add(name, number, f"the header must be exactly {expected}")
            return None
        return number, min(offset, len(text))
    context.problems.add(name, 1, f"the header is missing: the first line must be {expected}")
    return None


@dataclass
class _EstateFile:
    """An estate read from its file, and where each of its rows is (for conflicts)."""

    name: str
    estate: Estate
    first_row_line: int
    row_lines: list[int] | None
    """The line of each row when it is not simply ``first_row_line + index`` (the file had comments)."""
    _first_index: dict[str, int] | None = None

    def line_of(self, device_id: str, occurrence: int = 1) -> int:
        """The line of the first (or second) row of ``device_id``; only conflicts ask, so it may visit all."""
        ids = self.estate.device_ids
        if self._first_index is None:
            self._first_index = {}
            for position, listed in enumerate(ids):
                self._first_index.setdefault(listed, position)
        index = self._first_index[device_id]
        if occurrence == 2:
            index = ids.index(device_id, index + 1)
        return self.row_lines[index] if self.row_lines is not None else self.first_row_line + index


def _estate_entry(context: _Context, rest: str) -> EstateEntry | None:
    """The fields after ``device_id`` of a row, or None if any is invalid."""
    fields = _ESTATE_REST.fullmatch(rest)
    if fields is None:
        return None
    since = ALWAYS
    if fields[5] is not None:
        try:
            since = dt.date.fromisoformat(fields[5]).toordinal()
        except ValueError:
            return None
    firmware = UNKNOWN_FIRMWARE if fields[4] is None else int(fields[4], 16)
    return context.model(fields[1], fields[2], fields[3]), firmware, since


def _estate_fast(context: _Context, organisation: str, rows: str) -> Estate | None:
    """All rows at once, inside the regex engine; None as soon as anything is unusual (then: row by row)."""
    rows = rows.rstrip("\n") + "\n" if rows.strip("\n") else ""
    count = rows.count("\n")
    rests = _ROW_REST.findall(rows)
    if len(rests) != count:  # the device id check below would also catch this; the lists must align with lines
        return None
    codes: dict[str, int] = {}
    entries: list[EstateEntry] = []
    known = context.entries
    for rest in set(rests):
        entry = known[rest] if rest in known else known.setdefault(rest, _estate_entry(context, rest))
        if entry is None:
            return None
        codes[rest] = len(entries)
        entries.append(entry)
    device_ids = _ROW_DEVICE_ID.findall(rows)
    if len(device_ids) != count:
        return None
    return Estate(organisation, device_ids, list(map(codes.__getitem__, rests)), entries)


def _estate_slow(
    context: _Context, name: str, organisation: str, rows: str, first_line: int
) -> tuple[Estate, list[int]]:
    """Row by row: every problem with its line; the valid rows still count, so conflicts are found too."""
    problems = context.problems
    device_ids: list[str] = []
    row_lines: list[int] = []
    entry_codes: list[int] = []
    codes: dict[EstateEntry, int] = {}
    for offset, line in _data_lines(rows):
        number = first_line + offset - 1
        fields = line.split(",")
        if len(fields) != 6:
            problems.add(name, number, f"expected 6 comma-separated fields, found {len(fields)}")
            continue
        device_id, manufacturer_id, model_id, hardware_version, firmware, since_text = fields
        before = problems.count(name)
        if not _DEVICE_ID.fullmatch(device_id):
            problems.add(
                name, number,
                f"device_id {_shown(device_id)} must be 1 to 64 of A-Z a-z 0-9 : . _ -, starting with a "
                "letter or digit",
            )
        for column, value in (
            ("manufacturer_id", manufacturer_id),
            ("model_id", model_id),
            ("hardware_version", hardware_version),
        ):
            if not _HEX4.fullmatch(value):
                problems.add(name, number, f"{column} {_shown(value)} is not 4 upper-case hex digits")
        if firmware and not _HEX8.fullmatch(firmware):
            reason = f"firmware_version {_shown(firmware)} is not 8 upper-case hex digits or empty"
            problems.add(name, number, reason)
        since = ALWAYS
        if since_text:
            try:
                if not _ISO_DATE.fullmatch(since_text):
                    raise ValueError(since_text)
                since = dt.date.fromisoformat(since_text).toordinal()
            except ValueError:
                problems.add(name, number, f"since {_shown(since_text)} is not a date YYYY-MM-DD or empty")
        if problems.count(name) != before:
            continue
        entry = (
            context.model(manufacturer_id, model_id, hardware_version),
            int(firmware, 16) if firmware else UNKNOWN_FIRMWARE,
            since,
        )
        device_ids.append(device_id)
        row_lines.append(number)
        entry_codes.append(codes.setdefault(entry, len(codes)))
    return Estate(organisation, device_ids, entry_codes, list(codes)), row_lines


def _load_estate(context: _Context, name: str, organisations: _Organisations) -> _EstateFile | None:
    organisation = name.removeprefix(f"{ESTATES_DIR}/").removesuffix(".csv")
    if not organisations.exists(organisation):
        context.problems.add(name, 1, f"no organisation {_shown(organisation)} in {ORGANISATIONS_FILE}")
    else:
        kind = organisations.declared.get(organisation)
        if kind is not None and kind is not OrganisationKind.SUPPLIER:
            context.problems.add(name, 1, f"estates belong to suppliers; '{organisation}' is a {kind.value}")
    text = context.text(name)
    if text is None:
        return None
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    header = _header(context, name, text, ESTATE_HEADER)
    if header is None:
        return None
    header_line, rows_start = header
    rows = text[rows_start:]
    del text
    estate = _estate_fast(context, organisation, rows)
    if estate is not None:
        return _EstateFile(name, estate, header_line + 1, None)
    estate, row_lines = _estate_slow(context, name, organisation, rows, header_line + 1)
    return _EstateFile(name, estate, header_line + 1, row_lines)


def _compile_estates(context: _Context, files: list[_EstateFile]) -> EstateTimeline | None:
    """Resolve the estates; report each ambiguous device in the file that lists it last."""
    by_organisation = {f.estate.organisation: f for f in files}
    try:
        return compile_estates(f.estate for f in files)
    except EstateConflictError as exc:
        for conflict in exc.conflicts:
            device_id = conflict.device_id
            first, second = (by_organisation[org] for org in conflict.organisations)
            if first is second:
                context.problems.add(
                    first.name,
                    first.line_of(device_id, occurrence=2),
                    f"device {device_id} is listed twice (first at line {first.line_of(device_id)})",
                )
            else:
                since = "empty"
                if conflict.since != ALWAYS:
                    since = dt.date.fromordinal(conflict.since).isoformat()
                context.problems.add(
                    second.name,
                    second.line_of(device_id),
                    f"device {device_id} is also in {first.name} (line {first.line_of(device_id)}) with the "
                    f"same since ({since}): which supplier holds it is ambiguous",
                )
        return None


def _load_product_list(context: _Context) -> frozenset[ProductListEntry] | None:
    name = PRODUCT_LIST_FILE
    text = context.text(name)
    if text is None:
        return None
    header = _header(context, name, text, PRODUCT_LIST_HEADER)
    if header is None:
        return frozenset()
    header_line, rows_start = header
    problems = context.problems
    listed: set[ProductListEntry] = set()
    for offset, line in _data_lines(text[rows_start:]):
        number = header_line + offset
        fields = line.split(",")
        if len(fields) != 5:
            problems.add(name, number, f"expected 5 comma-separated fields, found {len(fields)}")
            continue
        manufacturer_id, model_id, hardware_version, firmware, sha256 = fields
        before = problems.count(name)
        for column, value in (
            ("manufacturer_id", manufacturer_id),
            ("model_id", model_id),
            ("hardware_version", hardware_version),
        ):
            if not _HEX4.fullmatch(value):
                problems.add(name, number, f"{column} {_shown(value)} is not 4 upper-case hex digits")
        if not _HEX8.fullmatch(firmware):
            problems.add(name, number, f"firmware_version {_shown(firmware)} is not 8 upper-case hex digits")
        if not _SHA256_HEX.fullmatch(sha256):
            problems.add(name, number, "image_sha256 is not 64 hex digits")
        if problems.count(name) == before:
            model = context.model(manufacturer_id, model_id, hardware_version)
            listed.add(ProductListEntry(model, firmware, sha256.lower()))
    return frozenset(listed)


def _load_user_ca(context: _Context) -> tuple[str, ...]:
    text = context.text(USER_CA_FILE)
    if text is None:
        return ()
    keys: list[str] = []
    for number, line in _data_lines(text):
        try:
            key = parse_public_key_line(line)
        except ValueError as exc:
            context.problems.add(USER_CA_FILE, number, str(exc))
            continue
        if key not in keys:
            keys.append(key)
    return tuple(keys)


def _load_revoked(context: _Context) -> tuple[frozenset[str], bytes | None]:
    data = context.contents.get(REVOKED_KEYS_FILE)
    if data is None:
        return frozenset(), None
    if data.startswith(KRL_MAGIC):
        try:
            parse_krl(data)
        except ValueError as exc:
            context.problems.add(REVOKED_KEYS_FILE, 1, f"not a valid OpenSSH KRL: {exc}")
            return frozenset(), None
        return frozenset(), data
    text = context.text(REVOKED_KEYS_FILE)
    if text is None:
        return frozenset(), None
    fingerprints: set[str] = set()
    for number, line in _data_lines(text):
        fingerprint = line.strip()
        if _FINGERPRINT.fullmatch(fingerprint):
            fingerprints.add(fingerprint)
        else:
            context.problems.add(
                REVOKED_KEYS_FILE, number,
                "not a key fingerprint: one SHA256:<43 base64 characters> per line, or a binary KRL file",
            )
    return frozenset(fingerprints), None


# -- the whole set -------------------------------------------------------------------------------------------


def load_policy_set(directory: Path, *, today: dt.date | None = None) -> PolicySnapshot:
    """Read and validate the policy set in ``directory``; raise :class:`PolicyError` listing every problem.

    ``today`` (UTC; default now) only sets :attr:`PolicySnapshot.next_transition`. Blocking and O(size of
    the set): run it in a worker thread.
    """
    problems = _Problems()
    listing = _list_policy_files(directory, problems)
    contents = _read_files(directory, listing.files, problems)
    digest = _digest(listing, contents)
    context = _Context(contents, problems, unusable=set(listing.files) - set(contents))

    def names_under(folder: str) -> list[str]:
        return [name for name in contents if name.startswith(f"{folder}/")]

    organisations = _load_organisations(context)
    users = _load_users(context, organisations)
    roles = _load_roles(context)
    keys = _load_manufacturer_keys(context, names_under(MANUFACTURER_KEYS_DIR))
    estate_files = [
        estate
        for name in names_under(ESTATES_DIR)
        if (estate := _load_estate(context, name, organisations)) is not None
    ]
    timeline = _compile_estates(context, estate_files)
    del estate_files
    product_list = _load_product_list(context)
    user_ca_keys = _load_user_ca(context)
    revoked_fingerprints, revoked_krl = _load_revoked(context)
    problems.finish()
    assert timeline is not None  # only None after a conflict, which finish() raised

    on = today or dt.datetime.now(dt.UTC).date()
    return PolicySnapshot(
        organisations=MappingProxyType(organisations.valid),
        users=MappingProxyType(users),
        roles=MappingProxyType(roles),
        manufacturer_keys=MappingProxyType(keys),
        estates=timeline,
        digest=digest,
        product_list=product_list,
        user_ca_keys=user_ca_keys,
        revoked_fingerprints=revoked_fingerprints,
        revoked_krl=revoked_krl,
        next_transition=timeline.next_transition(on),
    )


def load_manufacturer_keys(directory: Path) -> dict[str, tuple[ManufacturerKey, ...]]:
    """The keys in a ``manufacturer-keys/`` folder by manufacturer id, for ``cfl-sftp package verify``.

    A missing folder holds no keys; anything else wrong raises :class:`PolicyError` (files named as under
    ``policies/``).
    """
    problems = _Problems()
    listing = _Listing()
    if directory.exists():
        _list_manufacturer_keys(directory, MANUFACTURER_KEYS_DIR, listing, problems)
    contents: dict[str, bytes] = {}
    for name in listing.files:
        try:
            contents[name] = (directory / name.split("/", 1)[1]).read_bytes()
        except OSError as exc:
            problems.add(name, 1, f"cannot read: {exc.strerror or type(exc).__name__}")
    keys = _load_manufacturer_keys(_Context(contents, problems), contents)
    problems.finish()
    return keys

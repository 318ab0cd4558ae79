"""Who may see which image: the estate rule of SPEC 2 and the ``/updates`` rule of SPEC 5.

Deciding per request must not cost time in the number of devices, and the estate of a large Supplier runs to
millions of them. So the estate is resolved in two steps, each done far less often than a request:

1. :func:`compile_estates`, once per policy set, O(N) in the devices listed: it settles every Change of
   Supplier (a device listed in several estates belongs, on each day, to the estate whose row has the latest
   ``since`` not after that day) and folds the devices into *spans*: "from day A until day B, organisation O
   holds devices of model M, the lowest of them running firmware F". Their number grows with organisations,
   models, firmware versions and distinct ``since`` dates, not with devices.
2. :func:`build_estate_view`, once per policy set and again at 00:00 UTC when a dated row takes effect, O(S)
   in the spans: for one UTC date, each organisation's device models and, per model, the lowest firmware
   running.

A request then asks :func:`is_entitled` and :func:`is_update`: a few dictionary and set look-ups.

This module reads no file and knows no file format: the policy loader turns ``estates/*.csv`` into
:class:`Estate` values and maps an :class:`EstateConflictError` back to file and line.
"""

from __future__ import annotations

import bisect
import datetime as dt
import operator
from array import array
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import compress
from types import MappingProxyType
from typing import Protocol

from cfl_sftp.domain.errors import CflError
from cfl_sftp.domain.model import DeviceModel, DeviceType, OrganisationKind, Purpose, Role

UNKNOWN_FIRMWARE = -1
"""The firmware of a device whose estate row leaves it empty: older than every real version (SPEC 5)."""

ALWAYS = 0
"""The ``since`` of a row that leaves it empty, as a day number: before every real date."""

FOREVER = dt.date.max.toordinal() + 1
"""The end of a span that no later row closes."""

SUPPLIER_ROLES = frozenset({Role.IMPORT_SUPPLIER, Role.GAS_SUPPLIER})
"""The roles that see ``/images`` and ``/updates`` (SPEC 1), and the only ones ``roles.toml`` may grant device
types to."""

EstateEntry = tuple[DeviceModel, int, int]
"""What one estate row says besides its ``device_id``: the device model, the firmware it runs as an integer
(:data:`UNKNOWN_FIRMWARE` when not known) and ``since`` as a proleptic Gregorian day number
(:meth:`datetime.date.toordinal`; :data:`ALWAYS` when empty)."""

Span = tuple[str, DeviceModel, int, int, int]
"""(organisation, device model, first day, day after the last, lowest firmware): see the module docstring."""

SPAN_FIELDS = 5
"""A span's columns in :attr:`EstateTimeline.columns`: organisation index, model index, start, end, firmware."""


@dataclass(frozen=True, slots=True)
class Estate:
    """One Supplier's estate, held column-wise so that millions of rows cost no object each.

    Row ``i`` is device ``device_ids[i]`` with the entry ``entries[entry_codes[i]]``. Rows share their few
    distinct entries (a large estate has many devices but few models, versions and dates), so a row costs two
    references. Build one with :meth:`from_rows` unless, like the loader, you already have the columns.
    """

    organisation: str
    device_ids: Sequence[str]
    entry_codes: Sequence[int]
    entries: Sequence[EstateEntry]

    def __len__(self) -> int:
        return len(self.device_ids)

    @classmethod
    def from_rows(
        cls,
        organisation: str,
        rows: Iterable[tuple[str, DeviceModel, str | int | None, dt.date | None]],
    ) -> Estate:
        """Rows of (device_id, device model, firmware version or None, since or None).

        The firmware version is the 8-hex-digit string of the estate file or its integer value.
        """
        device_ids: list[str] = []
        entry_codes: list[int] = []
        codes: dict[EstateEntry, int] = {}
        for device_id, model, firmware, since in rows:
            if firmware is None or firmware == "":
                number = UNKNOWN_FIRMWARE
            elif isinstance(firmware, str):
                number = int(firmware, 16)
            else:
                number = firmware
            entry = (model, number, ALWAYS if since is None else since.toordinal())
            device_ids.append(device_id)
            entry_codes.append(codes.setdefault(entry, len(codes)))
        return cls(organisation, device_ids, entry_codes, tuple(codes))


@dataclass(frozen=True, slots=True)
class DuplicateDevice:
    """A device the estates list so that its owner is ambiguous.

    Either two estates list it with the same ``since`` (SPEC 2), or one estate lists it twice
    (``organisations`` then names that estate twice). ``since`` is a day number, :data:`ALWAYS` when empty;
    it is meaningless for a device listed twice in one estate.
    """

    device_id: str
    organisations: tuple[str, str]
    since: int


class EstateConflictError(CflError):
    """The estates cannot be resolved; ``conflicts`` lists every ambiguous device."""

    def __init__(self, conflicts: list[DuplicateDevice]) -> None:
        self.conflicts = conflicts
        super().__init__(f"{len(conflicts)} device(s) listed ambiguously")


@dataclass(frozen=True, slots=True)
class EstateTimeline:
    """Every Supplier's estate resolved over time; immutable, and small whatever the number of devices.

    The spans are held as one flat array of integers (:data:`SPAN_FIELDS` per span, organisations and models
    as indexes into ``organisations`` and ``models``), not as a tuple per span: for millions of devices there
    are hundreds of thousands of spans, and as objects the garbage collector would walk every one of them in
    each full collection, which holds the event loop for hundreds of milliseconds. An array is one object to
    it, and it crosses to the service from the policy worker process as a single block of bytes.

    ``transitions`` holds the sorted day numbers on which some device changes hands or a dated row takes
    effect; ``device_counts`` the rows each estate lists (for logs and ``cfl-sftp policy check``).
    """

    organisations: tuple[str, ...]
    models: tuple[DeviceModel, ...]
    columns: array[int]
    transitions: tuple[int, ...]
    device_counts: Mapping[str, int]

    @classmethod
    def from_spans(
        cls, spans: Iterable[Span], transitions: Iterable[int], device_counts: Mapping[str, int]
    ) -> EstateTimeline:
        organisations: dict[str, int] = {}
        models: dict[DeviceModel, int] = {}
        columns = array("q")
        for organisation, model, start, end, firmware in spans:
            org_index = organisations.setdefault(organisation, len(organisations))
            columns.extend((org_index, models.setdefault(model, len(models)), start, end, firmware))
        return cls(tuple(organisations), tuple(models), columns, tuple(sorted(transitions)),
                   MappingProxyType(dict(device_counts)))

    @property
    def span_count(self) -> int:
        return len(self.columns) // SPAN_FIELDS

    def spans(self) -> Iterator[Span]:
        """Each span as a tuple, made as it is read (for checks and tools; the hot path reads the columns)."""
        organisations, models = self.organisations, self.models
        for org, model, start, end, firmware in self.index_rows():
            yield organisations[org], models[model], start, end, firmware

    def index_rows(self) -> Iterator[tuple[int, int, int, int, int]]:
        columns = self.columns
        return zip(*(columns[field::SPAN_FIELDS] for field in range(SPAN_FIELDS)), strict=True)

    def next_transition(self, after: dt.date) -> dt.date | None:
        """The first date after ``after`` on which some estate changes by itself (rebuild views then)."""
        index = bisect.bisect_right(self.transitions, after.toordinal())
        if index == len(self.transitions):
            return None
        return dt.date.fromordinal(self.transitions[index])


NO_ESTATES = EstateTimeline.from_spans((), (), {})


def compile_estates(estates: Iterable[Estate]) -> EstateTimeline:
    """Resolve every Change of Supplier and fold the devices into spans; raise on ambiguous devices.

    O(N) in the rows, and most of it runs inside C loops (set building, ``itertools.compress``): rows of a
    device that only one estate lists are never visited one by one, only their distinct entries are. Devices
    listed in several estates (Changes of Supplier in progress, usually few) are resolved one by one. Peak
    memory is a set of all device ids, references only.

    Raises :class:`EstateConflictError` listing every device that two estates list with the same ``since``
    and every device one estate lists twice.
    """
    estates = list(estates)
    conflicts: list[DuplicateDevice] = []
    moved: set[str] = set()
    listing_twice: set[str] = set()
    # Largest estate first: its own set starts ``seen`` without a copy, and the last one is never added to it
    # (growing a set of millions of ids is the costliest step here).
    by_size = sorted(estates, key=len, reverse=True)
    seen: set[str] = set()
    for position, estate in enumerate(by_size):
        own = set(estate.device_ids)
        if len(own) != len(estate.device_ids):
            listing_twice.add(estate.organisation)
        if position == 0:
            seen = own
            continue
        moved |= seen & own
        if position < len(by_size) - 1:
            seen |= own
    del seen, by_size
    for estate in estates:
        if estate.organisation in listing_twice:
            conflicts.extend(_listed_twice(estate))

    lowest: dict[tuple[str, DeviceModel, int, int], int] = {}

    def fold(organisation: str, model: DeviceModel, start: int, end: int, firmware: int) -> None:
        key = (organisation, model, start, end)
        known = lowest.get(key)
        if known is None or firmware < known:
            lowest[key] = firmware

    transitions: set[int] = set()
    histories: dict[str, list[tuple[int, str, DeviceModel, int]]] = {}
    for estate in estates:
        org, entries, codes = estate.organisation, estate.entries, estate.entry_codes
        if moved:
            is_moved = list(map(moved.__contains__, estate.device_ids))
            staying = set(compress(codes, map(operator.not_, is_moved)))
            for index in compress(range(len(codes)), is_moved):
                model, firmware, since = entries[codes[index]]
                histories.setdefault(estate.device_ids[index], []).append((since, org, model, firmware))
        else:
            staying = set(codes)
        for code in staying:
            model, firmware, since = entries[code]
            fold(org, model, since, FOREVER, firmware)
            transitions.add(since)

    for device_id, history in histories.items():
        history.sort(key=operator.itemgetter(0))
        for (since, org, model, firmware), following in zip(history, [*history[1:], None], strict=True):
            end = FOREVER if following is None else following[0]
            if following is not None and end == since and following[1] != org:
                conflicts.append(DuplicateDevice(device_id, (org, following[1]), since))
            if end > since:
                fold(org, model, since, end, firmware)
            transitions.update((since, end))

    if conflicts:
        raise EstateConflictError(conflicts)
    transitions -= {ALWAYS, FOREVER}
    return EstateTimeline.from_spans(
        ((*key, firmware) for key, firmware in lowest.items()),
        transitions,
        {e.organisation: len(e) for e in estates},
    )


def _listed_twice(estate: Estate) -> list[DuplicateDevice]:
    """Only runs when an estate lists some device twice: the error path may visit every row."""
    seen: set[str] = set()
    reported: set[str] = set()
    twice: list[DuplicateDevice] = []
    for device_id in estate.device_ids:
        if device_id in seen and device_id not in reported:
            reported.add(device_id)
            twice.append(DuplicateDevice(device_id, (estate.organisation, estate.organisation), ALWAYS))
        seen.add(device_id)
    return twice


@dataclass(frozen=True, slots=True)
class EstateView:
    """The estates as they stand on one UTC date: what every entitlement decision on that date reads.

    Per organisation that holds devices, each of its device models and the lowest firmware a device of that model
    runs there (:data:`UNKNOWN_FIRMWARE` if one runs a version nobody knows). Models are kept as their index in
    ``models`` and nested per organisation: dicts of integers only, which the garbage collector stops walking
    after its first full pass (a hundred Suppliers with two thousand models each are 200,000 entries; keyed by
    model objects or (organisation, model) pairs, every full collection would visit them all, holding the GIL).
    """

    on: dt.date
    models: tuple[DeviceModel, ...]
    model_index: Mapping[DeviceModel, int]
    lowest_by_index: Mapping[str, Mapping[int, int]]

    @property
    def lowest_firmware(self) -> dict[str, dict[DeviceModel, int]]:
        """The same as model objects (built on each call: for reports and tests, not for requests)."""
        return {org: {self.models[i]: fw for i, fw in held.items()} for org, held in self.lowest_by_index.items()}

    def holds(self, organisation: str, model: DeviceModel) -> bool:
        return self.lowest_of(organisation, model) is not None

    def lowest_of(self, organisation: str, model: DeviceModel) -> int | None:
        """The lowest firmware a device of ``model`` runs in the organisation's estate; ``None`` if it has none."""
        index = self.model_index.get(model)
        held = self.lowest_by_index.get(organisation)
        return None if index is None or held is None else held.get(index)

    def models_of(self, organisation: str) -> frozenset[DeviceModel]:
        return frozenset(self.models[i] for i in self.lowest_by_index.get(organisation, {}))


class HasEstates(Protocol):
    """Anything that carries a compiled timeline, such as the policy snapshot."""

    @property
    def estates(self) -> EstateTimeline: ...


def build_estate_view(source: EstateTimeline | HasEstates, on: dt.date) -> EstateView:
    """The estates on UTC date ``on``: rows dated after it are ignored, a row dated ``on`` already counts.

    O(S) in the timeline's spans, independent of the number of devices (the device-by-device work is done once
    per policy set by :func:`compile_estates`), so it may run on the event loop thread.
    """
    timeline = source if isinstance(source, EstateTimeline) else source.estates
    day = on.toordinal()
    stride = len(timeline.models)
    lowest: dict[int, int] = {}  # organisation index * stride + model index: int keys hash in C
    for org, model, start, end, firmware in timeline.index_rows():
        if start <= day < end:
            key = org * stride + model
            known = lowest.get(key)
            if known is None or firmware < known:
                lowest[key] = firmware
    held: dict[str, dict[int, int]] = {}
    for key, firmware in lowest.items():
        org, model = divmod(key, stride)
        held.setdefault(timeline.organisations[org], {})[model] = firmware
    index = {model: i for i, model in enumerate(timeline.models)}
    return EstateView(on=on, models=timeline.models, model_index=index, lowest_by_index=held)


class UserLike(Protocol):
    """What entitlement reads of a user (the policy's ``User`` satisfies it)."""

    @property
    def roles(self) -> frozenset[Role]: ...


class OrganisationLike(Protocol):
    """What entitlement reads of an organisation (the policy's ``Organisation`` satisfies it)."""

    @property
    def id(self) -> str: ...

    @property
    def kind(self) -> OrganisationKind: ...


def can_see_images(user: UserLike, organisation: OrganisationLike) -> bool:
    """Only a Supplier's users holding ``import-supplier`` or ``gas-supplier`` see ``/images`` (SPEC 1)."""
    return organisation.kind is OrganisationKind.SUPPLIER and not SUPPLIER_ROLES.isdisjoint(user.roles)


def allowed_device_types(
    user: UserLike, roles_table: Mapping[Role, frozenset[DeviceType]]
) -> frozenset[DeviceType]:
    """The device types any of the user's supplier roles may see (``roles.toml``)."""
    allowed: frozenset[DeviceType] = frozenset()
    for role in user.roles & SUPPLIER_ROLES:
        allowed |= roles_table.get(role, frozenset())
    return allowed


def is_entitled(  # noqa: PLR0917 - the SFTP layer passes the conditions' inputs in SPEC order
    user: UserLike,
    organisation: OrganisationLike,
    roles_table: Mapping[Role, frozenset[DeviceType]],
    estate_view: EstateView,
    image_device_type: DeviceType,
    image_device_model: DeviceModel,
    image_purpose: Purpose,
    admitted_purposes: Collection[Purpose],
) -> bool:
    """SPEC 2: a supplier user may have an image when all three conditions hold.

    1. the image's device model is in its organisation's estate on the view's date;
    2. the image's device type is allowed for one of the user's supplier roles;
    3. the image's purpose is one the library admits.

    A user who cannot see ``/images`` at all (:func:`can_see_images`) is entitled to nothing.
    """
    if not can_see_images(user, organisation):
        return False
    if image_purpose not in admitted_purposes:
        return False
    if not estate_view.holds(organisation.id, image_device_model):
        return False
    return any(image_device_type in roles_table.get(role, ()) for role in user.roles & SUPPLIER_ROLES)


def is_update(
    estate_view: EstateView, organisation: str, device_model: DeviceModel, firmware_version: str | int
) -> bool:
    """SPEC 5 ``/updates``: the image is newer than the firmware some device of its model in the estate runs.

    Firmware versions compare as unsigned integers; a device of unknown firmware counts as older than any
    image. An organisation holding no device of the model has no update for it.
    """
    lowest = estate_view.lowest_of(organisation, device_model)
    if lowest is None:
        return False
    number = int(firmware_version, 16) if isinstance(firmware_version, str) else firmware_version
    return number > lowest

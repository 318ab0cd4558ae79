"""Entitlement (SPEC 2) and the ``/updates`` rule (SPEC 5), on plain values: no files, no policy loader."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pytest

from cfl_sftp.domain.entitlement import (
    UNKNOWN_FIRMWARE,
    DuplicateDevice,
    Estate,
    EstateConflictError,
    build_estate_view,
    can_see_images,
    compile_estates,
    is_entitled,
    is_update,
)
from cfl_sftp.domain.model import DeviceModel, DeviceType, OrganisationKind, Purpose, Role

ESME = DeviceModel("1A2B", "0001", "0100")
GSME = DeviceModel("1A2B", "0002", "0100")
OTHER_ESME = DeviceModel("3C4D", "0001", "0100")
ROLES = {
    Role.IMPORT_SUPPLIER: frozenset({DeviceType.ESME, DeviceType.CHF}),
    Role.GAS_SUPPLIER: frozenset({DeviceType.GSME, DeviceType.CHF}),
}
ALL_PURPOSES = frozenset(Purpose)
SWITCH = dt.date(2026, 12, 1)
BEFORE = SWITCH - dt.timedelta(days=1)


@dataclass(frozen=True)
class Org:
    id: str
    kind: OrganisationKind = OrganisationKind.SUPPLIER


@dataclass(frozen=True)
class Person:
    roles: frozenset[Role]


NORTHERN = Org("northern-energy")
SOUTHERN = Org("southern-power")
ELECTRICITY_USER = Person(frozenset({Role.IMPORT_SUPPLIER}))


def estate(organisation: str, *rows: tuple[str, DeviceModel, str | None, dt.date | None]) -> Estate:
    return Estate.from_rows(organisation, rows)


# -- the estate on a date ------------------------------------------------------------------------------------


def test_a_device_without_since_is_in_its_estate_on_any_date() -> None:
    timeline = compile_estates([estate("northern-energy", ("E1", ESME, "00000100", None))])

    assert build_estate_view(timeline, dt.date(1970, 1, 1)).holds("northern-energy", ESME)
    assert build_estate_view(timeline, dt.date(2999, 1, 1)).holds("northern-energy", ESME)


def test_a_row_dated_in_the_future_is_ignored_until_its_date() -> None:
    timeline = compile_estates([estate("northern-energy", ("E1", ESME, None, SWITCH))])

    assert not build_estate_view(timeline, BEFORE).holds("northern-energy", ESME)
    assert build_estate_view(timeline, SWITCH).holds("northern-energy", ESME)


def test_change_of_supplier_the_gaining_supplier_holds_the_device_from_since() -> None:
    timeline = compile_estates(
        [
            estate("northern-energy", ("E1", ESME, "00000100", None)),
            estate("southern-power", ("E1", ESME, "00000100", SWITCH)),
        ]
    )

    assert not build_estate_view(timeline, BEFORE).holds("southern-power", ESME)
    assert build_estate_view(timeline, SWITCH).holds("southern-power", ESME)


def test_change_of_supplier_the_losing_supplier_stops_holding_it_on_the_same_date() -> None:
    timeline = compile_estates(
        [
            estate("northern-energy", ("E1", ESME, "00000100", None), ("E2", GSME, None, None)),
            estate("southern-power", ("E1", ESME, "00000100", SWITCH)),
        ]
    )

    assert build_estate_view(timeline, BEFORE).holds("northern-energy", ESME)
    on_switch = build_estate_view(timeline, SWITCH)
    assert not on_switch.holds("northern-energy", ESME)
    assert on_switch.models_of("northern-energy") == frozenset({GSME})


def test_change_of_supplier_with_both_rows_dated_follows_the_latest_since_not_after_the_date() -> None:
    earlier = dt.date(2026, 6, 1)
    timeline = compile_estates(
        [
            estate("northern-energy", ("E1", ESME, None, earlier)),
            estate("southern-power", ("E1", ESME, None, SWITCH)),
        ]
    )

    assert build_estate_view(timeline, earlier - dt.timedelta(days=1)).lowest_firmware == {}
    assert build_estate_view(timeline, BEFORE).models_of("northern-energy") == frozenset({ESME})
    assert build_estate_view(timeline, SWITCH).models_of("northern-energy") == frozenset()
    assert build_estate_view(timeline, SWITCH).models_of("southern-power") == frozenset({ESME})


def test_a_change_of_supplier_between_the_two_smaller_of_three_estates_is_resolved() -> None:
    timeline = compile_estates(
        [
            estate("northern-energy", *((f"N{n}", GSME, None, None) for n in range(5))),
            estate("southern-power", ("E1", ESME, None, None), ("S2", GSME, None, None)),
            estate("western-gas", ("E1", ESME, None, SWITCH)),
        ]
    )

    assert build_estate_view(timeline, BEFORE).holds("southern-power", ESME)
    assert not build_estate_view(timeline, SWITCH).holds("southern-power", ESME)
    assert build_estate_view(timeline, SWITCH).holds("western-gas", ESME)


def test_the_other_devices_of_the_model_keep_it_in_the_losing_estate() -> None:
    timeline = compile_estates(
        [
            estate("northern-energy", ("E1", ESME, None, None), ("E2", ESME, "00000300", None)),
            estate("southern-power", ("E1", ESME, None, SWITCH)),
        ]
    )

    after = build_estate_view(timeline, SWITCH)
    assert after.holds("northern-energy", ESME)
    assert after.lowest_of("northern-energy", ESME) == 0x300


def test_the_next_transition_is_the_next_date_a_row_takes_effect() -> None:
    timeline = compile_estates(
        [
            estate("northern-energy", ("E1", ESME, None, None), ("E3", GSME, None, dt.date(2027, 3, 1))),
            estate("southern-power", ("E1", ESME, None, SWITCH)),
        ]
    )

    assert timeline.next_transition(BEFORE) == SWITCH
    assert timeline.next_transition(SWITCH) == dt.date(2027, 3, 1)
    assert timeline.next_transition(dt.date(2027, 3, 1)) is None


def test_the_same_device_with_the_same_since_in_two_estates_is_a_conflict() -> None:
    with pytest.raises(EstateConflictError) as caught:
        compile_estates(
            [
                estate("northern-energy", ("E1", ESME, None, SWITCH)),
                estate("southern-power", ("E1", ESME, None, SWITCH)),
            ]
        )

    assert caught.value.conflicts == [DuplicateDevice("E1", ("northern-energy", "southern-power"), SWITCH.toordinal())]


def test_a_device_listed_twice_in_one_estate_is_a_conflict() -> None:
    with pytest.raises(EstateConflictError) as caught:
        compile_estates([estate("northern-energy", ("E1", ESME, None, None), ("E1", GSME, None, SWITCH))])

    assert [c.organisations for c in caught.value.conflicts] == [("northern-energy", "northern-energy")]


def test_the_lowest_firmware_per_model_counts_unknown_firmware_as_oldest() -> None:
    estate_view = build_estate_view(
        compile_estates(
            [
                estate(
                    "northern-energy",
                    ("E1", ESME, "00000200", None),
                    ("E2", ESME, "00000100", None),
                    ("E3", GSME, "00000300", None),
                    ("E4", GSME, None, None),
                )
            ]
        ),
        SWITCH,
    )

    assert estate_view.lowest_of("northern-energy", ESME) == 0x100
    assert estate_view.lowest_of("northern-energy", GSME) == UNKNOWN_FIRMWARE


def test_a_view_over_200k_devices_is_built_from_few_spans() -> None:
    models = [DeviceModel("1A2B", f"{m:04X}", "0100") for m in range(20)]
    northern = [(f"N{n:07d}", models[n % 20], f"{n % 9 + 1:08X}", None) for n in range(100_000)]
    southern = [(f"S{n:07d}", models[n % 20], None if n % 1000 == 0 else "00000005", None) for n in range(100_000)]
    southern.append(("N0000021", models[1], "00000004", SWITCH))  # gained by Change of Supplier

    timeline = compile_estates(
        [Estate.from_rows("northern-energy", northern), Estate.from_rows("southern-power", southern)]
    )
    before, after = build_estate_view(timeline, BEFORE), build_estate_view(timeline, SWITCH)

    assert timeline.span_count < 200
    assert len(after.models_of("northern-energy")) == 20
    assert after.lowest_of("southern-power", models[0]) == UNKNOWN_FIRMWARE
    assert before.lowest_of("southern-power", models[1]) == 5
    assert after.lowest_of("southern-power", models[1]) == 4


# -- who sees /images -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("roles", "kind", "sees"),
    [
        ({Role.IMPORT_SUPPLIER}, OrganisationKind.SUPPLIER, True),
        ({Role.GAS_SUPPLIER, Role.RELEASE_NOTES}, OrganisationKind.SUPPLIER, True),
        ({Role.RELEASE_NOTES, Role.UPLOADER}, OrganisationKind.SUPPLIER, False),
        ({Role.IMPORT_SUPPLIER}, OrganisationKind.MAP, False),
        ({Role.IMPORT_SUPPLIER}, OrganisationKind.MANUFACTURER, False),
        ({Role.GAS_SUPPLIER}, OrganisationKind.AUDITOR, False),
    ],
)
def test_only_supplier_users_with_a_supplier_role_see_images(
    roles: set[Role], kind: OrganisationKind, sees: bool
) -> None:
    assert can_see_images(Person(frozenset(roles)), Org("x", kind)) is sees


# -- the three conditions -------------------------------------------------------------------------------------


def entitled(
    *,
    user: Person = ELECTRICITY_USER,
    organisation: Org = NORTHERN,
    device_type: DeviceType = DeviceType.ESME,
    model: DeviceModel = ESME,
    purpose: Purpose = Purpose.SECURITY_FIX,
    admitted: frozenset[Purpose] = ALL_PURPOSES,
) -> bool:
    estate_view = build_estate_view(
        compile_estates([estate("northern-energy", ("E1", ESME, "00000100", None))]), SWITCH
    )
    return is_entitled(user, organisation, ROLES, estate_view, device_type, model, purpose, admitted)


def test_a_supplier_user_is_entitled_when_all_three_conditions_hold() -> None:
    assert entitled()


def test_condition_1_an_image_for_a_model_outside_the_estate_is_not_entitled() -> None:
    assert not entitled(model=OTHER_ESME)


def test_condition_1_another_suppliers_estate_does_not_count() -> None:
    assert not entitled(organisation=SOUTHERN)


def test_condition_2_a_device_type_none_of_the_users_roles_allows_is_not_entitled() -> None:
    assert not entitled(device_type=DeviceType.GSME)
    assert not entitled(user=Person(frozenset({Role.GAS_SUPPLIER})))


def test_condition_2_any_one_of_the_users_roles_is_enough() -> None:
    both = Person(frozenset({Role.GAS_SUPPLIER, Role.IMPORT_SUPPLIER}))

    assert entitled(user=both, device_type=DeviceType.ESME)


def test_condition_3_a_purpose_the_library_does_not_admit_is_not_entitled() -> None:
    assert not entitled(admitted=frozenset({Purpose.SECURITY_FIX}), purpose=Purpose.DEFECT_FIX)


def test_a_user_who_cannot_see_images_is_entitled_to_nothing() -> None:
    assert not entitled(user=Person(frozenset({Role.RELEASE_NOTES})))
    assert not entitled(organisation=Org("northern-energy", OrganisationKind.MAP))


# -- /updates -------------------------------------------------------------------------------------------------


def test_an_image_newer_than_the_lowest_firmware_running_is_an_update() -> None:
    estate_view = build_estate_view(
        compile_estates([estate("northern-energy", ("E1", ESME, "00000200", None), ("E2", ESME, "00000009", None))]),
        SWITCH,
    )

    assert is_update(estate_view, "northern-energy", ESME, "0000000A")
    assert is_update(estate_view, "northern-energy", ESME, 0x0A)


def test_an_image_no_newer_than_every_device_runs_is_not_an_update() -> None:
    estate_view = build_estate_view(
        compile_estates([estate("northern-energy", ("E1", ESME, "00000200", None), ("E2", ESME, "00000009", None))]),
        SWITCH,
    )

    assert not is_update(estate_view, "northern-energy", ESME, "00000009")
    assert not is_update(estate_view, "northern-energy", ESME, "00000001")


def test_firmware_versions_compare_as_unsigned_integers() -> None:
    estate_view = build_estate_view(
        compile_estates([estate("northern-energy", ("E1", ESME, "7FFFFFFF", None))]), SWITCH
    )

    assert is_update(estate_view, "northern-energy", ESME, "80000000")
    assert is_update(estate_view, "northern-energy", ESME, "FFFFFFFF")


def test_a_device_of_unknown_firmware_makes_any_version_an_update() -> None:
    estate_view = build_estate_view(
        compile_estates([estate("northern-energy", ("E1", ESME, "00000200", None), ("E2", ESME, None, None))]),
        SWITCH,
    )

    assert is_update(estate_view, "northern-energy", ESME, "00000000")


def test_a_model_the_estate_does_not_hold_has_no_updates() -> None:
    estate_view = build_estate_view(compile_estates([estate("northern-energy", ("E1", ESME, None, None))]), SWITCH)

    assert not is_update(estate_view, "northern-energy", GSME, "FFFFFFFF")
    assert not is_update(estate_view, "southern-power", ESME, "FFFFFFFF")


def test_a_device_that_left_by_change_of_supplier_no_longer_makes_updates() -> None:
    timeline = compile_estates(
        [
            estate("northern-energy", ("E1", ESME, "00000001", None), ("E2", ESME, "00000300", None)),
            estate("southern-power", ("E1", ESME, "00000001", SWITCH)),
        ]
    )

    assert is_update(build_estate_view(timeline, BEFORE), "northern-energy", ESME, "00000002")
    assert not is_update(build_estate_view(timeline, SWITCH), "northern-energy", ESME, "00000002")
    assert is_update(build_estate_view(timeline, SWITCH), "southern-power", ESME, "00000002")

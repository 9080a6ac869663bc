"""Every model of a VM agrees with the one declaration, vmshop_common.vmfields.VM_FIELDS.

Each model carries exactly the fields declared for it, each of the declared
kind; both databases have a column per stored field; the shop's queries know
the queryable ones; and the functions that copy a VM from one model to the
next (registry -> shop wire -> client, plant record -> plant wire) drop none.
(The checked-in WSDL files are held to the wire types by test_shop.py and
test_plant.py.)
"""

from __future__ import annotations

import dataclasses
import sqlite3
import types
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vmshop_common import vmfields
from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
from spyne import Boolean, Double, Integer, Unicode

from vmplant_service import wire as plant_wire
from vmplant_service.records import PlantRecords, VMRecord
from vmshop_service import client as shop_client
from vmshop_service import query
from vmshop_service import wire as shop_wire
from vmshop_service.registry import Registry, VMEntry
from vmshop_service.shop import Shop

DATACLASSES = {"registry": VMEntry, "client": shop_client.VM, "plant-record": VMRecord}
SPYNE = {"shop-wire": shop_wire.VMInfo, "plant-wire": plant_wire.VMInfo}
PYTHON_KINDS = {"str": str, "int": int, "float": float, "bool": bool}
SPYNE_KINDS = {"str": Unicode, "int": Integer, "float": Double, "bool": Boolean}
SQL_KINDS = {"str": "TEXT", "int": "INTEGER", "float": "REAL", "bool": "INTEGER", "strings": "TEXT",
             "attributes": "TEXT"}


def test_the_declaration_is_well_formed() -> None:
    assert len(vmfields.BY_NAME) == len(vmfields.VM_FIELDS)
    for field in vmfields.VM_FIELDS:
        assert field.kind in vmfields.KINDS and field.models and field.models <= vmfields.MODELS, field


def _bare(hint: Any) -> Any:
    """``X`` of ``X | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        assert len(args) == 1, hint
        return args[0]
    return hint


@pytest.mark.parametrize("model", sorted(DATACLASSES))
def test_each_dataclass_model_carries_exactly_its_declared_fields(model: str) -> None:
    cls = DATACLASSES[model]
    assert [f.name for f in dataclasses.fields(cls)] and \
        {f.name for f in dataclasses.fields(cls)} == set(vmfields.names_of(model))
    hints = typing.get_type_hints(cls)
    for field in vmfields.fields_of(model):
        hint = _bare(hints[field.name])
        if field.kind in PYTHON_KINDS:
            assert hint is PYTHON_KINDS[field.kind], (model, field.name, hint)
        elif field.kind == "strings":
            assert hint == list[str], (model, field.name, hint)
        elif field.kind == "attributes":
            assert hint == dict[str, str], (model, field.name, hint)
        else:
            assert hint is shop_client.EndpointRef, (model, field.name, hint)


@pytest.mark.parametrize("model", sorted(SPYNE))
def test_each_wire_type_carries_exactly_its_declared_fields(model: str) -> None:
    members = SPYNE[model]._type_info
    assert set(members) == set(vmfields.names_of(model))
    for field in vmfields.fields_of(model):
        member = members[field.name]
        many = member.Attributes.max_occurs > 1
        if field.kind in SPYNE_KINDS:
            assert issubclass(member, SPYNE_KINDS[field.kind]) and not many, (model, field.name)
        elif field.kind == "strings":
            assert issubclass(member, Unicode) and many, (model, field.name)
        elif field.kind == "attributes":
            assert set(member._type_info) == {"name", "value"} and many, (model, field.name)
        else:
            assert issubclass(member, shop_wire.EndpointReference), (model, field.name)


def _columns(connection: sqlite3.Connection) -> dict[str, str]:
    return {row[1]: row[2] for row in connection.execute("PRAGMA table_info(vms)")}


def test_the_registrys_table_has_a_column_per_stored_field(tmp_path: Path) -> None:
    with Registry(tmp_path / "r.sqlite3"):
        pass
    with sqlite3.connect(tmp_path / "r.sqlite3") as connection:
        columns = _columns(connection)
    stored = [f for f in vmfields.fields_of("registry") if f.kind != "attributes"]  # attributes: a table of their own
    assert set(columns) - vmfields.REGISTRY_BOOKKEEPING == {f.name for f in stored}
    for field in stored:
        assert columns[field.name] == SQL_KINDS[field.kind], field.name


def test_the_plants_table_has_a_column_per_field(tmp_path: Path) -> None:
    PlantRecords(tmp_path / "p.sqlite3").close()
    with sqlite3.connect(tmp_path / "p.sqlite3") as connection:
        columns = _columns(connection)
    assert set(columns) - {"channel_dir"} == set(vmfields.names_of("plant-record"))  # channel_dir: a relic, unused
    for field in vmfields.fields_of("plant-record"):
        assert columns[field.name] == SQL_KINDS[field.kind], field.name


def test_the_shops_queries_know_the_queryable_fields() -> None:
    assert query.BUILTIN_ATTRIBUTES == {f.name for f in vmfields.QUERYABLE}
    assert query.TIME_ATTRIBUTES <= query.NUMERIC_ATTRIBUTES
    assert all(vmfields.BY_NAME[name].kind == "float" for name in query.TIME_ATTRIBUTES)


def _sample(kind: str, name: str) -> Any:
    return {"str": f"{name}-value", "int": 7, "float": 1234.5, "bool": True, "strings": [f"{name}-1"],
            "attributes": {"project": "x"}}[kind]


def test_no_copy_from_model_to_model_drops_a_field() -> None:
    entry = VMEntry(**{f.name: _sample(f.kind, f.name) for f in vmfields.fields_of("registry")})
    shop = SimpleNamespace(epr=lambda key: shop_wire.EndpointReference(Address="https://shop.test/", VMKey=key))
    info = Shop.vm_out(shop, entry)  # type: ignore[arg-type]
    for field in vmfields.fields_of("shop-wire"):
        assert getattr(info, field.name) not in (None, [], ""), f"Shop.vm_out drops {field.name}"
    vm = shop_client.VMShopClient._vm(SimpleNamespace(url="https://shop.test/"), info)  # type: ignore[arg-type]
    for field in vmfields.fields_of("client"):
        assert getattr(vm, field.name) not in (None, [], {}, ""), f"VMShopClient._vm drops {field.name}"
        if field.kind in PYTHON_KINDS or field.kind in ("strings", "attributes"):
            assert getattr(vm, field.name) == getattr(entry, field.name), field.name

    record = VMRecord(**{f.name: _sample(f.kind, f.name) for f in vmfields.fields_of("plant-record")})
    out = plant_wire.vm_out(record, ["base"])
    for field in vmfields.fields_of("plant-wire"):
        assert getattr(out, field.name) not in (None, [], ""), f"vmplant_service.wire.vm_out drops {field.name}"

"""FastSoap11 writes exactly what Spyne's Soap11 writes, for every response type of both services.

Random records (members missing, None, empty and repeated arrays, None items
in arrays, odd strings and numbers) of every operation's response message,
serialised by both protocols: the bytes must be equal, or both must refuse.
"""

from __future__ import annotations

import math
from typing import Any

from vmshop_common.soap import compat  # noqa: F401  (before spyne)

# isort: split
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree
from spyne.model import Boolean, ComplexModelBase, Double, Integer, Unicode
from spyne.protocol.soap import Soap11

from vmplant_service import service as plant_service
from vmplant_service import wire as plant_wire
from vmshop_common.soap.fastxml import FastSoap11, spyne_record
from vmshop_common.soap.server import build_application
from vmshop_service import service as shop_service
from vmshop_service import wire as shop_wire

APPS = {
    "plant": build_application([plant_service.VMPlantService], plant_wire.TNS, name=plant_service.APP_NAME),
    "shop": build_application([shop_service.VMShopService], shop_wire.TNS, name=shop_service.APP_NAME),
}


def _protocols(app: Any) -> tuple[Soap11, FastSoap11]:
    stock, fast = Soap11(), FastSoap11()
    stock.set_app(app)
    fast.set_app(app)
    return stock, fast


PROTOCOLS = {name: _protocols(app) for name, app in APPS.items()}
RESPONSES = [(name, descriptor.out_message) for name, app in APPS.items()
             for descriptor in {d.name: d for ds in app.interface.service_method_map.values() for d in ds}.values()]

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
#: Values of the wrong Python type: both protocols must convert (or refuse) them alike.
ODD = st.sampled_from(["12", "abc", " 7 ", 3, 2.5, True, False, b"bytes", 10**30])
NUMBERS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1e-7, 1763936311.123, 5.0])


def value_of(cls: type, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values of a Spyne type (None included)."""
    if issubclass(cls, ComplexModelBase):
        if depth > 4:
            return st.none()
        fields = {name: member_value(member, depth + 1) for name, member in cls._type_info.items()}
        # Values are instances of the original class, as the services make them (not of a customised subclass).
        original = getattr(cls, "__orig__", None) or cls
        return st.none() | st.fixed_dictionaries({}, optional=fields).map(lambda kw: original(**kw))
    if issubclass(cls, Boolean):
        return st.none() | st.booleans() | ODD
    if issubclass(cls, Integer):
        return st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | ODD
    if issubclass(cls, Double):
        return st.none() | NUMBERS | ODD
    if issubclass(cls, Unicode):
        return st.none() | TEXT | ODD
    raise AssertionError(f"no strategy for {cls}")


def member_value(cls: type, depth: int) -> st.SearchStrategy[Any]:
    if cls.Attributes.max_occurs > 1:
        return st.none() | st.lists(value_of(cls, depth), max_size=3)
    return value_of(cls, depth)


def serialise(protocol: Soap11, cls: type, inst: Any) -> bytes | str:
    parent = etree.Element("{urn:test}Body")
    try:
        protocol.to_parent(None, cls, inst, parent, cls.get_namespace())
    except Exception as exc:  # noqa: BLE001 - both protocols must refuse the same values
        return f"refused: {type(exc).__name__}"
    return bytes(etree.tostring(parent))


@pytest.mark.parametrize(("app", "message"), RESPONSES, ids=[f"{a}-{m.get_type_name()}" for a, m in RESPONSES])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fast_output_equals_spynes(app: str, message: type, data: st.DataObject) -> None:
    inst = data.draw(value_of(message).filter(lambda v: v is not None))
    stock, fast = PROTOCOLS[app]
    assert serialise(fast, message, inst) == serialise(stock, message, inst)


def test_every_response_type_is_compiled() -> None:
    """The point of the fast protocol: none of the services' responses falls back to Spyne's generic path."""
    for app, message in RESPONSES:
        assert PROTOCOLS[app][1]._plan(message) is not None, f"{app}: {message.get_type_name()} is not compiled"


def test_values_spyne_converts_fall_back_to_spyne() -> None:
    """A record given as a dict (Spyne turns it into an instance) still comes out as Spyne writes it."""
    stock, fast = PROTOCOLS["shop"]
    epr_as_dict = shop_wire.VMInfo(vm_id="a", epr={"Address": "http://x/", "VMKey": "a"}, memory=1,
                                   created=math.pi, steps=["s", None], attributes=[])
    assert serialise(fast, shop_wire.VMInfo, epr_as_dict) == serialise(stock, shop_wire.VMInfo, epr_as_dict)


def test_a_full_record_never_takes_spynes_generic_path(monkeypatch: pytest.MonkeyPatch) -> None:
    stock, fast = PROTOCOLS["shop"]
    calls = []
    generic = Soap11.to_parent

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(args[1])
        return generic(self, *args, **kwargs)

    monkeypatch.setattr(Soap11, "to_parent", counting)
    vm = shop_wire.VMInfo(epr=shop_wire.EndpointReference(Address="http://127.0.0.1:1/", VMKey="k"), vm_id="k",
                          memory=128, created=1.5, steps=["a"], attributes=[shop_wire.Attribute(name="n", value="v")])
    descriptor = APPS["shop"].interface.service_method_map[f"{{{shop_wire.TNS}}}queryVMs"][0]
    out = serialise(fast, descriptor.out_message, descriptor.out_message(queryVMsResult=[vm, vm]))
    assert b"<ns0:VMKey>k</ns0:VMKey>" in out or b"VMKey>k<" in out
    assert calls == []


RECORD_CLASSES = [c for module in (shop_wire, plant_wire) for c in vars(module).values()
                  if isinstance(c, type) and issubclass(c, ComplexModelBase) and c.__module__ == module.__name__]


@pytest.mark.parametrize("cls", RECORD_CLASSES, ids=lambda c: f"{c.__module__.split('.')[0]}-{c.__name__}")
def test_spyne_record_makes_what_the_constructor_makes(cls: type) -> None:
    names = list(cls._type_info)  # type: ignore[attr-defined]
    for values in ({}, {names[0]: "x"}, dict.fromkeys(names, 1)):
        made = spyne_record(cls, **values)
        assert type(made) is cls and made.__dict__ == cls(**values).__dict__
    assert spyne_record(cls, no_such_member=1).__dict__ == cls(no_such_member=1).__dict__


def _query_answer(vms: list[Any]) -> tuple[type, Any]:
    descriptor = APPS["shop"].interface.service_method_map[f"{{{shop_wire.TNS}}}queryVMs"][0]
    return descriptor.out_message, descriptor.out_message(queryVMsResult=vms)


def _vm(key: str, **fields: Any) -> Any:
    values: dict[str, Any] = {
        "epr": shop_wire.EndpointReference(Address="http://127.0.0.1:1/", VMKey=key), "vm_id": key, "owner": "u",
        "state": "running", "memory": 128, "created": 1.5, "cost": 2.25, "steps": ["a", "b"],
        "attributes": [shop_wire.Attribute(name="n", value="v")]}
    values.update(fields)
    return shop_wire.VMInfo(**values)


def _serialise_under(protocol: Soap11, cls: type, inst: Any, nsmap: dict[Any, str] | None) -> bytes | str:
    parent = etree.Element("{urn:test}Body", nsmap=nsmap)
    try:
        protocol.to_parent(None, cls, inst, parent, cls.get_namespace())
    except Exception as exc:  # noqa: BLE001 - both protocols must refuse the same values
        return f"refused: {type(exc).__name__}"
    return bytes(etree.tostring(parent))


def test_lists_of_records_take_the_text_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """queryVMs' answer (an array of records) is written as text and parsed once: the element path is not
    taken, and the bytes are Spyne's, whether the parent already declares the namespace or not."""
    stock, fast = PROTOCOLS["shop"]
    written = []
    element_path = FastSoap11._write

    def counting(self: Any, *args: Any) -> Any:
        written.append(args[1].cls)
        return element_path(self, *args)

    monkeypatch.setattr(FastSoap11, "_write", counting)
    cls, answer = _query_answer([_vm("k1"), _vm("k2", error="a&b <c> ]]> \r\n\t'\"", address="10.0.0.2")])
    for nsmap in (None, {"tns": shop_wire.TNS, "t": "urn:test"}):
        out = _serialise_under(fast, cls, answer, nsmap)
        assert out == _serialise_under(stock, cls, answer, nsmap)
        assert b"a&amp;b &lt;c&gt; ]]&gt; &#13;\n\t'\"" in bytes(out)  # type: ignore[arg-type]
    assert written == []


@pytest.mark.parametrize("fields", [
    {"error": ""},  # lxml writes <a></a> for '' but a parsed <a></a> is <a/>
    {"error": "bad \x01 byte"},  # not XML: both refuse
    {"error": "lone \ud800 surrogate"},
    {"steps": ["a", None]},  # Spyne's own path for None items
    {"memory": "12"},  # a value Spyne converts
    {"epr": {"Address": "http://x/", "VMKey": "k"}},  # a record given as a dict
])
def test_what_the_text_path_cannot_write_takes_the_element_path(fields: dict[str, Any]) -> None:
    stock, fast = PROTOCOLS["shop"]
    cls, answer = _query_answer([_vm("k1"), _vm("k2", **fields)])
    for nsmap in (None, {"tns": shop_wire.TNS}, {None: shop_wire.TNS}, {"a": shop_wire.TNS, "b": shop_wire.TNS}):
        assert _serialise_under(fast, cls, answer, nsmap) == _serialise_under(stock, cls, answer, nsmap)


def _answer_bytes(protocol: Soap11, vms: Any, app_name: str = "shop", descriptor: Any = None,
                  out_object: list[Any] | None = None) -> bytes | str:
    """The bytes of a whole answer (by default queryVMs' with ``vms``) as the server makes them (serialize, then
    create_out_string)."""
    from types import SimpleNamespace

    from spyne import MethodContext

    app = APPS[app_name]
    ctx = MethodContext(SimpleNamespace(app=app), MethodContext.SERVER)
    ctx.descriptor = descriptor or app.interface.service_method_map[f"{{{shop_wire.TNS}}}queryVMs"][0]
    ctx.out_object = [vms] if out_object is None else out_object
    try:
        protocol.serialize(ctx, protocol.RESPONSE)
        protocol.create_out_string(ctx)
    except Exception as exc:  # noqa: BLE001 - both protocols must refuse the same values
        return f"refused: {type(exc).__name__}"
    return b"".join(ctx.out_string)


@pytest.mark.parametrize("vms", [
    [_vm("k1"), _vm("k2", error="x<y & \r")],
    [],
    None,
    [shop_wire.VMInfo()],  # every member absent: <tns:queryVMsResult/>
    [_vm("k1", attributes=[shop_wire.Attribute()], epr=shop_wire.EndpointReference())],
    [_vm("k1", error="")],
    [_vm("k1", error="bad \x01")],
    [_vm("k1", error="\ud800")],
    [_vm("k1", error="\ufffe")],
    [_vm("k1", owner="caf\u00e9 \U0001f600 \u2028")],
    [_vm("k1", steps=["a", None])],
], ids=["two", "empty", "none", "bare", "empty-records", "empty-string", "control", "surrogate", "fffe", "unicode",
        "none-item"])
def test_the_whole_answer_is_spynes(vms: Any) -> None:
    """The whole envelope of a queryVMs answer, as the shop's application writes it (by text, without a tree,
    where it can), is byte for byte the stock protocol's, or both refuse it."""
    stock, fast = PROTOCOLS["shop"]
    assert _answer_bytes(fast, vms) == _answer_bytes(stock, vms)


def test_a_whole_answer_is_written_without_a_tree() -> None:
    from types import SimpleNamespace

    from spyne import MethodContext

    app = APPS["shop"]
    fast = PROTOCOLS["shop"][1]
    ctx = MethodContext(SimpleNamespace(app=app), MethodContext.SERVER)
    ctx.descriptor = app.interface.service_method_map[f"{{{shop_wire.TNS}}}queryVMs"][0]
    ctx.out_object = [[_vm("k1")]]
    fast.serialize(ctx, fast.RESPONSE)
    assert ctx.out_document is None and b"<tns:vm_id>k1</tns:vm_id>" in b"".join(ctx.out_string)


DESCRIPTORS = [(name, descriptor) for name, app in APPS.items()
               for descriptor in {d.name: d for ds in app.interface.service_method_map.values() for d in ds}.values()]


@pytest.mark.parametrize(("app", "descriptor"), DESCRIPTORS, ids=[f"{a}-{d.name}" for a, d in DESCRIPTORS])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_whole_answers_equal_spynes(app: str, descriptor: Any, data: st.DataObject) -> None:
    message = descriptor.out_message
    values = [data.draw(member_value(member, 1)) for member in message._type_info.values()]
    stock, fast = PROTOCOLS[app]
    assert (_answer_bytes(fast, None, app, descriptor, values)
            == _answer_bytes(stock, None, app, descriptor, values))

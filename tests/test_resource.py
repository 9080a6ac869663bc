"""VM resource properties (WSRF style): the document, GetResourceProperty, XPath queries."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from vmshop_common.dagxml import load_schema
from vmshop_common.errors import QueryInvalidError
from vmshop_common.xmlload import parse_xml
from vmshop_service.query import ATTRIBUTE_NAME
from vmshop_service.registry import VMEntry
from vmshop_service.resource import (
    MAX_XPATH_LENGTH,
    PROPERTY_NAMES,
    RESOURCE_XSD,
    ROOT_TAG,
    RP_NS,
    format_time,
    get_resource_property,
    properties_document,
    query_resource_properties,
)

NOW = 1714568400.0  # 2024-05-01T13:00:00Z
XSI_NIL = "{http://www.w3.org/2001/XMLSchema-instance}nil"


def _vm(**fields: object) -> VMEntry:
    base: dict[str, object] = {
        "vm_id": "vm-1", "owner": "alice", "state": "running", "plant": "plant1:9001", "image": "base",
        "memory": 512, "vcpus": 2, "disk": 4096, "arch": "x86_64",
        "address": "10.0.0.5", "created": 1714564800.0, "updated": 1714564800.0, "termination": 1714572000.5,
        "cost": 12.5, "attributes": {"project": "climate", "size": "42"},
    }
    base.update(fields)
    return VMEntry(**base)  # type: ignore[arg-type]


def _valid(root: etree._Element) -> None:
    schema = load_schema(RESOURCE_XSD)
    assert schema.validate(root), schema.error_log


# The document -------------------------------------------------------------------------------------------


def test_document_content_and_validity() -> None:
    root = properties_document(_vm(), NOW)
    _valid(root)
    assert root.tag == ROOT_TAG
    assert [etree.QName(child).localname for child in root] == list(PROPERTY_NAMES[:-1]) + ["Attribute"] * 2

    def text(name: str) -> str | None:
        return root.findtext(f"{{{RP_NS}}}{name}")

    assert text("VMId") == "vm-1" and text("Owner") == "alice" and text("Memory") == "512"
    assert text("CreatedTime") == "2024-05-01T12:00:00.000Z"
    assert text("TerminationTime") == "2024-05-01T14:00:00.500Z"
    assert text("CurrentTime") == "2024-05-01T13:00:00.000Z"
    assert text("Cost") == "12.5"
    attributes = root.findall(f"{{{RP_NS}}}Attribute")
    assert [(a.get("name"), a.text) for a in attributes] == [("project", "climate"), ("size", "42")]


def test_document_with_missing_values_is_valid() -> None:
    entry = VMEntry("vm-2", "bob", "pending", created=0.0)
    root = properties_document(entry, NOW)
    _valid(root)
    for name in ("Plant", "Image", "Memory", "Vcpus", "Disk", "Arch", "Address", "TerminationTime", "Cost"):
        element = root.find(f"{{{RP_NS}}}{name}")
        assert element is not None and element.get(XSI_NIL) == "true" and not element.text
    assert root.findall(f"{{{RP_NS}}}Attribute") == []


def test_document_survives_serialization_and_the_hardened_parser() -> None:
    data = etree.tostring(properties_document(_vm(), NOW))
    _valid(parse_xml(data, what="resource properties", expected_root=ROOT_TAG))


def test_xml_incompatible_characters_are_replaced() -> None:
    root = properties_document(_vm(owner="a\x01b", attributes={"note": "x\x00y"}), NOW)
    _valid(root)
    assert root.findtext(f"{{{RP_NS}}}Owner") == "a\ufffdb"


def test_schema_refuses_a_broken_document() -> None:
    root = properties_document(_vm(), NOW)
    memory = root.find(f"{{{RP_NS}}}Memory")
    assert memory is not None
    memory.text = "lots"
    assert not load_schema(RESOURCE_XSD).validate(root)
    root = properties_document(_vm(), NOW)
    duplicate = etree.SubElement(root, f"{{{RP_NS}}}Attribute", name="project")
    duplicate.text = "again"
    assert not load_schema(RESOURCE_XSD).validate(root)


_TEXT = st.text(st.characters(codec="utf-8"), max_size=10)


@settings(max_examples=60, deadline=None)
@given(
    owner=_TEXT, memory=st.one_of(st.none(), st.integers(0, 2**40)), cost=st.one_of(st.none(), st.floats()),
    termination=st.one_of(st.none(), st.floats(0, 4e9)),
    attributes=st.dictionaries(st.from_regex(ATTRIBUTE_NAME, fullmatch=True), _TEXT),
)
def test_document_is_always_valid(owner: str, memory: int | None, cost: float | None, termination: float | None,
                                  attributes: dict[str, str]) -> None:
    entry = _vm(owner=owner, memory=memory, cost=cost, termination=termination, attributes=attributes)
    _valid(properties_document(entry, NOW))


def test_format_time() -> None:
    assert format_time(0) == "1970-01-01T00:00:00.000Z"
    assert format_time(1714564800.123456) == "2024-05-01T12:00:00.123Z"


# GetResourceProperty ------------------------------------------------------------------------------------


@pytest.mark.parametrize("qname", ["rp:Memory", f"{{{RP_NS}}}Memory", "Memory", " rp:Memory "])
def test_get_resource_property(qname: str) -> None:
    (item,) = get_resource_property(_vm(), qname, NOW)
    element = etree.fromstring(item)
    assert element.tag == f"{{{RP_NS}}}Memory" and element.text == "512"


def test_get_attribute_property_gives_each() -> None:
    items = get_resource_property(_vm(), "rp:Attribute", NOW)
    assert [etree.fromstring(i).get("name") for i in items] == ["project", "size"]
    assert get_resource_property(_vm(attributes={}), "rp:Attribute", NOW) == []


def test_get_nil_and_current_time() -> None:
    (item,) = get_resource_property(_vm(termination=None), "rp:TerminationTime", NOW)
    assert etree.fromstring(item).get(XSI_NIL) == "true"
    (item,) = get_resource_property(_vm(), "rp:CurrentTime", NOW + 1)
    assert etree.fromstring(item).text == "2024-05-01T13:00:01.000Z"


@pytest.mark.parametrize(
    "qname", ["rp:Colour", "{urn:other}Memory", "other:Memory", "", "VMResourceProperties", "rp:"],
)
def test_get_unknown_property(qname: str) -> None:
    with pytest.raises(QueryInvalidError) as info:
        get_resource_property(_vm(), qname, NOW)
    assert info.value.code == "Client.QueryInvalid"


# QueryResourceProperties --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("xpath", "expected"),
    [
        ("/rp:VMResourceProperties/rp:Memory > 100", ["true"]),
        ("/rp:VMResourceProperties/rp:Memory > 1000", ["false"]),
        ("rp:Memory * 2", ["1024"]),
        ("rp:Cost div 2", ["6.25"]),
        ("count(//rp:Attribute)", ["2"]),
        ("string(rp:Owner)", ["alice"]),
        ("//rp:Attribute[@name='project']/text()", ["climate"]),
        ("//rp:Attribute/@name", ["project", "size"]),
        ("//rp:Attribute[@name='size'] + 1", ["43"]),
        ("boolean(rp:TerminationTime/@xsi:nil)", None),  # xsi is not bound: an error, checked below
        ("rp:Colour", []),
        ("1 div 0", ["Infinity"]),
        ("0 div 0", ["NaN"]),
        ("starts-with(rp:Address, '10.')", ["true"]),
        ("concat('re:test(', rp:VMId, ')')", ["re:test(vm-1)"]),  # inside a string literal: just text
    ],
)
def test_xpath_queries(xpath: str, expected: list[str] | None) -> None:
    if expected is None:
        with pytest.raises(QueryInvalidError):
            query_resource_properties(_vm(), xpath, NOW)
        return
    assert query_resource_properties(_vm(), xpath, NOW) == expected


def test_xpath_element_results_are_serialized() -> None:
    (item,) = query_resource_properties(_vm(), "//rp:Attribute[@name='project']", NOW)
    element = etree.fromstring(item)
    assert element.tag == f"{{{RP_NS}}}Attribute" and element.get("name") == "project"
    assert element.text == "climate"
    assert len(query_resource_properties(_vm(), "/rp:VMResourceProperties/*", NOW)) == len(PROPERTY_NAMES) + 1


@pytest.mark.parametrize(
    ("xpath", "message"),
    [
        ("//rp:Memory[", "XPath expression is invalid"),
        ("rp:Memory +", "XPath expression is invalid"),
        ("", "empty"),
        ("   ", "empty"),
        ("$x", "variables"),
        ("//rp:Attribute[@name=$n]", "variables"),
        ("foo()", "unregistered function"),
        ("document('/etc/passwd')", "unregistered function"),
        ("re:test(rp:Owner, 'a')", "extension function 're:test' is not allowed"),
        ("exsl:node-set(1)", "extension function"),
        ("math:max(//rp:Memory)", "extension function"),
        ("bogus:Memory", "undefined namespace prefix"),
        ("x" * (MAX_XPATH_LENGTH + 1), f"the limit is {MAX_XPATH_LENGTH}"),
        ("rp:Memory\x01", "not allowed in XML"),
    ],
)
def test_bad_xpath(xpath: str, message: str) -> None:
    with pytest.raises(QueryInvalidError) as info:
        query_resource_properties(_vm(), xpath, NOW)
    assert message in str(info.value)
    assert info.value.code == "Client.QueryInvalid"


def test_exponential_xpath_is_refused() -> None:
    attributes = {f"a{i}": str(i) for i in range(10)}
    fine = "//node()[//node()[string(.)='zz']]"
    assert query_resource_properties(_vm(attributes=attributes), fine, NOW) == []
    deep = "//node()[//node()[//node()[//node()[//node()[string(.)='zz']]]]]"
    with pytest.raises(QueryInvalidError, match="too expensive"):
        query_resource_properties(_vm(attributes=attributes), deep, NOW)
    # Predicates on the node itself stay cheap, however many attributes there are.
    many = {f"a{i}": str(i) for i in range(2000)}
    assert len(query_resource_properties(_vm(attributes=many), "//rp:Attribute[@name='a7']", NOW)) == 1
    assert query_resource_properties(_vm(attributes=many), "count(rp:Attribute[starts-with(@name,'a1')])",
                                     NOW) == ["1111"]

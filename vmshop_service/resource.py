"""Each VM as a WSRF-style resource: its resource-properties document and queries on it.

The document (namespace :data:`RP_NS`, schema ``xsd/vmresource-1.0.xsd``)::

    <rp:VMResourceProperties xmlns:rp="urn:vmshop:vm-resource:1">
      <rp:VMId>vm-1</rp:VMId> <rp:Owner>alice</rp:Owner> <rp:State>running</rp:State>
      <rp:Plant>plant1:9001</rp:Plant> <rp:Image>base</rp:Image>
      <rp:Memory>512</rp:Memory> <rp:Vcpus>1</rp:Vcpus> <rp:Disk>4096</rp:Disk> <rp:Arch>x86_64</rp:Arch>
      <rp:Address>10.0.0.5</rp:Address>
      <rp:CreatedTime>2024-05-01T12:00:00.000Z</rp:CreatedTime>
      <rp:TerminationTime xsi:nil="true"/>  <rp:CurrentTime>...</rp:CurrentTime>
      <rp:Cost>12.5</rp:Cost>
      <rp:Attribute name="project">climate</rp:Attribute> ...
    </rp:VMResourceProperties>

Every property but ``Attribute`` is always present, in that order; one
without a value is ``xsi:nil="true"``. Times are UTC ``xs:dateTime`` with
millisecond precision. Attributes are sorted by name.

Queries are read-only and evaluated on a document built for the call:
:func:`get_resource_property` by QName, :func:`query_resource_properties` by
an XPath 1.0 expression (core functions only: no extension functions, no
variables, at most :data:`MAX_XPATH_LENGTH` characters). Every client error is
a :class:`~vmshop_common.errors.QueryInvalidError`.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime

from lxml import etree

from vmshop_common.errors import QueryInvalidError

from .registry import VMEntry

RP_NS = "urn:vmshop:vm-resource:1"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
RESOURCE_XSD = "vmresource-1.0.xsd"
ROOT_TAG = f"{{{RP_NS}}}VMResourceProperties"
MAX_XPATH_LENGTH = 1024
#: Bound on an XPath expression's estimated worst-case node visits (see :func:`_check_cost`).
MAX_XPATH_WORK = 10_000_000

#: The properties' local names, in document order.
PROPERTY_NAMES: tuple[str, ...] = (
    "VMId", "Owner", "State", "Plant", "Image", "Memory", "Vcpus", "Disk", "Arch", "Address",
    "CreatedTime", "TerminationTime", "CurrentTime", "Cost", "Attribute",
)

_NSMAP = {"rp": RP_NS}
_XML_INVALID = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# A function call with a prefixed name (an extension function): QName followed by '('.
_PREFIXED_CALL = re.compile(r"[A-Za-z_][\w.\-]*\s*:\s*[A-Za-z_][\w.\-]*\s*\(")
_STRING_LITERAL = re.compile(r"\"[^\"]*\"|'[^']*'")


def _text(value: str) -> str:
    """``value`` with characters XML cannot carry replaced by U+FFFD."""
    return _XML_INVALID.sub("\ufffd", value)


def format_time(epoch: float) -> str:
    """Epoch seconds as an ``xs:dateTime`` in UTC, e.g. ``2024-05-01T12:00:00.000Z``."""
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _format_double(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "INF" if value > 0 else "-INF"
    return repr(float(value))


def properties_document(entry: VMEntry, now: float) -> etree._Element:
    """The resource-properties document of ``entry`` at time ``now`` (epoch seconds).

    The result is valid against ``xsd/vmresource-1.0.xsd`` for any entry whose
    numbers are in range (memory, vcpus, disk non-negative; times representable).
    """
    root = etree.Element(ROOT_TAG, nsmap=_NSMAP)

    def prop(name: str, value: str | None) -> None:
        element = etree.SubElement(root, f"{{{RP_NS}}}{name}")
        if value is None:
            element.set(f"{{{XSI_NS}}}nil", "true")
        else:
            element.text = _text(value)

    def number(value: int | None) -> str | None:
        return None if value is None else str(int(value))

    prop("VMId", entry.vm_id)
    prop("Owner", entry.owner)
    prop("State", entry.state)
    prop("Plant", entry.plant)
    prop("Image", entry.image)
    prop("Memory", number(entry.memory))
    prop("Vcpus", number(entry.vcpus))
    prop("Disk", number(entry.disk))
    prop("Arch", entry.arch)
    prop("Address", entry.address)
    prop("CreatedTime", format_time(entry.created))
    prop("TerminationTime", None if entry.termination is None else format_time(entry.termination))
    prop("CurrentTime", format_time(now))
    prop("Cost", None if entry.cost is None else _format_double(entry.cost))
    for name in sorted(entry.attributes):
        element = etree.SubElement(root, f"{{{RP_NS}}}Attribute", name=_text(name))
        element.text = _text(entry.attributes[name])
    return root


def _serialize(element: etree._Element) -> str:
    return etree.tostring(element, encoding="unicode", with_tail=False)


def _local_name(qname: str) -> str:
    """The property's local name from ``rp:Name``, ``{urn:vmshop:vm-resource:1}Name`` or ``Name``."""
    if not isinstance(qname, str):
        raise QueryInvalidError(f"a property name is text, not {type(qname).__name__}")
    name = qname.strip()
    if name.startswith("{"):
        namespace, _, local = name[1:].partition("}")
        if namespace != RP_NS:
            raise QueryInvalidError(f"unknown resource property {qname!r}: namespace must be '{RP_NS}'")
    elif ":" in name:
        prefix, _, local = name.partition(":")
        if prefix != "rp":
            raise QueryInvalidError(f"unknown resource property {qname!r}: use the prefix 'rp' "
                                    f"or the form '{{{RP_NS}}}Name'")
    else:
        local = name
    if local not in PROPERTY_NAMES:
        shown = qname if len(qname) <= 80 else qname[:77] + "..."
        raise QueryInvalidError(f"unknown resource property {shown!r}; known: {', '.join(PROPERTY_NAMES)}")
    return local


def get_resource_property(entry: VMEntry, qname: str, now: float) -> list[str]:
    """GetResourceProperty: the serialized XML of each ``qname`` element of the VM's document.

    ``qname`` is ``rp:Memory``, ``{urn:vmshop:vm-resource:1}Memory`` or ``Memory``.
    Each item is a standalone element declaring the ``rp`` namespace. ``Attribute``
    gives one item per user attribute (maybe none); every other property exactly one.
    An unknown name raises :class:`QueryInvalidError`.
    """
    local = _local_name(qname)
    root = properties_document(entry, now)
    return [_serialize(element) for element in root.iterchildren(f"{{{RP_NS}}}{local}")]


def _check_xpath(xpath: str) -> None:
    if not isinstance(xpath, str):
        raise QueryInvalidError(f"an XPath expression is text, not {type(xpath).__name__}")
    if not xpath.strip():
        raise QueryInvalidError("the XPath expression is empty")
    if len(xpath) > MAX_XPATH_LENGTH:
        raise QueryInvalidError(f"the XPath expression is {len(xpath)} characters; the limit is {MAX_XPATH_LENGTH}")
    if _XML_INVALID.search(xpath):
        raise QueryInvalidError("the XPath expression contains characters that are not allowed in XML")
    outside_strings = _STRING_LITERAL.sub('""', xpath)
    call = _PREFIXED_CALL.search(outside_strings)
    if call:
        raise QueryInvalidError(
            f"XPath expression is invalid: extension function {call.group().rstrip('( ')!r} is not allowed "
            "(only XPath 1.0 core functions)"
        )
    if "$" in outside_strings:
        raise QueryInvalidError("XPath expression is invalid: variables ('$name') are not allowed")


def _predicate_shape(xpath: str) -> tuple[int, int]:
    """(the deepest nesting of "wide" predicates, the number of steps and predicates), outside string literals.

    A predicate is wide when it holds a path (``/``), an explicit axis
    (``::``) or a parent step (``..``), which may visit the whole document per context node; one that
    only looks at the node itself, its attributes or its children
    (``[@name='x']``, ``[rp:Memory > 1]``) visits O(nodes) in total and adds no depth.
    """
    text = _STRING_LITERAL.sub('""', xpath)
    opened: list[int] = []
    deepest = 0
    for index, c in enumerate(text):
        if c == "[":
            opened.append(index)
        elif c == "]" and opened:
            start = opened.pop()
            content = text[start + 1:index]
            if "/" in content or "::" in content or ".." in content:
                deepest = max(deepest, len(opened) + 1)
    return deepest, 1 + text.count("/") + text.count("[")


def _check_cost(xpath: str, root: etree._Element) -> None:
    """Refuse expressions whose worst-case work on this document is over :data:`MAX_XPATH_WORK`.

    Each predicate may re-run a whole-document path per context node, so the
    work grows as nodes ** (nesting + 1) times the steps; a bound on it keeps
    a 1 KiB expression from occupying the server for hours.
    """
    nodes = sum(1 + len(element.attrib) + (1 if element.text else 0) for element in root.iter())
    deepest, steps = _predicate_shape(xpath)
    work = steps * nodes ** (deepest + 1)
    if work > MAX_XPATH_WORK:
        raise QueryInvalidError(
            f"XPath expression is too expensive: document-wide predicates nested {deepest} deep over {nodes} nodes; "
            "nest fewer predicates"
        )


def _xpath_number(value: float) -> str:
    """A number as XPath 1.0's string() writes it."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if value == int(value):
        return str(int(value))
    return repr(value)


def _result_text(item: object) -> str:
    if isinstance(item, etree._Element):  # elements, comments, processing instructions
        return _serialize(item)
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, float):
        return _xpath_number(item)
    if isinstance(item, tuple):  # a namespace node: (prefix, uri)
        return str(item[1])
    return str(item)


def query_resource_properties(entry: VMEntry, xpath: str, now: float) -> list[str]:
    """QueryResourceProperties: evaluate an XPath 1.0 expression on the VM's document.

    The prefix ``rp`` is bound to :data:`RP_NS`; the context node is the
    document element, as in WS-ResourceProperties (so ``rp:Memory``,
    ``/rp:VMResourceProperties/rp:Memory`` and ``//rp:Attribute`` all work).
    Results: a node-set gives one item per node (elements serialized as
    XML, attribute and text nodes as their text); a string, number or
    boolean gives one item, its XPath string value (``true``/``false``, ``512``).

    Only core functions: prefixed (extension) function calls and variables
    are refused, and so are expressions whose document-wide predicates nest
    deep enough that the worst case exceeds :data:`MAX_XPATH_WORK` node
    visits (two levels are fine on a typical document). An over-long,
    malformed or failing expression raises
    :class:`QueryInvalidError` naming the problem.
    """
    _check_xpath(xpath)
    try:
        compiled = etree.XPath(xpath, namespaces=_NSMAP, regexp=False, smart_strings=False)
    except etree.XPathError as exc:
        raise QueryInvalidError(f"XPath expression is invalid: {_describe(exc)}") from None
    root = properties_document(entry, now)
    _check_cost(xpath, root)
    try:
        result = compiled(root)
    except etree.XPathError as exc:
        raise QueryInvalidError(f"XPath expression could not be evaluated: {_describe(exc)}") from None
    if isinstance(result, list):
        return [_result_text(item) for item in result]
    return [_result_text(result)]


def _describe(exc: etree.XPathError) -> str:
    message = str(exc) or type(exc).__name__
    return message[0].lower() + message[1:]

"""The DAG's XML form: load (hardened, XSD-validated, rule-checked) and write.

:func:`load_dag` is the single way a DAG document becomes a :class:`Dag`;
the shop, the plant and the CLI all use it, so a DAG that one of them
accepts the others accept too. Errors name the line and the node.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

from lxml import etree

from .contracts import contract_dir
from .dag import (
    DEFAULT_TIMEOUT,
    Action,
    BlankStart,
    Dag,
    Edge,
    FileAction,
    Hardware,
    ImageStart,
    MountAction,
    NetworkAction,
    Node,
    ScriptAction,
)
from .errors import DagInvalidError, Problem, SchemaInvalidError
from .rules import check_dag
from .steps import normalise_text
from .xmlload import parse_xml

DAG_NS = "urn:vmshop:dag:1"
VM_ROOT = f"{{{DAG_NS}}}vm"
DAG_ROOT = f"{{{DAG_NS}}}dag"
DAG_XSD = "vmdag-1.1.xsd"


def xsd_dir() -> Path:
    """Where the published schemas live (``VMSHOP_XSD_DIR`` overrides; see :mod:`vmshop_common.contracts`)."""
    return contract_dir("xsd")


_per_thread = threading.local()


def load_schema(name: str) -> etree.XMLSchema:
    """The compiled XSD ``name`` from :func:`xsd_dir`, compiled once per THREAD.

    An lxml ``XMLSchema`` keeps the errors of its last ``validate()`` in its
    own ``error_log``: a schema object shared by threads mixes up their
    errors (a DAG got another request's fault, or an IndexError). So every
    thread validates with a schema of its own.
    """
    cache: dict[str, etree.XMLSchema] | None = getattr(_per_thread, "schemas", None)
    if cache is None:
        cache = _per_thread.schemas = {}
    schema = cache.get(name)
    if schema is None:
        document = parse_xml(_schema_bytes(name), what=f"schema {name}", max_depth=64)
        schema = cache[name] = etree.XMLSchema(document)
    return schema


@functools.cache
def _schema_bytes(name: str) -> bytes:
    """The XSD file (read once per process; parsed and compiled per thread)."""
    return (xsd_dir() / name).read_bytes()


def validate_against(schema_name: str, root: etree._Element, what: str) -> None:
    """Raise :class:`SchemaInvalidError` with every XSD error (line and node) of ``root``."""
    schema = load_schema(schema_name)
    if schema.validate(root):
        return
    at_line = _elements_by_line(root)
    problems = []
    for entry in schema.error_log:
        message = _clean(entry.message)
        problems.append(Problem(message, entry.line or None, _node_at(at_line, entry.line, message)))
    raise SchemaInvalidError(f"{what} does not match the schema {schema_name}: {problems[0].message}", problems)


def load_dag(data: bytes | str, what: str = "DAG") -> Dag:
    """Parse, validate and rule-check a ``<vm>`` request document."""
    root = parse_xml(data, what=what, expected_root=VM_ROOT)
    validate_against(DAG_XSD, root, what)
    dag = dag_from_element(root)
    check_dag(dag, what)
    return dag


def load_embedded_dag(root: etree._Element, what: str) -> Dag:
    """Validate and rule-check an embedded ``<dag>`` element (an image's lineage).

    The element is validated as a document of its own, so it must be a
    ``<dag>`` in the DAG namespace; lines stay those of the enclosing file.
    """
    validate_against(DAG_XSD, root, what)
    dag = dag_from_element(root)
    check_dag(dag, what)
    return dag


def dag_from_element(root: etree._Element) -> Dag:
    """Build the model from a schema-valid ``<vm>`` or ``<dag>`` element."""
    nodes: dict[str, Node] = {}
    edges: list[Edge] = []
    attributes: dict[str, str] = {}
    description = None
    for child in root:
        if not isinstance(child.tag, str):
            continue  # comments and processing instructions
        local = etree.QName(child).localname
        if local == "description":
            description = (child.text or "").strip()
        elif local == "attributes":
            for attribute in child.iterchildren(f"{{{DAG_NS}}}attribute"):
                attributes[attribute.get("name")] = attribute.get("value")
        elif local == "nodes":
            for element in child:
                if isinstance(element.tag, str):
                    node = _node(element)
                    nodes.setdefault(node.id, node)
        elif local == "edges":
            for element in child.iterchildren(f"{{{DAG_NS}}}edge"):
                edges.append(Edge(element.get("from"), element.get("to"), element.sourceline))
    return Dag(nodes=nodes, edges=edges, attributes=attributes, name=root.get("name"), description=description)


def _node(element: etree._Element) -> Node:
    kind = etree.QName(element).localname
    get = element.get
    node_id = get("id")
    line = element.sourceline
    if kind == "blank":
        hardware = Hardware(memory=_integer(get("memory")), vcpus=_integer(get("vcpus", "1")),
                            disk=_integer(get("disk")), arch=get("arch", "x86_64"))
        return BlankStart(node_id, line, hardware=hardware, cloud_config=_cloud_config(element))
    if kind == "image":
        return ImageStart(node_id, line, name=get("name"), memory=_int(get("memory")), vcpus=_int(get("vcpus")),
                          cloud_config=_cloud_config(element))
    cost = float(Decimal(get("cost"))) if get("cost") is not None else None
    if kind == "script":
        return ScriptAction(node_id, line, cost=cost, interpreter=get("interpreter", "/bin/sh"),
                            body=_text(element), script_timeout=_integer(get("timeout", str(DEFAULT_TIMEOUT))))
    if kind == "file":
        return FileAction(node_id, line, cost=cost, path=get("path"), mode=int(get("mode", "0644"), 8),
                          content=_text(element))
    if kind == "network":
        return NetworkAction(node_id, line, cost=cost, mode=get("mode", "pool"), address=get("address"),
                             prefix=_integer(get("prefix", "24")), gateway=get("gateway"), hostname=get("hostname"))
    if kind == "mount":
        return MountAction(node_id, line, cost=cost, source=get("source"), target=get("target"),
                           readonly=get("readonly", "true").strip() in ("true", "1"))
    raise ValueError(f"unknown node kind {kind!r}")  # the schema makes this unreachable


def _cloud_config(start: etree._Element) -> str | None:
    """A start node's <cloud-config> text, normalised as a body is (YAML survives the indentation XML adds)."""
    element = start.find(f"{{{DAG_NS}}}cloud-config")
    if element is None:
        return None
    return normalise_text(_text(element)) + "\n"


def _integer(value: str) -> int:
    """An xs:integer the schema accepted: it may have whitespace, a sign and any number of leading zeros
    (more than Python's 4300-digit limit for ``int()``), and it is never negative here."""
    return int(value.strip().lstrip("+-").lstrip("0") or "0")


def _int(value: str | None) -> int | None:
    return _integer(value) if value is not None else None


def _text(element: etree._Element) -> str:
    """All the text of a body, also the parts after a comment or processing instruction inside it."""
    return "".join(element.xpath("text()"))


def _clean(message: str) -> str:
    return message.replace(f"{{{DAG_NS}}}", "")


_KEY_SEQUENCE = re.compile(r"key-sequence \['([^']*)'\]")
_ELEMENT_NAMED = re.compile(r"^Element '([^']+)'(?:, attribute '([^']+)')?")


def _elements_by_line(root: etree._Element) -> dict[int, list[etree._Element]]:
    """The elements written at each line (built once: a document may have thousands of errors)."""
    index: dict[int, list[etree._Element]] = {}
    for element in root.iter():
        if isinstance(element.tag, str) and element.sourceline:
            index.setdefault(element.sourceline, []).append(element)
    return index


def _node_at(at_line: dict[int, list[etree._Element]], line: int | None, message: str) -> str | None:
    """The id of the node (or the endpoint of the edge) that the error at ``line`` is about."""
    key = _KEY_SEQUENCE.search(message)
    if key:  # a duplicate id, or an edge naming a node that does not exist: that id
        return key.group(1)
    named = _ELEMENT_NAMED.match(message)
    elements = at_line.get(line or 0, [])
    if named:  # prefer the element the message names (several may share a line), with the value it quotes
        elements = [e for e in elements if etree.QName(e).localname == named.group(1)] or elements
        if named.group(2):
            elements = [e for e in elements if f"'{e.get(named.group(2))}'" in message] or elements
    for element in elements:
        if named and named.group(2) in ("from", "to") and element.get(named.group(2)):
            return element.get(named.group(2))
        for attribute in ("id", "to", "name"):
            if element.get(attribute):
                return element.get(attribute)
    return None


# Writing ------------------------------------------------------------------

def dag_to_element(dag: Dag, root_tag: str = VM_ROOT) -> etree._Element:
    """The XML element for ``dag`` (``<vm>`` by default, or ``<dag>``)."""
    E = lambda local, **attrs: etree.Element(f"{{{DAG_NS}}}{local}",  # noqa: E731
                                            {k: str(v) for k, v in attrs.items() if v is not None},
                                            nsmap={None: DAG_NS} if local in ("vm", "dag") else None)
    root = E(etree.QName(root_tag).localname, name=dag.name)
    if dag.description:
        etree.SubElement(root, f"{{{DAG_NS}}}description").text = dag.description
    if dag.attributes:
        attributes = etree.SubElement(root, f"{{{DAG_NS}}}attributes")
        for name, value in dag.attributes.items():
            attributes.append(E("attribute", name=name, value=value))
    nodes = etree.SubElement(root, f"{{{DAG_NS}}}nodes")
    for node in dag:
        nodes.append(_node_element(node, E))
    if dag.edges:
        edges = etree.SubElement(root, f"{{{DAG_NS}}}edges")
        for edge in dag.edges:
            edges.append(E("edge", **{"from": edge.source, "to": edge.target}))
    return root


def dag_to_xml(dag: Dag, root_tag: str = VM_ROOT) -> str:
    """``dag`` as an indented XML document (round-trips through :func:`load_dag`)."""
    root = dag_to_element(dag, root_tag)
    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode") + "\n"


def _node_element(node: Node, E: object) -> etree._Element:
    make = E  # type: ignore[assignment]
    cost = _decimal(node.cost) if isinstance(node, Action) else None
    if isinstance(node, BlankStart):
        hw = node.hardware
        element = make("blank", id=node.id, memory=hw.memory, vcpus=hw.vcpus, disk=hw.disk, arch=hw.arch)  # type: ignore[operator]
        return _with_cloud_config(element, node.cloud_config)
    if isinstance(node, ImageStart):
        element = make("image", id=node.id, name=node.name, memory=node.memory, vcpus=node.vcpus)  # type: ignore[operator]
        return _with_cloud_config(element, node.cloud_config)
    if isinstance(node, ScriptAction):
        element = make("script", id=node.id, interpreter=node.interpreter, timeout=node.script_timeout, cost=cost)  # type: ignore[operator]
        element.text = node.body
        return element
    if isinstance(node, FileAction):
        element = make("file", id=node.id, path=node.path, mode=f"{node.mode:04o}", cost=cost)  # type: ignore[operator]
        element.text = node.content
        return element
    if isinstance(node, NetworkAction):
        return make("network", id=node.id, mode=node.mode, address=node.address, prefix=node.prefix,  # type: ignore[operator]
                    gateway=node.gateway, hostname=node.hostname, cost=cost)
    if isinstance(node, MountAction):
        return make("mount", id=node.id, source=node.source, target=node.target,  # type: ignore[operator]
                    readonly="true" if node.readonly else "false", cost=cost)
    raise TypeError(f"cannot write node {node!r}")


def _with_cloud_config(start: etree._Element, cloud_config: str | None) -> etree._Element:
    if cloud_config is not None:
        etree.SubElement(start, f"{{{DAG_NS}}}cloud-config").text = cloud_config
    return start


def _decimal(value: float | None) -> str | None:
    if value is None:
        return None
    return format(Decimal(repr(value)).normalize(), "f")


#: The node id a step gets in :func:`step_to_xml`'s document (a step's identity never includes its id).
STEP_ID = "step"


def step_to_xml(action: Action) -> str:
    """One action as a small ``<vm>`` document of its own (a blank start and the action, as ``step``).

    What a plant records of each action it ran, so that it can later write
    the steps a VM ran into an image's DAG (:func:`step_from_xml` reads it
    back). The step's digest (:func:`~vmshop_common.steps.step_digest`) is
    unchanged by the round trip.
    """
    dag = Dag(nodes={"start": BlankStart("start"), STEP_ID: replace(action, id=STEP_ID)},
              edges=[Edge("start", STEP_ID)])
    return dag_to_xml(dag)


def step_from_xml(text: str) -> Action:
    """The action a :func:`step_to_xml` document holds (validated as any DAG is); DagInvalidError if it holds
    none."""
    dag = load_dag(text, what="a recorded step")
    node = dag.nodes.get(STEP_ID)
    if not isinstance(node, Action):
        raise DagInvalidError("a recorded step holds no action")
    return node

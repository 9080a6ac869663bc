"""The DAG's XML form (vmshop_common.dagxml) and every XSD constraint (xsd/vmdag-1.1.xsd).

``tests/dags/`` holds example documents: ``good_*.xml`` are valid, every
other file is broken in exactly one way, described in its first comment;
the line with the problem is marked ``<!-- here -->``. The table below
says which error each one gives and which node it names.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmshop_common import dagxml
from vmshop_common.dag import (
    BlankStart,
    Dag,
    Edge,
    FileAction,
    Hardware,
    ImageStart,
    MountAction,
    NetworkAction,
    ScriptAction,
)
from vmshop_common.dagxml import (
    DAG_NS,
    DAG_ROOT,
    VM_ROOT,
    dag_from_element,
    dag_to_element,
    dag_to_xml,
    load_dag,
    load_embedded_dag,
    load_schema,
    xsd_dir,
)
from vmshop_common.errors import DagInvalidError, SchemaInvalidError, VMShopError
from vmshop_common.steps import step_digest
from vmshop_common.xmlload import parse_xml

DAGS = Path(__file__).parent / "dags"
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
MARK = "<!-- here -->"

S = "Client.SchemaInvalid"
R = "Client.DagInvalid"

# file -> (code, node named by the first problem, a piece of the first problem's message)
BROKEN: dict[str, tuple[str, str | None, str]] = {
    # ids and edges (xs:key, xs:keyref, xs:unique)
    "duplicate_id.xml": (S, "a", "Duplicate key-sequence ['a'] in key identity-constraint 'vmNodeId'"),
    "dangling_edge_from.xml": (S, "ghost", "No match found for key-sequence ['ghost'] of keyref 'vmEdgeFrom'"),
    "dangling_edge_to.xml": (S, "ghost", "No match found for key-sequence ['ghost'] of keyref 'vmEdgeTo'"),
    "bad_node_id.xml": (S, "a:b", "attribute 'id'"),
    "duplicate_attribute.xml": (S, "owner", "Duplicate key-sequence ['owner'] in unique identity-constraint"),
    # hardware
    "memory_negative.xml": (S, "hw", "'-256' is not a valid value of the atomic type 'Memory'"),
    "memory_zero.xml": (S, "hw", "'0' is not a valid value of the atomic type 'Memory'"),
    "memory_too_small.xml": (S, "hw", "less than the minimum value allowed ('64')"),
    "memory_absurd.xml": (S, "hw", "greater than the maximum value allowed ('1048576')"),
    "memory_not_a_number.xml": (S, "hw", "'lots' is not a valid value"),
    "memory_fraction.xml": (S, "hw", "'256.5' is not a valid value"),
    "memory_missing.xml": (S, "hw", "The attribute 'memory' is required but missing"),
    "vcpus_zero.xml": (S, "hw", "'0' is not a valid value of the atomic type 'Vcpus'"),
    "vcpus_absurd.xml": (S, "hw", "greater than the maximum value allowed ('256')"),
    "disk_zero.xml": (S, "hw", "'0' is not a valid value of the atomic type 'Disk'"),
    "disk_absurd.xml": (S, "hw", "greater than the maximum value allowed ('65536')"),
    "disk_missing.xml": (S, "hw", "The attribute 'disk' is required but missing"),
    "arch_unknown.xml": (S, "hw", "'sparc' is not an element of the set"),
    "image_memory_absurd.xml": (S, "base", "greater than the maximum value allowed ('1048576')"),
    # names: path traversal, shell metacharacters
    "image_name_traversal.xml": (S, "base", "The value '../../etc/passwd' is not accepted by the pattern"),
    "image_name_shell.xml": (S, "base", "The value 'tiny;rm -rf /' is not accepted by the pattern"),
    "image_name_empty.xml": (S, "base", "The value '' is not accepted by the pattern"),
    "mount_source_traversal.xml": (S, "x", "The value '../secrets' is not accepted"),
    "mount_source_shell.xml": (S, "x", "The value '$(reboot)' is not accepted"),
    "hostname_shell.xml": (S, "x", "The value 'web`id`' is not accepted"),
    "attribute_name_bad.xml": (S, "a b/c", "The value 'a b/c' is not accepted"),
    "vm_name_bad.xml": (S, "my vm;ls", "Element 'vm', attribute 'name'"),
    "file_path_relative.xml": (S, "x", "The value 'etc/passwd' is not accepted"),
    "file_path_shell.xml": (S, "x", "The value '/tmp/$(id)' is not accepted"),
    "file_path_space.xml": (S, "x", "The value '/tmp/a b' is not accepted"),
    "interpreter_relative.xml": (S, "x", "The value 'sh' is not accepted"),
    "interpreter_shell.xml": (S, "x", "The value '/bin/sh -c id|sh' is not accepted"),
    # modes and other values
    "file_mode_bad_digit.xml": (S, "x", "The value '0999' is not accepted by the pattern '0?[0-7]{3}'"),
    "file_mode_symbolic.xml": (S, "x", "The value 'rwxr-xr-x' is not accepted"),
    "file_mode_setuid.xml": (S, "x", "The value '04755' is not accepted"),
    "network_mode_bad.xml": (S, "x", "'dhcp' is not an element of the set {'pool', 'static'}"),
    "network_address_bad.xml": (S, "x", "The value '10.0.0.256' is not accepted"),
    "network_prefix_bad.xml": (S, "x", "greater than the maximum value allowed ('32')"),
    "mount_readonly_bad.xml": (S, "x", "'yes' is not a valid value of the atomic type 'xs:boolean'"),
    "script_timeout_zero.xml": (S, "x", "'0' is not a valid value of the atomic type 'Seconds'"),
    "script_timeout_absurd.xml": (S, "x", "greater than the maximum value allowed ('86400')"),
    "cost_negative.xml": (S, "x", "less than the minimum value allowed ('0')"),
    # structure
    "unknown_element.xml": (S, "x", "Element 'reboot': This element is not expected"),
    "unknown_attribute.xml": (S, "x", "The attribute 'user' is not allowed"),
    "element_in_script.xml": (S, "x", "Element content is not allowed"),
    "no_nodes.xml": (S, None, "Element 'nodes': Missing child element(s)"),
    "edges_before_nodes.xml": (S, None, "Element 'edges': This element is not expected"),
    # rules checked in code
    "cycle.xml": (R, "a", "cycle: a -> b -> a"),
    "cycle_three.xml": (R, "p", "cycle: p -> q -> r -> p"),
    "no_start.xml": (R, None, "the DAG has no start node"),
    "two_starts.xml": (R, "base", "a second start node; the first is 'hw'"),
    "unreachable.xml": (R, "island", "node is not reachable from start node 'hw'"),
    "edge_into_start.xml": (R, "hw", "edge from 'a' into start node 'hw'"),
    "self_edge.xml": (R, "a", "edge from 'a' to itself"),
    "repeated_edge.xml": (R, "a", "edge from 'hw' to 'a' is repeated"),
    "static_without_address.xml": (R, "x", "a static network action needs an address"),
    "pool_with_address.xml": (R, "x", "a pool network action takes its address from the plant"),
    "file_path_dotdot.xml": (R, "x", "has a '..' segment"),
    "mount_target_dotdot.xml": (R, "x", "target '/mnt/..' has a '..' segment"),
    "file_path_root.xml": (R, "x", "path '/' is the root directory"),
    # documents
    "wrong_root.xml": ("Client.WrongRoot", None, "wrong root element"),
    "wrong_namespace.xml": ("Client.WrongRoot", None, "wrong root element"),
    "root_is_dag.xml": ("Client.WrongRoot", None, "wrong root element"),
    "not_well_formed.xml": ("Client.XMLSyntax", None, "Opening and ending tag mismatch"),
    "truncated.xml": ("Client.XMLSyntax", None, "Premature end of data"),
    "empty.xml": ("Client.XMLSyntax", None, "no XML content"),
    "too_deep.xml": ("Client.DocumentTooLarge", None, "too deep"),
    "xxe.xml": ("Client.DoctypeRefused", None, "a DOCTYPE is not allowed"),
    "billion_laughs.xml": ("Client.DoctypeRefused", None, "a DOCTYPE is not allowed"),
    "external_dtd.xml": ("Client.DoctypeRefused", None, "a DOCTYPE is not allowed"),
    "entity_declaration.xml": ("Client.DoctypeRefused", None, "an ENTITY declaration is not allowed"),
}
# Files whose problem line can't carry a marker.
LINE_WITHOUT_MARK = {"empty.xml": 1, "truncated.xml": 6}

GOOD = sorted(p.name for p in DAGS.glob("good_*.xml"))
SAMPLES = sorted(p.name for p in SCRIPTS.glob("sample_*.xml"))


def marked_line(name: str) -> int | None:
    if name in LINE_WITHOUT_MARK:
        return LINE_WITHOUT_MARK[name]
    for number, line in enumerate((DAGS / name).read_text(encoding="utf-8").splitlines(), 1):
        if MARK in line:
            return number
    return None


def test_every_example_file_is_in_the_table() -> None:
    names = {p.name for p in DAGS.iterdir()}
    assert names == set(BROKEN) | set(GOOD)
    assert len(GOOD) >= 3
    for name in BROKEN:
        text = (DAGS / name).read_text(encoding="utf-8")
        assert name == "empty.xml" or "<!-- Broken" in text or "<!-- Hostile" in text, name
        assert (DAGS / name).read_text(encoding="utf-8").count(MARK) <= 1


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_example_is_refused_with_its_code_line_and_node(name: str) -> None:
    code, node, message = BROKEN[name]
    with pytest.raises(VMShopError) as info:
        load_dag((DAGS / name).read_bytes(), what=name)
    exc = info.value
    assert exc.code == code, str(exc)
    assert exc.problems, "every refusal says what is wrong"
    first = exc.problems[0]
    assert message in first.message, str(exc)
    assert first.line == marked_line(name), str(exc)
    assert first.node == node, str(exc)
    assert str(exc).startswith(name)  # names the document
    if first.line is not None:
        assert f"line {first.line}" in str(exc)
    if node is not None:
        assert f"node '{node}'" in str(exc)


@pytest.mark.parametrize("name", GOOD)
def test_good_example_loads(name: str) -> None:
    dag = load_dag((DAGS / name).read_bytes())
    assert dag.start in dag.start_nodes
    assert dag_roundtrip(dag) == model(dag)


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_dags_in_scripts_are_valid(name: str) -> None:
    dag = load_dag((SCRIPTS / name).read_bytes(), what=name)
    assert dag.actions
    assert dag_roundtrip(dag) == model(dag)


def test_the_samples_exist() -> None:
    assert SAMPLES == ["sample_blank.xml", "sample_debian.xml", "sample_image.xml", "sample_workflow.xml"]


def test_sample_debian_in_detail() -> None:
    dag = load_dag((SCRIPTS / "sample_debian.xml").read_bytes())
    assert isinstance(dag.start, ImageStart) and dag.start.name == "debian12"
    assert dag.start.cloud_config is not None and dag.start.cloud_config.startswith("#cloud-config\n")
    assert [dag.nodes[n].kind for n in dag.topological_order()][1:] == [
        "network", "mount", "mount", "script", "file", "script"]


def test_sample_blank_in_detail() -> None:
    dag = load_dag((SCRIPTS / "sample_blank.xml").read_bytes())
    assert dag.name == "blank-sample"
    assert dag.attributes == {"project": "samples"}
    assert dag.start == BlankStart("hw", hardware=Hardware(memory=192, vcpus=1, disk=1, arch="x86_64"))
    report = dag.nodes["report"]
    assert isinstance(report, ScriptAction)
    assert (report.script_timeout, report.cost, report.line) == (30, 0.5, 13)
    assert dag.topological_order() == ["hw", "os", "report"]


def test_sample_workflow_branches() -> None:
    dag = load_dag((SCRIPTS / "sample_workflow.xml").read_bytes())
    assert isinstance(dag.start, ImageStart) and dag.start.name == "tiny"
    assert dag.topological_order() == ["base", "prepare", "left", "right", "join"]


# The remaining XSD facets, on inline documents ------------------------------------------------------------

def _with(node: str, head: str = "", edges: str = "") -> str:
    node_id = node.split('id="')[1].split('"')[0] if 'id="' in node else None
    edge = f'<edge from="hw" to="{node_id}"/>' if node_id else ""
    return (f'<vm xmlns="{DAG_NS}">{head}<nodes><blank id="hw" memory="128" disk="1"/>{node}</nodes>'
            f"<edges>{edge}{edges}</edges></vm>")


def _image(attributes: str) -> str:
    return _with("").replace('<blank id="hw" memory="128" disk="1"/>', f'<image id="hw" {attributes}/>')


@pytest.mark.parametrize("text, node, fragment", [
    pytest.param(_with('<script id="s" cost="86400.001">x</script>'), "s", "maximum value allowed ('86400')",
                 id="cost-absurd"),
    pytest.param(_with('<script id="s" cost="lots">x</script>'), "s", "'lots' is not a valid value", id="cost-nan"),
    pytest.param(_with('<script id="s">' + "x" * 262_145 + "</script>"), "s", "maxLength", id="script-too-long"),
    pytest.param(_with('<file id="f" path="/x">' + "x" * 262_145 + "</file>"), "f", "maxLength", id="file-too-long"),
    pytest.param(_with('<script id="s" interpreter="/' + "b" * 128 + '">x</script>'),
                 "s", "not accepted by the pattern", id="interpreter-too-long"),
    pytest.param(_with('<file id="f" path="/' + "p" * 255 + '">x</file>'), "f", "not accepted by the pattern",
                 id="path-too-long"),
    pytest.param(_with('<network id="n" mode="static" address="10.0.0.5" gateway="10.0.0"/>'),
                 "n", "'10.0.0' is not accepted", id="gateway-bad"),
    pytest.param(_with('<network id="n" mode="static" address="010.0.0.5"/>'), "n", "'010.0.0.5' is not accepted",
                 id="address-leading-zero"),
    pytest.param(_with('<network id="n" prefix="-1"/>'), "n", "'-1' is not a valid value", id="prefix-negative"),
    pytest.param(_with('<network id="n" hostname=""/>'), "n", "The value '' is not accepted", id="hostname-empty"),
    pytest.param(_with('<network id="n" hostname="-rf"/>'), "n", "The value '-rf' is not accepted",
                 id="hostname-option"),
    pytest.param(_with('<mount id="m" source="d" target="mnt"/>'), "m", "The value 'mnt' is not accepted",
                 id="target-relative"),
    pytest.param(_with('<mount id="m" target="/mnt"/>'), "m", "The attribute 'source' is required but missing",
                 id="source-missing"),
    pytest.param(_with('<file id="f">x</file>'), "f", "The attribute 'path' is required but missing",
                 id="path-missing"),
    pytest.param(_with('<script>x</script>'), None, "The attribute 'id' is required but missing", id="id-missing"),
    pytest.param(_with('<script id="s" timeout="1.5">x</script>'), "s", "'1.5' is not a valid value",
                 id="timeout-fraction"),
    pytest.param(_with('<script id="s" timeout="-5">x</script>'), "s", "'-5' is not a valid value",
                 id="timeout-negative"),
    pytest.param(_image('name="tiny" vcpus="0"'), "hw", "'0' is not a valid value of the atomic type 'Vcpus'",
                 id="image-vcpus-zero"),
    pytest.param(_image('name="tiny" vcpus="257"'), "hw", "maximum value allowed ('256')", id="image-vcpus-absurd"),
    pytest.param(_image('name="tiny" memory="-1"'), "hw", "'-1' is not a valid value", id="image-memory-negative"),
    pytest.param(_image(""), "hw", "The attribute 'name' is required but missing", id="image-name-missing"),
    pytest.param(_with("", head='<attributes><attribute name="a" value="' + "v" * 1025 + '"/></attributes>'),
                 "a", "maxLength", id="attribute-value-too-long"),
    pytest.param(_with("", head='<attributes><attribute name="a"/></attributes>'), "a", "'value' is required",
                 id="attribute-value-missing"),
    pytest.param(_with("", head='<attributes>' + "".join(f'\n<attribute name="a{i}" value="v"/>' for i in range(101))
           + "</attributes>"), "a100", "This element is not expected", id="too-many-attributes"),
    pytest.param(_with("", head="<description><b>bold</b></description>"), None, "Element content is not allowed",
                 id="markup-in-description"),
    pytest.param(_with("", head="<description>a</description><description>b</description>"), None, "not expected",
                 id="two-descriptions"),
    pytest.param(_with("", edges='<edge from="hw"/>'), None, "The attribute 'to' is required but missing",
                 id="edge-to-missing"),
    pytest.param(_with("", edges='<edge from="hw" to="hw" weight="2"/>'), "hw", "The attribute 'weight' is not allowed",
                 id="edge-unknown-attribute"),
    pytest.param(_with('<script id="s" interpreter="/bin/sh" interpreter2="x">x</script>'), "s", "not allowed",
                 id="script-unknown-attribute"),
])
def test_more_schema_constraints(text: str, node: str | None, fragment: str) -> None:
    with pytest.raises(SchemaInvalidError) as info:
        load_dag(text)
    assert fragment in info.value.problems[0].message, str(info.value)[:500]
    assert info.value.problems[0].node == node
    assert info.value.problems[0].line is not None


def test_at_most_1000_nodes() -> None:
    def doc(n: int) -> str:
        nodes = "".join(f'<script id="s{i}">x</script>\n' for i in range(n - 1))
        edges = "".join(f'<edge from="hw" to="s{i}"/>\n' for i in range(n - 1))
        return (f'<vm xmlns="{DAG_NS}"><nodes><blank id="hw" memory="128" disk="1"/>{nodes}</nodes>'
                f"<edges>{edges}</edges></vm>")

    assert len(load_dag(doc(1000)).nodes) == 1000
    with pytest.raises(SchemaInvalidError, match="not expected"):
        load_dag(doc(1001))


def test_at_most_10000_edges() -> None:
    def doc(n: int) -> str:
        nodes = "".join(f'<script id="s{i}">x</script>' for i in range(100))
        edges = "".join(f'<edge from="s{i // 100}" to="s{i % 100}"/>' for i in range(n))
        return (f'<vm xmlns="{DAG_NS}"><nodes><blank id="hw" memory="128" disk="1"/>{nodes}</nodes>'
                f"<edges>{edges}</edges></vm>")

    with pytest.raises(DagInvalidError):  # 10 000 edges pass the schema (and break rules)
        load_dag(doc(10_000))
    with pytest.raises(SchemaInvalidError, match="not expected"):
        load_dag(doc(10_001))


def test_largest_bodies_and_names_allowed() -> None:
    dag = load_dag(_with('<script id="s" interpreter="/' + "b" * 127 + '">' + "x" * 262_144 + "</script>",
                         head=f'<attributes><attribute name="{"a" * 64}" value="{"v" * 1024}"/></attributes>'))
    assert len(dag.nodes["s"].body) == 262_144  # type: ignore[attr-defined]
    load_dag(_with('<file id="' + "f" * 64 + '" path="/' + "p" * 254 + '">x</file>'))
    with pytest.raises(SchemaInvalidError):
        load_dag(_with('<file id="' + "f" * 65 + '" path="/x">x</file>'))


# Reading values ---------------------------------------------------------------------------------------------

def vm(nodes: str, edges: str = "", head: str = "") -> str:
    return (f'<vm xmlns="{DAG_NS}">{head}<nodes><blank id="hw" memory="128" disk="1"/>{nodes}</nodes>'
            f"<edges>{edges}</edges></vm>")


def one(node: str) -> object:
    node_id = node.split('id="')[1].split('"')[0]
    return load_dag(vm(node, f'<edge from="hw" to="{node_id}"/>')).nodes[node_id]


def test_defaults_are_applied() -> None:
    dag = load_dag(f'<vm xmlns="{DAG_NS}"><nodes><blank id="hw" memory="64" disk="1"/></nodes></vm>')
    assert dag.start == BlankStart("hw", hardware=Hardware(memory=64, vcpus=1, disk=1, arch="x86_64"))
    assert dag.edges == [] and dag.attributes == {} and dag.name is None and dag.description is None
    assert one('<script id="s"/>') == ScriptAction("s", interpreter="/bin/sh", body="", script_timeout=300)
    assert one('<file id="f" path="/x"/>') == FileAction("f", path="/x", mode=0o644, content="")
    assert one('<network id="n"/>') == NetworkAction("n", mode="pool", prefix=24)
    assert one('<mount id="m" source="d" target="/m"/>') == MountAction("m", source="d", target="/m", readonly=True)


@pytest.mark.parametrize("text, value", [("0644", 0o644), ("644", 0o644), ("0755", 0o755), ("000", 0), ("0777", 0o777)])
def test_file_mode_is_octal(text: str, value: int) -> None:
    assert one(f'<file id="f" path="/x" mode="{text}"/>').mode == value  # type: ignore[attr-defined]


@pytest.mark.parametrize("text, value", [("true", True), ("1", True), ("false", False), ("0", False),
                                         (" true ", True), ("\ttrue\n", True), (" false", False), (" 1 ", True)])
def test_mount_readonly_is_an_xs_boolean(text: str, value: bool) -> None:
    # xs:boolean collapses whitespace: " true " is valid and means true (a read-only mount must stay read-only).
    assert one(f'<mount id="m" source="d" target="/m" readonly="{text}"/>').readonly is value  # type: ignore[attr-defined]


@pytest.mark.parametrize("text, value", [("1", 1.0), ("0.5", 0.5), (".5", 0.5), ("2.", 2.0), ("+3", 3.0),
                                         (" 1.25 ", 1.25), ("0", 0.0), ("86400", 86400.0), ("007.50", 7.5)])
def test_cost_is_an_xs_decimal(text: str, value: float) -> None:
    assert one(f'<script id="s" cost="{text}">x</script>').cost == value  # type: ignore[attr-defined]


@pytest.mark.parametrize("text, value", [("128", 128), ("+128", 128), (" 128 ", 128), ("000128", 128),
                                         ("0" * 5000 + "128", 128)])
def test_integers_in_any_lexical_form(text: str, value: int) -> None:
    # Python's int() refuses more than 4300 digits; the schema accepts any number of leading zeros.
    dag = load_dag(f'<vm xmlns="{DAG_NS}"><nodes><blank id="hw" memory="{text}" disk="{text}" vcpus="{text}"/>'
                   f'<script id="s" timeout="{text}">x</script>'
                   f'<network id="n" prefix="{text.replace("128", "16")}"/></nodes>'
                   '<edges><edge from="hw" to="s"/><edge from="hw" to="n"/></edges></vm>')
    assert dag.start.hardware == Hardware(memory=value, vcpus=value, disk=value)  # type: ignore[union-attr]
    assert dag.nodes["s"].script_timeout == value  # type: ignore[attr-defined]
    assert dag.nodes["n"].prefix == 16  # type: ignore[attr-defined]


def test_body_text_keeps_cdata_and_entities() -> None:
    node = one('<script id="s">if [ 1 &lt; 2 ] &amp;&amp; true; then<![CDATA[ echo "<ok>" ]]>fi</script>')
    assert node.body == 'if [ 1 < 2 ] && true; then echo "<ok>" fi'  # type: ignore[attr-defined]


def test_body_text_continues_after_a_comment() -> None:
    # A comment or processing instruction inside a body must not cut the script (or file) short.
    node = one('<script id="s">echo one\n<!-- a note -->echo two\n<?pi x?>echo three</script>')
    assert node.body == "echo one\necho two\necho three"  # type: ignore[attr-defined]
    node = one('<file id="f" path="/x">a<!-- c -->b</file>')
    assert node.content == "ab"  # type: ignore[attr-defined]


def test_description_attributes_and_name() -> None:
    dag = load_dag(vm("", head='<description>  Hello &amp; bye  </description><attributes>'
                               '<attribute name="a" value="1"/><attribute name="b" value="x &lt; y"/></attributes>')
                   .replace("<vm ", '<vm name="my-vm" '))
    assert (dag.name, dag.description, dag.attributes) == ("my-vm", "Hello & bye", {"a": "1", "b": "x < y"})


def test_nodes_remember_their_lines() -> None:
    dag = load_dag((DAGS / "good_all_actions.xml").read_bytes())
    assert {n.id: n.line for n in dag} == {"hw": 10, "net": 11, "data": 12, "conf": 13, "run": 17, "done": 21}
    assert [e.line for e in dag.edges] == list(range(24, 31))


def test_prefixed_namespace_is_accepted() -> None:
    dag = load_dag(f'<d:vm xmlns:d="{DAG_NS}"><d:nodes><d:blank id="hw" memory="128" disk="1"/></d:nodes></d:vm>')
    assert dag.start.id == "hw"


def test_nodes_in_another_namespace_are_refused() -> None:
    with pytest.raises(SchemaInvalidError):
        load_dag(vm('<x:script xmlns:x="urn:other" id="s">x</x:script>'))


# Errors name the right line and node ---------------------------------------------------------------------

def test_schema_errors_list_every_problem_with_line_and_node() -> None:
    text = (f'<vm xmlns="{DAG_NS}">\n<nodes>\n<blank id="hw" memory="1" disk="1"/>\n'
            '<script id="s" timeout="0">x</script>\n<file id="f" path="rel">x</file>\n</nodes>\n</vm>')
    with pytest.raises(SchemaInvalidError) as info:
        load_dag(text)
    assert [(p.line, p.node) for p in info.value.problems] == [(3, "hw"), (4, "s"), (5, "f")]
    assert info.value.message.startswith("DAG does not match the schema vmdag-1.1.xsd: ")
    assert "{urn:vmshop:dag:1}" not in str(info.value)  # namespaces are cleaned from messages


def test_schema_errors_in_a_one_line_document_name_the_element_concerned() -> None:
    text = (f'<vm xmlns="{DAG_NS}" name="top"><nodes><blank id="hw" memory="128" disk="1"/>'
            '<script id="s" interpreter="bin/sh">x</script></nodes><edges><edge from="hw" to="s"/>'
            '<edge from="nope" to="s"/></edges></vm>')
    with pytest.raises(SchemaInvalidError) as info:
        load_dag(text)
    assert [(p.line, p.node) for p in info.value.problems] == [(1, "s"), (1, "nope")]


def test_edge_with_a_bad_from_names_that_endpoint() -> None:
    with pytest.raises(SchemaInvalidError) as info:
        load_dag(vm('<script id="s">x</script>', '<edge from="hw" to="s"/><edge from="1bad" to="s"/>'))
    assert "1bad" in {p.node for p in info.value.problems}


def test_thousands_of_schema_errors_are_reported() -> None:
    # 10 000 dangling edges: every one is reported with its line and node (this used to take
    # seconds: the node of each error was looked up by walking the whole document).
    nodes = "".join(f'<script id="s{i}">x</script>\n' for i in range(999))
    edges = "".join(f'<edge from="g{i}" to="s{i % 999}"/>\n' for i in range(10_000))
    text = (f'<vm xmlns="{DAG_NS}">\n<nodes>\n<blank id="hw" memory="128" disk="1"/>\n{nodes}</nodes>\n'
            f"<edges>\n{edges}</edges>\n</vm>")
    with pytest.raises(SchemaInvalidError) as info:
        load_dag(text)
    problems = info.value.problems
    assert len(problems) == 10_000
    assert (problems[0].line, problems[0].node) == (1005, "g0")
    assert (problems[-1].line, problems[-1].node) == (11004, "g9999")


def test_what_names_the_document() -> None:
    with pytest.raises(DagInvalidError) as info:
        load_dag(vm('<script id="s">x</script>'), what="request from alice")
    assert info.value.message.startswith("request from alice is invalid")


# Writing ----------------------------------------------------------------------------------------------

def model(dag: Dag) -> tuple:  # type: ignore[type-arg]
    """What a DAG says, with lines left out (they are not part of node equality)."""
    return (dict(dag.nodes), list(dag.edges), dict(dag.attributes), dag.name, dag.description or None)


def dag_roundtrip(dag: Dag) -> tuple:  # type: ignore[type-arg]
    return model(load_dag(dag_to_xml(dag)))


def test_written_dag_loads_back_the_same() -> None:
    dag = Dag(
        nodes={n.id: n for n in [
            BlankStart("hw", hardware=Hardware(memory=512, vcpus=2, disk=4, arch="aarch64")),
            ScriptAction("s", cost=1e-7, interpreter="/usr/bin/env", body="  x < y && z\n    indented\n",
                         script_timeout=9),
            FileAction("f", cost=100.0, path="/etc/x", mode=0o600, content="]]> & <tag/>"),
            NetworkAction("n", cost=0.0, mode="static", address="10.1.2.3", prefix=16, gateway="10.1.0.1",
                          hostname="web"),
            MountAction("m", source="data", target="/mnt", readonly=False),
        ]},
        edges=[Edge("hw", "s"), Edge("s", "f"), Edge("hw", "n"), Edge("n", "m"), Edge("f", "m")],
        attributes={"owner": 'alice "the admin" <a@example>', "empty": ""},
        name="roundtrip", description="tests & such",
    )
    assert dag_roundtrip(dag) == model(dag)
    text = dag_to_xml(dag)
    assert text.endswith("</vm>\n")
    assert 'cost="0.0000001"' in text and 'cost="100"' in text and 'mode="0600"' in text


def test_image_start_round_trips() -> None:
    dag = Dag(nodes={"base": ImageStart("base", name="tiny", memory=256), "a": ScriptAction("a", body="x")},
              edges=[Edge("base", "a")])
    assert dag_roundtrip(dag) == model(dag)
    assert "vcpus" not in dag_to_xml(dag)


def test_writing_as_an_embedded_dag() -> None:
    dag = load_dag((SCRIPTS / "sample_blank.xml").read_bytes())
    element = dag_to_element(dag, DAG_ROOT)
    assert element.tag == DAG_ROOT and element.nsmap == {None: DAG_NS}
    assert dag_to_element(dag).tag == VM_ROOT
    again = load_embedded_dag(parse_xml(dag_to_xml(dag, DAG_ROOT)), "image tiny")
    assert model(again) == model(dag)


def test_load_embedded_dag_inside_an_image_file() -> None:
    text = (f'<image xmlns="urn:vmshop:image:1" name="tiny">\n  <hardware memory="128"/>\n'
            f'  <dag xmlns="{DAG_NS}">\n    <nodes>\n      <blank id="hw" memory="128" disk="1"/>\n'
            '      <script id="os">#os</script>\n    </nodes>\n    <edges><edge from="hw" to="os"/></edges>\n'
            '  </dag>\n</image>')
    root = parse_xml(text)
    embedded = root.find(f"{{{DAG_NS}}}dag")
    dag = load_embedded_dag(embedded, "image 'tiny'")
    assert dag.nodes["os"].line == 6  # lines are the enclosing file's
    broken = parse_xml(text.replace('memory="128" disk', 'memory="12" disk'))
    with pytest.raises(SchemaInvalidError) as info:
        load_embedded_dag(broken.find(f"{{{DAG_NS}}}dag"), "image 'tiny'")
    assert (info.value.line, info.value.node) == (5, "hw")
    cyclic = parse_xml(text.replace('<edge from="hw" to="os"/>', '<edge from="hw" to="os"/><edge from="os" to="os"/>'))
    with pytest.raises(DagInvalidError):
        load_embedded_dag(cyclic.find(f"{{{DAG_NS}}}dag"), "image 'tiny'")


def test_embedded_dag_has_no_attribute_uniqueness_but_keys_still_hold() -> None:
    # <dag> has the same key/keyref constraints as <vm>.
    text = f'<dag xmlns="{DAG_NS}"><nodes><blank id="a" memory="128" disk="1"/><script id="a">x</script></nodes></dag>'
    with pytest.raises(SchemaInvalidError, match="Duplicate key-sequence"):
        load_embedded_dag(parse_xml(text), "image")


def test_dag_from_element_skips_comments() -> None:
    root = parse_xml(f'<vm xmlns="{DAG_NS}"><!-- c --><nodes><!-- c --><blank id="hw" memory="128" disk="1"/>'
                     '</nodes><?pi?></vm>')
    assert list(dag_from_element(root).nodes) == ["hw"]


def test_digests_survive_writing_and_reading() -> None:
    dag = load_dag((DAGS / "good_all_actions.xml").read_bytes())
    again = load_dag(dag_to_xml(dag))
    assert {a.id: step_digest(a) for a in dag.actions} == {a.id: step_digest(a) for a in again.actions}


# The schema ------------------------------------------------------------------------------------------

def test_schema_is_loaded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_schema("vmdag-1.0.xsd") is load_schema("vmdag-1.0.xsd")
    assert (xsd_dir() / "vmdag-1.0.xsd").is_file()


def test_xsd_dir_can_be_overridden(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMSHOP_XSD_DIR", str(tmp_path))
    assert dagxml.xsd_dir() == tmp_path
    monkeypatch.delenv("VMSHOP_XSD_DIR")
    assert dagxml.xsd_dir() == Path(dagxml.__file__).resolve().parent.parent / "xsd"


def test_schema_documents_its_version() -> None:
    root = parse_xml((xsd_dir() / "vmdag-1.0.xsd").read_bytes(), max_depth=64)
    assert root.get("version") == "1.0"
    assert root.get("targetNamespace") == DAG_NS
    root = parse_xml((xsd_dir() / "vmdag-1.1.xsd").read_bytes(), max_depth=64)
    assert root.get("version") == "1.1"
    assert root.get("targetNamespace") == DAG_NS

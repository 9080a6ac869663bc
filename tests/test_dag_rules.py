"""The DAG model (vmshop_common.dag) and the rules XSD can't express (vmshop_common.rules).

Rules are tested on DAGs built in code (any shape, also ones the schema
would refuse) and, for the line numbers, on small documents.
"""

from __future__ import annotations

import pytest

from vmshop_common.dag import (
    DEFAULT_TIMEOUT,
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
from vmshop_common.dagxml import load_dag
from vmshop_common.errors import DagInvalidError, Problem
from vmshop_common.rules import check_dag, find_cycles, find_problems


def script(node_id: str, body: str = "", line: int | None = None) -> ScriptAction:
    return ScriptAction(node_id, line, body=body or f"echo {node_id}")


def make(*nodes, edges: str = "") -> Dag:  # type: ignore[no-untyped-def]
    """A DAG from nodes and edges written 'a>b b>c'."""
    pairs = [pair.split(">") for pair in edges.split()]
    return Dag(nodes={n.id: n for n in nodes}, edges=[Edge(s, t, 100 + i) for i, (s, t) in enumerate(pairs)])


HW = BlankStart("hw", 1, hardware=Hardware(memory=128))


def messages(dag: Dag) -> list[str]:
    return [p.message for p in find_problems(dag)]


def doc(nodes: str, edges: str = "") -> str:
    return (f'<vm xmlns="urn:vmshop:dag:1">\n<nodes>\n{nodes}\n</nodes>\n'
            f'<edges>\n{edges}\n</edges>\n</vm>\n')


def invalid(text: str) -> DagInvalidError:
    with pytest.raises(DagInvalidError) as info:
        load_dag(text)
    assert info.value.code == "Client.DagInvalid"
    return info.value


# The model ------------------------------------------------------------------------------------------

def test_start_and_actions() -> None:
    dag = make(script("a"), HW, script("b"), edges="hw>a a>b")
    assert dag.start is HW
    assert dag.start_nodes == [HW]
    assert [n.id for n in dag.actions] == ["a", "b"]
    assert [n.id for n in dag] == ["a", "hw", "b"]


@pytest.mark.parametrize("nodes", [[script("a")], [HW, ImageStart("img", name="tiny")]])
def test_start_raises_unless_exactly_one(nodes: list) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match="start nodes"):
        make(*nodes).start  # noqa: B018


def test_node_kinds_and_defaults() -> None:
    assert (HW.kind, HW.is_start) == ("blank", True)
    assert (ImageStart("i", name="x").kind, ImageStart("i", name="x").is_start) == ("image", True)
    assert [cls("x").kind for cls in (ScriptAction, FileAction, NetworkAction, MountAction)] == \
        ["script", "file", "network", "mount"]
    assert not script("a").is_start
    assert script("a").timeout == DEFAULT_TIMEOUT == 300
    assert ScriptAction("s", script_timeout=12).timeout == 12
    assert FileAction("f").timeout == DEFAULT_TIMEOUT
    assert Hardware(memory=64) == Hardware(64, 1, 1, "x86_64")


def test_line_is_not_part_of_equality() -> None:
    assert ScriptAction("a", 1, body="x") == ScriptAction("a", 99, body="x")
    assert Edge("a", "b", 1) == Edge("a", "b", 2)


def test_successors_predecessors_ignore_unknown_nodes() -> None:
    dag = make(HW, script("a"), script("b"), edges="hw>a hw>b a>b a>ghost ghost>b")
    assert dag.successors() == {"hw": ["a", "b"], "a": ["b"], "b": []}
    assert dag.predecessors() == {"hw": [], "a": ["hw"], "b": ["hw", "a"]}


def test_ancestors_are_transitive() -> None:
    dag = make(HW, script("a"), script("b"), script("c"), script("d"), edges="hw>a a>b b>c hw>d")
    assert dag.ancestors() == {"hw": set(), "a": {"hw"}, "b": {"hw", "a"}, "c": {"hw", "a", "b"}, "d": {"hw"}}


def test_topological_order_prefers_document_order_among_ready_nodes() -> None:
    # Document order: hw, z, y, x; edges allow x, y, z in any order after hw.
    dag = make(HW, script("z"), script("y"), script("x"), edges="hw>x hw>y hw>z")
    assert dag.topological_order() == ["hw", "z", "y", "x"]
    # An edge overrides document order.
    dag = make(HW, script("z"), script("y"), script("x"), edges="hw>x hw>y x>z")
    assert dag.topological_order() == ["hw", "y", "x", "z"]


def test_topological_order_among_keeps_the_whole_graphs_order() -> None:
    dag = make(HW, script("c"), script("b"), script("a"), edges="hw>a a>b b>c")
    assert dag.topological_order(among=["c", "a"]) == ["a", "c"]
    assert dag.topological_order(among=[]) == []


def test_topological_order_with_repeated_edges() -> None:
    dag = make(HW, script("a"), script("b"), edges="hw>a a>b a>b")
    assert dag.topological_order() == ["hw", "a", "b"]


def test_topological_order_and_ancestors_raise_on_a_cycle() -> None:
    dag = make(HW, script("a"), script("b"), edges="hw>a a>b b>a")
    with pytest.raises(ValueError, match="cycle"):
        dag.topological_order()
    with pytest.raises(ValueError, match="cycle"):
        dag.ancestors()


def test_topological_order_of_a_long_chain() -> None:
    nodes = [HW] + [script(f"s{i}") for i in range(2000)]
    edges = [Edge("hw", "s0")] + [Edge(f"s{i}", f"s{i + 1}") for i in range(1999)]
    dag = Dag(nodes={n.id: n for n in reversed(nodes)}, edges=edges)
    assert dag.topological_order() == [n.id for n in nodes]
    assert find_problems(dag) == []


# Rules: valid DAGs --------------------------------------------------------------------------------

def test_valid_dags_have_no_problems() -> None:
    assert find_problems(make(HW)) == []
    assert find_problems(make(HW, script("a"), script("b"), script("c"), edges="hw>a hw>b a>c b>c")) == []
    assert find_problems(make(ImageStart("base", name="tiny"), script("a"), edges="base>a")) == []
    check_dag(make(HW))  # does not raise


# Rules: start nodes ---------------------------------------------------------------------------------

def test_no_start_node() -> None:
    dag = make(script("a"), script("b"), edges="a>b")
    problems = find_problems(dag)
    assert problems[0] == Problem("the DAG has no start node (a <blank> or an <image>)", None, None)
    assert len(problems) == 1  # no reachability noise without a start


def test_two_start_nodes_name_the_second() -> None:
    second = ImageStart("base", 7, name="tiny")
    dag = make(HW, second, script("a"), edges="hw>a base>a")
    (problem,) = find_problems(dag)
    assert (problem.line, problem.node) == (7, "base")
    assert "second start node" in problem.message and "'hw'" in problem.message


def test_three_start_nodes_name_each_extra() -> None:
    dag = make(HW, BlankStart("hw2", 2), ImageStart("img", 3, name="x"))
    assert [(p.node, p.line) for p in find_problems(dag)] == [("hw2", 2), ("img", 3)]


def test_edge_into_the_start_node() -> None:
    dag = make(HW, script("a"), script("b"), edges="hw>a a>b b>hw")
    problems = find_problems(dag)
    into = [p for p in problems if "into start node" in p.message]
    assert into == [Problem("edge from 'b' into start node 'hw': actions come only after the start node", 102, "hw")]
    assert any(p.message.startswith("cycle: hw -> a -> b -> hw") for p in problems)


def test_edge_into_a_second_start_node_is_also_reported() -> None:
    dag = make(HW, ImageStart("img", 2, name="x"), edges="hw>img")
    assert any("into start node 'img'" in m for m in messages(dag))


# Rules: edges ------------------------------------------------------------------------------------------

def test_self_edge() -> None:
    dag = make(HW, script("a"), edges="hw>a a>a")
    assert find_problems(dag) == [Problem("edge from 'a' to itself", 101, "a")]


def test_self_edge_on_the_start_node() -> None:
    msgs = messages(make(HW, edges="hw>hw"))
    assert "edge from 'hw' to itself" in msgs
    assert any("into start node" in m for m in msgs)


def test_repeated_edge_names_each_repeat() -> None:
    dag = make(HW, script("a"), edges="hw>a hw>a hw>a")
    assert find_problems(dag) == [Problem("edge from 'hw' to 'a' is repeated", 101, "a"),
                                  Problem("edge from 'hw' to 'a' is repeated", 102, "a")]


def test_edge_to_a_missing_node_in_code() -> None:
    # The schema catches these in documents; DAGs built in code are checked too.
    dag = make(HW, script("a"), edges="hw>a a>ghost phantom>a")
    problems = find_problems(dag)
    assert Problem("edge names node 'ghost', which does not exist", 101, "ghost") in problems
    assert Problem("edge names node 'phantom', which does not exist", 102, "phantom") in problems


# Rules: cycles ----------------------------------------------------------------------------------------------

def test_cycle_names_its_nodes_in_order() -> None:
    dag = make(HW, script("a", line=5), script("b"), script("c"), edges="hw>a a>b b>c c>a")
    (problem,) = find_problems(dag)
    assert problem == Problem("cycle: a -> b -> c -> a", 5, "a")


def test_cycle_starts_at_its_first_node_in_document_order() -> None:
    dag = make(HW, script("z"), script("m"), script("a"), edges="hw>a a>m m>z z>a")
    assert find_cycles(dag) == [["z", "a", "m"]]
    assert messages(dag) == ["cycle: z -> a -> m -> z"]


def test_two_cycles_are_both_reported() -> None:
    dag = make(HW, script("a"), script("b"), script("c"), script("d"), edges="hw>a a>b b>a hw>c c>d d>c")
    assert sorted(messages(dag)) == ["cycle: a -> b -> a", "cycle: c -> d -> c"]


def test_cycle_through_a_component_gives_a_shortest_cycle() -> None:
    # a -> b -> c -> a and a -> c -> a: one component, the reported cycle is a real and short one.
    dag = make(HW, script("a"), script("b"), script("c"), edges="hw>a a>b b>c c>a a>c")
    (cycle,) = find_cycles(dag)
    assert cycle == ["a", "c"]


def test_self_edge_does_not_hide_the_cycle_through_its_node() -> None:
    # 'a' has a self edge and is also on a -> b -> a: the cycle's nodes must be named, not 'a -> a'.
    dag = make(HW, script("a"), script("b"), edges="hw>a a>a a>b b>a")
    msgs = messages(dag)
    assert "edge from 'a' to itself" in msgs
    assert "cycle: a -> b -> a" in msgs
    assert find_cycles(dag) == [["a", "b"]]


def test_self_edge_alone_is_not_a_cycle_problem() -> None:
    assert find_cycles(make(HW, script("a"), edges="hw>a a>a")) == []


def test_unreachable_cycle_reports_cycle_and_reachability() -> None:
    dag = make(HW, script("a"), script("b"), edges="a>b b>a")
    msgs = messages(dag)
    assert "cycle: a -> b -> a" in msgs
    assert msgs.count("node is not reachable from start node 'hw'") == 2


def test_large_cycle_is_found_without_recursion() -> None:
    n = 5000
    nodes = [HW] + [script(f"s{i}") for i in range(n)]
    edges = [Edge("hw", "s0")] + [Edge(f"s{i}", f"s{(i + 1) % n}") for i in range(n)]
    (cycle,) = find_cycles(Dag(nodes={x.id: x for x in nodes}, edges=edges))
    assert len(cycle) == n and cycle[0] == "s0"


# Rules: reachability ---------------------------------------------------------------------------------------

def test_unreachable_nodes_are_each_named() -> None:
    dag = make(HW, script("a"), script("b", line=8), script("c", line=9), edges="hw>a b>c")
    assert [(p.node, p.line) for p in find_problems(dag)] == [("b", 8), ("c", 9)]


def test_node_reachable_through_others_is_fine() -> None:
    assert find_problems(make(HW, script("c"), script("b"), script("a"), edges="b>c a>b hw>a")) == []


# Rules: node contents -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("action, message", [
    (NetworkAction("n", 3, mode="static"), "a static network action needs an address"),
    (NetworkAction("n", 3, mode="static", address=""), "a static network action needs an address"),
    (NetworkAction("n", 3, mode="pool", address="10.0.0.5"),
     "a pool network action takes its address from the plant; remove 'address'"),
    (FileAction("n", 3, path="/etc/../root/x"), "path '/etc/../root/x' has a '..' segment"),
    (FileAction("n", 3, path="/.."), "path '/..' has a '..' segment"),
    (FileAction("n", 3, path="/a/b/.."), "path '/a/b/..' has a '..' segment"),
    (MountAction("n", 3, source="d", target="/mnt/../etc"), "target '/mnt/../etc' has a '..' segment"),
    (FileAction("n", 3, path="/"), "path '/' is the root directory"),
    (FileAction("n", 3, path="//"), "path '//' is the root directory"),
    (FileAction("n", 3, path="/."), "path '/.' is the root directory"),
    (FileAction("n", 3, path="/./"), "path '/./' is the root directory"),
    (MountAction("n", 3, source="d", target="/"), "target '/' is the root directory"),
])
def test_node_content_rules(action: object, message: str) -> None:
    dag = make(HW, action, edges="hw>n")
    assert Problem(message, 3, "n") in find_problems(dag)


@pytest.mark.parametrize("action", [
    NetworkAction("n", mode="static", address="10.0.0.5"),
    NetworkAction("n", mode="pool"),
    FileAction("n", path="/etc/..hidden"),
    FileAction("n", path="/etc/a..b"),
    FileAction("n", path="/etc/.../x"),
    FileAction("n", path="/etc/./x"),
    FileAction("n", path="/etc/"),
    MountAction("n", source="d", target="/mnt/data/"),
])
def test_node_content_that_is_fine(action: object) -> None:
    assert find_problems(make(HW, action, edges="hw>n")) == []


# All problems at once, with lines from documents ----------------------------------------------------------

def test_all_problems_are_collected_in_a_stable_order() -> None:
    dag = make(HW, BlankStart("hw2", 2), script("a"), script("b"), NetworkAction("n", 9, mode="static"),
               edges="hw>a a>a a>b b>a hw>n hw>n")
    msgs = messages(dag)
    assert msgs == [
        "a second start node; the first is 'hw' (exactly one is allowed)",
        "edge from 'a' to itself",
        "edge from 'hw' to 'n' is repeated",
        "cycle: a -> b -> a",
        "a static network action needs an address",
    ]
    assert messages(dag) == msgs  # deterministic


def test_check_dag_raises_with_the_first_problem_in_the_message() -> None:
    dag = make(HW, script("a"), script("b", line=4), edges="hw>a")
    with pytest.raises(DagInvalidError) as info:
        check_dag(dag, what="request 17")
    exc = info.value
    assert exc.code == "Client.DagInvalid"
    assert exc.message == "request 17 is invalid: node is not reachable from start node 'hw'"
    assert (exc.line, exc.node) == (4, "b")
    assert "line 4, node 'b'" in str(exc)


def test_rule_errors_from_documents_carry_lines() -> None:
    exc = invalid(doc('<blank id="hw" memory="128" disk="1"/>\n<script id="a">x</script>\n<script id="b">y</script>',
                      '<edge from="hw" to="a"/>\n<edge from="a" to="b"/>\n<edge from="b" to="a"/>'))
    assert (exc.line, exc.node) == (4, "a")
    assert exc.problems[0].message == "cycle: a -> b -> a"


def test_edge_problems_from_documents_carry_the_edge_line() -> None:
    exc = invalid(doc('<blank id="hw" memory="128" disk="1"/>\n<script id="a">x</script>',
                      '<edge from="hw" to="a"/>\n<edge from="hw" to="a"/>'))
    assert exc.problems == [Problem("edge from 'hw' to 'a' is repeated", 8, "a")]


def test_every_problem_of_a_document_is_reported() -> None:
    exc = invalid(doc('<blank id="hw" memory="128" disk="1"/>\n'
                      '<network id="n" mode="static"/>\n'
                      '<file id="f" path="/a/../b">x</file>\n'
                      '<mount id="m" source="d" target="/"/>\n'
                      '<script id="lost">x</script>',
                      '<edge from="hw" to="n"/>\n<edge from="hw" to="f"/>\n<edge from="hw" to="m"/>'))
    assert [(p.line, p.node) for p in exc.problems] == [(7, "lost"), (4, "n"), (5, "f"), (6, "m")]


# Static addresses: only the VM's own lease ------------------------------------------------------------
STATIC = ('<vm xmlns="urn:vmshop:dag:1"><nodes><image id="s" name="tiny"/>'
          '<network id="net" mode="static" address="192.168.77.10"/><network id="p" mode="pool"/></nodes>'
          '<edges><edge from="s" to="net"/><edge from="s" to="p"/></edges></vm>')


def test_a_static_address_must_be_the_vms_lease() -> None:
    from vmshop_common.errors import AddressNotLeasedError
    from vmshop_common.rules import check_static_addresses

    dag = load_dag(STATIC)
    check_static_addresses(dag, "192.168.77.10")  # the VM's own: fine
    for lease in (None, "192.168.77.11"):
        with pytest.raises(AddressNotLeasedError) as raised:
            check_static_addresses(dag, lease)
        assert raised.value.code == "Client.AddressNotLeased"
        assert "192.168.77.10" in str(raised.value) and raised.value.problems[0].node == "net"

"""Property tests on random DAGs (strategies in tests/strategies.py).

- a topological order respects every edge;
- random valid DAGs pass the rules and survive writing and reading;
- a cycle added to a DAG is found and the nodes it names form a real cycle;
- step digests don't change with attribute order and whitespace;
- an image that ran a prefix of a request always matches it, and matching
  never accepts an image that is not a prefix;
- the bid uses the image that leaves the least remaining cost;
- no document, however mangled, makes the loader raise anything but a
  project error.
"""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vmshop_common.cost import Bid, CostModel, Decline
from vmshop_common.dag import Dag, Edge, FileAction, ScriptAction
from vmshop_common.dagxml import dag_to_xml, load_dag
from vmshop_common.errors import VMShopError
from vmshop_common.matching import CachedImage, Match, flatten, match_image
from vmshop_common.rules import find_cycles, find_problems
from vmshop_common.steps import normalise_text, step_digest

try:  # tests/ on sys.path (rootdir-relative import mode) or tests as a package
    from strategies import dags, predecessor_closed, prefix_images, xml_renderings
except ModuleNotFoundError:  # pragma: no cover
    from tests.strategies import dags, predecessor_closed, prefix_images, xml_renderings

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def model(dag: Dag) -> tuple:  # type: ignore[type-arg]
    return (dict(dag.nodes), list(dag.edges), dict(dag.attributes), dag.name, dag.description or None)


def action_ids(dag: Dag) -> set[str]:
    return {n.id for n in dag.actions}


# Topological order ------------------------------------------------------------------------------------

@PROPERTY
@given(dags(max_actions=12, start="any"))
def test_topological_order_respects_every_edge(dag: Dag) -> None:
    order = dag.topological_order()
    assert sorted(order) == sorted(dag.nodes)
    position = {node_id: index for index, node_id in enumerate(order)}
    for edge in dag.edges:
        assert position[edge.source] < position[edge.target]
    assert order[0] == dag.start.id


@PROPERTY
@given(dags(max_actions=10), st.randoms(use_true_random=False))
def test_topological_order_is_deterministic_and_ignores_edge_order(dag: Dag, rng: random.Random) -> None:
    order = dag.topological_order()
    assert dag.topological_order() == order
    edges = list(dag.edges)
    rng.shuffle(edges)
    assert Dag(nodes=dag.nodes, edges=edges).topological_order() == order
    among = [n for n in dag.nodes if rng.random() < 0.5]
    assert dag.topological_order(among=among) == [n for n in order if n in among]


@PROPERTY
@given(dags(max_actions=10))
def test_topological_order_picks_the_first_ready_node_in_document_order(dag: Dag) -> None:
    position = {node_id: index for index, node_id in enumerate(dag.nodes)}
    preds = dag.predecessors()
    done: set[str] = set()
    for node_id in dag.topological_order():
        ready = [n for n in dag.nodes if n not in done and all(p in done for p in preds[n])]
        assert node_id == min(ready, key=position.__getitem__)
        done.add(node_id)


@PROPERTY
@given(dags(max_actions=10))
def test_ancestors_are_what_reaches_a_node(dag: Dag) -> None:
    succ = dag.successors()
    for node_id, ancestors in dag.ancestors().items():
        reach = {a for a in dag.nodes if a != node_id and _reaches(succ, a, node_id)}
        assert ancestors == reach


def _reaches(succ: dict[str, list[str]], a: str, b: str) -> bool:
    seen, todo = {a}, [a]
    while todo:
        for child in succ[todo.pop()]:
            if child == b:
                return True
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return False


# Rules and the XML form ----------------------------------------------------------------------------------

@PROPERTY
@given(dags(max_actions=10, start="any"))
def test_random_dags_are_valid_and_round_trip(dag: Dag) -> None:
    assert find_problems(dag) == []
    again = load_dag(dag_to_xml(dag))
    assert model(again) == model(dag)
    assert dag_to_xml(again) == dag_to_xml(dag)


@PROPERTY
@given(st.data())
def test_added_back_edge_gives_a_cycle_that_names_real_edges(data: st.DataObject) -> None:
    dag = data.draw(dags(max_actions=10))
    ancestors = dag.ancestors()
    pairs = [(v, u) for v in action_ids(dag) for u in ancestors[v] if u in action_ids(dag)]
    assume(pairs)
    v, u = data.draw(st.sampled_from(sorted(pairs)))
    cyclic = Dag(nodes=dag.nodes, edges=dag.edges + [Edge(v, u, 999)])
    cycles = find_cycles(cyclic)
    assert cycles
    edges = {(e.source, e.target) for e in cyclic.edges}
    for cycle in cycles:
        assert len(set(cycle)) == len(cycle) >= 2
        for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True):
            assert (a, b) in edges
    assert any(u in cycle and v in cycle for cycle in cycles)
    messages = [p for p in find_problems(cyclic) if p.message.startswith("cycle: ")]
    assert [(p.message, p.node) for p in messages] == [
        ("cycle: " + " -> ".join(c + [c[0]]), c[0]) for c in cycles]


@PROPERTY
@given(st.data())
def test_digests_are_stable_under_attribute_order_and_whitespace(data: st.DataObject) -> None:
    dag = data.draw(dags(max_actions=8, start="any"))
    text = data.draw(xml_renderings(dag))
    loaded = load_dag(text)
    assert list(loaded.nodes) == list(dag.nodes)
    assert {a.id: step_digest(a) for a in loaded.actions} == {a.id: step_digest(a) for a in dag.actions}
    assert loaded.edges == dag.edges
    assert (loaded.attributes, loaded.name, loaded.description or None) == (dag.attributes, dag.name, dag.description)
    for node in dag:
        other = loaded.nodes[node.id]
        if isinstance(node, ScriptAction):
            assert normalise_text(other.body) == normalise_text(node.body)  # type: ignore[attr-defined]
            node, other = replace(node, body=""), replace(other, body="")  # type: ignore[type-var]
        elif isinstance(node, FileAction):
            assert normalise_text(other.content) == normalise_text(node.content)  # type: ignore[attr-defined]
            node, other = replace(node, content=""), replace(other, content="")  # type: ignore[type-var]
        assert other == node


# Matching ---------------------------------------------------------------------------------------------------

def check_is_prefix(request: Dag, image: CachedImage, result: Match) -> None:
    """What a match promises, checked from the definition (not from matching's own code)."""
    req = flatten(request, {})
    img = flatten(image.dag, {})
    req_actions, img_actions = action_ids(req), action_ids(img)
    pairs = result.matched
    assert set(pairs) <= req_actions
    assert sorted(pairs.values()) == sorted(img_actions)  # every image step, each once
    for req_node, img_node in pairs.items():
        assert step_digest(req.nodes[req_node]) == step_digest(img.nodes[img_node])  # type: ignore[arg-type]
    req_ancestors, img_ancestors = req.ancestors(), img.ancestors()
    for req_node in pairs:
        assert {a for a in req_ancestors[req_node] if a in req_actions} <= set(pairs)  # predecessor-closed
    to_req = {img_node: req_node for req_node, img_node in pairs.items()}
    for img_node in img_actions:
        for earlier in img_ancestors[img_node] & img_actions:
            assert to_req[img_node] not in req_ancestors[to_req[earlier]]  # no step ran out of order
    assert req.start.hardware.arch == img.start.hardware.arch  # type: ignore[union-attr]
    assert req.start.hardware.disk >= image.hardware.disk  # type: ignore[union-attr]
    assert result.remaining == tuple(n for n in req.topological_order() if n in req_actions and n not in pairs)


@PROPERTY
@given(st.data())
def test_an_image_that_ran_a_prefix_always_matches(data: st.DataObject) -> None:
    request = data.draw(dags(max_actions=10, start="blank"))
    image, chosen = data.draw(prefix_images(request))
    assert predecessor_closed(request, chosen)
    result = match_image(request, image)
    assert isinstance(result, Match), result
    check_is_prefix(request, image, result)
    digests = [step_digest(a) for a in request.actions]
    if len(set(digests)) == len(digests):  # without repeated steps the pairing is the only one
        assert set(result.matched) == chosen
    assert match_image(request, image) == result  # deterministic


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # cheap; finds the old bug
@given(st.data())
def test_an_image_that_ran_a_prefix_matches_despite_many_repeated_steps(data: st.DataObject) -> None:
    # Half the actions repeat an earlier one: the image's copy of a step may have to be paired with
    # an occurrence that is not the first in the request's order.
    request = data.draw(dags(max_actions=10, start="blank", repeats=2))
    image, chosen = data.draw(prefix_images(request))
    result = match_image(request, image)
    assert isinstance(result, Match), result
    check_is_prefix(request, image, result)


@st.composite
def other_images(draw: st.DrawFn, request: Dag) -> CachedImage:
    """Images that may or may not be prefixes of ``request``: prefixes broken in different ways,
    or unrelated random DAGs."""
    how = draw(st.sampled_from(["prefix", "drop", "extra", "swap", "random"]))
    image, chosen = draw(prefix_images(request))
    dag = image.dag
    actions = [n for n in dag.actions]
    if how == "drop" and actions:  # leave out one step (its successors may lose a predecessor)
        gone = draw(st.sampled_from(sorted(n.id for n in actions)))
        succ = dag.successors()
        nodes = {k: v for k, v in dag.nodes.items() if k != gone}
        edges = [e for e in dag.edges if gone not in (e.source, e.target)]
        edges += [Edge(dag.start.id, child) for child in succ[gone] if not any(e.target == child for e in edges)]
        dag = Dag(nodes=nodes, edges=edges)
    elif how == "extra":  # one more step, from the request or not
        pool = [a for a in request.actions if a.id not in chosen]
        extra = draw(st.sampled_from(pool)) if pool and draw(st.booleans()) else ScriptAction("x", body="unrelated")
        parent = draw(st.sampled_from(sorted(dag.nodes)))
        dag = Dag(nodes={**dag.nodes, "i_extra": replace(extra, id="i_extra")},
                  edges=dag.edges + [Edge(parent, "i_extra")])
    elif how == "swap" and len(actions) >= 2:  # reverse the order of an edge between two steps
        between = [e for e in dag.edges if e.source in dag.nodes and not dag.nodes[e.source].is_start]
        if between:
            flip = draw(st.sampled_from(between))
            edges = [e for e in dag.edges if e != flip] + [Edge(flip.target, flip.source)]
            edges += [Edge(dag.start.id, flip.target)]
            candidate = Dag(nodes=dag.nodes, edges=edges)
            if not find_problems(candidate):
                dag = candidate
    elif how == "random":
        start = request.start
        dag = draw(dags(max_actions=6, start="blank", arch=start.hardware.arch))  # type: ignore[union-attr]
        image = CachedImage(image.name, dag, replace(image.hardware, arch=start.hardware.arch))  # type: ignore[union-attr]
    assert find_problems(dag) == [], find_problems(dag)
    return CachedImage(image.name, dag, image.hardware)


@PROPERTY
@given(st.data())
def test_matching_never_accepts_an_image_that_is_not_a_prefix(data: st.DataObject) -> None:
    request = data.draw(dags(max_actions=9, start="blank"))
    image = data.draw(other_images(request))
    result = match_image(request, image)
    if isinstance(result, Match):
        check_is_prefix(request, image, result)
    else:
        assert result.startswith(f"image '{image.name}' ")


class History:
    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    def expected_seconds(self, digest: str) -> float | None:
        return self.seconds.get(digest)


@FEWER
@given(st.data())
def test_the_bid_uses_the_image_that_leaves_the_least_cost(data: st.DataObject) -> None:
    request = data.draw(dags(max_actions=8, start="blank"))
    images = [data.draw(other_images(request)) for _ in range(data.draw(st.integers(1, 4)))]
    images = [CachedImage(f"img{i}", image.dag, image.hardware) for i, image in enumerate(images)]
    measured = {step_digest(a): data.draw(st.sampled_from([0.0, 0.5, 12.0]))
                for a in request.actions if data.draw(st.booleans())}
    model = CostModel(clone_seconds=0.5, boot_seconds=data.draw(st.sampled_from([0.0, 1.0])),
                      default_seconds=data.draw(st.sampled_from([1.0, 5.0])), history=History(measured))
    load = data.draw(st.sampled_from([0.0, 2.5]))
    result = model.estimate(request, images, load_seconds=load)
    options = []
    for image in images:
        match = match_image(request, image)
        if isinstance(match, Match):
            seconds = sum(model.action_item(request.nodes[n]).seconds for n in match.remaining)  # type: ignore[arg-type]
            options.append((seconds, -len(match.matched), image.name, match))
    if not options:
        assert isinstance(result, Decline)
        assert set(result.reasons) == {image.name for image in images}
        return
    assert isinstance(result, Bid)
    seconds, _, name, match = min(options, key=lambda option: option[:3])
    assert result.image == name
    assert result.action_seconds == seconds
    assert (result.remaining, result.matched) == (match.remaining, len(match.matched))
    assert result.cost == round(sum(item.seconds for item in result.items), 6)
    assert result.cost == round(0.5 + model.boot_seconds + seconds + load, 6)
    for other_seconds, *_ in options:
        assert result.action_seconds <= other_seconds


# Mangled documents ------------------------------------------------------------------------------------------

@FEWER
@given(st.data())
def test_mangled_documents_only_raise_project_errors(data: st.DataObject) -> None:
    dag = data.draw(dags(max_actions=5, start="any"))
    text = dag_to_xml(dag)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        edit = data.draw(st.sampled_from(["delete", "insert", "duplicate"]))
        if edit == "delete":
            text = text[:at] + text[at + data.draw(st.integers(1, 20)):]
        elif edit == "insert":
            text = text[:at] + data.draw(st.text(alphabet='<>/="\'&;!-[]x0 \n\x00\x01é', max_size=6)) + text[at:]
        else:
            text = text[:at] + text[at:at + data.draw(st.integers(1, 40))] + text[at:]
    try:
        loaded = load_dag(text)
    except VMShopError as exc:
        assert exc.code.startswith("Client.")
        assert str(exc)
    else:
        assert find_problems(loaded) == []

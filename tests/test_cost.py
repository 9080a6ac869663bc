"""The cost model (vmshop_common.cost): where seconds come from, the breakdown, the choice, declining."""

from __future__ import annotations

import pytest

from vmshop_common.cost import DEFAULT_ACTION_SECONDS, Bid, CostItem, CostModel, Decline
from vmshop_common.dag import Dag, Hardware, ScriptAction
from vmshop_common.dagxml import load_dag
from vmshop_common.matching import CachedImage
from vmshop_common.steps import step_digest

BLANK = '<blank id="hw" memory="128" disk="1"/>'


def vm(*nodes: str, edges: str = "") -> Dag:
    edge_xml = "".join(f'<edge from="{s}" to="{t}"/>' for s, t in (pair.split(">") for pair in edges.split()))
    return load_dag(f'<vm xmlns="urn:vmshop:dag:1"><nodes>{"".join(nodes)}</nodes><edges>{edge_xml}</edges></vm>')


def script(node_id: str, body: str, cost: float | None = None) -> str:
    hint = f' cost="{cost}"' if cost is not None else ""
    return f'<script id="{node_id}"{hint}>{body}</script>'


def image(name: str, dag: Dag, disk: int = 1) -> CachedImage:
    return CachedImage(name, dag, Hardware(memory=128, disk=disk))


class History:
    """Measured seconds by step body (the plant's records implement the same protocol)."""

    def __init__(self, seconds_by_body: dict[str, float]) -> None:
        self.by_digest = {step_digest(ScriptAction("x", body=b)): s for b, s in seconds_by_body.items()}
        self.asked: list[str] = []

    def expected_seconds(self, digest: str) -> float | None:
        self.asked.append(digest)
        return self.by_digest.get(digest)


def bid(result: Bid | Decline) -> Bid:
    assert isinstance(result, Bid), result
    return result


def decline(result: Bid | Decline) -> Decline:
    assert isinstance(result, Decline), result
    return result


def sums_up(b: Bid) -> None:
    assert b.cost == pytest.approx(sum(item.seconds for item in b.items))


# Where an action's seconds come from -------------------------------------------------------------------

def test_history_beats_hint_beats_default() -> None:
    model = CostModel(default_seconds=7.0, history=History({"measured": 1.5}))
    dag = vm(BLANK, script("a", "measured", cost=40), script("b", "hinted", cost=3), script("c", "unknown"),
             edges="hw>a a>b b>c")
    items = {a.id: model.action_item(a) for a in dag.actions}  # type: ignore[arg-type]
    assert (items["a"].seconds, items["a"].source) == (1.5, "history")
    assert (items["b"].seconds, items["b"].source) == (3.0, "hint")
    assert (items["c"].seconds, items["c"].source) == (7.0, "default")
    for node_id, item in items.items():
        assert item.node == node_id
        assert item.digest == step_digest(dag.nodes[node_id])  # type: ignore[arg-type]
        assert item.label == f"script {node_id}"


def test_measured_zero_and_hint_zero_are_figures_too() -> None:
    model = CostModel(history=History({"instant": 0.0}))
    (zero_history,) = vm(BLANK, script("a", "instant", cost=9), edges="hw>a").actions
    (zero_hint,) = vm(BLANK, script("a", "other", cost=0), edges="hw>a").actions
    assert (model.action_item(zero_history).seconds, model.action_item(zero_history).source) == (0.0, "history")
    assert (model.action_item(zero_hint).seconds, model.action_item(zero_hint).source) == (0.0, "hint")


def test_default_default_is_five_seconds() -> None:
    assert DEFAULT_ACTION_SECONDS == 5.0
    (action,) = vm(BLANK, script("a", "x"), edges="hw>a").actions
    assert CostModel().action_item(action) == CostItem("script a", 5.0, "default", "a", step_digest(action))


def test_history_is_asked_by_digest() -> None:
    history = History({})
    (action,) = vm(BLANK, script("a", "x"), edges="hw>a").actions
    CostModel(history=history).action_item(action)
    assert history.asked == [step_digest(action)]


# The bid's breakdown -------------------------------------------------------------------------------------

def test_breakdown_sums_to_the_cost() -> None:
    model = CostModel(clone_seconds=0.25, boot_seconds=2.0, default_seconds=5.0, history=History({"b": 1.125}))
    request = vm(BLANK, script("a", "a"), script("b", "b"), script("c", "c", cost=0.5), edges="hw>a a>b b>c")
    b = bid(model.estimate(request, [image("bare", vm(BLANK))], load_seconds=3.0))
    assert [(i.label, i.seconds, i.source) for i in b.items] == [
        ("clone bare", 0.25, "clone"), ("boot", 2.0, "boot"), ("script a", 5.0, "default"),
        ("script b", 1.125, "history"), ("script c", 0.5, "hint"), ("load", 3.0, "load")]
    assert b.cost == 0.25 + 2.0 + 5.0 + 1.125 + 0.5 + 3.0
    sums_up(b)
    assert b.action_seconds == 6.625
    assert (b.image, b.remaining, b.matched) == ("bare", ("a", "b", "c"), 0)


def test_zero_boot_and_load_are_left_out() -> None:
    b = bid(CostModel().estimate(vm(BLANK, script("a", "a"), edges="hw>a"), [image("bare", vm(BLANK))]))
    assert [i.source for i in b.items] == ["clone", "default"]
    assert b.cost == 0.05 + 5.0
    sums_up(b)


def test_cost_is_rounded_to_microseconds() -> None:
    model = CostModel(clone_seconds=0.1, default_seconds=0.2)
    b = bid(model.estimate(vm(BLANK, script("a", "a"), edges="hw>a"), [image("bare", vm(BLANK))]))
    assert b.cost == 0.3  # not 0.30000000000000004
    sums_up(b)


def test_nothing_left_to_do_costs_the_clone() -> None:
    request = vm(BLANK, script("os", "os"), edges="hw>os")
    b = bid(CostModel(clone_seconds=0.5).estimate(request, [image("full", request)]))
    assert (b.cost, b.remaining, b.matched, b.action_seconds) == (0.5, (), 1, 0)


# Choosing the image -----------------------------------------------------------------------------------------

def test_chooses_the_image_that_leaves_the_least_cost() -> None:
    request = vm(BLANK, script("os", "os"), script("big", "compile", cost=600), script("small", "tweak", cost=1),
                 edges="hw>os hw>big big>small")
    # 'has_os' embodies one more step, but 'has_big' leaves far less to do.
    has_os = image("has_os", vm(BLANK, script("x", "os"), edges="hw>x"))
    has_big = image("has_big", vm(BLANK, script("x", "compile"), edges="hw>x"))
    b = bid(CostModel().estimate(request, [has_os, has_big, image("bare", vm(BLANK))]))
    assert b.image == "has_big"
    assert b.remaining == ("os", "small")
    assert b.action_seconds == 5.0 + 1.0


def test_measured_history_can_change_the_choice() -> None:
    request = vm(BLANK, script("a", "slow-looking", cost=100), script("b", "fast-looking", cost=1), edges="hw>a hw>b")
    has_a = image("has_a", vm(BLANK, script("x", "slow-looking"), edges="hw>x"))
    has_b = image("has_b", vm(BLANK, script("x", "fast-looking"), edges="hw>x"))
    assert bid(CostModel().estimate(request, [has_a, has_b])).image == "has_a"
    measured = CostModel(history=History({"slow-looking": 0.1, "fast-looking": 50}))
    assert bid(measured.estimate(request, [has_a, has_b])).image == "has_b"


def test_ties_go_to_more_embodied_steps_then_to_the_name() -> None:
    request = vm(BLANK, script("a", "free", cost=0), script("b", "B"), edges="hw>a a>b")
    with_a = image("zeta", vm(BLANK, script("x", "free"), edges="hw>x"))
    bare_1, bare_2 = image("beta", vm(BLANK)), image("alpha", vm(BLANK))
    assert bid(CostModel().estimate(request, [bare_1, with_a, bare_2])).image == "zeta"  # same cost, one more step
    assert bid(CostModel().estimate(request, [bare_1, bare_2])).image == "alpha"  # same cost and steps: the name


def test_remaining_of_the_bid_is_in_the_requests_order() -> None:
    request = vm(BLANK, script("z", "Z"), script("y", "Y"), script("x", "X"), edges="hw>z hw>y hw>x")
    assert bid(CostModel().estimate(request, [image("bare", vm(BLANK))])).remaining == ("z", "y", "x")


def test_request_from_an_image_costs_the_lineages_missing_steps() -> None:
    tiny = image("tiny", vm(BLANK, script("os", "os", cost=30), edges="hw>os"))
    request = vm('<image id="base" name="tiny"/>', script("a", "A", cost=2), edges="base>a")
    b = bid(CostModel().estimate(request, [tiny, image("bare", vm(BLANK))]))
    assert (b.image, b.remaining, b.action_seconds) == ("tiny", ("a",), 2.0)
    # On 'bare' the lineage's step would have to be redone too (30 s from its hint): 'tiny' wins.
    model = CostModel()
    from_bare = [model.action_item(a) for a in (tiny.dag.nodes["os"], request.nodes["a"])]  # type: ignore[misc]
    assert sum(i.seconds for i in from_bare) == 32.0 > b.action_seconds
    # A plant that does not have the image the request starts from can't know its lineage: it declines.
    assert "'tiny'" in decline(model.estimate(request, [image("bare", vm(BLANK))])).reason


# Declining -----------------------------------------------------------------------------------------------------

def test_declines_with_each_images_reason() -> None:
    request = vm(BLANK, script("a", "A"), edges="hw>a")
    arm = image("arm", vm('<blank id="hw" memory="128" disk="1" arch="aarch64"/>'))
    other = image("other", vm(BLANK, script("x", "X"), edges="hw>x"))
    big = image("big", vm(BLANK), disk=100)
    d = decline(CostModel().estimate(request, [other, arm, big]))
    assert set(d.reasons) == {"arm", "other", "big"}
    assert d.reason.startswith("no cached image embodies a prefix of this DAG (")
    assert d.reason.index("arm:") < d.reason.index("big:") < d.reason.index("other:")  # sorted by name
    for name, why in d.reasons.items():
        assert f"{name}: {why}" in d.reason


def test_declines_a_request_from_an_unknown_image() -> None:
    d = decline(CostModel().estimate(vm('<image id="b" name="ghost"/>'), [image("bare", vm(BLANK))]))
    assert "no cached image is named 'ghost'" in d.reason
    assert d.reasons == {}


def test_declines_with_an_empty_warehouse() -> None:
    assert decline(CostModel().estimate(vm(BLANK), [])) == Decline("the warehouse has no cached images")
    d = decline(CostModel().estimate(vm('<image id="b" name="tiny"/>'), []))
    assert "tiny" in d.reason


def test_images_are_taken_from_any_iterable() -> None:
    images = (img for img in [image("bare", vm(BLANK))])
    assert bid(CostModel().estimate(vm(BLANK), images)).image == "bare"

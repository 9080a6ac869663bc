"""Matching requests against cached images (vmshop_common.matching): lineages, prefixes, repeated steps."""

from __future__ import annotations

import pytest

from vmshop_common.dag import BlankStart, Dag, Edge, Hardware, ScriptAction
from vmshop_common.dagxml import load_dag
from vmshop_common.errors import NoSuchImageError
from vmshop_common.matching import SEARCH_BUDGET, CachedImage, Match, candidates, flatten, match_image
from vmshop_common.rules import find_problems

BLANK = '<blank id="hw" memory="128" disk="1"/>'
OS = '<script id="os">#os: tiny</script>'


def vm(*nodes: str, edges: str = "", name: str | None = None) -> Dag:
    """A DAG from node elements and edges written 'a>b b>c'."""
    edge_xml = "".join(f'<edge from="{s}" to="{t}"/>' for s, t in (pair.split(">") for pair in edges.split()))
    named = f' name="{name}"' if name else ""
    return load_dag(f'<vm xmlns="urn:vmshop:dag:1"{named}><nodes>{"".join(nodes)}</nodes>'
                    f"<edges>{edge_xml}</edges></vm>")


def image(name: str, dag: Dag, disk: int = 1, memory: int = 128) -> CachedImage:
    return CachedImage(name, dag, Hardware(memory=memory, disk=disk))


def script(node_id: str, body: str) -> str:
    return f'<script id="{node_id}">{body}</script>'


TINY = image("tiny", vm(BLANK, OS, edges="hw>os"))


def matched(result: Match | str) -> Match:
    assert isinstance(result, Match), result
    return result


def refused(result: Match | str) -> str:
    assert isinstance(result, str), result
    return result


# Lineages ----------------------------------------------------------------------------------------

def test_flatten_leaves_a_blank_start_alone() -> None:
    dag = vm(BLANK, OS, edges="hw>os")
    assert flatten(dag, {}) is dag


def test_flatten_replaces_an_image_start_by_its_lineage() -> None:
    request = vm('<image id="base" name="tiny"/>', script("a", "echo a"), script("b", "echo b"),
                 edges="base>a a>b", name="req")
    flat = flatten(request, {"tiny": TINY.dag})
    assert list(flat.nodes) == ["tiny:hw", "tiny:os", "a", "b"]
    assert flat.edges == [Edge("tiny:hw", "tiny:os"), Edge("tiny:os", "a"), Edge("a", "b")]
    assert isinstance(flat.start, BlankStart) and flat.start.id == "tiny:hw"
    assert flat.name == "req"
    assert find_problems(flat) == []


def test_flatten_applies_memory_and_vcpus_overrides() -> None:
    request = vm('<image id="base" name="tiny" memory="1024" vcpus="4"/>')
    flat = flatten(request, {"tiny": vm('<blank id="hw" memory="128" disk="3" arch="aarch64"/>')})
    assert flat.start.hardware == Hardware(memory=1024, vcpus=4, disk=3, arch="aarch64")  # type: ignore[union-attr]
    only_memory = flatten(vm('<image id="base" name="tiny" memory="256"/>'), {"tiny": TINY.dag})
    assert only_memory.start.hardware == Hardware(memory=256, vcpus=1, disk=1)  # type: ignore[union-attr]


def test_flatten_connects_every_sink_of_the_parent() -> None:
    parent = vm(BLANK, script("x", "x"), script("y", "y"), edges="hw>x hw>y")
    flat = flatten(vm('<image id="base" name="p"/>', script("a", "a"), edges="base>a"), {"p": parent})
    assert Edge("p:x", "a") in flat.edges and Edge("p:y", "a") in flat.edges
    assert flat.ancestors()["a"] == {"p:hw", "p:x", "p:y"}


def test_flatten_of_a_parent_without_actions_starts_from_its_blank() -> None:
    flat = flatten(vm('<image id="base" name="bare"/>', script("a", "a"), edges="base>a"), {"bare": vm(BLANK)})
    assert flat.edges == [Edge("bare:hw", "a")]


def test_flatten_follows_a_lineage_of_several_images() -> None:
    child = vm('<image id="base" name="tiny"/>', script("app", "install app"), edges="base>app")
    images = {"tiny": TINY.dag, "child": child}
    flat = flatten(vm('<image id="start" name="child"/>', script("run", "run app"), edges="start>run"), images)
    assert list(flat.nodes) == ["tiny:hw", "tiny:os", "child:app", "run"]
    assert flat.topological_order() == ["tiny:hw", "tiny:os", "child:app", "run"]
    assert find_problems(flat) == []


def test_flatten_unknown_image_names_the_start_node() -> None:
    request = vm('<image id="base" name="nope"/>')
    with pytest.raises(NoSuchImageError) as info:
        flatten(request, {"tiny": TINY.dag})
    assert info.value.code == "Client.NoSuchImage"
    assert "'nope'" in info.value.message
    assert (info.value.line, info.value.node) == (1, "base")


@pytest.mark.parametrize("images", [
    {"a": vm('<image id="s" name="a"/>')},
    {"a": vm('<image id="s" name="b"/>'), "b": vm('<image id="s" name="a"/>')},
])
def test_flatten_refuses_a_lineage_that_loops(images: dict[str, Dag]) -> None:
    with pytest.raises(NoSuchImageError, match="loops"):
        flatten(vm('<image id="s" name="a"/>'), images)


# Matching: starts, architecture, disk ---------------------------------------------------------------------

def test_image_that_is_the_whole_request() -> None:
    result = matched(match_image(vm(BLANK, OS, edges="hw>os"), TINY))
    assert result == Match(image="tiny", matched={"os": "os"}, remaining=())


def test_blank_request_with_the_image_as_prefix() -> None:
    request = vm(BLANK, OS, script("report", "uname -a"), edges="hw>os os>report")
    assert matched(match_image(request, TINY)) == Match("tiny", {"os": "os"}, ("report",))


def test_request_from_the_image_itself() -> None:
    request = vm('<image id="base" name="tiny"/>', script("a", "echo a"), edges="base>a")
    assert matched(match_image(request, TINY)) == Match("tiny", {"tiny:os": "os"}, ("a",))


def test_request_from_an_image_served_by_another_image_with_the_same_steps() -> None:
    twin = image("twin", vm('<blank id="b0" memory="512" disk="1"/>', '<script id="zz">#os: tiny</script>',
                            edges="b0>zz"))
    request = vm('<image id="base" name="tiny"/>', script("a", "echo a"), edges="base>a")
    result = matched(match_image(request, twin, {"tiny": TINY.dag}))
    assert result.matched == {"tiny:os": "zz"} and result.remaining == ("a",)


def test_request_from_a_child_image_served_by_its_parent() -> None:
    child = image("child", vm('<image id="base" name="tiny"/>', script("app", "install app"), edges="base>app"))
    request = vm('<image id="start" name="child"/>', script("run", "run app"), edges="start>run")
    lineages = {"tiny": TINY.dag, "child": child.dag}
    assert matched(match_image(request, TINY, lineages)) == Match("tiny", {"tiny:os": "os"}, ("child:app", "run"))
    assert matched(match_image(request, child, lineages)) == Match("child", {"tiny:os": "tiny:os", "child:app": "app"},
                                                                    ("run",))


def test_blank_request_served_by_an_image_with_a_lineage() -> None:
    child = image("child", vm('<image id="base" name="tiny"/>', script("app", "install app"), edges="base>app"))
    request = vm(BLANK, OS, script("app2", "install app"), script("run", "go"), edges="hw>os os>app2 app2>run")
    result = matched(match_image(request, child, {"tiny": TINY.dag}))
    assert result.matched == {"os": "tiny:os", "app2": "app"} and result.remaining == ("run",)


def test_image_with_nothing_done_serves_any_request_of_its_architecture() -> None:
    bare = image("bare", vm(BLANK))
    request = vm(BLANK, OS, script("b", "b"), edges="hw>os os>b")
    assert matched(match_image(request, bare)) == Match("bare", {}, ("os", "b"))


def test_architecture_must_match() -> None:
    arm = image("arm", vm('<blank id="hw" memory="128" disk="1" arch="aarch64"/>'))
    reason = refused(match_image(vm(BLANK), arm))
    assert reason == "image 'arm' is aarch64; the request wants x86_64"


@pytest.mark.parametrize("request_disk, image_disk, ok", [(1, 1, True), (8, 2, True), (1, 2, False), (2, 64, False)])
def test_disk_must_be_at_least_the_images(request_disk: int, image_disk: int, ok: bool) -> None:
    request = vm(f'<blank id="hw" memory="128" disk="{request_disk}"/>')
    result = match_image(request, image("img", vm(BLANK), disk=image_disk))
    if ok:
        matched(result)
    else:
        assert refused(result) == (f"image 'img' has a {image_disk} GiB disk; "
                                   f"the request asks for {request_disk} GiB")


def test_memory_does_not_matter() -> None:
    request = vm('<blank id="hw" memory="4096" vcpus="8" disk="1"/>')
    matched(match_image(request, image("img", vm(BLANK), memory=64)))


def test_unknown_image_in_the_request_raises() -> None:
    with pytest.raises(NoSuchImageError):
        match_image(vm('<image id="b" name="ghost"/>'), TINY)


# Matching: steps by digest ------------------------------------------------------------------------------------

def test_steps_match_by_digest_despite_ids_whitespace_and_attribute_order() -> None:
    request = vm(BLANK,
                 '<file id="conf" path="/etc/app.conf" mode="0600" cost="3">\n    key=value\n    other=1\n  </file>',
                 script("run", "go"), edges="hw>conf conf>run")
    img = image("img", vm('<blank disk="1" memory="128" id="start"/>',
                          '<file cost="0.1" mode="600" path="/etc/./app.conf" id="cfg">key=value\nother=1</file>',
                          edges="start>cfg"))
    assert matched(match_image(request, img)) == Match("img", {"conf": "cfg"}, ("run",))


def test_image_step_the_request_lacks() -> None:
    img = image("img", vm(BLANK, OS, script("extra", "rm -rf /opt"), edges="hw>os os>extra"))
    reason = refused(match_image(vm(BLANK, OS, edges="hw>os"), img))
    assert reason == "image 'img' has step 'extra' (script) that the request does not"


def test_image_step_with_other_content() -> None:
    img = image("img", vm(BLANK, script("os", "#os: other"), edges="hw>os"))
    assert "has step 'os' (script)" in refused(match_image(vm(BLANK, OS, edges="hw>os"), img))


# Matching: the prefix rule --------------------------------------------------------------------------------------

def test_image_step_without_its_predecessor_in_the_request_is_not_a_prefix() -> None:
    # The request runs a then b; the image ran only b: its state lacks a.
    request = vm(BLANK, script("a", "echo a"), script("b", "echo b"), edges="hw>a a>b")
    img = image("img", vm(BLANK, script("b", "echo b"), edges="hw>b"))
    reason = refused(match_image(request, img))
    assert reason == "image 'img' ran step 'b' without its predecessor 'a' (the image is not a prefix of the request)"


def test_predecessor_far_up_the_request_counts_too() -> None:
    request = vm(BLANK, script("a", "A"), script("b", "B"), script("c", "C"), edges="hw>a a>b b>c")
    img = image("img", vm(BLANK, script("a", "A"), script("c", "C"), edges="hw>a a>c"))
    assert "without its predecessor 'b'" in refused(match_image(request, img))


def test_independent_branch_is_a_prefix() -> None:
    request = vm(BLANK, script("a", "A"), script("b", "B"), script("c", "C"), edges="hw>a hw>b a>c b>c")
    img = image("img", vm(BLANK, script("b", "B"), edges="hw>b"))
    assert matched(match_image(request, img)) == Match("img", {"b": "b"}, ("a", "c"))


def test_image_that_ran_two_steps_in_the_other_order() -> None:
    request = vm(BLANK, script("a", "A"), script("b", "B"), edges="hw>b b>a")
    img = image("img", vm(BLANK, script("a", "A"), script("b", "B"), edges="hw>a a>b"))
    assert refused(match_image(request, img)) == \
        "image 'img' ran 'a' before 'b'; the request orders them the other way"


def test_image_with_fewer_order_constraints_than_the_request() -> None:
    # The image says a and b are independent; the request wants a before b: still its prefix.
    request = vm(BLANK, script("a", "A"), script("b", "B"), script("c", "C"), edges="hw>a a>b b>c")
    img = image("img", vm(BLANK, script("a", "A"), script("b", "B"), edges="hw>a hw>b"))
    assert matched(match_image(request, img)) == Match("img", {"a": "a", "b": "b"}, ("c",))


# Matching: repeated steps --------------------------------------------------------------------------------------

def test_repeated_step_matched_occurrence_by_occurrence() -> None:
    request = vm(BLANK, script("u1", "apt-get update"), script("i", "install"), script("u2", "apt-get update"),
                 edges="hw>u1 u1>i i>u2")
    once = image("once", vm(BLANK, script("x", "apt-get update"), edges="hw>x"))
    assert matched(match_image(request, once)) == Match("once", {"u1": "x"}, ("i", "u2"))
    full = image("full", vm(BLANK, script("a", "apt-get update"), script("b", "install"), script("c", "apt-get update"),
                            edges="hw>a a>b b>c"))
    assert matched(match_image(request, full)) == Match("full", {"u1": "a", "i": "b", "u2": "c"}, ())
    twice = image("twice", vm(BLANK, script("a", "apt-get update"), script("c", "apt-get update"), edges="hw>a a>c"))
    assert "without its predecessor 'i'" in refused(match_image(request, twice))
    thrice = image("thrice", vm(BLANK, *(script(f"u{i}", "apt-get update") for i in range(3)),
                                edges="hw>u0 u0>u1 u1>u2"))
    assert refused(match_image(request, thrice)) == "image 'thrice' has step 'u2' (script) that the request does not"


def test_repeated_step_the_image_took_from_a_later_branch() -> None:
    # The request has 'dup' twice: d2 after s1, and d1 right after the start. The image ran just 'dup'
    # from the start: it is the prefix {d1}, although d2 comes first in the request's order.
    request = vm(BLANK, script("s1", "echo 1"), script("d2", "dup"), script("d1", "dup"), edges="hw>s1 s1>d2 hw>d1")
    assert request.topological_order() == ["hw", "s1", "d2", "d1"]
    img = image("img", vm(BLANK, script("d", "dup"), edges="hw>d"))
    assert matched(match_image(request, img)) == Match("img", {"d1": "d"}, ("s1", "d2"))


def test_repeated_step_paired_with_the_occurrence_its_successor_needs() -> None:
    # Both occurrences of 'dup' are ready at first; only pairing the image's one with x lets p follow.
    request = vm(BLANK, script("y", "dup"), script("x", "dup"), script("p", "after x"), edges="hw>y hw>x x>p")
    img = image("img", vm(BLANK, script("a", "dup"), script("b", "after x"), edges="hw>a a>b"))
    assert matched(match_image(request, img)) == Match("img", {"x": "a", "p": "b"}, ("y",))


def test_many_independent_copies_of_a_step() -> None:
    n = 40
    request = vm(BLANK, *(script(f"r{i}", "same") for i in range(n)), edges=" ".join(f"hw>r{i}" for i in range(n)))
    img = image("img", vm(BLANK, *(script(f"i{i}", "same") for i in range(n // 2)),
                          edges=" ".join(f"hw>i{i}" for i in range(n // 2))))
    result = matched(match_image(request, img))
    assert len(result.matched) == n // 2 and len(result.remaining) == n // 2


def test_repeated_steps_paired_across_many_chains() -> None:
    # 13 copies of 'dup', each followed by its own step; the image ran 12 of them and the follower of
    # the 13th: pairing the image's copies with d0..d10 and d12 makes it a prefix.
    n = 13
    nodes = [BLANK] + [script(f"d{i}", "dup") for i in range(n)] + [script(f"f{i}", f"follow {i}") for i in range(n)]
    request = vm(*nodes, edges=" ".join(f"hw>d{i} d{i}>f{i}" for i in range(n)))
    img_nodes = [BLANK] + [script(f"a{i}", "dup") for i in range(n - 1)] + [script("last", f"follow {n - 1}")]
    img = image("img", vm(*img_nodes, edges=" ".join(f"hw>a{i}" for i in range(n - 1)) + " hw>last"))
    result = matched(match_image(request, img))
    assert result.matched["f12"] == "last" and "d12" in result.matched
    assert result.remaining == ("d11",) + tuple(f"f{i}" for i in range(n - 1))


def test_hopeless_pairing_of_many_repeated_steps_gives_up_with_a_reason() -> None:
    # 24 independent copies of 'dup'; 'g' needs 13 of them. The image ran 12 copies and then 'g':
    # no pairing works, and there are 24!/12! ways to try. The search gives up within its budget.
    n, k = 24, 12
    nodes = [BLANK] + [script(f"d{i}", "dup") for i in range(n)] + [script("g", "gather")]
    request = vm(*nodes, edges=" ".join(f"hw>d{i}" for i in range(n)) + " " + " ".join(f"d{i}>g" for i in range(k + 1)))
    img_nodes = [BLANK] + [script(f"a{i}", "dup") for i in range(k)] + [script("g", "gather")]
    img = image("img", vm(*img_nodes, edges=" ".join(f"hw>a{i} a{i}>g" for i in range(k))))
    reason = refused(match_image(request, img))
    assert reason.startswith("image 'img' ran step 'g' without its predecessor") and "not a prefix" in reason
    assert SEARCH_BUDGET > 0


# Matching: the order of what remains ------------------------------------------------------------------------

def test_remaining_follows_the_requests_deterministic_order() -> None:
    request = vm(BLANK, OS, script("z", "Z"), script("y", "Y"), script("x", "X"), edges="hw>os os>x os>y os>z")
    result = matched(match_image(request, TINY))
    assert result.remaining == ("z", "y", "x")  # document order among ready nodes
    assert result.remaining == tuple(n for n in request.topological_order() if n not in ("hw", "os"))


def test_remaining_does_not_depend_on_the_images_document_order() -> None:
    request = vm(BLANK, script("a", "A"), script("b", "B"), script("c", "C"), script("d", "D"),
                 edges="hw>a hw>b a>c b>d")
    one = image("one", vm(BLANK, script("a", "A"), script("b", "B"), edges="hw>a hw>b"))
    two = image("two", vm(script("b", "B"), script("a", "A"), BLANK, edges="hw>b hw>a"))
    assert matched(match_image(request, one)).remaining == matched(match_image(request, two)).remaining == ("c", "d")
    assert match_image(request, one) == match_image(request, one)


# Candidates -------------------------------------------------------------------------------------------------

def test_candidates_gives_matches_and_reasons() -> None:
    request = vm(BLANK, OS, script("a", "A"), edges="hw>os os>a")
    arm = image("arm", vm('<blank id="hw" memory="128" disk="1" arch="aarch64"/>'))
    other = image("other", vm(BLANK, script("x", "X"), edges="hw>x"))
    bare = image("bare", vm(BLANK))
    matches, reasons = candidates(request, [arm, TINY, other, bare])
    assert [m.image for m in matches] == ["tiny", "bare"]
    assert set(reasons) == {"arm", "other"}
    assert "aarch64" in reasons["arm"] and "has step 'x'" in reasons["other"]


def test_candidates_request_from_an_unknown_image_raises() -> None:
    with pytest.raises(NoSuchImageError):
        candidates(vm('<image id="b" name="ghost"/>'), [TINY])


def test_candidates_image_with_an_unknown_parent_is_a_reason() -> None:
    orphan = image("orphan", vm('<image id="b" name="gone"/>', script("a", "A"), edges="b>a"))
    matches, reasons = candidates(vm(BLANK, OS, edges="hw>os"), [TINY, orphan])
    assert [m.image for m in matches] == ["tiny"]
    assert "gone" in reasons["orphan"]


def test_candidates_of_an_empty_warehouse() -> None:
    assert candidates(vm(BLANK), []) == ([], {})


def test_candidates_with_a_request_from_an_image_in_the_pool() -> None:
    child = image("child", vm('<image id="base" name="tiny"/>', script("app", "install app"), edges="base>app"))
    request = vm('<image id="s" name="child"/>', script("run", "go"), edges="s>run")
    matches, reasons = candidates(request, [TINY, child])
    assert {m.image: m.remaining for m in matches} == {"tiny": ("child:app", "run"), "child": ("run",)}
    assert reasons == {}


def test_actions_built_in_code_match_too() -> None:
    request = Dag(nodes={"hw": BlankStart("hw", hardware=Hardware(128)), "a": ScriptAction("a", body="x")},
                  edges=[Edge("hw", "a")])
    img = CachedImage("img", Dag(nodes={"s": BlankStart("s", hardware=Hardware(128)),
                                        "b": ScriptAction("b", body=" x ")},
                                 edges=[Edge("s", "b")]), Hardware(128))
    assert matched(match_image(request, img)).matched == {"a": "b"}

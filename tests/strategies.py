"""Hypothesis strategies for random VM descriptions.

- :func:`dags` builds random *valid* DAGs: a start node and random actions,
  edges only from a lower to a higher index (so the graph is acyclic) and
  every action given at least one predecessor (so it is reachable from the
  start). The document order of nodes and edges is shuffled, so it is
  unrelated to the edges. Action contents come from small pools and an
  action often copies an earlier one's, so repeated steps (same digest)
  are common.
- :func:`prefix_images` takes a random predecessor-closed subset of a
  request: the DAG a cached image that ran part of the request embodies
  (renamed, reordered, with other cost hints: none of that is identity).
- :func:`xml_renderings` writes a DAG as XML with attributes in a random
  order, random whitespace between them and bodies re-indented, to check
  that none of that changes what is loaded.
"""

from __future__ import annotations

import random
from dataclasses import replace
from xml.sax.saxutils import escape, quoteattr

from hypothesis import strategies as st

from vmshop_common.dag import (
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
from vmshop_common.dagxml import DAG_NS
from vmshop_common.matching import CachedImage

# Pools are small on purpose: equal contents (repeated steps) must be common.
BODIES = ["echo one", "echo two", "apt-get install -y nginx", "x=1\ny=2\necho $((x + y))",
          "if true; then\n  echo 'nested'\nfi", "cat <<'EOF' > /etc/motd\n<b>&amp;</b>\nEOF", ""]
PATHS = ["/etc/app.conf", "/etc/motd", "/srv/www/index.html", "/root/.profile", "/tmp/a-b_c+d@e"]
SOURCES = ["appdata", "logs", "data.v2"]
TARGETS = ["/mnt/data", "/srv/data", "/var/lib/x"]
COSTS = [None, 0.0, 0.5, 1.0, 2.25, 30.0]
ARCHES = ["x86_64", "aarch64"]

_FIRST = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_"
ids = st.builds(str.__add__, st.sampled_from(_FIRST), st.text(_FIRST + "0123456789.-", max_size=8))  # NodeId


@st.composite
def actions(draw: st.DrawFn, node_id: str) -> Action:
    """One random action with id ``node_id`` (valid for the XSD and the rules)."""
    kind = draw(st.sampled_from(["script", "script", "file", "network", "mount"]))
    cost = draw(st.sampled_from(COSTS))
    if kind == "script":
        return ScriptAction(node_id, cost=cost, interpreter=draw(st.sampled_from(["/bin/sh", "/bin/bash"])),
                            body=draw(st.sampled_from(BODIES)), script_timeout=draw(st.sampled_from([300, 30, 7200])))
    if kind == "file":
        return FileAction(node_id, cost=cost, path=draw(st.sampled_from(PATHS)),
                          mode=draw(st.sampled_from([0o644, 0o600, 0o755])), content=draw(st.sampled_from(BODIES)))
    if kind == "network":
        if draw(st.booleans()):
            return NetworkAction(node_id, cost=cost, mode="pool", hostname=draw(st.sampled_from([None, "web", "db"])))
        return NetworkAction(node_id, cost=cost, mode="static", address=draw(st.sampled_from(["10.0.0.5", "10.0.0.6"])),
                             prefix=draw(st.sampled_from([24, 16])), gateway=draw(st.sampled_from([None, "10.0.0.1"])))
    return MountAction(node_id, cost=cost, source=draw(st.sampled_from(SOURCES)), target=draw(st.sampled_from(TARGETS)),
                       readonly=draw(st.booleans()))


@st.composite
def dags(draw: st.DrawFn, max_actions: int = 8, start: str = "blank", arch: str | None = None,
         disk: int | None = None, repeats: int = 4) -> Dag:
    """A random valid DAG: ``start`` is 'blank', 'image' or 'any'; about one action in ``repeats``
    copies the content of an earlier one."""
    count = draw(st.integers(0, max_actions))
    names = draw(st.lists(ids, min_size=count + 1, max_size=count + 1, unique=True))
    kind = draw(st.sampled_from(["blank", "image"])) if start == "any" else start
    first: Node
    if kind == "blank":
        hardware = Hardware(memory=draw(st.sampled_from([64, 128, 512])), vcpus=draw(st.integers(1, 4)),
                            disk=disk if disk is not None else draw(st.integers(1, 8)),
                            arch=arch or draw(st.sampled_from(ARCHES)))
        first = BlankStart(names[0], hardware=hardware)
    else:
        first = ImageStart(names[0], name=draw(st.sampled_from(["tiny", "base-os"])),
                           memory=draw(st.sampled_from([None, 256])), vcpus=draw(st.sampled_from([None, 2])))
    ordered: list[Node] = [first]
    for i in range(1, count + 1):
        if len(ordered) > 1 and draw(st.integers(1, repeats)) == 1:  # a repeated step: same content, other id and cost
            ordered.append(replace(draw(st.sampled_from(ordered[1:])), id=names[i], cost=draw(st.sampled_from(COSTS))))
        else:
            ordered.append(draw(actions(names[i])))
    edges = []
    for index in range(1, count + 1):
        parents = draw(st.lists(st.integers(0, index - 1), min_size=1, max_size=3, unique=True))
        edges.extend(Edge(ordered[parent].id, ordered[index].id) for parent in parents)
    shuffled_nodes = draw(st.permutations(ordered))
    shuffled_edges = draw(st.permutations(edges))
    attributes = draw(st.dictionaries(st.sampled_from(["project", "owner", "tier"]),
                                      st.text(st.characters(codec="ascii", categories=["L", "N", "P", "Zs"]),
                                              max_size=10), max_size=2))
    return Dag(nodes={node.id: node for node in shuffled_nodes}, edges=list(shuffled_edges), attributes=attributes,
               name=draw(st.sampled_from([None, "random-vm"])),
               description=draw(st.sampled_from([None, "a random VM", "with <markup> & 'quotes'"])))


def predecessor_closed(dag: Dag, chosen: set[str]) -> bool:
    """Whether every action in ``chosen`` has all its predecessors in ``chosen`` or is after the start."""
    preds = dag.predecessors()
    return all(all(p in chosen or dag.nodes[p].is_start for p in preds[n]) for n in chosen)


@st.composite
def prefix_images(draw: st.DrawFn, request: Dag, name: str = "img") -> tuple[CachedImage, set[str]]:
    """A cached image that ran a random predecessor-closed subset of ``request`` (a blank-start DAG).

    Returns the image and the ids of the request actions it embodies. The
    image's ids, document order and cost hints differ from the request's.
    """
    preds = request.predecessors()
    chosen: set[str] = set()
    for node_id in request.topological_order():
        node = request.nodes[node_id]
        if isinstance(node, Action) and all(p in chosen or request.nodes[p].is_start for p in preds[node_id]):
            if draw(st.booleans()):
                chosen.add(node_id)
    start = request.start
    assert isinstance(start, BlankStart)
    renamed = {start.id: "i_start", **{node_id: f"i_{index}" for index, node_id in enumerate(sorted(chosen))}}
    nodes: list[Node] = [BlankStart("i_start", hardware=start.hardware)]
    for node_id in chosen:
        action = request.nodes[node_id]
        assert isinstance(action, Action)
        nodes.append(replace(action, id=renamed[node_id], cost=draw(st.sampled_from(COSTS))))
    edges = [Edge(renamed[e.source], renamed[e.target]) for e in request.edges
             if e.target in chosen and (e.source in chosen or e.source == start.id)]
    nodes = draw(st.permutations(nodes))
    dag = Dag(nodes={node.id: node for node in nodes}, edges=draw(st.permutations(edges)))
    hardware = replace(start.hardware, disk=draw(st.integers(1, start.hardware.disk)))
    return CachedImage(name, dag, hardware), chosen


# Writing XML with random attribute order and whitespace --------------------------------------

def _attrs(node: Node) -> list[tuple[str, str]]:
    """The XML attributes of ``node`` (as dagxml writes them, in a fixed order)."""
    def cost(value: float | None) -> list[tuple[str, str]]:
        return [] if value is None else [("cost", repr(value))]
    if isinstance(node, BlankStart):
        hw = node.hardware
        return [("id", node.id), ("memory", str(hw.memory)), ("vcpus", str(hw.vcpus)), ("disk", str(hw.disk)),
                ("arch", hw.arch)]
    if isinstance(node, ImageStart):
        out = [("id", node.id), ("name", node.name)]
        out += [(k, str(v)) for k, v in (("memory", node.memory), ("vcpus", node.vcpus)) if v is not None]
        return out
    if isinstance(node, ScriptAction):
        return [("id", node.id), ("interpreter", node.interpreter), ("timeout", str(node.script_timeout)),
                *cost(node.cost)]
    if isinstance(node, FileAction):
        return [("id", node.id), ("path", node.path), ("mode", f"{node.mode:04o}"), *cost(node.cost)]
    if isinstance(node, NetworkAction):
        out = [("id", node.id), ("mode", node.mode), ("prefix", str(node.prefix))]
        out += [(k, v) for k, v in (("address", node.address), ("gateway", node.gateway),
                                    ("hostname", node.hostname)) if v is not None]
        return out + cost(node.cost)
    if isinstance(node, MountAction):
        return [("id", node.id), ("source", node.source), ("target", node.target),
                ("readonly", "true" if node.readonly else "false"), *cost(node.cost)]
    raise TypeError(node)


def _reindent(text: str, rng: random.Random) -> str:
    """``text`` as XML formatting might present it: indented, padded, with CRLF line ends."""
    indent = " " * rng.randint(0, 8)
    lines = [(indent + line if line.strip() else rng.choice(["", "  "])) + rng.choice(["", " ", "\t"])
             for line in text.split("\n")]
    ending = rng.choice(["\n", "\r\n"])
    return rng.choice(["", ending, indent + ending]) + ending.join(lines) + rng.choice(["", ending, ending + "  "])


@st.composite
def xml_renderings(draw: st.DrawFn, dag: Dag) -> str:
    """``dag`` as a ``<vm>`` document written differently from :func:`dag_to_xml`."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    gap = lambda: rng.choice([" ", "  ", "\n      ", "\t"])  # noqa: E731
    out = ['<?xml version="1.0" encoding="UTF-8"?>' if rng.random() < 0.5 else ""]
    root_attrs = [("xmlns", DAG_NS)] + ([("name", dag.name)] if dag.name else [])
    rng.shuffle(root_attrs)
    out.append("<vm" + "".join(f"{gap()}{k}={quoteattr(v)}" for k, v in root_attrs) + ">")
    if dag.description:
        out.append(f"<description>{escape(dag.description)}</description>")
    if dag.attributes:
        out.append("<attributes>")
        for name, value in dag.attributes.items():
            pair = [("name", name), ("value", value)]
            rng.shuffle(pair)
            out.append("  <attribute" + "".join(f"{gap()}{k}={quoteattr(v)}" for k, v in pair) + "/>")
        out.append("</attributes>")
    out.append("<nodes>")
    for node in dag:
        attrs = _attrs(node)
        rng.shuffle(attrs)
        head = f"  <{node.kind}" + "".join(f"{gap()}{k}{rng.choice(['=', ' = '])}{quoteattr(v)}" for k, v in attrs)
        body = getattr(node, "body", None) if isinstance(node, ScriptAction) else getattr(node, "content", None)
        if body is None:
            out.append(head + rng.choice(["/>", f"></{node.kind}>"]))
        elif rng.random() < 0.3 and "]]>" not in body:
            out.append(f"{head}><![CDATA[{_reindent(body, rng)}]]></{node.kind}>")
        else:
            out.append(f"{head}>{escape(_reindent(body, rng))}</{node.kind}>")
        if rng.random() < 0.2:
            out.append("  <!-- a comment between nodes -->")
    out.append("</nodes>")
    if dag.edges:
        out.append("<edges>")
        for edge in dag.edges:
            pair = [("from", edge.source), ("to", edge.target)]
            rng.shuffle(pair)
            out.append("  <edge" + "".join(f"{gap()}{k}={quoteattr(v)}" for k, v in pair) + "/>")
        out.append("</edges>")
    out.append("</vm>")
    return rng.choice(["\n", "\r\n", "\n\n"]).join(out) + "\n"

"""Matching a request DAG against the DAGs that cached images embody.

Lineage first: an image's DAG may start from another image
(``<image name="parent">``); :func:`flatten` replaces such a start with the
parent's own (flattened) DAG, so every lineage starts from a ``<blank>``.
A request is expanded the same way against the warehouse's images.

An image can serve a request (:func:`match_image`) when
- both start from blank hardware of the same architecture, the request's
  disk is at least the image's;
- every step of the image is a step of the request (same digest; when a
  step occurs several times, the occurrences are paired by a bounded search
  that prefers request steps whose predecessors are already paired);
- each matched step comes with all of its predecessors in the request
  (the image is a prefix of the request), and the image never ran two
  steps in the opposite order of the request's.
The actions left to do are the request's unmatched actions, in the
request's deterministic topological order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .dag import Action, BlankStart, Dag, Edge, Hardware, Node
from .errors import NoSuchImageError, Problem
from .steps import step_digest


@dataclass(frozen=True)
class CachedImage:
    """What matching needs to know of a cached image: its name, DAG and hardware."""

    name: str
    dag: Dag
    hardware: Hardware


@dataclass(frozen=True)
class Match:
    """An image that can serve a request, and what remains to be done on a clone of it."""

    image: str
    matched: dict[str, str] = field(default_factory=dict)  # request node id -> image node id
    remaining: tuple[str, ...] = ()  # request action ids, in order


def flatten(dag: Dag, images: Mapping[str, Dag], _seen: tuple[str, ...] = ()) -> Dag:
    """``dag`` with an image start replaced by that image's flattened DAG.

    ``images`` maps image names to their embodied DAGs. Node ids brought in
    from an image are prefixed with ``name:`` (':' never occurs in an id
    written in XML, so they cannot collide). Raises NoSuchImageError for an
    unknown image and for a lineage that loops.
    """
    start = dag.start
    if isinstance(start, BlankStart):
        return dag
    name = start.name
    if name in _seen:
        raise NoSuchImageError(f"image lineage loops: {' -> '.join(_seen + (name,))}")
    if name not in images:
        raise NoSuchImageError(f"no cached image is named '{name}'", [Problem("unknown image", start.line, start.id)])
    parent = flatten(images[name], images, _seen + (name,))
    renamed = {node_id: node_id if ":" in node_id else f"{name}:{node_id}" for node_id in parent.nodes}
    nodes = {renamed[node_id]: _with_id(node, renamed[node_id]) for node_id, node in parent.nodes.items()}
    edges = [Edge(renamed[e.source], renamed[e.target]) for e in parent.edges]
    parent_succ = parent.successors()
    sinks = [renamed[node_id] for node_id in parent.nodes if not parent_succ[node_id]]
    for node_id, node in dag.nodes.items():
        if node_id != start.id:
            nodes[node_id] = node
    for edge in dag.edges:
        if edge.source == start.id:
            edges.extend(Edge(sink, edge.target, edge.line) for sink in sinks)
        else:
            edges.append(edge)
    blank = next(node for node in nodes.values() if isinstance(node, BlankStart))
    if start.memory is not None or start.vcpus is not None:
        hardware = Hardware(memory=start.memory or blank.hardware.memory, vcpus=start.vcpus or blank.hardware.vcpus,
                            disk=blank.hardware.disk, arch=blank.hardware.arch)
        nodes[blank.id] = BlankStart(blank.id, blank.line, hardware=hardware)
    return Dag(nodes=nodes, edges=edges, attributes=dict(dag.attributes), name=dag.name, description=dag.description)


def _with_id(node: Node, new_id: str) -> Node:
    from dataclasses import replace
    return replace(node, id=new_id)


SEARCH_BUDGET = 250_000  # work (node visits) allowed for pairing alternatives after the first try fails


def _pair_steps(req: Dag, img: Dag, name: str) -> dict[str, str] | str:
    """Pair every action of ``img`` with an action of ``req`` with the same digest, so that the
    paired request actions include all their predecessors and the image never ran two of them in
    the opposite order of the request's: request node id -> image node id, or the reason why not.

    Without repeated steps the pairing is forced. A repeated step may have to be paired with
    another of its occurrences than the first in topological order (the image can be a prefix
    that took a later one), so pairings are searched depth first, occurrences whose predecessors
    are all paired first; the first pairing is always checked in full, the alternatives get
    :data:`SEARCH_BUDGET` (the search is exponential in the worst case; when the budget runs
    out the image is declined, which is safe).
    """
    req_order = req.topological_order()
    position = {node_id: index for index, node_id in enumerate(req_order)}
    req_ancestors = req.ancestors()
    needs = {n: {a for a in req_ancestors[n] if isinstance(req.nodes[a], Action)}
             for n in req_order if isinstance(req.nodes[n], Action)}
    digest_of = {n: step_digest(req.nodes[n]) for n in needs}  # type: ignore[arg-type]
    by_digest: dict[str, list[str]] = {}
    for n in req_order:
        if n in needs:
            by_digest.setdefault(digest_of[n], []).append(n)
    steps = [(n, step_digest(img.nodes[n])) for n in img.topological_order()  # type: ignore[arg-type]
             if isinstance(img.nodes[n], Action)]
    total = Counter(digest for _, digest in steps)
    seen: Counter[str] = Counter()
    for image_node, digest in steps:
        seen[digest] += 1
        if seen[digest] > len(by_digest.get(digest, ())):
            return f"image '{name}' has step '{image_node}' ({img.nodes[image_node].kind}) that the request does not"
    img_ancestors = img.ancestors()
    leaf_cost = sum(len(img_ancestors[image_node]) for image_node, _ in steps)

    def verdict(paired: dict[str, str]) -> str | None:
        for req_node in paired:
            missing = [a for a in needs[req_node] if a not in paired]
            if missing:
                return (f"image '{name}' ran step '{req_node}' without its predecessor '{sorted(missing)[0]}' "
                        f"(the image is not a prefix of the request)")
        reverse = {image_node: req_node for req_node, image_node in paired.items()}
        for image_node, before in img_ancestors.items():
            later = reverse.get(image_node)
            for earlier in before:
                if earlier in reverse and later is not None and later in req_ancestors[reverse[earlier]]:
                    return (f"image '{name}' ran '{earlier}' before '{image_node}'; "
                            f"the request orders them the other way")
        return None

    chosen: list[str] = []  # chosen[i]: the request action paired with steps[i]
    used: set[str] = set()
    consumed: Counter[str] = Counter()
    reason: str | None = None
    work, limit = 0, None

    def options() -> list[str]:
        free = [n for n in by_digest[steps[len(chosen)][1]] if n not in used]
        return sorted(free, key=lambda n: (not needs[n] <= used, position[n]))

    frames = [options()] if steps else []
    while True:
        if len(chosen) == len(steps):
            paired = {req_node: steps[i][0] for i, req_node in enumerate(chosen)}
            work += leaf_cost + len(needs)
            problem = verdict(paired)
            if problem is None:
                return paired
            reason = reason or problem
        else:
            frame, digest = frames[-1], steps[len(chosen)][1]
            pushed = False
            while frame and (limit is None or work < limit):
                candidate = frame.pop(0)
                work += len(needs[candidate]) + len(frame) + 1
                # A predecessor that no later image step can be paired with: this can never be a prefix.
                lost = sorted(a for a in needs[candidate] if a not in used
                              and total[digest_of[a]] - consumed[digest_of[a]] - (digest_of[a] == digest) <= 0)
                if lost:
                    reason = reason or (f"image '{name}' ran step '{candidate}' without its predecessor '{lost[0]}' "
                                        f"(the image is not a prefix of the request)")
                    continue
                chosen.append(candidate)
                used.add(candidate)
                consumed[digest] += 1
                if len(chosen) < len(steps):
                    frames.append(options())
                pushed = True
                break
            if pushed:
                continue
            frames.pop()
        if limit is None:
            limit = work + SEARCH_BUDGET
        if not chosen or work >= limit:
            assert reason is not None
            return reason
        undone = chosen.pop()
        used.discard(undone)
        consumed[steps[len(chosen)][1]] -= 1


def match_image(request: Dag, image: CachedImage, images: Mapping[str, Dag] | None = None) -> Match | str:
    """A :class:`Match` if ``image`` can serve ``request``, else the reason why not.

    Both DAGs are flattened against ``images`` (the warehouse's lineages)
    first (flattening a flat DAG costs nothing). Raises NoSuchImageError if
    a lineage names an image that ``images`` lacks.
    """
    lineages = dict(images or {})
    lineages.setdefault(image.name, image.dag)
    req = flatten(request, lineages)
    img = flatten(image.dag, lineages)
    want, have = req.start, img.start
    assert isinstance(want, BlankStart) and isinstance(have, BlankStart)
    if want.hardware.arch != have.hardware.arch:
        return f"image '{image.name}' is {have.hardware.arch}; the request wants {want.hardware.arch}"
    if want.hardware.disk < image.hardware.disk:
        return (f"image '{image.name}' has a {image.hardware.disk} GiB disk; "
                f"the request asks for {want.hardware.disk} GiB")
    paired = _pair_steps(req, img, image.name)
    if isinstance(paired, str):
        return paired
    matched = paired
    remaining = tuple(n for n in req.topological_order() if isinstance(req.nodes[n], Action) and n not in matched)
    return Match(image=image.name, matched=matched, remaining=remaining)


def candidates(request: Dag, images: Iterable[CachedImage]) -> tuple[list[Match], dict[str, str]]:
    """Every image that can serve ``request``, and the reason for each that can't.

    Raises NoSuchImageError when the request starts from an image that is
    not among ``images``.
    """
    pool = list(images)
    lineages = {image.name: image.dag for image in pool}
    request = flatten(request, lineages)
    matches: list[Match] = []
    reasons: dict[str, str] = {}
    for image in pool:
        try:
            result = match_image(request, image, lineages)
        except NoSuchImageError as exc:
            reasons[image.name] = exc.message
            continue
        if isinstance(result, Match):
            matches.append(result)
        else:
            reasons[image.name] = result
    return matches, reasons

"""Matching a request DAG against the DAGs that cached images embody.

Lineage first: an image's DAG may start from another image
(``<image name="parent">``); :func:`flatten` replaces such a start with the
parent's own (flattened) DAG, so every lineage starts from a ``<blank>``.
A request is expanded the same way against the warehouse's images.

An image can serve a request (:func:`match_image`) when
- both start from blank hardware of the same architecture, the request's
  disk is at least the image's;
- every step of the image is a step of the request (same digest; a step
  that occurs k times is matched occurrence by occurrence in order);
- each matched step comes with all of its predecessors in the request
  (the image is a prefix of the request), and the image never ran two
  steps in the opposite order of the request's.
The actions left to do are the request's unmatched actions, in the
request's deterministic topological order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .dag import Action, BlankStart, Dag, Edge, Hardware, ImageStart
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


def _with_id(node: object, new_id: str) -> object:
    from dataclasses import replace
    return replace(node, id=new_id)  # type: ignore[type-var]


def _occurrences(dag: Dag) -> dict[tuple[str, int], str]:
    """(digest, k) -> id of the k-th action with that digest in topological order."""
    result: dict[tuple[str, int], str] = {}
    counts: dict[str, int] = {}
    for node_id in dag.topological_order():
        node = dag.nodes[node_id]
        if isinstance(node, Action):
            digest = step_digest(node)
            k = counts.get(digest, 0)
            counts[digest] = k + 1
            result[(digest, k)] = node_id
    return result


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
        return f"image '{image.name}' has a {image.hardware.disk} GiB disk; the request asks for {want.hardware.disk} GiB"
    req_steps = _occurrences(req)
    matched: dict[str, str] = {}
    for key, image_node in _occurrences(img).items():
        if key not in req_steps:
            node = img.nodes[image_node]
            return f"image '{image.name}' has step '{image_node}' ({node.kind}) that the request does not"
        matched[req_steps[key]] = image_node
    ancestors = req.ancestors()
    for req_node in matched:
        missing = [a for a in ancestors[req_node] if isinstance(req.nodes[a], Action) and a not in matched]
        if missing:
            return (f"image '{image.name}' ran step '{req_node}' without its predecessor '{sorted(missing)[0]}' "
                    f"(the image is not a prefix of the request)")
    img_ancestors = img.ancestors()
    reverse = {image_node: req_node for req_node, image_node in matched.items()}
    for image_node, before in img_ancestors.items():
        for earlier in before:
            if earlier in reverse and image_node in reverse and reverse[image_node] in ancestors[reverse[earlier]]:
                return f"image '{image.name}' ran '{earlier}' before '{image_node}'; the request orders them the other way"
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

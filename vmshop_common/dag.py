"""The DAG model: what a VM description says, independent of its XML form.

A :class:`Dag` has exactly one start node (:class:`BlankStart` or
:class:`ImageStart`) and configuration actions (:class:`ScriptAction`,
:class:`FileAction`, :class:`NetworkAction`, :class:`MountAction`), ordered
by edges. Nodes remember the line they came from so errors can name it.
Building a :class:`Dag` checks nothing; :mod:`vmshop_common.rules` does.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

DEFAULT_TIMEOUT = 300
ACTION_KINDS = ("script", "file", "network", "mount")


@dataclass(frozen=True)
class Hardware:
    """Virtual hardware: memory in MiB, disk in GiB."""

    memory: int
    vcpus: int = 1
    disk: int = 1
    arch: str = "x86_64"


@dataclass(frozen=True)
class Node:
    """A node of the DAG. ``line`` is where it was written, if it came from XML."""

    id: str
    line: int | None = field(default=None, compare=False)

    kind = "node"
    is_start = False


@dataclass(frozen=True)
class BlankStart(Node):
    """Start node: a blank VM with this hardware.

    ``cloud_config`` (both start nodes): the cloud-init user data of the VM's
    first boot, normalised (the indentation XML adds removed), or None. It is
    the VM's own, never a step: it takes no part in matching or step digests.
    """

    hardware: Hardware = Hardware(memory=128)
    cloud_config: str | None = None

    kind = "blank"
    is_start = True


@dataclass(frozen=True)
class ImageStart(Node):
    """Start node: a clone of the cached image with this unique name."""

    name: str = ""
    memory: int | None = None
    vcpus: int | None = None
    cloud_config: str | None = None

    kind = "image"
    is_start = True


@dataclass(frozen=True)
class Action(Node):
    """A configuration step run inside the guest. ``cost`` is the DAG's hint in seconds."""

    cost: float | None = None

    @property
    def timeout(self) -> int:
        return DEFAULT_TIMEOUT


@dataclass(frozen=True)
class ScriptAction(Action):
    interpreter: str = "/bin/sh"
    body: str = ""
    script_timeout: int = DEFAULT_TIMEOUT

    kind = "script"

    @property
    def timeout(self) -> int:
        return self.script_timeout


@dataclass(frozen=True)
class FileAction(Action):
    path: str = "/"
    mode: int = 0o644
    content: str = ""

    kind = "file"


@dataclass(frozen=True)
class NetworkAction(Action):
    """An address on the plant's host-only segment: ``mode`` 'pool' or 'static'."""

    mode: str = "pool"
    address: str | None = None
    prefix: int = 24
    gateway: str | None = None
    hostname: str | None = None

    kind = "network"


@dataclass(frozen=True)
class MountAction(Action):
    """Application data ``source`` (a name in the plant's data store) mounted at ``target``."""

    source: str = ""
    target: str = "/"
    readonly: bool = True

    kind = "mount"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int | None = field(default=None, compare=False)


@dataclass
class Dag:
    """A VM description: nodes (in document order), edges and user attributes."""

    nodes: dict[str, Node]
    edges: list[Edge] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    description: str | None = None

    @property
    def start_nodes(self) -> list[Node]:
        return [node for node in self.nodes.values() if node.is_start]

    @property
    def start(self) -> BlankStart | ImageStart:
        """The start node (the rules guarantee there is exactly one)."""
        starts = self.start_nodes
        if len(starts) != 1:
            raise ValueError(f"the DAG has {len(starts)} start nodes")
        node = starts[0]
        assert isinstance(node, (BlankStart, ImageStart))
        return node

    @property
    def actions(self) -> list[Action]:
        return [node for node in self.nodes.values() if isinstance(node, Action)]

    def successors(self) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {node_id: [] for node_id in self.nodes}
        for edge in self.edges:
            if edge.source in result and edge.target in self.nodes:
                result[edge.source].append(edge.target)
        return result

    def predecessors(self) -> dict[str, list[str]]:
        result: dict[str, list[str]] = {node_id: [] for node_id in self.nodes}
        for edge in self.edges:
            if edge.target in result and edge.source in self.nodes:
                result[edge.target].append(edge.source)
        return result

    def ancestors(self) -> dict[str, set[str]]:
        """Every node's transitive predecessors (the DAG must be acyclic)."""
        preds = self.predecessors()
        result: dict[str, set[str]] = {}
        for node_id in self.topological_order():
            found: set[str] = set()
            for parent in preds[node_id]:
                found.add(parent)
                found |= result[parent]
            result[node_id] = found
        return result

    def topological_order(self, among: Iterable[str] | None = None) -> list[str]:
        """Node ids in a deterministic topological order.

        Among nodes that are ready at the same time, the one that comes first
        in the document goes first. With ``among``, only those nodes are
        ordered (edges through other nodes still constrain them via the
        transitive order of the whole graph). Raises ValueError on a cycle.
        """
        position = {node_id: index for index, node_id in enumerate(self.nodes)}
        succ = self.successors()
        indegree = {node_id: 0 for node_id in self.nodes}
        for targets in succ.values():
            for target in targets:
                indegree[target] += 1
        ready = [(position[n], n) for n, degree in indegree.items() if degree == 0]
        heapq.heapify(ready)
        order: list[str] = []
        while ready:
            _, node_id = heapq.heappop(ready)
            order.append(node_id)
            for target in succ[node_id]:
                indegree[target] -= 1
                if indegree[target] == 0:
                    heapq.heappush(ready, (position[target], target))
        if len(order) != len(self.nodes):
            raise ValueError("the DAG has a cycle")
        if among is None:
            return order
        wanted = set(among)
        return [node_id for node_id in order if node_id in wanted]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

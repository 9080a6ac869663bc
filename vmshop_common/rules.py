"""Rules of the DAG that XSD can't express, checked in code.

:func:`check_dag` collects every problem it finds and raises one
:class:`~vmshop_common.errors.DagInvalidError` naming each (line and node):

- exactly one start node (``blank`` or ``image``);
- nothing comes before the start node (it has no incoming edge);
- no cycle (the nodes of each cycle are named in order);
- every node is reachable from the start node;
- no edge from a node to itself, no repeated edge;
- a static network action has an address; paths in the guest have no
  ``..`` segment;
- a start node's ``<cloud-config>`` begins with the line ``#cloud-config``
  (cloud-init takes anything else for another kind of user data: a script,
  an include list, ...).
"""

from __future__ import annotations

from .dag import BlankStart, Dag, FileAction, ImageStart, MountAction, NetworkAction
from .errors import AddressNotLeasedError, DagInvalidError, Problem


def check_dag(dag: Dag, what: str = "DAG") -> None:
    """Raise :class:`DagInvalidError` listing every rule ``dag`` breaks."""
    problems = find_problems(dag)
    if problems:
        first = problems[0]
        raise DagInvalidError(f"{what} is invalid: {first.message}", problems)


def find_problems(dag: Dag) -> list[Problem]:
    """Every rule ``dag`` breaks, in a stable order (empty when it is valid)."""
    problems: list[Problem] = []
    starts = dag.start_nodes
    if not starts:
        problems.append(Problem("the DAG has no start node (a <blank> or an <image>)", None, None))
    for extra in starts[1:]:
        problems.append(Problem(f"a second start node; the first is '{starts[0].id}' (exactly one is allowed)",
                                extra.line, extra.id))
    seen_edges: set[tuple[str, str]] = set()
    for edge in dag.edges:
        if edge.source == edge.target:
            problems.append(Problem(f"edge from '{edge.source}' to itself", edge.line, edge.source))
        elif (edge.source, edge.target) in seen_edges:
            problems.append(Problem(f"edge from '{edge.source}' to '{edge.target}' is repeated",
                                    edge.line, edge.target))
        seen_edges.add((edge.source, edge.target))
        for end in (edge.source, edge.target):
            if end not in dag.nodes:
                problems.append(Problem(f"edge names node '{end}', which does not exist", edge.line, end))
        target = dag.nodes.get(edge.target)
        if target is not None and target.is_start and edge.source in dag.nodes:
            problems.append(
                Problem(f"edge from '{edge.source}' into start node '{edge.target}': "
                        "actions come only after the start node", edge.line, edge.target)
            )
    for cycle in find_cycles(dag):
        node = dag.nodes[cycle[0]]
        problems.append(Problem("cycle: " + " -> ".join(cycle + [cycle[0]]), node.line, node.id))
    if len(starts) == 1:
        reachable = _reachable(dag, starts[0].id)
        for node in dag:
            if node.id not in reachable:
                problems.append(Problem(f"node is not reachable from start node '{starts[0].id}'", node.line, node.id))
    for node in dag:
        problems.extend(_node_problems(node))
    return problems


def find_cycles(dag: Dag) -> list[list[str]]:
    """One cycle per strongly connected component that has one, each in edge order."""
    succ = dag.successors()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in dag.nodes:
        if root in index:
            continue
        # Iterative Tarjan: (node, iterator over its successors).
        work = [(root, iter(succ[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(succ[child])))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_cycle_in(set(component), succ, dag) for component in components]


def _cycle_in(members: set[str], succ: dict[str, list[str]], dag: Dag) -> list[str]:
    """A simple cycle through the component's first node (in document order)."""
    first = next(node_id for node_id in dag.nodes if node_id in members)
    # Breadth-first search back to ``first`` inside the component gives a shortest cycle.
    parents: dict[str, str] = {}
    frontier = [first]
    while frontier:
        following = []
        for node in frontier:
            for child in succ[node]:
                if child not in members or child == node:
                    continue  # a self edge is a problem of its own, not the cycle through the component
                if child == first:
                    path = [node]
                    while path[-1] != first:
                        path.append(parents[path[-1]])
                    return list(reversed(path))
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    return [first]


def _reachable(dag: Dag, start: str) -> set[str]:
    succ = dag.successors()
    seen = {start}
    todo = [start]
    while todo:
        for child in succ[todo.pop()]:
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


#: The first line cloud-init requires of cloud-config user data.
CLOUD_CONFIG_HEADER = "#cloud-config"


def _node_problems(node: object) -> list[Problem]:
    problems = []
    if isinstance(node, (BlankStart, ImageStart)) and node.cloud_config is not None:
        first = node.cloud_config.split("\n", 1)[0].rstrip()
        if first != CLOUD_CONFIG_HEADER:
            problems.append(Problem(f"a <cloud-config> begins with the line '{CLOUD_CONFIG_HEADER}', not "
                                    f"'{first[:40]}'", node.line, node.id))
    if isinstance(node, NetworkAction) and node.mode == "static" and not node.address:
        problems.append(Problem("a static network action needs an address", node.line, node.id))
    if isinstance(node, NetworkAction) and node.mode == "pool" and node.address:
        problems.append(Problem("a pool network action takes its address from the plant; remove 'address'",
                                node.line, node.id))
    for attribute in ("path", "target"):
        if isinstance(node, (FileAction, MountAction)) and hasattr(node, attribute):
            value = getattr(node, attribute)
            if ".." in value.split("/"):
                problems.append(Problem(f"{attribute} '{value}' has a '..' segment", node.line, node.id))
            if not [segment for segment in value.split("/") if segment not in ("", ".")]:
                problems.append(Problem(f"{attribute} '{value}' is the root directory", node.line, node.id))
    return problems


def check_static_addresses(dag: Dag, lease: str | None, what: str = "DAG") -> None:
    """Refuse a static network action whose address is not ``lease``, the VM's own pool address.

    A VM keeps the address it was leased on its owner's segment: a static
    address that is not its lease could take over a neighbour's. A VM
    being created has no lease yet (``lease`` None), so there every static
    address is refused: ask for ``mode="pool"`` instead. Raises
    :class:`AddressNotLeasedError` naming each such action.
    """
    problems = [
        Problem(f"static address {node.address} is not this VM's lease"
                + (f" ({lease})" if lease else " (a new VM has none yet: use mode=\"pool\")"), node.line, node.id)
        for node in dag.nodes.values()
        if isinstance(node, NetworkAction) and node.mode == "static" and node.address != lease]
    if problems:
        raise AddressNotLeasedError(f"{what}: {problems[0].message}", problems)

"""What a picture or a matrix shows: the edges a ``--show`` filter keeps, with workloads
that are treated alike merged into one box.

Two nodes are merged when they are in the same namespace, of the same kind, and every
edge from and to them is the same once merged nodes are one (partition refinement, as
for bisimulation): bookinfo's reviews-v1, -v2 and -v3 share a service account and a
Service, so policy treats them alike and they become one box ``reviews-v1, -v2, -v3``.
A mesh where deny-by-default pairs would dominate collapses to the few distinct ones.
Pure.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

from trustmesh.graph.model import Edge, EdgeVerdict, MeshGraph, Node, NodeKind


class Show(enum.Enum):
    ALL = "all"
    ALLOWED = "allowed"  # allowed, conditional and unsupported: whatever may get through
    DENIED = "denied"

    def keeps(self, verdict: EdgeVerdict) -> bool:
        if self is Show.ALL:
            return True
        if self is Show.DENIED:
            return verdict is EdgeVerdict.DENIED
        return verdict is not EdgeVerdict.DENIED


@dataclass(frozen=True, slots=True)
class Group:
    id: str
    members: tuple[Node, ...]

    @property
    def kind(self) -> NodeKind:
        return self.members[0].kind

    @property
    def namespace(self) -> str | None:
        return self.members[0].namespace

    @property
    def label(self) -> str:
        names = [m.name for m in self.members]
        if len(names) == 1:
            return self.members[0].name if self.kind is NodeKind.WORKLOAD else _pseudo(self)
        return ", ".join(names)

    @property
    def short_label(self) -> str:
        """For a matrix column: the shared Service name with a count, else the first name
        with how many more (``reviews (3)``, ``httpbin +2``)."""
        if len(self.members) == 1:
            return self.label
        services = {m.services for m in self.members}
        if len(services) == 1 and len(next(iter(services))) == 1:
            service = next(iter(services))[0].split("/", 1)[1]
            return f"{service} ({len(self.members)})"
        return f"{self.members[0].name} +{len(self.members) - 1}"

    @property
    def accounts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.service_account for m in self.members if m.service_account))


def _pseudo(group: Group) -> str:
    if group.kind is NodeKind.NAMESPACE:
        return f"any other workload in {group.namespace}"
    return "outside the mesh (plaintext)"


@dataclass(frozen=True, slots=True)
class GroupEdge:
    """An edge between two groups; ``count`` member pairs share it."""

    source: str
    destination: str
    edge: Edge  # one representative: everything but the endpoints is shared
    count: int


@dataclass(frozen=True, slots=True)
class GroupedGraph:
    groups: tuple[Group, ...]
    edges: tuple[GroupEdge, ...]

    def group(self, group_id: str) -> Group:
        return next(g for g in self.groups if g.id == group_id)


def filtered(graph: MeshGraph, show: Show) -> MeshGraph:
    return MeshGraph(graph.nodes, tuple(e for e in graph.edges if show.keeps(e.verdict)))


def edge_key(edge: Edge) -> tuple[object, ...]:
    """Everything about an edge but its endpoints."""
    return (
        edge.port,
        edge.service_port,
        edge.protocol,
        edge.verdict,
        edge.outcome,
        edge.mtls,
        edge.rules,
        edge.conditions.describe() if edge.conditions else "",
    )


def grouped(graph: MeshGraph, *, merge: bool = True) -> GroupedGraph:
    """``graph`` with alike nodes merged (``merge=False``: one group per node)."""
    nodes = list(graph.nodes)
    block = _refine(graph) if merge else {n.id: i for i, n in enumerate(nodes)}
    members: dict[int, list[Node]] = defaultdict(list)
    for n in nodes:
        members[block[n.id]].append(n)
    groups = [Group(ms[0].id, tuple(ms)) for ms in members.values()]
    group_of = {n.id: g.id for g in groups for n in g.members}
    counted: dict[tuple[object, ...], list[Edge]] = defaultdict(list)
    for e in graph.edges:
        key = (group_of[e.source], group_of[e.destination], *edge_key(e))
        counted[key].append(e)
    edges = [
        GroupEdge(group_of[es[0].source], group_of[es[0].destination], es[0], len(es))
        for es in counted.values()
    ]
    order = {n.id: i for i, n in enumerate(nodes)}
    groups.sort(key=lambda g: order[g.id])
    edges.sort(key=lambda ge: (order[ge.source], order[ge.destination], ge.edge.port))
    return GroupedGraph(tuple(groups), tuple(edges))


def _refine(graph: MeshGraph) -> dict[str, int]:
    """Blocks of nodes no edge tells apart: start from (kind, namespace, dataplane) and
    split by the edges to and from each block until nothing splits any more."""
    out_edges: dict[str, list[Edge]] = defaultdict(list)
    in_edges: dict[str, list[Edge]] = defaultdict(list)
    for e in graph.edges:
        out_edges[e.source].append(e)
        in_edges[e.destination].append(e)
    keys = {id(e): edge_key(e) for e in graph.edges}
    block = _numbered({n.id: (n.kind.value, n.namespace or "", n.dataplane) for n in graph.nodes})
    while True:
        signatures = {
            node: (
                current,
                frozenset((block[e.destination], keys[id(e)]) for e in out_edges[node]),
                frozenset((block[e.source], keys[id(e)]) for e in in_edges[node]),
            )
            for node, current in block.items()
        }
        refined = _numbered(signatures)
        if len(set(refined.values())) == len(set(block.values())):
            return refined
        block = refined


def _numbered(keys: Mapping[str, Hashable]) -> dict[str, int]:
    numbers: dict[Hashable, int] = {}
    return {node: numbers.setdefault(key, len(numbers)) for node, key in keys.items()}


__all__ = ["Group", "GroupEdge", "GroupedGraph", "Show", "filtered", "grouped"]

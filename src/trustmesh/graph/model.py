"""The values of a mesh graph: nodes (who can call), edges (what the evaluator decides for a
source → destination:port), and the conditions of a conditional edge.

Everything here is a frozen value with a JSON form (:meth:`MeshGraph.as_dict`); the JSON
schema is ``trustmesh.graph/v1`` (README, "trustmesh graph"). Building the graph is
:mod:`trustmesh.graph.build`; drawing it is :mod:`trustmesh.graph.render`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from trustmesh.policy.request import Attributes

SCHEMA = "trustmesh.graph/v1"


class NodeKind(enum.Enum):
    WORKLOAD = "workload"  # a workload of the inputs (Deployment, Pod, WorkloadEntry, …)
    NAMESPACE = "namespace"  # any other workload (a fresh service account) in a namespace
    EXTERNAL = "external"  # a client outside the mesh: plaintext, no identity


class EdgeVerdict(enum.Enum):
    ALLOWED = "allowed"  # every request on this port is allowed
    DENIED = "denied"  # no request on this port is allowed (denied, reset, …)
    CONDITIONAL = "conditional"  # allowed only for some methods / paths / headers / JWTs / IPs
    UNSUPPORTED = "unsupported"  # trustmesh cannot decide it exactly (waypoint, gateway)


@dataclass(frozen=True, slots=True)
class Node:
    """A source or destination. ``id`` is ``NS/NAME`` for workloads, ``NS/*`` for "any
    other workload in NS", ``external`` for a client outside the mesh."""

    id: str
    kind: NodeKind
    namespace: str | None
    name: str
    service_account: str | None
    principal: str | None  # mTLS identity it presents (None: plaintext / no sidecar)
    dataplane: str  # sidecar | ambient | gateway | none | unknown | external
    services: tuple[str, ...] = ()  # Services selecting it (NS/NAME)

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kind": self.kind.value,
            "namespace": self.namespace,
            "workload": self.name,
            "sa": self.service_account,
            "principal": self.principal,
            "dataplane": self.dataplane,
            "services": list(self.services),
        }


@dataclass(frozen=True, slots=True)
class Atom:
    """One request attribute a rule constrains: ``method GET``, ``path not /admin*``,
    ``header x-token admin``, ``JWT claim groups group1``. ``values`` are OR'd as Istio
    writes them (``x*`` prefix, ``*x`` suffix, ``*`` any); ``negated`` is a ``notX``
    field or ``notValues``. ``test`` is the compiled check it was read from."""

    attribute: str  # method | path | host | header NAME | request principal | JWT claim C | …
    location: str  # where it is written: ``to[0].operation.methods``, ``when[request.headers[x]]``
    values: tuple[str, ...]
    negated: bool
    test: Callable[[Attributes], bool] = field(compare=False, repr=False, hash=False)

    def describe(self) -> str:
        shown = " | ".join(self.values)
        return f"{self.attribute} {'not ' if self.negated else ''}{shown}"

    def as_dict(self) -> dict[str, object]:
        return {
            "attribute": self.attribute,
            "field": self.location,
            "values": list(self.values),
            "negated": self.negated,
            "text": self.describe(),
        }


@dataclass(frozen=True, slots=True)
class Clause:
    """Atoms that must all hold (an AND), from one rule (``ns[..]-policy[..]-rule[..]``)."""

    rule: str
    atoms: tuple[Atom, ...]

    def describe(self) -> str:
        return " and ".join(a.describe() for a in self.atoms) or "any request"

    def as_dict(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "atoms": [a.as_dict() for a in self.atoms],
            "text": self.describe(),
        }


@dataclass(frozen=True, slots=True)
class Example:
    """A request the evaluator decided for this edge: the proof of a conditional verdict."""

    request: str  # ``GET /api (header x-token: admin)``
    verdict: str  # the evaluator's verdict: allow, deny, reset, unauthenticated, …
    rule: str | None

    def as_dict(self) -> dict[str, object]:
        return {"request": self.request, "verdict": self.verdict, "rule": self.rule}


@dataclass(frozen=True, slots=True)
class Conditions:
    """When a conditional edge allows: a request matching any ``allow_when`` clause (or any
    request, when it is empty) and no ``deny_when`` clause. ``external`` names CUSTOM
    providers that are asked first. The examples were decided by the evaluator."""

    allow_when: tuple[Clause, ...] = ()
    deny_when: tuple[Clause, ...] = ()
    external: tuple[Clause, ...] = ()
    examples: tuple[Example, ...] = ()
    note: str = ""

    def describe(self) -> str:
        parts = []
        if self.allow_when:
            parts.append("only if " + " or ".join(f"({c.describe()})" for c in self.allow_when))
        if self.deny_when:
            parts.append("unless " + " or ".join(f"({c.describe()})" for c in self.deny_when))
        if self.external:
            providers = ", ".join(c.rule for c in self.external)
            parts.append(f"and the external authorizer allows ({providers})")
        return "; ".join(parts)

    def short(self) -> str:
        """A label for a picture: ``GET``, ``path /api*``, ``not DELETE``."""
        allow = [c.describe() for c in self.allow_when]
        deny = [f"not ({c.describe()})" for c in self.deny_when]
        external = ["ext_authz"] if self.external else []
        return "; ".join([*allow, *deny, *external])

    def as_dict(self) -> dict[str, object]:
        return {
            "allow_when": [c.as_dict() for c in self.allow_when],
            "deny_when": [c.as_dict() for c in self.deny_when],
            "external": [c.as_dict() for c in self.external],
            "examples": [e.as_dict() for e in self.examples],
            "text": self.describe(),
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class Edge:
    """source → destination on one port of the destination (its target port; the Service
    port a client dials is ``service_port``)."""

    source: str
    destination: str
    port: int
    service: str | None  # NS/NAME of the Service it is reached through, if any
    service_port: int | None
    protocol: str  # http | tcp
    verdict: EdgeVerdict
    outcome: str  # the evaluator's verdict for the plain request (allow, deny, reset, …)
    reason: str
    rules: tuple[str, ...]  # the deciding rule(s): Envoy policy names
    mtls: bool | None  # None: not decided here (ztunnel HBONE, unsupported)
    tls: str  # why mTLS or plaintext (PeerAuthentication, DestinationRule, auto mTLS)
    mtls_mode: str | None  # the destination port's effective PeerAuthentication mode
    conditions: Conditions | None = None
    assumptions: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "src": self.source,
            "dst": self.destination,
            "port": self.port,
            "service": self.service,
            "service_port": self.service_port,
            "protocol": self.protocol,
            "verdict": self.verdict.value,
            "outcome": self.outcome,
            "reason": self.reason,
            "rules": list(self.rules),
            "mtls": self.mtls,
            "tls": self.tls,
            "mtls_mode": self.mtls_mode,
            "conditions": self.conditions.as_dict() if self.conditions else None,
            "assumptions": list(self.assumptions),
        }


@dataclass(frozen=True, slots=True)
class MeshGraph:
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]

    def node(self, node_id: str) -> Node | None:
        return next((n for n in self.nodes if n.id == node_id), None)

    def as_dict(self) -> dict[str, object]:
        counts = {v.value: 0 for v in EdgeVerdict}
        for edge in self.edges:
            counts[edge.verdict.value] += 1
        return {
            "schema": SCHEMA,
            "nodes": [n.as_dict() for n in self.nodes],
            "edges": [e.as_dict() for e in self.edges],
            "summary": counts,
        }

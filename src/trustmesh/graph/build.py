"""Who may talk to whom: every source → destination:port, decided by the evaluator.

For each pair the plain request (``GET /`` with the Service's Host, or a TCP connection on
a TCP port) is decided by :func:`trustmesh.policy.evaluate.evaluate` — the pipeline of
``trustmesh authz check``. Where that request reaches the destination's authorization
filters, the rules that apply there are read for this connection
(:mod:`trustmesh.graph.residual`): a rule whose source side can never match this peer
drops out, one that matches every request decides alone, and one that depends on what the
client sends (method, path, host, headers, JWT, X-Forwarded-For, an unknown source
address) makes the edge conditional, with those conditions. A conditional edge carries
example requests the evaluator allowed and denied, so the conditions are shown, not
guessed. Pure: no I/O, the clock is passed in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trustmesh.api.dataplane import MeshMode
from trustmesh.api.snapshot import Service, Workload
from trustmesh.graph.model import (
    Clause,
    Conditions,
    Edge,
    EdgeVerdict,
    Example,
    MeshGraph,
    Node,
    NodeKind,
)
from trustmesh.graph.residual import Residual
from trustmesh.graph.witness import Examples, allowed
from trustmesh.policy.client_routes import RouteKind, sidecar_client_route
from trustmesh.policy.client_tls import ClientTls, client_tls
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.decision import Decision, RequestError, Verdict
from trustmesh.policy.endpoints import service_for
from trustmesh.policy.evaluate import custom_rule_name, evaluate
from trustmesh.policy.jwt import JwtProvider
from trustmesh.policy.protocols import proxied_as_tcp
from trustmesh.policy.request import Attributes, HttpRequest, IpAddress, Request, Source
from trustmesh.policy.targets import named_ports
from trustmesh.policy.ztunnel_eval import ambient_source_tls

EXTERNAL_ID = "external"
# The service account "any other workload of a namespace" stands for: one no input uses.
OTHER_ACCOUNT = "trustmesh-graph-other"
MAX_EXAMPLES = 3


@dataclass(frozen=True, slots=True)
class PortEntry:
    """A port of a destination a client can dial: its target port, and the Service port
    it is reached through (None: the pod's own port, no Service covers it)."""

    port: int
    service: Service | None
    service_port: int | None
    protocol: str  # http | tcp

    @property
    def host(self) -> str | None:
        if self.service is None or self.service_port is None:
            return None
        return f"{self.service.name}.{self.service.namespace}:{self.service_port}"


@dataclass(frozen=True, slots=True)
class _Caller:
    node: Node
    source: Source
    workload: Workload | None


def build_graph(
    mesh: MeshPolicy,
    *,
    now: float,
    extra_sources: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> MeshGraph:
    """The graph of ``mesh``. ``extra_sources`` adds a client outside the mesh
    (plaintext) and, per namespace, "any other workload" (an identity no policy names by
    service account). ``progress`` is told ``(done, total)`` destinations."""
    workloads = running_workloads(mesh)
    td = mesh.snapshot.mesh.trust_domain
    nodes = [workload_node(mesh, w, td) for w in workloads]
    callers = [_Caller(n, Source.workload(w.ref), w) for n, w in zip(nodes, workloads, strict=True)]
    if extra_sources:
        for namespace in sorted({w.namespace for w in workloads}):
            principal = f"{td}/ns/{namespace}/sa/{OTHER_ACCOUNT}"
            node = Node(
                f"{namespace}/*",
                NodeKind.NAMESPACE,
                namespace,
                "*",
                OTHER_ACCOUNT,
                principal,
                "sidecar",
            )
            nodes.append(node)
            callers.append(_Caller(node, Source.principal(principal), None))
        external = Node(
            EXTERNAL_ID, NodeKind.EXTERNAL, None, "outside the mesh", None, None, "external"
        )
        nodes.append(external)
        callers.append(_Caller(external, Source.plaintext(), None))
    examples = Examples(mesh, now)
    edges: list[Edge] = []
    for done, destination in enumerate(workloads):
        target = mesh.for_workload(destination.ref)
        if target is not None:
            for entry in destination_ports(target):
                for caller in callers:
                    if caller.workload is not None and caller.workload.ref == destination.ref:
                        continue
                    edges.append(_edge(mesh, examples, caller, target, entry, now))
        if progress is not None:
            progress(done + 1, len(workloads))
    edges.sort(key=lambda e: (e.source, e.destination, e.port))
    return MeshGraph(tuple(nodes), tuple(edges))


def running_workloads(mesh: MeshPolicy) -> list[Workload]:
    """One workload per NS/NAME; a Deployment whose Pods are among the inputs is left to
    them (the running pods are what a request reaches), as ``authz check --to`` does."""
    seen: dict[str, Workload] = {}
    for w in mesh.snapshot.workloads:
        seen.setdefault(w.ref, w)
    pods = [w for w in seen.values() if w.kind == "Pod"]

    def has_pods(controller: Workload) -> bool:
        return any(
            p.namespace == controller.namespace
            and p.service_account == controller.service_account
            and controller.labels.items() <= p.labels.items()
            for p in pods
        )

    kept = [w for w in seen.values() if w.kind in ("Pod", "WorkloadEntry") or not has_pods(w)]
    return sorted(kept, key=lambda w: (w.namespace, w.name))


def workload_node(mesh: MeshPolicy, workload: Workload, trust_domain: str) -> Node:
    mode = workload.dataplane.mode
    proxied = mode in (MeshMode.SIDECAR, MeshMode.GATEWAY, MeshMode.AMBIENT)
    policy = mesh.for_workload(workload.ref)
    services = tuple(f"{s.namespace}/{s.name}" for s in policy.services) if policy else ()
    return Node(
        workload.ref,
        NodeKind.WORKLOAD,
        workload.namespace,
        workload.name,
        workload.service_account,
        workload.principal(trust_domain) if proxied else None,
        mode.value,
        services,
    )


def destination_ports(target: WorkloadPolicy) -> list[PortEntry]:
    """The ports the destination serves: every port of every Service selecting it
    (named target ports resolved), else its own declared ports."""
    named = dict(named_ports(target.workload))
    entries: dict[tuple[int, str | None, int | None], PortEntry] = {}
    for service in target.services:
        for sp in service.ports:
            if isinstance(sp.target_port, str):
                resolved = named.get(sp.target_port)
                if resolved is None:
                    continue  # the Service reaches no port of this workload
                port = resolved
            else:
                port = sp.target_port if sp.target_port is not None else sp.port
            protocol = "tcp" if proxied_as_tcp(sp.name, sp.protocol) else "http"
            key = (port, f"{service.namespace}/{service.name}", sp.port)
            entries.setdefault(key, PortEntry(port, service, sp.port, protocol))
    if not entries:
        for port in sorted(set(target.workload.ports)):
            entries[(port, None, None)] = PortEntry(port, None, None, "http")
    return sorted(entries.values(), key=lambda e: (e.port, e.service_port or 0))


def _edge(
    mesh: MeshPolicy,
    examples: Examples,
    caller: _Caller,
    target: WorkloadPolicy,
    entry: PortEntry,
    now: float,
) -> Edge:
    is_http = entry.protocol == "http"
    host = entry.host or f"{target.workload.name}.{target.workload.namespace}:{entry.port}"
    http = HttpRequest("GET", "/", host) if is_http else None
    request = Request(caller.source, target.workload.ref, entry.port, http)
    service = f"{entry.service.namespace}/{entry.service.name}" if entry.service else None
    where = (caller.node.id, target.workload.ref, entry.port, service, entry.service_port)
    try:
        decision = evaluate(mesh, request, now=now)
    except RequestError as exc:
        return Edge(
            *where,
            protocol=entry.protocol,
            verdict=EdgeVerdict.UNSUPPORTED,
            outcome="error",
            reason=str(exc),
            rules=(),
            mtls=None,
            tls="",
            mtls_mode=None,
        )
    destination = target.workload.dataplane.mode
    mode = target.mtls.for_port(entry.port).mode.value if destination is MeshMode.SIDECAR else None
    tls = _client_tls(mesh, caller, target, entry, host if is_http else None)
    mtls: bool | None = tls.mtls if tls is not None else None
    tls_text = tls.explanation if tls is not None else ""
    if destination is not MeshMode.SIDECAR:
        if destination is MeshMode.AMBIENT:
            mtls, tls_text = None, "ambient destination: ztunnel (HBONE) decides the connection"
        else:
            mtls = False
            tls_text = tls_text if destination is MeshMode.GATEWAY else "destination has no sidecar"
    verdict = _plain_verdict(decision)
    conditions: Conditions | None = None
    rules: tuple[str, ...] = (decision.rule,) if decision.rule else ()
    reason = decision.reason
    if destination is MeshMode.SIDECAR and _reached_authorization(decision):
        if tls is not None and decision.principal in (None, tls.principal):
            base = _connection(caller, target, entry.port, tls, is_http)
            verdict, conditions, rules, reason = _analyse(
                examples, caller.source, target, entry.port, host, base, decision
            )
        else:  # never seen: say so rather than guess
            reason += " (conditions not analysed: the client's TLS could not be reproduced)"
    return Edge(
        *where,
        protocol=entry.protocol,
        verdict=verdict,
        outcome=decision.verdict.value,
        reason=reason,
        rules=rules,
        mtls=mtls,
        tls=tls_text,
        mtls_mode=mode,
        conditions=conditions,
        assumptions=decision.assumptions,
    )


def _plain_verdict(decision: Decision) -> EdgeVerdict:
    if decision.verdict is Verdict.ALLOW:
        return EdgeVerdict.ALLOWED
    if decision.verdict is Verdict.UNSUPPORTED:
        return EdgeVerdict.UNSUPPORTED
    return EdgeVerdict.DENIED


def _reached_authorization(decision: Decision) -> bool:
    """Did the plain request get as far as the policy filters (not reset by TLS, not
    refused by the client's route, nothing-listens)?"""
    if decision.verdict is Verdict.ALLOW:
        return True
    return decision.verdict is Verdict.DENY and decision.status in (403, None)


def _client_tls(
    mesh: MeshPolicy,
    caller: _Caller,
    target: WorkloadPolicy,
    entry: PortEntry,
    host: str | None,
) -> ClientTls | None:
    """The client's TLS choice, as the evaluator makes it for this request: the route a
    sidecar client takes first (a port no Service covers is passed through in plaintext),
    then ambient / DestinationRule / auto mTLS."""
    source, workload = caller.source, caller.workload
    mode = target.mtls.for_port(entry.port).mode
    try:
        if workload is not None and workload.dataplane.mode is MeshMode.SIDECAR:
            covered = service_for(target, entry.port)[1] is not None
            if host is not None or not covered:
                route = sidecar_client_route(
                    mesh, workload, target, entry.port, host, is_http=entry.protocol == "http"
                )
                if route.kind is RouteKind.PASSTHROUGH:
                    return ClientTls(False, None, None, True, route.explanation)
                if route.kind is not RouteKind.SERVICE:
                    return None
        if workload is not None and workload.dataplane.mode is MeshMode.AMBIENT:
            tls, unsupported = ambient_source_tls(mesh, workload, target, entry.port, mode)
            return None if unsupported is not None else tls
        return client_tls(mesh, source, workload, target, entry.port, mode)
    except RequestError:
        return None


def _ip(value: str | None) -> IpAddress | None:
    if not value:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _connection(
    caller: _Caller, target: WorkloadPolicy, port: int, tls: ClientTls, is_http: bool
) -> Attributes:
    """The connection attributes the destination's filters read for this caller."""
    source_ip = _ip(caller.source.ip or (caller.workload.ip if caller.workload else None))
    return Attributes(
        principal=tls.principal if tls.mtls else None,
        source_ip=source_ip,
        remote_ip=source_ip,
        destination_ip=_ip(target.workload.ip),
        destination_port=port,
        sni=tls.sni,
        is_http=is_http,
    )


def _analyse(
    examples: Examples,
    source: Source,
    target: WorkloadPolicy,
    port: int,
    host: str,
    base: Attributes,
    decision: Decision,
) -> tuple[EdgeVerdict, Conditions | None, tuple[str, ...], str]:
    """Allowed, denied or conditional, from the rules that apply to this connection."""
    authz = target.authz
    is_http = base.is_http
    residual = Residual(base)
    possible = _Possible(target.jwt_providers)
    custom, custom_denies = _custom(examples.mesh, target, residual, is_http)
    custom = [c for c in custom if possible(c)]
    deny = [c for c in residual.clauses(authz.deny.for_protocol(is_http).rules) if possible(c)]
    deny += [c for c in custom_denies if possible(c)]
    allow: list[Clause] | None = None
    if authz.allow.applies:
        allow = [
            c for c in residual.clauses(authz.allow.for_protocol(is_http).rules) if possible(c)
        ]
    note = (
        "some rules had too many from/to combinations; the first ones are shown"
        if residual.truncated
        else ""
    )
    plain_rule = (decision.rule,) if decision.rule else ()

    always_denied = next((c for c in deny if not c.atoms), None)
    if always_denied is not None:
        return EdgeVerdict.DENIED, None, plain_rule or (always_denied.rule,), decision.reason
    if allow is not None:
        # An ALLOW clause that a DENY clause always covers admits nothing.
        allow = [a for a in allow if not any(set(d.atoms) <= set(a.atoms) for d in deny)]
        if not allow:
            policies = ", ".join(f"{p.namespace}/{p.name}" for p in authz.allow.policies)
            reason = f"no ALLOW rule admits this source (ALLOW policies applying: {policies})"
            if deny:
                reason += "; the ALLOW rules that could are covered by DENY rules"
            return EdgeVerdict.DENIED, None, plain_rule, reason
    allow_any = allow is None or any(not a.atoms for a in allow)
    if allow_any and not deny and not custom:
        verdict = EdgeVerdict.ALLOWED if decision.verdict is Verdict.ALLOW else EdgeVerdict.DENIED
        return verdict, None, plain_rule, decision.reason

    allow_when: tuple[Clause, ...] = () if allow_any or allow is None else tuple(allow)
    found: list[Example] = []
    satisfy: Sequence[Clause | None] = allow_when or (None,)
    for clause in satisfy[:MAX_EXAMPLES]:
        example = examples.decide(source, target, port, host, clause, deny, is_http=is_http)
        if example is not None:
            found.append(example)
    if not any(allowed(e) for e in found):
        note = (note + "; " if note else "") + (
            "no request meeting these conditions was found that the evaluator allows"
        )
    plain = Example("GET /" if is_http else "TCP connection", decision.verdict.value, decision.rule)
    found.insert(0, plain)
    if allow_when:  # a request none of the ALLOW clauses admits
        example = examples.decide(source, target, port, host, None, allow_when, is_http=is_http)
        if example is not None:
            found.append(example)
    for clause in deny[:1]:  # a request a DENY clause matches
        example = examples.decide(source, target, port, host, clause, (), is_http=is_http)
        if example is not None:
            found.append(example)
    unique: dict[str, Example] = {}
    for example in found:
        unique.setdefault(example.request, example)
    found = list(unique.values())
    conditions = Conditions(
        allow_when=allow_when,
        deny_when=tuple(deny),
        external=tuple(custom),
        examples=tuple(found),
        note=note,
    )
    rules = tuple(dict.fromkeys(c.rule for c in (*allow_when, *deny, *custom)))
    if allow_any and allow is not None and not allow_when:
        rules = tuple(dict.fromkeys([*plain_rule, *rules]))
    return EdgeVerdict.CONDITIONAL, conditions, rules, "allowed " + conditions.describe()


def _custom(
    mesh: MeshPolicy, target: WorkloadPolicy, residual: Residual, is_http: bool
) -> tuple[list[Clause], list[Clause]]:
    """CUSTOM clauses asking the external authorizer, and those that deny instead: Istio
    turns every CUSTOM rule into a DENY when the provider is not in
    ``meshConfig.extensionProviders`` or when a workload has rules of several providers
    (the evaluator's behaviour, named as Envoy names them)."""
    authz = target.authz
    if not authz.custom.applies:
        return [], []
    rules = authz.custom.for_protocol(is_http).rules
    providers = {p.spec.provider.name for p in authz.custom.policies if p.spec.provider}
    fails_closed = len(providers) > 1 or not providers <= mesh.extension_providers
    named = {r.name: r for r in rules}
    clauses = [
        Clause(custom_rule_name(named[c.rule], configured=not fails_closed), c.atoms)
        for c in residual.clauses(rules)
    ]
    return ([], clauses) if fails_closed else (clauses, [])


class _Possible:
    """Is a clause satisfiable at all? A request principal or JWT claim needs a token some
    RequestAuthentication of the workload validates: without one (or for another issuer)
    the clause never holds (Istio: an ALLOW on ``requestPrincipals`` without a
    RequestAuthentication denies every request)."""

    def __init__(self, providers: Sequence[JwtProvider]) -> None:
        self.issuers = frozenset(p.issuer for p in providers)

    def __call__(self, clause: Clause) -> bool:
        for atom in clause.atoms:
            if atom.negated or not atom.attribute.startswith(("request principal", "JWT ")):
                continue
            if not self.issuers:
                return False
            if atom.attribute.startswith("request principal") and not any(
                "*" in value or value.rpartition("/")[0] in self.issuers for value in atom.values
            ):
                return False
        return True

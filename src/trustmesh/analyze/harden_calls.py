"""What ``harden``'s fixes would break, and the ALLOW policies that keep it working.

An allow-nothing policy (or STRICT mTLS) proposed for a namespace also stops the calls its
own apps make. The calls the inputs imply (:mod:`trustmesh.analyze.implied`) are decided
by the evaluator twice: on the inputs as they are, and with the proposed fixes added. A
call allowed before and not after is listed under the fix that breaks it. For calls a
default-deny denies (not those STRICT resets: a caller without a sidecar has no identity
to allow), one ALLOW policy per called Service admits exactly the callers' service-account
principals on the destination's target ports. The plan is then decided once more: every
kept call must be allowed, and a plaintext client and a mesh identity that is not a
caller must not be — each result is written next to the policy it proves.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.harden import HardenPlan, resource_key
from trustmesh.analyze.implied import ImpliedCall, implied_calls
from trustmesh.api.loader import load_sources
from trustmesh.api.snapshot import Service
from trustmesh.policy.compose import MeshPolicy, compile_mesh
from trustmesh.policy.decision import Decision, RequestError, Verdict
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source

_NOW = 0.0  # no JWT is sent: the clock never matters
KEEP_REASON = "implied calls"


@dataclass(frozen=True, slots=True)
class CallOutcome:
    call: ImpliedCall
    before: Decision | None
    after: Decision | None  # with the plan's fixes
    kept: Decision | None = None  # with the generated ALLOW policies too

    @property
    def broken(self) -> bool:
        return _allowed(self.before) and not _allowed(self.after)


@dataclass(slots=True)
class CallReport:
    outcomes: list[CallOutcome] = field(default_factory=list)
    generated: list[str] = field(default_factory=list)  # keys of the ALLOW policies added
    unkept: list[str] = field(default_factory=list)  # broken calls no policy could keep
    notes: list[str] = field(default_factory=list)
    # (principal, destination, port) of requests recorded in traffic (harden --traffic):
    # an implied call among them is kept for what was recorded, not opened wider
    recorded: frozenset[tuple[str, str, int]] = frozenset()
    trust_domain: str = "cluster.local"
    _principals: dict[str, str] = field(default_factory=dict)

    @property
    def broken(self) -> list[CallOutcome]:
        return [o for o in self.outcomes if o.broken]

    def is_recorded(self, call: ImpliedCall) -> bool:
        """The call's caller was recorded reaching its destination port."""
        principal = self._principals.get(call.source)
        return principal is not None and (principal, call.destination, call.port) in self.recorded


def keep_implied_calls(
    ctx: AnalysisContext,
    plan: HardenPlan,
    *,
    generate: bool,
    recorded: frozenset[tuple[str, str, int]] = frozenset(),
) -> CallReport:
    """Decide the implied calls with and without ``plan``; add ALLOWs to ``plan`` that keep
    the ones it denies (``generate``), and comment every proposed resource with what it
    breaks and every generated one with its proof. ``recorded``: (principal, destination,
    port) of recorded traffic the plan already keeps (``harden --traffic``)."""
    calls, unresolved = implied_calls(ctx)
    td = ctx.snapshot.mesh.trust_domain
    report = CallReport(notes=[u.text for u in unresolved], recorded=recorded, trust_domain=td)
    for call in calls:
        source = ctx.snapshot.workload(call.source)
        if source is not None:
            report._principals[call.source] = source.principal(td)
    if not calls:
        return report
    hardened = _with_plan(ctx, plan.resources)
    report.outcomes = [CallOutcome(c, _decide(ctx.mesh, c), _decide(hardened, c)) for c in calls]
    broken = report.broken
    if not broken:
        return report
    policies = (
        _allow_policies(ctx, plan, [o for o in broken if _denied(o.after)]) if generate else []
    )
    for document, _ in policies:
        key = resource_key(document)
        plan.resources.append(document)
        plan.reasons.setdefault(key, []).append(KEEP_REASON)
        report.generated.append(key)
    kept_mesh = _with_plan(ctx, plan.resources) if policies else hardened
    if policies:
        outcomes = {o.call: o for o in report.outcomes}
        for o in broken:
            outcomes[o.call] = dataclasses.replace(o, kept=_decide(kept_mesh, o.call))
        report.outcomes = [outcomes[c] for c in calls]
    _comment_breakers(ctx, plan, report)
    for document, callers in policies:
        plan.comments[resource_key(document)] = _proof(ctx, kept_mesh, report, document, callers)
    report.unkept = [
        f"{o.call.describe()} ({o.call.destination}:{o.call.port}): {_why(o.kept or o.after)}"
        for o in report.broken
        if generate and not _allowed(o.kept)
    ]
    return report


def _allowed(decision: Decision | None) -> bool:
    return decision is not None and decision.verdict is Verdict.ALLOW


def _denied(decision: Decision | None) -> bool:
    return decision is not None and decision.verdict is Verdict.DENY


def _why(decision: Decision | None) -> str:
    if decision is None:
        return "not decidable offline"
    status = f" {decision.status}" if decision.status else ""
    return f"{decision.verdict.value}{status}: {decision.reason}"


def _decide(mesh: MeshPolicy, call: ImpliedCall, source: Source | None = None) -> Decision | None:
    http = None if call.tcp else HttpRequest("GET", "/", call.host)
    request = Request(source or Source.workload(call.source), call.destination, call.port, http)
    try:
        return evaluate(mesh, request, now=_NOW)
    except RequestError:
        return None


def _with_plan(ctx: AnalysisContext, documents: Iterable[dict[str, Any]]) -> MeshPolicy:
    """The compiled mesh with the plan's resources applied after the inputs' own.

    Mesh-config fragments (the IstioOperator overlay) are left out: they set egress, path
    normalization and auto mTLS, which do not change how an in-mesh GET is decided.
    """
    text = "---\n".join(
        yaml.safe_dump(d, sort_keys=False) for d in documents if d.get("kind") != "IstioOperator"
    )
    loaded = load_sources([("trustmesh-harden.yaml", text.encode())])
    after = max((r.order for r in ctx.snapshot.resources), default=-1) + 1
    added = tuple(dataclasses.replace(r, order=after + r.order) for r in loaded.resources)
    snapshot = dataclasses.replace(ctx.snapshot, resources=(*ctx.snapshot.resources, *added))
    return compile_mesh(snapshot)


def _service(ctx: AnalysisContext, ref: str) -> Service:
    namespace, name = ref.split("/")
    return next(s for s in ctx.snapshot.services if (s.namespace, s.name) == (namespace, name))


def _allow_policies(
    ctx: AnalysisContext, plan: HardenPlan, denied: Sequence[CallOutcome]
) -> list[tuple[dict[str, Any], list[CallOutcome]]]:
    """One ALLOW per called Service: its callers' principals, on the ports they call."""
    td = ctx.snapshot.mesh.trust_domain
    by_service: dict[str, list[CallOutcome]] = defaultdict(list)
    for o in denied:
        by_service[o.call.service].append(o)
    taken = {r.key for r in ctx.snapshot.resources} | {resource_key(d) for d in plan.resources}
    out: list[tuple[dict[str, Any], list[CallOutcome]]] = []
    for ref, outcomes in sorted(by_service.items()):
        service = _service(ctx, ref)
        ports_of: dict[str, set[int]] = defaultdict(set)
        for o in outcomes:
            source = ctx.snapshot.workload(o.call.source)
            if source is not None:
                ports_of[source.principal(td)].add(o.call.port)
        by_ports: dict[tuple[int, ...], list[str]] = defaultdict(list)
        for principal, ports in sorted(ports_of.items()):
            by_ports[tuple(sorted(ports))].append(principal)
        rules = [
            {
                "from": [{"source": {"principals": principals}}],
                "to": [{"operation": {"ports": [str(p) for p in ports]}}],
            }
            for ports, principals in sorted(by_ports.items())
        ]
        name = f"allow-{service.name}-callers"
        suffix = 2
        while f"AuthorizationPolicy/{service.namespace}/{name}" in taken:
            name, suffix = f"allow-{service.name}-callers-{suffix}", suffix + 1
        document = {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": service.namespace},
            "spec": {
                "selector": {"matchLabels": dict(sorted(service.selector.items()))},
                "action": "ALLOW",
                "rules": rules,
            },
        }
        taken.add(resource_key(document))
        out.append((document, outcomes))
    return out


def _in_scope(ctx: AnalysisContext, document: dict[str, Any], outcome: CallOutcome) -> bool:
    """Does the proposed resource apply to the call's destination workload?"""
    workload = ctx.snapshot.workload(outcome.call.destination)
    if workload is None:
        return False
    namespace = (document.get("metadata") or {}).get("namespace", "")
    if namespace not in (workload.namespace, ctx.root_namespace):
        return False
    spec = document.get("spec") or {}
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    return all(workload.labels.get(k) == v for k, v in labels.items())


def _comment_breakers(ctx: AnalysisContext, plan: HardenPlan, report: CallReport) -> None:
    for document in plan.resources:
        key = resource_key(document)
        kind = document.get("kind")
        if key in report.generated or kind not in ("AuthorizationPolicy", "PeerAuthentication"):
            continue
        verdict = Verdict.DENY if kind == "AuthorizationPolicy" else Verdict.RESET
        hit = [
            o
            for o in report.broken
            if o.after is not None and o.after.verdict is verdict and _in_scope(ctx, document, o)
        ]
        if not hit:
            continue
        effect = (
            "denies"
            if verdict is Verdict.DENY
            else "resets (the caller has no sidecar: inject one, or keep the port PERMISSIVE"
            " with portLevelMtls)"
        )
        lines = [f"{effect} {len(hit)} call(s) the inputs imply:"]
        for o in hit:
            if _allowed(o.kept):
                keeper = "kept by an ALLOW below"
            elif report.is_recorded(o.call):
                keeper = "kept for its recorded requests only (--traffic)"
            elif o.kept is None and _denied(o.after) and not report.generated:
                keeper = "not kept: only listed (--list-implied-calls)"
            else:
                keeper = f"NOT kept: {_why(o.kept or o.after)}"
            lines.append(
                f"  {o.call.describe()} → {o.call.destination}:{o.call.port}"
                f" [{o.call.evidence}] ({keeper})"
            )
        plan.comments.setdefault(key, []).extend(lines)
    for document in plan.resources:
        if resource_key(document) in report.generated or not _allow_nothing(document):
            continue
        entries = _uncalled(ctx, document, report)
        if entries:
            plan.comments.setdefault(resource_key(document), []).append(
                "no caller of these is implied by the inputs, so nothing reaches them under"
                f" this policy until an ALLOW names their clients (an ingress gateway?):"
                f" {', '.join(entries)}"
            )


def _allow_nothing(document: dict[str, Any]) -> bool:
    spec = document.get("spec") or {}
    return document.get("kind") == "AuthorizationPolicy" and not spec.get("rules")


def _uncalled(ctx: AnalysisContext, document: dict[str, Any], report: CallReport) -> list[str]:
    """Serving sidecar workloads the policy covers that no implied call reaches."""
    called = {o.call.destination for o in report.outcomes}
    namespace = (document.get("metadata") or {}).get("namespace", "")
    return sorted(
        wp.workload.ref
        for wp in ctx.sidecar_workloads()
        if (wp.workload.ports or wp.services)
        and namespace in (wp.workload.namespace, ctx.root_namespace)
        and wp.workload.ref not in called
    )


def _proof(
    ctx: AnalysisContext,
    mesh: MeshPolicy,
    report: CallReport,
    document: dict[str, Any],
    callers: Sequence[CallOutcome],
) -> list[str]:
    """Evaluator results for the generated policy: its callers allowed, others not."""
    lines = ["keeps these calls (decided with every fix applied):"]
    for o in callers:
        kept = next(x.kept for x in report.outcomes if x.call == o.call)
        lines.append(
            f"  {'allowed' if _allowed(kept) else 'STILL NOT ALLOWED'}: {o.call.describe()}"
            f" → {o.call.destination}:{o.call.port} [{o.call.evidence}]"
        )
    td = ctx.snapshot.mesh.trust_domain
    allowed = {
        p for rule in document["spec"]["rules"] for p in rule["from"][0]["source"]["principals"]
    }
    selector = document["spec"]["selector"]["matchLabels"]
    stranger = next(
        (
            w.principal(td)
            for w in ctx.snapshot.workloads
            if w.principal(td) not in allowed
            and w.namespace == document["metadata"]["namespace"]
            and not all(w.labels.get(k) == v for k, v in selector.items())
        ),
        f"{td}/ns/{document['metadata']['namespace']}/sa/not-a-caller",
    )
    lines.append("and not other sources:")
    for o in {x.call.destination: x for x in callers}.values():
        for label, source in (
            ("plaintext client", Source.plaintext()),
            (stranger, Source.principal(stranger)),
        ):
            decision = _decide(mesh, o.call, source)
            outcome = "denied" if not _allowed(decision) else "ALSO ALLOWED (by another policy)"
            lines.append(
                f"  {outcome}: {label} → {o.call.destination}:{o.call.port} ({_why(decision)})"
            )
    return lines

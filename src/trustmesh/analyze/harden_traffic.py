"""``harden --traffic``: least-privilege ALLOWs from recorded traffic next to the fixes.

The policies :func:`trustmesh.insight.generate.generate_policies` proves on the inputs are
added to the plan (an allow-nothing the plan already proposes for a namespace is not
repeated), then the recorded requests are replayed once more with every proposed resource
applied — STRICT mTLS, other default-denies — so a fix that would still break recorded
traffic is named next to it, not found in production.
"""

from __future__ import annotations

from collections.abc import Sequence

from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.harden import HardenPlan, resource_key
from trustmesh.insight.generate import ProofFailed, generate_policies, prove
from trustmesh.insight.traffic import Observed

__all__ = ["TRAFFIC_REASON", "add_recorded_traffic", "recorded_pairs"]

TRAFFIC_REASON = "recorded traffic"


def _allow_nothing_namespaces(plan: HardenPlan) -> set[str]:
    return {
        str((d.get("metadata") or {}).get("namespace", ""))
        for d in plan.resources
        if d.get("kind") == "AuthorizationPolicy"
        and not (d.get("spec") or {}).get("rules")
        and not (d.get("spec") or {}).get("selector")
        and (d.get("spec") or {}).get("action", "ALLOW") == "ALLOW"
    }


def add_recorded_traffic(
    ctx: AnalysisContext, plan: HardenPlan, observed: Sequence[Observed], now: float
) -> list[str]:
    """Add the proven policies to ``plan``; what the whole plan still breaks (one line per
    recorded request), empty when every recorded request stays allowed.

    Raises :class:`ProofFailed` when no least-privilege policy can be proven on the inputs.
    """
    generated = generate_policies(ctx.snapshot, ctx.mesh, observed, now=now)
    covered = _allow_nothing_namespaces(plan)
    for index, document in enumerate(generated.documents):
        spec = document.get("spec") or {}
        if not spec and document["metadata"]["namespace"] in covered:
            continue
        key = resource_key(document)
        plan.resources.append(document)
        plan.reasons.setdefault(key, []).append(TRAFFIC_REASON)
        plan.comments.setdefault(key, []).extend(generated.comments.get(index, []))
    documents = [d for d in plan.resources if d.get("kind") != "IstioOperator"]
    try:
        prove(ctx.snapshot, documents, generated.proven, now)
    except ProofFailed as exc:
        return [f"with every proposed fix applied: {f}" for f in exc.failures]
    return []


def recorded_pairs(observed: Sequence[Observed]) -> frozenset[tuple[str, str, int]]:
    """(principal, destination, port) of every allowed mTLS request recorded."""
    return frozenset(
        (o.record.source_principal, o.record.destination, o.record.port)
        for o in observed
        if o.record.source_principal and o.verdicts.get("allow")
    )

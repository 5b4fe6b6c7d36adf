"""AuthorizationPolicies the cluster reports as not (fully) enforced (TM-AMBIENT-002).

In a cluster dump istiod's verdict on each policy is in ``status.conditions``: ztunnel or a
waypoint refusing a policy (``ZtunnelAccepted`` / ``WaypointAccepted`` False), or a waypoint
applying only part of it (``PartiallyInvalid``). The YAML says one thing, the data plane
enforces another; trustmesh's own verdicts follow the YAML, so the difference is reported.
"""

from __future__ import annotations

from collections.abc import Iterator

from trustmesh.analyze.checks.raw_objects import items, mapping, raw_objects
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule

_ENFORCERS = {"ZtunnelAccepted": "ztunnel", "WaypointAccepted": "the waypoint", "Accepted": ""}


@rule(
    "TM-AMBIENT-002",
    title="AuthorizationPolicy the cluster reports as not enforced",
    severity=Severity.ERROR,
    family="ambient",
    rationale="istiod writes into an AuthorizationPolicy's status when ztunnel or a waypoint "
    "cannot enforce it (an unsupported action or field, a targetRef that does not resolve): "
    "the requests the policy was written to deny or restrict are not handled as written.",
)
def policy_not_accepted(ctx: AnalysisContext) -> Iterator[Issue]:
    kinds = ("security.istio.io",)
    for policy in raw_objects(ctx, "AuthorizationPolicy", groups=kinds):
        for index, raw in enumerate(items(policy.get("status", "conditions"))):
            condition = mapping(raw)
            kind = str(condition.get("type", ""))
            if kind not in _ENFORCERS:
                continue
            status = str(condition.get("status", ""))
            reason = str(condition.get("reason", "") or "")
            detail = str(condition.get("message", "") or "").strip()
            who = _ENFORCERS[kind] or "Istio"
            said = f"{reason}: {detail}" if detail else reason or "no reason given"
            if status == "False":
                message = f"{who} does not enforce it ({kind}=False, {said})"
                severity = None
            elif reason == "PartiallyInvalid":
                message = f"{who} enforces only part of it ({kind}, {said})"
                severity = Severity.WARNING
            else:
                continue
            yield Issue(
                message=f"AuthorizationPolicy {policy.ref}: the cluster reports that {message}",
                location=policy.at("status", "conditions", index),
                resource=policy.key,
                severity=severity,
                fix="# fix what the condition names (e.g. move CUSTOM rules to a waypoint, "
                "correct the targetRefs) and check the status again\n",
            )

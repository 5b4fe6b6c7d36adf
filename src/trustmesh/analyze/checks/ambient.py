"""Ambient mode: policies ztunnel enforces differently from what they say (TM-AMBIENT-001).

ztunnel is a Layer 4 proxy. istiod converts each selector-, namespace- or root-scoped
AuthorizationPolicy for it (:mod:`trustmesh.policy.ztunnel`), and what cannot be seen at
L4 changes the policy silently for workloads in ambient mode without a waypoint: an ALLOW
rule with an HTTP attribute is dropped (its traffic is denied), a DENY rule loses the
attribute (it denies more, or — when only HTTP attributes were left — nothing at all),
and RequestAuthentication is not enforced. Istio only reports this in the policy's
status; here it is a finding at the field that is lost.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from trustmesh.analyze.checks.authz_scope import applied, label, policies, refs
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule
from trustmesh.api import models as m
from trustmesh.api.dataplane import MeshMode
from trustmesh.api.resources import Resource
from trustmesh.policy.compose import WorkloadPolicy
from trustmesh.policy.ztunnel import (
    L4_WHEN_KEYS,
    compile_ztunnel,
    sent_to_ztunnel,
    waypoint_for,
)

_WAYPOINT_FIX = (
    "# Deploy a waypoint for these workloads (label the namespace or Service\n"
    "# istio.io/use-waypoint: <waypoint>) and attach the policy to it with targetRefs,\n"
    "# or keep only L4 attributes (principals, namespaces, ipBlocks, ports) in the rules.\n"
)


def _ztunnel_only(ctx: AnalysisContext, policy: Resource[Any]) -> list[WorkloadPolicy]:
    """Ambient workloads with no waypoint that ``policy`` applies to: ztunnel alone decides."""
    return [
        wp
        for wp in applied(ctx, policy)
        if wp.workload.dataplane.mode is MeshMode.AMBIENT and waypoint_for(ctx.mesh, wp) is None
    ]


@rule(
    "TM-AMBIENT-001",
    title="ztunnel enforces a policy differently from what it says (HTTP attributes, JWT)",
    severity=Severity.WARNING,
    family="ambient",
    rationale="For workloads in ambient mode without a waypoint only ztunnel, a Layer 4 proxy, "
    "enforces policy. An ALLOW rule with an HTTP attribute (methods, paths, hosts, "
    "requestPrincipals, remoteIpBlocks, request.* conditions) never matches there, so its "
    "traffic is denied; a DENY rule is enforced without those attributes, so it denies more "
    "than written — or nothing, when only HTTP attributes were left; RequestAuthentication is "
    "not enforced at all. Istio accepts such policies and only notes it in their status.",
)
def ztunnel_weakened(ctx: AnalysisContext) -> Iterator[Issue]:
    for policy in policies(ctx):
        if sent_to_ztunnel(policy) is not None:
            continue  # targetRefs, CUSTOM / AUDIT, dry-run: not ztunnel's (see TM-AUTHZ-008)
        targets = _ztunnel_only(ctx, policy)
        if not targets:
            continue
        converted = compile_ztunnel(policy)
        weakened = converted.weakening()
        if weakened is None:
            continue
        inert = converted.protects_nothing
        first = _first_l7_field(policy)
        yield Issue(
            message=(
                f"{converted.action.value} {label(policy)} applies to ambient workloads without a"
                f" waypoint ({', '.join(refs(targets))}), where only ztunnel enforces it: "
                f"{weakened}"
            ),
            location=policy.location(*first) if first else policy.meta_location("name"),
            resource=policy.key,
            workloads=refs(targets),
            severity=Severity.ERROR if inert else None,
            fix=_WAYPOINT_FIX,
        )
    yield from _request_authentication(ctx)


def _request_authentication(ctx: AnalysisContext) -> Iterator[Issue]:
    by_policy: dict[str, list[WorkloadPolicy]] = defaultdict(list)
    for wp in ctx.mesh.workloads.values():
        if wp.workload.dataplane.mode is not MeshMode.AMBIENT or not wp.jwt_providers:
            continue
        if waypoint_for(ctx.mesh, wp) is not None:
            continue
        for provider in wp.jwt_providers:
            by_policy[provider.source].append(wp)
    resources = {f"{r.namespace}/{r.name}": r for r in ctx.resources("RequestAuthentication")}
    for source, wps in sorted(by_policy.items()):
        resource = resources.get(source)
        if resource is None:
            continue
        yield Issue(
            message=(
                f"RequestAuthentication {source} applies to ambient workloads without a waypoint"
                f" ({', '.join(refs(wps))}): ztunnel does not validate JWTs, so requests with"
                " invalid or expired tokens are not rejected there"
            ),
            location=resource.meta_location("name"),
            resource=resource.key,
            workloads=refs(wps),
            fix=_WAYPOINT_FIX,
        )


def _first_l7_field(policy: Resource[Any]) -> tuple[str | int, ...] | None:
    """Path (relative to the spec) of the first HTTP attribute ztunnel leaves out."""
    spec: m.AuthorizationPolicySpec = policy.spec
    for i, r in enumerate(spec.rules or ()):
        for j, t in enumerate(r.to):
            op = t.operation
            for name, values in (
                ("hosts", op.hosts),
                ("notHosts", op.not_hosts),
                ("methods", op.methods),
                ("notMethods", op.not_methods),
                ("paths", op.paths),
                ("notPaths", op.not_paths),
            ):
                if values:
                    return ("rules", i, "to", j, "operation", name)
        for j, f in enumerate(r.from_):
            s = f.source
            for name, values in (
                ("requestPrincipals", s.request_principals),
                ("notRequestPrincipals", s.not_request_principals),
                ("remoteIpBlocks", s.remote_ip_blocks),
                ("notRemoteIpBlocks", s.not_remote_ip_blocks),
            ):
                if values:
                    return ("rules", i, "from", j, "source", name)
        for k, c in enumerate(r.when):
            if c.key not in L4_WHEN_KEYS:
                return ("rules", i, "when", k, "key")
    return None

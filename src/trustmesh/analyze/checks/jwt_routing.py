"""Routing on JWT claims at a gateway with no RequestAuthentication (TM-AUTHN-004).

A VirtualService header match on ``@request.auth.claims.NAME`` (or ``[NAME]``) routes on a
claim of the *verified* token. Only a RequestAuthentication on the gateway verifies tokens;
without one the claim is never set from a verified token, so the route the claim was meant
to guard is chosen on no authentication at all (``withoutHeaders`` then sends everyone to
the "without" branch, ``headers`` never matches).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from trustmesh.analyze.checks.control_plane import selector_matches
from trustmesh.analyze.checks.raw_objects import RawObject, items, mapping, raw_objects, text_map
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule
from trustmesh.api.diagnostics import Location

_CLAIM_PREFIX = "@request.auth.claims"


def routing_claim(header: str) -> str | None:
    """The claim a VirtualService header key routes on (Istio's ``jwt.ToRoutingClaim``)."""
    if not header.lower().startswith(_CLAIM_PREFIX):
        return None
    rest = header[len(_CLAIM_PREFIX) :]
    if rest.startswith(".") and len(rest) > 1:
        return rest[1:]
    if rest.startswith("[") and rest.endswith("]") and len(rest) > 2:
        return rest[1:-1].replace("][", ".")
    return None


@dataclass(frozen=True, slots=True)
class _ClaimMatch:
    claim: str
    location: Location


def _claim_matches(vs: RawObject) -> list[_ClaimMatch]:
    found: list[_ClaimMatch] = []
    for r, route in enumerate(items(vs.get("spec", "http"))):
        for m, match in enumerate(items(mapping(route).get("match"))):
            for field in ("headers", "withoutHeaders"):
                for key in mapping(mapping(match).get(field)):
                    claim = routing_claim(str(key))
                    if claim is not None:
                        where = vs.at("spec", "http", r, "match", m, field, str(key))
                        found.append(_ClaimMatch(claim, where))
    return found


def _authenticated_by_selection(
    ctx: AnalysisContext, namespace: str, labels: Mapping[str, str]
) -> bool:
    """Whether some RequestAuthentication selects pods with ``labels`` in ``namespace``."""
    for ra in raw_objects(ctx, "RequestAuthentication", groups=("security.istio.io",)):
        spec = mapping(ra.get("spec"))
        if spec.get("targetRef") or spec.get("targetRefs"):
            continue
        if ra.namespace not in (namespace, ctx.root_namespace):
            continue
        if selector_matches(spec.get("selector"), labels):
            return True
    return False


@rule(
    "TM-AUTHN-004",
    title="JWT claim routing at a gateway with no RequestAuthentication",
    severity=Severity.ERROR,
    family="authn",
    rationale="VirtualService routes on @request.auth.claims read the claims of a token the "
    "gateway verified; with no RequestAuthentication on the gateway no token is verified, so "
    "the routes meant for some users are chosen without authenticating anyone.",
)
def claim_routing_without_authn(ctx: AnalysisContext) -> Iterator[Issue]:
    gateways = {
        (g.namespace, g.name): g for g in raw_objects(ctx, "Gateway", ("networking.istio.io",))
    }
    for vs in raw_objects(ctx, "VirtualService", groups=("networking.istio.io",)):
        matches = _claim_matches(vs)
        if not matches:
            continue
        for ref in items(vs.get("spec", "gateways")):
            name = str(ref)
            if name == "mesh":
                continue  # sidecars do not route on claims; Istio ignores it there too
            namespace, _, short = name.rpartition("/")
            gateway = gateways.get((namespace or vs.namespace, short))
            if gateway is None:
                continue
            selector = text_map(gateway.get("spec", "selector"))
            pods = [
                w
                for w in ctx.snapshot.workloads
                if selector and all(w.labels.get(k) == v for k, v in selector.items())
            ]
            if pods:
                bare = []
                for w in pods:
                    policy = ctx.mesh.for_workload(w.ref)
                    if policy is None or not policy.jwt_providers:
                        bare.append(w.ref)
                assumed = False
            else:  # no gateway workload among the inputs: pods labelled like its selector
                bare = (
                    []
                    if _authenticated_by_selection(ctx, gateway.namespace, selector)
                    else [f"{gateway.namespace}/<pods with {selector}>"]
                )
                assumed = True
            if not bare:
                continue
            claim = matches[0]
            who = ", ".join(bare)
            yield Issue(
                message=f"VirtualService {vs.ref} routes on the JWT claim {claim.claim} at "
                f"Gateway {gateway.ref}, but no RequestAuthentication applies to its workloads "
                f"({who}): no token is verified there, so the claim route is taken without "
                "authentication"
                + (" (no gateway workload among the inputs; assumed)" if assumed else ""),
                location=claim.location,
                resource=vs.key,
                workloads=() if assumed else tuple(bare),
                severity=Severity.WARNING if assumed else None,
                fix="apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
                f"metadata: {{name: {gateway.name}-jwt, namespace: {ctx.root_namespace}}}\n"
                f"spec:\n  selector:\n    matchLabels: {dict(selector)}\n  jwtRules:\n"
                "  - issuer: <issuer of the tokens>\n    jwksUri: <its JWKS URL>\n",
            )

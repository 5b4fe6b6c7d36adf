"""istiod fetching JWKS without BLOCKED_CIDRS_IN_JWKS_URIS (TM-AUTHN-005).

For every RequestAuthentication rule without inline ``jwks``, istiod itself fetches keys: the
``jwksUri``, or the issuer's OpenID discovery document and the URI it names. Whoever may
create a RequestAuthentication thereby makes istiod send requests from inside the cluster.
istiod refuses link-local and cloud-metadata addresses on its own; every other internal range
stays reachable unless ``BLOCKED_CIDRS_IN_JWKS_URIS`` lists it
(``pilot/pkg/model/jwks_resolver.go``).
"""

from __future__ import annotations

from collections.abc import Iterator

from trustmesh.analyze.checks.control_plane import istiod_env
from trustmesh.analyze.checks.install_util import install_target, owner_key, plural, pod_templates
from trustmesh.analyze.checks.raw_objects import text_map
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule
from trustmesh.api.diagnostics import Location

VARIABLE = "BLOCKED_CIDRS_IN_JWKS_URIS"
_EXAMPLE = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,127.0.0.0/8,fc00::/7"


def _fetching(ctx: AnalysisContext) -> list[str]:
    """RequestAuthentications istiod fetches keys for (a rule without inline jwks)."""
    found = []
    for ra in ctx.resources("RequestAuthentication"):
        if any(not rule_.jwks for rule_ in ra.spec.jwt_rules):
            found.append(f"{ra.namespace}/{ra.name}")
    return found


def _targets(ctx: AnalysisContext) -> list[tuple[str, Location | None, str]]:
    """(resource, location, ref) of each istiod the inputs show, else of the install."""
    out: list[tuple[str, Location | None, str]] = []
    for pod in pod_templates(ctx):
        labels = text_map(pod.labels)
        if labels.get("app") != "istiod":
            continue
        containers = list(pod.containers())
        field, index, _ = next(
            (c for c in containers if c[2].get("name") == "discovery"),
            containers[0] if containers else ("containers", 0, {}),
        )
        out.append((pod.resource.key, pod.at(field, index, "env"), pod.ref))
    if not out and ctx.install.present:
        where = install_target(ctx, "values", "pilot", "env")
        out.append((owner_key(ctx, where), where, "istiod"))
    return out


@rule(
    "TM-AUTHN-005",
    title="istiod fetches JWKS without BLOCKED_CIDRS_IN_JWKS_URIS",
    severity=Severity.WARNING,
    family="authn",
    rationale="istiod fetches the keys of RequestAuthentications from inside the cluster: a "
    "jwksUri or issuer pointing at internal addresses turns that into requests to internal "
    "services (SSRF). Only link-local and cloud-metadata addresses are refused unless "
    "BLOCKED_CIDRS_IN_JWKS_URIS lists the private ranges.",
)
def jwks_fetch_unrestricted(ctx: AnalysisContext) -> Iterator[Issue]:
    fetching = _fetching(ctx)
    if not fetching:
        return
    value, _ = istiod_env(ctx, VARIABLE)
    if value and value.strip():
        return
    state = "is set but empty" if value is not None else "is not set"
    for resource, location, ref in _targets(ctx):
        yield Issue(
            message=f"{VARIABLE} {state} on {ref}, and istiod fetches keys for "
            f"{len(fetching)} RequestAuthentication(s) ({plural(fetching)}): a jwksUri or "
            "issuer pointing at an internal address makes istiod request it; only link-local "
            "and cloud-metadata addresses are refused",
            location=location,
            resource=resource,
            fix=f"# istiod (discovery container, or values.pilot.env)\nenv:\n- name: {VARIABLE}\n"
            f'  value: "{_EXAMPLE}"\n',
        )

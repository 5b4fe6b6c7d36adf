"""EnvoyFilters that touch the proxy's security filters (TM-INST-025).

AuthorizationPolicy, RequestAuthentication and PeerAuthentication become Envoy filters
(``rbac``, ``jwt_authn``, ``ext_authz``) and TLS transport sockets. An EnvoyFilter can add,
remove or replace those behind the policies' back: trustmesh's verdicts (``authz check``,
``test``, the other analyzer rules) follow the policies, not the patch, so every such patch
is reported. A patch istiod ignores (ADD or REMOVE on ROUTE_CONFIGURATION / HTTP_ROUTE) is
worse: the filter the author meant to add never runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from trustmesh.analyze.checks.raw_objects import RawObject, items, mapping, raw_objects, text_map
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule

# Name fragments of Envoy filters and types that authenticate, authorize or carry TLS.
_SECURITY = (
    "ext_authz",
    "rbac",
    "jwt_authn",
    "istio_authn",
    "istio.authn",
    "oauth2",
    "basic_auth",
    "tls_inspector",
    "tls_context",
    "transport_socket",
)
_IGNORED = {("ADD", "ROUTE_CONFIGURATION"), ("ADD", "HTTP_ROUTE")}
_IGNORED |= {("REMOVE", "ROUTE_CONFIGURATION"), ("REMOVE", "HTTP_ROUTE")}
_TAKES_AWAY = ("REMOVE", "REPLACE", "MERGE")


def _security_names(value: Any) -> set[str]:
    """Security-filter names and types found anywhere in a patch value or match."""
    found: set[str] = set()
    if isinstance(value, Mapping):
        for key, item in value.items():
            if str(key) in ("name", "@type", "type_url", "typeUrl") and isinstance(item, str):
                if any(token in item.lower() for token in _SECURITY):
                    found.add(item)
            elif str(key) in ("transport_socket", "transportSocket"):
                found.add("transport_socket (TLS)")
            found |= _security_names(item)
    elif isinstance(value, list):
        for item in value:
            found |= _security_names(item)
    return found


def _matched_filter(match: Mapping[str, Any]) -> str:
    """The filter a patch's match targets (subFilter, else filter), "" when none."""
    chain = mapping(mapping(match.get("listener")).get("filterChain"))
    target = mapping(chain.get("filter"))
    sub = mapping(target.get("subFilter"))
    return str(sub.get("name") or target.get("name") or "")


def _scope(ctx: AnalysisContext, envoy_filter: RawObject) -> tuple[str, tuple[str, ...]]:
    spec = mapping(envoy_filter.get("spec"))
    labels = text_map(mapping(spec.get("workloadSelector")).get("labels"))
    everywhere = envoy_filter.namespace == ctx.root_namespace
    chosen = tuple(
        sorted(
            w.ref
            for w in ctx.snapshot.workloads
            if (everywhere or w.namespace == envoy_filter.namespace)
            and all(w.labels.get(k) == v for k, v in labels.items())
        )
    )
    if spec.get("targetRefs"):
        return "the workloads its targetRefs name", ()
    where = "every namespace" if everywhere else f"namespace {envoy_filter.namespace}"
    which = f"workloads labelled {labels}" if labels else "every workload"
    return f"{which} in {where}", chosen


@rule(
    "TM-INST-025",
    title="EnvoyFilter adds, removes or replaces a security filter",
    severity=Severity.WARNING,
    family="install",
    rationale="EnvoyFilters act below Istio's security API: a patch that inserts ext_authz, "
    "removes RBAC or changes TLS sockets changes what is enforced without any "
    "AuthorizationPolicy or PeerAuthentication saying so (and trustmesh's verdicts do not "
    "include it); a patch istiod ignores leaves out the filter its author relied on.",
)
def security_envoy_filters(ctx: AnalysisContext) -> Iterator[Issue]:
    for envoy_filter in raw_objects(ctx, "EnvoyFilter", groups=("networking.istio.io",)):
        scope, workloads = _scope(ctx, envoy_filter)
        for index, raw in enumerate(items(envoy_filter.get("spec", "configPatches"))):
            patch = mapping(raw)
            apply_to = str(patch.get("applyTo", "")).upper()
            body = mapping(patch.get("patch"))
            operation = str(body.get("operation", "")).upper()
            match = mapping(patch.get("match"))
            named = _security_names(body.get("value")) | _security_names(match)
            target = _matched_filter(match)
            if not named:
                continue
            names = {n for n in named if "/" not in n}  # filter names, not type URLs
            shown = ", ".join(sorted(names or named))
            head = (
                f"EnvoyFilter {envoy_filter.ref} configPatches[{index}] ({operation} on {apply_to})"
            )
            severity: Severity | None = Severity.ERROR
            if (operation, apply_to) in _IGNORED:
                what = (
                    f"is ignored by istiod ({operation} applies to filters and clusters, not to "
                    f"{apply_to}): {shown} is never added, so what it should check goes unchecked"
                )
            elif operation in _TAKES_AWAY and target and _security_names({"name": target}):
                what = (
                    f"{'removes' if operation == 'REMOVE' else 'rewrites'} {target} for {scope}: "
                    "the policies Istio compiled into it are not enforced as written"
                )
            else:
                what = (
                    f"inserts {shown} for {scope}, outside Istio's security API: requests are "
                    "decided by it as well as by the AuthorizationPolicies (trustmesh's verdicts "
                    "do not include it); prefer an AuthorizationPolicy CUSTOM action with a "
                    "meshConfig extensionProvider"
                )
                severity = None
            yield Issue(
                message=f"{head} {what}",
                location=envoy_filter.at("spec", "configPatches", index),
                resource=envoy_filter.key,
                workloads=workloads,
                severity=severity,
                fix="# express it with the security API instead: AuthorizationPolicy (action "
                "CUSTOM + meshConfig.extensionProviders for ext_authz), RequestAuthentication, "
                "PeerAuthentication\n",
            )

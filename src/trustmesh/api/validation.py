"""Istio's own admission checks on the security kinds, as collected diagnostics.

A resource Istio would reject is reported as an error; trustmesh then refuses to decide
with that configuration (fail closed) rather than guess what the cluster would hold.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.conditions import KeyKind, condition_key
from trustmesh.api.destination_rule_tls import destination_rule_tls_problems
from trustmesh.api.diagnostics import Diagnostic, error, warning
from trustmesh.api.extension_providers import custom_policy_diagnostics, provider_diagnostics
from trustmesh.api.mesh_routes import mesh_route_diagnostics
from trustmesh.api.resources import Resource
from trustmesh.api.service_entry import service_entry_problems
from trustmesh.api.snapshot import ConfigSnapshot

DRY_RUN = "istio.io/dry-run"
MAX_SERVICE_ACCOUNTS = 16

_TRUST_DOMAIN_FIELDS = frozenset({"trust_domains", "not_trust_domains"})


def validate_snapshot(snapshot: ConfigSnapshot) -> list[Diagnostic]:
    """Every Istio validation error and warning for the snapshot, sorted by location."""
    out: list[Diagnostic] = list(snapshot.diagnostics)
    out.extend(provider_diagnostics(snapshot))
    out.extend(custom_policy_diagnostics(snapshot))
    out.extend(mesh_route_diagnostics(snapshot))  # VirtualServices at sidecars
    out.extend(destination_rule_tls_problems(snapshot))  # DestinationRule client TLS
    for r in (*snapshot.resources, *snapshot.replaced):
        if r.kind == "AuthorizationPolicy":
            out.extend(_authorization_policy(r))
        elif r.kind == "PeerAuthentication":
            out.extend(_peer_authentication(r, snapshot.mesh.root_namespace))
        elif r.kind == "RequestAuthentication":
            out.extend(_request_authentication(r))
        elif r.kind in ("Sidecar", "ServiceEntry"):
            out.extend(_networking_selector(r))
            if r.kind == "ServiceEntry":
                out.extend(service_entry_problems(r))
    out.sort(key=Diagnostic.sort_key)
    return out


def _selector_and_targets(r: Resource[Any]) -> Iterator[Diagnostic]:
    spec = r.spec
    yield from _selector(r)
    if spec.selector is not None and (spec.target_ref is not None or spec.target_refs):
        yield error(
            "selector-with-target-ref",
            r.location("selector"),
            "only one of selector or targetRef/targetRefs may be set",
        )
    if spec.target_ref is not None and spec.target_refs:
        yield error(
            "target-ref-and-refs", r.location("targetRef"), "set targetRefs only, not targetRef too"
        )


def _selector(r: Resource[Any]) -> Iterator[Diagnostic]:
    selector = r.spec.selector
    if selector is None:
        return
    if not selector.match_labels:
        yield warning("empty-selector", r.location("selector"), "selector without labels")
    for key, value in selector.match_labels.items():
        if not key or "*" in key or "*" in value:
            yield error(
                "invalid-selector",
                r.location("selector", "matchLabels", key),
                f"empty keys and wildcards are not supported in selectors: {key}={value}",
            )


def _networking_selector(r: Resource[Any]) -> Iterator[Diagnostic]:
    """Istio's ``ValidateAlphaWorkloadSelector`` (Sidecar / ServiceEntry ``labels``)."""
    selector: m.NetworkingWorkloadSelector | None = r.spec.workload_selector
    if selector is None:
        return
    if not selector.labels:
        yield warning(
            "empty-selector",
            r.location("workloadSelector"),
            "workloadSelector without labels selects every workload in the namespace",
        )
    for key, value in selector.labels.items():
        if not key or "*" in key or "*" in value:
            yield error(
                "invalid-selector",
                r.location("workloadSelector", "labels", key),
                f"empty keys and wildcards are not supported in selectors: {key}={value}",
            )


def _authorization_policy(r: Resource[Any]) -> Iterator[Diagnostic]:
    spec: m.AuthorizationPolicySpec = r.spec
    yield from _selector_and_targets(r)
    if DRY_RUN in r.annotations and r.annotations[DRY_RUN].lower() not in ("true", "false"):
        yield error(
            "invalid-dry-run",
            r.meta_location("annotations", DRY_RUN),
            f'{DRY_RUN} must be "true" or "false", got {r.annotations[DRY_RUN]!r}',
        )
    if is_dry_run_annotated(r) and spec.action not in (m.Action.ALLOW, m.Action.DENY):
        yield error(
            "dry-run-action",
            r.meta_location("annotations", DRY_RUN),
            f"{DRY_RUN} only supports action ALLOW or DENY, found {spec.action.value}",
        )
    if spec.action is m.Action.CUSTOM:
        if spec.provider is None or not spec.provider.name:
            yield error(
                "custom-without-provider",
                r.location("provider"),
                "CUSTOM action needs provider.name",
            )
    elif spec.provider is not None:
        yield error(
            "provider-without-custom",
            r.location("provider"),
            "provider is only allowed with action CUSTOM",
        )
    rules = spec.rules or ()
    if spec.action in (m.Action.DENY, m.Action.CUSTOM) and not rules:
        yield error(
            "rules-required",
            r.location("rules"),
            f"{spec.action.value} policy without rules would match nothing; Istio rejects it",
        )
    for i, rule in enumerate(rules):
        yield from _rule(r, spec.action, i, rule)
        if spec.action is m.Action.DENY and _denies_all_tcp(rule):
            yield warning(
                "deny-blocks-all-tcp",
                r.location("rules", i),
                "this DENY rule uses only HTTP attributes: on TCP ports they are dropped and it"
                " denies all TCP traffic to the workload; add ports to scope it",
            )


_TCP_SOURCE_FIELDS = (
    "principals",
    "not_principals",
    "ip_blocks",
    "not_ip_blocks",
    "namespaces",
    "not_namespaces",
    "remote_ip_blocks",
    "not_remote_ip_blocks",
    "service_accounts",
    "not_service_accounts",
)


def _denies_all_tcp(rule: m.Rule) -> bool:
    """Istio's warning: a DENY rule whose from has no TCP field, or whose to has no ports."""
    has_tcp_source = any(getattr(f.source, n) for f in rule.from_ for n in _TCP_SOURCE_FIELDS)
    if rule.from_ and not rule.to and not has_tcp_source:
        return any(
            f.source.request_principals or f.source.not_request_principals for f in rule.from_
        )
    if rule.to:
        return not any(t.operation.ports or t.operation.not_ports for t in rule.to) and not (
            has_tcp_source
        )
    return False


def is_dry_run_annotated(r: Resource[Any]) -> bool:
    return str(r.annotations.get(DRY_RUN, "")).lower() == "true"


def _rule(r: Resource[Any], action: m.Action, i: int, rule: m.Rule) -> Iterator[Diagnostic]:
    for j, rule_from in enumerate(rule.from_):
        path = ("rules", i, "from", j, "source")
        source = rule_from.source
        set_fields = [(name, getattr(source, name)) for name in _SOURCE_FIELDS]
        set_fields = [(name, values) for name, values in set_fields if values]
        if not set_fields:
            yield error("empty-source", r.location(*path), "from.source must not be empty")
        if source.service_accounts or source.not_service_accounts:
            if (
                source.principals
                or source.not_principals
                or source.namespaces
                or source.not_namespaces
            ):
                yield error(
                    "service-accounts-with-principals",
                    r.location(*path, "serviceAccounts"),
                    "serviceAccounts cannot be combined with principals or namespaces",
                )
            for name in ("service_accounts", "not_service_accounts"):
                for k, account in enumerate(getattr(source, name)):
                    if "*" in account or account.count("/") > 1 or account.strip("/") != account:
                        yield error(
                            "invalid-service-account",
                            r.location(*path, _camel(name), k),
                            f"expected 'serviceAccount' or 'namespace/serviceAccount' without"
                            f" wildcards, found {account!r}",
                        )
                if len(getattr(source, name)) > MAX_SERVICE_ACCOUNTS:
                    yield error(
                        "too-many-service-accounts",
                        r.location(*path, _camel(name)),
                        f"at most {MAX_SERVICE_ACCOUNTS} service accounts",
                    )
        if action is m.Action.CUSTOM:
            for name in (
                "principals",
                "not_principals",
                "namespaces",
                "not_namespaces",
                "service_accounts",
                "not_service_accounts",
                "trust_domains",
                "not_trust_domains",
                "request_principals",
                "not_request_principals",
            ):
                if getattr(source, name):
                    yield error(
                        "custom-identity-field",
                        r.location(*path, _camel(name)),
                        "CUSTOM runs before authentication: identity fields are not allowed",
                    )
        for name, values in set_fields:
            if name in _TRUST_DOMAIN_FIELDS:
                yield from _wildcards(r, (*path, _camel(name)), values, slash_allowed=False)
                continue
            yield from _values(r, (*path, _camel(name)), values)
            if name.endswith("ip_blocks"):
                yield from _cidrs(r, (*path, _camel(name)), values)
            if name.endswith("principals") and "request" not in name:
                for k, v in enumerate(values):
                    if v.startswith("spiffe://"):
                        yield warning(
                            "principal-with-scheme",
                            r.location(*path, _camel(name), k),
                            "principals are written without spiffe://; this value never matches",
                        )
    for j, rule_to in enumerate(rule.to):
        path = ("rules", i, "to", j, "operation")
        operation = rule_to.operation
        set_fields = [(name, getattr(operation, name)) for name in _OPERATION_FIELDS]
        set_fields = [(name, values) for name, values in set_fields if values]
        if not set_fields:
            yield error("empty-operation", r.location(*path), "to.operation must not be empty")
        for name, values in set_fields:
            yield from _values(r, (*path, _camel(name)), values)
            if name.endswith("ports"):
                yield from _ports(r, (*path, _camel(name)), values)
    for j, condition in enumerate(rule.when):
        yield from _condition(r, action, ("rules", i, "when", j), condition)


def _condition(
    r: Resource[Any], action: m.Action, path: tuple[str | int, ...], condition: m.Condition
) -> Iterator[Diagnostic]:
    key = condition.key
    known = condition_key(key)
    if known is None:
        yield error("unknown-condition-key", r.location(*path, "key"), f"unknown attribute {key!r}")
    if not condition.values and not condition.not_values:
        yield error(
            "empty-condition",
            r.location(*path),
            f"condition {key!r} needs values or notValues",
        )
    if action is m.Action.CUSTOM and (
        (known is not None and known.peer_identity) or key.startswith("request.auth.")
    ):
        yield error(
            "custom-identity-field",
            r.location(*path, "key"),
            "CUSTOM runs before authentication: identity attributes are not allowed",
        )
    for name in ("values", "not_values"):
        values = getattr(condition, name)
        kind = known.kind if known is not None else None
        if kind is KeyKind.SOURCE_TRUST_DOMAIN:
            yield from _wildcards(r, (*path, _camel(name)), values, slash_allowed=True)
            continue
        yield from _values(r, (*path, _camel(name)), values)
        if known is not None and known.address:
            yield from _cidrs(r, (*path, _camel(name)), values)
        if kind is KeyKind.DESTINATION_PORT:
            yield from _ports(r, (*path, _camel(name)), values)


def _values(
    r: Resource[Any], path: tuple[str | int, ...], values: tuple[str, ...]
) -> Iterator[Diagnostic]:
    for k, value in enumerate(values):
        if value == "":
            yield error("empty-value", r.location(*path, k), "empty value is not allowed")
        elif "*" in value.strip("*") and "{" not in value:
            yield warning(
                "literal-wildcard",
                r.location(*path, k),
                f"{value!r}: '*' only works at the start or end; here it is matched literally",
            )


def _wildcards(
    r: Resource[Any], path: tuple[str | int, ...], values: tuple[str, ...], *, slash_allowed: bool
) -> Iterator[Diagnostic]:
    """Istio's ``CheckWildcardValues`` / ``CheckTrustDomainValues``: one ``*`` at most, at
    the start or end, and (for ``trustDomains``) no ``/``."""
    for k, value in enumerate(values):
        where = r.location(*path, k)
        if value == "":
            yield error("empty-value", where, "empty value is not allowed")
        elif value.count("*") > 1:
            yield error("invalid-wildcard", where, f"{value!r}: at most one '*' is allowed")
        elif "*" in value and not (value.startswith("*") or value.endswith("*")):
            yield error(
                "invalid-wildcard", where, f"{value!r}: '*' is only allowed at the start or end"
            )
        elif not slash_allowed and "/" in value:
            yield error(
                "invalid-trust-domain",
                where,
                f"{value!r}: a trust domain has no '/' (write cluster.local, not a principal)",
            )


def _cidrs(
    r: Resource[Any], path: tuple[str | int, ...], values: tuple[str, ...]
) -> Iterator[Diagnostic]:
    for k, value in enumerate(values):
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            yield error(
                "invalid-cidr", r.location(*path, k), f"{value!r} is not an IP address or CIDR"
            )


def _ports(
    r: Resource[Any], path: tuple[str | int, ...], values: tuple[str, ...]
) -> Iterator[Diagnostic]:
    for k, value in enumerate(values):
        if not value.isdigit() or not 0 <= int(value) <= 65535:
            yield error(
                "invalid-port", r.location(*path, k), f"{value!r} is not a port number 0-65535"
            )


def _peer_authentication(r: Resource[Any], root_namespace: str) -> Iterator[Diagnostic]:
    spec: m.PeerAuthenticationSpec = r.spec
    yield from _selector(r)
    if spec.port_level_mtls and (spec.selector is None or not spec.selector.match_labels):
        yield error(
            "port-level-without-selector",
            r.location("portLevelMtls"),
            "portLevelMtls requires a selector with matchLabels",
        )
    for port in spec.port_level_mtls:
        if not 1 <= port <= 65535:
            yield error(
                "invalid-port", r.location("portLevelMtls", str(port)), f"port {port} out of range"
            )
    if r.namespace == root_namespace and spec.selector is not None and spec.selector.match_labels:
        yield warning(
            "root-namespace-selector",
            r.location("selector"),
            "a PeerAuthentication with a selector in the root namespace is ignored",
        )


def _request_authentication(r: Resource[Any]) -> Iterator[Diagnostic]:
    spec: m.RequestAuthenticationSpec = r.spec
    yield from _selector_and_targets(r)
    for i, rule in enumerate(spec.jwt_rules):
        path = ("jwtRules", i)
        if not rule.issuer:
            yield error("missing-field", r.location(*path, "issuer"), "issuer must be set")
        if rule.jwks and rule.jwks_uri:
            yield error("jwks-and-uri", r.location(*path, "jwks"), "set jwks or jwksUri, not both")
        if rule.jwks_uri and not re.match(r"^https?://[^/\s]+", rule.jwks_uri):
            yield error(
                "invalid-jwks-uri",
                r.location(*path, "jwksUri"),
                f"{rule.jwks_uri!r} is not an http(s) URL",
            )
        if rule.jwks:
            yield from _jwks(r, (*path, "jwks"), rule.jwks)
        for k, header in enumerate(rule.from_headers):
            if not header.name:
                yield error(
                    "missing-field",
                    r.location(*path, "fromHeaders", k, "name"),
                    "header name must be set",
                )
        for k, claim in enumerate(rule.output_claim_to_headers):
            if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", claim.header):
                yield error(
                    "invalid-header-name",
                    r.location(*path, "outputClaimToHeaders", k, "header"),
                    f"{claim.header!r} is not a valid header name",
                )
            if not claim.claim:
                yield error(
                    "missing-field",
                    r.location(*path, "outputClaimToHeaders", k, "claim"),
                    "claim must be set",
                )


def _jwks(r: Resource[Any], path: tuple[str | int, ...], text: str) -> Iterator[Diagnostic]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        yield error("invalid-jwks", r.location(*path), f"jwks is not JSON: {exc}")
        return
    if not isinstance(value, dict) or not isinstance(value.get("keys"), list):
        yield error(
            "invalid-jwks", r.location(*path), "jwks must be a JSON object with a keys list"
        )
        return
    for key in value["keys"]:
        if isinstance(key, dict) and any(p in key for p in ("d", "p", "q", "k")):
            yield warning(
                "private-key-in-jwks",
                r.location(*path),
                "jwks contains private key material; publish only public keys",
            )


def _camel(name: str) -> str:
    found = _CAMEL.get(name)
    if found is None:
        head, *rest = name.split("_")
        found = _CAMEL[name] = head + "".join(p.title() for p in rest)
    return found


_CAMEL: dict[str, str] = {}
_SOURCE_FIELDS = tuple(m.Source.model_fields)
_OPERATION_FIELDS = tuple(m.Operation.model_fields)

"""VirtualService HTTP routes → Envoy routes, for gateways and sidecars alike (pure).

One translation of an ``http`` entry — match (uri / method / authority / headers /
queryParams / withoutHeaders / scheme), weighted destinations and DestinationRule
subsets, redirect, directResponse, rewrite, timeout, retries and header operations — used
by the gateway's route configurations (:mod:`trustmesh.xds.gateway_routes`) and the
sidecar's outbound ones (:mod:`trustmesh.xds.mesh_routes`). Which matches apply where is
the caller's question (``applies``); everything else is Istio's
``pilot/pkg/networking/core/route`` translation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trustmesh.api.gateway import BoundVirtualService, parse_duration
from trustmesh.api.gateway_models import (
    Destination,
    Headers,
    HttpMatchRequest,
    HttpRoute,
    StringMatch,
)
from trustmesh.api.mesh_routes import resolve_host
from trustmesh.api.snapshot import ConfigSnapshot

__all__ = ["RouteTable", "cluster_name", "destination_cluster", "http_routes"]

_REDIRECT_CODES = {
    301: "MOVED_PERMANENTLY",
    302: "FOUND",
    303: "SEE_OTHER",
    307: "TEMPORARY_REDIRECT",
    308: "PERMANENT_REDIRECT",
}
# Istio's default retry policy for every HTTP route without ``retries``
# (pilot/pkg/networking/core/route/retry/retry.go DefaultPolicy).
_DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
_PREVIOUS_HOSTS = {
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3"
        ".PreviousHostsPredicate"
    },
}


def cluster_name(port: int, subset: str, fqdn: str) -> str:
    return f"outbound|{port}|{subset}|{fqdn}"


@dataclass
class RouteTable:
    """What the routes refer to: subset clusters to build (``(fqdn, port, subset)``)."""

    subsets: set[tuple[str, int, str]] = field(default_factory=set)


def http_routes(
    vs: BoundVirtualService,
    snapshot: ConfigSnapshot,
    table: RouteTable,
    applies: Callable[[HttpMatchRequest], bool],
    listener_port: int = 0,
) -> Iterator[dict[str, Any]]:
    """The Envoy routes of ``vs``'s ``http`` entries, in order: one per match that
    ``applies`` where they are served (a route without ``match`` always does).

    ``listener_port``: the port of the destination cluster when a destination names no
    port and its service has several (Istio's ``GetDestinationCluster``)."""
    for i, route in enumerate(vs.spec.http):
        matches: Sequence[HttpMatchRequest | None] = route.match or (None,)
        for j, match in enumerate(matches):
            if match is not None and not applies(match):
                continue
            name = route.name or f"{vs.namespace}.{vs.resource.name}.{i}"
            if len(matches) > 1:
                name = f"{name}.{match.name if match is not None and match.name else j}"
            yield _route(name, match, route, vs, snapshot, table, listener_port)


def _route(
    name: str,
    match: HttpMatchRequest | None,
    route: HttpRoute,
    vs: BoundVirtualService,
    snapshot: ConfigSnapshot,
    table: RouteTable,
    listener_port: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "match": _match(match)}
    if route.redirect is not None:
        r = route.redirect
        redirect: dict[str, Any] = {"response_code": _REDIRECT_CODES[r.redirect_code]}
        if r.uri:
            redirect["path_redirect"] = r.uri
        if r.authority:
            redirect["host_redirect"] = r.authority
        if r.port is not None:
            redirect["port_redirect"] = r.port
        if r.scheme:
            redirect["scheme_redirect"] = r.scheme
        out["redirect"] = redirect
    elif route.direct_response is not None:
        d = route.direct_response
        direct: dict[str, Any] = {"status": d.status}
        if d.body is not None and d.body.string is not None:
            direct["body"] = {"inline_string": d.body.string}
        out["direct_response"] = direct
    else:
        out["route"] = _action(route, vs, snapshot, table, listener_port)
    _header_operations(out, route.headers)
    if len(route.route) == 1:
        _header_operations(out, route.route[0].headers)
    return out


def _match(match: HttpMatchRequest | None) -> dict[str, Any]:
    if match is None or match.uri is None or _empty(match.uri):
        out: dict[str, Any] = {"prefix": "/"}
    elif match.uri.exact is not None:
        out = {"path": match.uri.exact}
    elif match.uri.prefix is not None:
        out = {"prefix": match.uri.prefix}
    else:
        out = {"safe_regex": {"regex": match.uri.regex}}
    if match is None:
        return out
    if match.ignore_uri_case:
        out["case_sensitive"] = False
    headers = []
    for header, value in (
        (":method", match.method),
        (":authority", match.authority),
        (":scheme", match.scheme),
        *sorted(match.headers.items()),
    ):
        if value is None:
            continue
        headers.append({"name": header.lower(), **_header_value(value)})
    for header, value in sorted(match.without_headers.items()):
        # Istio: the header is absent, or present without the value
        headers.append({"name": header.lower(), **_header_value(value), "invert_match": True})
    if headers:
        out["headers"] = headers
    if match.query_params:
        out["query_parameters"] = [
            {"name": key, **_query_value(value)}
            for key, value in sorted(match.query_params.items())
        ]
    return out


def _empty(value: StringMatch) -> bool:
    return value.exact is None and value.prefix is None and value.regex is None


def _string_match(value: StringMatch) -> dict[str, Any]:
    if value.exact is not None:
        return {"exact": value.exact}
    if value.prefix is not None:
        return {"prefix": value.prefix}
    return {"safe_regex": {"regex": value.regex}}


def _header_value(value: StringMatch) -> dict[str, Any]:
    if _empty(value):  # Istio: a header match with no value means "present"
        return {"present_match": True}
    return {"string_match": _string_match(value)}


def _query_value(value: StringMatch) -> dict[str, Any]:
    if _empty(value):
        return {"present_match": True}
    return {"string_match": _string_match(value)}


def _action(
    route: HttpRoute,
    vs: BoundVirtualService,
    snapshot: ConfigSnapshot,
    table: RouteTable,
    listener_port: int,
) -> dict[str, Any]:
    action: dict[str, Any] = {"cluster_not_found_response_code": "SERVICE_UNAVAILABLE"}
    clusters = [
        (destination_cluster(d.destination, vs, snapshot, table, listener_port), d)
        for d in route.route
    ]
    if len(clusters) == 1:
        action["cluster"] = clusters[0][0]
    else:
        weighted = []
        for name, destination in clusters:
            entry: dict[str, Any] = {"name": name, "weight": destination.weight}
            _header_operations(entry, destination.headers)
            weighted.append(entry)
        action["weighted_clusters"] = {"clusters": weighted}
    timeout = parse_duration(route.timeout) if route.timeout else None
    action["timeout"] = _seconds(timeout or 0.0)
    retry = _retry_policy(route)
    if retry is not None:
        action["retry_policy"] = retry
    if route.rewrite is not None:
        rewrite = route.rewrite
        if rewrite.uri:
            action["prefix_rewrite"] = rewrite.uri
        if rewrite.uri_regex_rewrite is not None:
            action["regex_rewrite"] = {
                "pattern": {"regex": rewrite.uri_regex_rewrite.match},
                "substitution": rewrite.uri_regex_rewrite.rewrite,
            }
        if rewrite.authority:
            action["host_rewrite_literal"] = rewrite.authority
    return action


def destination_cluster(
    destination: Destination,
    vs: BoundVirtualService,
    snapshot: ConfigSnapshot,
    table: RouteTable,
    listener_port: int,
) -> str:
    """The cluster a route destination names (HTTP, TLS or TCP routes alike); a subset's
    is recorded in ``table``. Without a port: the host's only port, else the listener's."""
    fqdn = resolve_host(destination.host, vs.namespace, snapshot)
    if destination.port is not None:
        port = destination.port.number
    else:
        port = _only_port(fqdn, snapshot) or listener_port
    if destination.subset:
        table.subsets.add((fqdn, port, destination.subset))
    return cluster_name(port, destination.subset, fqdn)


def _only_port(fqdn: str, snapshot: ConfigSnapshot) -> int:
    for service in snapshot.services:
        if service.hostname == fqdn and len(service.ports) == 1:
            return service.ports[0].port
    for entry in snapshot.of_kind("ServiceEntry"):
        if fqdn in (h.lower() for h in entry.spec.hosts) and len(entry.spec.ports) == 1:
            return int(entry.spec.ports[0].number)
    return 0  # the listener's port, else a port-less cluster that does not exist: 503


def _retry_policy(route: HttpRoute) -> dict[str, Any] | None:
    retries = route.retries
    if retries is not None and retries.attempts == 0 and "attempts" in retries.model_fields_set:
        return None  # attempts: 0 turns Istio's default retries off
    policy: dict[str, Any] = {
        "retry_on": _DEFAULT_RETRY_ON,
        "num_retries": 2,
        "retry_host_predicate": [_PREVIOUS_HOSTS],
        "host_selection_retry_max_attempts": "5",
        "retriable_status_codes": [503],
    }
    if retries is None:
        return policy
    if retries.attempts:
        policy["num_retries"] = retries.attempts
    if retries.retry_on:
        words = [w.strip() for w in retries.retry_on.split(",") if w.strip()]
        codes = [int(w) for w in words if w.isdigit()]
        names = [w for w in words if not w.isdigit()]
        if codes and "retriable-status-codes" not in names:
            names.append("retriable-status-codes")
        policy["retry_on"] = ",".join(names)
        if codes:
            policy["retriable_status_codes"] = codes
        else:
            del policy["retriable_status_codes"]
    if retries.per_try_timeout:
        policy["per_try_timeout"] = _seconds(parse_duration(retries.per_try_timeout) or 0.0)
    return policy


def _seconds(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return f"{text or '0'}s"


def _header_operations(target: dict[str, Any], headers: Headers | None) -> None:
    if headers is None:
        return
    if headers.request is not None:
        _operations(target, "request", headers.request.set, headers.request.add)
        if headers.request.remove:
            target.setdefault("request_headers_to_remove", []).extend(headers.request.remove)
    if headers.response is not None:
        _operations(target, "response", headers.response.set, headers.response.add)
        if headers.response.remove:
            target.setdefault("response_headers_to_remove", []).extend(headers.response.remove)


def _operations(
    target: dict[str, Any], side: str, set_: Mapping[str, str], add: Mapping[str, str]
) -> None:
    entries = [
        {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for k, v in sorted(set_.items())
    ] + [
        {"header": {"key": k, "value": v}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}
        for k, v in sorted(add.items())
    ]
    if entries:
        target.setdefault(f"{side}_headers_to_add", []).extend(entries)

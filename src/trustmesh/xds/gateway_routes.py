"""VirtualService HTTP routes → Envoy route configurations of a gateway (pure).

One route configuration per plaintext port (``http.<port>``) and per HTTPS server
(``https.<port>.<server name>.<gateway>.<namespace>``), as Istio names them. A virtual host
per hostname a bound VirtualService declares (and its server admits); its routes are the
VirtualServices' ``http`` entries in order, oldest VirtualService first when several
declare the same host (Istio merges them so). What the models accept but
:mod:`trustmesh.api.gateway` did not refuse is all translated here: uri / method /
authority / headers / queryParams / port / gateways matches, weighted destinations and
DestinationRule subsets, redirect, directResponse, rewrite, timeout, retries and header
operations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trustmesh.api.gateway import (
    BoundVirtualService,
    GatewayServer,
    host_matches,
    parse_duration,
)
from trustmesh.api.gateway_models import (
    Destination,
    Headers,
    HttpMatchRequest,
    HttpRoute,
    StringMatch,
)
from trustmesh.api.snapshot import ConfigSnapshot
from trustmesh.xds.outbound import ROUTE_TYPE

__all__ = ["RouteTable", "cluster_name", "destination_cluster", "route_configuration"]

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


def route_configuration(
    name: str,
    servers: Sequence[GatewayServer],
    bound: Sequence[BoundVirtualService],
    snapshot: ConfigSnapshot,
    table: RouteTable,
) -> dict[str, Any]:
    """The route configuration ``name`` shared by ``servers`` (one port, or one HTTPS
    server)."""
    hosts: dict[str, list[dict[str, Any]]] = {}
    redirect_hosts: set[str] = set()
    for server in servers:
        redirect = server.server.tls is not None and server.server.tls.https_redirect
        refs = {server.ref}
        for vs in bound:
            if not {_ref(vs.namespace, g) for g in vs.spec.gateways} & refs:
                continue
            for vs_host in vs.spec.hosts:
                if not server.admits(vs.resource, vs_host):
                    continue
                domain = _domain(vs_host, server)
                routes = hosts.setdefault(domain, [])
                routes.extend(_routes(vs, server, snapshot, table))
                if redirect:
                    redirect_hosts.add(domain)
        if redirect:
            for host in server.host_names():
                hosts.setdefault(host, [])
                redirect_hosts.add(host)
    port = servers[0].server.port.number
    virtual_hosts = []
    for domain in sorted(hosts, key=_specific_first):
        vhost: dict[str, Any] = {
            "name": f"{domain}:{port}",
            "domains": _domains(domain),
            "routes": hosts[domain],
        }
        if domain in redirect_hosts:
            vhost["require_tls"] = "ALL"
        virtual_hosts.append(vhost)
    return {
        "@type": ROUTE_TYPE,
        "name": name,
        "virtual_hosts": virtual_hosts,
        "validate_clusters": False,
        "ignore_port_in_host_matching": False,
    }


def _ref(namespace: str, gateway: str) -> str:
    return gateway if "/" in gateway else f"{namespace}/{gateway}"


def _domain(vs_host: str, server: GatewayServer) -> str:
    """The VirtualService's host, narrowed to the server's when the server's is narrower
    (a ``*`` VirtualService on an ``a.example.com`` server answers only that name)."""
    for name in server.host_names():
        if name != vs_host and host_matches(vs_host, name) and not host_matches(name, vs_host):
            return name.lower()
    return vs_host.lower()


def _domains(domain: str) -> list[str]:
    if "*" in domain:
        return [domain]
    return [domain, f"{domain}:*"]


def _specific_first(domain: str) -> tuple[int, str]:
    return (1 if "*" in domain else 0, domain)


def _routes(
    vs: BoundVirtualService, server: GatewayServer, snapshot: ConfigSnapshot, table: RouteTable
) -> Iterable[dict[str, Any]]:
    for i, route in enumerate(vs.spec.http):
        matches: Sequence[HttpMatchRequest | None] = route.match or (None,)
        for j, match in enumerate(matches):
            if match is not None and not _applies(match, vs, server):
                continue
            name = route.name or f"{vs.namespace}.{vs.resource.name}.{i}"
            if len(matches) > 1:
                name = f"{name}.{match.name if match is not None and match.name else j}"
            yield _route(name, match, route, vs, snapshot, table)


def _applies(match: HttpMatchRequest, vs: BoundVirtualService, server: GatewayServer) -> bool:
    if match.port is not None and match.port != server.server.port.number:
        return False
    if match.gateways:
        return server.ref in {_ref(vs.namespace, g) for g in match.gateways}
    return True


def _route(
    name: str,
    match: HttpMatchRequest | None,
    route: HttpRoute,
    vs: BoundVirtualService,
    snapshot: ConfigSnapshot,
    table: RouteTable,
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
        out["route"] = _action(route, vs, snapshot, table)
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
        *sorted(match.headers.items()),
    ):
        if value is None:
            continue
        headers.append({"name": header.lower(), **_header_value(value)})
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
    route: HttpRoute, vs: BoundVirtualService, snapshot: ConfigSnapshot, table: RouteTable
) -> dict[str, Any]:
    action: dict[str, Any] = {"cluster_not_found_response_code": "SERVICE_UNAVAILABLE"}
    clusters = [(_cluster(d.destination, vs, snapshot, table), d) for d in route.route]
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
) -> str:
    """The cluster a route destination names (a subset's is recorded in ``table``)."""
    return _cluster(destination, vs, snapshot, table)


def _cluster(
    destination: Destination,
    vs: BoundVirtualService,
    snapshot: ConfigSnapshot,
    table: RouteTable,
) -> str:
    fqdn = _fqdn(destination.host, vs.namespace, snapshot)
    port = destination.port.number if destination.port is not None else _only_port(fqdn, snapshot)
    if destination.subset:
        table.subsets.add((fqdn, port, destination.subset))
    return cluster_name(port, destination.subset, fqdn)


def _fqdn(host: str, namespace: str, snapshot: ConfigSnapshot) -> str:
    """Istio's short-name resolution: ``name`` in the VirtualService's namespace,
    ``name.ns`` a Service of ``ns``; anything else as written (ServiceEntry hosts)."""
    parts = host.lower().split(".")
    services = {(s.name, s.namespace) for s in snapshot.services}
    if len(parts) == 1 and (parts[0], namespace) in services:
        return f"{parts[0]}.{namespace}.svc.cluster.local"
    if len(parts) == 2 and (parts[0], parts[1]) in services:
        return f"{parts[0]}.{parts[1]}.svc.cluster.local"
    if len(parts) == 1:
        return f"{parts[0]}.{namespace}.svc.cluster.local"
    return host.lower()


def _only_port(fqdn: str, snapshot: ConfigSnapshot) -> int:
    for service in snapshot.services:
        if service.hostname == fqdn and len(service.ports) == 1:
            return service.ports[0].port
    return 0  # Istio's route then names a port-less cluster that does not exist: 503


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

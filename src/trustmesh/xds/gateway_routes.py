"""VirtualService HTTP routes → Envoy route configurations of a gateway (pure).

One route configuration per plaintext port (``http.<port>``) and per HTTPS server
(``https.<port>.<server name>.<gateway>.<namespace>``), as Istio names them. A virtual host
per hostname a bound VirtualService declares (and its server admits); its routes are the
VirtualServices' ``http`` entries in order, oldest VirtualService first when several
declare the same host (Istio merges them so). What the models accept but
:mod:`trustmesh.api.gateway` did not refuse is all translated here: uri / method /
authority / headers / queryParams / port / gateways matches, weighted destinations and
DestinationRule subsets, redirect, directResponse, rewrite, timeout, retries and header
operations — the route translation itself is :mod:`trustmesh.xds.http_routes`, shared
with the sidecars.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from trustmesh.api.gateway import BoundVirtualService, GatewayServer, host_matches
from trustmesh.api.gateway_models import HttpMatchRequest
from trustmesh.api.snapshot import ConfigSnapshot
from trustmesh.xds.http_routes import RouteTable, cluster_name, destination_cluster, http_routes
from trustmesh.xds.outbound import ROUTE_TYPE

__all__ = ["RouteTable", "cluster_name", "destination_cluster", "route_configuration"]


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
    port = server.server.port.number
    return http_routes(vs, snapshot, table, lambda match: _applies(match, vs, server), port)


def _applies(match: HttpMatchRequest, vs: BoundVirtualService, server: GatewayServer) -> bool:
    if match.port is not None and match.port != server.server.port.number:
        return False
    if match.gateways:
        return server.ref in {_ref(vs.namespace, g) for g in match.gateways}
    return True

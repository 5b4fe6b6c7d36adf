"""The client side of a local-process sidecar: outbound listeners the app reaches by address.

In Kubernetes, iptables sends every outbound connection of a pod to its sidecar, and the
sidecar learns the intended destination from the connection itself. A local-process mesh
has no capture: the application reaches services through its sidecar by explicit
addresses, on ``outbound_address`` (an IP of the workload's own):

* ``outbound_http`` on ``<outbound_address>:15001`` — an HTTP/1.1 forward proxy, for
  ``HTTP_PROXY=http://<outbound_address>:15001``. Absolute-form targets
  (``GET http://httpbin.foo:8000/get``) are accepted and the ``Host`` picks the cluster:
  one virtual host per known service port and ServiceEntry host port, then the default
  for unknown hosts. The route configuration ``http_proxy`` (Istio's name for its HTTP
  proxy's routes) comes over RDS, as all of Istio's sidecar outbound routes do: a
  VirtualService change then updates the routes in place — open keep-alive connections
  take the new routes with their next request — and never the listener, whose change
  would drain it and cut requests in flight after the drain time.
  (:func:`~trustmesh.xds.translate.static_bootstrap` puts it back inline.)
* ``outbound_tcp_<port>`` on ``<outbound_address>:<port>`` per non-HTTP Service port —
  TCP carries no ``Host``, so the port alone names the service (``tcp_proxy``).

Domains of a Service ``name`` in namespace ``ns``, for each HTTP port ``p``:
``name.ns.svc.cluster.local``, ``name.ns.svc``, ``name.ns`` and — only for the client's
own namespace, which is where a DNS search path resolves a short name — ``name``, each
as ``host:p``; the bare ``host`` (no port, which HTTP reads as port 80) goes to port 80
if the service has it as an HTTP port, otherwise to its lowest HTTP port. ServiceEntry
hosts likewise (the host as written). A domain claimed twice keeps its first virtual host
(Envoy refuses duplicates): Services by hostname, then ServiceEntries by namespace/name.

Unknown hosts (istio-semantics §6):

* REGISTRY_ONLY — ``block_all``: a local 502, as Istio's sidecar answers;
* ALLOW_ANY — ``allow_any``: Istio's ``PassthroughCluster`` is ORIGINAL_DST, which only
  works on captured connections (the destination of an explicit proxy's connection is the
  proxy). Here ``allow_any`` routes to :data:`DYNAMIC_FORWARD_PROXY_CLUSTER`, which
  resolves the request's ``Host`` itself (the ``dynamic_forward_proxy`` HTTP filter
  fills its DNS cache; for any other cluster that filter does nothing).

* ``outbound_tls_<port>`` on ``<outbound_address>:<port>`` for 443 and every other TLS /
  HTTPS ServiceEntry port — TLS egress as the app opens it (``https://www.google.com``
  reaches ``$OUTBOUND_IP:443``): the SNI of the ClientHello picks the ServiceEntry host's
  cluster; any other SNI goes to ``BlackHoleCluster`` (a reset, curl exit 35) under
  REGISTRY_ONLY, or is resolved by SNI and forwarded under ALLOW_ANY.

A sidecar-bound VirtualService naming a service (or ServiceEntry host) replaces that
virtual host's default route by its HTTP routes (:mod:`trustmesh.xds.mesh_routes`): match,
weights, subsets, redirect, rewrite, timeout, retries and headers as at Istio's sidecars.

One workload of a Service with several (bookinfo's reviews v1, v2, v3): a request with
``x-trustmesh-workload: NS/NAME`` goes to that workload only — a route ahead of the
service's default one, to a cluster ``outbound|<port>|workload-<name>|<fqdn>`` holding
that workload's endpoint with the service cluster's TLS (as a DestinationRule subset
and a VirtualService header match would); the header is removed before the request
leaves the sidecar, so the destination sees the request any client of the Service
sends. ``trustmesh test --live`` uses it to reach the workload a case names.

Not built: HTTPS through the proxy (``CONNECT``), Sidecar ``egress`` scoping. Two
Services with the same TCP port cannot both have a listener on one address: the client's
own namespace wins, then the lowest hostname.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.gateway import exported_to
from trustmesh.api.snapshot import Service
from trustmesh.envoy_json import (
    HCM_TYPE,
    LISTENER_TYPE,
    ROUTER_TYPE,
    STDOUT_LOG_TYPE,
    TCP_PROXY_TYPE,
    TLS_INSPECTOR_TYPE,
    socket_address,
)
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.xds.inbound import denied_requests_only, logs_every_request
from trustmesh.xds.mesh_routes import alias_hosts, alias_virtual_host, routes_for
from trustmesh.xds.outbound import (
    BLACKHOLE_CLUSTER,
    CLUSTER_TYPE,
    ROUTE_TYPE,
    WORKLOAD_HEADER,
    Protocol,
    default_virtual_host,
    port_protocol,
    selected_workloads,
    workload_route,
    workload_subset,
)

__all__ = [
    "DYNAMIC_FORWARD_PROXY_CLUSTER",
    "HTTP_PROXY_ROUTE",
    "OUTBOUND_HTTP_LISTENER",
    "OUTBOUND_HTTP_PORT",
    "WORKLOAD_HEADER",
    "access_log",
    "http_log_fields",
    "outbound_http_route",
    "outbound_listeners",
    "outbound_proxy_clusters",
    "outbound_tcp_ports",
    "tcp_log_fields",
    "tls_egress_ports",
    "workload_subset",
    "workload_subset_clusters",
]

_T = "type.googleapis.com/"
_DFP_CLUSTER = _T + "envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig"
_DFP_FILTER = _T + "envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig"
_SNI_DFP_FILTER = _T + "envoy.extensions.filters.network.sni_dynamic_forward_proxy.v3.FilterConfig"

OUTBOUND_HTTP_LISTENER = "outbound_http"
HTTP_PROXY_ROUTE = "http_proxy"  # Istio's RDS name for its HTTP proxy listener's routes
OUTBOUND_HTTP_PORT = 15001  # Istio's outbound capture port, reused for the explicit proxy
DYNAMIC_FORWARD_PROXY_CLUSTER = "DynamicForwardProxyCluster"
# The filter and the cluster must name the same cache: the filter resolves, the cluster reads.
_DNS_CACHE = {"name": "outbound_http_dns_cache", "dns_lookup_family": "V4_ONLY"}
_DEFAULT_HTTP_PORT = 80
_ADS = {"ads": {}, "resource_api_version": "V3"}


@dataclass(frozen=True, slots=True)
class _Target:
    """One virtual host of the proxy: the hosts naming one cluster on one port."""

    hosts: tuple[str, ...]
    port: int
    cluster: str
    bare: bool  # also match the hosts without a port
    workloads: tuple[str, ...] = ()  # a Service's endpoints, when it has several

    @property
    def fqdn(self) -> str:
        return self.cluster.rsplit("|", 1)[1]

    @property
    def name(self) -> str:
        return f"{self.hosts[0]}:{self.port}"

    def domains(self) -> list[str]:
        with_port = [f"{h}:{self.port}" for h in self.hosts]
        return [*with_port, *self.hosts] if self.bare else with_port


def outbound_listeners(wp: WorkloadPolicy, mesh: MeshPolicy, address: str) -> list[dict[str, Any]]:
    """The HTTP proxy listener and one TCP listener per non-HTTP Service port, all on
    ``address``, sorted by name."""
    listeners = [
        {
            "@type": LISTENER_TYPE,
            "name": OUTBOUND_HTTP_LISTENER,
            "address": socket_address(address, OUTBOUND_HTTP_PORT),
            "filter_chains": [{"filters": [_http_proxy(wp, mesh)]}],
        }
    ]
    for port, cluster in outbound_tcp_ports(wp, mesh).items():
        listeners.append(
            {
                "@type": LISTENER_TYPE,
                "name": f"outbound_tcp_{port}",
                "address": socket_address(address, port),
                "filter_chains": [{"filters": [_tcp_proxy(wp, cluster)]}],
            }
        )
    taken = {OUTBOUND_HTTP_PORT, *outbound_tcp_ports(wp, mesh)}
    for port, hosts in tls_egress_ports(mesh).items():
        if port not in taken:
            listeners.append(_tls_egress_listener(wp, address, port, hosts))
    return sorted(listeners, key=lambda listener: str(listener["name"]))


TLS_EGRESS_PORT = 443  # always listened on: where an app's https:// connections go


def tls_egress_ports(mesh: MeshPolicy) -> dict[int, list[str]]:
    """TLS egress port → the ServiceEntry hosts (SNI names) served on it, by port."""
    ports: dict[int, list[str]] = {TLS_EGRESS_PORT: []}
    for entry in sorted(mesh.snapshot.of_kind("ServiceEntry"), key=lambda r: (r.namespace, r.name)):
        spec: m.ServiceEntrySpec = entry.spec
        for port in spec.ports:
            if port.protocol.upper() in ("TLS", "HTTPS"):
                hosts = ports.setdefault(port.number, [])
                hosts += [h for h in spec.hosts if h not in hosts]
    return dict(sorted(ports.items()))


def _tls_egress_listener(
    wp: WorkloadPolicy, address: str, port: int, hosts: list[str]
) -> dict[str, Any]:
    def chain(cluster: str, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"filters": [*(extra or []), _tcp_proxy(wp, cluster)]}

    chains = []
    for host in hosts:
        matched = chain(f"outbound|{port}||{host}")
        matched["filter_chain_match"] = {"server_names": [host]}
        chains.append(matched)
    if wp.egress_mode is m.OutboundTrafficPolicyMode.REGISTRY_ONLY:
        default = chain(BLACKHOLE_CLUSTER)  # no endpoints: the connection is closed
    else:
        resolve = {
            "name": "envoy.filters.network.sni_dynamic_forward_proxy",
            "typed_config": {
                "@type": _SNI_DFP_FILTER,
                "dns_cache_config": dict(_DNS_CACHE),
                "port_value": port,
            },
        }
        default = chain(DYNAMIC_FORWARD_PROXY_CLUSTER, [resolve])
    return {
        "@type": LISTENER_TYPE,
        "name": f"outbound_tls_{port}",
        "address": socket_address(address, port),
        "listener_filters": [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": TLS_INSPECTOR_TYPE},
            }
        ],
        "filter_chains": chains,
        "default_filter_chain": default,
    }


def _tcp_proxy(wp: WorkloadPolicy, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": TCP_PROXY_TYPE,
            "stat_prefix": cluster,
            "cluster": cluster,
            "access_log": [access_log(wp, tcp_log_fields())],
        },
    }


def outbound_proxy_clusters(wp: WorkloadPolicy) -> list[dict[str, Any]]:
    """The clusters the proxy listener needs beyond :func:`outbound_clusters`: the dynamic
    forward proxy cluster under ALLOW_ANY, nothing under REGISTRY_ONLY."""
    if wp.egress_mode is m.OutboundTrafficPolicyMode.REGISTRY_ONLY:
        return []
    return [
        {
            "@type": CLUSTER_TYPE,
            "name": DYNAMIC_FORWARD_PROXY_CLUSTER,
            "connect_timeout": "10s",
            "lb_policy": "CLUSTER_PROVIDED",
            "cluster_type": {
                "name": "envoy.clusters.dynamic_forward_proxy",
                "typed_config": {"@type": _DFP_CLUSTER, "dns_cache_config": dict(_DNS_CACHE)},
            },
        }
    ]


def outbound_tcp_ports(wp: WorkloadPolicy, mesh: MeshPolicy) -> dict[int, str]:
    """Service port → the outbound cluster its TCP listener forwards to, by port.

    The client's namespace first, then by hostname, takes a port several Services share;
    the proxy's own port is never a TCP listener."""
    own = wp.workload.namespace
    ports: dict[int, str] = {}
    for service in sorted(mesh.snapshot.services, key=lambda s: (s.namespace != own, s.hostname)):
        for sp in sorted(service.ports, key=lambda p: p.port):
            tcp = port_protocol(sp.name, sp.protocol) is Protocol.TCP
            if tcp and sp.port != OUTBOUND_HTTP_PORT:
                ports.setdefault(sp.port, f"outbound|{sp.port}||{service.hostname}")
    return dict(sorted(ports.items()))


def outbound_http_route(wp: WorkloadPolicy, mesh: MeshPolicy) -> dict[str, Any]:
    """The proxy's route configuration ``http_proxy`` (its listener fetches it over RDS):
    a virtual host per known HTTP service port and ServiceEntry host port, then the
    default for unknown hosts."""
    seen: set[str] = set()
    virtual_hosts = []
    targets = _targets(wp, mesh)
    for target in targets:
        # Envoy refuses a domain listed twice in one route configuration: first one wins.
        domains = [d for d in dict.fromkeys(target.domains()) if d not in seen]
        seen.update(domains)
        if domains:
            routes = routes_for(wp, mesh, target.fqdn, target.port) or [
                {
                    "name": "default",
                    "match": {"prefix": "/"},
                    "route": {"cluster": target.cluster, "timeout": "0s"},
                }
            ]
            virtual_hosts.append(
                {
                    "name": target.name,
                    "domains": domains,
                    "routes": [
                        *(workload_route(target.cluster, ref) for ref in target.workloads),
                        *routes,
                    ],
                }
            )
    ports = sorted({_DEFAULT_HTTP_PORT, *(t.port for t in targets)})
    for host in alias_hosts(wp, mesh):
        for port in ports:
            alias = alias_virtual_host(wp, mesh, host, port, bare=port == _DEFAULT_HTTP_PORT)
            if alias is not None:
                alias["domains"] = [d for d in alias["domains"] if d not in seen]
                seen.update(alias["domains"])
                if alias["domains"]:
                    virtual_hosts.append(alias)
    virtual_hosts.append(default_virtual_host(wp.egress_mode, DYNAMIC_FORWARD_PROXY_CLUSTER))
    return {
        "@type": ROUTE_TYPE,
        "name": HTTP_PROXY_ROUTE,
        "virtual_hosts": virtual_hosts,
        "validate_clusters": False,
    }


def workload_subset_clusters(
    wp: WorkloadPolicy, mesh: MeshPolicy, clusters: Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The per-workload clusters the proxy's routes name: each a copy of its service
    cluster (same TLS, same SNI) with only that workload's endpoint."""
    by_name = {str(c["name"]): c for c in clusters}
    out = []
    for target in _targets(wp, mesh):
        service_cluster = by_name.get(target.cluster)
        if service_cluster is None:
            continue
        for ref in target.workloads:
            name = workload_subset(target.cluster, ref)
            groups = service_cluster.get("load_assignment", {}).get("endpoints", [])
            endpoints = [
                e
                for group in groups
                for e in group.get("lb_endpoints", [])
                if e.get("metadata", {})
                .get("filter_metadata", {})
                .get("trustmesh", {})
                .get("workload")
                == ref
            ]
            subset = dict(service_cluster, name=name)
            subset["load_assignment"] = {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": endpoints}] if endpoints else [],
            }
            out.append(subset)
    return out


def _targets(wp: WorkloadPolicy, mesh: MeshPolicy) -> list[_Target]:
    targets: list[_Target] = []
    for service in sorted(mesh.snapshot.services, key=lambda s: s.hostname):
        ports = [
            sp.port for sp in service.ports if port_protocol(sp.name, sp.protocol) is Protocol.HTTP
        ]
        hosts = tuple(_service_hosts(service, wp.workload.namespace))
        workloads = [w.ref for w in selected_workloads(mesh, service)]
        several = tuple(workloads) if len(workloads) > 1 else ()
        targets += [
            dataclasses.replace(t, workloads=several)
            for t in _port_targets(hosts, ports, service.hostname)
        ]
    entries = sorted(mesh.snapshot.of_kind("ServiceEntry"), key=lambda r: (r.namespace, r.name))
    for entry in entries:
        if not exported_to(entry, wp.workload.namespace):
            continue  # unknown to this sidecar: the default for unknown hosts decides
        spec: m.ServiceEntrySpec = entry.spec
        ports = [p.number for p in spec.ports if port_protocol(p.name, p.protocol) is Protocol.HTTP]
        for host in sorted(set(spec.hosts)):
            targets += _port_targets((host,), ports, host)
    return targets


def _service_hosts(service: Service, client_namespace: str) -> Iterable[str]:
    short = f"{service.name}.{service.namespace}"
    yield from (service.hostname, f"{short}.svc", short)
    if service.namespace == client_namespace:
        yield service.name


def _port_targets(hosts: tuple[str, ...], ports: list[int], fqdn: str) -> list[_Target]:
    if not ports:
        return []
    numbers = sorted(set(ports))
    bare = _DEFAULT_HTTP_PORT if _DEFAULT_HTTP_PORT in numbers else numbers[0]
    return [_Target(hosts, p, f"outbound|{p}||{fqdn}", p == bare) for p in numbers]


def _http_proxy(wp: WorkloadPolicy, mesh: MeshPolicy) -> dict[str, Any]:
    filters: list[dict[str, Any]] = []
    if wp.egress_mode is not m.OutboundTrafficPolicyMode.REGISTRY_ONLY:
        filters.append(
            {
                "name": "envoy.filters.http.dynamic_forward_proxy",
                "typed_config": {"@type": _DFP_FILTER, "dns_cache_config": dict(_DNS_CACHE)},
            }
        )
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}})
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM_TYPE,
            "stat_prefix": OUTBOUND_HTTP_LISTENER,
            "codec_type": "HTTP1",
            # What makes it a forward proxy: `GET http://host:port/path` is accepted and
            # its authority becomes the Host that picks the virtual host.
            "http_protocol_options": {"allow_absolute_url": True},
            # Over RDS, never inline: a route change must not change (drain) the listener.
            "rds": {"config_source": dict(_ADS), "route_config_name": HTTP_PROXY_ROUTE},
            "http_filters": filters,
            "use_remote_address": False,
            "access_log": [
                access_log(wp, http_log_fields(), every_request=logs_every_request(mesh))
            ],
        },
    }


def access_log(
    wp: WorkloadPolicy, fields: dict[str, str], *, every_request: bool = True
) -> dict[str, Any]:
    """The JSON access log of an outbound listener; for HTTP without ``every_request``
    only what failed (502 for a blocked host, 503 for an unreachable one)."""
    common = {
        "start_time": "%START_TIME%",
        "workload": wp.workload.ref,
        "direction": "outbound",
        "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
        "response_flags": "%RESPONSE_FLAGS%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "upstream_host": "%UPSTREAM_HOST%",
        "duration_ms": "%DURATION%",
    }
    log: dict[str, Any] = {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {"@type": STDOUT_LOG_TYPE, "log_format": {"json_format": common | fields}},
    }
    if not every_request:
        log["filter"] = denied_requests_only(dry_run=False)
    return log


def http_log_fields() -> dict[str, str]:
    return {
        "request_id": "%REQ(X-REQUEST-ID)%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "authority": "%REQ(:AUTHORITY)%",
        "response_code": "%RESPONSE_CODE%",
        "response_code_details": "%RESPONSE_CODE_DETAILS%",
    }


def tcp_log_fields() -> dict[str, str]:
    return {"bytes_received": "%BYTES_RECEIVED%", "bytes_sent": "%BYTES_SENT%"}

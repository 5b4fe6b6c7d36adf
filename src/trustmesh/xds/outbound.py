"""The client side of a sidecar: outbound clusters and HTTP route configurations (pure).

Istio gives every sidecar a cluster per known service port, named
``outbound|<port>||<fqdn>``, plus ``PassthroughCluster`` and ``BlackHoleCluster`` for
hosts outside the registry; HTTP traffic picks its cluster by ``Host`` from a route
configuration per port (named ``"<port>"``) whose last virtual host decides unknown hosts:
``allow_any`` (to ``PassthroughCluster``) under ALLOW_ANY, ``block_all`` (a local 502)
under REGISTRY_ONLY.

Client TLS per cluster is decided by :func:`trustmesh.policy.upstream_tls.upstream_tls` (the
value the evaluator reads too); this module only maps it to a ``transport_socket``:

* an explicit DestinationRule ``tls`` (client namespace, then service namespace, then
  root) wins: ISTIO_MUTUAL → mesh mTLS to every endpoint; DISABLE → plaintext; SIMPLE /
  MUTUAL → TLS with the rule's own files (or an SDS secret named by ``credentialName``);
* otherwise, with auto mTLS on, Istio's ``transport_socket_matches``: mesh mTLS to an
  endpoint labelled ``tlsMode: istio`` (it has a sidecar and its port is not DISABLE),
  plaintext to the others; with auto mTLS off, plaintext.

Mesh mTLS means: the workload certificate and trust bundle from SDS (secrets ``default``
and ``ROOTCA``), SNI ``outbound_.<port>_.<subset>_.<fqdn>`` (as istiod names it; ``_``
without a subset), ALPN ``istio-peer-exchange, istio``, TLS 1.2–1.3 (Envoy's client
stops at 1.2 unless told), and the server's certificate pinned to the SPIFFE IDs of the
service's workloads (every trust domain of the bundle). A service with no known workload
pins nothing, as in Istio.

Endpoints: EDS is not built yet, so clusters are STATIC with one endpoint per workload the
Service selects, at ``<workload ip>:<target port>``. A workload with no known IP (a
Deployment, not a Pod) gets :data:`PLACEHOLDER_ADDRESS`: the runtime fills in the real
address; every endpoint names its workload in ``metadata.filter_metadata.trustmesh``.
ServiceEntry hosts exported to the client's namespace get clusters too, with their
``endpoints`` (:mod:`trustmesh.xds.service_entries`); an entry not exported there is
unknown to the sidecar (REGISTRY_ONLY: 502).

DestinationRule subsets: a cluster ``outbound|<port>|<subset>|<fqdn>`` per subset of the
rule a client's namespace uses (as Istio builds them, routed to or not), holding the
endpoints whose workloads carry the subset's labels, with the subset's traffic policy
(TLS, connection pool, outlier detection) merged over the rule's.

ServiceEntry hosts take the DestinationRule for the host as a gateway does (Istio's
"egress TLS origination" at the sidecar): its traffic policy, its client TLS from files
(``credentialName`` is not applied at sidecars: such a cluster is left out, see
:func:`_entry_clusters`), and a cluster per subset with the entry's endpoints filtered by
their ``labels``.

Not built here: load-balancer settings, Sidecar ``egress`` host scoping, ServiceEntry
``workloadSelector``.

This module also holds the pieces the inbound side shares (socket addresses, SDS secret
references, protocol detection, STATIC clusters).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import Service, ServicePortInfo, Workload
from trustmesh.envoy_json import (
    CERTIFICATE_SECRET,
    CLUSTER_TYPE,
    CONNECT_TIMEOUT,
    HTTP_OPTIONS_TYPE,
    UPSTREAM_TLS_TYPE,
    mesh_validation,
    sds_secret,
    socket_address,
)
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.destination_rules import destination_subsets, origination_rule
from trustmesh.policy.endpoints import service_workloads
from trustmesh.policy.origination import origination_tls, sidecar_origination_problem
from trustmesh.policy.protocols import app_protocol, app_speaks_tls, proxied_as_tcp
from trustmesh.policy.targets import named_ports
from trustmesh.policy.traffic_policy import origination_traffic_policy, service_traffic_policy
from trustmesh.policy.upstream_tls import UpstreamMode, UpstreamTls, speaks_mesh_mtls, upstream_tls
from trustmesh.xds.mesh_routes import alias_hosts, alias_virtual_host, routes_for
from trustmesh.xds.service_entries import entry_cluster, visible_entries
from trustmesh.xds.traffic_policy import apply_traffic_policy

__all__ = [
    "BLACKHOLE_CLUSTER",
    "CLUSTER_TYPE",
    "PASSTHROUGH_CLUSTER",
    "PLACEHOLDER_ADDRESS",
    "ROUTE_TYPE",
    "WORKLOAD_HEADER",
    "Protocol",
    "outbound_clusters",
    "outbound_routes",
    "port_protocol",
    "selected_workloads",
    "static_cluster",
    "target_port",
    "workload_route",
    "workload_subset",
]

_T = "type.googleapis.com/"
ROUTE_TYPE = _T + "envoy.config.route.v3.RouteConfiguration"
_RAW_BUFFER = _T + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"

PASSTHROUGH_CLUSTER = "PassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
# Stands in for the address of a workload the config does not know (a Deployment's pods):
# an address nothing listens on, so a request fails (503) until the runtime fills it in.
PLACEHOLDER_ADDRESS = "127.0.0.254"
MESH_CLIENT_ALPN = ("istio-peer-exchange", "istio")
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_TLS_SOCKET = "envoy.transport_sockets.tls"
_TLS_MODE_ISTIO = {"tlsMode": "istio"}


class Protocol(enum.Enum):
    """How a port is proxied: an HTTP connection manager, or a TCP proxy."""

    HTTP = "HTTP"
    TCP = "TCP"


_HTTP2_NAMES = frozenset({"http2", "grpc", "h2c", "kubernetes.io/h2c"})


def port_protocol(name: str, protocol: str) -> Protocol:
    """Istio's protocol selection (:func:`trustmesh.policy.protocols.app_protocol`). Unknown
    protocols are treated as HTTP (Istio would sniff the first bytes; an HTTP chain still
    carries HTTP/1 and HTTP/2)."""
    return Protocol.TCP if proxied_as_tcp(name, protocol) else Protocol.HTTP


def static_cluster(
    name: str, endpoints: Iterable[dict[str, Any]], *, http2: bool = False
) -> dict[str, Any]:
    """A STATIC cluster over ready-made ``lb_endpoints`` entries."""
    cluster: dict[str, Any] = {
        "@type": CLUSTER_TYPE,
        "name": name,
        "type": "STATIC",
        "connect_timeout": CONNECT_TIMEOUT,
        "load_assignment": {"cluster_name": name, "endpoints": []},
    }
    lb_endpoints = list(endpoints)
    if lb_endpoints:
        cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": lb_endpoints}]
    if http2:
        cluster["typed_extension_protocol_options"] = _HTTP2_OPTIONS
    return cluster


_HTTP2_OPTIONS: dict[str, Any] = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": HTTP_OPTIONS_TYPE,
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


def target_port(service_port: ServicePortInfo, workload: Workload) -> int | None:
    """The workload port a Service port forwards to; a named ``targetPort`` is looked up
    in the workload's container ports (None if it has no port of that name)."""
    if isinstance(service_port.target_port, int):
        return service_port.target_port
    return dict(named_ports(workload)).get(service_port.target_port)


# ---------------------------------------------------------------------------- clusters


def outbound_clusters(
    wp: WorkloadPolicy,
    mesh: MeshPolicy,
    sds_cluster: str,
    addresses: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Every cluster ``wp``'s sidecar sends outbound traffic to, sorted by name.

    ``addresses``: workload ref → IP for workloads whose manifests carry none (a
    Deployment's pods get theirs when they run: the local runtime's plan says where).
    """
    clusters: dict[str, dict[str, Any]] = {
        PASSTHROUGH_CLUSTER: {
            "@type": CLUSTER_TYPE,
            "name": PASSTHROUGH_CLUSTER,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": CONNECT_TIMEOUT,
        },
        # No endpoints: whatever is routed here fails (503 / reset), Istio's REGISTRY_ONLY.
        BLACKHOLE_CLUSTER: {
            "@type": CLUSTER_TYPE,
            "name": BLACKHOLE_CLUSTER,
            "type": "STATIC",
            "connect_timeout": CONNECT_TIMEOUT,
        },
    }
    for service in sorted(mesh.snapshot.services, key=lambda s: s.hostname):
        workloads = _selected(mesh, service)
        subsets = destination_subsets(mesh, wp.workload.namespace, service)
        for sp in service.ports:
            for subset in (None, *subsets):
                # Istio builds a cluster per subset of the DestinationRule, used or not.
                name = subset.name if subset is not None else ""
                upstream = upstream_tls(mesh, wp.workload.namespace, service, sp.port, name)
                if sidecar_origination_problem(upstream) is not None and not app_speaks_tls(
                    sp.name, sp.protocol
                ):
                    continue  # TLS the sidecar cannot originate: no cluster (503), `validate` says
                cluster = _service_cluster(
                    wp, mesh, service, sp, workloads, sds_cluster, addresses or {}, subset
                )
                clusters.setdefault(cluster["name"], cluster)
    for entry in visible_entries(mesh, wp.workload.namespace):
        for cluster in _entry_clusters(mesh, wp.workload.namespace, entry, sds_cluster):
            clusters.setdefault(cluster["name"], cluster)
    return [clusters[name] for name in sorted(clusters)]


def selected_workloads(mesh: MeshPolicy, service: Service) -> list[Workload]:
    """The workloads ``service`` selects (its endpoints), by reference."""
    return _selected(mesh, service)


def _selected(mesh: MeshPolicy, service: Service) -> list[Workload]:
    return service_workloads(mesh, service)


def _service_cluster(
    wp: WorkloadPolicy,
    mesh: MeshPolicy,
    service: Service,
    sp: ServicePortInfo,
    workloads: list[Workload],
    sds_cluster: str,
    addresses: Mapping[str, str],
    subset: m.Subset | None = None,
) -> dict[str, Any]:
    """``outbound|<port>|<subset>|<fqdn>``: the service port's endpoints (those carrying
    the subset's labels), with the client TLS and traffic policy of the DestinationRule
    (the subset's merged over it, as Istio's ``MergeSubsetTrafficPolicy``)."""
    name = f"outbound|{sp.port}|{subset.name if subset else ''}|{service.hostname}"
    upstream = upstream_tls(
        mesh, wp.workload.namespace, service, sp.port, subset.name if subset else ""
    )
    auto = upstream.mode is UpstreamMode.AUTO
    endpoints = []
    for workload in workloads:
        if subset is not None and any(
            workload.labels.get(k) != v for k, v in subset.labels.items()
        ):
            continue
        port = target_port(sp, workload)
        if port is None:
            continue  # Istio drops an endpoint without the named port
        address = addresses.get(workload.ref) or workload.ip or PLACEHOLDER_ADDRESS
        metadata: dict[str, Any] = {"trustmesh": {"workload": workload.ref}}
        if auto and speaks_mesh_mtls(mesh, workload, port):
            metadata["envoy.transport_socket_match"] = dict(_TLS_MODE_ISTIO)
        endpoints.append(
            {
                "endpoint": {"address": socket_address(address, port)},
                "metadata": {"filter_metadata": metadata},
            }
        )
    http2 = app_protocol(sp.name, sp.protocol) in _HTTP2_NAMES
    cluster = static_cluster(name, endpoints, http2=http2)
    if auto:
        cluster["transport_socket_matches"] = [
            {
                "name": "tlsMode-istio",
                "match": dict(_TLS_MODE_ISTIO),
                "transport_socket": _mesh_socket(upstream, sds_cluster),
            },
            {
                "name": "tlsMode-disabled",
                "match": {},
                "transport_socket": {
                    "name": "envoy.transport_sockets.raw_buffer",
                    "typed_config": {"@type": _RAW_BUFFER},
                },
            },
        ]
    elif upstream.mode is not UpstreamMode.PLAINTEXT and (
        sidecar_origination_problem(upstream) is None
    ):
        cluster["transport_socket"] = transport_socket(upstream, sds_cluster)
    # else credentialName: the application's own TLS passes through (a TLS / HTTPS port,
    # as istiod leaves it), or the caller leaves the cluster out (see outbound_clusters)
    policy = service_traffic_policy(
        mesh, wp.workload.namespace, service, sp.port, subset.name if subset else ""
    )
    apply_traffic_policy(cluster, policy)
    return cluster


def transport_socket(upstream: UpstreamTls, sds_cluster: str) -> dict[str, Any]:
    """The Envoy ``transport_socket`` of a decided client TLS (not plaintext, not auto)."""
    if upstream.mode in (UpstreamMode.ISTIO_MUTUAL, UpstreamMode.AUTO):
        return _mesh_socket(upstream, sds_cluster)
    assert upstream.mode in (UpstreamMode.SIMPLE, UpstreamMode.MUTUAL), upstream
    credentials = upstream.credentials
    assert credentials is not None
    mutual = upstream.mode is UpstreamMode.MUTUAL
    # SIMPLE / MUTUAL: TLS the application would otherwise originate, with the rule's keys.
    common: dict[str, Any] = {"tls_params": {"tls_maximum_protocol_version": "TLSv1_3"}}
    validation: dict[str, Any] = {}
    if upstream.subject_alt_names and credentials.verify:  # insecureSkipVerify: no SAN either
        validation["match_typed_subject_alt_names"] = [
            {"san_type": kind, "matcher": {"exact": san}}
            for san in upstream.subject_alt_names
            for kind in ("DNS", "URI")
        ]
    if credentials.credential_name:
        common["validation_context_sds_secret_config"] = sds_secret(
            f"{credentials.credential_name}-cacert", sds_cluster
        )
        if mutual:
            common["tls_certificate_sds_secret_configs"] = [
                sds_secret(credentials.credential_name, sds_cluster)
            ]
    else:
        if credentials.verify:
            validation["trusted_ca"] = {"filename": credentials.ca_file or SYSTEM_CA_BUNDLE}
        if validation:
            common["validation_context"] = validation
        if mutual:
            common["tls_certificates"] = [
                {
                    "certificate_chain": {"filename": credentials.certificate_chain},
                    "private_key": {"filename": credentials.private_key},
                }
            ]
    return {
        "name": _TLS_SOCKET,
        "typed_config": {
            "@type": UPSTREAM_TLS_TYPE,
            "sni": upstream.sni,
            "common_tls_context": common,
        },
    }


def _auto_sni(cluster: dict[str, Any], upstream: UpstreamTls) -> None:
    """SNI from each request's Host, and (checking the server) its certificate checked
    for that name: Envoy's ``auto_sni`` / ``auto_san_validation``, as istiod sets them."""
    options = cluster.setdefault("typed_extension_protocol_options", {}).setdefault(
        HTTP_OPTIONS_KEY,
        {"@type": HTTP_OPTIONS_TYPE, "explicit_http_config": {"http_protocol_options": {}}},
    )
    if "upstream_http_protocol_options" in options:
        return
    options = options.copy()  # the HTTP/2 options dict is shared between clusters
    verify = upstream.credentials is not None and upstream.credentials.verify
    options["upstream_http_protocol_options"] = {
        "auto_sni": True,
        "auto_san_validation": verify and not upstream.subject_alt_names,
    }
    cluster["typed_extension_protocol_options"] = {
        **cluster["typed_extension_protocol_options"],
        HTTP_OPTIONS_KEY: options,
    }


def _mesh_socket(upstream: UpstreamTls, sds_cluster: str) -> dict[str, Any]:
    return {
        "name": _TLS_SOCKET,
        "typed_config": {
            "@type": UPSTREAM_TLS_TYPE,
            "sni": upstream.sni,
            "common_tls_context": {
                "tls_params": {
                    "tls_minimum_protocol_version": "TLSv1_2",
                    "tls_maximum_protocol_version": "TLSv1_3",
                },
                "alpn_protocols": list(MESH_CLIENT_ALPN),
                "tls_certificate_sds_secret_configs": [sds_secret(CERTIFICATE_SECRET, sds_cluster)],
                "combined_validation_context": mesh_validation(
                    sds_cluster, upstream.peer_ids or upstream.subject_alt_names
                ),
            },
        },
    }


def _entry_clusters(
    mesh: MeshPolicy, client_namespace: str, entry: Resource[Any], sds_cluster: str
) -> list[dict[str, Any]]:
    """A sidecar's clusters of a ServiceEntry: per host and port, and per subset of the
    DestinationRule for the host (:func:`trustmesh.policy.destination_rules.origination_rule`), with
    that rule's traffic policy and client TLS (Istio's "egress TLS origination": SIMPLE /
    MUTUAL from the rule's files, the server checked against ``caCertificates`` or the
    system bundle and the host or ``subjectAltNames``). A TLS the sidecar cannot
    originate (:func:`sidecar_origination_problem`: ``credentialName``) leaves the
    cluster out — a request routed there gets 503, never plaintext — except on a port
    where the application speaks TLS itself, which passes through as in Istio;
    ``validate`` reports both on the rule's line."""
    spec: m.ServiceEntrySpec = entry.spec
    clusters = []
    for host in sorted(set(spec.hosts)):
        rule = origination_rule(mesh, client_namespace, entry.namespace, host.lower())
        subsets: tuple[m.Subset | None, ...] = (None, *(rule.spec.subsets if rule else ()))
        for index, port in enumerate(spec.ports):
            for subset in subsets:
                name = subset.name if subset is not None else ""
                cluster = entry_cluster(
                    entry, host, index, placeholder=PLACEHOLDER_ADDRESS, subset=subset
                )
                policy = origination_traffic_policy(
                    mesh, client_namespace, entry.namespace, host.lower(), port.number, name
                )
                if policy is not None:
                    apply_traffic_policy(cluster, policy)
                upstream = origination_tls(
                    mesh, client_namespace, entry.namespace, host.lower(), port.number, name
                )
                if upstream.mode is not UpstreamMode.PLAINTEXT:
                    if sidecar_origination_problem(upstream) is None:
                        cluster["transport_socket"] = transport_socket(upstream, sds_cluster)
                        if upstream.auto_sni:
                            _auto_sni(cluster, upstream)
                    elif not app_speaks_tls(port.name, port.protocol):
                        continue  # fail closed: no cluster, 503
                clusters.append(cluster)
    return clusters


# ---------------------------------------------------------------------------- routes


def outbound_routes(
    wp: WorkloadPolicy,
    mesh: MeshPolicy,
    service_addresses: Mapping[str, str] | None = None,
    *,
    workload_routes: bool = False,
) -> list[dict[str, Any]]:
    """One route configuration per HTTP port of the registry, named ``"<port>"``: a
    virtual host per service on that port, then Istio's default for unknown hosts. A
    sidecar-bound VirtualService naming a service replaces its default route
    (:mod:`trustmesh.xds.mesh_routes`).

    ``service_addresses`` (Service ``namespace/name`` → ClusterIP): each service's
    virtual host also answers to its ClusterIP (``ip`` and ``ip:port``), as Istio's do —
    what a captured client that dialled the address sends as ``Host``.
    ``workload_routes``: a service with several workloads also routes
    ``x-trustmesh-workload: NS/NAME`` to that workload's subset cluster (see
    :func:`workload_route`)."""
    hosts: dict[int, dict[str, dict[str, Any]]] = {}
    client_namespace = wp.workload.namespace
    addresses = service_addresses or {}
    for service in sorted(mesh.snapshot.services, key=lambda s: s.hostname):
        for sp in service.ports:
            if port_protocol(sp.name, sp.protocol) is not Protocol.HTTP:
                continue
            short = f"{service.name}.{service.namespace}"
            names = [service.hostname, f"{short}.svc", short]
            if service.namespace == client_namespace:
                names.append(service.name)  # Istio adds the short name for its own namespace
            cluster_ip = addresses.get(f"{service.namespace}/{service.name}")
            if cluster_ip:
                names.append(cluster_ip)
            vhost_name = f"{service.hostname}:{sp.port}"
            cluster = f"outbound|{sp.port}||{service.hostname}"
            vhost = _virtual_host(vhost_name, names, sp.port, cluster)
            routed = routes_for(wp, mesh, service.hostname, sp.port)
            if routed is not None:
                vhost["routes"] = list(routed)  # shared: never changed in place
            if workload_routes:
                workloads = [w.ref for w in _selected(mesh, service)]
                if len(workloads) > 1:
                    vhost["routes"][:0] = [workload_route(cluster, ref) for ref in workloads]
            hosts.setdefault(sp.port, {})[vhost_name] = vhost
    for entry in visible_entries(mesh, client_namespace):
        spec: m.ServiceEntrySpec = entry.spec
        for port in spec.ports:
            if port_protocol(port.name, port.protocol) is not Protocol.HTTP:
                continue
            for host in sorted(set(spec.hosts)):
                vhost_name = f"{host}:{port.number}"
                vhost = _virtual_host(
                    vhost_name, [host], port.number, f"outbound|{port.number}||{host}"
                )
                routed = routes_for(wp, mesh, host, port.number)
                if routed is not None:
                    vhost["routes"] = list(routed)  # shared: never changed in place
                hosts.setdefault(port.number, {}).setdefault(vhost_name, vhost)
    for host in alias_hosts(wp, mesh):
        for number, port_hosts in hosts.items():
            alias = alias_virtual_host(wp, mesh, host, number, bare=number == 80)
            if alias is not None:
                port_hosts.setdefault(str(alias["name"]), alias)
    routes = []
    for number in sorted(hosts):
        seen: set[str] = set()
        virtual_hosts = []
        for vhost in hosts[number].values():
            # Envoy refuses a domain listed in two virtual hosts: the first one keeps it.
            vhost["domains"] = [d for d in vhost["domains"] if d not in seen]
            seen.update(vhost["domains"])
            if vhost["domains"]:
                virtual_hosts.append(vhost)
        virtual_hosts.append(default_virtual_host(wp.egress_mode))
        routes.append(
            {
                "@type": ROUTE_TYPE,
                "name": str(number),
                "virtual_hosts": virtual_hosts,
                "validate_clusters": False,
            }
        )
    return routes


WORKLOAD_HEADER = "x-trustmesh-workload"


def workload_subset(cluster: str, workload_ref: str) -> str:
    """``outbound|9080||reviews.default.svc.cluster.local`` + ``default/reviews-v2`` →
    ``outbound|9080|workload-reviews-v2|reviews.default.svc.cluster.local``."""
    direction, port, _, fqdn = cluster.split("|", 3)
    return f"{direction}|{port}|workload-{workload_ref.partition('/')[2]}|{fqdn}"


def workload_route(cluster: str, workload_ref: str) -> dict[str, Any]:
    """A route ahead of a service's default one: ``x-trustmesh-workload: NS/NAME`` goes
    to that workload's subset cluster only, and the header is removed on the way."""
    return {
        "name": f"workload {workload_ref}",
        "match": {
            "prefix": "/",
            "headers": [{"name": WORKLOAD_HEADER, "string_match": {"exact": workload_ref}}],
        },
        "route": {"cluster": workload_subset(cluster, workload_ref), "timeout": "0s"},
        "request_headers_to_remove": [WORKLOAD_HEADER],
    }


def _virtual_host(name: str, hostnames: list[str], port: int, cluster: str) -> dict[str, Any]:
    domains = [d for host in hostnames for d in (host, f"{host}:{port}")]
    return {
        "name": name,
        "domains": domains,
        "routes": [
            {
                "name": "default",
                "match": {"prefix": "/"},
                "route": {"cluster": cluster, "timeout": "0s"},
            }
        ],
    }


def default_virtual_host(
    mode: m.OutboundTrafficPolicyMode, allow_any_cluster: str = PASSTHROUGH_CLUSTER
) -> dict[str, Any]:
    """The catch-all virtual host: 502 under REGISTRY_ONLY, else to ``allow_any_cluster``."""
    if mode is m.OutboundTrafficPolicyMode.REGISTRY_ONLY:
        return {
            "name": "block_all",
            "domains": ["*"],
            "routes": [
                {"name": "block_all", "match": {"prefix": "/"}, "direct_response": {"status": 502}}
            ],
        }
    return {
        "name": "allow_any",
        "domains": ["*"],
        "routes": [
            {
                "name": "allow_any",
                "match": {"prefix": "/"},
                "route": {"cluster": allow_any_cluster, "timeout": "0s"},
            }
        ],
    }

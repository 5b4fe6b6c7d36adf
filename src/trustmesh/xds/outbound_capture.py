"""The client side of a captured sidecar: Istio's outbound listener layout (pure).

In a pod whose outbound TCP the runtime redirects to port 15001 (istio-init's nat rules),
the app dials real addresses — a Service's ClusterIP, a pod IP, anything — and its
sidecar learns from each connection where it was going. The listeners are Istio's:

* ``virtualOutbound`` on ``0.0.0.0:15001`` with ``use_original_dst``: Envoy hands each
  connection to the listener bound (``bind_to_port: false``) to its original
  ``address:port``, else to the one on ``0.0.0.0:port``; a connection no listener takes
  stays here and its catch-all chain sends it to ``PassthroughCluster`` (ALLOW_ANY: on
  to where it was going, plaintext) or ``BlackHoleCluster`` (REGISTRY_ONLY: closed). A
  connection to 15001 itself is blackholed (no loop).
* ``<ClusterIP>_<port>`` per TCP Service port: a TCP proxy to ``outbound|<port>||<fqdn>``
  (a Service without a ClusterIP in the plan has no address to dial and no listener).
* ``0.0.0.0_<port>`` per port with HTTP services or ServiceEntry hosts: plaintext HTTP
  (the HTTP inspector says so) goes through an HTTP connection manager whose route
  configuration ``"<port>"`` (RDS) picks the service by ``Host`` — its names and its
  ClusterIP — and sends unknown hosts to ``PassthroughCluster`` (ALLOW_ANY) or answers
  502 (REGISTRY_ONLY); TLS ServiceEntry hosts on that port are picked by SNI; anything
  else takes the default chain: a ServiceEntry's TCP port when one claims the port, else
  the passthrough / blackhole of ``outboundTrafficPolicy``.

``outboundTrafficPolicy`` is the workload's: the mesh setting or its Sidecar's override.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trustmesh.api import models as m
from trustmesh.envoy_json import (
    HCM_TYPE,
    LISTENER_TYPE,
    ROUTER_TYPE,
    TCP_PROXY_TYPE,
    TLS_INSPECTOR_TYPE,
    socket_address,
)
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.xds.inbound import PLAINTEXT_HTTP_ALPNS, RESERVED_PORTS, logs_every_request
from trustmesh.xds.outbound import (
    BLACKHOLE_CLUSTER,
    PASSTHROUGH_CLUSTER,
    Protocol,
    port_protocol,
)
from trustmesh.xds.outbound_listeners import access_log, http_log_fields, tcp_log_fields

__all__ = [
    "VIRTUAL_OUTBOUND_LISTENER",
    "VIRTUAL_OUTBOUND_PORT",
    "WILDCARD",
    "egress_cluster",
    "service_port_listeners",
    "virtual_outbound_listener",
]

VIRTUAL_OUTBOUND_LISTENER = "virtualOutbound"
VIRTUAL_OUTBOUND_PORT = 15001
WILDCARD = "0.0.0.0"
_HTTP_INSPECTOR = (
    "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"
)
_ADS = {"ads": {}, "resource_api_version": "V3"}


def egress_cluster(wp: WorkloadPolicy) -> str:
    """Where a connection to no known destination goes: ``outboundTrafficPolicy``."""
    if wp.egress_mode is m.OutboundTrafficPolicyMode.REGISTRY_ONLY:
        return BLACKHOLE_CLUSTER  # no endpoints: the connection is closed
    return PASSTHROUGH_CLUSTER  # ORIGINAL_DST: on to where the app was going


def virtual_outbound_listener(wp: WorkloadPolicy) -> dict[str, Any]:
    """``virtualOutbound``: where the capture rules send the app's outbound TCP."""
    return {
        "@type": LISTENER_TYPE,
        "name": VIRTUAL_OUTBOUND_LISTENER,
        "address": socket_address(WILDCARD, VIRTUAL_OUTBOUND_PORT),
        "use_original_dst": True,
        "traffic_direction": "OUTBOUND",
        "filter_chains": [
            {
                # Only a connection dialled to 15001 itself has this destination: Istio
                # refuses it rather than passing it back to this listener.
                "name": "virtualOutbound-blackhole",
                "filter_chain_match": {"destination_port": VIRTUAL_OUTBOUND_PORT},
                "filters": [_tcp_proxy(wp, BLACKHOLE_CLUSTER)],
            },
            {
                "name": "virtualOutbound-catchall-tcp",
                "filters": [_tcp_proxy(wp, egress_cluster(wp))],
            },
        ],
    }


@dataclass
class _Port:
    """What one outbound listener (``address:port``) serves, gathered from the registry."""

    address: str
    port: int
    http: bool = False  # the route configuration "<port>" serves plaintext HTTP
    sni: dict[str, str] = field(default_factory=dict)  # TLS server name → cluster
    tcp: dict[tuple[str, ...], str] = field(default_factory=dict)  # CIDRs (or none) → cluster

    @property
    def name(self) -> str:
        return f"{self.address}_{self.port}"


def service_port_listeners(
    wp: WorkloadPolicy, mesh: MeshPolicy, service_addresses: Mapping[str, str]
) -> list[dict[str, Any]]:
    """One listener per outbound ``address:port`` (see the module docstring), sorted by
    name. ``service_addresses``: Service ``namespace/name`` → ClusterIP."""
    listeners: dict[tuple[str, int], _Port] = {}

    def at(address: str, port: int) -> _Port:
        return listeners.setdefault((address, port), _Port(address, port))

    own = wp.workload.namespace
    # The client's own namespace first, then by hostname: who keeps a shared TCP port.
    for service in sorted(mesh.snapshot.services, key=lambda s: (s.namespace != own, s.hostname)):
        cluster_ip = service_addresses.get(f"{service.namespace}/{service.name}")
        for sp in sorted(service.ports, key=lambda p: p.port):
            if sp.port in RESERVED_PORTS:
                continue
            if port_protocol(sp.name, sp.protocol) is Protocol.HTTP:
                at(WILDCARD, sp.port).http = True
            elif cluster_ip:
                at(cluster_ip, sp.port).tcp.setdefault(
                    (), f"outbound|{sp.port}||{service.hostname}"
                )
    entries = sorted(mesh.snapshot.of_kind("ServiceEntry"), key=lambda r: (r.namespace, r.name))
    for entry in entries:
        spec: m.ServiceEntrySpec = entry.spec
        for sep in spec.ports:
            if sep.number in RESERVED_PORTS:
                continue
            protocol = sep.protocol.upper()
            if port_protocol(sep.name, sep.protocol) is Protocol.HTTP:
                at(WILDCARD, sep.number).http = True
            elif protocol in ("TLS", "HTTPS"):
                for host in sorted(set(spec.hosts)):
                    target = at(WILDCARD, sep.number)
                    target.sni.setdefault(host, f"outbound|{sep.number}||{host}")
            else:
                _entry_tcp(spec, sep.number, at)
    return [_listener(wp, mesh, entry) for _, entry in sorted(listeners.items(), key=_order)]


def _order(item: tuple[tuple[str, int], _Port]) -> str:
    return item[1].name


def _entry_tcp(spec: m.ServiceEntrySpec, port: int, at: Any) -> None:
    """A ServiceEntry TCP port: on its addresses (an IP gets a listener, a CIDR a chain on
    the wildcard one), or — without addresses — every connection to that port (Istio)."""
    cluster = f"outbound|{port}||{sorted(set(spec.hosts))[0]}"
    cidrs: list[str] = []
    for address in spec.addresses:
        try:
            network = ipaddress.ip_network(address, strict=False)
        except ValueError:
            continue  # validation reports it; nothing to listen on
        if network.num_addresses == 1 and "/" not in address:
            at(str(network.network_address), port).tcp.setdefault((), cluster)
        else:
            cidrs.append(str(network))
    if cidrs:
        at(WILDCARD, port).tcp.setdefault(tuple(cidrs), cluster)
    elif not spec.addresses:
        at(WILDCARD, port).tcp.setdefault((), cluster)


def _listener(wp: WorkloadPolicy, mesh: MeshPolicy, entry: _Port) -> dict[str, Any]:
    chains: list[dict[str, Any]] = []
    for host, cluster in entry.sni.items():
        chains.append(
            {
                "name": cluster,
                "filter_chain_match": {"server_names": [host]},
                "filters": [_tcp_proxy(wp, cluster)],
            }
        )
    for cidrs, cluster in entry.tcp.items():
        if cidrs:
            chains.append(
                {
                    "name": cluster,
                    "filter_chain_match": {"prefix_ranges": [_cidr(c) for c in cidrs]},
                    "filters": [_tcp_proxy(wp, cluster)],
                }
            )
    if entry.http:
        chains.append(
            {
                "name": f"{entry.name}-http",
                "filter_chain_match": {
                    "transport_protocol": "raw_buffer",
                    "application_protocols": list(PLAINTEXT_HTTP_ALPNS),
                },
                "filters": [_http_manager(wp, mesh, entry)],
            }
        )
    match_all = entry.tcp.get(())
    fallback = {
        "name": "PassthroughFilterChain" if match_all is None else f"{entry.name}-tcp",
        "filters": [_tcp_proxy(wp, match_all or egress_cluster(wp))],
    }
    listener: dict[str, Any] = {
        "@type": LISTENER_TYPE,
        "name": entry.name,
        "address": socket_address(entry.address, entry.port),
        # Only reached through virtualOutbound's hand-off: the port is not bound.
        "bind_to_port": False,
        "traffic_direction": "OUTBOUND",
    }
    if not chains:
        listener["filter_chains"] = [fallback]
        return listener
    filters = []
    if entry.sni:
        filters.append(
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": TLS_INSPECTOR_TYPE},
            }
        )
    if entry.http:
        filters.append(
            {
                "name": "envoy.filters.listener.http_inspector",
                "typed_config": {"@type": _HTTP_INSPECTOR},
            }
        )
    if filters:
        listener["listener_filters"] = filters
        # A server-speaks-first protocol sends nothing to inspect: after the timeout the
        # connection goes on, to the default chain.
        listener["continue_on_listener_filters_timeout"] = True
    listener["filter_chains"] = chains
    listener["default_filter_chain"] = fallback
    return listener


def _cidr(text: str) -> dict[str, Any]:
    network = ipaddress.ip_network(text, strict=False)
    return {"address_prefix": str(network.network_address), "prefix_len": network.prefixlen}


def _http_manager(wp: WorkloadPolicy, mesh: MeshPolicy, entry: _Port) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM_TYPE,
            "stat_prefix": f"outbound_{entry.name}",
            "codec_type": "AUTO",
            "rds": {"config_source": dict(_ADS), "route_config_name": str(entry.port)},
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}
            ],
            "use_remote_address": False,
            "access_log": [
                access_log(wp, http_log_fields(), every_request=logs_every_request(mesh))
            ],
        },
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

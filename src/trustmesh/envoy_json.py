"""Envoy proto3-JSON fragments both the agent's bootstraps and the xDS translation use.

Pure values, no I/O: the type URLs several modules name, how a socket address is
spelled, how a secret is fetched from the workload agent's SDS server, and how a TLS
context trusts the mesh bundle and pins the peer's SPIFFE ID. One definition, so a
sidecar's bootstrap and its ADS-delivered config can never disagree on them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "CERTIFICATE_SECRET",
    "DOWNSTREAM_TLS_TYPE",
    "HCM_TYPE",
    "HTTP_OPTIONS_TYPE",
    "LISTENER_TYPE",
    "ROUTER_TYPE",
    "STDOUT_LOG_TYPE",
    "TCP_PROXY_TYPE",
    "TLS_INSPECTOR_TYPE",
    "TRUST_BUNDLE_SECRET",
    "UPSTREAM_TLS_TYPE",
    "mesh_validation",
    "sds_secret",
    "socket_address",
]

_T = "type.googleapis.com/"
DOWNSTREAM_TLS_TYPE = _T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
HCM_TYPE = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
HTTP_OPTIONS_TYPE = _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
LISTENER_TYPE = _T + "envoy.config.listener.v3.Listener"
ROUTER_TYPE = _T + "envoy.extensions.filters.http.router.v3.Router"
STDOUT_LOG_TYPE = _T + "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
TCP_PROXY_TYPE = _T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
TLS_INSPECTOR_TYPE = _T + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
UPSTREAM_TLS_TYPE = _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"

# The secret names Istio's agent serves (the workload certificate and the trust bundle),
# so Istio-shaped configurations work unchanged.
CERTIFICATE_SECRET = "default"
TRUST_BUNDLE_SECRET = "ROOTCA"


CLUSTER_TYPE = _T + "envoy.config.cluster.v3.Cluster"
CONNECT_TIMEOUT = "10s"  # Istio's meshConfig.connectTimeout default


def dns_cluster(
    name: str, targets: Sequence[tuple[str, int]], *, logical: bool = False
) -> dict[str, Any]:
    """A cluster to ``targets`` (host, port) resolved by Envoy: STRICT_DNS (every address
    of every name is an endpoint) or LOGICAL_DNS (one name, its first address; for
    round-robin DNS names)."""
    return {
        "@type": CLUSTER_TYPE,
        "name": name,
        "type": "LOGICAL_DNS" if logical else "STRICT_DNS",
        "connect_timeout": CONNECT_TIMEOUT,
        "dns_lookup_family": "V4_ONLY",
        "respect_dns_ttl": True,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": socket_address(host, port)}}
                        for host, port in targets
                    ]
                }
            ],
        },
    }


def mesh_sni(port: int, host: str, subset: str = "") -> str:
    """The SNI a sidecar sends to a mesh destination, as istiod names it
    (``outbound_.<port>_.<subset>_.<fqdn>``): what an ``AUTO_PASSTHROUGH`` gateway and a
    server's ``connection.sni`` see."""
    return f"outbound_.{port}_.{subset}_.{host}"


def socket_address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def sds_secret(name: str, sds_cluster: str) -> dict[str, Any]:
    """A reference to an SDS secret served by the agent on ``sds_cluster`` (not over ADS:
    the private key never leaves the workload's host)."""
    return {
        "name": name,
        "sds_config": {
            "resource_api_version": "V3",
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": sds_cluster,
                            # Static clusters start in no fixed order, so the first SDS
                            # stream can fail with "cluster not available"; Envoy's 0.5 s
                            # default back-off would delay readiness. The agent is a local
                            # socket: reconnecting fast is cheap.
                            "retry_policy": {
                                "retry_back_off": {"base_interval": "0.02s", "max_interval": "2s"}
                            },
                        }
                    }
                ],
                "set_node_on_first_message_only": True,
            },
        },
    }


def mesh_validation(sds_cluster: str, peer_ids: Iterable[str] = ()) -> dict[str, Any]:
    """Trust the mesh bundle from SDS; pin the peer's URI SAN to ``peer_ids`` if any."""
    default: dict[str, Any] = {}
    pinned = sorted(set(peer_ids))
    if pinned:
        default["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": {"exact": spiffe_id}} for spiffe_id in pinned
        ]
    return {
        "default_validation_context": default,
        "validation_context_sds_secret_config": sds_secret(TRUST_BUNDLE_SECRET, sds_cluster),
    }

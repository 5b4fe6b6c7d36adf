"""A sidecar's static Envoy bootstrap: a pure function from a few frozen values.

:func:`sidecar_bootstrap` turns them into Envoy's proto3-JSON bootstrap: an inbound
listener that terminates mesh mTLS in front of the workload, and outbound listeners that
take the workload's plaintext and carry it to a peer over mTLS (``trustmesh agent
--static``, tests and benchmarks; the mesh's sidecars get theirs over xDS instead, see
:mod:`trustmesh.agent.xds_bootstrap`). Certificates and the trust bundle never appear in
the bootstrap: Envoy fetches them over SDS from the agent's Unix socket (see
:mod:`trustmesh.agent.sds`), so rotation needs no restart. The process that runs a
bootstrap is :class:`trustmesh.agent.envoy.EnvoyProcess`.

Example::

    bootstrap = sidecar_bootstrap(
        node_id="sidecar~10.0.0.1~web.shop~shop.svc.cluster.local",
        cluster="web.shop",
        sds_socket="/run/trustmesh/sds.sock",
        admin_address="127.0.0.1",
        admin_port=15000,
        inbound=InboundListener("10.0.0.1", 15006, Backend("127.0.0.1", 8080)),
        outbound=(
            OutboundListener(
                "127.0.0.1", 15001, Backend("10.0.0.2", 15006),
                expected_server_ids=frozenset({"spiffe://cluster.local/ns/shop/sa/cart"}),
            ),
        ),
    )
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any

from trustmesh.api.models import MtlsMode
from trustmesh.envoy_json import (
    CERTIFICATE_SECRET,
    DOWNSTREAM_TLS_TYPE,
    HCM_TYPE,
    HTTP_OPTIONS_TYPE,
    ROUTER_TYPE,
    TLS_INSPECTOR_TYPE,
    UPSTREAM_TLS_TYPE,
    mesh_validation,
    sds_secret,
    socket_address,
)

__all__ = [
    "SDS_CLUSTER",
    "Backend",
    "DirectResponse",
    "InboundListener",
    "MtlsMode",
    "OutboundListener",
    "check_spiffe_ids",
    "common_tls_context",
    "is_ip",
    "sds_cluster",
    "sidecar_bootstrap",
]

SDS_CLUSTER = "sds-grpc"  # Istio's name for the agent's SDS cluster
# Offered by a mesh client so a server can tell mesh mTLS from other TLS (Istio does the
# same); "http/1.1" last because the outbound clusters speak HTTP/1.1 and the server's
# codec follows the negotiated protocol.
_MESH_CLIENT_ALPN = ("istio-peer-exchange", "istio", "http/1.1")
_SERVER_ALPN = ("h2", "http/1.1")


@dataclass(frozen=True, slots=True)
class Backend:
    """A plaintext ``host:port`` a listener forwards to; ``host`` is an IP or a DNS name."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"backend host must be a non-empty string, got {self.host!r}")
        _check_port("backend port", self.port)


@dataclass(frozen=True, slots=True)
class DirectResponse:
    """An inbound listener that answers by itself: health stubs, tests, benchmark backends."""

    body: str
    status: int = 200

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"direct response status must be 200..599, got {self.status}")


@dataclass(frozen=True, slots=True)
class InboundListener:
    """The workload's front door: mesh mTLS terminated at ``address:port``.

    ``allowed_peer_ids`` are checked in the TLS handshake itself (URI SAN, exact), so a
    peer outside the set never gets a byte through; empty means any peer whose certificate
    chains to the trust bundle. Finer authorization belongs to RBAC, not here.
    """

    address: str
    port: int
    upstream: Backend | DirectResponse
    mode: MtlsMode = MtlsMode.STRICT
    allowed_peer_ids: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        _check_ip("inbound address", self.address)
        _check_port("inbound port", self.port)
        if not isinstance(self.upstream, Backend | DirectResponse):
            raise TypeError(f"upstream must be a Backend or DirectResponse, not {self.upstream!r}")
        if self.mode not in (MtlsMode.STRICT, MtlsMode.PERMISSIVE):
            # STRICT: mesh mTLS only; PERMISSIVE: mesh mTLS, or plaintext from workloads
            # without a sidecar (as PeerAuthentication says). Nothing else is a listener.
            raise TypeError(f"mode must be MtlsMode.STRICT or PERMISSIVE, not {self.mode!r}")
        check_spiffe_ids("allowed_peer_ids", self.allowed_peer_ids, allow_empty=True)


@dataclass(frozen=True, slots=True)
class OutboundListener:
    """A plaintext ``address:port`` for the workload, carried to ``upstream`` over mTLS.

    Envoy presents the mesh identity and accepts the server only if its certificate chains
    to the trust bundle and carries one of ``expected_server_ids`` as URI SAN. ``sni``
    defaults to Istio's ``outbound_.<port>_._.<host>``.
    """

    address: str
    port: int
    upstream: Backend
    expected_server_ids: frozenset[str]
    sni: str | None = None

    def __post_init__(self) -> None:
        _check_ip("outbound address", self.address)
        _check_port("outbound port", self.port)
        if not isinstance(self.upstream, Backend):
            raise TypeError(f"upstream must be a Backend, not {self.upstream!r}")
        # Zero trust: a client that would accept any mesh identity could be man-in-the-middled
        # by any workload, so the expected server identity is not optional.
        check_spiffe_ids("expected_server_ids", self.expected_server_ids, allow_empty=False)


def _check_port(what: str, port: int) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"{what} must be 1..65535, got {port!r}")


def _check_ip(what: str, address: str) -> None:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{what} must be an IP address, got {address!r}") from None


def check_spiffe_ids(what: str, ids: frozenset[str], *, allow_empty: bool) -> None:
    if not isinstance(ids, frozenset):
        raise TypeError(f"{what} must be a frozenset of SPIFFE IDs, not {type(ids).__name__}")
    if not ids and not allow_empty:
        raise ValueError(f"{what} must name at least one SPIFFE ID")
    for spiffe_id in ids:
        if not isinstance(spiffe_id, str) or not spiffe_id.startswith("spiffe://"):
            raise ValueError(f"{what}: {spiffe_id!r} is not a spiffe:// ID")
        if not spiffe_id.removeprefix("spiffe://").partition("/")[0]:
            raise ValueError(f"{what}: {spiffe_id!r} has no trust domain")


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- bootstrap


def sidecar_bootstrap(
    *,
    node_id: str,
    cluster: str,
    sds_socket: str,
    admin_address: str,
    admin_port: int,
    inbound: InboundListener | None,
    outbound: tuple[OutboundListener, ...] = (),
) -> dict[str, Any]:
    """The proto3-JSON bootstrap of a sidecar Envoy; pure, same input → same dict.

    ``admin_port`` may be 0 (Envoy picks one; :class:`EnvoyProcess` reads it back). The
    admin endpoint can stop Envoy and dump its config, so it must be on loopback.
    """
    _check_ip("admin address", admin_address)
    if not ipaddress.ip_address(admin_address).is_loopback:
        raise ValueError(f"admin address must be a loopback address, got {admin_address!r}")
    if not isinstance(admin_port, int) or not 0 <= admin_port <= 65535:
        raise ValueError(f"admin port must be 0..65535, got {admin_port!r}")
    if not os.path.isabs(sds_socket):
        raise ValueError(f"sds_socket must be an absolute path, got {sds_socket!r}")
    if not node_id or not cluster:
        raise ValueError("node_id and cluster must be non-empty")
    bound = [(admin_address, admin_port)] if admin_port else []
    bound += [(inbound.address, inbound.port)] if inbound is not None else []
    bound += [(o.address, o.port) for o in outbound]
    if len(set(bound)) != len(bound):
        raise ValueError(f"two listeners on the same address and port: {sorted(bound)}")

    listeners: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = [sds_cluster(sds_socket)]
    if inbound is not None:
        listener, backend_cluster = _inbound(inbound)
        listeners.append(listener)
        clusters += backend_cluster
    for out in outbound:
        listener, upstream_cluster = _outbound(out)
        listeners.append(listener)
        clusters.append(upstream_cluster)
    return {
        "node": {"id": node_id, "cluster": cluster},
        "admin": {"address": socket_address(admin_address, admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def sds_cluster(sds_socket: str) -> dict[str, Any]:
    return {
        "name": SDS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},  # gRPC needs HTTP/2
            }
        },
        "load_assignment": {
            "cluster_name": SDS_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": sds_socket}}}}]}
            ],
        },
    }


def common_tls_context(peer_ids: frozenset[str], alpn: tuple[str, ...]) -> dict[str, Any]:
    """Mesh identity and trust from SDS; the peer's URI SAN pinned to ``peer_ids`` if any."""
    return {
        # Envoy's client side stops at TLS 1.2 unless told otherwise.
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_2",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "alpn_protocols": list(alpn),
        "tls_certificate_sds_secret_configs": [sds_secret(CERTIFICATE_SECRET, SDS_CLUSTER)],
        "combined_validation_context": mesh_validation(SDS_CLUSTER, peer_ids),
    }


def _http_connection_manager(
    stat_prefix: str, route: dict[str, Any], *, inbound: bool
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "route_config": {
            "name": stat_prefix,
            "virtual_hosts": [{"name": stat_prefix, "domains": ["*"], "routes": [route]}],
        },
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}
        ],
    }
    if inbound:
        # The workload learns its authenticated caller from x-forwarded-client-cert; a
        # header the caller sent itself is replaced, never passed on.
        config["forward_client_cert_details"] = "SANITIZE_SET"
        config["set_current_client_cert_details"] = {"uri": True}
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


def _cluster(
    name: str, backend: Backend, transport_socket: dict[str, Any] | None = None
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if is_ip(backend.host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": socket_address(backend.host, backend.port)}}
                    ]
                }
            ],
        },
    }
    if transport_socket is not None:
        cluster["transport_socket"] = transport_socket
    return cluster


def _inbound_route(spec: InboundListener) -> dict[str, Any]:
    if isinstance(spec.upstream, DirectResponse):
        return {
            "match": {"prefix": "/"},
            "direct_response": {
                "status": spec.upstream.status,
                "body": {"inline_string": spec.upstream.body},
            },
        }
    return {"match": {"prefix": "/"}, "route": {"cluster": _inbound_cluster(spec)}}


def _inbound_cluster(spec: InboundListener) -> str:
    return f"inbound|{spec.port}||"  # Istio's inbound cluster name


def _inbound(spec: InboundListener) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    name = f"inbound_{spec.address}_{spec.port}"
    clusters = (
        [_cluster(_inbound_cluster(spec), spec.upstream)]
        if isinstance(spec.upstream, Backend)
        else []
    )

    def hcm() -> dict[str, Any]:  # a fresh dict per chain: no aliasing inside the bootstrap
        return _http_connection_manager(f"inbound_{spec.port}", _inbound_route(spec), inbound=True)

    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": DOWNSTREAM_TLS_TYPE,
            "common_tls_context": common_tls_context(spec.allowed_peer_ids, _SERVER_ALPN),
            "require_client_certificate": True,
        },
    }
    listener: dict[str, Any] = {"name": name, "address": socket_address(spec.address, spec.port)}
    if spec.mode is MtlsMode.STRICT:
        listener["filter_chains"] = [{"transport_socket": tls, "filters": [hcm()]}]
    else:
        # PERMISSIVE: peek at the first bytes to send TLS to the mTLS chain and
        # everything else to a plaintext chain (a caller without a sidecar).
        listener["listener_filters"] = [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": TLS_INSPECTOR_TYPE},
            }
        ]
        listener["filter_chains"] = [
            {
                "filter_chain_match": {"transport_protocol": "tls"},
                "transport_socket": tls,
                "filters": [hcm()],
            },
            {"filter_chain_match": {"transport_protocol": "raw_buffer"}, "filters": [hcm()]},
        ]
    return listener, clusters


def _outbound(spec: OutboundListener) -> tuple[dict[str, Any], dict[str, Any]]:
    # One cluster per listener: two listeners to the same host may pin different identities.
    name = f"outbound_{spec.address}_{spec.port}"
    host, port = spec.upstream.host, spec.upstream.port
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UPSTREAM_TLS_TYPE,
            "sni": spec.sni if spec.sni is not None else f"outbound_.{port}_._.{host}",
            "common_tls_context": common_tls_context(spec.expected_server_ids, _MESH_CLIENT_ALPN),
        },
    }
    route = {"match": {"prefix": "/"}, "route": {"cluster": name}}
    listener = {
        "name": name,
        "address": socket_address(spec.address, spec.port),
        "filter_chains": [
            {"filters": [_http_connection_manager(f"outbound_{spec.port}", route, inbound=False)]}
        ],
    }
    return listener, _cluster(name, spec.upstream, tls)


# ---------------------------------------------------------------------------- process

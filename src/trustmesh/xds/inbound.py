"""The server side of a sidecar: one inbound listener in front of the workload (pure).

The listener, ``virtualInbound``, binds ``<inbound address>:<port>`` for every workload
port (the first as its ``address``, the others as ``additional_addresses``): trustmesh
does not rely on iptables capture, so clients connect to the workload's ports on its own
address. Filter chains are chosen, as in Istio's ``virtualInbound``, by
``destination_port`` and what the TLS inspector saw (Istio's ``filterchain_options.go``):

==========  ==========================================================================
mode        chains for one port
==========  ==========================================================================
STRICT      ``inbound|<port>|mtls``: TLS, mesh mTLS terminated, client cert required.
            Plaintext finds no chain: the connection is reset.
PERMISSIVE  ``inbound|<port>|mtls`` (TLS offering an ``istio*`` ALPN) and
            ``inbound|<port>|plaintext``; TCP ports also ``inbound|<port>|tls``, other
            TLS passed through unterminated (a client without a sidecar speaking TLS).
DISABLE     ``inbound|<port>|plaintext`` only: TLS finds no chain.
==========  ==========================================================================

HTTP ports (see :func:`~trustmesh.xds.outbound.port_protocol`) run an HTTP connection
manager: path normalization per ``meshConfig.pathNormalization`` (what RBAC path rules
see), one trailing dot stripped from Host, ``x-forwarded-client-cert`` sanitized and set
from the verified peer certificate, then the request guards (:mod:`trustmesh.xds.guards`)
and the policy filters — CUSTOM stand-ins, jwt_authn, RBAC (AUDIT, DENY, ALLOW) — handed
in by :mod:`trustmesh.xds.translate`, then the router to ``inbound|<port>||``, a STATIC
cluster at ``<app address>:<port>``. TCP ports run the network RBAC filters, then a TCP
proxy to the same cluster.

Every chain logs one JSON line per request (HTTP) or connection (TCP) to stdout, with
the RBAC dynamic metadata: the enforced or shadow (dry-run) policy that matched,
``istio_dry_run_*_shadow_effective_policy_id`` and ``*_engine_result``. Connections that
match no chain (plaintext to STRICT) are logged by the listener with flag ``NR``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from trustmesh.api import models as m
from trustmesh.envoy_json import (
    CERTIFICATE_SECRET,
    DOWNSTREAM_TLS_TYPE,
    HCM_TYPE,
    LISTENER_TYPE,
    ROUTER_TYPE,
    STDOUT_LOG_TYPE,
    TCP_PROXY_TYPE,
    TLS_INSPECTOR_TYPE,
    mesh_validation,
    sds_secret,
    socket_address,
)
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.pathnorm import PathNormalization
from trustmesh.xds.guards import HOST_HCM_FIELDS
from trustmesh.xds.outbound import (
    Protocol,
    port_protocol,
    static_cluster,
    target_port,
)
from trustmesh.xds.rbac import DRY_RUN_ALLOW_PREFIX, DRY_RUN_DENY_PREFIX

__all__ = [
    "INBOUND_LISTENER",
    "LISTENER_TYPE",
    "ChainKind",
    "InboundPort",
    "app_cluster_name",
    "inbound_clusters",
    "inbound_listener",
    "inbound_ports",
]


INBOUND_LISTENER = "virtualInbound"
# What a mesh client offers (Istio's allIstioMtlsALPNs): a PERMISSIVE port tells mesh
# mTLS from TLS an application speaks by it.
MESH_ALPNS = ("istio-peer-exchange", "istio", "istio-http/1.0", "istio-http/1.1", "istio-h2")
_SERVER_HTTP_ALPN = ("h2", "http/1.1")
_SERVER_TCP_ALPN = ("istio-peer-exchange", "h2", "http/1.1")
# Istio's inbound cipher suites: ECDHE key exchange with AES-GCM (TLS 1.3 has its own).
_CIPHER_SUITES = (
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
)


class ChainKind(enum.Enum):
    """One filter chain of a port: which connections it takes."""

    MTLS = "mtls"  # mesh mTLS, terminated here
    PLAINTEXT = "plaintext"
    TLS_PASSTHROUGH = "tls"  # non-mesh TLS to a PERMISSIVE TCP port, not terminated


@dataclass(frozen=True, slots=True)
class InboundPort:
    """A workload port as the inbound listener serves it."""

    port: int
    protocol: Protocol
    mode: m.MtlsMode

    @property
    def chains(self) -> tuple[ChainKind, ...]:
        if self.mode is m.MtlsMode.STRICT:
            return (ChainKind.MTLS,)
        if self.mode is m.MtlsMode.DISABLE:
            return (ChainKind.PLAINTEXT,)
        if self.protocol is Protocol.TCP:
            return (ChainKind.MTLS, ChainKind.PLAINTEXT, ChainKind.TLS_PASSTHROUGH)
        return (ChainKind.MTLS, ChainKind.PLAINTEXT)


def inbound_ports(wp: WorkloadPolicy) -> tuple[InboundPort, ...]:
    """The workload's ports — container ports, Service target ports, ``portLevelMtls``
    ports — with the protocol of the first Service port that targets each (by namespace,
    name, port) and the effective PeerAuthentication mode (UNSET means PERMISSIVE)."""
    protocols: dict[int, Protocol] = {}
    for service in sorted(wp.services, key=lambda s: (s.namespace, s.name)):
        for sp in sorted(service.ports, key=lambda p: p.port):
            port = target_port(sp, wp.workload)
            if port is not None:
                protocols.setdefault(port, port_protocol(sp.name, sp.protocol))
    ports = set(wp.workload.ports) | set(protocols) | set(wp.mtls.ports)
    out = []
    for port in sorted(ports):
        mode = wp.mtls.for_port(port).mode
        if mode is m.MtlsMode.UNSET:
            mode = m.MtlsMode.PERMISSIVE
        out.append(InboundPort(port, protocols.get(port, Protocol.HTTP), mode))
    return tuple(out)


def app_cluster_name(port: int) -> str:
    return f"inbound|{port}||"  # Istio's inbound cluster name


def inbound_clusters(ports: Sequence[InboundPort], app_address: str) -> list[dict[str, Any]]:
    """One STATIC cluster per port, to the application at ``app_address:<port>``."""
    return [
        static_cluster(
            app_cluster_name(p.port),
            [{"endpoint": {"address": socket_address(app_address, p.port)}}],
        )
        for p in ports
    ]


# The policy filters of a chain: HTTP filters (all ports share them) or, for a TCP port,
# its network filters. Built by the caller so this module knows nothing of RBAC or JWT.
HttpFilters = Sequence[dict[str, Any]]
NetworkFilters = Callable[[int], Sequence[dict[str, Any]]]


def inbound_listener(
    wp: WorkloadPolicy,
    mesh: MeshPolicy,
    ports: Sequence[InboundPort],
    *,
    address: str,
    sds_cluster: str,
    http_filters: HttpFilters,
    network_filters: NetworkFilters,
) -> dict[str, Any]:
    """The ``virtualInbound`` listener for ``ports`` (at least one) on ``address``."""
    if not ports:
        raise ValueError(f"{wp.workload.ref} has no port to listen on")
    workload = wp.workload.ref
    chains = []
    for p in ports:
        for kind in p.chains:
            chain: dict[str, Any] = {
                "name": f"inbound|{p.port}|{kind.value}",
                "filter_chain_match": _chain_match(p, kind),
            }
            if kind is ChainKind.MTLS:
                chain["transport_socket"] = _downstream_tls(p.protocol, sds_cluster)
            if p.protocol is Protocol.HTTP:
                chain["filters"] = [_http_manager(workload, p.port, mesh, http_filters)]
            else:
                chain["filters"] = [
                    *network_filters(p.port),
                    _tcp_proxy(workload, p.port),
                ]
            chains.append(chain)
    listener: dict[str, Any] = {
        "@type": LISTENER_TYPE,
        "name": INBOUND_LISTENER,
        "address": socket_address(address, ports[0].port),
        "filter_chains": chains,
        "traffic_direction": "INBOUND",
        "access_log": [_no_chain_log(workload)],
    }
    if len(ports) > 1:
        listener["additional_addresses"] = [
            {"address": socket_address(address, p.port)} for p in ports[1:]
        ]
    if any(ChainKind.PLAINTEXT is not kind for p in ports for kind in p.chains):
        listener["listener_filters"] = [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": TLS_INSPECTOR_TYPE},
            }
        ]
        # A server-speaks-first protocol sends nothing for the inspector to read: after the
        # timeout the connection goes on as plaintext instead of being closed.
        listener["continue_on_listener_filters_timeout"] = True
    return listener


def _chain_match(p: InboundPort, kind: ChainKind) -> dict[str, Any]:
    match: dict[str, Any] = {"destination_port": p.port}
    if kind is ChainKind.PLAINTEXT:
        match["transport_protocol"] = "raw_buffer"
    else:
        match["transport_protocol"] = "tls"
        if kind is ChainKind.MTLS and p.mode is m.MtlsMode.PERMISSIVE:
            match["application_protocols"] = list(MESH_ALPNS)
    return match


def _downstream_tls(protocol: Protocol, sds_cluster: str) -> dict[str, Any]:
    alpn = _SERVER_HTTP_ALPN if protocol is Protocol.HTTP else _SERVER_TCP_ALPN
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": DOWNSTREAM_TLS_TYPE,
            "common_tls_context": {
                "tls_params": {
                    "tls_minimum_protocol_version": "TLSv1_2",
                    "tls_maximum_protocol_version": "TLSv1_3",
                    "cipher_suites": list(_CIPHER_SUITES),
                },
                "alpn_protocols": list(alpn),
                "tls_certificate_sds_secret_configs": [sds_secret(CERTIFICATE_SECRET, sds_cluster)],
                "combined_validation_context": mesh_validation(sds_cluster),
            },
            "require_client_certificate": True,
        },
    }


def path_normalization(mode: PathNormalization) -> dict[str, Any]:
    """HCM fields for ``meshConfig.pathNormalization``, as Istio's listener builder sets
    them (checked against Envoy 1.40, istio-semantics.md §5)."""
    fields: dict[str, Any] = {"normalize_path": mode is not PathNormalization.NONE}
    if mode in (PathNormalization.MERGE_SLASHES, PathNormalization.DECODE_AND_MERGE_SLASHES):
        fields["merge_slashes"] = True
    fields["path_with_escaped_slashes_action"] = (
        "UNESCAPE_AND_FORWARD"
        if mode is PathNormalization.DECODE_AND_MERGE_SLASHES
        else "KEEP_UNCHANGED"
    )
    return fields


def _http_manager(
    workload: str, port: int, mesh: MeshPolicy, policy_filters: HttpFilters
) -> dict[str, Any]:
    cluster = app_cluster_name(port)
    config: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": f"inbound_{port}",
        "codec_type": "AUTO",
        "route_config": {
            "name": cluster,
            "virtual_hosts": [
                {
                    "name": f"inbound|http|{port}",
                    "domains": ["*"],
                    "routes": [
                        {
                            "name": "default",
                            "match": {"prefix": "/"},
                            "route": {"cluster": cluster, "timeout": "0s"},
                        }
                    ],
                }
            ],
            "validate_clusters": False,
        },
        "http_filters": [
            *policy_filters,
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}},
        ],
        **path_normalization(mesh.path_normalization),
        # Not Istio's: ``internal.foo.`` would otherwise escape hosts: ["internal.foo"].
        **HOST_HCM_FIELDS,
        # The application learns its caller from x-forwarded-client-cert: a value the
        # caller sent itself is dropped and replaced by what the handshake verified.
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {"subject": True, "uri": True},
        "use_remote_address": False,
        "access_log": [_http_log(workload, port, every_request=logs_every_request(mesh))],
    }
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


def _tcp_proxy(workload: str, port: int) -> dict[str, Any]:
    cluster = app_cluster_name(port)
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": TCP_PROXY_TYPE,
            "stat_prefix": cluster,
            "cluster": cluster,
            "access_log": [_tcp_log(workload, port)],
        },
    }


def _stdout_log(fields: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": STDOUT_LOG_TYPE,
            "log_format": {"json_format": fields},
        },
        **extra,
    }


def _connection_fields(workload: str) -> dict[str, str]:
    return {
        "start_time": "%START_TIME%",
        "workload": workload,
        "direction": "inbound",
        "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
        "peer_principal": "%DOWNSTREAM_PEER_URI_SAN%",
        "requested_server_name": "%REQUESTED_SERVER_NAME%",
        "response_flags": "%RESPONSE_FLAGS%",
    }


def logs_every_request(mesh: MeshPolicy) -> bool:
    """``meshConfig.accessLogFile`` set: Istio's switch for logging every request."""
    return bool(mesh.snapshot.mesh.access_log_file)


# Security-relevant requests are logged even with access logging off: what was refused
# (any status >= 400: RBAC 403, JWT 401, normalization 400, upstream errors) and what a
# dry-run policy would have denied. A JSON line with dynamic metadata costs Envoy ~15 % of
# a request (callgrind, bench/bench_dataplane.py), too much to pay on every success.
_DENIED_STATUS: dict[str, Any] = {
    "status_code_filter": {
        "comparison": {
            "op": "GE",
            "value": {"default_value": 400, "runtime_key": "trustmesh.access_log.min_status"},
        }
    }
}


def denied_requests_only(*, dry_run: bool) -> dict[str, Any]:
    """An access-log filter passing refused requests (and, with ``dry_run``, requests a
    dry-run policy would have denied)."""
    if not dry_run:
        return _DENIED_STATUS
    shadow = [
        {
            "metadata_filter": {
                "matcher": {
                    "filter": "envoy.filters.http.rbac",
                    "path": [{"key": f"{prefix}shadow_engine_result"}],
                    "value": {"string_match": {"exact": "denied"}},
                },
                # Envoy's default logs a request without the key: no dry-run, no line.
                "match_if_key_not_found": False,
            }
        }
        for prefix in (DRY_RUN_DENY_PREFIX, DRY_RUN_ALLOW_PREFIX)
    ]
    return {"or_filter": {"filters": [_DENIED_STATUS, *shadow]}}


def _http_log(workload: str, port: int, *, every_request: bool) -> dict[str, Any]:
    extra = {} if every_request else {"filter": denied_requests_only(dry_run=True)}
    return _stdout_log(
        {
            **_connection_fields(workload),
            "port": str(port),
            "protocol": "%PROTOCOL%",
            "method": "%REQ(:METHOD)%",
            "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
            "authority": "%REQ(:AUTHORITY)%",
            "request_id": "%REQ(X-REQUEST-ID)%",  # ties a client's request to this line
            "response_code": "%RESPONSE_CODE%",
            "response_code_details": "%RESPONSE_CODE_DETAILS%",
            "request_principal_iss": "%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:payload:iss)%",
            "request_principal_sub": "%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:payload:sub)%",
            # Enforced and shadow (dry-run) effective policy ids and engine results.
            "rbac": "%DYNAMIC_METADATA(envoy.filters.http.rbac)%",
            "upstream_host": "%UPSTREAM_HOST%",
            "duration_ms": "%DURATION%",
        },
        **extra,
    )


def _tcp_log(workload: str, port: int) -> dict[str, Any]:
    return _stdout_log(
        {
            **_connection_fields(workload),
            "port": str(port),
            "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%",
            "rbac": "%DYNAMIC_METADATA(envoy.filters.network.rbac)%",
            "upstream_host": "%UPSTREAM_HOST%",
            "bytes_received": "%BYTES_RECEIVED%",
            "bytes_sent": "%BYTES_SENT%",
            "duration_ms": "%DURATION%",
        }
    )


def _no_chain_log(workload: str) -> dict[str, Any]:
    fields = {**_connection_fields(workload), "message": "no filter chain matched"}
    del fields["peer_principal"]  # no chain: no TLS was terminated
    # NR: the connection matched no filter chain (e.g. plaintext to a STRICT port).
    return _stdout_log(fields, filter={"response_flag_filter": {"flags": ["NR"]}})

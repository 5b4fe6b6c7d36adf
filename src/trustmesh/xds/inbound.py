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
from the verified peer certificate, websocket upgrades and ``Expect`` forwarded as in
Istio (:func:`inbound_request_fields`; what they leave of a request's headers is
:mod:`trustmesh.policy.request_headers`), then the request guards (:mod:`trustmesh.xds.guards`)
and the policy filters — CUSTOM (per provider a shadow RBAC filter and the ext_authz
filter it enables), jwt_authn, RBAC (AUDIT, DENY, ALLOW) — handed in by
:mod:`trustmesh.xds.translate`, then the router to ``inbound|<port>||``, a STATIC cluster
at ``<app address>:<port>``. TCP ports run the network filters in the same order (CUSTOM
for gRPC providers, then RBAC), then a TCP proxy to the same cluster.

Every chain logs one JSON line per request (HTTP) or connection (TCP) to stdout, with
the RBAC dynamic metadata: the enforced or shadow (dry-run) policy that matched,
``istio_dry_run_*_shadow_effective_policy_id`` and ``*_engine_result``. Connections that
match no chain (plaintext to STRICT) are logged by the listener with flag ``NR``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from trustmesh.api import models as m
from trustmesh.envoy_json import (
    CERTIFICATE_SECRET,
    DOWNSTREAM_TLS_TYPE,
    HCM_TYPE,
    HTTP_OPTIONS_TYPE,
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
    CLUSTER_TYPE,
    Protocol,
    port_protocol,
    static_cluster,
    target_port,
)
from trustmesh.xds.rbac import DRY_RUN_ALLOW_PREFIX, DRY_RUN_DENY_PREFIX

__all__ = [
    "INBOUND_LISTENER",
    "INBOUND_PASSTHROUGH_CLUSTER",
    "LISTENER_TYPE",
    "PASSTHROUGH_SOURCE",
    "PLAINTEXT_HTTP_ALPNS",
    "RESERVED_PORTS",
    "VIRTUAL_INBOUND_PORT",
    "ChainKind",
    "InboundPort",
    "PassthroughScope",
    "app_cluster_name",
    "capture_inbound_clusters",
    "inbound_clusters",
    "inbound_listener",
    "inbound_ports",
    "passthrough_scopes",
    "service_ports",
    "virtual_inbound_listener",
]


INBOUND_LISTENER = "virtualInbound"
VIRTUAL_INBOUND_PORT = 15006  # where the capture rules redirect inbound TCP
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"
# Envoy's upstream source for connections to the app: the capture rules let it through
# on loopback (istio-init: `-o lo -s 127.0.0.6 -j RETURN`), so it is not captured again.
PASSTHROUGH_SOURCE = "127.0.0.6"
# Envoy's and the agent's own ports (admin, outbound, inbound, status, health, metrics):
# the capture rules leave them alone, so no workload port may be served on them.
RESERVED_PORTS = frozenset({15000, 15001, 15006, 15020, 15021, 15090})
BLACKHOLE = "BlackHoleCluster"
_ORIGINAL_DST = "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
_HTTP_INSPECTOR = (
    "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"
)
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
    return _all_ports(wp)


def _all_ports(wp: WorkloadPolicy) -> tuple[InboundPort, ...]:
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
# (None: a passthrough chain, for any port.)
NetworkFilters = Callable[[int | None], Sequence[dict[str, Any]]]


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
        chains += _port_chains(wp, mesh, p, sds_cluster, http_filters, network_filters)
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


# ---------------------------------------------------------------------------- captured


def service_ports(wp: WorkloadPolicy) -> tuple[InboundPort, ...]:
    """The workload's Service target ports (Istio's service targets), each with the
    protocol of the first Service port targeting it and its PeerAuthentication mode —
    the ports ``virtualInbound`` gives chains of their own under capture. Envoy's own
    ports are left out: the capture rules never send them to 15006."""
    targets: set[int] = set()
    for service in wp.services:
        for sp in service.ports:
            port = target_port(sp, wp.workload)
            if port is not None and port not in RESERVED_PORTS:
                targets.add(port)
    return tuple(p for p in _all_ports(wp) if p.port in targets)


@dataclass(frozen=True, slots=True)
class PassthroughScope:
    """Connections to a port no Service declares: every such port (``port`` None), or one
    with a ``portLevelMtls`` setting of its own — Istio's passthrough filter chains."""

    port: int | None
    mode: m.MtlsMode

    @property
    def chains(self) -> tuple[tuple[Protocol, ChainKind], ...]:
        """The protocol is sniffed (Istio's "auto"): HTTP chains take what the TLS
        inspector's ALPN or the HTTP inspector says is HTTP, TCP chains the rest."""
        if self.mode is m.MtlsMode.STRICT:
            return ((Protocol.HTTP, ChainKind.MTLS), (Protocol.TCP, ChainKind.MTLS))
        if self.mode is m.MtlsMode.DISABLE:
            return ((Protocol.HTTP, ChainKind.PLAINTEXT), (Protocol.TCP, ChainKind.PLAINTEXT))
        return (
            (Protocol.HTTP, ChainKind.MTLS),
            (Protocol.HTTP, ChainKind.PLAINTEXT),
            (Protocol.TCP, ChainKind.MTLS),
            (Protocol.TCP, ChainKind.PLAINTEXT),
            (Protocol.TCP, ChainKind.TLS_PASSTHROUGH),
        )


def passthrough_scopes(
    wp: WorkloadPolicy, served: Sequence[InboundPort]
) -> tuple[PassthroughScope, ...]:
    """The workload-wide passthrough (its effective mode), then one per ``portLevelMtls``
    port that is not a Service port (Istio's ``ForPassthrough``), by port."""
    scopes = [PassthroughScope(None, _effective(wp.mtls.workload.mode))]
    taken = {p.port for p in served} | RESERVED_PORTS
    for port in sorted(set(wp.mtls.ports) - taken):
        scopes.append(PassthroughScope(port, _effective(wp.mtls.for_port(port).mode)))
    return tuple(scopes)


def _effective(mode: m.MtlsMode) -> m.MtlsMode:
    return m.MtlsMode.PERMISSIVE if mode is m.MtlsMode.UNSET else mode


def capture_inbound_clusters(ports: Sequence[InboundPort]) -> list[dict[str, Any]]:
    """``inbound|<port>||`` per Service port and ``InboundPassthroughCluster``: to the
    connection's original destination (the pod IP and port the client dialled), from
    127.0.0.6 — Istio's default (``inboundTrafficPolicy`` PASSTHROUGH). The app must
    listen on the pod IP (``0.0.0.0``), as in Istio since 1.10, and the capture rules let
    127.0.0.6 through on loopback, so Envoy's own forward is not captured again."""
    clusters = [_original_destination(app_cluster_name(p.port)) for p in ports]
    passthrough = _original_destination(INBOUND_PASSTHROUGH_CLUSTER)
    # A port no Service declares has no known protocol: HTTP goes on as the client spoke
    # it (h2c stays h2c), as Istio's passthrough cluster does. A declared HTTP port's
    # cluster speaks HTTP/1.1 to the app, as in the per-address layout.
    passthrough["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": HTTP_OPTIONS_TYPE,
            "use_downstream_protocol_config": {
                "http_protocol_options": {},
                "http2_protocol_options": {},
            },
        }
    }
    return [*clusters, passthrough]


def _original_destination(name: str) -> dict[str, Any]:
    return {
        "@type": CLUSTER_TYPE,
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
        "upstream_bind_config": {
            "source_address": {"address": PASSTHROUGH_SOURCE, "port_value": 0}
        },
    }


def virtual_inbound_listener(
    wp: WorkloadPolicy,
    mesh: MeshPolicy,
    ports: Sequence[InboundPort],
    scopes: Sequence[PassthroughScope],
    *,
    sds_cluster: str,
    http_filters: HttpFilters,
    network_filters: NetworkFilters,
) -> dict[str, Any]:
    """``virtualInbound`` on ``0.0.0.0:15006``, where the capture rules send every inbound
    TCP connection: the ``original_dst`` listener filter restores the address the client
    dialled, then the chains pick by destination port (an exact port before any), TLS and
    ALPN — the chains of :func:`inbound_listener` for each Service port, then the
    passthrough chains of ``scopes`` to ``InboundPassthroughCluster`` with the same
    policy filters, and a blackhole for 15006 itself (no loop)."""
    workload = wp.workload.ref
    chains: list[dict[str, Any]] = [
        {
            "name": "virtualInbound-blackhole",
            "filter_chain_match": {"destination_port": VIRTUAL_INBOUND_PORT},
            "filters": [_tcp_proxy(workload, VIRTUAL_INBOUND_PORT, BLACKHOLE)],
        }
    ]
    for scope in scopes:
        where = "*" if scope.port is None else str(scope.port)
        for protocol, kind in scope.chains:
            chain: dict[str, Any] = {
                "name": f"passthrough|{where}|{protocol.value.lower()}-{kind.value}",
                "filter_chain_match": _passthrough_match(scope, protocol, kind),
            }
            if kind is ChainKind.MTLS:
                chain["transport_socket"] = _downstream_tls(protocol, sds_cluster)
            if protocol is Protocol.HTTP:
                manager = _http_manager(
                    workload, None, mesh, http_filters, INBOUND_PASSTHROUGH_CLUSTER
                )
                chain["filters"] = [manager]
            else:
                chain["filters"] = [
                    *network_filters(None),
                    _tcp_proxy(workload, None, INBOUND_PASSTHROUGH_CLUSTER),
                ]
            chains.append(chain)
    for p in ports:
        chains += _port_chains(wp, mesh, p, sds_cluster, http_filters, network_filters)
    listener: dict[str, Any] = {
        "@type": LISTENER_TYPE,
        "name": INBOUND_LISTENER,
        "address": socket_address("0.0.0.0", VIRTUAL_INBOUND_PORT),
        "filter_chains": chains,
        "traffic_direction": "INBOUND",
        "listener_filters": [
            {
                "name": "envoy.filters.listener.original_dst",
                "typed_config": {"@type": _ORIGINAL_DST},
            },
            *_inspectors(chains),
        ],
        # As on the per-address listener: a server-speaks-first protocol goes on as
        # plaintext after the inspectors' timeout instead of being closed.
        "continue_on_listener_filters_timeout": True,
        "access_log": [_no_chain_log(workload)],
    }
    return listener


# Istio's ALPN lists (listener.go): what a mesh client offers for HTTP, for TCP, and
# what the HTTP inspector reports for plaintext HTTP (HTTP/1.0 only with PILOT_HTTP10).
_MTLS_HTTP_ALPNS = ("istio-http/1.0", "istio-http/1.1", "istio-h2")
_MTLS_TCP_ALPNS = ("istio-peer-exchange", "istio")
PLAINTEXT_HTTP_ALPNS = ("http/1.1", "h2c")


def _passthrough_match(
    scope: PassthroughScope, protocol: Protocol, kind: ChainKind
) -> dict[str, Any]:
    match: dict[str, Any] = {}
    if scope.port is not None:
        match["destination_port"] = scope.port
    match["transport_protocol"] = "raw_buffer" if kind is ChainKind.PLAINTEXT else "tls"
    if protocol is Protocol.HTTP:
        mtls = kind is ChainKind.MTLS
        match["application_protocols"] = list(_MTLS_HTTP_ALPNS if mtls else PLAINTEXT_HTTP_ALPNS)
    elif kind is ChainKind.MTLS and scope.mode is m.MtlsMode.PERMISSIVE:
        match["application_protocols"] = list(_MTLS_TCP_ALPNS)
    return match


def _port_chains(
    wp: WorkloadPolicy,
    mesh: MeshPolicy,
    p: InboundPort,
    sds_cluster: str,
    http_filters: HttpFilters,
    network_filters: NetworkFilters,
) -> list[dict[str, Any]]:
    chains = []
    for kind in p.chains:
        chain: dict[str, Any] = {
            "name": f"inbound|{p.port}|{kind.value}",
            "filter_chain_match": _chain_match(p, kind),
        }
        if kind is ChainKind.MTLS:
            chain["transport_socket"] = _downstream_tls(p.protocol, sds_cluster)
        if p.protocol is Protocol.HTTP:
            chain["filters"] = [_http_manager(wp.workload.ref, p.port, mesh, http_filters)]
        else:
            chain["filters"] = [*network_filters(p.port), _tcp_proxy(wp.workload.ref, p.port)]
        chains.append(chain)
    return chains


def _inspectors(chains: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The TLS and HTTP inspectors, each only on the ports whose chains need it (Istio's
    ``populateListenerFilters``): a DISABLE or declared-TCP port is never held waiting
    for a ClientHello or an HTTP request line that a server-first protocol never sends.
    Port 0 stands for the chains without a destination port (the passthrough)."""
    tls: dict[int, bool] = {}
    http: dict[int, bool] = {}
    for chain in chains:
        match = chain.get("filter_chain_match", {})
        port = int(match.get("destination_port", 0))
        if port == VIRTUAL_INBOUND_PORT:
            continue
        tls[port] = tls.get(port, False) or match.get("transport_protocol") == "tls"
        alpn = match.get("application_protocols", [])
        http[port] = http.get(port, False) or any(a in ("http/1.1", "h2c") for a in alpn)
    filters = []
    if any(tls.values()):
        if tls.get(0, False):
            disabled = _port_ranges(p for p, on in tls.items() if p and not on)
        else:
            enabled = _port_ranges(p for p, on in tls.items() if p and on)
            disabled = {"not_match": enabled} if enabled else None
        inspector: dict[str, Any] = {
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": TLS_INSPECTOR_TYPE},
        }
        if disabled:
            inspector["filter_disabled"] = disabled
        filters.append(inspector)
    if any(http.values()):
        inspector = {
            "name": "envoy.filters.listener.http_inspector",
            "typed_config": {"@type": _HTTP_INSPECTOR},
        }
        disabled = _port_ranges(p for p, on in http.items() if p and not on)
        if not http.get(0, False):
            # Only some exact ports sniff HTTP: everything else skips the inspector.
            enabled = _port_ranges(p for p, on in http.items() if p and on)
            disabled = {"not_match": enabled} if enabled else None
        if disabled:
            inspector["filter_disabled"] = disabled
        filters.append(inspector)
    return filters


def _port_ranges(ports: Iterable[int]) -> dict[str, Any] | None:
    """A listener-filter predicate matching connections to any of ``ports``."""
    rules = [{"destination_port_range": {"start": p, "end": p + 1}} for p in sorted(set(ports))]
    if not rules:
        return None
    return rules[0] if len(rules) == 1 else {"or_match": {"rules": rules}}


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


def inbound_request_fields() -> dict[str, Any]:
    """How the inbound connection manager treats request headers before any filter runs —
    what :mod:`trustmesh.policy.request_headers` models for the evaluator (the RBAC
    differential test's listeners use it too, so both sides see the same request)."""
    return {
        # Not Istio's: ``internal.foo.`` would otherwise escape hosts: ["internal.foo"].
        **HOST_HCM_FIELDS,
        # The application learns its caller from x-forwarded-client-cert: a value the
        # caller sent itself is dropped and replaced by what the handshake verified (Istio
        # appends instead).
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {"subject": True, "uri": True},
        "use_remote_address": False,
        # Istio's: websocket upgrades reach the filters and the app (any other upgrade is
        # a 403), and Expect: 100-continue is forwarded (ENABLE_100_CONTINUE_HEADERS).
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "proxy_100_continue": True,
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
    workload: str,
    port: int | None,
    mesh: MeshPolicy,
    policy_filters: HttpFilters,
    cluster: str | None = None,
) -> dict[str, Any]:
    """The HCM of a port's HTTP chain (to ``inbound|<port>||``), or with ``port`` None of
    a passthrough chain (to ``cluster``, whatever port the connection was for)."""
    cluster = cluster or app_cluster_name(port or 0)
    config: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": f"inbound_{port}" if port is not None else cluster,
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
        **inbound_request_fields(),
        "access_log": [_http_log(workload, port, every_request=logs_every_request(mesh))],
    }
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


def _tcp_proxy(workload: str, port: int | None, cluster: str | None = None) -> dict[str, Any]:
    cluster = cluster or app_cluster_name(port or 0)
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


def _port_field(port: int | None) -> str:
    # A passthrough chain serves any port: the log says which one the connection was for.
    return str(port) if port is not None else "%DOWNSTREAM_LOCAL_PORT%"


def _http_log(workload: str, port: int | None, *, every_request: bool) -> dict[str, Any]:
    extra = {} if every_request else {"filter": denied_requests_only(dry_run=True)}
    return _stdout_log(
        {
            **_connection_fields(workload),
            "port": _port_field(port),
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


def _tcp_log(workload: str, port: int | None) -> dict[str, Any]:
    return _stdout_log(
        {
            **_connection_fields(workload),
            "port": _port_field(port),
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

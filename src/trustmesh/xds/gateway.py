"""An ingress gateway's Envoy configuration from Gateway + VirtualService (pure).

A gateway pod (``istio: ingressgateway``, Istio's ``inject.istio.io/templates: gateway``…)
runs an Envoy in router mode: no application, no capture. Istio's gateway listener layout,
as ``pilot/pkg/networking/core/gateway.go`` builds it:

* one listener per port the selecting Gateways' servers use (the gateway Service's
  ``targetPort`` for the server's port number: :class:`~trustmesh.api.gateway.GatewayServer`);
* a plaintext port: one HTTP connection manager, routes ``http.<port>`` over RDS;
* an HTTPS port: a filter chain per server, matched by SNI on the server's hosts (none for
  ``*``), terminating TLS with the ``credentialName`` certificate
  (``kubernetes://NAME``), and for MUTUAL / OPTIONAL_MUTUAL validating client
  certificates against ``kubernetes://NAME-cacert`` and ``subjectAltNames``; the
  certificates are Secrets served over ADS by the control plane (as istiod serves them
  to a gateway), so a changed Secret reaches Envoy as an SDS push: new handshakes use the
  new certificate, open connections carry on, nothing restarts;
* every connection manager: ``use_remote_address`` with
  ``xff_num_trusted_hops = gatewayTopology.numTrustedProxies`` (the client address
  ``remoteIpBlocks`` see), x-forwarded-client-cert sanitized, then the same HTTP policy
  filters a sidecar gets (the request guards, CUSTOM, jwt_authn, RBAC from the policies
  selecting the gateway pod, over ECDS), then the router;
* a ``PASSTHROUGH`` server (HTTPS or TLS): no TLS termination; a filter chain per
  VirtualService ``tls`` match, chosen by SNI (``server_names`` = its ``sniHosts``, on the
  same listener as the port's terminated servers), the network RBAC filters of the
  policies selecting the gateway, then ``tcp_proxy`` to the route's destination (weighted
  clusters for several); the client's TLS reaches the destination untouched;
* a ``TLS`` server that terminates (``SIMPLE`` / ``MUTUAL``…): its TLS filter chain as an
  HTTPS server's (no ALPN), then the network RBAC filters and ``tcp_proxy`` to its first
  matching ``tcp`` route;
* a ``TCP`` server: one filter chain, the network RBAC filters, ``tcp_proxy`` to the
  first VirtualService ``tcp`` route that matches it (port, gateways) — Istio's
  ``buildGatewayTCPBasedFilterChains``; a port with no route gets no listener, as in Istio;
* clusters: the services the gateway sends to, with mesh mTLS from the gateway's own
  certificate (its SPIFFE identity) where the endpoint has a sidecar (auto mTLS), and a
  cluster per DestinationRule subset (:func:`trustmesh.xds.outbound.outbound_clusters`).

Anything in the input the gateway cannot honour raises :class:`GatewayConfigError` with
the diagnostics; the control plane then keeps the gateway's last configuration.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from trustmesh.api.dataplane import MeshMode
from trustmesh.api.diagnostics import Diagnostic, error
from trustmesh.api.gateway import (
    CA_SUFFIX,
    SECRET_PREFIX,
    BoundVirtualService,
    GatewayServer,
    TlsCredential,
    bound_virtual_services,
    ca_certificate,
    gateway_servers,
    num_trusted_proxies,
    tls_credential,
)
from trustmesh.api.gateway_models import (
    RouteDestination,
    ServerTlsMode,
    ServerTlsSettings,
    TlsProtocol,
)
from trustmesh.api.snapshot import ConfigSnapshot
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
from trustmesh.identity.pki import key_pair_problem, load_certs
from trustmesh.policy.compose import MeshPolicy
from trustmesh.xds.cache import TYPE_SECRET
from trustmesh.xds.gateway_egress import service_entry_clusters
from trustmesh.xds.gateway_routes import (
    RouteTable,
    destination_cluster,
    route_configuration,
)
from trustmesh.xds.guards import HOST_HCM_FIELDS
from trustmesh.xds.inbound import denied_requests_only, logs_every_request, path_normalization
from trustmesh.xds.jwt import jwks_clusters
from trustmesh.xds.outbound import outbound_clusters
from trustmesh.xds.rbac import network_rbac_filters
from trustmesh.xds.translate import FilterDelivery, http_policy_filters, slot_switches

__all__ = [
    "GatewayConfigError",
    "GatewayResources",
    "gateway_diagnostics",
    "gateway_listen_ports",
    "is_gateway",
    "translate_gateway",
]

_ADS = {"ads": {}, "resource_api_version": "V3"}
_HTTP_ALPN = ("h2", "http/1.1")
# Envoy's (BoringSSL's) TLS 1.2 cipher names; TLS 1.3 suites are not configurable.
KNOWN_CIPHERS = frozenset(
    {
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-PSK-CHACHA20-POLY1305",
        "ECDHE-ECDSA-AES128-SHA",
        "ECDHE-RSA-AES128-SHA",
        "ECDHE-PSK-AES128-CBC-SHA",
        "ECDHE-ECDSA-AES256-SHA",
        "ECDHE-RSA-AES256-SHA",
        "ECDHE-PSK-AES256-CBC-SHA",
        "AES128-GCM-SHA256",
        "AES256-GCM-SHA384",
        "AES128-SHA",
        "PSK-AES128-CBC-SHA",
        "AES256-SHA",
        "PSK-AES256-CBC-SHA",
        "DES-CBC3-SHA",
    }
)


class GatewayConfigError(ValueError):
    """The gateway's configuration asks for something it cannot do; nothing is served."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = tuple(diagnostics)
        super().__init__("; ".join(str(d) for d in diagnostics[:10]))


@dataclass(frozen=True)
class GatewayResources:
    """Everything a gateway Envoy is served (listeners, clusters, routes, policy filters
    over ECDS, and the credentialName certificates as SDS secrets)."""

    listeners: tuple[dict[str, Any], ...]
    clusters: tuple[dict[str, Any], ...]
    routes: tuple[dict[str, Any], ...]
    extension_configs: tuple[dict[str, Any], ...]
    secrets: tuple[dict[str, Any], ...]

    def all(self) -> tuple[dict[str, Any], ...]:
        return (
            *self.clusters,
            *self.listeners,
            *self.routes,
            *self.secrets,
            *self.extension_configs,
        )


def is_gateway(mesh: MeshPolicy, workload_ref: str) -> bool:
    workload = mesh.snapshot.workload(workload_ref)
    return workload is not None and workload.dataplane.mode is MeshMode.GATEWAY


def gateway_listen_ports(mesh: MeshPolicy, workload_ref: str) -> tuple[int, ...]:
    """The ports the gateway listens on (what ``status`` shows), whatever their problems."""
    workload = mesh.snapshot.workload(workload_ref)
    if workload is None:
        return ()
    servers, _ = gateway_servers(mesh.snapshot, workload)
    return tuple(sorted({s.listen_port for s in servers}))


def gateway_diagnostics(mesh: MeshPolicy, workload_ref: str) -> list[Diagnostic]:
    """Why the gateway cannot be configured (empty: it can)."""
    try:
        translate_gateway(mesh, workload_ref, address="127.0.0.1")
    except GatewayConfigError as exc:
        return list(exc.diagnostics)
    return []


def translate_gateway(
    mesh: MeshPolicy,
    workload_ref: str,
    *,
    address: str,
    sds_cluster: str = "sds-grpc",
    workload_addresses: Mapping[str, str] | None = None,
    delivery: FilterDelivery = FilterDelivery.ECDS,
) -> GatewayResources:
    """The resources of gateway pod ``workload_ref``, its listeners bound on ``address``.

    Raises ``LookupError`` for an unknown workload, ``ValueError`` for one that is no
    gateway, :class:`GatewayConfigError` for configuration it cannot honour.
    """
    wp = mesh.for_workload(workload_ref)
    workload = mesh.snapshot.workload(workload_ref)
    if wp is None or workload is None:
        raise LookupError(f"unknown workload {workload_ref!r}")
    if workload.dataplane.mode is not MeshMode.GATEWAY:
        raise ValueError(f"{workload_ref} is not a gateway ({workload.dataplane.describe()})")
    snapshot = mesh.snapshot
    servers, problems = gateway_servers(snapshot, workload)
    refs = sorted({s.ref for s in servers})
    bound, vs_problems = bound_virtual_services(snapshot, refs, workload.namespace)
    problems.extend(vs_problems)
    problems.extend(_tls_problems(servers))
    secrets, secret_problems = _secrets(mesh, workload.namespace, servers)
    problems.extend(secret_problems)
    egress = service_entry_clusters(mesh, workload.namespace, sds_cluster)
    if problems:
        raise GatewayConfigError(problems)

    http_filters, extension_configs = http_policy_filters(wp, mesh, delivery)
    trusted_hops = num_trusted_proxies(snapshot, workload)
    table = RouteTable()
    listeners: list[dict[str, Any]] = []
    routes: list[dict[str, Any]] = []
    by_port: dict[int, list[GatewayServer]] = {}
    for server in servers:
        by_port.setdefault(server.listen_port, []).append(server)
    l4 = _L4(bound, snapshot, table, lambda port: network_rbac_filters(wp, mesh, port))
    for port, port_servers in sorted(by_port.items()):
        if port_servers[0].is_tcp:
            tcp_chains = l4.tcp_chains(port, port_servers[0])
            if tcp_chains:  # no route: no listener (Istio builds no filter chain)
                listeners.append(_listener(address, port, tcp_chains, tls=False))
            continue
        manager = _Manager(workload_ref, mesh, http_filters, trusted_hops)
        if not port_servers[0].inspects_tls:
            name = f"http.{port}"
            routes.append(route_configuration(name, port_servers, bound, snapshot, table))
            chains = [{"filters": [manager.build(name, port)]}]
            listeners.append(_listener(address, port, chains, tls=False))
            continue
        chains = []
        taken: dict[str, str] = {}  # SNI name ("" for any) → the server with its chain
        for server in port_servers:
            if server.is_passthrough:
                continue
            names = _server_names(server)
            for key in names or ("",):
                if key in taken:
                    raise GatewayConfigError(
                        [
                            error(
                                "gateway-duplicate-server",
                                server.location("hosts"),
                                f"port {port}: these hosts are already served by "
                                f"{taken[key]} (one TLS server per SNI name)",
                            )
                        ]
                    )
                taken[key] = f"{server.ref} servers[{server.index}]"
            if server.terminates_tcp:
                # TLS terminated, then the bytes inside to the first matching tcp route.
                tcp = l4.tcp_chains(port, server)
                if not tcp:
                    continue  # no route: no chain, as in Istio
                chain: dict[str, Any] = tcp[0]
                socket = _downstream_tls(server, sds_cluster, http=False)
            else:
                name = _https_route_name(server)
                routes.append(route_configuration(name, [server], bound, snapshot, table))
                chain = {"filters": [manager.build(name, port)]}
                socket = _downstream_tls(server, sds_cluster)
            chain["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": socket,
            }
            if names:
                chain["filter_chain_match"] = {"server_names": list(names)}
            chains.append(chain)
        chains.extend(l4.passthrough_chains(port, port_servers, taken))
        if chains:  # passthrough servers without a tls route: no listener, as in Istio
            listeners.append(_listener(address, port, chains, tls=True))

    routed = _routed_clusters(routes)
    broken = [d for name, found in sorted(egress.broken.items()) if name in routed for d in found]
    if broken:
        raise GatewayConfigError(broken)
    routes = [_with_policy_slots(r, extension_configs) for r in routes]
    clusters: dict[str, dict[str, Any]] = {}
    service_clusters = outbound_clusters(wp, mesh, sds_cluster, workload_addresses)
    for cluster in (
        *egress.clusters,  # ServiceEntry hosts: endpoints and TLS origination
        # with a cluster per DestinationRule subset the routes name
        *(c for c in service_clusters if c["name"] not in egress.broken),
        *jwks_clusters(wp.jwt_providers),
    ):
        clusters.setdefault(cluster["name"], cluster)
    return GatewayResources(
        listeners=tuple(sorted(listeners, key=lambda x: str(x["name"]))),
        clusters=tuple(clusters[name] for name in sorted(clusters)),
        routes=tuple(sorted(routes, key=lambda r: str(r["name"]))),
        extension_configs=tuple(sorted(extension_configs, key=lambda e: str(e["name"]))),
        secrets=_merged_secrets(secrets, egress.secrets),
    )


def _routed_clusters(routes: Sequence[dict[str, Any]]) -> set[str]:
    """Every cluster the route configurations name."""
    names: set[str] = set()
    for config in routes:
        for vhost in config["virtual_hosts"]:
            for route in vhost.get("routes", ()):
                action = route.get("route", {})
                if "cluster" in action:
                    names.add(str(action["cluster"]))
                for weighted in action.get("weighted_clusters", {}).get("clusters", ()):
                    names.add(str(weighted["name"]))
    return names


def _merged_secrets(
    servers: Sequence[dict[str, Any]], origination: Sequence[dict[str, Any]]
) -> tuple[dict[str, Any], ...]:
    """The servers' credentialName secrets and the DestinationRules' (one per name: both
    read the same Secret of the gateway's namespace)."""
    merged: dict[str, dict[str, Any]] = {}
    for secret in (*servers, *origination):
        merged.setdefault(str(secret["name"]), secret)
    return tuple(merged[name] for name in sorted(merged))


# ---------------------------------------------------------------------- listeners


def _with_policy_slots(
    route: dict[str, Any], extension_configs: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Switch on, in every virtual host, the policy slots that hold a policy (the listener
    carries them disabled, as a sidecar's: :mod:`trustmesh.xds.translate`), and answer
    a Host no VirtualService names from a ``*`` virtual host without routes, as Istio's
    blackhole one: policy first (403 / 401), then 404."""
    hosts = list(route["virtual_hosts"])
    if not any("*" in h["domains"] for h in hosts):
        port = str(route["name"]).split(".")[1]
        hosts.append({"name": f"blackhole:{port}", "domains": ["*"], "routes": []})
    enabled = slot_switches(extension_configs)
    if enabled:
        hosts = [{**h, "typed_per_filter_config": dict(enabled)} for h in hosts]
    return {**route, "virtual_hosts": hosts}


def _listener(address: str, port: int, chains: list[dict[str, Any]], *, tls: bool) -> Any:
    listener: dict[str, Any] = {
        "@type": LISTENER_TYPE,
        "name": f"{address}_{port}",
        "address": socket_address(address, port),
        "filter_chains": chains,
    }
    if tls:
        listener["listener_filters"] = [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": TLS_INSPECTOR_TYPE},
            }
        ]
    return listener


def _https_route_name(server: GatewayServer) -> str:
    name = server.server.port.name or str(server.index)
    gateway = server.gateway
    return f"https.{server.server.port.number}.{name}.{gateway.name}.{gateway.namespace}"


def _server_names(server: GatewayServer) -> tuple[str, ...]:
    names = server.host_names()
    if "*" in names:
        return ()  # any SNI, and none
    return tuple(sorted(n.lower() for n in names))


@dataclass(frozen=True)
class _Manager:
    workload: str
    mesh: MeshPolicy
    policy_filters: list[dict[str, Any]]
    trusted_hops: int

    def build(self, route_name: str, port: int) -> dict[str, Any]:
        config: dict[str, Any] = {
            "@type": HCM_TYPE,
            "stat_prefix": route_name,
            "codec_type": "AUTO",
            "rds": {"config_source": _ADS, "route_config_name": route_name},
            "http_filters": [
                *copy.deepcopy(self.policy_filters),
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}},
            ],
            # The edge: the client address is the connection's peer, or, behind
            # numTrustedProxies proxies, the X-Forwarded-For entry that many hops from the
            # right — what remoteIpBlocks and the access log see.
            "use_remote_address": True,
            "xff_num_trusted_hops": self.trusted_hops,
            # A client's own x-forwarded-client-cert is never passed on.
            "forward_client_cert_details": "SANITIZE_SET",
            "set_current_client_cert_details": {"subject": True, "uri": True, "dns": True},
            "server_name": "istio-envoy",
            "upgrade_configs": [{"upgrade_type": "websocket"}],
            **HOST_HCM_FIELDS,
            **path_normalization(self.mesh.path_normalization),
            "access_log": [self._log(port)],
        }
        return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}

    def _log(self, port: int) -> dict[str, Any]:
        fields = {
            "start_time": "%START_TIME%",
            "workload": self.workload,
            "direction": "gateway",
            "port": str(port),
            "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
            "downstream_direct_remote_address": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%",
            "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
            "requested_server_name": "%REQUESTED_SERVER_NAME%",
            "peer_subject": "%DOWNSTREAM_PEER_SUBJECT%",
            # The mesh client's SPIFFE ID behind an ISTIO_MUTUAL server: who was denied.
            "source_principal": "%DOWNSTREAM_PEER_URI_SAN%",
            "method": "%REQ(:METHOD)%",
            "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
            "authority": "%REQ(:AUTHORITY)%",
            "request_id": "%REQ(X-REQUEST-ID)%",
            "response_code": "%RESPONSE_CODE%",
            "response_code_details": "%RESPONSE_CODE_DETAILS%",
            "response_flags": "%RESPONSE_FLAGS%",
            "route_name": "%ROUTE_NAME%",
            "request_principal_iss": "%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:payload:iss)%",
            "request_principal_sub": "%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:payload:sub)%",
            "rbac": "%DYNAMIC_METADATA(envoy.filters.http.rbac)%",
            "upstream_host": "%UPSTREAM_HOST%",
            "upstream_cluster": "%UPSTREAM_CLUSTER%",
            "duration_ms": "%DURATION%",
        }
        log: dict[str, Any] = {
            "name": "envoy.access_loggers.stdout",
            "typed_config": {"@type": STDOUT_LOG_TYPE, "log_format": {"json_format": fields}},
        }
        if not logs_every_request(self.mesh):
            log["filter"] = denied_requests_only(dry_run=True)
        return log


# ------------------------------------------------------------ passthrough and TCP


@dataclass(frozen=True)
class _L4:
    """The filter chains of passthrough and TCP servers, from the ``tls`` / ``tcp`` routes
    of the VirtualServices bound to them (oldest first)."""

    bound: Sequence[BoundVirtualService]
    snapshot: ConfigSnapshot
    table: RouteTable
    network_filters: Callable[[int], list[dict[str, Any]]]

    def _routing(self, server: GatewayServer) -> Iterator[BoundVirtualService]:
        """The VirtualServices bound to ``server`` (naming its Gateway, a host it admits)."""
        for vs in self.bound:
            if server.ref in {_ref(vs.namespace, g) for g in vs.spec.gateways} and any(
                server.admits(vs.resource, host) for host in vs.spec.hosts
            ):
                yield vs

    def passthrough_chains(
        self, port: int, servers: Sequence[GatewayServer], taken: dict[str, str]
    ) -> list[dict[str, Any]]:
        """A chain per ``tls`` match of a passthrough server on ``port``, by SNI. ``taken``:
        SNI name ("" for any) → who already has a chain for it on this port (updated)."""
        chains = []
        done: set[tuple[str, int, int]] = set()  # a match two servers route: one chain
        for server in servers:
            if not server.is_passthrough:
                continue
            for vs in self._routing(server):
                for i, route in enumerate(vs.spec.tls):
                    for j, match in enumerate(route.match):
                        if not _l4_applies(match.port, match.gateways, vs, server):
                            continue
                        if (vs.resource.key, i, j) in done:
                            continue
                        done.add((vs.resource.key, i, j))
                        names = sorted({n.lower() for n in match.sni_hosts})
                        # Envoy matches "*" with no server_names at all (Istio leaves it out).
                        keys = [n for n in names if n != "*"] if "*" not in names else [""]
                        where = vs.resource.location("tls", i, "match", j, "sniHosts")
                        for key in keys:
                            if key in taken:
                                raise GatewayConfigError(
                                    [
                                        error(
                                            "gateway-duplicate-server",
                                            where,
                                            f"port {port}: SNI {key or '*'} is already "
                                            f"served by {taken[key]} (one filter chain per "
                                            "SNI name)",
                                        )
                                    ]
                                )
                            taken[key] = f"{vs.resource.kind} {vs.namespace}/" + (
                                f"{vs.resource.name} tls[{i}]"
                            )
                        chain: dict[str, Any] = {
                            "filters": [
                                *self.network_filters(port),
                                self._tcp_proxy(route.route, vs, port),
                            ]
                        }
                        if keys != [""]:
                            chain["filter_chain_match"] = {"server_names": keys}
                        chains.append(chain)
        return chains

    def tcp_chains(self, port: int, server: GatewayServer) -> list[dict[str, Any]]:
        """The TCP server's one chain: its first matching ``tcp`` route (none: [])."""
        for vs in self._routing(server):
            for route in vs.spec.tcp:
                if not route.match or any(
                    _l4_applies(m.port, m.gateways, vs, server) for m in route.match
                ):
                    filters = [*self.network_filters(port), self._tcp_proxy(route.route, vs, port)]
                    return [{"filters": filters}]
        return []

    def _tcp_proxy(
        self, destinations: Sequence[RouteDestination], vs: BoundVirtualService, port: int
    ) -> dict[str, Any]:
        clusters = [
            (destination_cluster(d.destination, vs, self.snapshot, self.table, port), d.weight)
            for d in destinations
        ]
        config: dict[str, Any] = {"@type": TCP_PROXY_TYPE}
        if len(clusters) == 1:
            config["stat_prefix"] = config["cluster"] = clusters[0][0]
        else:
            # Istio leaves 0-weight destinations out; the weights left need not sum to 100.
            config["stat_prefix"] = "weighted_clusters"
            config["weighted_clusters"] = {
                "clusters": [{"name": name, "weight": w} for name, w in clusters if w > 0]
            }
        return {"name": "envoy.filters.network.tcp_proxy", "typed_config": config}


def _ref(namespace: str, gateway: str) -> str:
    return gateway if "/" in gateway else f"{namespace}/{gateway}"


def _l4_applies(
    port: int | None, gateways: Sequence[str], vs: BoundVirtualService, server: GatewayServer
) -> bool:
    """Istio's l4SingleMatch at a gateway: the match's port (the server's port number) and
    gateways, when set."""
    if port is not None and port != server.server.port.number:
        return False
    return not gateways or server.ref in {_ref(vs.namespace, g) for g in gateways}


# ---------------------------------------------------------------------------- TLS


def _tls_problems(servers: Sequence[GatewayServer]) -> list[Diagnostic]:
    problems = []
    for server in servers:
        tls = server.server.tls
        if tls is None or not server.terminates:
            continue
        for j, cipher in enumerate(tls.cipher_suites):
            if cipher not in KNOWN_CIPHERS:
                problems.append(
                    error(
                        "invalid-field",
                        server.location("tls", "cipherSuites", j),
                        f"{cipher!r} is not a cipher suite Envoy knows (TLS 1.2 names such "
                        "as ECDHE-RSA-AES128-GCM-SHA256)",
                    )
                )
        low, high = tls.min_protocol_version, tls.max_protocol_version
        if (
            low is not TlsProtocol.TLS_AUTO
            and high is not TlsProtocol.TLS_AUTO
            and low.value > high.value
        ):
            problems.append(
                error(
                    "invalid-field",
                    server.location("tls", "minProtocolVersion"),
                    f"minProtocolVersion {low.value} is above maxProtocolVersion {high.value}",
                )
            )
    return problems


def _secret_config(name: str) -> dict[str, Any]:
    return {"name": name, "sds_config": _ADS}


def _downstream_tls(
    server: GatewayServer, sds_cluster: str, *, http: bool = True
) -> dict[str, Any]:
    tls = server.server.tls
    assert tls is not None
    mode = tls.mode
    # HTTP inside: h2 or HTTP/1.1 by ALPN; a TLS (TCP) server offers none, as Istio's.
    common: dict[str, Any] = {"alpn_protocols": list(_HTTP_ALPN)} if http else {}
    params: dict[str, Any] = {"tls_minimum_protocol_version": "TLSv1_2"}  # mesh tlsDefaults
    if tls.min_protocol_version is not TlsProtocol.TLS_AUTO:
        params["tls_minimum_protocol_version"] = tls.min_protocol_version.envoy
    if tls.max_protocol_version is not TlsProtocol.TLS_AUTO:
        params["tls_maximum_protocol_version"] = tls.max_protocol_version.envoy
    else:
        params["tls_maximum_protocol_version"] = "TLSv1_3"
    if tls.cipher_suites:
        params["cipher_suites"] = list(dict.fromkeys(tls.cipher_suites))
    common["tls_params"] = params
    sans = _san_matchers(tls)
    if mode is ServerTlsMode.ISTIO_MUTUAL:
        common["tls_certificate_sds_secret_configs"] = [sds_secret(CERTIFICATE_SECRET, sds_cluster)]
        validation = mesh_validation(sds_cluster)
        if sans:
            validation["default_validation_context"]["match_typed_subject_alt_names"] = sans
        common["combined_validation_context"] = validation
    else:
        common["tls_certificate_sds_secret_configs"] = [
            _secret_config(SECRET_PREFIX + tls.credential_name)
        ]
        if mode in (ServerTlsMode.MUTUAL, ServerTlsMode.OPTIONAL_MUTUAL):
            default: dict[str, Any] = {}
            if sans:
                default["match_typed_subject_alt_names"] = sans
            common["combined_validation_context"] = {
                "default_validation_context": default,
                "validation_context_sds_secret_config": _secret_config(
                    SECRET_PREFIX + _ca_name(tls)
                ),
            }
        elif sans:
            common["validation_context"] = {"match_typed_subject_alt_names": sans}
    return {
        "@type": DOWNSTREAM_TLS_TYPE,
        "common_tls_context": common,
        "require_client_certificate": mode in (ServerTlsMode.MUTUAL, ServerTlsMode.ISTIO_MUTUAL),
    }


def _san_matchers(tls: ServerTlsSettings) -> list[dict[str, Any]]:
    # Istio's match_subject_alt_names: any SAN of the certificate equal to any listed value.
    return [
        {"san_type": san_type, "matcher": {"exact": value}}
        for value in tls.subject_alt_names
        for san_type in ("DNS", "URI", "EMAIL", "IP_ADDRESS")
    ]


def _ca_name(tls: ServerTlsSettings) -> str:
    return tls.ca_cert_credential_name or tls.credential_name + CA_SUFFIX


def _secrets(
    mesh: MeshPolicy, namespace: str, servers: Sequence[GatewayServer]
) -> tuple[list[dict[str, Any]], list[Diagnostic]]:
    """The credentialName Secrets of the gateway's own namespace, as SDS secrets."""
    secrets: dict[str, dict[str, Any]] = {}
    problems: list[Diagnostic] = []
    for server in servers:
        tls = server.server.tls
        if tls is None or not server.terminates or tls.mode is ServerTlsMode.ISTIO_MUTUAL:
            continue
        credential = tls_credential(mesh.snapshot, namespace, tls.credential_name)
        if isinstance(credential, str):
            problems.append(
                error(
                    "gateway-credential",
                    server.location("tls", "credentialName"),
                    f"{credential} (a gateway reads credentialName from its own namespace)",
                )
            )
            continue
        problems.extend(_pem_problems(credential))
        secrets[SECRET_PREFIX + tls.credential_name] = {
            "@type": TYPE_SECRET,
            "name": SECRET_PREFIX + tls.credential_name,
            "tls_certificate": {
                "certificate_chain": {"inline_string": credential.certificate_chain},
                "private_key": {"inline_string": credential.private_key},
            },
        }
        if tls.mode not in (ServerTlsMode.MUTUAL, ServerTlsMode.OPTIONAL_MUTUAL):
            continue
        ca_name = _ca_name(tls)
        source = tls.ca_cert_credential_name or tls.credential_name
        ca = ca_certificate(mesh.snapshot, namespace, source)
        if ca is None:
            problems.append(
                error(
                    "gateway-credential",
                    server.location("tls", "credentialName"),
                    f"tls.mode {tls.mode.value} needs a CA: Secret {namespace}/{source} has no "
                    f"ca.crt and there is no Secret {namespace}/{source}{CA_SUFFIX}",
                )
            )
            continue
        if not _certificates(ca.pem):
            problems.append(error("gateway-credential", ca.location, "is not a PEM CA certificate"))
        secrets[SECRET_PREFIX + ca_name] = {
            "@type": TYPE_SECRET,
            "name": SECRET_PREFIX + ca_name,
            "validation_context": {"trusted_ca": {"inline_string": ca.pem}},
        }
    return list(secrets.values()), problems


def _certificates(pem: str) -> list[x509.Certificate]:
    try:
        return load_certs(pem.encode())
    except ValueError:
        return []


def _pem_problems(credential: TlsCredential) -> list[Diagnostic]:
    """What Envoy would refuse (a NACK): checked here to name the Secret's file and key."""
    chain = _certificates(credential.certificate_chain)
    if not chain:
        where = credential.certificate_location
        return [error("gateway-credential", where, "is not a PEM certificate chain")]
    problem = key_pair_problem(credential.private_key.encode(), chain[0])
    if problem is not None:
        return [error("gateway-credential", credential.key_location, problem)]
    return []

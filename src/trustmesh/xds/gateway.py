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
* clusters: the services the gateway sends to, with mesh mTLS from the gateway's own
  certificate (its SPIFFE identity) where the endpoint has a sidecar (auto mTLS), and a
  cluster per DestinationRule subset a route names.

Anything in the input the gateway cannot honour raises :class:`GatewayConfigError` with
the diagnostics; the control plane then keeps the gateway's last configuration.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from trustmesh.api.dataplane import MeshMode
from trustmesh.api.diagnostics import Diagnostic, error
from trustmesh.api.gateway import (
    CA_SUFFIX,
    SECRET_PREFIX,
    GatewayServer,
    TlsCredential,
    bound_virtual_services,
    ca_certificate,
    gateway_servers,
    num_trusted_proxies,
    tls_credential,
)
from trustmesh.api.gateway_models import ServerTlsMode, ServerTlsSettings, TlsProtocol
from trustmesh.envoy_json import (
    CERTIFICATE_SECRET,
    DOWNSTREAM_TLS_TYPE,
    HCM_TYPE,
    LISTENER_TYPE,
    ROUTER_TYPE,
    STDOUT_LOG_TYPE,
    TLS_INSPECTOR_TYPE,
    mesh_validation,
    sds_secret,
    socket_address,
)
from trustmesh.identity.pki import key_pair_problem, load_certs
from trustmesh.policy.compose import MeshPolicy
from trustmesh.xds.cache import TYPE_SECRET
from trustmesh.xds.gateway_routes import RouteTable, cluster_name, route_configuration
from trustmesh.xds.guards import HOST_HCM_FIELDS
from trustmesh.xds.inbound import denied_requests_only, logs_every_request, path_normalization
from trustmesh.xds.jwt import jwks_clusters
from trustmesh.xds.outbound import outbound_clusters
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
    for port, port_servers in sorted(by_port.items()):
        manager = _Manager(workload_ref, mesh, http_filters, trusted_hops)
        if not port_servers[0].is_tls:
            name = f"http.{port}"
            routes.append(route_configuration(name, port_servers, bound, snapshot, table))
            chains = [{"filters": [manager.build(name, port)]}]
            listeners.append(_listener(address, port, chains, tls=False))
            continue
        chains = []
        seen: dict[tuple[str, ...], GatewayServer] = {}
        for server in port_servers:
            name = _https_route_name(server)
            routes.append(route_configuration(name, [server], bound, snapshot, table))
            names = _server_names(server)
            if names in seen:
                other = seen[names]
                raise GatewayConfigError(
                    [
                        error(
                            "gateway-duplicate-server",
                            server.location("hosts"),
                            f"port {port}: these hosts are already served by {other.ref} "
                            f"servers[{other.index}] (one TLS server per SNI name)",
                        )
                    ]
                )
            seen[names] = server
            chain: dict[str, Any] = {
                "filters": [manager.build(name, port)],
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": _downstream_tls(server, sds_cluster),
                },
            }
            if names:
                chain["filter_chain_match"] = {"server_names": list(names)}
            chains.append(chain)
        listeners.append(_listener(address, port, chains, tls=True))

    routes = [_with_policy_slots(r, extension_configs) for r in routes]
    clusters: dict[str, dict[str, Any]] = {}
    service_clusters = outbound_clusters(wp, mesh, sds_cluster, workload_addresses)
    for cluster in (
        *service_clusters,
        *_subset_clusters(mesh, workload.namespace, service_clusters, table),
        *jwks_clusters(wp.jwt_providers),
    ):
        clusters.setdefault(cluster["name"], cluster)
    return GatewayResources(
        listeners=tuple(sorted(listeners, key=lambda x: str(x["name"]))),
        clusters=tuple(clusters[name] for name in sorted(clusters)),
        routes=tuple(sorted(routes, key=lambda r: str(r["name"]))),
        extension_configs=tuple(sorted(extension_configs, key=lambda e: str(e["name"]))),
        secrets=tuple(sorted(secrets, key=lambda s: str(s["name"]))),
    )


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


# ---------------------------------------------------------------------------- TLS


def _tls_problems(servers: Sequence[GatewayServer]) -> list[Diagnostic]:
    problems = []
    for server in servers:
        tls = server.server.tls
        if tls is None or not server.is_tls:
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


def _downstream_tls(server: GatewayServer, sds_cluster: str) -> dict[str, Any]:
    tls = server.server.tls
    assert tls is not None
    mode = tls.mode
    common: dict[str, Any] = {"alpn_protocols": list(_HTTP_ALPN)}
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
        if tls is None or not server.is_tls or tls.mode is ServerTlsMode.ISTIO_MUTUAL:
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


# ------------------------------------------------------------------------ clusters


def _subset_clusters(
    mesh: MeshPolicy,
    client_namespace: str,
    service_clusters: Sequence[dict[str, Any]],
    table: RouteTable,
) -> list[dict[str, Any]]:
    """``outbound|port|subset|host``: the service's cluster with the endpoints whose
    workload carries the DestinationRule subset's labels."""
    by_name = {str(c["name"]): c for c in service_clusters}
    out = []
    for fqdn, port, subset in sorted(table.subsets):
        base = by_name.get(cluster_name(port, "", fqdn))
        labels = _subset_labels(mesh, client_namespace, fqdn, subset)
        if base is None or labels is None:
            continue  # Istio routes to a cluster that does not exist: 503
        cluster = copy.deepcopy(base)
        name = cluster_name(port, subset, fqdn)
        cluster["name"] = name
        assignment = cluster.get("load_assignment", {})
        assignment["cluster_name"] = name
        for group in assignment.get("endpoints", []):
            group["lb_endpoints"] = [
                e for e in group.get("lb_endpoints", []) if _has_labels(mesh, e, labels)
            ]
        out.append(cluster)
    return out


def _subset_labels(
    mesh: MeshPolicy, client_namespace: str, fqdn: str, subset: str
) -> Mapping[str, str] | None:
    root = mesh.snapshot.mesh.root_namespace
    service_namespace = fqdn.split(".")[1] if fqdn.count(".") >= 1 else ""
    rules = sorted(mesh.snapshot.of_kind("DestinationRule"), key=lambda r: r.age_key())
    for namespace in dict.fromkeys((client_namespace, service_namespace, root)):
        for rule in rules:
            if rule.namespace != namespace:
                continue
            host = rule.spec.host.lower()
            full = _service_fqdn(host, rule.namespace)
            if full != fqdn and not (host.startswith("*") and fqdn.endswith(host[1:])):
                continue
            for item in rule.spec.subsets:
                if item.name == subset:
                    return dict(item.labels)
    return None


def _service_fqdn(host: str, namespace: str) -> str:
    dots = host.count(".")
    if dots == 0:
        return f"{host}.{namespace}.svc.cluster.local"
    if dots == 1:
        return f"{host}.svc.cluster.local"
    return host


def _has_labels(mesh: MeshPolicy, endpoint: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    ref = (
        endpoint.get("metadata", {}).get("filter_metadata", {}).get("trustmesh", {}).get("workload")
    )
    workload = mesh.snapshot.workload(str(ref)) if ref else None
    return workload is not None and all(workload.labels.get(k) == v for k, v in labels.items())

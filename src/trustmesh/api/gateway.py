"""Gateways, the VirtualServices bound to them and their TLS Secrets, read for enforcement.

Pure: reads a :class:`ConfigSnapshot` and returns values and diagnostics. The gateway
translation (:mod:`trustmesh.xds.gateway`) is the consumer. Everything a Gateway or a bound
VirtualService says that trustmesh's gateways do not honour is an error naming the file,
line and field: the gateway is then not (re)configured at all, rather than configured to do
something other than what was written.

Istio facts used here (istio/istio ``pilot/pkg/model/gateway.go``,
``pilot/pkg/credentials/kube/secrets.go``, ``pilot/pkg/model/credentials/resource.go``):

* a Gateway applies to the gateway pods its ``selector`` labels are a subset of, in any
  namespace (an empty selector selects every gateway pod);
* a server's ``port.number`` is a *Service* port: when a Service selecting the gateway pod
  has that port, Envoy listens on its ``targetPort`` (the chart maps 80 → 8080 and
  443 → 8443); without one, on the number itself;
* ``credentialName: NAME`` is the Secret ``NAME`` in the gateway pod's namespace: its
  ``tls.crt`` / ``tls.key`` (or ``cert`` / ``key``); the CA for MUTUAL comes from the Secret
  ``NAME-cacert`` when it exists, else from ``NAME``'s own ``ca.crt`` (or ``cacert``).
  Envoy asks for them as ``kubernetes://NAME`` and ``kubernetes://NAME-cacert``;
* ``hosts`` entries are ``[namespace/]host``: ``*/`` or none any namespace, ``./`` the
  Gateway's own, else that namespace's VirtualServices only;
* a VirtualService names gateways as ``name`` (its own namespace) or ``namespace/name``;
* a server with ``tls.mode: PASSTHROUGH`` (protocol ``HTTPS`` or ``TLS``) does not terminate
  TLS: the VirtualServices' ``tls`` routes pick the destination by SNI (``sniHosts``); a
  ``TCP`` server forwards each connection to its first ``tcp`` route that matches
  (``pilot/pkg/networking/core/gateway.go`` ``buildGatewayTCPBasedFilterChains``).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from trustmesh.api.diagnostics import Diagnostic, Location, error
from trustmesh.api.gateway_models import (
    GatewaySpec,
    HttpRoute,
    RouteDestination,
    SecretObject,
    Server,
    ServerTlsMode,
    TcpRoute,
    TlsRoute,
    VirtualServiceSpec,
)
from trustmesh.api.loader import validate_model
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import ConfigSnapshot, Workload

__all__ = [
    "CA_SUFFIX",
    "SECRET_PREFIX",
    "BoundVirtualService",
    "CaCertificate",
    "GatewayServer",
    "TlsCredential",
    "bound_virtual_services",
    "ca_certificate",
    "exported_to",
    "gateway_servers",
    "host_matches",
    "invalid_route_values",
    "num_trusted_proxies",
    "parse_duration",
    "tls_credential",
]

SECRET_PREFIX = "kubernetes://"
CA_SUFFIX = "-cacert"
_HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC", "GRPC-WEB"})
_SNI_PROTOCOLS = frozenset({"HTTPS", "TLS"})
_TERMINATED = frozenset({ServerTlsMode.SIMPLE, ServerTlsMode.MUTUAL, ServerTlsMode.OPTIONAL_MUTUAL})
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(h|m|s|ms|us)$")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}


@dataclass(frozen=True, slots=True)
class GatewayServer:
    """One ``servers[i]`` of a Gateway selecting the gateway pod, where Envoy listens."""

    gateway: Resource[Any]
    index: int
    server: Server
    listen_port: int  # the Service's targetPort for server.port.number, else that number

    @property
    def ref(self) -> str:
        return f"{self.gateway.namespace}/{self.gateway.name}"

    @property
    def is_tls(self) -> bool:
        """An HTTPS server the gateway terminates (HTTP inside), not a passthrough one."""
        return self.server.port.protocol.upper() == "HTTPS" and not self.is_passthrough

    @property
    def is_passthrough(self) -> bool:
        """``tls.mode: PASSTHROUGH`` on an HTTPS or TLS server: routed by SNI, untouched."""
        tls = self.server.tls
        return (
            self.server.port.protocol.upper() in _SNI_PROTOCOLS
            and tls is not None
            and tls.mode is ServerTlsMode.PASSTHROUGH
        )

    @property
    def is_tcp(self) -> bool:
        return self.server.port.protocol.upper() == "TCP"

    @property
    def terminates_tcp(self) -> bool:
        """A TLS server the gateway terminates (``tcp`` routes for the bytes inside)."""
        return self.server.port.protocol.upper() == "TLS" and not self.is_passthrough

    @property
    def terminates(self) -> bool:
        """The gateway terminates its TLS (credentialName or the mesh certificate)."""
        return self.is_tls or self.terminates_tcp

    @property
    def inspects_tls(self) -> bool:
        """Its listener reads the ClientHello (SNI): terminated or passthrough TLS."""
        return self.terminates or self.is_passthrough

    @property
    def tls_mode(self) -> ServerTlsMode | None:
        tls = self.server.tls
        return tls.mode if tls is not None and self.is_tls else None

    def location(self, *path: str | int) -> Location:
        return self.gateway.location("servers", self.index, *path)

    def admits(self, vs: Resource[Any], vs_host: str) -> bool:
        """Whether this server lets ``vs`` bind its host ``vs_host``."""
        for entry in self.server.hosts:
            namespace, _, host = entry.rpartition("/")
            if namespace == ".":
                namespace = self.gateway.namespace
            if namespace not in ("", "*") and namespace != vs.namespace:
                continue
            if hosts_intersect(host, vs_host):
                return True
        return False

    def host_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(entry.rpartition("/")[2] for entry in self.server.hosts))


@dataclass(frozen=True, slots=True)
class BoundVirtualService:
    resource: Resource[Any]
    spec: VirtualServiceSpec

    @property
    def namespace(self) -> str:
        return self.resource.namespace


@dataclass(frozen=True, slots=True)
class TlsCredential:
    certificate_chain: str
    private_key: str
    certificate_location: Location
    key_location: Location


@dataclass(frozen=True, slots=True)
class CaCertificate:
    pem: str
    location: Location


# --------------------------------------------------------------------------- hosts


def host_matches(pattern: str, name: str) -> bool:
    """``*.example.com`` covers ``a.example.com`` (and ``a.b.example.com``); ``*`` all."""
    pattern, name = pattern.lower(), name.lower()
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return name.endswith(pattern[1:])
    return pattern == name


def hosts_intersect(a: str, b: str) -> bool:
    return host_matches(a, b) or host_matches(b, a)


# ----------------------------------------------------------------------- gateways


def _parse_gateway(resource: Resource[Any]) -> tuple[GatewaySpec | None, list[Diagnostic]]:
    path = (*resource.base_path, *resource.spec_path)
    return validate_model(GatewaySpec, resource.raw_spec(), resource.document, path)


def gateway_servers(
    snapshot: ConfigSnapshot, workload: Workload
) -> tuple[list[GatewayServer], list[Diagnostic]]:
    """Every server of every Gateway selecting ``workload``, and what cannot be honoured."""
    servers: list[GatewayServer] = []
    problems: list[Diagnostic] = []
    for resource in sorted(snapshot.of_kind("Gateway"), key=Resource.age_key):
        if resource.group != "networking.istio.io":
            continue
        spec, found = _parse_gateway(resource)
        if spec is None:
            problems.extend(found)
            continue
        if not all(workload.labels.get(k) == v for k, v in spec.selector.items()):
            continue
        for index, server in enumerate(spec.servers):
            listen = _listen_port(snapshot, workload, server.port.number)
            item = GatewayServer(resource, index, server, listen)
            server_problems = list(_server_problems(item))
            problems.extend(server_problems)
            if not server_problems:
                servers.append(item)
    problems.extend(_port_conflicts(servers))
    return servers, problems


def _listen_port(snapshot: ConfigSnapshot, workload: Workload, number: int) -> int:
    for service in sorted(snapshot.services, key=lambda s: (s.namespace, s.name)):
        if not service.selects(workload):
            continue
        for sp in service.ports:
            if sp.port == number:
                target = sp.target_port
                if isinstance(target, int):
                    return target
                named = _named_container_port(workload, target)
                return named if named is not None else number
    return number


def _named_container_port(workload: Workload, name: str) -> int | None:
    resource = workload.resource
    spec = resource.spec.spec if workload.kind == "Pod" else resource.spec.template.spec
    for container in spec.containers:
        for port in container.ports:
            if port.name == name:
                return int(port.container_port)
    return None


def _server_problems(item: GatewayServer) -> Iterator[Diagnostic]:
    server = item.server
    protocol = server.port.protocol.upper()
    if protocol not in _HTTP_PROTOCOLS and protocol not in ("HTTPS", "TLS", "TCP"):
        yield _unsupported(
            item.location("port", "protocol"),
            f"protocol {server.port.protocol} (trustmesh gateways serve HTTP, HTTPS, TLS "
            "passthrough and TCP)",
        )
    if server.bind:
        yield _unsupported(item.location("bind"), "bind")
    if server.default_endpoint:
        yield _unsupported(item.location("defaultEndpoint"), "defaultEndpoint")
    for j, host in enumerate(server.hosts):
        namespace, _, name = host.rpartition("/")
        if not name or "/" in namespace:
            yield error(
                "invalid-field",
                item.location("hosts", j),
                f"{host!r} is not [namespace/]hostname",
            )
    tls = server.tls
    if tls is None:
        if protocol in _SNI_PROTOCOLS:
            yield error(
                "missing-field",
                item.location("tls"),
                f"an {protocol} server needs tls (mode and credentialName, or PASSTHROUGH)",
            )
        return
    if protocol == "TCP":
        yield _unsupported(item.location("tls"), "tls on a TCP server (use protocol TLS)")
        return
    if item.is_passthrough:
        yield from _passthrough_problems(item)
        return
    if protocol not in _SNI_PROTOCOLS:
        fields = tls.model_fields_set - {"https_redirect"}
        if fields:
            yield _unsupported(
                item.location("tls"),
                "tls settings other than httpsRedirect on a plaintext HTTP server",
            )
        return
    if item.terminates_tcp and tls.https_redirect:
        yield _unsupported(item.location("tls", "httpsRedirect"), "httpsRedirect on a TLS server")
    if tls.mode not in _TERMINATED and tls.mode is not ServerTlsMode.ISTIO_MUTUAL:
        yield _unsupported(item.location("tls", "mode"), f"tls.mode {tls.mode.value}")
        return
    file_fields = {
        "server_certificate": "serverCertificate",
        "private_key": "privateKey",
        "ca_certificates": "caCertificates",
        "ca_crl": "caCrl",
        "credential_names": "credentialNames",
        "tls_certificates": "tlsCertificates",
        "verify_certificate_spki": "verifyCertificateSpki",
        "verify_certificate_hash": "verifyCertificateHash",
        "ecdh_curves": "ecdhCurves",
        "insecure_skip_verify": "insecureSkipVerify",
    }
    for attribute, name in file_fields.items():
        if attribute in tls.model_fields_set and getattr(tls, attribute):
            yield _unsupported(
                item.location("tls", name),
                name + " (trustmesh gateways take certificates from credentialName Secrets)",
            )
    if tls.mode is ServerTlsMode.ISTIO_MUTUAL:
        if tls.credential_name:
            yield error(
                "invalid-field",
                item.location("tls", "credentialName"),
                "ISTIO_MUTUAL uses the gateway's mesh certificate: credentialName must be unset",
            )
    elif not tls.credential_name:
        yield _unsupported(
            item.location("tls"),
            f"tls.mode {tls.mode.value} without credentialName",
        )


def _passthrough_problems(item: GatewayServer) -> Iterator[Diagnostic]:
    """A passthrough server never sees the TLS inside: any setting about it is refused."""
    tls = item.server.tls
    assert tls is not None
    for attribute in sorted(tls.model_fields_set - {"mode"}):
        if getattr(tls, attribute):
            name = type(tls).model_fields[attribute].alias or attribute
            yield _unsupported(
                item.location("tls", name),
                f"tls.{name} with tls.mode PASSTHROUGH (the gateway does not terminate TLS)",
            )


def _port_kind(item: GatewayServer) -> str:
    if item.is_tcp:
        return "TCP"
    return "TLS" if item.inspects_tls else "plaintext HTTP"


def _port_conflicts(servers: Sequence[GatewayServer]) -> Iterator[Diagnostic]:
    kinds: dict[int, GatewayServer] = {}
    for item in servers:
        first = kinds.setdefault(item.listen_port, item)
        if first is item:
            continue
        if _port_kind(first) != _port_kind(item):
            yield error(
                "gateway-port-conflict",
                item.location("port", "protocol"),
                f"port {item.listen_port} is already served as "
                f"{first.server.port.protocol} by {first.ref} servers[{first.index}]: "
                f"{_port_kind(first)} and {_port_kind(item)} servers cannot share a port",
            )
        elif item.is_tcp:
            yield error(
                "gateway-port-conflict",
                item.location("port"),
                f"port {item.listen_port} is already served as TCP by {first.ref} "
                f"servers[{first.index}]: one TCP server per port",
            )


def _unsupported(where: Location, what: str) -> Diagnostic:
    return error(
        "unsupported-gateway-field",
        where,
        f"{what} is not supported by trustmesh's gateways; the gateway is not configured "
        "until it is removed",
    )


# ----------------------------------------------------------------- virtual services


def bound_virtual_services(
    snapshot: ConfigSnapshot, gateway_refs: Sequence[str], proxy_namespace: str
) -> tuple[list[BoundVirtualService], list[Diagnostic]]:
    """VirtualServices naming one of ``gateway_refs`` (``ns/name``) and exported to the
    gateway pod's namespace ``proxy_namespace`` (``exportTo``: ``.`` its own namespace,
    ``*`` or unset every namespace, as istiod indexes them), oldest first."""
    wanted = set(gateway_refs)
    found: list[BoundVirtualService] = []
    problems: list[Diagnostic] = []
    for resource in sorted(snapshot.of_kind("VirtualService"), key=Resource.age_key):
        if resource.group != "networking.istio.io":
            continue
        refs = {_gateway_ref(resource.namespace, g) for g in resource.spec.gateways}
        if not refs & wanted:
            continue
        if not _exported(resource, proxy_namespace):
            continue
        path = (*resource.base_path, *resource.spec_path)
        spec, spec_problems = validate_model(
            VirtualServiceSpec, resource.raw_spec(), resource.document, path
        )
        problems.extend(spec_problems)
        if spec is None:
            continue
        route_problems = list(_virtual_service_problems(resource, spec))
        problems.extend(route_problems)
        if not route_problems:
            found.append(BoundVirtualService(resource, spec))
    return found, problems


def exported_to(resource: Resource[Any], proxy_namespace: str) -> bool:
    """Whether ``resource``'s ``exportTo`` (``.``, ``*``, namespace names; none: every
    namespace) makes it visible to proxies of ``proxy_namespace``."""
    return _exported(resource, proxy_namespace)


def _exported(resource: Resource[Any], proxy_namespace: str) -> bool:
    raw = resource.raw_spec()
    export_to = raw.get("exportTo") if isinstance(raw, dict) else None
    if not export_to or not isinstance(export_to, list):
        return True
    names = {resource.namespace if str(n) == "." else str(n) for n in export_to}
    return "*" in names or proxy_namespace in names


def _gateway_ref(namespace: str, name: str) -> str:
    return name if "/" in name else f"{namespace}/{name}"


_UNSUPPORTED_ROUTE_FIELDS = {
    "delegate": "delegate",
    "fault": "fault",
    "mirror": "mirror",
    "mirrors": "mirrors",
    "mirror_percent": "mirrorPercent",
    "mirror_percentage": "mirrorPercentage",
    "cors_policy": "corsPolicy",
}
_UNSUPPORTED_MATCH_FIELDS = {
    "scheme": "scheme",
    "source_labels": "sourceLabels",
    "without_headers": "withoutHeaders",
    "source_namespace": "sourceNamespace",
}


def _virtual_service_problems(
    resource: Resource[Any], spec: VirtualServiceSpec
) -> Iterator[Diagnostic]:
    if not spec.hosts:
        yield error("missing-field", resource.location("hosts"), "is required")
    for i, tls_route in enumerate(spec.tls):
        yield from _tls_route_problems(resource, spec, i, tls_route)
    for i, tcp_route in enumerate(spec.tcp):
        yield from _tcp_route_problems(resource, i, tcp_route)
    for i, route in enumerate(spec.http):
        yield from _route_problems(resource, i, route)


# Istio's L4 matches at a gateway compare port and gateways only; what else a match may
# say is refused rather than dropped.
_UNSUPPORTED_L4_MATCH_FIELDS = {
    "destination_subnets": "destinationSubnets",
    "source_subnet": "sourceSubnet",
    "source_labels": "sourceLabels",
    "source_namespace": "sourceNamespace",
}


def _tls_route_problems(
    resource: Resource[Any], spec: VirtualServiceSpec, i: int, route: TlsRoute
) -> Iterator[Diagnostic]:
    for j, match in enumerate(route.match):
        for attribute, name in _UNSUPPORTED_L4_MATCH_FIELDS.items():
            if attribute in match.model_fields_set and getattr(match, attribute):
                yield _unsupported(resource.location("tls", i, "match", j, name), name)
        for k, sni in enumerate(match.sni_hosts):
            if not any(host_matches(host, sni) for host in spec.hosts):
                # Istio's validation refuses it too (validateTLSMatch).
                yield error(
                    "invalid-field",
                    resource.location("tls", i, "match", j, "sniHosts", k),
                    f"{sni!r} is not one of the VirtualService's hosts ({', '.join(spec.hosts)})",
                )
    yield from _l4_destination_problems(resource, ("tls", i), route.route)


def _tcp_route_problems(resource: Resource[Any], i: int, route: TcpRoute) -> Iterator[Diagnostic]:
    for j, match in enumerate(route.match):
        for attribute, name in _UNSUPPORTED_L4_MATCH_FIELDS.items():
            if attribute in match.model_fields_set and getattr(match, attribute):
                yield _unsupported(resource.location("tcp", i, "match", j, name), name)
    yield from _l4_destination_problems(resource, ("tcp", i), route.route)


def _l4_destination_problems(
    resource: Resource[Any], at: tuple[str, int], route: Sequence[RouteDestination]
) -> Iterator[Diagnostic]:
    if not route:
        yield error("missing-field", resource.location(*at, "route"), "is required")
    elif len(route) > 1 and sum(d.weight for d in route) == 0:
        yield error(
            "invalid-field",
            resource.location(*at, "route"),
            "the weights of the destinations sum to 0",
        )


def invalid_route_values(route: HttpRoute) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """What Istio's validation refuses in an ``http`` route, whoever the route is for:
    (field path under the route, message). Gateways and sidecars report them their way."""
    actions = [a for a in ("route", "redirect", "direct_response") if getattr(route, a)]
    if len(actions) != 1:
        yield (), "a route needs exactly one of route, redirect or directResponse"
    if route.route and len(route.route) > 1 and sum(d.weight for d in route.route) == 0:
        yield ("route",), "the weights of the destinations sum to 0"
    if route.redirect is not None and route.redirect.redirect_code not in _REDIRECT_CODES:
        codes = ", ".join(map(str, sorted(_REDIRECT_CODES)))
        yield ("redirect", "redirectCode"), f"{route.redirect.redirect_code} is not one of {codes}"
    if route.rewrite is not None and route.rewrite.uri and route.rewrite.uri_regex_rewrite:
        yield ("rewrite",), "set one of uri or uriRegexRewrite"
    if route.timeout and parse_duration(route.timeout) is None:
        yield ("timeout",), f"{route.timeout!r} is not a duration such as 5s"
    if route.retries is not None:
        for field, value in (
            ("perTryTimeout", route.retries.per_try_timeout),
            ("backoff", route.retries.backoff),
        ):
            if value and parse_duration(value) is None:
                yield ("retries", field), f"{value!r} is not a duration such as 2s"


def _route_problems(resource: Resource[Any], i: int, route: HttpRoute) -> Iterator[Diagnostic]:
    def at(*path: str | int) -> Location:
        return resource.location("http", i, *path)

    for attribute, name in _UNSUPPORTED_ROUTE_FIELDS.items():
        if attribute in route.model_fields_set and getattr(route, attribute):
            yield _unsupported(at(name), name)
    for path, message in invalid_route_values(route):
        yield error("invalid-field", at(*path), message)
    for j, match in enumerate(route.match):
        for attribute, name in _UNSUPPORTED_MATCH_FIELDS.items():
            if attribute in match.model_fields_set and getattr(match, attribute):
                yield _unsupported(at("match", j, name), name)
    if route.redirect is not None and route.redirect.derive_port:
        yield _unsupported(at("redirect", "derivePort"), "derivePort")
    body = route.direct_response.body if route.direct_response is not None else None
    if body is not None and body.bytes is not None:
        yield _unsupported(at("directResponse", "body", "bytes"), "body.bytes")
    if route.retries is not None and route.retries.retry_remote_localities:
        yield _unsupported(at("retries", "retryRemoteLocalities"), "retryRemoteLocalities")


_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


def parse_duration(text: str) -> float | None:
    """Seconds of ``5s`` / ``1.5s`` / ``100ms`` / ``1m`` / ``1h``; None if it is none."""
    found = _DURATION.match(text.strip())
    if found is None:
        return None
    return float(found.group(1)) * _UNIT_SECONDS[found.group(2)]


# ------------------------------------------------------------------------- secrets


def _secret(snapshot: ConfigSnapshot, namespace: str, name: str) -> Resource[Any] | None:
    for resource in snapshot.of_kind("Secret"):
        if resource.namespace == namespace and resource.name == name:
            return resource
    return None


def _secret_data(resource: Resource[Any]) -> dict[str, tuple[str, Location]]:
    """Each key's decoded value and where it is written (``stringData`` wins, as the API
    server merges it over ``data``)."""
    secret: SecretObject = resource.spec
    data: dict[str, tuple[str, Location]] = {}
    for key, value in secret.data.items():
        try:
            text = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, ValueError, UnicodeDecodeError):
            text = ""
        data[key] = (text, resource.location("data", key))
    for key, value in secret.string_data.items():
        data[key] = (value, resource.location("stringData", key))
    return data


def tls_credential(snapshot: ConfigSnapshot, namespace: str, name: str) -> TlsCredential | str:
    """Certificate chain and key of Secret ``namespace/name``, or why there are none."""
    resource = _secret(snapshot, namespace, name)
    if resource is None:
        return f"no Secret {name} in namespace {namespace}"
    data = _secret_data(resource)
    for cert, key in (("cert", "key"), ("tls.crt", "tls.key")):
        if data.get(cert, ("", None))[0] and data.get(key, ("", None))[0]:
            return TlsCredential(data[cert][0], data[key][0], data[cert][1], data[key][1])
    return f"Secret {namespace}/{name} has no tls.crt and tls.key (nor cert and key)"


def ca_certificate(snapshot: ConfigSnapshot, namespace: str, name: str) -> CaCertificate | None:
    """The CA for ``credentialName: name``: Secret ``name-cacert`` if it exists, else
    ``name``'s own ``ca.crt`` / ``cacert`` (Istio's GetCaCert)."""
    for candidate in (name + CA_SUFFIX, name):
        resource = _secret(snapshot, namespace, candidate)
        if resource is None:
            continue
        data = _secret_data(resource)
        for key in ("cacert", "ca.crt"):
            if data.get(key, ("", None))[0]:
                return CaCertificate(*data[key])
        return None
    return None


# ------------------------------------------------------------------- mesh settings


def num_trusted_proxies(snapshot: ConfigSnapshot, workload: Workload) -> int:
    """``gatewayTopology.numTrustedProxies``: the pod's ``proxy.istio.io/config``
    annotation, else ``meshConfig.defaultConfig``; 0 when neither sets it."""
    annotation = _pod_annotations(workload).get("proxy.istio.io/config")
    if annotation:
        value = _trusted_hops(_yaml_mapping(annotation))
        if value is not None:
            return value
    found = 0
    for layer in snapshot.mesh_layers:
        default_config = layer.body.get("defaultConfig")
        if isinstance(default_config, dict):
            value = _trusted_hops(default_config)
            if value is not None:
                found = value
    return found


def _trusted_hops(proxy_config: Any) -> int | None:
    topology = proxy_config.get("gatewayTopology") if isinstance(proxy_config, dict) else None
    value = topology.get("numTrustedProxies") if isinstance(topology, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _pod_annotations(workload: Workload) -> dict[str, str]:
    resource = workload.resource
    if workload.kind == "Pod":
        return dict(resource.annotations)
    return dict(resource.spec.template.metadata.annotations)


def _yaml_mapping(text: str) -> Any:
    # The annotation is YAML (JSON is YAML too).
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None

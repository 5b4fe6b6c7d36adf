"""The client side of a connection: does it speak mesh mTLS, and may it leave the mesh?

Client TLS follows Istio: an explicit DestinationRule ``tls`` setting always wins
(looked up in the client's namespace, then the service's, then the root namespace; a
subset's own setting over the rule's); otherwise auto mTLS uses ISTIO_MUTUAL towards
endpoints with a sidecar whose port is not DISABLE, and plaintext elsewhere. Egress
follows ``outboundTrafficPolicy``.

The decision is made once, here, as a value: :func:`upstream_tls` gives the
:class:`UpstreamTls` of one outbound cluster (client namespace, service, port, subset) —
its mode, SNI, the identities it pins, where its keys come from and which
DestinationRule says so. The evaluator (:func:`client_tls`) reads it for one request;
``trustmesh.xds.outbound`` maps it to an Envoy ``transport_socket`` and decides nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.dataplane import USE_WAYPOINT, MeshMode
from trustmesh.api.diagnostics import Location
from trustmesh.api.gateway import exported_to
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import Service, Workload
from trustmesh.envoy_json import mesh_sni
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.decision import RequestError, Verdict
from trustmesh.policy.derived import Derived
from trustmesh.policy.request import Request, Source, SourceKind
from trustmesh.policy.targets import named_ports


@dataclass(frozen=True, slots=True)
class ClientTls:
    mtls: bool
    principal: str | None
    sni: str | None
    client_has_sidecar: bool
    explanation: str
    conflict: str | None = None  # a TLS the server side can never accept


class UpstreamMode(enum.Enum):
    """How a client proxy's cluster for a service port talks to its endpoints."""

    PLAINTEXT = "plaintext"  # DestinationRule DISABLE, or auto mTLS off and no rule
    ISTIO_MUTUAL = "ISTIO_MUTUAL"  # DestinationRule ISTIO_MUTUAL: mesh mTLS to every endpoint
    SIMPLE = "SIMPLE"  # DestinationRule SIMPLE: TLS with the rule's CA
    MUTUAL = "MUTUAL"  # DestinationRule MUTUAL: TLS with the rule's key pair and CA
    AUTO = "auto"  # auto mTLS: mesh mTLS to endpoints that speak it, plaintext to the rest


@dataclass(frozen=True, slots=True)
class FieldRef:
    """A field of a resource, its :class:`Location` looked up only when asked: finding a
    line composes the YAML document (about 0.5 ms), and most decisions are never shown."""

    resource: Resource[Any]
    path: tuple[str | int, ...]

    @property
    def location(self) -> Location:
        return self.resource.location(*self.path)


@dataclass(frozen=True, slots=True)
class TlsCredentials:
    """Where SIMPLE / MUTUAL TLS takes its keys from: an SDS secret named by
    ``credentialName`` (key pair ``name``, CA ``name-cacert``), else files."""

    credential_name: str = ""
    certificate_chain: str = ""  # file (MUTUAL without credentialName)
    private_key: str = ""  # file
    ca_file: str = ""  # "" with ``verify``: the system CA bundle
    verify: bool = True  # False: insecureSkipVerify
    credential_field: FieldRef | None = field(default=None, compare=False)  # credentialName
    mode_field: FieldRef | None = field(default=None, compare=False)  # the rule's ``tls.mode``

    @property
    def credential_location(self) -> Location | None:
        return self.credential_field.location if self.credential_field is not None else None

    @property
    def mode_location(self) -> Location | None:
        return self.mode_field.location if self.mode_field is not None else None


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """The client TLS of one outbound cluster ``outbound|port|subset|fqdn``.

    ``sni``: what the client sends (mesh modes: ``outbound_.port_.subset_.fqdn`` unless the
    rule names one; SIMPLE / MUTUAL: the rule's, else the host). ``peer_ids``: the SPIFFE
    IDs (with ``spiffe://``) a mesh-mTLS server certificate must carry — the service's
    sidecar workloads in every trust domain of the bundle; ``subject_alt_names``: what
    the rule asks of the server certificate. ``rule`` / ``location``: the DestinationRule
    (``ns/name``) and the ``tls`` field that decided; empty when auto mTLS (or its absence)
    did."""

    mode: UpstreamMode
    sni: str = ""
    peer_ids: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    credentials: TlsCredentials | None = None
    rule: str = ""
    setting: FieldRef | None = field(default=None, compare=False)  # the deciding ``tls``
    # SIMPLE / MUTUAL to a wildcard host without `sni`: the SNI (and, checking the server,
    # the name its certificate must carry) is each request's Host, Envoy's `auto_sni` /
    # `auto_san_validation` (Istio's ENABLE_AUTO_SNI)
    auto_sni: bool = False

    @property
    def location(self) -> Location | None:
        """Where the deciding ``tls`` is written (looked up when asked)."""
        return self.setting.location if self.setting is not None else None

    @property
    def why(self) -> str:
        if self.rule:
            where = f" ({self.location})" if self.location is not None else ""
            return f"DestinationRule {self.rule} tls {self.setting_mode}{where}"
        if self.mode is UpstreamMode.AUTO:
            return "auto mTLS"
        return "auto mTLS is off and no DestinationRule sets TLS"

    @property
    def setting_mode(self) -> str:
        """The DestinationRule's ``tls.mode`` as written (DISABLE for plaintext)."""
        return "DISABLE" if self.mode is UpstreamMode.PLAINTEXT else self.mode.value


def upstream_tls(
    mesh: MeshPolicy,
    client_namespace: str,
    service: Service,
    port: int | None,
    subset: str = "",
) -> UpstreamTls:
    """The client TLS of a proxy in ``client_namespace`` towards ``service``'s ``port``
    (its ``subset`` cluster, when named): decided once per compiled mesh."""
    decided = _UPSTREAM_TLS.table(mesh)
    key = (client_namespace, service.namespace, service.name, port, subset)
    found = decided.get(key)
    if found is None:
        found = decided[key] = _upstream_tls(mesh, client_namespace, service, port, subset)
    return found


def _upstream_tls(
    mesh: MeshPolicy, client_namespace: str, service: Service, port: int | None, subset_name: str
) -> UpstreamTls:
    rule = destination_rule_for(mesh, client_namespace, service)
    found = _cluster_tls_setting(rule, port, subset_name)
    sni_subset = subset_name if _subset(rule, subset_name) is not None else ""
    if found is None:
        if not mesh.snapshot.mesh.enable_auto_mtls:
            return UpstreamTls(UpstreamMode.PLAINTEXT)
        return UpstreamTls(
            UpstreamMode.AUTO,
            sni=mesh_sni(port, service.hostname, sni_subset) if port is not None else "",
            peer_ids=_peer_ids(mesh, service),
        )
    assert rule is not None
    tls, path = found
    ref, location = f"{rule.namespace}/{rule.name}", FieldRef(rule, path)
    if tls.mode is m.TlsMode.DISABLE:
        return UpstreamTls(UpstreamMode.PLAINTEXT, rule=ref, setting=location)
    if tls.mode is m.TlsMode.ISTIO_MUTUAL:
        # `sni` overrides the mesh SNI (Istio's egress gateway task names the external host)
        sni = tls.sni or (mesh_sni(port, service.hostname, sni_subset) if port is not None else "")
        return UpstreamTls(
            UpstreamMode.ISTIO_MUTUAL,
            sni=sni,
            peer_ids=_peer_ids(mesh, service),
            rule=ref,
            setting=location,
        )
    return UpstreamTls(
        UpstreamMode.MUTUAL if tls.mode is m.TlsMode.MUTUAL else UpstreamMode.SIMPLE,
        sni=tls.sni or service.hostname,
        subject_alt_names=tuple(tls.subject_alt_names),
        credentials=_credentials(tls, rule, path),
        rule=ref,
        setting=location,
    )


def _credentials(tls: m.ClientTlsSettings, rule: Resource[Any], path: _Path) -> TlsCredentials:
    return TlsCredentials(
        credential_name=tls.credential_name,
        certificate_chain=tls.client_certificate,
        private_key=tls.private_key,
        ca_file=tls.ca_certificates,
        verify=tls.insecure_skip_verify is not True,
        credential_field=FieldRef(rule, (*path, "credentialName")),
        mode_field=FieldRef(rule, (*path, "mode")),
    )


def origination_tls(
    mesh: MeshPolicy,
    client_namespace: str,
    entry_namespace: str,
    host: str,
    port: int,
    subset: str = "",
) -> UpstreamTls:
    """The client TLS of a proxy's cluster to ServiceEntry ``host``:``port`` (its
    ``subset`` cluster, when named) — a gateway's (Istio's egress gateway with TLS
    origination) or a sidecar's (Istio's "egress TLS origination"): the rule
    :func:`origination_rule` picks for the proxy's namespace, its port-level ``tls``
    first, a subset's own setting over the rule's. ISTIO_MUTUAL: the proxy's mesh
    identity, SNI ``sni`` or the mesh SNI, the server's URI SAN checked against
    ``subjectAltNames`` only; SIMPLE / MUTUAL: SNI ``sni`` or the host, the certificate
    must name ``subjectAltNames`` or, without them and without ``sni``, the host (Istio's
    auto SAN validation with ``ENABLE_AUTO_SNI`` and ``VERIFY_CERTIFICATE_AT_CLIENT``, on by
    default; an explicit ``sni`` turns it off), checked against ``caCertificates`` or else
    the system CA bundle."""
    key = (client_namespace, entry_namespace, host, port, subset)
    return _ORIGINATION_TLS.get(mesh, key)


def _origination_tls(mesh: MeshPolicy, key: tuple[str, str, str, int, str]) -> UpstreamTls:
    client_namespace, entry_namespace, host, port, subset = key
    rule = origination_rule(mesh, client_namespace, entry_namespace, host)
    found = _cluster_tls_setting(rule, port, subset) if rule is not None else None
    if rule is None or found is None:
        return UpstreamTls(UpstreamMode.PLAINTEXT)
    tls, path = found
    ref, location = f"{rule.namespace}/{rule.name}", FieldRef(rule, path)
    if tls.mode is m.TlsMode.DISABLE:
        return UpstreamTls(UpstreamMode.PLAINTEXT, rule=ref, setting=location)
    if tls.mode is m.TlsMode.ISTIO_MUTUAL:
        return UpstreamTls(
            UpstreamMode.ISTIO_MUTUAL,
            sni=tls.sni or mesh_sni(port, host, subset if _subset(rule, subset) else ""),
            subject_alt_names=tuple(tls.subject_alt_names),
            rule=ref,
            setting=location,
        )
    auto = not tls.sni and host.startswith("*")
    automatic = () if tls.sni or auto else (host,)
    return UpstreamTls(
        UpstreamMode.MUTUAL if tls.mode is m.TlsMode.MUTUAL else UpstreamMode.SIMPLE,
        sni="" if auto else tls.sni or host,
        # Istio's auto SAN validation (the SNI it derives) only when no `sni` is given
        subject_alt_names=tuple(tls.subject_alt_names or automatic),
        credentials=_credentials(tls, rule, path),
        rule=ref,
        setting=location,
        auto_sni=auto,
    )


def sidecar_origination_problem(upstream: UpstreamTls) -> str | None:
    """Why a sidecar cannot originate ``upstream`` (SIMPLE / MUTUAL), or None.

    ``credentialName``: istiod builds no TLS for it at a sidecar unless the
    DestinationRule has a ``workloadSelector`` (``buildUpstreamClusterTLSContext``: the
    cluster is left in plaintext), and trustmesh does not model selector-scoped rules, so
    the cluster is left out instead (503, never plaintext). MUTUAL without
    ``clientCertificate`` and ``privateKey`` has no key pair to present."""
    tls = upstream.credentials
    if upstream.mode not in (UpstreamMode.SIMPLE, UpstreamMode.MUTUAL) or tls is None:
        return None
    if tls.credential_name:
        return (
            f"tls.credentialName {tls.credential_name} is not applied at sidecars (istiod"
            " reads it there only for a DestinationRule with a workloadSelector, which"
            " trustmesh does not model, and would otherwise send plaintext): give"
            " caCertificates (and clientCertificate / privateKey for MUTUAL) files, or"
            " originate TLS at an egress gateway"
        )
    if upstream.mode is UpstreamMode.MUTUAL and not (tls.certificate_chain and tls.private_key):
        return "tls.mode MUTUAL needs clientCertificate and privateKey at a sidecar"
    return None


def app_speaks_tls(name: str, protocol: str) -> bool:
    """Does the application speak TLS on this port itself (``TLS`` / ``HTTPS``)?"""
    return app_protocol(name, protocol) in ("tls", "https")


def describe_origination(upstream: UpstreamTls, host: str) -> str:
    """How a sidecar's request to ServiceEntry ``host`` leaves it, in words."""
    if upstream.mode is UpstreamMode.PLAINTEXT:
        if upstream.rule:
            return f"it leaves the sidecar in plaintext ({upstream.why})"
        return "it leaves the sidecar as the application sent it (no DestinationRule sets TLS)"
    if upstream.mode is UpstreamMode.ISTIO_MUTUAL:
        return f"the sidecar sends it over mesh mTLS, SNI {upstream.sni} ({upstream.why})"
    tls = upstream.credentials
    assert tls is not None
    problem = sidecar_origination_problem(upstream)
    if problem is not None:
        return f"the sidecar has no cluster for it (503): {problem} ({upstream.why})"
    if not tls.verify:
        check = "without checking its certificate (insecureSkipVerify)"
    else:
        ca = tls.ca_file or "the system CA bundle"
        if upstream.subject_alt_names:
            names = " for " + ", ".join(upstream.subject_alt_names)
        elif upstream.auto_sni:
            names = " for the request's Host"
        else:
            names = " (any name: an explicit sni turns the automatic name check off)"
        check = f"checking its certificate against {ca}{names}"
    sni = "the request's Host" if upstream.auto_sni else upstream.sni
    client = (
        f", presenting the client certificate {tls.certificate_chain}"
        if upstream.mode is UpstreamMode.MUTUAL
        else ""
    )
    return (
        f"the sidecar originates TLS ({upstream.why}): SNI {sni}, {check}{client};"
        f" {host} sees the sidecar's request"
    )


# (proxy namespace, ServiceEntry namespace, host, port, subset) → the cluster's TLS.
_ORIGINATION_TLS: Derived[MeshPolicy, tuple[str, str, str, int, str], UpstreamTls] = Derived(
    "origination TLS", _origination_tls
)


def origination_rule(
    mesh: MeshPolicy, client_namespace: str, entry_namespace: str, host: str
) -> Resource[Any] | None:
    """The DestinationRule a proxy of ``client_namespace`` uses for ServiceEntry host
    ``host``: its own namespace, the entry's, the root namespace; exact before wildcard,
    then the oldest; ``exportTo`` honoured (its own namespace's rules always apply).
    Remembered per mesh: every sidecar asks it for every ServiceEntry host."""
    return _ORIGINATION_RULES.get(mesh, (client_namespace, entry_namespace, host))


def _origination_rule(mesh: MeshPolicy, key: tuple[str, str, str]) -> Resource[Any] | None:
    client_namespace, entry_namespace, host = key
    root = mesh.snapshot.mesh.root_namespace
    exact, wildcards = _ENTRY_RULE_INDEX.get(mesh, None)
    rules: list[Resource[Any]] = [
        r
        for r in (*exact.get(host, ()), *wildcards)
        if _entry_rule_matches(r.spec.host, host) and _visible(r, client_namespace)
    ]
    for namespace in dict.fromkeys((client_namespace, entry_namespace, root)):
        here = [r for r in rules if r.namespace == namespace]
        if here:
            return min(here, key=lambda r: (str(r.spec.host).startswith("*"), r.age_key()))
    return None


_ORIGINATION_RULES: Derived[MeshPolicy, tuple[str, str, str], Resource[Any] | None] = Derived(
    "origination rules", _origination_rule
)

_EntryRuleIndex = tuple[dict[str, list[Resource[Any]]], list[Resource[Any]]]


def _entry_rule_index(mesh: MeshPolicy, _: None) -> _EntryRuleIndex:
    """DestinationRules by the host they name as written (lowercase), and the wildcard
    ones: what :func:`origination_rule` looks a ServiceEntry host up in."""
    exact: dict[str, list[Resource[Any]]] = {}
    wildcards: list[Resource[Any]] = []
    for rule in mesh.snapshot.of_kind("DestinationRule"):
        host = str(rule.spec.host).lower()
        if host.startswith("*"):
            wildcards.append(rule)
        else:
            exact.setdefault(host, []).append(rule)
    return exact, wildcards


_ENTRY_RULE_INDEX: Derived[MeshPolicy, None, _EntryRuleIndex] = Derived(
    "entry rule index", _entry_rule_index
)


def _entry_rule_matches(pattern: str, host: str) -> bool:
    pattern = pattern.lower()
    if pattern in ("*", host):
        return True
    return pattern.startswith("*.") and host.endswith(pattern[1:])


# (client namespace, service namespace, service name, port, subset) → its client TLS.
_UPSTREAM_TLS: Derived[MeshPolicy, tuple[str, str, str, int | None, str], UpstreamTls] = Derived(
    "upstream TLS"
)


def _subset(rule: Resource[Any] | None, name: str) -> m.Subset | None:
    if rule is None or not name:
        return None
    subsets: tuple[m.Subset, ...] = rule.spec.subsets
    return next((s for s in subsets if s.name == name), None)


_Path = tuple[str | int, ...]


def _cluster_tls_setting(
    rule: Resource[Any] | None, port: int | None, subset_name: str
) -> tuple[m.ClientTlsSettings, _Path] | None:
    """The DestinationRule TLS setting of the port's cluster, with its field path; for a
    subset, the subset's own (its port-level entry for the port wholesale, else its
    top-level ``tls``) when it sets one, else the rule's."""
    if rule is None:
        return None
    inherited = _rule_tls_setting(rule, port)
    subset = _subset(rule, subset_name)
    if subset is None or subset.traffic_policy is None:
        return inherited
    policy = subset.traffic_policy
    index = rule.spec.subsets.index(subset)
    base: _Path = ("subsets", index, "trafficPolicy")
    for i, level in enumerate(policy.port_level_settings):
        if level.port is not None and level.port.number == port:
            if level.tls is None:
                return None
            return level.tls, (*base, "portLevelSettings", i, "tls")
    if policy.tls is not None:
        return policy.tls, (*base, "tls")
    return inherited


def _rule_tls_setting(
    rule: Resource[Any], port: int | None
) -> tuple[m.ClientTlsSettings, _Path] | None:
    policy: m.TrafficPolicy | None = rule.spec.traffic_policy
    if policy is None:
        return None
    for i, level in enumerate(policy.port_level_settings):
        if level.port is not None and level.port.number == port and level.tls:
            return level.tls, ("trafficPolicy", "portLevelSettings", i, "tls")
    return (policy.tls, ("trafficPolicy", "tls")) if policy.tls is not None else None


def _peer_ids(mesh: MeshPolicy, service: Service) -> tuple[str, ...]:
    """The SPIFFE IDs a mesh client pins for ``service``: its sidecar workloads', in every
    trust domain of the bundle (none known: nothing pinned, as Istio)."""
    return tuple(
        sorted(
            {
                f"spiffe://{w.principal(domain)}"
                for w in service_workloads(mesh, service)
                if w.has_sidecar
                for domain in mesh.bundle.domains
            }
        )
    )


def speaks_mesh_mtls(mesh: MeshPolicy, workload: Workload, port: int) -> bool:
    """Auto mTLS towards one endpoint (Istio's ``tlsMode: istio`` label): it has a sidecar
    and its PeerAuthentication does not DISABLE the port."""
    if not workload.has_sidecar:
        return False
    policy = mesh.for_workload(workload.ref)
    return policy is None or policy.mtls.for_port(port).mode is not m.MtlsMode.DISABLE


def service_workloads(mesh: MeshPolicy, service: Service) -> list[Workload]:
    """The workloads ``service`` selects (its endpoints), by reference."""
    # Every proxy asks this about every service: computed once per compiled mesh, over
    # the workloads of the service's namespace only.
    endpoints = _SERVICE_ENDPOINTS.table(mesh)
    key = (service.namespace, service.name)
    found = endpoints.get(key)
    if found is not None:
        return found
    by_label = _WORKLOADS_BY_LABEL.get(mesh, None)
    by_ref: dict[str, Workload] = {}
    if service.selector:  # an empty selector selects nothing
        first = min(service.selector.items())
        for workload in by_label.get((service.namespace, *first), ()):
            if service.selects(workload):
                by_ref.setdefault(workload.ref, workload)
    found = endpoints[key] = [by_ref[ref] for ref in sorted(by_ref)]
    return found


def _workloads_by_label(mesh: MeshPolicy, _: None) -> dict[tuple[str, str, str], list[Workload]]:
    """(namespace, label, value) → the workloads carrying that label."""
    by_label: dict[tuple[str, str, str], list[Workload]] = {}
    for workload in mesh.snapshot.workloads:
        for label in workload.labels.items():
            by_label.setdefault((workload.namespace, *label), []).append(workload)
    return by_label


_WORKLOADS_BY_LABEL: Derived[MeshPolicy, None, dict[tuple[str, str, str], list[Workload]]] = (
    Derived("workloads by label", _workloads_by_label)
)
# (namespace, name) of a Service → the workloads it selects, by ref.
_SERVICE_ENDPOINTS: Derived[MeshPolicy, tuple[str, str], list[Workload]] = Derived(
    "service endpoints"
)


def client_tls(
    mesh: MeshPolicy,
    source: Source,
    source_workload: Workload | None,
    target: WorkloadPolicy,
    port: int,
    server_mode: m.MtlsMode,
    subset: str = "",
) -> ClientTls:
    """What the client sends to ``port`` of ``target`` (through its Service's cluster, or
    the ``subset`` cluster a route names): read from :func:`upstream_tls`."""
    service, service_port = service_for(target, port)
    if source.kind is SourceKind.PLAINTEXT:
        return ClientTls(False, None, None, False, "plaintext client: no certificate")
    if source.kind is SourceKind.PRINCIPAL:
        sni = (
            mesh_sni(service_port, service.hostname)
            if service is not None and service_port is not None
            else None
        )
        return ClientTls(True, source.value, sni, True, f"mTLS peer presenting {source.value}")
    assert source_workload is not None
    if source_workload.dataplane.mode not in (MeshMode.SIDECAR, MeshMode.GATEWAY):
        return ClientTls(
            False, None, None, False, f"source {source_workload.ref} has no sidecar: plaintext"
        )
    upstream = None
    if service is not None:
        upstream = upstream_tls(mesh, source_workload.namespace, service, service_port, subset)
    sni = (upstream.sni or None) if upstream is not None else None
    principal = source_workload.principal(mesh.snapshot.mesh.trust_domain)
    if upstream is not None and upstream.rule:
        where = f"DestinationRule {upstream.rule} tls {upstream.setting_mode}"
        if upstream.mode is UpstreamMode.ISTIO_MUTUAL:
            return ClientTls(True, principal, sni, True, f"{where}: mesh mTLS as {principal}")
        if upstream.mode is UpstreamMode.PLAINTEXT:
            return ClientTls(False, None, None, True, f"{where}: plaintext")
        return ClientTls(
            False,
            None,
            None,
            True,
            f"{where}: TLS with user certificates",
            conflict=f"{where} originates TLS a sidecar does not terminate: connection reset",
        )
    if not mesh.snapshot.mesh.enable_auto_mtls:
        return ClientTls(
            False, None, None, True, "auto mTLS is off and no DestinationRule sets TLS: plaintext"
        )
    if server_mode is m.MtlsMode.DISABLE:
        return ClientTls(
            False, None, None, True, "auto mTLS: destination port is DISABLE, plaintext"
        )
    return ClientTls(
        True, principal, sni, True, f"auto mTLS: destination has a sidecar, mTLS as {principal}"
    )


class RouteKind(enum.Enum):
    """Where a sidecar client's outbound listeners send a request: by its Host over HTTP,
    by its port (and the address it dials) otherwise."""

    SERVICE = "service"  # the destination's Service: its cluster, mesh mTLS as usual
    PASSTHROUGH = "passthrough"  # no virtual host / listener: PassthroughCluster, plaintext
    BLOCKED = "blocked"  # no virtual host under REGISTRY_ONLY: a local 502
    CLOSED = "closed"  # no listener under REGISTRY_ONLY: BlackHoleCluster closes it


@dataclass(frozen=True, slots=True)
class ClientRoute:
    kind: RouteKind
    explanation: str


# Port protocols a sidecar proxies as TCP (no Host routing): Istio's protocol selection
# by appProtocol, else the port name's prefix (xds.outbound.port_protocol reads it too).
_TCP_PROTOCOLS = frozenset(
    {"tcp", "tls", "https", "mongo", "mysql", "redis", "udp", "kubernetes.io/wss"}
)
_L4_PROTOCOLS = frozenset({"", "TCP", "UDP", "SCTP"})  # Kubernetes `protocol`, not app protocols


def sidecar_client_route(
    mesh: MeshPolicy,
    client: Workload,
    target: WorkloadPolicy,
    port: int,
    host: str | None,
    *,
    is_http: bool = True,
) -> ClientRoute:
    """How a sidecar client's request with ``Host: host`` to the destination's Service
    port is routed: Istio's outbound route for that port has a virtual host per Service
    (and ServiceEntry) on it — ``name.ns.svc.cluster.local``, ``name.ns.svc``,
    ``name.ns``, ``name`` in the client's own namespace, each with and without
    ``:port``, matched case-insensitively — and a catch-all that passes anything else
    through in plaintext (ALLOW_ANY) or answers 502 (REGISTRY_ONLY). A port no Service
    of the destination covers is dialled at the pod IP: see :func:`_pod_port_route`.

    ``RequestError`` when the Host names another service: the request goes there.
    """
    service, service_port = service_for(target, port)
    if service is None or service_port is None:
        return _pod_port_route(mesh, client, target, port, host, is_http)
    if host is None:
        return ClientRoute(RouteKind.SERVICE, f"{service.hostname}:{service_port}: by port")
    service_ports = [sp for sp in service.ports if sp.port == service_port]
    if any(proxied_as_tcp(sp.name, sp.protocol) for sp in service_ports):
        return ClientRoute(
            RouteKind.SERVICE, f"{service.hostname}:{service_port} is TCP: routed by port"
        )
    owner = _virtual_host_owner(mesh, client.namespace, service_port, host.lower())
    ours = f"Service {service.namespace}/{service.name}"
    if owner == ours:
        return ClientRoute(
            RouteKind.SERVICE, f"Host {host} is a name of {service.hostname}:{service_port}"
        )
    if owner is not None:
        raise RequestError(
            f"from a sidecar client, Host {host} routes to {owner} (port {service_port}), not"
            f" to {target.workload.ref}: the client sidecar picks the destination by Host"
        )
    policy = mesh.for_workload(client.ref)
    mode = policy.egress_mode if policy else mesh.snapshot.mesh.outbound_traffic_policy.mode
    if mode is m.OutboundTrafficPolicyMode.REGISTRY_ONLY:
        return ClientRoute(
            RouteKind.BLOCKED,
            f"Host {host} names no service on port {service_port}: the client sidecar"
            " answers 502 (REGISTRY_ONLY, block_all)",
        )
    return ClientRoute(
        RouteKind.PASSTHROUGH,
        f"Host {host} names no service on port {service_port}: the client sidecar passes"
        f" it through (PassthroughCluster) to {target.workload.ref} in plaintext, without"
        " its identity",
    )


def _pod_port_route(
    mesh: MeshPolicy,
    client: Workload,
    target: WorkloadPolicy,
    port: int,
    host: str | None,
    is_http: bool,
) -> ClientRoute:
    """A port no Service of the destination covers: the client dials the pod IP, and its
    sidecar has no cluster for that address. HTTP to a port some HTTP Service or
    ServiceEntry of the registry uses meets that port's outbound listener, which routes
    by Host (a pod IP names no service): on through ``PassthroughCluster`` (ALLOW_ANY) or
    502 (REGISTRY_ONLY). Anything else falls to ``virtualOutbound``: passed through
    (ALLOW_ANY) or closed by ``BlackHoleCluster`` (REGISTRY_ONLY). Passed through means
    plaintext, without the client's identity, as Istio's passthrough is — unless a
    ServiceEntry's TCP port without addresses claims every connection to that port."""
    where = f"no Service covers port {port} of {target.workload.ref}: the client dials its pod IP"
    policy = mesh.for_workload(client.ref)
    mode = policy.egress_mode if policy else mesh.snapshot.mesh.outbound_traffic_policy.mode
    registry_only = mode is m.OutboundTrafficPolicyMode.REGISTRY_ONLY
    if is_http and _http_port_in_registry(mesh, port):
        owner = _virtual_host_owner(mesh, client.namespace, port, host.lower()) if host else None
        if owner is not None:
            raise RequestError(
                f"from a sidecar client, Host {host} routes to {owner} (port {port}), not"
                f" to {target.workload.ref}: the client sidecar picks the destination by Host"
            )
        if registry_only:
            return ClientRoute(
                RouteKind.BLOCKED,
                f"{where}; its Host names no service on port {port}: the client sidecar"
                " answers 502 (REGISTRY_ONLY, block_all)",
            )
        return ClientRoute(
            RouteKind.PASSTHROUGH,
            f"{where}; its Host names no service on port {port}: the client sidecar passes"
            " it through (PassthroughCluster) in plaintext, without its identity",
        )
    entry = _tcp_entry_on(mesh, port)
    if entry is not None:
        raise RequestError(
            f"from a sidecar client, every connection to port {port} goes to {entry} (a TCP"
            f" port without addresses), not to {target.workload.ref}"
        )
    if registry_only:
        return ClientRoute(
            RouteKind.CLOSED,
            f"{where}, which is not in the service registry: the client sidecar closes the"
            " connection (REGISTRY_ONLY, BlackHoleCluster)",
        )
    return ClientRoute(
        RouteKind.PASSTHROUGH,
        f"{where}, which is not in the service registry: the client sidecar passes it"
        " through (PassthroughCluster) in plaintext, without its identity",
    )


def _http_port_in_registry(mesh: MeshPolicy, port: int) -> bool:
    """Does some Service or ServiceEntry serve HTTP on ``port`` (so a sidecar has an
    outbound HTTP listener on ``0.0.0.0:port``)?"""
    return port in _HTTP_PORTS.get(mesh, None)


def _http_ports(mesh: MeshPolicy, _: None) -> frozenset[int]:
    found = {
        sp.port
        for service in mesh.snapshot.services
        for sp in service.ports
        if not proxied_as_tcp(sp.name, sp.protocol)
    }
    for entry in mesh.snapshot.of_kind("ServiceEntry"):
        found |= {
            p.number
            for p in entry.spec.ports
            if not proxied_as_tcp(p.name, p.protocol) and p.protocol.upper() != "TLS"
        }
    return frozenset(found)


_HTTP_PORTS: Derived[MeshPolicy, None, frozenset[int]] = Derived("http ports", _http_ports)


def _tcp_entry_on(mesh: MeshPolicy, port: int) -> str | None:
    """The ServiceEntry whose TCP port ``port`` has no addresses: its sidecar listener on
    ``0.0.0.0:port`` takes every connection to that port (Istio's behaviour)."""
    entries = sorted(mesh.snapshot.of_kind("ServiceEntry"), key=lambda r: (r.namespace, r.name))
    for entry in entries:
        spec: m.ServiceEntrySpec = entry.spec
        if spec.addresses:
            continue
        for p in spec.ports:
            protocol = p.protocol.upper()
            if (
                p.number == port
                and protocol not in ("TLS", "HTTPS")
                and proxied_as_tcp(p.name, p.protocol)
            ):
                return f"ServiceEntry {entry.namespace}/{entry.name}"
    return None


def app_protocol(name: str, protocol: str) -> str:
    """Istio's protocol selection: ``appProtocol`` (or a ServiceEntry ``protocol``) first,
    then the port name's prefix before ``-``."""
    return protocol.lower() if protocol not in _L4_PROTOCOLS else name.lower().split("-", 1)[0]


def proxied_as_tcp(name: str, protocol: str) -> bool:
    """Does a proxy handle this port as TCP (no HTTP connection manager, no Host routing)?"""
    return app_protocol(name, protocol) in _TCP_PROTOCOLS


_proxied_as_tcp = proxied_as_tcp  # the name graph.build imports


def _virtual_host_owner(
    mesh: MeshPolicy, client_namespace: str, port: int, host: str
) -> str | None:
    exact, wildcards = _VIRTUAL_HOSTS.get(mesh, (client_namespace, port))
    found = exact.get(host)
    if found is not None:
        return found
    bare = host.rsplit(":", 1)[0] if host.endswith(f":{port}") else host
    for suffix, owner in wildcards:  # "*.example.com" → ".example.com"
        if bare.endswith(suffix) and len(bare) > len(suffix):
            return owner
    return None


_HostIndex = tuple[dict[str, str], list[tuple[str, str]]]


def _virtual_hosts(mesh: MeshPolicy, key: tuple[str, int]) -> _HostIndex:
    """The client namespace's outbound HTTP virtual hosts on a port: exact names, and
    wildcard suffixes, each with the Service or ServiceEntry that owns it."""
    client_namespace, port = key
    exact: dict[str, str] = {}
    wildcards: list[tuple[str, str]] = []
    for service in sorted(mesh.snapshot.services, key=lambda s: s.hostname):
        ports = [sp for sp in service.ports if sp.port == port]
        if not ports or any(proxied_as_tcp(sp.name, sp.protocol) for sp in ports):
            continue
        short = f"{service.name}.{service.namespace}"
        names = [service.hostname, f"{short}.svc", short]
        if service.namespace == client_namespace:
            names.append(service.name)
        for name in names:
            for domain in (name, f"{name}:{port}"):
                exact.setdefault(domain.lower(), f"Service {service.namespace}/{service.name}")
    entries = sorted(mesh.snapshot.of_kind("ServiceEntry"), key=lambda r: (r.namespace, r.name))
    for entry in entries:
        spec: m.ServiceEntrySpec = entry.spec
        if not any(p.number == port and not proxied_as_tcp(p.name, p.protocol) for p in spec.ports):
            continue
        owner = f"ServiceEntry {entry.namespace}/{entry.name}"
        for pattern in spec.hosts:
            pattern = pattern.lower()
            if pattern.startswith("*"):
                wildcards.append((pattern[1:], owner))
            else:
                for domain in (pattern, f"{pattern}:{port}"):
                    exact.setdefault(domain, owner)
    return exact, wildcards


def service_for(target: WorkloadPolicy, port: int) -> tuple[Service | None, int | None]:
    """The Service (and its port) a client reaches ``port`` of the workload through."""
    fallback: Service | None = None
    named: dict[str, int] | None = None
    for service in target.services:
        fallback = fallback or service
        for sp in service.ports:
            number: int | None
            if sp.target_port is None:
                number = sp.port
            elif isinstance(sp.target_port, str):  # named: the workload's container port
                if named is None:
                    named = dict(named_ports(target.workload))
                number = named.get(sp.target_port)
            else:
                number = sp.target_port
            if number == port:
                return service, sp.port
    return fallback, None


def destination_rule_tls(
    mesh: MeshPolicy, client_namespace: str, service: Service, service_port: int | None
) -> tuple[Resource[Any], m.ClientTlsSettings] | None:
    """The DestinationRule TLS setting a client in ``client_namespace`` uses, if any."""
    rule = destination_rule_for(mesh, client_namespace, service)
    found = _rule_tls_setting(rule, service_port) if rule is not None else None
    return (rule, found[0]) if rule is not None and found is not None else None


def destination_subsets(
    mesh: MeshPolicy, client_namespace: str, service: Service
) -> tuple[m.Subset, ...]:
    """The subsets of the DestinationRule a client in ``client_namespace`` uses for
    ``service`` (Istio builds a cluster per subset, routed to or not)."""
    rule = destination_rule_for(mesh, client_namespace, service)
    return rule.spec.subsets if rule is not None else ()


def destination_rule_for(
    mesh: MeshPolicy, client_namespace: str, service: Service
) -> Resource[Any] | None:
    """The DestinationRule that wins for this client namespace and service: the client's
    namespace, the service's, the root namespace, among the rules exported to the client
    (``exportTo``; its own namespace's always); exact host before wildcard, then the oldest
    (remembered per mesh)."""
    chosen = _CHOSEN_RULES.table(mesh)
    key = (client_namespace, service.namespace, service.name)
    if key in chosen:
        return chosen[key]
    index = _DR_INDEX.get(mesh, None)
    root = mesh.snapshot.mesh.root_namespace
    result = None
    for namespace in dict.fromkeys((client_namespace, service.namespace, root)):
        exact, wildcards = index.get(namespace, ({}, []))
        matching = [
            r
            for r in exact.get(service.hostname, [])
            + [r for r in wildcards if _host_matches(r, service)]
            if _visible(r, client_namespace)
        ]
        if matching:
            result = min(matching, key=lambda r: (r.spec.host.startswith("*"), r.age_key()))
            break
    chosen[key] = result
    return result


def _visible(rule: Resource[Any], client_namespace: str) -> bool:
    """istiod's DestinationRule visibility: a proxy sees every rule of its own namespace,
    and another namespace's rule when its ``exportTo`` reaches the proxy's namespace."""
    return rule.namespace == client_namespace or exported_to(rule, client_namespace)


_DrIndex = dict[str, tuple[dict[str, list[Resource[Any]]], list[Resource[Any]]]]


def _index_destination_rules(mesh: MeshPolicy, _: None) -> _DrIndex:
    """Per namespace: DestinationRules by the FQDN they name, and wildcard ones."""
    index: _DrIndex = {}
    for rule in mesh.snapshot.of_kind("DestinationRule"):
        exact, wildcards = index.setdefault(rule.namespace, ({}, []))
        host: str = rule.spec.host
        if host.startswith("*"):
            wildcards.append(rule)
            continue
        parts = host.split(".")
        if len(parts) == 1:
            host = f"{host}.{rule.namespace}.svc.cluster.local"
        elif len(parts) == 2:
            host = f"{host}.svc.cluster.local"
        exact.setdefault(host, []).append(rule)
    return index


_VIRTUAL_HOSTS: Derived[MeshPolicy, tuple[str, int], _HostIndex] = Derived(
    "virtual hosts", _virtual_hosts
)
_DR_INDEX: Derived[MeshPolicy, None, _DrIndex] = Derived("dr index", _index_destination_rules)
# (client namespace, service namespace, service name) → the DestinationRule that wins.
_CHOSEN_RULES: Derived[MeshPolicy, tuple[str, str, str], Resource[Any] | None] = Derived(
    "chosen destination rules"
)


def _host_matches(rule: Resource[Any], service: Service) -> bool:
    host: str = rule.spec.host
    fqdn = service.hostname
    if host == "*" or host == fqdn:
        return True
    if host.startswith("*."):
        return fqdn.endswith(host[1:])
    parts = host.split(".")
    if len(parts) == 1:
        return f"{host}.{rule.namespace}.svc.cluster.local" == fqdn
    if len(parts) == 2:
        return f"{host}.svc.cluster.local" == fqdn
    return False


def egress_decision(
    mesh: MeshPolicy, request: Request, source: Workload | None
) -> tuple[Verdict, int | None, str]:
    """Outbound from ``source`` to a host outside the workload list."""
    host = (
        (request.destination_host or "").lower().rsplit(":", 1)[0]
        if request.destination_host
        else ""
    )
    is_http = request.http is not None
    ok_status = 200 if is_http else None
    if source is None:
        raise RequestError("an egress question needs a source workload (--from NS/NAME)")
    dataplane = source.dataplane.mode
    if dataplane is MeshMode.GATEWAY:
        return (
            Verdict.UNSUPPORTED,
            None,
            f"unsupported: gateway: source {source.ref} is a gateway: where it sends traffic"
            " follows its Gateway / VirtualService routes, which trustmesh does not model",
        )
    if dataplane is MeshMode.AMBIENT:
        waypoint = _egress_waypoint(mesh, host)
        if waypoint is not None:
            return (
                Verdict.UNSUPPORTED,
                None,
                f"unsupported: ambient: {host} is bound to egress waypoint {waypoint};"
                " trustmesh does not model a waypoint's enforcement",
            )
        return (
            Verdict.ALLOW,
            ok_status,
            f"source {source.ref} is ambient: ztunnel does not apply outboundTrafficPolicy"
            " (only sidecars and egress waypoints do), egress is not controlled",
        )
    if dataplane is not MeshMode.SIDECAR:
        return (
            Verdict.ALLOW,
            ok_status,
            f"source {source.ref} has no sidecar: egress is not controlled",
        )
    known = registry_entry(mesh, host, source.namespace)
    if known:
        reason = f"{host} is in the service registry ({known})"
        port = _egress_port(request) or (80 if is_http else None)
        entry_port = _entry_port(mesh, known, port) if port is not None else None
        if entry_port is not None and port is not None:
            entry_namespace = known.removeprefix("ServiceEntry ").split("/", 1)[0]
            upstream = origination_tls(mesh, source.namespace, entry_namespace, host, port)
            if sidecar_origination_problem(upstream) is not None and not app_speaks_tls(
                entry_port.name, entry_port.protocol
            ):
                return (
                    Verdict.DENY,
                    503 if is_http else None,
                    (f"{reason}; {describe_origination(upstream, host)}"),
                )
            if upstream.mode is not UpstreamMode.PLAINTEXT or upstream.rule:
                reason = f"{reason}; {describe_origination(upstream, host)}"
        return Verdict.ALLOW, ok_status, reason
    from trustmesh.policy.routing import sidecar_mesh_routes  # (routing imports this module)

    routed = sidecar_mesh_routes(mesh).for_host(host, source.namespace)
    if routed is not None:
        return (
            Verdict.UNSUPPORTED,
            None,
            f"unsupported: VirtualService {routed.namespace}/{routed.resource.name} routes"
            f" {host} for {source.ref} (to an egress gateway, say); trustmesh does not follow"
            " egress routes offline",
        )
    source_policy = mesh.for_workload(source.ref)
    mode = (
        source_policy.egress_mode
        if source_policy
        else mesh.snapshot.mesh.outbound_traffic_policy.mode
    )
    if mode is m.OutboundTrafficPolicyMode.ALLOW_ANY:
        return Verdict.ALLOW, ok_status, f"{host} is unknown; ALLOW_ANY passes it through"
    port = _egress_port(request)
    if is_http and (port is None or _http_port_in_registry(mesh, port)):
        return (
            Verdict.DENY,
            502,
            f"{host} is unknown under REGISTRY_ONLY: the outbound HTTP route of port"
            f" {port or 80} has no virtual host for it (block_all: 502)",
        )
    if is_http:
        return (
            Verdict.RESET,
            None,
            f"{host} is unknown under REGISTRY_ONLY and no Service or ServiceEntry serves HTTP"
            f" on port {port}, so the sidecar has no HTTP listener there: virtualOutbound"
            " sends the connection to BlackHoleCluster, which closes it",
        )
    return Verdict.RESET, None, f"{host} is unknown under REGISTRY_ONLY: connection reset"


def _entry_port(mesh: MeshPolicy, known: str, port: int) -> m.ServicePort | None:
    """The port ``port`` of the ServiceEntry ``known`` names (``ServiceEntry ns/name``)."""
    if not known.startswith("ServiceEntry "):
        return None
    namespace, _, name = known.removeprefix("ServiceEntry ").partition("/")
    for entry in mesh.snapshot.of_kind("ServiceEntry"):
        if entry.namespace == namespace and entry.name == name:
            ports: tuple[m.ServicePort, ...] = entry.spec.ports
            return next((p for p in ports if p.number == port), None)
    return None


def _egress_port(request: Request) -> int | None:
    """The port an egress request goes to: the question's, else one in its host."""
    if request.port is not None:
        return request.port
    _, colon, port = (request.destination_host or "").rpartition(":")
    return int(port) if colon and port.isdigit() else None


def _egress_waypoint(mesh: MeshPolicy, host: str) -> str | None:
    for entry in mesh.snapshot.of_kind("ServiceEntry"):
        waypoint = entry.labels.get(USE_WAYPOINT)
        if not waypoint or waypoint == "none":
            continue
        for pattern in entry.spec.hosts:
            pattern = pattern.lower()
            if pattern == host or (pattern.startswith("*") and host.endswith(pattern[1:])):
                return f"{waypoint} (ServiceEntry {entry.namespace}/{entry.name})"
    return None


def registry_entry(mesh: MeshPolicy, host: str, client_namespace: str | None = None) -> str | None:
    """What makes ``host`` known: a Service or a ServiceEntry (one exported to
    ``client_namespace``, when given), or None."""
    for service in mesh.snapshot.services:
        forms = (
            service.hostname,
            f"{service.name}.{service.namespace}.svc",
            f"{service.name}.{service.namespace}",
        )
        if host in forms:
            return f"Service {service.namespace}/{service.name}"
    for entry in mesh.snapshot.of_kind("ServiceEntry"):
        if client_namespace is not None and not exported_to(entry, client_namespace):
            continue
        for pattern in entry.spec.hosts:
            pattern = pattern.lower()
            if pattern == host or (pattern.startswith("*") and host.endswith(pattern[1:])):
                return f"ServiceEntry {entry.namespace}/{entry.name}"
    return None

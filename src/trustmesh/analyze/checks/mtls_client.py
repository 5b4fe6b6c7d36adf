"""mTLS checks on the client side: what TLS a sidecar client originates, per host.

TM-MTLS-003 … 005 (DestinationRule TLS) and 007 (reliance on auto mTLS); registered when
:mod:`trustmesh.analyze.checks.mtls` imports this module. The port and service helpers
here are shared with that module.

Which DestinationRule a client uses comes from
:func:`trustmesh.policy.destination_rules.destination_rule_tls`
(client namespace, then the service's, then the root namespace), the same lookup the
evaluator makes, so a rule shadowed by another one is never blamed for traffic it does
not carry. What the server accepts comes from the compiled ``WorkloadPolicy``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule
from trustmesh.api import models as m
from trustmesh.api.dataplane import MeshMode
from trustmesh.api.diagnostics import field_path
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import Service, ServicePortInfo, Workload
from trustmesh.api.yamldoc import FieldPath
from trustmesh.policy.compose import WorkloadPolicy
from trustmesh.policy.derived import Derived
from trustmesh.policy.destination_rules import destination_rule_tls

HTTP_PROTOCOLS = frozenset({"http", "http2", "grpc", "grpc-web", "h2c"})
_USER_TLS = (m.TlsMode.SIMPLE, m.TlsMode.MUTUAL)
_LISTED = 6  # names spelled out in a message; the rest are in `workloads`


# --- shared helpers ----------------------------------------------------------------------


def listing(items: list[str] | tuple[str, ...]) -> str:
    """``a, b, c and 4 more``: messages stay one line however large the mesh."""
    shown = ", ".join(items[:_LISTED])
    return shown + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def to_yaml(*documents: dict[str, Any]) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in documents)


def target_port(workload: Workload, port: ServicePortInfo) -> int | None:
    """The workload port a Service port forwards to (named target ports resolved)."""
    if isinstance(port.target_port, int):
        return port.target_port
    return _named_ports(workload).get(port.target_port)


def _named_ports(workload: Workload) -> dict[str, int]:
    r = workload.resource
    if r.kind == "WorkloadEntry":
        return dict(r.spec.ports)
    containers = r.spec.spec.containers if r.kind == "Pod" else r.spec.template.spec.containers
    return {p.name: p.container_port for c in containers for p in c.ports if p.name}


def inbound_ports(policy: WorkloadPolicy) -> tuple[int, ...]:
    """Ports the workload serves: container ports, Service target ports, portLevelMtls keys.

    Empty when nothing declares one; callers then use the workload-wide mTLS mode.
    """
    ports = set(policy.workload.ports) | set(policy.mtls.ports)
    for service in policy.services:
        for sp in service.ports:
            port = target_port(policy.workload, sp)
            if port is not None:
                ports.add(port)
    return tuple(sorted(ports))


def is_http_port(policy: WorkloadPolicy, port: int) -> bool:
    """Istio's protocol selection: appProtocol, else the port name's prefix."""
    for service in policy.services:
        for sp in service.ports:
            if target_port(policy.workload, sp) == port and _is_http(sp.protocol, sp.name):
                return True
    return False


def _is_http(protocol: str, name: str) -> bool:
    return protocol.lower() in HTTP_PROTOCOLS or name.lower().split("-")[0] in HTTP_PROTOCOLS


def servers_of(ctx: AnalysisContext, service: Service) -> list[WorkloadPolicy]:
    """Workloads behind ``service`` (index built once per mesh)."""
    return list(_SERVERS.get(ctx, None).get((service.namespace, service.name), ()))


def _servers_index(ctx: AnalysisContext, _: None) -> dict[tuple[str, str], list[WorkloadPolicy]]:
    index: dict[tuple[str, str], list[WorkloadPolicy]] = {}
    for policy in ctx.mesh.workloads.values():
        for selected in policy.services:
            index.setdefault((selected.namespace, selected.name), []).append(policy)
    return index


_SERVERS: Derived[AnalysisContext, None, dict[tuple[str, str], list[WorkloadPolicy]]] = Derived(
    "servers of services", _servers_index
)
# (scope of a DestinationRule) → the sidecar workloads it applies to.
_DR_CLIENTS: Derived[AnalysisContext, tuple[object, ...], tuple[str, ...]] = Derived(
    "destination rule clients"
)


def client_groups(ctx: AnalysisContext) -> list[tuple[str, tuple[str, ...]]]:
    """Namespaces with sidecar clients (only a sidecar applies a DestinationRule), grouped
    by the answer they get: ``(namespace to look up from, namespaces it stands for)``.

    A client namespace holding no DestinationRule falls through to the service's and the
    root namespace, like every other such namespace, so one lookup answers for all.
    """
    namespaces = sorted({p.workload.namespace for p in ctx.sidecar_workloads()})
    own = {r.namespace for r in ctx.resources("DestinationRule")}
    groups: list[tuple[str, tuple[str, ...]]] = [(ns, (ns,)) for ns in namespaces if ns in own]
    rest = tuple(ns for ns in namespaces if ns not in own)
    if rest:
        groups.append((rest[0], rest))
    return groups


def tls_path(rule_: Resource[Any], tls: m.ClientTlsSettings) -> FieldPath:
    """Where ``tls`` (an object read from ``rule_``'s spec) is written, relative to spec."""
    policy: m.TrafficPolicy | None = rule_.spec.traffic_policy
    if policy is not None:
        for i, level in enumerate(policy.port_level_settings):
            if level.tls is tls:
                return ("trafficPolicy", "portLevelSettings", i, "tls")
    return ("trafficPolicy", "tls")


# --- TM-MTLS-003 -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Conflict:
    kind: str
    severity: Severity
    why: str
    fix: str


@dataclass(slots=True)
class _Hits:
    conflict: _Conflict
    hosts: set[str] = field(default_factory=set)
    clients: set[str] = field(default_factory=set)
    targets: set[str] = field(default_factory=set)
    workloads: set[str] = field(default_factory=set)


def _conflict(server: WorkloadPolicy, port: int, mode: m.TlsMode) -> _Conflict | None:
    """What goes wrong when a client with DestinationRule TLS ``mode`` reaches ``port``."""
    if not server.workload.has_sidecar:
        # Only a pod known to be outside the mesh refuses mesh mTLS for sure: ambient pods
        # (HBONE), gateways and pods of unknown injection are not judged here.
        if mode is m.TlsMode.ISTIO_MUTUAL and server.workload.dataplane.mode is MeshMode.NONE:
            return _Conflict(
                "mtls-to-no-sidecar",
                Severity.ERROR,
                "no sidecar terminates mesh mTLS there, so the connection fails",
                "inject a sidecar into the server, or drop tls / set mode DISABLE for this host",
            )
        return None  # plaintext or app-level TLS to a plain pod: what it expects
    source = server.mtls.for_port(port)
    if mode is m.TlsMode.DISABLE and source.mode is m.MtlsMode.STRICT:
        return _Conflict(
            "plaintext-to-strict",
            Severity.ERROR,
            "plaintext to a STRICT port: connection reset",
            "set the mode to ISTIO_MUTUAL, or remove the tls block so auto mTLS chooses",
        )
    if mode is m.TlsMode.DISABLE and source.mode is m.MtlsMode.PERMISSIVE:
        return _Conflict(
            "plaintext-to-sidecar",
            Severity.WARNING,
            "turns off mTLS towards a sidecar that accepts it (PERMISSIVE): traffic is"
            " plaintext and carries no peer identity for AuthorizationPolicy",
            "set the mode to ISTIO_MUTUAL, or remove the tls block so auto mTLS chooses",
        )
    if mode is m.TlsMode.ISTIO_MUTUAL and source.mode is m.MtlsMode.DISABLE:
        return _Conflict(
            "mtls-to-disable",
            Severity.ERROR,
            "mesh mTLS to a DISABLE port: connection reset",
            "raise the port's PeerAuthentication, or remove the tls block (auto mTLS"
            " sends plaintext to DISABLE ports)",
        )
    if mode in _USER_TLS and source.mode is m.MtlsMode.STRICT:
        return _Conflict(
            "user-tls-to-strict",
            Severity.ERROR,
            "TLS with user certificates to a STRICT port: the sidecar requires a mesh"
            " client certificate and refuses the connection",
            "use ISTIO_MUTUAL for in-mesh hosts (app-level TLS needs PERMISSIVE on that port)",
        )
    return None


def _target(server: WorkloadPolicy, port: int) -> str:
    """``ns/name:port``, with where the port's mode comes from when it has a sidecar."""
    if not server.workload.has_sidecar:
        return f"{server.workload.ref}:{port} (no sidecar)"
    source = server.mtls.for_port(port)
    origin = f"{source.scope} PeerAuthentication {source.policy}" if source.policy else "default"
    return f"{server.workload.ref}:{port} ({source.mode.value}, {origin})"


@rule(
    "TM-MTLS-003",
    title="DestinationRule TLS conflicts with the server's PeerAuthentication",
    severity=Severity.ERROR,
    family="mtls",
    rationale=(
        "An explicit DestinationRule TLS mode always wins over auto mTLS. Plaintext to a STRICT"
        " port or mesh mTLS to a DISABLE port / a pod without a sidecar breaks every"
        " connection; DISABLE towards a sidecar that accepts mTLS silently downgrades the"
        " traffic to plaintext without peer identity."
    ),
)
def destination_rule_conflicts(ctx: AnalysisContext) -> Iterator[Issue]:
    """Per service port and client namespace: the DR the client uses vs. the server's mode."""
    hits: dict[tuple[str, FieldPath, str], tuple[Resource[Any], m.ClientTlsSettings, _Hits]] = {}
    groups = client_groups(ctx)
    for service in ctx.snapshot.services:
        servers = servers_of(ctx, service)
        for sp in service.ports:
            for namespace, namespaces in groups:
                setting = destination_rule_tls(ctx.mesh, namespace, service, sp.port)
                if setting is None:
                    continue
                dr, tls = setting
                for server in servers:
                    port = target_port(server.workload, sp)
                    if port is None:
                        continue
                    found = _conflict(server, port, tls.mode)
                    if found is None:
                        continue
                    key = (dr.key, tls_path(dr, tls), found.kind)
                    entry = hits.setdefault(key, (dr, tls, _Hits(found)))[2]
                    entry.hosts.add(f"{service.hostname}:{sp.port}")
                    entry.clients.update(namespaces)
                    entry.targets.add(_target(server, port))
                    entry.workloads.add(server.workload.ref)
    ordered = sorted(hits.items(), key=lambda kv: (kv[0][0], field_path(kv[0][1]), kv[0][2]))
    for (_, path, _), (dr, tls, entry) in ordered:
        mode = tls.mode.value
        where = field_path(("spec", *path, "mode"))
        yield Issue(
            message=(
                f"DestinationRule {dr.namespace}/{dr.name} sends tls {mode} to"
                f" {listing(sorted(entry.hosts))} → {listing(sorted(entry.targets))}:"
                f" {entry.conflict.why}; used by sidecar clients in namespace(s)"
                f" {listing(sorted(entry.clients))}"
            ),
            location=dr.location(*path, "mode"),
            resource=dr.key,
            workloads=tuple(sorted(entry.workloads)),
            fix=f"In DestinationRule {dr.namespace}/{dr.name} ({where}): {entry.conflict.fix}.",
            severity=entry.conflict.severity,
            properties={"conflict": entry.conflict.kind},
        )


# --- TM-MTLS-004 / 005: user TLS (SIMPLE / MUTUAL) hygiene ---------------------------------


@dataclass(frozen=True, slots=True)
class _Defaults:
    """Does istiod verify server certificates (OS trust store) and set SNI on its own?

    Istio 1.21 turned both on (``VERIFY_CERTIFICATE_AT_CLIENT``, ``ENABLE_AUTO_SNI``);
    ``compatibilityVersion: 1.20`` or the pilot env variables turn them back off.
    None: unknown (no version given and nothing set).
    """

    verify: bool | None
    auto_sni: bool | None
    basis: str


def _defaults(ctx: AnalysisContext) -> _Defaults:
    verify: bool | None = None
    auto_sni: bool | None = None
    basis = "Istio version unknown (give --istio-version)"
    version = _minor(ctx.istio_version.value if ctx.istio_version else None)
    if version is not None:
        verify = auto_sni = version >= (1, 21)
        basis = f"Istio {version[0]}.{version[1]}"
    compat = ctx.install.find(("compatibilityVersion",), ("values", "compatibilityVersion"))
    compat_version = _minor(str(compat.value)) if compat else None
    if compat_version is not None and compat_version <= (1, 20):
        verify = auto_sni = False
        basis = f"compatibilityVersion {compat_version[0]}.{compat_version[1]}"
    for name in ("VERIFY_CERTIFICATE_AT_CLIENT", "ENABLE_AUTO_SNI"):
        env = ctx.install.find(("values", "pilot", "env", name), ("pilot", "env", name))
        if env is not None:
            on = str(env.value).lower() == "true"
            if name == "ENABLE_AUTO_SNI":
                auto_sni = on
            else:
                verify = on
            basis += f", {name}={str(env.value).lower()}"
    return _Defaults(verify, auto_sni, basis)


def _minor(text: str | None) -> tuple[int, int] | None:
    parts = (text or "").lstrip("v").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return None


def _user_tls_settings(
    dr: Resource[Any],
) -> Iterator[tuple[FieldPath, m.ClientTlsSettings, int | None]]:
    """Every SIMPLE / MUTUAL setting of a DR, subsets included, with its port if any."""
    spec: m.DestinationRuleSpec = dr.spec
    policies: list[tuple[FieldPath, m.TrafficPolicy | None]] = [
        (("trafficPolicy",), spec.traffic_policy)
    ]
    policies += [
        (("subsets", i, "trafficPolicy"), s.traffic_policy) for i, s in enumerate(spec.subsets)
    ]
    for base, policy in policies:
        if policy is None:
            continue
        if policy.tls is not None and policy.tls.mode in _USER_TLS:
            yield (*base, "tls"), policy.tls, None
        for i, level in enumerate(policy.port_level_settings):
            if level.tls is not None and level.tls.mode in _USER_TLS:
                number = level.port.number if level.port else None
                yield (*base, "portLevelSettings", i, "tls"), level.tls, number


def _dr_clients(ctx: AnalysisContext, dr: Resource[Any]) -> tuple[str, ...]:
    """Sidecar workloads that can see the DR (exportTo, workloadSelector)."""
    spec: m.DestinationRuleSpec = dr.spec
    exported = [dr.namespace if e == "." else e for e in spec.export_to if e != "~"]
    everywhere = not spec.export_to or "*" in spec.export_to
    wanted = spec.workload_selector.match_labels if spec.workload_selector else None
    # Most DestinationRules share an answer (exported everywhere, no selector): remember it.
    key = (
        dr.namespace if wanted is not None or not everywhere else "",
        everywhere,
        tuple(sorted(exported)),
        tuple(sorted(wanted.items())) if wanted is not None else None,
    )
    remembered = _DR_CLIENTS.table(ctx)
    cached = remembered.get(key)
    if cached is not None:
        return cached
    out = []
    for policy in ctx.sidecar_workloads():
        w = policy.workload
        if wanted is not None and (
            w.namespace != dr.namespace or any(w.labels.get(k) != v for k, v in wanted.items())
        ):
            continue
        if everywhere or w.namespace in exported:
            out.append(w.ref)
    result = remembered[key] = tuple(sorted(out))
    return result


def _sidecar_credential(dr: Resource[Any], tls: m.ClientTlsSettings) -> bool:
    """Whether sidecars load ``credentialName``: only with a workloadSelector (istio/api
    ClientTLSSettings.credential_name); otherwise only gateways read it."""
    return bool(tls.credential_name) and dr.spec.workload_selector is not None


def _unverified(dr: Resource[Any], tls: m.ClientTlsSettings, defaults: _Defaults) -> bool:
    """The server certificate is certainly not verified at all."""
    if tls.insecure_skip_verify:
        return True
    return not tls.ca_certificates and not _sidecar_credential(dr, tls) and defaults.verify is False


@rule(
    "TM-MTLS-004",
    title="DestinationRule TLS never verifies the server certificate",
    severity=Severity.WARNING,
    family="mtls",
    rationale=(
        "SIMPLE or MUTUAL TLS without caCertificates (or credentialName) trusts any server"
        " before Istio 1.21, and insecureSkipVerify always does: whoever answers on the path"
        " (a spoofed DNS name, a rogue egress) reads the traffic and the client credentials."
    ),
)
def server_not_verified(ctx: AnalysisContext) -> Iterator[Issue]:
    defaults = _defaults(ctx)
    for dr in ctx.resources("DestinationRule"):
        clients = _dr_clients(ctx, dr)
        who = f"; clients: {listing(clients)}" if clients else ""
        for path, tls, _ in _user_tls_settings(dr):
            head = (
                f"DestinationRule {dr.namespace}/{dr.name} {tls.mode.value} TLS to {dr.spec.host}"
            )
            if tls.insecure_skip_verify:
                yield Issue(
                    message=f"{head} sets insecureSkipVerify: the server is never verified{who}",
                    location=dr.location(*path, "insecureSkipVerify"),
                    resource=dr.key,
                    workloads=clients,
                    fix="Remove insecureSkipVerify and set caCertificates (a file, or `system`"
                    " for the OS trust store) and subjectAltNames.",
                )
                continue
            if tls.ca_certificates or _sidecar_credential(dr, tls) or defaults.verify is True:
                continue  # verified: by the given CA, the credential, or the OS trust store
            gateway_only = (
                f": credentialName {tls.credential_name} is read only by gateways (the"
                " DestinationRule has no workloadSelector), so sidecars get no CA from it:"
                if tls.credential_name
                else " has no caCertificates or credentialName:"
            )
            if defaults.verify is False:
                why, severity = f"the server is never verified ({defaults.basis})", None
            else:
                why = (
                    "the server is not verified on Istio < 1.21 (1.21+ uses the OS trust"
                    f" store); {defaults.basis}"
                )
                severity = Severity.INFO
            yield Issue(
                message=f"{head}{gateway_only} {why}{who}",
                location=dr.location(*path, "caCertificates"),
                resource=dr.key,
                workloads=clients,
                fix=(
                    "Add spec.workloadSelector for the client workloads (sidecars then load"
                    " credentialName), or set "
                    if tls.credential_name
                    else "Set "
                )
                + f"{field_path(('spec', *path, 'caCertificates'))} to the CA file that"
                " signs the server (or `system` for the OS trust store).",
                severity=severity,
            )


def _non_http_ports(ctx: AnalysisContext, dr: Resource[Any], port: int | None) -> str | None:
    """The host's ports the setting covers that are not HTTP ("" = none); None if unknown."""
    host = str(dr.spec.host).lower()
    found: list[tuple[int, bool]] | None = None
    for s in ctx.snapshot.services:
        names = (s.hostname, f"{s.name}.{s.namespace}.svc", f"{s.name}.{s.namespace}")
        if host in names or (host == s.name and s.namespace == dr.namespace):
            found = [(p.port, _is_http(p.protocol, p.name)) for p in s.ports]
    for entry in ctx.resources("ServiceEntry"):
        if host in (h.lower() for h in entry.spec.hosts):
            found = [(p.number, _is_http(p.protocol, p.name)) for p in entry.spec.ports]
    covered = [(n, http) for n, http in found or () if port is None or n == port]
    if not covered:
        return None
    return ", ".join(str(n) for n, http in covered if not http)


@rule(
    "TM-MTLS-005",
    title="DestinationRule TLS does not check the server's name",
    severity=Severity.WARNING,
    family="mtls",
    rationale=(
        "Without subjectAltNames the client accepts any certificate its trusted CA signed, for"
        " any name. Istio 1.21+ derives SNI and checks the name only for HTTP traffic and only"
        " when sni is not set; TCP/TLS traffic and an explicit sni get no name check."
    ),
)
def server_name_not_checked(ctx: AnalysisContext) -> Iterator[Issue]:
    defaults = _defaults(ctx)
    auto_san = (
        None
        if defaults.verify is None or defaults.auto_sni is None
        else defaults.verify and defaults.auto_sni
    )
    for dr in ctx.resources("DestinationRule"):
        clients = _dr_clients(ctx, dr)
        who = f"; clients: {listing(clients)}" if clients else ""
        for path, tls, port in _user_tls_settings(dr):
            if tls.subject_alt_names or _unverified(dr, tls, defaults):
                continue  # names are checked, or nothing is (TM-MTLS-004 reports that)
            head = (
                f"DestinationRule {dr.namespace}/{dr.name} {tls.mode.value} TLS to {dr.spec.host}"
            )
            severity: Severity | None = None
            if tls.sni:
                why = (
                    f"sets sni {tls.sni} but no subjectAltNames: an explicit sni turns off"
                    " Istio's automatic SAN check, so any certificate the CA issued is accepted"
                )
            elif auto_san is False:
                why = (
                    "has neither sni nor subjectAltNames: the server's name is never checked"
                    f" ({defaults.basis})"
                )
            else:
                other = _non_http_ports(ctx, dr, port)
                if auto_san and other == "":
                    continue  # HTTP only: auto SNI + auto SAN validation cover it
                if other is None:
                    scope = f"the ports of {dr.spec.host} are not known"
                elif other:
                    scope = f"port(s) {other} are not HTTP"
                else:
                    scope = "its ports are HTTP"
                why = (
                    "has neither sni nor subjectAltNames: Istio 1.21+ derives SNI and checks"
                    " the name for HTTP traffic only, earlier versions never do, and"
                    f" {scope} ({defaults.basis})"
                )
                severity = Severity.INFO
            yield Issue(
                message=f"{head} {why}{who}",
                location=dr.location(*path, "subjectAltNames"),
                resource=dr.key,
                workloads=clients,
                fix=f"Set {field_path(('spec', *path, 'subjectAltNames'))} to the names the"
                f" server's certificate must carry (e.g. [{dr.spec.host}]) and sni to match.",
                severity=severity,
            )


# --- TM-MTLS-007 ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reliant:
    service: str  # name.namespace:port
    namespace: str
    host: str
    server: WorkloadPolicy
    mode: m.MtlsMode


def _reliant(ctx: AnalysisContext) -> list[_Reliant]:
    """Sidecar service ports some sidecar client reaches with no DestinationRule TLS."""
    groups = client_groups(ctx)
    out = []
    for service in ctx.snapshot.services:
        servers = [s for s in servers_of(ctx, service) if s.workload.has_sidecar]
        for sp in service.ports:
            if all(destination_rule_tls(ctx.mesh, ns, service, sp.port) for ns, _ in groups):
                continue
            for server in servers:
                port = target_port(server.workload, sp)
                mode = server.mtls.for_port(port).mode if port is not None else None
                if mode is None or mode is m.MtlsMode.DISABLE:
                    continue  # plaintext is what that port wants; not relying on mTLS
                name = f"{service.name}.{service.namespace}:{sp.port}"
                out.append(_Reliant(name, service.namespace, service.hostname, server, mode))
    return out


@rule(
    "TM-MTLS-007",
    title="Sidecar-to-sidecar mTLS left to enableAutoMtls",
    severity=Severity.INFO,
    family="mtls",
    rationale=(
        "With no DestinationRule TLS, clients choose mTLS per endpoint from auto mTLS: any"
        " endpoint without a sidecar (or not labelled as one) silently gets plaintext, and with"
        " enableAutoMtls off sidecars send plaintext to each other. Setting ISTIO_MUTUAL"
        " explicitly makes the client refuse instead of downgrading."
    ),
)
def auto_mtls_reliance(ctx: AnalysisContext) -> Iterator[Issue]:
    reliant = _reliant(ctx)
    if not reliant:
        return
    location = ctx.mesh_location("enableAutoMtls")
    workloads = tuple(sorted({r.server.workload.ref for r in reliant}))
    names = sorted({r.service for r in reliant})
    if ctx.snapshot.mesh.enable_auto_mtls:
        yield Issue(
            message=(
                f"enableAutoMtls is on{'' if location else ' (default)'} and no DestinationRule"
                f" sets TLS for {listing(names)}: sidecar clients get mTLS only because auto"
                " mTLS picks it, and send plaintext to any endpoint without a sidecar"
            ),
            location=location,
            resource="",
            workloads=workloads,
            fix=_istio_mutual_rules(ctx, reliant),
        )
        return
    for mode, severity, effect in (
        (m.MtlsMode.STRICT, Severity.ERROR, "connections are reset by the STRICT servers"),
        (m.MtlsMode.PERMISSIVE, Severity.WARNING, "traffic between sidecars is plaintext"),
    ):
        hit = [r for r in reliant if r.mode is mode]
        if hit:
            yield Issue(
                message=(
                    f"enableAutoMtls is off and no DestinationRule sets TLS for"
                    f" {listing(sorted({r.service for r in hit}))} ({mode.value} servers):"
                    f" sidecar clients send plaintext, so {effect}"
                ),
                location=location,
                resource="",
                workloads=tuple(sorted({r.server.workload.ref for r in hit})),
                fix=_istio_mutual_rules(ctx, hit),
                severity=severity,
            )


def _istio_mutual_rules(ctx: AnalysisContext, reliant: list[_Reliant]) -> str:
    """ISTIO_MUTUAL DestinationRules: one wildcard per namespace whose services all take
    mesh mTLS, else one per such service. A service with an endpoint without a sidecar or
    a DISABLE port is left out: ISTIO_MUTUAL would break it (TM-MTLS-003)."""
    documents = []
    skipped: list[str] = []
    by_namespace: dict[str, set[str]] = defaultdict(set)
    for r in reliant:
        by_namespace[r.namespace].add(r.host)
    for namespace, hosts in sorted(by_namespace.items()):
        services = [s for s in ctx.snapshot.services if s.namespace == namespace]
        if all(_takes_mesh_mtls(ctx, s) for s in services):
            host = f"*.{namespace}.svc.cluster.local"
            documents.append(_istio_mutual("istio-mutual", namespace, host))
            continue
        for service in services:
            if service.hostname not in hosts:
                continue
            if _takes_mesh_mtls(ctx, service):
                name = f"{service.name}-istio-mutual"
                documents.append(_istio_mutual(name, namespace, service.hostname))
            else:
                skipped.append(service.hostname)
    note = (
        "# If a DestinationRule already exists for one of these hosts, add the tls block to it:\n"
        "# a client uses only one DestinationRule per host.\n"
    )
    if skipped:
        note += (
            f"# Left out (an endpoint without a sidecar or a DISABLE port): {', '.join(skipped)}\n"
        )
    return note + to_yaml(*documents) if documents else note


def _takes_mesh_mtls(ctx: AnalysisContext, service: Service) -> bool:
    """Every endpoint of every port of ``service`` terminates mesh mTLS."""
    for server in servers_of(ctx, service):
        if not server.workload.has_sidecar:
            return False
        for sp in service.ports:
            port = target_port(server.workload, sp)
            if port is not None and server.mtls.for_port(port).mode is m.MtlsMode.DISABLE:
                return False
    return True


def _istio_mutual(name: str, namespace: str, host: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"host": host, "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}}},
    }

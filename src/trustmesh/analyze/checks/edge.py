"""Ingress and egress checks (TM-EDGE-*): outbound policy, Gateway hosts, TLS and credentials.

Egress reads the compiled ``WorkloadPolicy.egress_mode`` (mesh config and Sidecar overrides
already resolved). Gateways are modelled here from the raw documents, because the API
model keeps only their hosts: a Gateway's servers run on the gateway workloads its
``selector`` matches in any namespace (Istio's default
``PILOT_SCOPE_GATEWAY_TO_NAMESPACE=false``), servers of every Gateway on the same workload
and port share one listener, and an HTTPS server's routes are the VirtualServices bound
to *its* Gateway whose hosts it admits.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from trustmesh.analyze.checks.edge_gateways import (
    GatewayIndex,
    Server,
    covers,
    host_part,
    intersects,
    tls_rank,
)
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule
from trustmesh.api import models as m
from trustmesh.api.dataplane import MeshMode
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import Workload

ALLOW_ANY = m.OutboundTrafficPolicyMode.ALLOW_ANY
_LISTED = 6  # workloads named in a message before "and N more"


def _names(refs: list[str] | tuple[str, ...]) -> str:
    shown = ", ".join(refs[:_LISTED])
    return f"{shown} and {len(refs) - _LISTED} more" if len(refs) > _LISTED else shown


# --- TM-EDGE-001 --------------------------------------------------------------------------


def _sidecar_for(
    workload: Workload, sidecars: tuple[Resource[Any], ...], root: str
) -> Resource[Any] | None:
    """The Sidecar resource Istio applies to ``workload`` (as ``compose._egress_mode``).

    Only used to say *which* resource set the mode; the mode itself is read from the
    compiled ``WorkloadPolicy.egress_mode``.
    """

    def selects(sidecar: Resource[Any]) -> bool:
        selector = sidecar.spec.workload_selector
        labels = selector.labels if selector else {}
        return all(workload.labels.get(k) == v for k, v in labels.items())

    def oldest(candidates: list[Resource[Any]]) -> Resource[Any] | None:
        return min(candidates, key=Resource.age_key, default=None)

    own = [s for s in sidecars if s.namespace == workload.namespace and selects(s)]
    chosen = oldest([s for s in own if s.spec.workload_selector]) or oldest(own)
    if chosen is None:
        chosen = oldest(
            [s for s in sidecars if s.namespace == root and not s.spec.workload_selector]
        )
    return chosen


def _egress_notes(ctx: AnalysisContext, index: GatewayIndex) -> tuple[list[str], bool]:
    notes = []
    external = [
        e for e in ctx.resources("ServiceEntry") if e.spec.location.upper() == "MESH_EXTERNAL"
    ]
    if not external:
        notes.append(
            "no ServiceEntry declares an external host, so nothing records which external "
            "hosts workloads need (add them before switching to REGISTRY_ONLY)"
        )
    if not index.egress_gateways():
        notes.append(
            "no egress gateway (a Gateway selecting istio: egressgateway): traffic leaves "
            "from every pod directly, with no single exit to monitor or restrict"
        )
    gateways = index.gateway_workloads()
    uncaptured = sorted(
        w.ref
        for w in ctx.snapshot.workloads
        if w.dataplane.mode is MeshMode.NONE and w.ref not in gateways
    )
    if uncaptured:
        notes.append(
            f"{_names(uncaptured)} have no sidecar, so no outbound policy applies to them at all"
        )
    ambient = sorted(w.ref for w in ctx.snapshot.workloads if w.dataplane.mode is MeshMode.AMBIENT)
    if ambient:
        notes.append(
            f"{_names(ambient)} are ambient: ztunnel does not apply outboundTrafficPolicy, only"
            " an egress waypoint (a ServiceEntry with istio.io/use-waypoint) restricts them"
        )
    return notes, not external


_MESH_FIX = """\
# IstioOperator spec.meshConfig (or the `mesh` key of ConfigMap istio-system/istio)
meshConfig:
  outboundTrafficPolicy:
    mode: REGISTRY_ONLY
"""
# An example only (commented out so `trustmesh harden` never emits a made-up host).
_SERVICE_ENTRY = """\
# then declare each external host the workloads need, e.g.:
# apiVersion: networking.istio.io/v1
# kind: ServiceEntry
# metadata:
#   name: external-api
#   namespace: istio-system
# spec:
#   hosts: ["api.example.com"]
#   location: MESH_EXTERNAL
#   resolution: DNS
#   ports:
#   - {number: 443, name: tls, protocol: TLS}
"""


@rule(
    "TM-EDGE-001",
    title="Outbound traffic to unknown hosts allowed (ALLOW_ANY)",
    severity=Severity.WARNING,
    family="edge",
    rationale=(
        "With outboundTrafficPolicy ALLOW_ANY (Istio's default) a sidecar passes traffic to "
        "any host outside the service registry, so a compromised pod can reach or exfiltrate "
        "to anywhere. REGISTRY_ONLY limits egress to declared Services and ServiceEntries."
    ),
    fixable=True,
)
def allow_any_egress(ctx: AnalysisContext) -> Iterator[Issue]:
    """Mesh-wide ALLOW_ANY (for workloads no Sidecar overrides) and Sidecar overrides."""
    sidecars = ctx.resources("Sidecar")
    root = ctx.root_namespace
    from_mesh: list[str] = []
    by_sidecar: dict[str, tuple[Resource[Any], list[str]]] = {}
    index = GatewayIndex(ctx)
    # Gateways have no passthrough cluster: outboundTrafficPolicy is a sidecar setting.
    gateways = index.gateway_workloads()
    sidecar_workloads = [p for p in ctx.sidecar_workloads() if p.workload.ref not in gateways]
    for policy in sidecar_workloads:
        if policy.egress_mode is not ALLOW_ANY:
            continue
        chosen = _sidecar_for(policy.workload, sidecars, root)
        if chosen is not None and chosen.spec.outbound_traffic_policy is not None:
            by_sidecar.setdefault(chosen.key, (chosen, []))[1].append(policy.workload.ref)
        else:
            from_mesh.append(policy.workload.ref)
    mesh_mode = ctx.snapshot.mesh.outbound_traffic_policy.mode
    notes, no_inventory = _egress_notes(ctx, index)
    root_default = any(
        s.namespace == root and not s.spec.workload_selector and s.spec.outbound_traffic_policy
        for s in sidecars
    )
    # Without workloads in the input the mesh default still decides for every sidecar,
    # unless a root-namespace Sidecar sets the mode for all of them.
    if mesh_mode is ALLOW_ANY and (from_mesh or (not sidecar_workloads and not root_default)):
        location = ctx.mesh_location("outboundTrafficPolicy", "mode") or ctx.mesh_location(
            "outboundTrafficPolicy"
        )
        how = "is ALLOW_ANY" if location else "is unset (Istio's default ALLOW_ANY)"
        who = f"sidecars of {_names(sorted(from_mesh))}" if from_mesh else "every sidecar"
        also = (" Also: " + "; ".join(notes) + ".") if notes else ""
        yield Issue(
            message=(
                f"meshConfig.outboundTrafficPolicy.mode {how}: {who} pass traffic to any "
                f"unknown host.{also}"
            ),
            location=location,
            resource="",
            workloads=tuple(sorted(from_mesh)),
            fix=_MESH_FIX + (_SERVICE_ENTRY if no_inventory else ""),
            properties={"notes": notes},
        )
    for key in sorted(by_sidecar):
        sidecar, refs = by_sidecar[key]
        over = " overriding the mesh-wide REGISTRY_ONLY" if mesh_mode is not ALLOW_ANY else ""
        yield Issue(
            message=(
                f"Sidecar {sidecar.namespace}/{sidecar.name} sets outboundTrafficPolicy "
                f"ALLOW_ANY{over}: {_names(sorted(refs))} pass traffic to any unknown host"
            ),
            location=sidecar.location("outboundTrafficPolicy", "mode"),
            resource=sidecar.key,
            workloads=tuple(sorted(refs)),
            fix="outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n",
        )


# --- TM-EDGE-002 --------------------------------------------------------------------------


def _is_catch_all(host: str) -> bool:
    """``*`` or ``*/*``: any host, from VirtualServices of any namespace.

    ``ns/*`` and ``./*`` are Istio's recommended way to delegate a gateway to one
    namespace, so they are not flagged.
    """
    namespace, _, name = host.rpartition("/")
    return name == "*" and namespace in ("", "*")


@rule(
    "TM-EDGE-002",
    title='Gateway or VirtualService with hosts "*"',
    severity=Severity.WARNING,
    family="edge",
    rationale=(
        'A Gateway server with hosts "*" serves any Host name and lets a VirtualService in any '
        "namespace publish routes on it, exposing domains nobody reviewed; a catch-all "
        "VirtualService bound to it sends every such name to its backends."
    ),
)
def wildcard_hosts(ctx: AnalysisContext) -> Iterator[Issue]:
    index = GatewayIndex(ctx)
    for server in index.servers:
        for j, host in enumerate(server.hosts):
            if _is_catch_all(host):
                port = f"port {server.number}" if server.number else "its port"
                yield Issue(
                    message=(
                        f"Gateway {server.ref} servers[{server.index}] ({server.protocol} {port})"
                        f' has hosts "{host}": {_names(server.workloads) or "its gateway"} '
                        "serve any Host name, and VirtualServices from any namespace can bind"
                    ),
                    location=server.location("hosts", j),
                    resource=server.gateway.key,
                    workloads=server.workloads,
                    fix=(
                        "list the hostnames this server is for (hosts: [app.example.com]), or "
                        'delegate to one namespace with "<namespace>/*"'
                    ),
                )
    for vs in ctx.resources("VirtualService"):
        for j, host in enumerate(vs.spec.hosts):
            if host != "*":
                continue
            bound = [
                s
                for s in index.bound_servers(vs)
                if any(host_part(h) == "*" and index.admits(s, h, vs) for h in s.hosts)
            ]
            if not bound:
                continue  # the servers' own hosts limit what "*" can catch
            workloads = tuple(sorted({w for s in bound for w in s.workloads}))
            gateways = ", ".join(dict.fromkeys(s.ref for s in bound))
            yield Issue(
                message=(
                    f'VirtualService {vs.namespace}/{vs.name} has hosts "*" and is bound to '
                    f"catch-all Gateway {gateways}: every Host name reaches its backends"
                ),
                location=vs.location("hosts", j),
                resource=vs.key,
                workloads=workloads,
                fix="list the hostnames this VirtualService routes",
            )


# --- TM-EDGE-003 --------------------------------------------------------------------------


def _version(server: Server) -> str:
    return str(server.tls.get("minProtocolVersion") or "TLS_AUTO (1.2)")


def _weaker(wild: Server, specific: Server) -> list[str]:
    """How the wildcard server's TLS is weaker than the specific one's."""
    reasons = []
    if specific.requires_client_cert and not wild.requires_client_cert:
        reasons.append(f"no client certificate required ({wild.mode} instead of {specific.mode})")
    elif (
        specific.requires_client_cert
        and specific.tls.get("subjectAltNames")
        and not wild.tls.get("subjectAltNames")
    ):
        reasons.append("client certificate subjectAltNames not checked")
    if tls_rank(wild.tls.get("minProtocolVersion")) < tls_rank(
        specific.tls.get("minProtocolVersion")
    ):
        reasons.append(f"minProtocolVersion {_version(wild)} instead of {_version(specific)}")
    return reasons


@rule(
    "TM-EDGE-003",
    title="Wildcard gateway server with weaker TLS than a specific host on the same port",
    severity=Severity.WARNING,
    family="edge",
    rationale=(
        "Envoy does not require the Host header to match the TLS SNI: a client can open a "
        "connection with an SNI the wildcard server accepts (weaker TLS, e.g. no client "
        "certificate) and send Host: <specific host>, reaching whatever the wildcard server "
        "routes for that name (Istio security best practices, relaxed SNI host matching)."
    ),
)
def relaxed_sni(ctx: AnalysisContext) -> Iterator[Issue]:
    index = GatewayIndex(ctx)
    terminating = [s for s in index.servers if s.protocol == "HTTPS" and s.terminates]
    for specific in terminating:
        for host in specific.hosts:
            name = host_part(host)
            if "*" in name:
                continue
            for wild in terminating:
                if (
                    wild is specific
                    or wild.number != specific.number
                    or not index.same_proxy(wild, specific)
                    or not any(
                        host_part(h) != name and covers(host_part(h), name) for h in wild.hosts
                    )
                ):
                    continue
                reasons = _weaker(wild, specific)
                if reasons:
                    issue = _relaxed_sni_issue(index, specific, wild, name, reasons)
                    if issue is not None:
                        yield issue


def _relaxed_sni_issue(
    index: GatewayIndex, specific: Server, wild: Server, name: str, reasons: list[str]
) -> Issue | None:
    """Proven exposure when a VirtualService routes ``name`` on the wildcard server too."""
    lead = (
        f"Gateway {wild.ref} servers[{wild.index}] (hosts {', '.join(wild.hosts)}) accepts "
        f"TLS for {name} on port {wild.number} with weaker settings than Gateway "
        f"{specific.ref} servers[{specific.index}]: {'; '.join(reasons)}"
    )
    cert = "no client certificate" in reasons[0]
    steps: list[str] = []
    if wild.gateway.key == specific.gateway.key:
        steps.append(
            f"move servers[{specific.index}] ({name}) of {specific.ref} into a Gateway of its "
            "own and bind the VirtualServices for it only to that Gateway"
        )
    if not index.has_virtual_services:
        reach = "no VirtualServices among the inputs to tell which routes it reaches"
        severity: Severity | None = Severity.INFO
    else:
        on_wild = index.routes_for(wild, name)
        if not on_wild or all(index.disabled(v) for v in on_wild):
            return None  # the wildcard server has no route for the name (or answers 421)
        on_specific = index.routes_for(specific, name)
        shared = [v for v in on_wild if v.key in {s.key for s in on_specific}]
        same_backend = index.destinations(on_wild) & index.destinations(on_specific)
        if shared:
            vs = ", ".join(f"{v.namespace}/{v.name}" for v in shared)
            reach = f"VirtualService {vs} is bound to both, so its routes for {name} are reachable"
            severity = Severity.ERROR if cert else None
            if not steps:
                steps.append(f"bind VirtualService {vs} only to {specific.ref}")
        elif same_backend:
            backends = ", ".join(sorted(same_backend))
            reach = f"requests for {name} there reach the same backend {backends}"
            severity = Severity.ERROR if cert else None
        else:
            vs = ", ".join(f"{v.namespace}/{v.name}" for v in on_wild)
            reach = f"requests for {name} there are routed by {vs} to other backends"
            severity = Severity.INFO
    return Issue(
        message=f"{lead}; a client sending another SNI with Host: {name} gets through: {reach}",
        location=wild.location("tls"),
        resource=wild.gateway.key,
        workloads=wild.workloads,
        fix="".join(f"# {i}. {step}\n" for i, step in enumerate(steps, 1))
        + (f"# {len(steps) + 1}. answer 421 for {name} on {wild.ref}:\n" if steps else "")
        + _disable_host_yaml(wild, name),
        severity=severity,
    )


def _disable_host_yaml(wild: Server, name: str) -> str:
    """Istio's recommendation: answer 421 for the sensitive host on the wildcard gateway."""
    return f"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: disable-{name.replace(".", "-")}
  namespace: {wild.gateway.namespace}
spec:
  hosts: ["{name}"]
  gateways: ["{wild.gateway.namespace}/{wild.gateway.name}"]
  http:
  - directResponse:
      status: 421
"""


# --- TM-EDGE-004 --------------------------------------------------------------------------

_OLD_TLS = ("TLSV1_0", "TLSV1_1")


@rule(
    "TM-EDGE-004",
    title="Gateway TLS: passthrough, no HTTPS redirect, TLS below 1.2, MUTUAL without a CA",
    severity=Severity.WARNING,
    family="edge",
    rationale=(
        "PASSTHROUGH servers forward encrypted bytes the gateway cannot route or authorize by "
        "HTTP attributes; AUTO_PASSTHROUGH exposes every mesh service by SNI. A plain HTTP "
        "server next to an HTTPS one serves the same hosts in cleartext. TLS 1.0/1.1 are "
        "deprecated (RFC 8996), and MUTUAL without a CA cannot verify client certificates."
    ),
)
def gateway_tls(ctx: AnalysisContext) -> Iterator[Issue]:
    index = GatewayIndex(ctx)
    for server in index.servers:
        yield from _passthrough(server)
        yield from _no_redirect(index, server)
        if server.terminates:
            yield from _tls_versions(server)
            yield from _mutual_ca(index, server)


def _issue(server: Server, message: str, *path: str | int, **kwargs: Any) -> Issue:
    return Issue(
        message=f"Gateway {server.ref} servers[{server.index}] (port {server.number}): {message}",
        location=server.location(*path),
        resource=server.gateway.key,
        workloads=server.workloads,
        **kwargs,
    )


def _passthrough(server: Server) -> Iterator[Issue]:
    if not server.is_tls or server.mode not in ("PASSTHROUGH", "AUTO_PASSTHROUGH"):
        return
    if "mode" not in server.tls:
        ignored = [k for k in ("credentialName", "serverCertificate") if server.tls.get(k)]
        if ignored:
            yield _issue(
                server,
                f"tls.mode is unset, which means PASSTHROUGH: {', '.join(ignored)} is ignored "
                "and the gateway does not terminate TLS",
                "tls",
                fix="tls:\n  mode: SIMPLE  # or MUTUAL\n",
            )
            return
    if server.mode == "AUTO_PASSTHROUGH":
        east_west = server.selector.get("istio") == "eastwestgateway"
        yield _issue(
            server,
            "AUTO_PASSTHROUGH routes by SNI (outbound_.<port>_.<subset>_.<host>) to any service "
            "in the mesh without a VirtualService"
            + (" — expected on an east-west gateway" if east_west else ""),
            "tls",
            "mode",
            severity=Severity.INFO if east_west else None,
            fix="terminate TLS (SIMPLE/MUTUAL) and route explicitly, or restrict the port to "
            "peer clusters",
        )
    else:
        yield _issue(
            server,
            "TLS PASSTHROUGH: the gateway forwards encrypted bytes by SNI, so it cannot apply "
            "HTTP routing or AuthorizationPolicy HTTP attributes; the backend must authenticate "
            "clients itself",
            "tls",
            *(("mode",) if "mode" in server.tls else ()),
            severity=Severity.INFO,
        )


def _no_redirect(index: GatewayIndex, server: Server) -> Iterator[Issue]:
    if not server.plain_http or server.tls.get("httpsRedirect"):
        return
    secure = [
        s
        for s in index.servers
        if s.protocol == "HTTPS"
        and index.same_proxy(s, server)
        and any(intersects(host_part(a), host_part(b)) for a in s.hosts for b in server.hosts)
    ]
    if secure:
        other = secure[0]
        yield _issue(
            server,
            f"serves {', '.join(server.hosts)} over plain HTTP without tls.httpsRedirect while "
            f"Gateway {other.ref} servers[{other.index}] serves them over HTTPS on port "
            f"{other.number}: clients following http:// links send requests and cookies in "
            "cleartext",
            fix="tls:\n  httpsRedirect: true\n",
        )


def _tls_versions(server: Server) -> Iterator[Issue]:
    for field in ("minProtocolVersion", "maxProtocolVersion"):
        value = str(server.tls.get(field) or "").upper()
        if value in _OLD_TLS:
            yield _issue(
                server,
                f"tls.{field} {value} allows TLS below 1.2 (deprecated by RFC 8996)",
                "tls",
                field,
                fix=f"tls:\n  {field}: {'TLSV1_2' if field[1] == 'i' else 'TLSV1_3'}\n",
            )


def _mutual_ca(index: GatewayIndex, server: Server) -> Iterator[Issue]:
    if server.mode not in ("MUTUAL", "OPTIONAL_MUTUAL") or server.tls.get("caCertificates"):
        return
    credentials = server.credentials()
    if not credentials:
        yield _issue(
            server,
            f"{server.mode} with neither caCertificates nor credentialName: there is no CA to "
            "verify client certificates (Istio rejects this server: MUTUAL TLS requires a "
            "client CA bundle)",
            "tls",
            "mode",
            fix="tls:\n  credentialName: <secret with tls.crt, tls.key and ca.crt>\n",
        )
        return
    for namespace in index.workload_namespaces(server):
        for path, name in credentials:
            keys = index.secret_keys(namespace, name)
            if keys is None:
                continue  # contents unknown; a missing Secret is TM-EDGE-005's
            if index.secret(namespace, f"{name}-cacert") is None and not (
                {"ca.crt", "cacert"} & keys
            ):
                yield _issue(
                    server,
                    f"{server.mode} with credentialName {name}: Secret {namespace}/{name} has no "
                    f"ca.crt / cacert key and there is no Secret {namespace}/{name}-cacert, so "
                    "the gateway has no CA to verify client certificates",
                    *path,
                    fix=f"add ca.crt to Secret {namespace}/{name} (or a Secret {name}-cacert)",
                )


# --- TM-EDGE-005 --------------------------------------------------------------------------


@rule(
    "TM-EDGE-005",
    title="Gateway credentialName missing or in another namespace",
    severity=Severity.WARNING,
    family="edge",
    rationale=(
        "A gateway reads tls.credentialName only from its own workload's namespace; a Secret "
        "that is missing or elsewhere (istiod refuses cross-namespace references) leaves the "
        "server without a certificate, and its TLS handshakes fail."
    ),
)
def gateway_credentials(ctx: AnalysisContext) -> Iterator[Issue]:
    index = GatewayIndex(ctx)
    have_secrets = index.has_secrets
    deployed = sorted(index.gateway_workloads())
    for server in index.servers:
        if not server.terminates:
            continue
        namespaces = index.workload_namespaces(server)
        assumed = not namespaces
        if assumed and deployed and server.credentials():
            yield _orphan_issue(server, deployed)
            continue
        for path, name in server.credentials():
            for namespace in namespaces or [server.gateway.namespace]:
                found = _credential_issue(index, server, name, namespace, assumed, have_secrets)
                if found is not None:
                    message, severity, fix = found
                    here = tuple(w for w in server.workloads if w.startswith(f"{namespace}/"))
                    yield Issue(
                        message=f"Gateway {server.ref} servers[{server.index}]: {message}",
                        location=server.location(*path),
                        resource=server.gateway.key,
                        workloads=here,
                        fix=fix,
                        severity=severity,
                    )


def _orphan_issue(server: Server, deployed: list[str]) -> Issue:
    """A TLS server whose Gateway selects none of the gateway workloads among the inputs."""
    selector = ", ".join(f"{k}={v}" for k, v in sorted(server.selector.items())) or "(none)"
    return Issue(
        message=f"Gateway {server.ref} servers[{server.index}]: the selector {selector} matches "
        f"none of the gateway workloads among the inputs ({', '.join(deployed)}), so no gateway "
        "serves this TLS server and where its credentialName would be read from is unknown",
        location=server.gateway.location("selector"),
        resource=server.gateway.key,
        fix="selector:\n  istio: ingressgateway  # the labels of the gateway pods that should "
        "serve it\n",
    )


def _credential_issue(
    index: GatewayIndex,
    server: Server,
    name: str,
    namespace: str,
    assumed: bool,
    have_secrets: bool,
) -> tuple[str, Severity | None, str] | None:
    runs = (
        f"assuming the gateway workload runs in {namespace} (none of the inputs matches its "
        "selector)"
        if assumed
        else f"the gateway workload runs in {namespace}"
    )
    if "/" in name:
        target_ns, _, name = name.partition("/")
        if target_ns != namespace:
            return (
                f"credentialName {target_ns}/{name} refers to namespace {target_ns}, but {runs} "
                "and istiod sends a gateway only Secrets of its own namespace (cross namespace "
                "secret reference requires ReferenceGrant): the server gets no certificate",
                Severity.INFO if assumed else None,
                f"copy the Secret into {namespace} and set credentialName: {name}",
            )
    if index.secret(namespace, name) is not None:
        return None
    elsewhere = index.secret_namespaces(name)
    if elsewhere:
        return (
            f"Secret {name} exists in {', '.join(elsewhere)}, but {runs} and reads "
            "credentials only from its own namespace: the server gets no certificate",
            Severity.INFO if assumed else None,
            f"create Secret {name} in {namespace} (the gateway's namespace), with the same "
            f"tls.crt / tls.key as {elsewhere[0]}/{name}",
        )
    if have_secrets and not assumed:
        return (
            f"credentialName {name}: no Secret {namespace}/{name} among the inputs, which do "
            "contain Secrets; without it the server has no certificate",
            None,
            f"kubectl -n {namespace} create secret tls {name} --cert=<cert.pem> --key=<key.pem>",
        )
    return (
        f"credentialName {name}: {runs}; Secret {namespace}/{name} is not among the inputs "
        "(Secrets are rarely kept with manifests), make sure it exists there",
        Severity.INFO,
        f"kubectl -n {namespace} get secret {name}",
    )

"""Installation hardening: what the install (IstioOperator / Helm values), the mesh config
and the pod specs leave open, checks 27–31 of the analyzer check list (32 is in capture.py).

Install settings are read with Istio's defaults in mind: an absent setting is reported only
when an install is present (``ctx.install.present``), because without one the defaults in
force are unknown. Pod-level checks read the raw pod specs and look only at workloads the
setting can affect; severities rise where the compiled policy shows that something enforced
depends on the setting (an HTTP-attribute AuthorizationPolicy on a sniffed port, a sidecar
an app container can switch off).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from trustmesh.analyze.checks.install_util import (
    IOP_HEADER,
    cni_enabled,
    dig,
    install_target,
    is_false,
    is_true,
    mesh_fix,
    mesh_setting,
    owner_key,
    pilot_env,
    plural,
    pod_templates,
    raw_body,
    setting,
    values_fix,
)
from trustmesh.analyze.context import AnalysisContext, Setting
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule
from trustmesh.api import models as m
from trustmesh.api.diagnostics import Location
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import Workload

FAMILY = "install"

# --- 27: protocol sniffing and undeclared port protocols ------------------------------

# Istio's port protocols (pkg/config/protocol): a port name is ``<protocol>`` or
# ``<protocol>-<suffix>``; appProtocol may also use the Kubernetes standard names.
_PROTOCOLS = frozenset(
    {"http", "http2", "https", "grpc", "grpc-web", "tcp", "tls", "mongo", "mysql", "redis"}
    | {"udp", "http_proxy"}
)
_APP_PROTOCOLS = _PROTOCOLS | {"h2c", "kubernetes.io/h2c", "kubernetes.io/ws", "kubernetes.io/wss"}


def declares_protocol(name: str, app_protocol: str) -> bool:
    if app_protocol.lower() in _APP_PROTOCOLS:
        return True  # an unknown appProtocol falls back to the name, as in Istio
    lowered = name.lower()
    return lowered in _PROTOCOLS or lowered.partition("-")[0] in _PROTOCOLS


def _sniffing_on(ctx: AnalysisContext) -> list[tuple[str, Setting | None]]:
    on: list[tuple[str, Setting | None]] = []
    for direction in ("Outbound", "Inbound"):
        chosen = pilot_env(
            ctx, f"PILOT_ENABLE_PROTOCOL_SNIFFING_FOR_{direction.upper()}"
        ) or setting(ctx, "values", "pilot", f"enableProtocolSniffingFor{direction}")
        if chosen is None or not is_false(chosen.value):
            on.append((direction.lower(), chosen))
    return on


def _undeclared_ports(
    ctx: AnalysisContext,
) -> Iterator[tuple[Resource[Any], int, m.K8sServicePort, tuple[str, ...]]]:
    # index sidecar workloads by (namespace, label) so each Service looks at candidates only
    by_label: dict[tuple[str, str, str], list[Workload]] = {}
    for policy in ctx.sidecar_workloads():
        w = policy.workload
        if w.kind != "WorkloadEntry":  # Services select pods, not WorkloadEntries
            for key, value in w.labels.items():
                by_label.setdefault((w.namespace, key, value), []).append(w)
    for service in ctx.resources("Service"):
        spec: m.ServiceSpec = service.spec
        if not spec.selector:
            continue  # no selector: endpoints are managed elsewhere, no sidecar to classify
        first = min(spec.selector.items())
        selected = tuple(
            w.ref
            for w in by_label.get((service.namespace, *first), ())
            if all(w.labels.get(k) == v for k, v in spec.selector.items())
        )
        if not selected:
            continue  # protocol selection only happens in sidecars
        for index, port in enumerate(spec.ports):
            if port.protocol.upper() in {"UDP", "SCTP"}:
                continue  # never captured by the sidecar
            if not declares_protocol(port.name, port.app_protocol):
                yield service, index, port, selected


@rule(
    "TM-INST-001",
    title="Protocol sniffing enabled",
    severity=Severity.INFO,
    family=FAMILY,
    rationale="With sniffing on, a sidecar guesses HTTP vs. TCP from the first bytes of each "
    "connection on ports without a declared protocol, so which AuthorizationPolicy attributes "
    "apply depends on the client's bytes, and server-first protocols stall until a timeout.",
)
def protocol_sniffing(ctx: AnalysisContext) -> Iterator[Issue]:
    if not ctx.install.present:
        return
    on = _sniffing_on(ctx)
    if not on:
        return
    relying = len(list(_undeclared_ports(ctx)))
    explicit = next((s for _, s in on if s is not None), None)
    location = explicit.location if explicit else install_target(ctx, "values", "pilot")
    directions = " and ".join(d for d, _ in on)
    how = "explicitly" if explicit else "by Istio's default"
    yield Issue(
        message=f"protocol sniffing is enabled {how} for {directions} traffic; "
        f"{relying} Service port(s) in the inputs declare no protocol and rely on it "
        "(see TM-INST-002)",
        location=location,
        resource=owner_key(ctx, location),
        fix=values_fix(
            ctx,
            {
                "pilot": {
                    "enableProtocolSniffingForOutbound": False,
                    "enableProtocolSniffingForInbound": False,
                }
            },
        )
        + "# then declare every port's protocol (name prefix or appProtocol)\n",
    )


def _http_policies(ctx: AnalysisContext, refs: tuple[str, ...]) -> list[str]:
    """AuthorizationPolicies on these workloads that match HTTP-only attributes: their effect
    on a port depends on whether the sidecar classifies its traffic as HTTP."""
    found: set[str] = set()
    for ref in refs:
        policy = ctx.mesh.for_workload(ref)
        if policy is None:
            continue
        authz = policy.authz
        for resource in (*authz.custom.policies, *authz.deny.policies, *authz.allow.policies):
            if any(_uses_http(r) for r in resource.spec.rules or ()):
                found.add(f"{resource.namespace}/{resource.name}")
    return sorted(found)


def _uses_http(rule_: m.Rule) -> bool:
    ops = [t.operation for t in rule_.to]
    sources = [f.source for f in rule_.from_]
    return (
        any(
            o.hosts or o.not_hosts or o.methods or o.not_methods or o.paths or o.not_paths
            for o in ops
        )
        or any(s.request_principals or s.not_request_principals for s in sources)
        or any(c.key.startswith("request.") for c in rule_.when)
    )


@rule(
    "TM-INST-002",
    title="Service port without a declared protocol",
    severity=Severity.INFO,
    family=FAMILY,
    rationale="A port whose name has no protocol prefix and no appProtocol is sniffed (or, with "
    "sniffing off, treated as opaque TCP, where HTTP attributes of AuthorizationPolicy cannot be "
    "enforced); declaring the protocol makes the sidecar's behaviour fixed and reviewable. "
    "WARNING when an AuthorizationPolicy matching HTTP attributes applies to the workloads.",
)
def undeclared_protocol(ctx: AnalysisContext) -> Iterator[Issue]:
    sniffing = bool(_sniffing_on(ctx))
    outcome = (
        "guess its protocol per connection by sniffing"
        if sniffing
        else "treat it as opaque TCP (HTTP rules of AuthorizationPolicy cannot match it)"
    )
    for service, index, port, selected in _undeclared_ports(ctx):
        label = f"'{port.name}'" if port.name else "(unnamed)"
        http = _http_policies(ctx, selected)
        depends = (
            f"; AuthorizationPolicy {plural(http)} match(es) HTTP attributes, so what it "
            "enforces on this port depends on that classification"
            if http
            else ""
        )
        yield Issue(
            message=f"port {port.port} {label} of Service {service.namespace}/{service.name} "
            f"declares no protocol (no name prefix such as http-/tcp-/grpc-, no appProtocol): "
            f"the sidecars of {plural(selected)} {outcome}{depends}",
            severity=Severity.WARNING if http else None,
            location=service.location("ports", index, "name")
            if port.name
            else service.location("ports", index),
            resource=service.key,
            workloads=selected,
            fix=f"# Service {service.namespace}/{service.name}: name the protocol the port "
            "speaks\nports:\n"
            f"- name: http-{port.name or port.port}  # or tcp-, grpc-, tls-, https-, ...\n"
            f"  port: {port.port}\n  appProtocol: http\n",
        )


# --- 28: CNI and NET_ADMIN / NET_RAW ---------------------------------------------------

_NET_CAPS = ("NET_ADMIN", "NET_RAW")
_ISTIO_NODE_AGENTS = frozenset({"istio-cni-node", "ztunnel"})


def _istio_init_locations(ctx: AnalysisContext) -> list[tuple[str, Location]]:
    return [
        (pod.ref, pod.at(field, index, "name"))
        for pod in pod_templates(ctx)
        for field, index, container in pod.containers()
        if field == "initContainers" and container.get("name") == "istio-init"
    ]


@rule(
    "TM-INST-003",
    title="Istio CNI not enabled",
    severity=Severity.WARNING,
    family=FAMILY,
    rationale="Without the CNI node agent every injected pod runs the istio-init container with "
    "NET_ADMIN and NET_RAW to program its iptables, so pod security must grant those "
    "capabilities in every meshed namespace.",
)
def cni_disabled(ctx: AnalysisContext) -> Iterator[Issue]:
    enabled, explicit = cni_enabled(ctx)
    if enabled:
        return
    inits = _istio_init_locations(ctx)
    if not ctx.install.present and not inits:
        return  # nothing says how the mesh is installed
    if explicit is not None:
        location = explicit.location
    elif ctx.install.present:
        location = install_target(ctx, "components", "cni", "enabled")
    else:
        location = inits[0][1]
    refs = [r for r, _ in inits]
    evidence = f"; {len(inits)} pod spec(s) in the inputs run istio-init ({plural(refs)})"
    helm = ctx.install.sources and ctx.install.sources[-1].kind == "helm"
    yield Issue(
        message="Istio CNI is not enabled: injected pods program their own iptables from an "
        f"istio-init container holding NET_ADMIN and NET_RAW{evidence if inits else ''}",
        location=location,
        resource=owner_key(ctx, location),
        workloads=tuple(sorted({r for r, _ in inits})),
        fix="# install the CNI chart: helm install istio-cni istio/cni -n istio-system\n"
        "# and in the istiod values:\npilot:\n  cni:\n    enabled: true\n"
        if helm
        else IOP_HEADER + "spec:\n  components:\n    cni:\n      enabled: true\n",
    )


def _net_caps(container: Mapping[str, Any]) -> tuple[list[str], bool]:
    added = dig(container, "securityContext", "capabilities", "add")
    caps = [str(c).upper().removeprefix("CAP_") for c in (added if isinstance(added, list) else ())]
    privileged = is_true(dig(container, "securityContext", "privileged"))
    return [c for c in _NET_CAPS if c in caps], privileged


@rule(
    "TM-INST-004",
    title="Container granted NET_ADMIN or NET_RAW",
    severity=Severity.WARNING,
    family=FAMILY,
    rationale="NET_ADMIN lets a container rewrite the pod's iptables (in a meshed pod: remove "
    "the capture and bypass the sidecar's mTLS and authorization); NET_RAW allows crafted "
    "packets and spoofing. Application containers should not hold either.",
)
def net_capabilities(ctx: AnalysisContext) -> Iterator[Issue]:
    for pod in pod_templates(ctx):
        if pod.resource.kind == "DaemonSet" and pod.resource.name in _ISTIO_NODE_AGENTS:
            continue  # Istio's own node agents need them by design
        for field, index, container in pod.containers():
            name = str(container.get("name", ""))
            if name == "istio-init":
                continue  # the capture setup itself: reported by TM-INST-003
            caps, privileged = _net_caps(container)
            if not caps and not privileged:
                continue
            what = "privileged (every capability)" if privileged else " and ".join(caps)
            app = name != "istio-proxy"
            bypass = pod.has_sidecar and app
            consequence = (
                ": it can rewrite the pod's iptables and bypass the sidecar (mTLS, "
                "AuthorizationPolicy, egress policy)"
                if bypass
                else ""
            )
            path: tuple[str | int, ...] = (
                ("securityContext", "privileged")
                if privileged
                else ("securityContext", "capabilities", "add")
            )
            yield Issue(
                message=f"container '{name}' of {pod.resource.kind} {pod.ref} is {what}"
                f"{consequence}",
                location=pod.at(field, index, *path),
                resource=pod.resource.key,
                workloads=(pod.ref,),
                severity=Severity.ERROR if bypass else None,
                fix=f"# {pod.resource.kind} {pod.ref}, container {name}\n"
                "securityContext:\n  privileged: false\n  capabilities:\n    drop: [ALL]\n",
            )


# --- 29, 30: images and service-account tokens -----------------------------------------

_ISTIO_IMAGES = ("/proxyv2:", "/pilot:", "/install-cni:", "/ztunnel:")


@rule(
    "TM-INST-005",
    title="Istio images are not distroless",
    severity=Severity.INFO,
    family=FAMILY,
    rationale="Distroless proxy and control-plane images carry no shell or package manager: "
    "fewer CVEs to patch and far less for an attacker to work with after a compromise.",
)
def not_distroless(ctx: AnalysisContext) -> Iterator[Issue]:
    deployed = [
        (pod, field, index, str(container.get("image")))
        for pod in pod_templates(ctx)
        for field, index, container in pod.containers()
        if any(i in str(container.get("image", "")) for i in _ISTIO_IMAGES)
        and not str(container.get("image")).endswith("-distroless")
    ]
    images = sorted({image for _, _, _, image in deployed})
    seen = f"; deployed images in the inputs: {plural(images, 3)}" if images else ""
    fix = values_fix(ctx, {"global": {"variant": "distroless"}})
    if ctx.install.present:
        variant = setting(ctx, "values", "global", "variant")
        tag = setting(ctx, "tag") or setting(ctx, "values", "global", "tag")
        if (variant is not None and variant.value == "distroless") or (
            tag is not None and str(tag.value).endswith("-distroless")
        ):
            return
        where = variant or tag
        location = where.location if where else install_target(ctx, "values", "global")
        shown = f" (tag {tag.value})" if tag is not None else ""
        yield Issue(
            message=f"the install uses the default (debian-based) Istio images{shown}, not the "
            f"distroless variant{seen}",
            location=location,
            resource=owner_key(ctx, location),
            fix=fix,
        )
    elif deployed:
        pod, field, index, _ = deployed[0]
        yield Issue(
            message=f"Istio containers run non-distroless images{seen}",
            location=pod.at(field, index, "image"),
            resource=pod.resource.key,
            workloads=tuple(sorted({p.ref for p, _, _, _ in deployed})),
            fix=fix,
        )


@rule(
    "TM-INST-006",
    title="First-party service-account tokens (jwtPolicy: first-party-jwt)",
    severity=Severity.WARNING,
    family=FAMILY,
    rationale="With first-party-jwt the proxies authenticate to istiod with the pod's default "
    "service-account token, whose audience is the Kubernetes API and which may not expire; a "
    "leaked token is then usable against the API server. third-party-jwt uses projected, "
    "audience-bound, expiring tokens.",
)
def first_party_jwt(ctx: AnalysisContext) -> Iterator[Issue]:
    policy = setting(ctx, "values", "global", "jwtPolicy")
    if policy is None or policy.value != "first-party-jwt":
        return
    yield Issue(
        message="global.jwtPolicy is first-party-jwt: every sidecar sends its pod's "
        "Kubernetes-API service-account token to istiod",
        location=policy.location,
        resource=owner_key(ctx, policy.location),
        workloads=tuple(p.workload.ref for p in ctx.sidecar_workloads()),
        fix=values_fix(ctx, {"global": {"jwtPolicy": "third-party-jwt"}}),
    )


# --- 31: istiod debug / plaintext xDS, downstream connection limit ---------------------

_ISTIOD_LABELS = (("app", "istiod"), ("istio", "pilot"))
_DEBUG_PORTS = {8080: "debug HTTP API", 15010: "plaintext xDS (and its debug endpoints)"}


def _selects_istiod(
    selector: Mapping[str, Any], ns: str, istiod: dict[str, list[Mapping[str, Any]]]
) -> bool:
    """Does a Service selector pick istiod pods (by their labels if they are in the inputs)?"""
    if ns in istiod:
        return any(all(lbl.get(k) == v for k, v in selector.items()) for lbl in istiod[ns])
    return any(selector.get(k) == v for k, v in _ISTIOD_LABELS)  # istiod itself not in inputs


@rule(
    "TM-INST-007",
    title="istiod debug API or plaintext xDS exposed",
    severity=Severity.WARNING,
    family=FAMILY,
    rationale="istiod's port 8080 (debug HTTP) and 15010 (plaintext xDS) answer without mTLS; "
    "anyone who reaches them can read the mesh's configuration (and, on unpatched releases, "
    "any proxy's config dump). Keep them off Services and disable the debug interface.",
)
def istiod_debug(ctx: AnalysisContext) -> Iterator[Issue]:
    istiod: dict[str, list[Mapping[str, Any]]] = {}
    for pod in pod_templates(ctx):
        if any(pod.labels.get(k) == v for k, v in _ISTIOD_LABELS):
            istiod.setdefault(pod.resource.namespace, []).append(pod.labels)
    for service in ctx.resources("Service"):
        body = raw_body(service)
        selector = dig(body, "spec", "selector")
        if not isinstance(selector, Mapping) or not selector:
            continue
        if not _selects_istiod(selector, service.namespace, istiod):
            continue
        kind = str(dig(body, "spec", "type") or "ClusterIP")
        external = kind in {"LoadBalancer", "NodePort"} or bool(dig(body, "spec", "externalIPs"))
        for index, port in enumerate(service.spec.ports):
            target = port.target_port if isinstance(port.target_port, int) else port.port
            number = target if target in _DEBUG_PORTS else port.port
            if number not in _DEBUG_PORTS:
                continue
            if external:
                severity, reach = Severity.ERROR, f"from outside the cluster ({kind})"
            elif number == 8080:
                severity, reach = Severity.WARNING, "to every pod in the cluster"
            else:
                severity, reach = Severity.INFO, "to every pod in the cluster (Istio's default)"
            yield Issue(
                message=f"Service {service.namespace}/{service.name} exposes istiod's "
                f"{_DEBUG_PORTS[number]} on port {port.port} {reach}",
                location=service.location("ports", index),
                resource=service.key,
                severity=severity,
                fix=f"# Service {service.namespace}/{service.name}: remove port {port.port}"
                + (" and use type: ClusterIP" if external else "")
                + "\n",
            )
    if not ctx.install.present:
        return
    checks = (
        (
            "ENABLE_DEBUG_ENDPOINT_AUTH",
            is_false,
            Severity.WARNING,
            "turns off authentication of "
            "istiod's debug endpoints (config dumps of any proxy to any caller)",
            "true",
        ),
        (
            "UNSAFE_ENABLE_ADMIN_ENDPOINTS",
            is_true,
            Severity.WARNING,
            "exposes istiod's unsafe admin endpoints on the debug interface",
            "false",
        ),
    )
    for name, bad, severity, why, good in checks:
        env = pilot_env(ctx, name)
        if env is not None and bad(env.value):
            yield Issue(
                message=f"istiod environment {name}={env.value} {why}",
                location=env.location,
                resource=owner_key(ctx, env.location),
                severity=severity,
                fix=values_fix(ctx, {"pilot": {"env": {name: good}}}),
            )
    debug = pilot_env(ctx, "ENABLE_DEBUG_ON_HTTP")
    if debug is None or not is_false(debug.value):
        location = debug.location if debug else install_target(ctx, "values", "pilot", "env")
        yield Issue(
            message="istiod serves its debug interface over plain HTTP on port 8080 "
            "(ENABLE_DEBUG_ON_HTTP is "
            + ("true" if debug else "unset, default true")
            + "; Istio recommends false in production)",
            location=location,
            resource=owner_key(ctx, location),
            severity=Severity.INFO,
            fix=values_fix(ctx, {"pilot": {"env": {"ENABLE_DEBUG_ON_HTTP": "false"}}}),
        )


_UNLIMITED = {"", "2147483647"}
_RUNTIME_KEY = "overload.global_downstream_max_connections"


@rule(
    "TM-INST-008",
    title="No global downstream connection limit for proxies",
    severity=Severity.INFO,
    family=FAMILY,
    rationale="Istio's bootstrap sets Envoy's global downstream connection limit to 2^31-1, "
    "i.e. none: a connection flood exhausts a proxy's file descriptors and memory (CVE-2020-8663 "
    "was mitigated only by setting it). Gateways facing untrusted clients need a real limit.",
)
def no_connection_limit(ctx: AnalysisContext) -> Iterator[Issue]:
    if not ctx.install.present:
        return
    candidates = (
        mesh_setting(ctx, "defaultConfig", "connectionSettings", "globalDownstreamConnectionLimit"),
        mesh_setting(
            ctx, "defaultConfig", "proxyMetadata", "ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS"
        ),
        mesh_setting(ctx, "defaultConfig", "runtimeValues", _RUNTIME_KEY),
    )
    configured = [c for c in candidates if c is not None]
    if any(str(c.value).strip() not in _UNLIMITED for c in configured):
        return
    location = configured[0].location if configured else install_target(ctx, "meshConfig")
    gateways = tuple(
        p.ref for p in pod_templates(ctx) if str(p.labels.get("istio", "")).endswith("gateway")
    )
    where = f"; gateways in the inputs: {plural(list(gateways))}" if gateways else ""
    yield Issue(
        message="proxies run without a global downstream connection limit "
        + ("(set to unlimited)" if configured else "(Istio's default is 2147483647)")
        + where,
        location=location,
        resource=owner_key(ctx, location),
        workloads=gateways,
        fix="# size the limit to the proxy's file-descriptor budget (Istio >= 1.29)\n"
        + mesh_fix(
            {
                "defaultConfig": {
                    "proxyMetadata": {"ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS": "100000"}
                }
            }
        )
        + "# before 1.29:\n"
        + mesh_fix({"defaultConfig": {"runtimeValues": {_RUNTIME_KEY: "100000"}}}),
    )

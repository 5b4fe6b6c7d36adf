"""Sidecar capture bypasses, check 32: traffic that never reaches the sidecar is neither
authenticated nor authorized, whatever the policies say.

Annotations only matter where a sidecar is injected (elsewhere nothing is captured anyway),
so pods without one are skipped. An inbound bypass is an ERROR when the compiled policy of
the workload shows something enforced on the bypassed port (STRICT mTLS or an
AuthorizationPolicy): the bypass then defeats a policy the user wrote.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from trustmesh.analyze.checks.control_plane import Injection, control_plane
from trustmesh.analyze.checks.install_util import (
    PodTemplate,
    dig,
    is_false,
    owner_key,
    plural,
    pod_templates,
    setting,
)
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule
from trustmesh.api import models as m
from trustmesh.api.dataplane import MeshMode
from trustmesh.api.diagnostics import Location
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import INJECT
from trustmesh.policy.compose import WorkloadPolicy

FAMILY = "install"
_T = "traffic.sidecar.istio.io/"
_INBOUND_EXCLUDE, _INBOUND_INCLUDE = _T + "excludeInboundPorts", _T + "includeInboundPorts"
_INTERCEPTION = "sidecar.istio.io/interceptionMode"
# annotation → (install default under values.global.proxy, what escapes the sidecar)
_OUTBOUND = {
    _T + "excludeOutboundPorts": ("excludeOutboundPorts", "outbound connections to ports {v}"),
    _T + "excludeOutboundIPRanges": ("excludeIPRanges", "outbound connections to {v}"),
    _T + "includeOutboundIPRanges": ("includeIPRanges", "outbound connections outside {v}"),
    _T + "excludeInterfaces": ("", "traffic on interfaces {v}"),
}
_PROXY_CONTAINERS = frozenset({"istio-proxy", "istio-init", "istio-validation"})


def _ports(value: str) -> set[int]:
    return {int(p) for p in value.replace(" ", "").split(",") if p.isdigit()}


def _served_ports(policy: WorkloadPolicy) -> set[int]:
    ports = set(policy.workload.ports)
    for service in policy.services:
        ports |= {p.target_port for p in service.ports if isinstance(p.target_port, int)}
    return ports


def _inbound_bypass(annotations: Mapping[str, Any], served: set[int]) -> tuple[str, set[int]]:
    """The annotation that opens an inbound bypass and the served ports it exposes."""
    if str(annotations.get(_INTERCEPTION, "")).upper() == "NONE":
        return _INTERCEPTION, set(served)
    if _INBOUND_INCLUDE in annotations:
        value = str(annotations[_INBOUND_INCLUDE]).strip()
        if value != "*":
            return _INBOUND_INCLUDE, served - _ports(value)
    if _INBOUND_EXCLUDE in annotations:
        excluded = _ports(str(annotations[_INBOUND_EXCLUDE]))
        return _INBOUND_EXCLUDE, (excluded & served) if served else excluded
    return "", set()


def _enforced(policy: WorkloadPolicy, port: int) -> list[str]:
    """What the sidecar would enforce on ``port``: the reason a bypass matters."""
    found: list[str] = []
    mode = policy.mtls.for_port(port)
    if mode.mode is m.MtlsMode.STRICT:
        found.append(f"STRICT mTLS ({mode.policy or mode.scope})")
    authz = policy.authz
    # any ALLOW policy makes everything it does not match denied, on every port
    applied = [*authz.allow.policies]
    applied += [p for p in (*authz.custom.policies, *authz.deny.policies) if _may_match(p, port)]
    found += [f"AuthorizationPolicy {p.namespace}/{p.name}" for p in applied]
    return list(dict.fromkeys(found))


def _may_match(policy: Resource[Any], port: int) -> bool:
    """Could a DENY/CUSTOM policy match traffic to ``port``? (False only when every rule is
    limited to other ports.)"""
    for rule_ in policy.spec.rules or ():
        if not rule_.to:
            return True
        for to in rule_.to:
            op = to.operation
            if op.ports and str(port) not in op.ports:
                continue
            if op.not_ports and str(port) in op.not_ports:
                continue
            return True
    return False


def _inbound_issue(
    policy: WorkloadPolicy, key: str, ports: set[int], location: Location | None, resource: str
) -> Issue:
    enforced = sorted({e for p in ports for e in _enforced(policy, p)})
    ref = policy.workload.ref
    shown = ", ".join(map(str, sorted(ports))) or "(all)"
    lost = (
        f": {plural(enforced)} not enforced there, plaintext from any pod reaches the app"
        if enforced
        else ": connections there are neither authenticated nor authorized by the mesh"
    )
    return Issue(
        message=f"inbound connections to port(s) {shown} of {ref} skip the sidecar ({key}){lost}",
        location=location,
        resource=resource,
        workloads=(ref,),
        severity=Severity.ERROR if enforced else None,
        fix=f"# remove {key} (or stop excluding the ports above) for {ref}\n",
    )


def _outbound_bypass(name: str, value: Any) -> str | None:
    """The bypassed destinations named by an outbound capture setting, None if no bypass."""
    text = str(value).strip()
    if "include" in name:
        return None if text == "*" else text or "(nothing: all outbound traffic)"
    return text or None


def _outbound_issue(
    policies: list[WorkloadPolicy], key: str, what: str, location: Location | None, resource: str
) -> Issue:
    refs = tuple(p.workload.ref for p in policies)
    registry = (
        "; the REGISTRY_ONLY egress policy is bypassed too"
        if any(p.egress_mode is m.OutboundTrafficPolicyMode.REGISTRY_ONLY for p in policies)
        else ""
    )
    return Issue(
        message=f"{what} of {plural(refs)} skip the sidecar ({key}): no mTLS origination or "
        f"egress control there{registry}",
        location=location,
        resource=resource,
        workloads=refs,
        fix=f"# remove {key}\n",
    )


@rule(
    "TM-INST-009",
    title="Traffic-capture bypass configured for a sidecar workload",
    severity=Severity.WARNING,
    family=FAMILY,
    rationale="Ports, address ranges or interfaces excluded from capture bypass the sidecar: "
    "inbound traffic there skips mTLS and AuthorizationPolicy, outbound traffic skips mTLS "
    "origination and the egress policy.",
)
def capture_bypass(ctx: AnalysisContext) -> Iterator[Issue]:
    sidecars: list[tuple[WorkloadPolicy, Mapping[str, Any]]] = []
    for pod in pod_templates(ctx):
        policy = ctx.mesh.for_workload(pod.workload.ref) if pod.workload else None
        if policy is None or not pod.has_sidecar:
            continue  # nothing is captured without a sidecar
        notes, key = pod.annotations, pod.resource.key
        sidecars.append((policy, notes))
        inbound, ports = _inbound_bypass(notes, _served_ports(policy))
        if inbound and (ports or inbound == _INTERCEPTION):
            yield _inbound_issue(policy, inbound, ports, pod.meta_at("annotations", inbound), key)
        for name, (_, what) in _OUTBOUND.items():
            bypassed = _outbound_bypass(name, notes[name]) if name in notes else None
            if bypassed:
                where = pod.meta_at("annotations", name)
                yield _outbound_issue([policy], name, what.format(v=bypassed), where, key)
    yield from _install_defaults(ctx, sidecars)


def _install_defaults(
    ctx: AnalysisContext, sidecars: list[tuple[WorkloadPolicy, Mapping[str, Any]]]
) -> Iterator[Issue]:
    """Mesh-wide capture defaults (``global.proxy.*``) for workloads that keep them."""
    for name, (value_key, what) in _OUTBOUND.items():
        found = setting(ctx, "values", "global", "proxy", value_key) if value_key else None
        bypassed = _outbound_bypass(name, found.value) if found else None
        affected = [p for p, notes in sidecars if name not in notes]
        if found and bypassed and affected:
            key, resource = f"global.proxy.{value_key}", owner_key(ctx, found.location)
            yield _outbound_issue(affected, key, what.format(v=bypassed), found.location, resource)
    excluded = setting(ctx, "values", "global", "proxy", "excludeInboundPorts")
    if excluded is None or not _ports(str(excluded.value)):
        return
    for policy, notes in sidecars:
        if _INBOUND_EXCLUDE in notes or _INBOUND_INCLUDE in notes:
            continue  # the pod's own annotation replaces the default
        served = _served_ports(policy)
        ports = _ports(str(excluded.value)) & served if served else _ports(str(excluded.value))
        if ports:
            key, resource = "global.proxy.excludeInboundPorts", owner_key(ctx, excluded.location)
            yield _inbound_issue(policy, key, ports, excluded.location, resource)


def _injected_namespace(ctx: AnalysisContext, namespace: str) -> bool:
    labels = ctx.snapshot.namespace_labels.get(namespace) or {}
    if labels.get("istio-injection") == "disabled":
        return False
    return labels.get("istio-injection") == "enabled" or "istio.io/rev" in labels


@rule(
    "TM-INST-010",
    title="Sidecar injection disabled in an injected namespace",
    severity=Severity.WARNING,
    family=FAMILY,
    rationale="A pod that opts out of injection in a meshed namespace has no sidecar: it accepts "
    "plaintext from anyone and none of the PeerAuthentication or AuthorizationPolicy written "
    "for it or its namespace is enforced.",
)
def injection_opt_out(ctx: AnalysisContext) -> Iterator[Issue]:
    for pod in pod_templates(ctx):
        where = "labels" if INJECT in pod.labels else "annotations"
        value = (pod.labels if where == "labels" else pod.annotations).get(INJECT)
        if value is None or not is_false(value) or pod.has_sidecar:
            continue
        if pod.workload is not None and pod.workload.dataplane.mode is MeshMode.GATEWAY:
            continue  # a gateway runs its own proxy: opting out of the sidecar is by design
        if pod.labels.get("istio.io/dataplane-mode") == "ambient":
            continue  # captured by ztunnel instead of a sidecar
        if not _injected_namespace(ctx, pod.resource.namespace):
            continue
        policy = ctx.mesh.for_workload(pod.workload.ref) if pod.workload else None
        lost = sorted(
            {e for port in (_served_ports(policy) or {0}) for e in _enforced(policy, port)}
            if policy
            else set()
        )
        detail = f"; not enforced for it: {plural(lost)}" if lost else ""
        yield Issue(
            message=f'{pod.resource.kind} {pod.ref} sets {INJECT}: "false" in injected '
            f"namespace {pod.resource.namespace}: it runs without a sidecar and accepts "
            f"plaintext{detail}",
            location=pod.meta_at(where, INJECT),
            resource=pod.resource.key,
            workloads=(pod.ref,),
            severity=Severity.ERROR if lost else None,
            fix=f"# remove {INJECT} from {pod.ref} (or move it out of the meshed namespace)\n",
        )


@rule(
    "TM-INST-011",
    title="Application container runs as the proxy's UID/GID 1337",
    severity=Severity.WARNING,
    family=FAMILY,
    rationale="The capture rules exempt traffic of UID and GID 1337 (the proxy's own) from "
    "redirection, so an application container running as 1337 talks to the network directly: "
    "no mTLS, no egress policy, no telemetry.",
)
def proxy_uid(ctx: AnalysisContext) -> Iterator[Issue]:
    cp = control_plane(ctx)
    for pod in pod_templates(ctx):
        verdict = cp.injection(pod)
        if _opted_out(ctx, pod) and not any(
            c.get("name") == "istio-proxy" for _, _, c in pod.containers()
        ):
            continue  # never injected, so nothing to bypass
        later = (
            ""
            if verdict.injection is Injection.YES or pod.has_sidecar
            else f" once it is injected (today: {verdict.reason})"
        )
        for field, index, container in pod.containers():
            name = str(container.get("name", ""))
            if name in _PROXY_CONTAINERS:
                continue
            for key in ("runAsUser", "runAsGroup"):
                own = dig(container, "securityContext", key)
                value = own if own is not None else dig(pod.spec, "securityContext", key)
                if value != 1337:
                    continue
                location = (
                    pod.at(field, index, "securityContext", key)
                    if own is not None
                    else pod.at("securityContext", key)
                )
                yield _uid_issue(pod, name, key, location, later)


def _opted_out(ctx: AnalysisContext, pod: PodTemplate) -> bool:
    """Explicitly never injected: host network, inject "false", namespace disabled."""
    labels, notes = pod.labels, pod.annotations
    explicit = labels.get(INJECT, notes.get(INJECT))
    namespace = ctx.snapshot.namespace_labels.get(pod.resource.namespace) or {}
    return (
        pod.spec.get("hostNetwork") is True
        or (explicit is not None and is_false(explicit))
        or namespace.get("istio-injection") == "disabled"
    )


def _uid_issue(pod: PodTemplate, name: str, key: str, location: Location, later: str) -> Issue:
    return Issue(
        message=f"container '{name}' of {pod.ref} runs with {key} 1337, the proxy's identity: "
        f"its outbound traffic is not captured by the sidecar{later}",
        location=location,
        resource=pod.resource.key,
        workloads=(pod.ref,),
        severity=Severity.INFO if later else None,
        fix=f"# {pod.ref}, container {name}: run as any other non-root ID\n"
        f"securityContext:\n  {key}: 1000\n",
    )


_OVERRIDES = {
    "sidecar.istio.io/proxyImage": "replaces the proxy image the mesh trusts",
    "sidecar.istio.io/bootstrapOverride": "replaces the proxy's Envoy bootstrap (limits, "
    "runtime protections, admin settings)",
    "sidecar.istio.io/userVolume": "adds volumes to the proxy (e.g. host paths)",
    "sidecar.istio.io/userVolumeMount": "mounts extra volumes into the proxy container",
}


@rule(
    "TM-INST-012",
    title="Pod overrides the injected sidecar",
    severity=Severity.WARNING,
    family=FAMILY,
    rationale="Whoever can edit a pod's annotations can swap the proxy image, its bootstrap or "
    "its volumes, and with them the enforcement of mTLS and authorization; such overrides "
    "should be rare, reviewed and restricted by admission policy.",
)
def sidecar_override(ctx: AnalysisContext) -> Iterator[Issue]:
    for pod in pod_templates(ctx):
        if not pod.has_sidecar:
            continue
        for key, why in _OVERRIDES.items():
            if key in pod.annotations:
                yield Issue(
                    message=f"{pod.resource.kind} {pod.ref} sets {key}: it {why}",
                    location=pod.meta_at("annotations", key),
                    resource=pod.resource.key,
                    workloads=(pod.ref,),
                    fix=f"# remove {key} from {pod.ref}, or allow it only through admission "
                    "policy for reviewed workloads\n",
                )

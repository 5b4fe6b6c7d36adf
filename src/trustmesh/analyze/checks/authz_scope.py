"""Authorization checks on where policies apply: default-deny, coverage, selectors and
targetRefs, CUSTOM providers and dry-run policies (TM-AUTHZ-001, 002, 008, 010, 011),
plus the helpers every authz check shares.

Which workloads a policy applies to is read off the compiled WorkloadPolicy of each
workload, so root-namespace scope, selectors, targetRef (ignored by sidecars) and dry-run
are exactly what enforcement uses. Coverage is only judged for sidecar workloads that
serve something: without a sidecar nothing is enforced, and a pure client is never called.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue
from trustmesh.analyze.findings import Severity as S
from trustmesh.analyze.registry import rule
from trustmesh.api import models as m
from trustmesh.api.conditions import is_http_only_key
from trustmesh.api.dataplane import MeshMode
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import Workload
from trustmesh.api.validation import DRY_RUN, is_dry_run_annotated
from trustmesh.policy.authz import CompiledRule
from trustmesh.policy.compose import WorkloadPolicy
from trustmesh.policy.derived import Derived
from trustmesh.policy.request import Attributes

Policy = Resource[Any]

MAX_SOURCES = 4  # peers tried when probing a rule: its own `from` peers come first
PROBE_IP = ipaddress.ip_address("10.11.12.13")

# --- shared helpers (also used by the rule-matching checks in authz.py) -------------


def policies(ctx: AnalysisContext) -> tuple[Policy, ...]:
    return ctx.resources("AuthorizationPolicy")


def label(policy: Policy) -> str:
    return f"{policy.namespace}/{policy.name}"


def refs(workloads: Iterable[WorkloadPolicy]) -> tuple[str, ...]:
    return tuple(sorted({wp.workload.ref for wp in workloads}))


def applied(ctx: AnalysisContext, policy: Policy) -> tuple[WorkloadPolicy, ...]:
    """Workloads (with or without a sidecar) whose compiled policy includes ``policy``."""
    return _APPLIED.get(ctx, None).get(policy.key, ())


def _applied_index(ctx: AnalysisContext, _: None) -> dict[str, tuple[WorkloadPolicy, ...]]:
    found: dict[str, list[WorkloadPolicy]] = defaultdict(list)
    for ref in sorted(ctx.mesh.workloads):
        wp = ctx.mesh.workloads[ref]
        a = wp.authz
        for group in (a.custom, a.deny, a.allow, a.audit, a.dry_run_deny, a.dry_run_allow):
            for p in group.policies:
                found[p.key].append(wp)
    return {k: tuple(v) for k, v in found.items()}


_APPLIED: Derived[AnalysisContext, None, dict[str, tuple[WorkloadPolicy, ...]]] = Derived(
    "applied policies", _applied_index
)


def serves(wp: WorkloadPolicy) -> bool:
    """Declares a port or is behind a Service: a pure client (``sleep``) is never reached."""
    return bool(wp.workload.ports or wp.services)


def exposed(ctx: AnalysisContext, policy: Policy) -> tuple[WorkloadPolicy, ...]:
    """Sidecar workloads that serve something and that ``policy`` applies to (dry-run too)."""
    return tuple(wp for wp in applied(ctx, policy) if wp.workload.has_sidecar and serves(wp))


def enforced_on(ctx: AnalysisContext, policy: Policy) -> tuple[WorkloadPolicy, ...]:
    """Where ``policy``'s rules decide requests: :func:`exposed`, unless it is dry-run."""
    return () if is_dry_run_annotated(policy) else exposed(ctx, policy)


def compiled(rules: Iterable[CompiledRule], policy: Policy, index: int) -> CompiledRule | None:
    for r in rules:
        if r.rule_index == index and r.policy.key == policy.key:
            return r
    return None


class PortKind(enum.Enum):
    HTTP = "HTTP"
    TCP = "TCP"
    UNKNOWN = "unknown"  # unnamed port: protocol sniffing picks HTTP or TCP per connection


@dataclass(frozen=True, slots=True)
class WorkloadPort:
    number: int  # target port: what `ports` in policies and the evaluator use
    kind: PortKind
    service_port: int | None = None  # what clients dial (and write in Host)


_HTTP_PROTOCOLS = frozenset(
    {
        "http",
        "http2",
        "http_proxy",
        "grpc",
        "grpc-web",
        "h2c",
        "kubernetes.io/h2c",
        "kubernetes.io/ws",
    }
)
# Inbound https/tls are passed through as TLS: they get TCP filter chains, like tcp.
_TCP_PROTOCOLS = frozenset({"tcp", "tls", "https", "mongo", "mysql", "redis", "kubernetes.io/wss"})


def port_kind(name: str, app_protocol: str) -> PortKind:
    """Istio's declared protocol: ``appProtocol`` first, then the ``<protocol>[-suffix]`` name."""
    for candidate in (app_protocol.lower(), name.lower().split("-", 1)[0]):
        if candidate in _HTTP_PROTOCOLS:
            return PortKind.HTTP
        if candidate in _TCP_PROTOCOLS:
            return PortKind.TCP
    return PortKind.UNKNOWN


def workload_ports(ctx: AnalysisContext, wp: WorkloadPolicy) -> tuple[WorkloadPort, ...]:
    """The workload's inbound ports with the protocol its Services declare for them."""
    return _WORKLOAD_PORTS.get(ctx, wp.workload.ref)


def _workload_ports(ctx: AnalysisContext, ref: str) -> tuple[WorkloadPort, ...]:
    wp = ctx.mesh.workloads[ref]
    named = _named_ports(wp.workload)
    found: dict[int, WorkloadPort] = {}
    # The Service resources, not the snapshot's Services: only they keep appProtocol apart.
    by_key = _SERVICES.get(ctx, None)
    for service in wp.services:
        resource = by_key.get(f"Service/{service.namespace}/{service.name}")
        if resource is None:
            continue
        for sp in resource.spec.ports:
            if sp.protocol.upper() in ("UDP", "SCTP"):
                continue  # sidecars capture TCP only
            target = sp.target_port if sp.target_port is not None else sp.port
            number = named.get(target) if isinstance(target, str) else target
            if number is None:
                continue
            kind = port_kind(sp.name, sp.app_protocol)
            known = found.get(number)
            if known is None or known.kind is PortKind.UNKNOWN:
                found[number] = WorkloadPort(number, kind, sp.port)
    for number in wp.workload.ports:
        found.setdefault(number, WorkloadPort(number, PortKind.UNKNOWN))
    return tuple(found[n] for n in sorted(found))


_WORKLOAD_PORTS: Derived[AnalysisContext, str, tuple[WorkloadPort, ...]] = Derived(
    "workload ports", _workload_ports
)
_SERVICES: Derived[AnalysisContext, None, dict[str, Resource[Any]]] = Derived(
    "services by key", lambda ctx, _: {r.key: r for r in ctx.resources("Service")}
)


def _named_ports(workload: Workload) -> dict[str, int]:
    r = workload.resource
    if workload.kind == "WorkloadEntry":
        return dict(r.spec.ports)
    spec: m.PodSpec = r.spec.spec if workload.kind == "Pod" else r.spec.template.spec
    return {p.name: p.container_port for c in spec.containers for p in c.ports if p.name}


def tcp_ports(ctx: AnalysisContext, wp: WorkloadPolicy) -> tuple[int, ...]:
    return tuple(p.number for p in workload_ports(ctx, wp) if p.kind is PortKind.TCP)


def http_ports(ctx: AnalysisContext, wp: WorkloadPolicy) -> tuple[WorkloadPort, ...]:
    """Ports that may carry HTTP: declared HTTP, or undeclared (sniffed)."""
    return tuple(p for p in workload_ports(ctx, wp) if p.kind is not PortKind.TCP)


def http_only_fields(r: m.Rule) -> list[str]:
    """The HTTP-only fields a rule uses (dropped, or dropping the rule, on TCP chains)."""
    used: list[str] = []
    for f in r.from_:
        if f.source.request_principals or f.source.not_request_principals:
            used.append("requestPrincipals")
    for t in r.to:
        op = t.operation
        for name, values in (
            ("hosts", op.hosts or op.not_hosts),
            ("methods", op.methods or op.not_methods),
            ("paths", op.paths or op.not_paths),
        ):
            if values:
                used.append(name)
    used.extend(f"when {c.key}" for c in r.when if is_http_only_key(c.key))
    return list(dict.fromkeys(used))


PLAINTEXT_REACH = "any client (plaintext ones included)"


def reachability(wp: WorkloadPolicy, ports: Iterable[int]) -> str:
    """Who can connect at all: plaintext clients unless every given port is STRICT."""
    modes = [wp.mtls.for_port(p).mode for p in ports] or [wp.mtls.workload.mode]
    if all(mode is m.MtlsMode.STRICT for mode in modes):
        return "any workload in the mesh (the ports are STRICT)"
    return PLAINTEXT_REACH


def mesh_principals(ctx: AnalysisContext) -> list[str]:
    """Principals of the workloads with a mesh identity (sidecar, ambient, gateway), sorted:
    the mesh peers a probe may pose as."""
    return _MESH_PRINCIPALS.get(ctx, None)


def _mesh_principals(ctx: AnalysisContext, _: None) -> list[str]:
    td = ctx.snapshot.mesh.trust_domain
    return sorted(
        {
            wp.workload.principal(td)
            for wp in ctx.mesh.workloads.values()
            if wp.workload.dataplane.has_mesh_identity
        }
    )


_MESH_PRINCIPALS: Derived[AnalysisContext, None, list[str]] = Derived(
    "mesh principals", _mesh_principals
)


def matches_tcp(ctx: AnalysisContext, r: CompiledRule, port: int) -> bool:
    """Does a rule compiled for TCP match a connection to ``port`` from a mesh peer or none?"""
    peers = mesh_principals(ctx)
    return any(
        r.matches(
            Attributes(
                principal=peer,
                source_ip=PROBE_IP,
                remote_ip=PROBE_IP,
                destination_port=port,
            )
        )
        for peer in [None, *peers[:MAX_SOURCES]]
    )


# --- TM-AUTHZ-001 ----------------------------------------------------------------------


def _allow_nothing(namespace: str, comment: str) -> str:
    return (
        f"{comment}"
        "apiVersion: security.istio.io/v1\n"
        "kind: AuthorizationPolicy\n"
        "metadata:\n"
        "  name: allow-nothing\n"
        f"  namespace: {namespace}\n"
        "spec: {}\n"
    )


@rule(
    "TM-AUTHZ-001",
    title="No default-deny: workloads with no ALLOW policy allow every request",
    severity=S.WARNING,
    family="authz",
    rationale="When no ALLOW policy applies to a workload, its sidecar allows every request "
    "that no DENY policy matches. An allow-nothing policy (`spec: {}`) in the root namespace, "
    "or in each namespace, makes access opt-in: only what an ALLOW rule names gets through.",
    fixable=True,
)
def no_default_deny(ctx: AnalysisContext) -> Iterator[Issue]:
    root = ctx.root_namespace
    open_by_namespace: dict[str, list[WorkloadPolicy]] = defaultdict(list)
    for wp in ctx.enforcing_workloads(with_waypoint=False):
        if serves(wp) and not wp.authz.allow.applies:
            open_by_namespace[wp.workload.namespace].append(wp)
    declared = {r.name: r for r in ctx.resources("Namespace")}
    for namespace, wps in sorted(open_by_namespace.items()):
        shadow = sorted({label(p) for wp in wps for p in wp.authz.dry_run_allow.policies})
        note = f"; dry-run ALLOW {', '.join(shadow)} is not enforced" if shadow else ""
        where = declared.get(namespace)
        if namespace == root:
            fix = _allow_nothing(
                root, f"# mesh-wide: applies to every namespace ({root} is root)\n"
            )
        else:
            fix = _allow_nothing(
                namespace,
                f"# for namespace {namespace}; or once, mesh-wide, in {root}. Then add ALLOW\n"
                "# policies for the traffic each workload needs.\n",
            )
        yield Issue(
            message=(
                f"no ALLOW policy applies to {', '.join(refs(wps))}: every request no DENY policy"
                f" matches is allowed (no allow-nothing policy in {namespace} or in the root"
                f" namespace {root}){note}"
            ),
            location=where.meta_location("name") if where else None,
            resource=where.key if where else "",
            workloads=refs(wps),
            fix=fix,
        )


# --- TM-AUTHZ-002 ----------------------------------------------------------------------


@rule(
    "TM-AUTHZ-002",
    title="Sidecar workload covered by no AuthorizationPolicy",
    severity=S.INFO,
    family="authz",
    rationale="No CUSTOM, DENY or ALLOW policy applies to the workload, so its sidecar lets "
    "every request through; AUDIT and dry-run policies enforce nothing and do not count.",
)
def uncovered_workload(ctx: AnalysisContext) -> Iterator[Issue]:
    for wp in ctx.enforcing_workloads(with_waypoint=False):
        a = wp.authz
        if not serves(wp) or a.custom.applies or a.deny.applies or a.allow.applies:
            continue
        inert = sorted(
            {label(p) for g in (a.audit, a.dry_run_deny, a.dry_run_allow) for p in g.policies}
        )
        note = f" (only {', '.join(inert)}, which enforce nothing)" if inert else ""
        workload = wp.workload
        labels = {"app": workload.labels["app"]} if "app" in workload.labels else workload.labels
        match = ", ".join(f"{k}: {v}" for k, v in sorted(labels.items()))
        proxy = "a sidecar" if workload.has_sidecar else "ztunnel (ambient)"
        yield Issue(
            message=(
                f"{workload.ref} has {proxy} but no AuthorizationPolicy applies to it{note}:"
                " every request that reaches it is allowed"
            ),
            location=workload.resource.meta_location("name"),
            resource=workload.resource.key,
            workloads=(workload.ref,),
            fix=(
                "apiVersion: security.istio.io/v1\n"
                "kind: AuthorizationPolicy\n"
                "metadata:\n"
                f"  name: {workload.name}-allow\n"
                f"  namespace: {workload.namespace}\n"
                "spec:\n"
                "  selector:\n"
                f"    matchLabels: {{{match}}}\n"
                "  rules:\n"
                "  - from:\n"
                "    - source:\n"
                '        principals: ["cluster.local/ns/<client-ns>/sa/<client-sa>"]\n'
            ),
        )


# --- TM-AUTHZ-008 ----------------------------------------------------------------------


def _target_refs(spec: m.AuthorizationPolicySpec) -> list[tuple[tuple[str | int, ...], Any]]:
    found: list[tuple[tuple[str | int, ...], Any]] = []
    if spec.target_ref is not None:
        found.append((("targetRef",), spec.target_ref))
    found += [(("targetRefs", k), ref) for k, ref in enumerate(spec.target_refs)]
    return found


@rule(
    "TM-AUTHZ-008",
    title="Policy that enforces nothing: selector matches no sidecar, targetRef on sidecars, "
    "or a namespace without workloads",
    severity=S.WARNING,
    family="authz",
    rationale="A selector that matches no workload (a typo in a label) or only workloads "
    "without a sidecar enforces nothing, and sidecars ignore policies attached with "
    "targetRef/targetRefs (those are for gateways and waypoints); a policy outside the root "
    "namespace applies only in its own namespace, so one in a namespace with no workloads (a "
    "typo in metadata.namespace) applies nowhere: the protection the policy seems to give is "
    "not there. A DENY that applies nowhere is a hole; an ALLOW, a denial.",
)
def policy_enforces_nothing(ctx: AnalysisContext) -> Iterator[Issue]:
    root = ctx.root_namespace
    for policy in policies(ctx):
        spec: m.AuthorizationPolicySpec = policy.spec
        if spec.target_ref is not None or spec.target_refs:
            yield from _ignored_target_refs(ctx, policy)
            continue
        if _in_empty_namespace(ctx, policy):
            yield _empty_namespace_issue(ctx, policy)
            continue
        if spec.selector is None or not spec.selector.match_labels:
            continue
        in_scope = [w for w in ctx.snapshot.workloads if policy.namespace in (root, w.namespace)]
        if not in_scope:
            continue  # the input holds no workloads there: nothing to compare with
        hits = applied(ctx, policy)
        if any(_enforces(wp.workload, spec.action) for wp in hits):
            continue
        if any(wp.workload.dataplane.mode is MeshMode.UNKNOWN for wp in hits):
            continue  # injection unknown (namespace not in the input): no claim either way
        selector = ", ".join(f"{k}={v}" for k, v in sorted(spec.selector.match_labels.items()))
        scope = "any namespace" if policy.namespace == root else f"namespace {policy.namespace}"
        ambient = [wp for wp in hits if wp.workload.dataplane.mode is MeshMode.AMBIENT]
        if ambient:
            problem = (
                f"selects only workloads without a sidecar ({', '.join(refs(hits))}); ztunnel,"
                f" which enforces policy for the ambient ones, does not support the"
                f" {spec.action.value} action: nothing enforces it"
            )
        elif hits:
            problem = (
                f"selects only workloads without a sidecar ({', '.join(refs(hits))}):"
                " nothing enforces it"
            )
        else:
            problem = f"matches no workload in {scope}: it enforces nothing"
        yield Issue(
            message=f"selector {selector} of {spec.action.value} {label(policy)} {problem}",
            location=policy.location("selector", "matchLabels"),
            resource=policy.key,
            workloads=refs(hits),
            fix="Fix the labels to those of the workloads to protect"
            + (" (and inject their sidecar)" if hits else ""),
        )


def _enforces(workload: Workload, action: m.Action) -> bool:
    """Something enforces a selector-bound policy with ``action`` for ``workload``: its
    sidecar or gateway proxy, or ztunnel (ALLOW and DENY only) for an ambient one."""
    mode = workload.dataplane.mode
    if mode is MeshMode.AMBIENT:
        return action in (m.Action.ALLOW, m.Action.DENY)
    return mode in (MeshMode.SIDECAR, MeshMode.GATEWAY)


def _in_empty_namespace(ctx: AnalysisContext, policy: Policy) -> bool:
    """A non-root namespace without workloads, when the inputs do hold workloads."""
    workloads = ctx.snapshot.workloads
    return (
        policy.namespace != ctx.root_namespace
        and bool(workloads)
        and not any(w.namespace == policy.namespace for w in workloads)
    )


def _empty_namespace_issue(ctx: AnalysisContext, policy: Policy) -> Issue:
    action: m.Action = policy.spec.action
    populated = sorted({w.namespace for w in ctx.snapshot.workloads})
    close = difflib.get_close_matches(policy.namespace, populated, n=1, cutoff=0.6)
    hint = f" (did you mean namespace {close[0]!r}?)" if close else ""
    if action in (m.Action.DENY, m.Action.CUSTOM):
        severity = S.WARNING
        effect = "the requests it was meant to deny are denied nowhere: a hole"
    elif action is m.Action.ALLOW:
        severity = S.INFO
        effect = (
            "it allows nothing anywhere: where a default-deny applies, the traffic it was"
            " written for is denied (fails closed)"
        )
    else:
        severity, effect = S.INFO, "it audits nothing"
    return Issue(
        message=(
            f"{action.value} {label(policy)} is in namespace {policy.namespace!r}, which holds no"
            f" workload in the inputs{hint}: a policy only applies in its own namespace (or"
            f" mesh-wide from {ctx.root_namespace}), so {effect}"
        ),
        location=policy.meta_location("namespace"),
        resource=policy.key,
        fix=(
            f"Move it to the namespace of the workloads it protects{hint}, or to"
            f" {ctx.root_namespace} to apply mesh-wide."
        ),
        severity=severity,
    )


def _ignored_target_refs(ctx: AnalysisContext, policy: Policy) -> Iterator[Issue]:
    for path, ref in _target_refs(policy.spec):
        if ref.kind != "Service" or ref.group not in ("", "core"):
            continue  # Gateway, GatewayClass, ServiceEntry: enforced where they attach
        namespace = ref.namespace or policy.namespace
        service = next(
            (s for s in ctx.snapshot.services if (s.namespace, s.name) == (namespace, ref.name)),
            None,
        )
        if service is None:
            continue
        sidecars = [wp for wp in ctx.sidecar_workloads() if service.selects(wp.workload)]
        if not sidecars:
            continue
        match = ", ".join(f"{k}: {v}" for k, v in sorted(service.selector.items()))
        yield Issue(
            message=(
                f"{label(policy)} attaches to Service {namespace}/{ref.name} with targetRef, but"
                f" the workloads behind it ({', '.join(refs(sidecars))}) have sidecars, which"
                " ignore targetRef policies: it is not enforced for them"
            ),
            location=policy.location(*path),
            resource=policy.key,
            workloads=refs(sidecars),
            fix=(
                "For sidecar workloads select them instead:\n"
                f"  selector:\n    matchLabels: {{{match}}}\n"
            ),
        )


# --- TM-AUTHZ-010 ----------------------------------------------------------------------


@rule(
    "TM-AUTHZ-010",
    title="CUSTOM policy names a provider missing from meshConfig.extensionProviders",
    severity=S.ERROR,
    family="authz",
    rationale="Istio cannot build the ext_authz filter for an unknown provider and fails "
    "closed: every request the CUSTOM rules match is denied.",
)
def custom_provider_missing(ctx: AnalysisContext) -> Iterator[Issue]:
    known = sorted(ctx.mesh.extension_providers)
    for policy in policies(ctx):
        spec: m.AuthorizationPolicySpec = policy.spec
        name = spec.provider.name if spec.provider else ""
        if spec.action is not m.Action.CUSTOM or not name or name in ctx.mesh.extension_providers:
            continue  # a CUSTOM policy without a provider is a validation error already
        targets = enforced_on(ctx, policy)
        on = ", ".join(refs(targets)) or "the gateways or waypoints it attaches to"
        defined = f" (defined: {', '.join(known)})" if known else " (none is defined)"
        yield Issue(
            message=(
                f"CUSTOM {label(policy)} names provider {name!r}, which meshConfig"
                f".extensionProviders does not define{defined}: every request its rules match"
                f" is denied on {on}"
            ),
            location=policy.location("provider", "name"),
            resource=policy.key,
            workloads=refs(targets),
            fix=(
                "meshConfig:\n  extensionProviders:\n"
                f"  - name: {name}\n    envoyExtAuthzHttp:\n"
                "      service: <ext-authz>.<namespace>.svc.cluster.local\n"
                "      port: <port>\n"
            ),
        )


# --- TM-AUTHZ-011 ----------------------------------------------------------------------


def _dry_run_effect(ctx: AnalysisContext, policy: Policy, wp: WorkloadPolicy) -> str:
    ports = tcp_ports(ctx, wp)
    if policy.spec.action is m.Action.DENY:
        rules = [r for r in wp.authz.dry_run_deny.tcp.rules if r.policy.key == policy.key]
        blocked = [p for p in ports if any(matches_tcp(ctx, r, p) for r in rules)]
        tcp = f", and TCP connections to ports {', '.join(map(str, blocked))}" if blocked else ""
        return f"deny the requests its rules match{tcp}"
    if wp.authz.allow.applies:
        return "deny nothing more (enforced ALLOW policies already apply; it only adds to them)"
    own_tcp = [r for r in wp.authz.dry_run_allow.tcp.rules if r.policy.key == policy.key]
    tcp = (
        f", every TCP connection to ports {', '.join(map(str, ports))} included"
        if ports and not own_tcp
        else ""
    )
    return f"start default-deny: deny every request its rules do not match{tcp}"


@rule(
    "TM-AUTHZ-011",
    title="Dry-run AuthorizationPolicy left in place",
    severity=S.INFO,
    family="authz",
    rationale='A policy annotated istio.io/dry-run: "true" is only logged (shadow '
    "denied/allowed), never enforced. Left in place it looks like protection that is not "
    "there; once validated it should be enforced or removed.",
)
def dry_run_left(ctx: AnalysisContext) -> Iterator[Issue]:
    for policy in policies(ctx):
        action = policy.spec.action
        if not is_dry_run_annotated(policy) or action not in (m.Action.ALLOW, m.Action.DENY):
            continue
        targets = exposed(ctx, policy)
        by_effect: dict[str, list[WorkloadPolicy]] = defaultdict(list)
        for wp in targets:
            by_effect[_dry_run_effect(ctx, policy, wp)].append(wp)
        if by_effect:
            effects = "; ".join(
                f"on {', '.join(refs(wps))} it would {effect}" for effect, wps in by_effect.items()
            )
        else:
            effects = "it applies to no sidecar workload"
        yield Issue(
            message=(
                f"dry-run {action.value} {label(policy)} is not enforced; if enforced, {effects}"
            ),
            location=policy.meta_location("annotations", DRY_RUN),
            resource=policy.key,
            workloads=refs(targets),
            fix="Check the `shadow denied` lines in the sidecars' access logs, then remove the"
            f" {DRY_RUN} annotation to enforce the policy, or delete it.",
        )

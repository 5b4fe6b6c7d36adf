"""Which policies apply to each workload, composed into one WorkloadPolicy per workload.

Selection follows Istio: a policy applies to a workload when it is in the workload's
namespace or in the root namespace, and its ``selector.matchLabels`` is a subset of the
workload's labels (no selector = all). ``targetRef(s)`` attach to gateways / waypoints,
never to sidecars. Workloads that select the same policies share one compiled rule set,
and every policy is compiled once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import ConfigSnapshot, Service, Workload
from trustmesh.api.validation import is_dry_run_annotated
from trustmesh.policy.authz import (
    CompiledRule,
    RuleSet,
    TrustBundle,
    condition_header_names,
    reads_host,
    rules_of_trees,
)
from trustmesh.policy.jwt import JwtProvider, parse_jwks
from trustmesh.policy.pathnorm import PathNormalization
from trustmesh.policy.rule_tree import CompiledRules, compile_rules
from trustmesh.policy.rule_trees import RULE_TREES, TreeKey, tree_key


@dataclass(frozen=True, slots=True)
class ModeSource:
    """The PeerAuthentication that set a mode, for explanations (``""`` = default)."""

    mode: m.MtlsMode
    scope: str  # "default" | "mesh" | "namespace" | "workload" | "port"
    policy: str = ""


@dataclass(frozen=True, slots=True)
class MtlsPolicy:
    """Effective PeerAuthentication: one mode for the workload, overrides per target port."""

    workload: ModeSource
    ports: Mapping[int, ModeSource] = field(default_factory=dict)

    def for_port(self, port: int) -> ModeSource:
        return self.ports.get(port, self.workload)


@dataclass(frozen=True, slots=True)
class ActionRules:
    """One action's compiled rules for HTTP and for TCP filter chains."""

    http: RuleSet
    tcp: RuleSet
    policies: tuple[Resource[Any], ...] = ()

    def for_protocol(self, is_http: bool) -> RuleSet:
        return self.http if is_http else self.tcp

    @property
    def applies(self) -> bool:
        return bool(self.policies)


@dataclass(frozen=True, slots=True)
class AuthzPolicy:
    custom: ActionRules
    deny: ActionRules
    allow: ActionRules
    audit: ActionRules
    dry_run_deny: ActionRules
    dry_run_allow: ActionRules
    # Headers some applicable policy's request.headers[...] condition reads (lower case):
    # the ones a request may not repeat (see trustmesh.policy.headers).
    condition_headers: frozenset[str] = frozenset()
    # Some applicable policy's decision depends on Host: the host guard applies.
    reads_host: bool = False


@dataclass(frozen=True, slots=True)
class WorkloadPolicy:
    """Everything enforced at one workload's sidecar, read by the evaluator (and xDS)."""

    workload: Workload
    mtls: MtlsPolicy
    authz: AuthzPolicy
    jwt_providers: tuple[JwtProvider, ...]
    egress_mode: m.OutboundTrafficPolicyMode
    services: tuple[Service, ...] = ()  # Services selecting the workload


@dataclass(frozen=True, slots=True, weakref_slot=True)  # weakref: policy.derived
class MeshPolicy:
    """The compiled snapshot: a WorkloadPolicy per workload plus mesh-wide settings."""

    snapshot: ConfigSnapshot
    bundle: TrustBundle
    path_normalization: PathNormalization
    extension_providers: frozenset[str]
    workloads: Mapping[str, WorkloadPolicy]
    # What is derived from a mesh on first use (indexes, TLS choices, Envoy RBAC per
    # policy) lives in the module that derives it: trustmesh.policy.derived.

    def for_workload(self, ref: str) -> WorkloadPolicy | None:
        return self.workloads.get(ref)


class _Selector:
    """Policies of one kind indexed by namespace and first selector label."""

    def __init__(self, policies: Iterable[Resource[Any]], root_namespace: str) -> None:
        self.root = root_namespace
        self.unselective: dict[str, list[Resource[Any]]] = defaultdict(list)
        self.by_label: dict[str, dict[tuple[str, str], list[Resource[Any]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for policy in policies:
            spec = policy.spec
            if getattr(spec, "target_ref", None) is not None or getattr(spec, "target_refs", None):
                continue  # attaches to a gateway or waypoint, never to a sidecar
            labels = spec.selector.match_labels if spec.selector else {}
            if labels:
                first = min(labels.items())
                self.by_label[policy.namespace][first].append(policy)
            else:
                self.unselective[policy.namespace].append(policy)

    def select(self, workload: Workload) -> list[Resource[Any]]:
        found: list[Resource[Any]] = []
        namespaces = (
            (self.root,) if workload.namespace == self.root else (self.root, workload.namespace)
        )
        labels = workload.labels
        for namespace in namespaces:
            found.extend(self.unselective.get(namespace, ()))
            indexed = self.by_label.get(namespace)
            if not indexed:
                continue
            for item in labels.items():
                for policy in indexed.get(item, ()):
                    wanted = policy.spec.selector.match_labels
                    if all(labels.get(k) == v for k, v in wanted.items()):
                        found.append(policy)
        found.sort(key=lambda p: p.order)
        return found


def compile_mesh(
    snapshot: ConfigSnapshot, jwks_by_uri: Mapping[str, str] | None = None
) -> MeshPolicy:
    """Compile every workload's policy. Pure; cost grows with distinct policy sets.

    ``jwks_by_uri`` stands in for fetching ``jwksUri`` documents (offline: read by the
    caller from files); a URI missing from it behaves like an unreachable JWKS server.
    """
    jwks_documents = jwks_by_uri or {}
    mesh = snapshot.mesh
    root = mesh.root_namespace
    bundle = TrustBundle((mesh.trust_domain, *mesh.trust_domain_aliases))
    authz_selector = _Selector(snapshot.of_kind("AuthorizationPolicy"), root)
    jwt_selector = _Selector(snapshot.of_kind("RequestAuthentication"), root)
    peer_policies = list(snapshot.of_kind("PeerAuthentication"))
    sidecars = list(snapshot.of_kind("Sidecar"))

    compiled_rules: dict[int, tuple[list[CompiledRule], list[CompiledRule]]] = {}
    authz_cache: dict[tuple[int, ...], AuthzPolicy] = {}
    jwt_cache: dict[tuple[int, ...], tuple[JwtProvider, ...]] = {}
    provider_cache: dict[int, list[JwtProvider]] = {}

    trees: dict[TreeKey, CompiledRules] = {}  # left in RULE_TREES for the translator

    def rules_of(policy: Resource[Any]) -> tuple[list[CompiledRule], list[CompiledRule]]:
        key = id(policy)
        if key not in compiled_rules:
            http = trees[tree_key(policy, for_tcp=False)] = compile_rules(
                policy, bundle, for_tcp=False
            )
            tcp = trees[tree_key(policy, for_tcp=True)] = compile_rules(
                policy, bundle, for_tcp=True
            )
            compiled_rules[key] = (
                rules_of_trees(policy, http, for_tcp=False),
                rules_of_trees(policy, tcp, for_tcp=True),
            )
        return compiled_rules[key]

    guards: dict[int, tuple[frozenset[str], bool]] = {}

    def guards_of(policy: Resource[Any]) -> tuple[frozenset[str], bool]:
        """The headers the policy's conditions read, and whether it reads the Host."""
        found = guards.get(id(policy))
        if found is None:
            trees = [r.tree for r in rules_of(policy)[0] if r.tree is not None]
            found = guards[id(policy)] = (condition_header_names(trees), reads_host(policy, trees))
        return found

    def authz_for(policies: list[Resource[Any]]) -> AuthzPolicy:
        key = tuple(id(p) for p in policies)
        if key not in authz_cache:
            authz_cache[key] = _authz_policy(policies, rules_of, guards_of)
        return authz_cache[key]

    def jwt_for(policies: list[Resource[Any]]) -> tuple[JwtProvider, ...]:
        key = tuple(id(p) for p in policies)
        if key not in jwt_cache:
            providers: list[JwtProvider] = []
            for policy in policies:
                if id(policy) not in provider_cache:
                    provider_cache[id(policy)] = _providers(policy, jwks_documents)
                providers.extend(provider_cache[id(policy)])
            providers.sort(key=lambda p: p.issuer)  # Istio's provider order
            jwt_cache[key] = tuple(providers)
        return jwt_cache[key]

    workloads: dict[str, WorkloadPolicy] = {}
    mtls_scopes = _mtls_scopes(peer_policies, root)
    # Everything below but the workload itself is a function of its namespace and labels
    # (selectors, PeerAuthentication and Sidecar scopes, Services): the pods of one
    # Deployment share one answer, computed once — a fleet of 5,000 pods in 50 apps costs
    # 50 selections, not 5,000 (tests/unit/test_compose_shapes.py).
    shapes: dict[tuple[str, tuple[tuple[str, str], ...]], _Shape] = {}
    for workload in snapshot.workloads:
        shape_key = (workload.namespace, tuple(sorted(workload.labels.items())))
        shape = shapes.get(shape_key)
        if shape is None:
            shape = shapes[shape_key] = _Shape(
                _mtls_for(workload, mtls_scopes, peer_policies, root),
                authz_for(authz_selector.select(workload)),
                jwt_for(jwt_selector.select(workload)),
                _egress_mode(workload, sidecars, mesh, root),
                snapshot.services_of(workload),
            )
        workloads[workload.ref] = WorkloadPolicy(
            workload=workload,
            mtls=shape.mtls,
            authz=shape.authz,
            jwt_providers=shape.jwt_providers,
            egress_mode=shape.egress_mode,
            services=shape.services,
        )
    compiled = MeshPolicy(
        snapshot=snapshot,
        bundle=bundle,
        path_normalization=PathNormalization.from_mesh(mesh.path_normalization.normalization),
        extension_providers=frozenset(p.name for p in mesh.extension_providers),
        workloads=workloads,
    )
    RULE_TREES.table(compiled).update(trees)
    return compiled


@dataclass(frozen=True, slots=True)
class _Shape:
    """What compile_mesh derives from a workload's namespace and labels alone."""

    mtls: MtlsPolicy
    authz: AuthzPolicy
    jwt_providers: tuple[JwtProvider, ...]
    egress_mode: m.OutboundTrafficPolicyMode
    services: tuple[Service, ...]


def _authz_policy(
    policies: list[Resource[Any]],
    rules_of: Callable[[Resource[Any]], tuple[list[CompiledRule], list[CompiledRule]]],
    guards_of: Callable[[Resource[Any]], tuple[frozenset[str], bool]],
) -> AuthzPolicy:
    groups: dict[str, list[Resource[Any]]] = defaultdict(list)
    for policy in policies:
        action: m.Action = policy.spec.action
        dry = is_dry_run_annotated(policy) and action in (m.Action.ALLOW, m.Action.DENY)
        groups[("dry-" if dry else "") + action.value].append(policy)

    def rules(name: str) -> ActionRules:
        members = groups.get(name, [])
        http = [r for p in members for r in rules_of(p)[0]]
        tcp = [r for p in members for r in rules_of(p)[1]]
        return ActionRules(RuleSet(http), RuleSet(tcp), tuple(members))

    return AuthzPolicy(
        custom=rules("CUSTOM"),
        deny=rules("DENY"),
        allow=rules("ALLOW"),
        audit=rules("AUDIT"),
        dry_run_deny=rules("dry-DENY"),
        dry_run_allow=rules("dry-ALLOW"),
        condition_headers=frozenset().union(*(guards_of(p)[0] for p in policies)),
        reads_host=any(guards_of(p)[1] for p in policies),
    )


def _providers(policy: Resource[Any], jwks_by_uri: Mapping[str, str]) -> list[JwtProvider]:
    spec: m.RequestAuthenticationSpec = policy.spec
    out = []
    for rule in spec.jwt_rules:
        if rule.jwks:
            keys, problem = parse_jwks(rule.jwks)
        elif rule.jwks_uri in jwks_by_uri:
            keys, problem = parse_jwks(jwks_by_uri[rule.jwks_uri])
        else:
            keys, problem = None, f"jwksUri {rule.jwks_uri} was not fetched"
        out.append(
            JwtProvider(
                issuer=rule.issuer,
                audiences=rule.audiences,
                keys=keys,
                from_headers=tuple((h.name.lower(), h.prefix) for h in rule.from_headers),
                from_params=rule.from_params,
                from_cookies=rule.from_cookies,
                forward_original_token=rule.forward_original_token,
                output_payload_to_header=rule.output_payload_to_header,
                output_claim_to_headers=tuple(
                    (c.header, c.claim) for c in rule.output_claim_to_headers
                ),
                jwks_problem=problem,
                source=f"{policy.namespace}/{policy.name}",
                jwks_uri=rule.jwks_uri,
                jwks_inline=rule.jwks,
                timeout=rule.timeout or "",
            )
        )
    return out


def _oldest(policies: Iterable[Resource[Any]]) -> Resource[Any] | None:
    return min(policies, key=Resource.age_key, default=None)


def _mtls_scopes(
    policies: list[Resource[Any]], root: str
) -> tuple[Resource[Any] | None, dict[str, Resource[Any]]]:
    mesh = _oldest(p for p in policies if p.namespace == root and not _has_selector(p))
    by_namespace: dict[str, list[Resource[Any]]] = defaultdict(list)
    for p in policies:
        if p.namespace != root and not _has_selector(p):
            by_namespace[p.namespace].append(p)
    namespaces = {ns: oldest for ns, ps in by_namespace.items() if (oldest := _oldest(ps))}
    return mesh, namespaces


def _has_selector(policy: Resource[Any]) -> bool:
    selector = policy.spec.selector
    return selector is not None and bool(selector.match_labels)


def _mtls_for(
    workload: Workload,
    scopes: tuple[Resource[Any] | None, dict[str, Resource[Any]]],
    policies: list[Resource[Any]],
    root: str,
) -> MtlsPolicy:
    mesh, namespaces = scopes
    workload_policy = None
    if workload.namespace != root:  # selector policies in the root namespace are ignored
        workload_policy = _oldest(
            p
            for p in policies
            if p.namespace == workload.namespace
            and _has_selector(p)
            and all(workload.labels.get(k) == v for k, v in p.spec.selector.match_labels.items())
        )
    current = ModeSource(m.MtlsMode.PERMISSIVE, "default")
    for scope, policy in (
        ("mesh", mesh),
        ("namespace", namespaces.get(workload.namespace)),
        ("workload", workload_policy),
    ):
        if policy is None or policy.spec.mtls is None:
            continue
        if policy.spec.mtls.mode is not m.MtlsMode.UNSET:
            current = ModeSource(policy.spec.mtls.mode, scope, f"{policy.namespace}/{policy.name}")
    ports: dict[int, ModeSource] = {}
    if workload_policy is not None:
        for port, setting in workload_policy.spec.port_level_mtls.items():
            if setting.mode is not m.MtlsMode.UNSET:
                ports[port] = ModeSource(
                    setting.mode, "port", f"{workload_policy.namespace}/{workload_policy.name}"
                )
    return MtlsPolicy(current, ports)


def _egress_mode(
    workload: Workload, sidecars: list[Resource[Any]], mesh: m.MeshConfigModel, root: str
) -> m.OutboundTrafficPolicyMode:
    def selects(sidecar: Resource[Any]) -> bool:
        selector = sidecar.spec.workload_selector
        labels = selector.labels if selector else {}
        return all(workload.labels.get(k) == v for k, v in labels.items())

    own = [s for s in sidecars if s.namespace == workload.namespace and selects(s)]
    chosen = _oldest(s for s in own if s.spec.workload_selector is not None) or _oldest(own)
    if chosen is None:
        chosen = _oldest(
            s for s in sidecars if s.namespace == root and s.spec.workload_selector is None
        )
    if chosen is not None and chosen.spec.outbound_traffic_policy is not None:
        mode: m.OutboundTrafficPolicyMode = chosen.spec.outbound_traffic_policy.mode
        return mode
    return mesh.outbound_traffic_policy.mode

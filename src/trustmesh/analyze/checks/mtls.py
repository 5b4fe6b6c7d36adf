"""mTLS and identity checks on the server side (TM-MTLS-001, 002, 006), from the compiled mesh.

The effective PeerAuthentication mode of every sidecar port is read from the same
``WorkloadPolicy.mtls`` the evaluator enforces (mesh → namespace → workload → port,
oldest policy per scope, root-namespace selector policies ignored), so a namespace made
STRICT covers its workloads and a port-level exception is seen where it applies.
Workloads without a sidecar enforce nothing and are never reported as "accepting
plaintext": they are the plaintext clients a STRICT port would refuse.

The client-side checks (003 … 005 on DestinationRule TLS, 007 on auto mTLS) live in
:mod:`.mtls_client`; importing it here registers them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from trustmesh.analyze.checks.mtls_client import (
    inbound_ports,
    is_http_port,
    listing,
    to_yaml,
)
from trustmesh.analyze.context import AnalysisContext
from trustmesh.analyze.findings import Issue, Severity
from trustmesh.analyze.registry import rule
from trustmesh.api import models as m
from trustmesh.api.conditions import condition_key
from trustmesh.api.dataplane import MeshMode
from trustmesh.api.resources import Resource
from trustmesh.api.yamldoc import FieldPath
from trustmesh.policy.compose import ModeSource, WorkloadPolicy
from trustmesh.policy.decision import RequestError, Verdict
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source
from trustmesh.policy.ztunnel import plaintext_refused

_RANK = {m.MtlsMode.DISABLE: 0, m.MtlsMode.PERMISSIVE: 1, m.MtlsMode.STRICT: 2}
_PA_API = "security.istio.io/v1"


# --- effective modes per sidecar port ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PeerScopes:
    """The PeerAuthentications that win their scope, as ``compose`` selects them."""

    mesh: Resource[Any] | None
    namespaces: dict[str, Resource[Any]]
    by_key: dict[str, Resource[Any]]  # "ns/name" → policy, to resolve ModeSource.policy


def _peer_scopes(ctx: AnalysisContext) -> _PeerScopes:
    # Mirrors compose._mtls_scopes (private there): oldest unselective policy per scope.
    policies = ctx.resources("PeerAuthentication")
    root = ctx.root_namespace
    unselective = [p for p in policies if not _has_selector(p)]
    mesh = min((p for p in unselective if p.namespace == root), key=Resource.age_key, default=None)
    by_namespace: dict[str, list[Resource[Any]]] = defaultdict(list)
    for p in unselective:
        if p.namespace != root:
            by_namespace[p.namespace].append(p)
    namespaces = {ns: min(ps, key=Resource.age_key) for ns, ps in by_namespace.items()}
    return _PeerScopes(mesh, namespaces, {f"{p.namespace}/{p.name}": p for p in policies})


def _has_selector(policy: Resource[Any]) -> bool:
    return policy.spec.selector is not None and bool(policy.spec.selector.match_labels)


def _explicit_mode(policy: Resource[Any] | None) -> m.MtlsMode | None:
    if policy is None or policy.spec.mtls is None or policy.spec.mtls.mode is m.MtlsMode.UNSET:
        return None
    mode: m.MtlsMode = policy.spec.mtls.mode
    return mode


@dataclass(frozen=True, slots=True)
class _Exposure:
    """A sidecar port that accepts plaintext, and the stricter setting it overrides."""

    policy: WorkloadPolicy
    port: int | None  # None: no port declared; the workload-wide mode applies
    source: ModeSource
    enclosing: ModeSource | None  # set when ``source`` downgrades a stricter explicit mode

    @property
    def ref(self) -> str:
        w = self.policy.workload.ref
        return f"{w}:{self.port}" if self.port is not None else f"{w} (all ports)"

    @property
    def field(self) -> FieldPath:
        if self.source.scope == "port":
            return ("portLevelMtls", str(self.port), "mode")
        return ("mtls", "mode")


def _mode_of(policy: WorkloadPolicy, port: int | None) -> ModeSource:
    return policy.mtls.for_port(port) if port is not None else policy.mtls.workload


def _exposures(ctx: AnalysisContext, scopes: _PeerScopes) -> list[_Exposure]:
    out = []
    for policy in ctx.enforcing_workloads():
        ambient = policy.workload.dataplane.mode is MeshMode.AMBIENT
        for port in inbound_ports(policy) or (None,):
            source = _mode_of(policy, port)
            if ambient:
                # ztunnel's own reading of PeerAuthentication (DISABLE means PERMISSIVE).
                refused, _ = plaintext_refused(ctx.snapshot, policy.workload, port or 0)
                if refused:
                    continue
            elif source.mode is m.MtlsMode.STRICT:
                continue
            out.append(_Exposure(policy, port, source, _enclosing(scopes, policy, source)))
    return sorted(out, key=lambda e: (e.policy.workload.ref, e.port or 0))


def _enclosing(
    scopes: _PeerScopes, policy: WorkloadPolicy, source: ModeSource
) -> ModeSource | None:
    """The explicit mode ``source`` overrides, if stricter (default PERMISSIVE is no setting)."""
    levels: list[tuple[str, Resource[Any] | None]] = [("mesh", scopes.mesh)]
    if source.scope in ("workload", "port"):
        levels.append(("namespace", scopes.namespaces.get(policy.workload.namespace)))
    if source.scope == "port":
        levels.append(("workload", scopes.by_key.get(source.policy)))
    if source.scope not in ("namespace", "workload", "port"):
        return None
    enclosing = None
    for scope, resource in levels:
        mode = _explicit_mode(resource)
        if mode is not None and resource is not None:
            enclosing = ModeSource(mode, scope, f"{resource.namespace}/{resource.name}")
    if enclosing is not None and _RANK[source.mode] < _RANK[enclosing.mode]:
        return enclosing
    return None


def _origin(source: ModeSource) -> str:
    if not source.policy:
        return "Istio's default"
    return f"{source.scope} PeerAuthentication {source.policy}"


def _plaintext_clients(ctx: AnalysisContext) -> list[str]:
    """Workloads without a sidecar: they can only speak plaintext to the mesh.

    Pure clients (no port served) first, as they make the clearest example.
    """
    plain = [
        p.workload
        for p in ctx.mesh.workloads.values()
        if not p.workload.dataplane.has_mesh_identity
    ]
    return [w.ref for w in sorted(plain, key=lambda w: (bool(w.ports), w.ref))]


def _peer_authentication(
    name: str,
    namespace: str,
    mode: str | None = "STRICT",
    selector: dict[str, str] | None = None,
    ports: dict[int, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if selector:
        spec["selector"] = {"matchLabels": dict(selector)}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    if ports:
        spec["portLevelMtls"] = {port: {"mode": value} for port, value in sorted(ports.items())}
    return {
        "apiVersion": _PA_API,
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


# --- TM-MTLS-001 ---------------------------------------------------------------------------


@rule(
    "TM-MTLS-001",
    title="No mesh-wide STRICT mTLS: sidecars accept plaintext",
    severity=Severity.WARNING,
    family="mtls",
    rationale=(
        "Without a STRICT PeerAuthentication in the root namespace every sidecar (and ztunnel,"
        " for ambient workloads) not made STRICT by a narrower policy also accepts plaintext,"
        " which carries no peer identity:"
        " any pod (or a process bypassing its sidecar) can talk to it unauthenticated."
    ),
    fixable=True,
)
def no_mesh_wide_strict(ctx: AnalysisContext) -> Iterator[Issue]:
    scopes = _peer_scopes(ctx)
    mesh_mode = _explicit_mode(scopes.mesh)
    if mesh_mode is m.MtlsMode.STRICT:
        return  # narrower downgrades are TM-MTLS-002's
    # Downgrades of an explicit stricter setting are reported by TM-MTLS-002, not twice.
    exposed = [e for e in _exposures(ctx, scopes) if e.enclosing is None]
    if not exposed:
        return  # every sidecar port is STRICT through namespace / workload policies
    inherited = [e.ref for e in exposed if e.source.scope in ("default", "mesh")]
    explicit: dict[str, list[str]] = defaultdict(list)  # origin → ports it opens
    for e in exposed:
        if e.source.scope not in ("default", "mesh"):
            explicit[f"{e.source.mode.value} by {_origin(e.source)}"].append(e.ref)
    root = ctx.root_namespace
    if scopes.mesh is None:
        head = f"no mesh-wide PeerAuthentication in {root}"
        location, resource, name = None, "", "default"
    else:
        head = (
            f"mesh-wide PeerAuthentication {root}/{scopes.mesh.name} is"
            f" {mesh_mode.value if mesh_mode else 'UNSET (PERMISSIVE)'}"
        )
        location = scopes.mesh.location("mtls", "mode")
        resource, name = scopes.mesh.key, scopes.mesh.name
    parts = []
    if inherited:
        parts.append(f"plaintext is accepted on {listing(inherited)}")
    for origin, refs in sorted(explicit.items()):
        # A mesh-wide policy would not change these; once it exists they are downgrades.
        parts.append(f"plaintext is accepted on {listing(refs)} ({origin})")
    clients = _plaintext_clients(ctx)
    note = (
        f"# Clients without a sidecar ({listing(clients)}) will be refused by STRICT ports:\n"
        "# inject sidecars first, or keep a port-level PERMISSIVE exception for them.\n"
        if clients
        else ""
    )
    yield Issue(
        message=f"{head}: {'; '.join(parts)}",
        location=location,
        resource=resource,
        workloads=tuple(sorted({e.policy.workload.ref for e in exposed})),
        fix=note + to_yaml(_peer_authentication(name, root)),
        properties={"ports": [e.ref for e in exposed]},
    )


# --- TM-MTLS-002 ---------------------------------------------------------------------------


@rule(
    "TM-MTLS-002",
    title="PeerAuthentication downgrades a stricter mTLS setting",
    severity=Severity.WARNING,
    family="mtls",
    rationale=(
        "A namespace, workload or port set to PERMISSIVE or DISABLE under a STRICT (or"
        " PERMISSIVE) parent re-opens plaintext where the parent closed it; DISABLE also"
        " refuses mTLS, so AuthorizationPolicy there never sees a peer identity."
    ),
)
def downgraded_mtls(ctx: AnalysisContext) -> Iterator[Issue]:
    scopes = _peer_scopes(ctx)
    groups: dict[tuple[str, FieldPath], list[_Exposure]] = defaultdict(list)
    for exposure in _exposures(ctx, scopes):
        if exposure.enclosing is not None:
            groups[(exposure.source.policy, exposure.field)].append(exposure)
    for (key, path), exposures in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        policy = scopes.by_key[key]
        first = exposures[0]
        assert first.enclosing is not None
        mode = first.source.mode
        what = {
            "port": f"port {first.port}",
            "namespace": f"namespace {policy.namespace}",
        }.get(first.source.scope, "the selected workloads")
        sidecars = all(e.policy.workload.has_sidecar for e in exposures)
        effect = (
            "only plaintext (mTLS refused)"
            if mode is m.MtlsMode.DISABLE and sidecars
            else "plaintext"
        )
        yield Issue(
            message=(
                f"PeerAuthentication {key} sets {what} to {mode.value} under"
                f" {first.enclosing.mode.value} from {_origin(first.enclosing)}:"
                f" {effect} is accepted on {listing([e.ref for e in exposures])}"
            ),
            location=policy.location(*path),
            resource=policy.key,
            workloads=tuple(sorted({e.policy.workload.ref for e in exposures})),
            fix=(
                f"# Once the plaintext clients of these ports have sidecars, raise the"
                f" override (or remove it to inherit {first.enclosing.mode.value}):\n"
                + to_yaml(_raised(policy, path))
            ),
        )


def _raised(policy: Resource[Any], path: FieldPath) -> dict[str, Any]:
    """``policy`` rewritten with the field at ``path`` set to STRICT."""
    spec: m.PeerAuthenticationSpec = policy.spec
    mode = spec.mtls.mode.value if spec.mtls and spec.mtls.mode is not m.MtlsMode.UNSET else None
    ports = {p: s.mode.value for p, s in spec.port_level_mtls.items()}
    if path[0] == "portLevelMtls":
        ports[int(path[1])] = "STRICT"
    else:
        mode = "STRICT"
    labels = spec.selector.match_labels if spec.selector else None
    return _peer_authentication(policy.name, policy.namespace, mode, labels, ports)


# --- TM-MTLS-006 ---------------------------------------------------------------------------

_POSITIVE = (
    ("principals", "principals"),
    ("namespaces", "namespaces"),
    ("service_accounts", "serviceAccounts"),
    ("trust_domains", "trustDomains"),
)
_NEGATIVE = (
    ("not_principals", "notPrincipals"),
    ("not_namespaces", "notNamespaces"),
    ("not_service_accounts", "notServiceAccounts"),
    ("not_trust_domains", "notTrustDomains"),
)


def _identity_key(key: str) -> bool:
    """A ``when`` key that reads the peer's mTLS identity."""
    known = condition_key(key)
    return known is not None and known.peer_identity


def _positive(source: m.Source) -> list[tuple[str, tuple[str, ...]]]:
    return [(name, getattr(source, attr)) for attr, name in _POSITIVE if getattr(source, attr)]


def _needs_identity(r: m.Rule) -> bool:
    """No plaintext request can match ``r``: every path through it needs a peer identity."""
    if r.from_ and all(_positive(f.source) for f in r.from_):
        return True
    return any(_identity_key(c.key) and c.values for c in r.when)


def _deny_identity(r: m.Rule) -> tuple[FieldPath, str] | None:
    """The first positive identity match of a DENY rule: plaintext never matches it."""
    for j, clause in enumerate(r.from_):
        for name, values in _positive(clause.source):
            return ("from", j, "source", name), f"{name} {list(values)}"
    for k, condition in enumerate(r.when):
        if _identity_key(condition.key) and condition.values:
            return ("when", k, "values"), f"{condition.key} {list(condition.values)}"
    return None


def _allow_negative(r: m.Rule) -> tuple[FieldPath, str] | None:
    """A negative identity match a plaintext request passes through in an ALLOW rule."""
    if _needs_identity(r):
        return None  # plaintext fails the positive part: fails closed
    for j, clause in enumerate(r.from_):
        if _positive(clause.source):
            continue
        for attr, name in _NEGATIVE:
            values = getattr(clause.source, attr)
            if values:
                return ("from", j, "source", name), f"{name} {list(values)}"
    for k, condition in enumerate(r.when):
        if _identity_key(condition.key) and condition.not_values:
            return (
                "when",
                k,
                "notValues",
            ), f"{condition.key} notValues {list(condition.not_values)}"
    return None


def _rule_ports(r: m.Rule) -> set[int] | None:
    """Ports every ``to`` entry is limited to; None when the rule applies to any port."""
    if not r.to or any(not t.operation.ports for t in r.to):
        return None
    return {int(p) for t in r.to for p in t.operation.ports if p.isdigit()}


def _open_ports(policy: WorkloadPolicy, limit: set[int] | None) -> list[int | None]:
    """Ports of ``policy`` the rule covers that are not STRICT."""
    served = inbound_ports(policy)
    if limit is None:
        candidates: list[int | None] = list(served) or [None]
    else:
        candidates = list(sorted(limit & set(served)) if served else sorted(limit))
    return [p for p in candidates if _mode_of(policy, p).mode is not m.MtlsMode.STRICT]


def _plaintext_denied_anyway(policy: WorkloadPolicy) -> bool:
    """No plaintext request can pass the workload's authorization at all.

    Either ALLOW policies apply and every ALLOW rule needs an identity (fails closed), or
    an enforced DENY rule matches every plaintext request — Istio's documented recipe
    ``DENY from.source.notPrincipals: ["*"]`` for rejecting plaintext under PERMISSIVE.
    """
    allow = policy.authz.allow
    if allow.applies and all(
        _needs_identity(r) for p in allow.policies for r in (p.spec.rules or ())
    ):
        return True
    deny = policy.authz.deny
    return any(_matches_all_plaintext(r) for p in deny.policies for r in (p.spec.rules or ()))


_NEGATIVE_ATTRS = frozenset(attr for attr, _ in _NEGATIVE)


def _matches_all_plaintext(r: m.Rule) -> bool:
    """Every plaintext request matches ``r``: only negated identities, no other condition."""
    if r.to or any(not _identity_key(c.key) or c.values for c in r.when):
        return False
    if not r.from_:
        return True

    def negated_identity_only(source: m.Source) -> bool:
        used = {name for name in m.Source.model_fields if getattr(source, name)}
        return bool(used) and used <= _NEGATIVE_ATTRS

    return any(negated_identity_only(f.source) for f in r.from_)


@dataclass(slots=True)
class _Bypass:
    policy: Resource[Any]
    index: int
    path: FieldPath
    what: str
    action: m.Action
    targets: list[tuple[WorkloadPolicy, int | None]]


@rule(
    "TM-MTLS-006",
    title="Identity-based policy on a workload that also accepts plaintext",
    severity=Severity.WARNING,
    family="mtls",
    rationale=(
        "principals, namespaces and serviceAccounts come from the mTLS peer certificate; a"
        " plaintext request has none. On a port that is not STRICT a DENY on an identity never"
        " matches plaintext (bypass), and an ALLOW on notPrincipals/notNamespaces admits it."
    ),
)
def identity_without_strict(ctx: AnalysisContext) -> Iterator[Issue]:
    found: dict[tuple[str, int], _Bypass] = {}
    for policy in ctx.sidecar_workloads():
        checks = [(m.Action.ALLOW, policy.authz.allow.policies, _allow_negative)]
        if not _plaintext_denied_anyway(policy):
            checks.append((m.Action.DENY, policy.authz.deny.policies, _deny_identity))
        for action, resources, finder in checks:
            for resource in resources:
                for i, r in enumerate(resource.spec.rules or ()):
                    hit = finder(r)
                    ports = _open_ports(policy, _rule_ports(r)) if hit else []
                    if hit is None or not ports:
                        continue
                    entry = found.setdefault(
                        (resource.key, i), _Bypass(resource, i, *hit, action, [])
                    )
                    entry.targets.extend((policy, p) for p in ports)
    for _, bypass in sorted(found.items()):
        yield _bypass_issue(ctx, bypass)


def _bypass_issue(ctx: AnalysisContext, bypass: _Bypass) -> Issue:
    res = bypass.policy
    refs = [
        f"{p.workload.ref}:{port}" if port is not None else p.workload.ref
        for p, port in bypass.targets
    ]
    modes = sorted({_mode_of(p, port).mode.value for p, port in bypass.targets})
    head = (
        f"{bypass.action.value} AuthorizationPolicy {res.namespace}/{res.name}"
        f" rules[{bypass.index}]"
        f" matches {bypass.what}, but plaintext is also accepted on {listing(refs)}"
        f" ({'/'.join(modes)})"
    )
    if bypass.action is m.Action.DENY:
        effect = "; a plaintext client has no identity, so this rule never denies it"
    else:
        effect = "; a plaintext client has no identity, so it passes the negation and is allowed"
    sources = sorted({_origin(_mode_of(p, port)) for p, port in bypass.targets})
    return Issue(
        message=head + effect + _proof(ctx, bypass),
        location=res.location("rules", bypass.index, *bypass.path),
        resource=res.key,
        workloads=tuple(sorted({p.workload.ref for p, _ in bypass.targets})),
        fix=(
            f"Make {listing(refs)} STRICT (their mode comes from {listing(sources)}), e.g. a"
            " PeerAuthentication with mtls.mode STRICT (or portLevelMtls STRICT) for them"
            + (
                "; or express the intent as an ALLOW over principals, which fails closed."
                if bypass.action is m.Action.DENY
                else "; or use positive principals/namespaces, which plaintext never matches."
            )
        ),
    )


def _proof(ctx: AnalysisContext, bypass: _Bypass) -> str:
    """Evaluate one plaintext request on the first exposed port to show the outcome."""
    target = next(((p, port) for p, port in bypass.targets if port is not None), None)
    if target is None:
        return ""
    policy, port = target
    clients = _plaintext_clients(ctx)
    # Prefer a plaintext client from a namespace the rule names: the bypass it shows is real.
    named = [
        c
        for c in clients
        if f"'{c.split('/')[0]}'" in bypass.what or f"/ns/{c.split('/')[0]}/" in bypass.what
    ]
    client = (named or clients or [""])[0]
    source = Source.workload(client) if client else Source.plaintext()
    http = HttpRequest() if is_http_port(policy, port) else None
    try:
        decision = evaluate(ctx.mesh, Request(source, policy.workload.ref, port, http), now=0.0)
    except RequestError:
        return ""
    rule_name = f"ns[{bypass.policy.namespace}]-policy[{bypass.policy.name}]-rule[{bypass.index}]"
    request = "GET /" if http else "TCP"
    what = f"{client or 'a plaintext client'} → {policy.workload.ref}:{port} {request}"
    if bypass.action is m.Action.ALLOW:
        if decision.verdict is Verdict.ALLOW and decision.rule == rule_name:
            return f" (evaluated: {what} is allowed by {rule_name})"
        return ""
    r = bypass.policy.spec.rules[bypass.index]
    only_identity = not r.to and all(_identity_key(c.key) for c in r.when)
    if only_identity and decision.verdict is Verdict.ALLOW:
        # The rule has no other condition, so this request is exactly what it meant to deny.
        return f" (evaluated: {what} is allowed)"
    return ""

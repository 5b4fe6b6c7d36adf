"""Ambient mode: what ztunnel enforces for a workload enrolled in ambient, exactly as Istio.

istiod converts each selector-, namespace- or root-scoped AuthorizationPolicy for ztunnel
(``pilot/pkg/serviceregistry/ambient/authorization.go``, ``convertAuthorizationPolicy``):

- ``targetRef(s)`` policies are not for ztunnel (they attach to waypoints / gateways);
  CUSTOM and AUDIT policies are not sent (ztunnel supports ALLOW and DENY only), nor are
  dry-run policies (``AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY`` is off by default).
- Each rule becomes a group of clauses: one clause for ``to`` (a match per operation,
  holding only ``ports`` / ``notPorts``), one for ``from`` (a match per source:
  principals, namespaces, serviceAccounts, ipBlocks and their not-forms), one per
  ``when`` condition whose key is ``source.ip``, ``source.namespace``,
  ``source.principal``, ``destination.ip`` or ``destination.port``.
- Anything else is an HTTP (L7) attribute ztunnel cannot see: hosts, methods, paths,
  requestPrincipals, remoteIpBlocks, every other ``when`` key. An ALLOW rule using one
  is dropped whole (it never matches); in a DENY rule the attribute is left out, so an
  operation or condition made only of L7 attributes becomes an empty match.

ztunnel (``src/rbac.rs``) then matches a connection: a policy with no rules matches
nothing; a rule matches when all its clauses do; an empty clause matches, and a clause
matches when one of its matches does — an *empty* match is skipped (never matches).
Within a match the fields are AND'd, the values of a field OR'd, the not-forms must all
miss. Principals are matched as written: no trust-domain alias expansion. Order
(``src/state.rs``): any DENY match denies; no ALLOW policy allows; an ALLOW match allows;
otherwise deny. A refused connection is closed — there is no HTTP response.

PeerAuthentication becomes a "deny plaintext" policy (``convertedSelectorPeerAuthentications``
and ``convertPeerAuthentication``): STRICT refuses connections without a peer identity,
PERMISSIVE and DISABLE accept them (HBONE always carries mTLS, so DISABLE means nothing),
with Istio's own rules for port-level exceptions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.dataplane import USE_WAYPOINT
from trustmesh.api.resources import Resource
from trustmesh.api.snapshot import ConfigSnapshot, Workload
from trustmesh.policy import matchers as mt
from trustmesh.policy.authz import Check, rule_name
from trustmesh.policy.compose import MeshPolicy, WorkloadPolicy
from trustmesh.policy.derived import Derived
from trustmesh.policy.request import Attributes

L4_WHEN_KEYS = frozenset(
    {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
)
TUNNEL_LABEL = "networking.istio.io/tunnel"


@dataclass(frozen=True, slots=True)
class ZMatch:
    """One ztunnel ``RbacMatch``: every check must hold. Empty: skipped (never matches)."""

    checks: tuple[Check, ...]

    def matches(self, a: Attributes) -> bool:
        return bool(self.checks) and all(c.test(a) for c in self.checks)


@dataclass(frozen=True, slots=True)
class ZRule:
    """One rule of the policy as ztunnel holds it (a group of clauses)."""

    name: str  # ns[..]-policy[..]-rule[i], i = the rule's index in the policy
    clauses: tuple[tuple[ZMatch, ...], ...]
    labels: tuple[str, ...]  # what each clause is, for traces: "to", "from", "when[k]"
    l7: tuple[str, ...] = ()  # HTTP attributes left out of this rule

    def matches(self, a: Attributes) -> bool:
        return all(not clause or any(x.matches(a) for x in clause) for clause in self.clauses)

    def explain(self, a: Attributes) -> tuple[bool, str]:
        for label, clause in zip(self.labels, self.clauses, strict=True):
            if not clause:
                continue
            if not any(x.checks for x in clause):
                return False, f"no match: {label} holds only HTTP attributes (an empty match)"
            if not any(x.matches(a) for x in clause):
                return False, f"no match: {label}"
        return True, "matched"

    @property
    def effective(self) -> bool:
        """Can match anything at all: every clause has a non-empty match (or is empty)."""
        return all(not clause or any(x.checks for x in clause) for clause in self.clauses)


@dataclass(frozen=True, slots=True)
class ZtunnelPolicy:
    """An AuthorizationPolicy as ztunnel enforces it, and what the conversion lost."""

    policy: Resource[Any] = field(compare=False, repr=False)
    action: m.Action
    rules: tuple[ZRule, ...]
    dropped_rules: tuple[tuple[int, tuple[str, ...]], ...] = ()  # ALLOW: (index, L7 fields)

    @property
    def key(self) -> str:
        return f"{self.policy.namespace}/{self.policy.name}"

    def first_match(self, a: Attributes) -> ZRule | None:
        return next((r for r in self.rules if r.matches(a)), None)

    def weakening(self) -> str | None:
        """How ztunnel's enforcement differs from the policy as written, if it does."""
        if self.dropped_rules:
            dropped = ", ".join(
                f"rules[{i}] ({', '.join(fields)})" for i, fields in self.dropped_rules
            )
            return (
                f"ALLOW rules with HTTP attributes are dropped by ztunnel: {dropped} never"
                " match, so the traffic they allow is denied"
            )
        partial = [r for r in self.rules if r.l7]
        if not partial:
            return None
        inert = [r for r in partial if not r.effective]
        parts = []
        if inert:
            fields = sorted({f for r in inert for f in r.l7})
            parts.append(
                f"{', '.join(r.name for r in inert)} can never match at ztunnel (it ignores"
                f" {', '.join(fields)}): that DENY protects nothing"
            )
        broad = [r for r in partial if r.effective]
        if broad:
            fields = sorted({f for r in broad for f in r.l7})
            parts.append(
                f"{', '.join(r.name for r in broad)} is enforced without {', '.join(fields)}:"
                " it denies more than written"
            )
        return "; ".join(parts)

    @property
    def protects_nothing(self) -> bool:
        """A DENY that ztunnel can never match (its HTTP attributes left out)."""
        return self.action is m.Action.DENY and not any(r.effective for r in self.rules)


def sent_to_ztunnel(policy: Resource[Any]) -> str | None:
    """Why istiod does not send ``policy`` to ztunnel, or None when it does."""
    spec: m.AuthorizationPolicySpec = policy.spec
    if spec.target_ref is not None or spec.target_refs:
        return "attached with targetRef(s): enforced by a waypoint or gateway, not ztunnel"
    if spec.action not in (m.Action.ALLOW, m.Action.DENY):
        return f"ztunnel does not support the {spec.action.value} action: not enforced"
    value = policy.annotations.get("istio.io/dry-run", "")
    if value.lower() in ("1", "t", "true"):
        return (
            "dry-run policies are not sent to ztunnel"
            " (AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY is off by default)"
        )
    return None


def compile_ztunnel(policy: Resource[Any]) -> ZtunnelPolicy:
    """``policy`` (ALLOW or DENY, sent to ztunnel) as ztunnel holds it."""
    spec: m.AuthorizationPolicySpec = policy.spec
    action = spec.action
    rules: list[ZRule] = []
    dropped: list[tuple[int, tuple[str, ...]]] = []
    for index, rule in enumerate(spec.rules or ()):
        compiled = _rule(policy, index, rule)
        if action is m.Action.ALLOW and compiled.l7:
            dropped.append((index, compiled.l7))
            continue
        rules.append(compiled)
    return ZtunnelPolicy(policy, action, tuple(rules), tuple(dropped))


def _rule(policy: Resource[Any], index: int, rule: m.Rule) -> ZRule:
    unknown_matches = policy.spec.action is not m.Action.ALLOW  # fail closed on unknown IPs
    l7: list[str] = []
    clauses: list[tuple[ZMatch, ...]] = []
    labels: list[str] = []
    if rule.to:
        matches = []
        for t in rule.to:
            op = t.operation
            for name, values in (
                ("hosts", op.hosts),
                ("notHosts", op.not_hosts),
                ("methods", op.methods),
                ("notMethods", op.not_methods),
                ("paths", op.paths),
                ("notPaths", op.not_paths),
            ):
                if values:
                    l7.append(name)
            checks = []
            for negate, ports in ((False, op.ports), (True, op.not_ports)):
                parsed = _ports(ports)
                if parsed:
                    checks.append(_port_check("notPorts" if negate else "ports", parsed, negate))
            matches.append(ZMatch(tuple(checks)))
        clauses.append(tuple(matches))
        labels.append("to")
    if rule.from_:
        matches = []
        for f in rule.from_:
            s = f.source
            for name, values in (
                ("remoteIpBlocks", s.remote_ip_blocks),
                ("notRemoteIpBlocks", s.not_remote_ip_blocks),
                ("requestPrincipals", s.request_principals),
                ("notRequestPrincipals", s.not_request_principals),
            ):
                if values:
                    l7.append(name)
            matches.append(ZMatch(tuple(_source_checks(s, policy.namespace, unknown_matches))))
        clauses.append(tuple(matches))
        labels.append("from")
    for condition in rule.when:
        key = condition.key
        if key not in L4_WHEN_KEYS:
            l7.append(f"when {key}")
        clauses.append((ZMatch(tuple(_condition_checks(condition, unknown_matches))),))
        labels.append(f"when[{key}]")
    return ZRule(
        rule_name(policy.namespace, policy.name, index),
        tuple(clauses),
        tuple(labels),
        tuple(dict.fromkeys(l7)),
    )


def _source_checks(s: m.Source, namespace: str, unknown_matches: bool) -> list[Check]:
    checks: list[Check] = []
    for negate, values in ((False, s.ip_blocks), (True, s.not_ip_blocks)):
        if values:
            checks.append(
                _ip_check(_name("ipBlocks", negate), "source_ip", values, negate, unknown_matches)
            )
    for negate, values in ((False, s.namespaces), (True, s.not_namespaces)):
        if values:
            checks.append(
                _identity_check(_name("namespaces", negate), _namespace_of, values, negate)
            )
    for negate, values in ((False, s.service_accounts), (True, s.not_service_accounts)):
        if values:
            checks.append(
                _service_account_check(_name("serviceAccounts", negate), values, namespace, negate)
            )
    for negate, values in ((False, s.principals), (True, s.not_principals)):
        if values:
            checks.append(
                _identity_check(_name("principals", negate), _principal_of, values, negate)
            )
    return checks


def _condition_checks(condition: m.Condition, unknown_matches: bool) -> list[Check]:
    key = condition.key
    checks: list[Check] = []
    for negate, values in ((False, condition.values), (True, condition.not_values)):
        if not values:
            continue
        label = f"when[{key}].{'notValues' if negate else 'values'}"
        if key == "source.namespace":
            checks.append(_identity_check(label, _namespace_of, values, negate))
        elif key == "source.principal":
            checks.append(_identity_check(label, _principal_of, values, negate))
        elif key in ("source.ip", "destination.ip"):
            attr = "source_ip" if key == "source.ip" else "destination_ip"
            checks.append(_ip_check(label, attr, values, negate, unknown_matches))
        elif key == "destination.port":
            parsed = _ports(values)
            if parsed:
                checks.append(_port_check(label, parsed, negate))
    return checks


def _name(field_name: str, negate: bool) -> str:
    return f"not{field_name[0].upper()}{field_name[1:]}" if negate else field_name


def _ports(values: Sequence[str]) -> frozenset[int]:
    out = set()
    for value in values:
        if value.isdigit() and int(value) <= 65535:
            out.add(int(value))
    return frozenset(out)


def _port_check(label: str, ports: frozenset[int], negate: bool) -> Check:
    return Check(label, lambda a: (a.destination_port in ports) != negate)


def _ip_check(
    label: str, attr: str, values: Sequence[str], negate: bool, unknown_matches: bool
) -> Check:
    networks = mt.ip_match(values)

    def test(a: Attributes) -> bool:
        address = getattr(a, attr)
        if address is None:
            return unknown_matches
        return networks(address) != negate

    return Check(label, test)


def _principal_of(a: Attributes) -> str | None:
    return a.principal


def _namespace_of(a: Attributes) -> str | None:
    parts = (a.principal or "").split("/")
    return parts[2] if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa" else ""


def _identity_check(
    label: str, read: Callable[[Attributes], str | None], values: Sequence[str], negate: bool
) -> Check:
    match = mt.string_match(values)  # "*" presence, "x*" prefix, "*x" suffix, exact
    return Check(label, lambda a: match(read(a)) != negate)


def _service_account_check(
    label: str, values: Sequence[str], namespace: str, negate: bool
) -> Check:
    wanted = set()
    for value in values:
        ns, slash, account = value.partition("/")
        wanted.add((ns, account) if slash else (namespace, value))

    def test(a: Attributes) -> bool:
        parts = (a.principal or "").split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            return negate  # no identity: a service-account match is false
        return ((parts[2], parts[4]) in wanted) != negate

    return Check(label, test)


# --- PeerAuthentication at ztunnel ----------------------------------------------------


def plaintext_refused(snapshot: ConfigSnapshot, workload: Workload, port: int) -> tuple[bool, str]:
    """Does ztunnel refuse a connection without a peer identity to ``port``, and why."""
    root = snapshot.mesh.root_namespace
    policies = list(snapshot.of_kind("PeerAuthentication"))
    mesh = _oldest(p for p in policies if p.namespace == root and not _selector(p))
    namespace = None
    if workload.namespace != root:
        namespace = _oldest(
            p for p in policies if p.namespace == workload.namespace and not _selector(p)
        )
    own = _oldest(
        p
        for p in policies
        if p.namespace == workload.namespace
        and p.namespace != root
        and _selector(p)
        and all(workload.labels.get(k) == v for k, v in _selector(p).items())
    )
    strict, via = False, "default (PERMISSIVE)"
    if mesh is not None:
        strict, via = _mode(mesh) is _STRICT, _describe("mesh", mesh)
    if namespace is not None and _mode(namespace) is not _UNSET:
        strict, via = _mode(namespace) is _STRICT, _describe("namespace", namespace)
    if own is None:
        return strict, via
    mode = _mode(own)
    if mode is _STRICT:
        strict, via = True, _describe("workload", own)
    elif mode in (_PERMISSIVE, _DISABLE):
        strict, via = False, _describe("workload", own)
    port_modes = {p: s.mode for p, s in own.spec.port_level_mtls.items()}
    converted = False
    if port_modes:
        if mode is _STRICT:
            if any(v in (_PERMISSIVE, _DISABLE) for v in port_modes.values()):
                converted, strict = True, False
        elif mode in (_PERMISSIVE, _DISABLE):
            converted = any(v is _STRICT for v in port_modes.values())
        elif strict:
            # Istio looks for PERMISSIVE ports only here: a DISABLE port stays STRICT.
            if any(v is _PERMISSIVE for v in port_modes.values()):
                converted, strict = True, False
        else:
            converted = any(v is _STRICT for v in port_modes.values())
    if strict:
        return True, via
    if converted:
        refused = _converted_refuses(own, namespace, mesh, port)
        return refused, f"{_describe('workload', own)} portLevelMtls as istiod converts it"
    return False, via


_STRICT, _PERMISSIVE, _DISABLE, _UNSET = (
    m.MtlsMode.STRICT,
    m.MtlsMode.PERMISSIVE,
    m.MtlsMode.DISABLE,
    m.MtlsMode.UNSET,
)


def _converted_refuses(
    own: Resource[Any], namespace: Resource[Any] | None, mesh: Resource[Any] | None, port: int
) -> bool:
    """istiod's ``convertPeerAuthentication``: a DENY for plaintext, matched at ``port``."""
    mode = _mode(own)
    ns_mode = _mode(namespace) if namespace is not None else None
    mesh_mode = _mode(mesh) if mesh is not None else None
    rules: list[bool] = []  # the clauses of one group, for this (plaintext) connection
    groups: list[bool] = []
    if mode is _STRICT:
        rules.append(True)  # notPrincipals: ["*"]: no peer identity
    non_strict = False
    for number, setting in sorted(own.spec.port_level_mtls.items()):
        port_mode = setting.mode
        if port_mode is _STRICT:
            parent_strict = mode is _STRICT or (
                (mode is _UNSET and ns_mode is _STRICT)
                or (ns_mode in (None, _UNSET) and mesh_mode is _STRICT)
            )
            if parent_strict:
                continue  # the parent's STRICT covers it
            groups.append(port == number)
        elif port_mode in (_PERMISSIVE, _DISABLE):
            if mode in (_PERMISSIVE, _DISABLE):
                continue
            if mode is _UNSET and (
                (ns_mode is not None and ns_mode is not _STRICT)
                or (ns_mode is None and mesh_mode is not None and mesh_mode is not _STRICT)
                or (ns_mode is None and mesh_mode is None)
            ):
                continue
            non_strict = True
            rules.append(port != number)
    if mode is _STRICT and not non_strict:
        return False  # the static STRICT policy applies instead (not reached: strict above)
    if not rules and not groups:
        return False
    merge = (mesh_mode is _STRICT and ns_mode in (None, _UNSET, _STRICT)) or ns_mode is _STRICT
    if merge and non_strict:
        rules.append(True)
    if rules:
        groups.append(all(rules))
    return any(groups)


def _mode(policy: Resource[Any]) -> m.MtlsMode:
    spec: m.PeerAuthenticationSpec = policy.spec
    return spec.mtls.mode if spec.mtls is not None else _UNSET


def _selector(policy: Resource[Any]) -> Mapping[str, str]:
    selector = policy.spec.selector
    return selector.match_labels if selector is not None else {}


def _oldest(policies: Iterable[Resource[Any]]) -> Resource[Any] | None:
    return min(policies, key=Resource.age_key, default=None)


def _describe(scope: str, policy: Resource[Any]) -> str:
    return f"{scope} PeerAuthentication {policy.namespace}/{policy.name} {_mode(policy).value}"


# --- waypoints and interoperability ----------------------------------------------------


def waypoint_for(mesh: MeshPolicy, target: WorkloadPolicy) -> str | None:
    """The waypoint traffic to ``target`` may go through: the pod's own or its namespace's
    ``istio.io/use-waypoint``, or a selecting Service's (``none`` opts out). Memoized."""
    workload = target.workload
    waypoints = _WAYPOINTS.table(mesh)
    if workload.ref in waypoints:
        return waypoints[workload.ref]
    labels = _SERVICE_LABELS.get(mesh, None)
    result = None
    if workload.dataplane.waypoint:
        result = f"{workload.dataplane.waypoint} (istio.io/use-waypoint of the pod or namespace)"
    else:
        namespace = mesh.snapshot.namespace_labels.get(workload.namespace, {})
        for service in target.services:
            own = labels.get((service.namespace, service.name), {})
            value = own.get(USE_WAYPOINT, namespace.get(USE_WAYPOINT))
            if value and value != "none":
                result = (
                    f"{value} (istio.io/use-waypoint of Service {service.namespace}/{service.name})"
                )
                break
    waypoints[workload.ref] = result
    return result


_WAYPOINTS: Derived[MeshPolicy, str, str | None] = Derived("waypoints")
_SERVICE_LABELS: Derived[MeshPolicy, None, dict[tuple[str, str], Mapping[str, str]]] = Derived(
    "service labels",
    lambda mesh, _: {(r.namespace, r.name): r.labels for r in mesh.snapshot.of_kind("Service")},
)


def sidecars_speak_hbone(snapshot: ConfigSnapshot, workload: Workload) -> bool:
    """Does ztunnel reach this sidecar over HBONE (mTLS with the client's identity)?

    Only when the injector labelled the pod ``networking.istio.io/tunnel: http``, which it
    does under ``ISTIO_META_ENABLE_HBONE=true`` proxy metadata (Istio's ambient profile).
    """
    if workload.labels.get(TUNNEL_LABEL) == "http":
        return True
    for layer in snapshot.mesh_layers:
        config = layer.body.get("defaultConfig")
        metadata = config.get("proxyMetadata") if isinstance(config, Mapping) else None
        if isinstance(metadata, Mapping) and metadata.get("ISTIO_META_ENABLE_HBONE") == "true":
            return True
    for resource in snapshot.of_kind("IstioOperator"):
        body: Any = resource.document.body
        for part in resource.base_path:
            body = body[part]
        spec = body.get("spec") if isinstance(body, Mapping) else None
        if isinstance(spec, Mapping) and spec.get("profile") == "ambient":
            return True
    return False

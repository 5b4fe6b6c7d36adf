"""AuthorizationPolicy rules compiled to predicates, and per-action rule sets.

One compiled rule is what Istio generates as one Envoy RBAC policy named
``ns[<ns>]-policy[<name>]-rule[<i>]``: an OR of ``from`` clauses AND an OR of ``to``
clauses AND every ``when`` condition. Envoy keeps RBAC policies in a ``std::map``, so it
reports the lexicographically smallest matching name; :class:`RuleSet` does the same.

TCP filter chains get a second compilation (``for_tcp=True``): an ALLOW rule that uses
an HTTP-only attribute is dropped whole, while DENY / AUDIT / CUSTOM rules only lose
those attributes (so they match more) — Istio's ``checkError`` in
``pilot/pkg/security/authz/model/model.go``.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trustmesh.api import models as m
from trustmesh.api.conditions import KeyKind, condition_key, is_http_only_key
from trustmesh.api.resources import Resource
from trustmesh.policy import matchers as mt
from trustmesh.policy.request import Attributes

Test = Callable[[Attributes], bool]


def rule_name(namespace: str, policy: str, index: int) -> str:
    return f"ns[{namespace}]-policy[{policy}]-rule[{index}]"


@dataclass(frozen=True, slots=True)
class Check:
    """One field of one clause: ``label`` names it in traces (``paths``, ``when[source.ip]``)."""

    label: str
    test: Test


Clause = tuple[Check, ...]


@dataclass(frozen=True, slots=True)
class IndexKeys:
    """Values a request must carry for the rule to possibly match (used to skip rules)."""

    exact_paths: frozenset[str] | None = None
    path_prefixes: tuple[str, ...] = ()
    principals: frozenset[str] | None = None
    ports: frozenset[int] | None = None


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    action: m.Action
    policy: Resource[Any] = field(compare=False, repr=False)
    rule_index: int
    sources: tuple[Clause, ...] | None  # None: no ``from`` — any source
    operations: tuple[Clause, ...] | None
    conditions: Clause
    keys: IndexKeys = IndexKeys()
    provider: str | None = None  # CUSTOM only

    def matches(self, a: Attributes) -> bool:
        if self.sources is not None and not any(
            all(c.test(a) for c in clause) for clause in self.sources
        ):
            return False
        if self.operations is not None and not any(
            all(c.test(a) for c in clause) for clause in self.operations
        ):
            return False
        return all(c.test(a) for c in self.conditions)

    def explain(self, a: Attributes) -> tuple[bool, str]:
        """Same checks as :meth:`matches`, also saying which one failed."""
        for part, clauses in (("from", self.sources), ("to", self.operations)):
            if clauses is None:
                continue
            misses = []
            for i, clause in enumerate(clauses):
                failed = next((c.label for c in clause if not c.test(a)), None)
                if failed is None:
                    break
                misses.append(f"{part}[{i}].{failed}")
            else:
                return False, "no match: " + ", ".join(misses)
        for check in self.conditions:
            if not check.test(a):
                return False, f"no match: when {check.label}"
        return True, "matched"


class RuleSet:
    """The rules of one action for one protocol, in Envoy's (name) order, indexed.

    :meth:`first_match` looks only at rules whose required path / principal / port could
    be present in the request; :meth:`explain` walks every rule. A property test holds
    the two to the same answer.
    """

    __slots__ = (
        "_always",
        "_by_path",
        "_by_port",
        "_by_prefix",
        "_by_principal",
        "_prefix_lengths",
        "rules",
    )

    def __init__(self, rules: Iterable[CompiledRule]) -> None:
        self.rules: tuple[CompiledRule, ...] = tuple(sorted(rules, key=lambda r: r.name))
        self._by_path: dict[str, list[int]] = {}
        self._by_prefix: dict[str, list[int]] = {}
        self._by_principal: dict[str, list[int]] = {}
        self._by_port: dict[int, list[int]] = {}
        self._always: list[int] = []
        for position, rule in enumerate(self.rules):
            keys = rule.keys
            if keys.exact_paths is not None:
                for path in keys.exact_paths:
                    self._by_path.setdefault(path, []).append(position)
                for prefix in keys.path_prefixes:
                    self._by_prefix.setdefault(prefix, []).append(position)
            elif keys.principals is not None:
                for principal in keys.principals:
                    self._by_principal.setdefault(principal, []).append(position)
            elif keys.ports is not None:
                for port in keys.ports:
                    self._by_port.setdefault(port, []).append(position)
            else:
                self._always.append(position)
        self._prefix_lengths = sorted({len(p) for p in self._by_prefix})

    def __len__(self) -> int:
        return len(self.rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def candidates(self, a: Attributes) -> list[int]:
        found: list[int] = list(self._always)
        path = a.path
        if path is not None:
            hit = self._by_path.get(path)
            if hit:
                found.extend(hit)
            if self._prefix_lengths:
                by_prefix = self._by_prefix
                for length in self._prefix_lengths[
                    : bisect.bisect_right(self._prefix_lengths, len(path))
                ]:
                    hit = by_prefix.get(path[:length])
                    if hit:
                        found.extend(hit)
        if a.principal is not None and self._by_principal:
            hit = self._by_principal.get(a.principal)
            if hit:
                found.extend(hit)
        if self._by_port:
            hit = self._by_port.get(a.destination_port)
            if hit:
                found.extend(hit)
        return found

    def first_match(self, a: Attributes) -> CompiledRule | None:
        rules = self.rules
        candidates = self.candidates(a)
        if len(candidates) > 1:
            candidates = sorted(set(candidates))
        for position in candidates:
            rule = rules[position]
            if rule.matches(a):
                return rule
        return None

    def explain(self, a: Attributes) -> list[tuple[CompiledRule, bool, str]]:
        return [(rule, *rule.explain(a)) for rule in self.rules]


# --- compiling one policy -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The mesh trust domain and its aliases (``pilot/pkg/security/trustdomain``)."""

    domains: tuple[str, ...] = ("cluster.local",)

    def expand(self, principals: Iterable[str]) -> list[str]:
        """Istio's ``ReplaceTrustDomainAliases``.

        Only well-formed ``TD/ns/NS/sa/SA`` principals whose trust domain is not ``*`` are
        touched: when that domain matches a bundle domain (wildcards allowed on either
        side) or is ``cluster.local``, the principal stands for every bundle domain; a
        bundle domain that the principal's own wildcard domain already covers keeps the
        principal as written. Everything else is kept as written.
        """
        out: list[str] = []
        for principal in principals:
            parts = principal.split("/")
            if len(parts) != 5 or parts[0] == "*":
                out.append(principal)
                continue
            domain = parts[0]
            if domain != "cluster.local" and not any(
                _domains_match(domain, td) for td in self.domains
            ):
                out.append(principal)
                continue
            expanded: list[str] = []
            for td in self.domains:
                candidate = principal if _suffix(td, domain) else "/".join([td, *parts[1:]])
                if candidate not in expanded:
                    expanded.append(candidate)
            out.extend(expanded)
        return out

    def expand_domains(self, values: Iterable[str]) -> list[str]:
        """Istio's ``ExpandTrustDomainAliases`` for ``trustDomains`` values: a value equal
        to a bundle domain stands for every domain of the bundle; others stay as written."""
        out: list[str] = []
        for value in values:
            for domain in self.domains if value in self.domains else (value,):
                if domain not in out:
                    out.append(domain)
        return out


def _prefix(text: str, pattern: str) -> bool:
    return pattern.endswith("*") and text.startswith(pattern[:-1])


def _suffix(text: str, pattern: str) -> bool:
    return pattern.startswith("*") and text.endswith(pattern[1:])


def _domains_match(a: str, b: str) -> bool:
    """Trust domains match exactly, or either side's ``*`` prefix/suffix covers the other."""
    return a == b or b == "*" or _prefix(a, b) or _prefix(b, a) or _suffix(a, b) or _suffix(b, a)


def compile_policy(
    policy: Resource[Any], bundle: TrustBundle, *, for_tcp: bool
) -> list[CompiledRule]:
    """Istio's RBAC policies for one AuthorizationPolicy (for HTTP or for TCP chains)."""
    spec: m.AuthorizationPolicySpec = policy.spec
    action = spec.action
    provider = spec.provider.name if spec.provider else None
    compiled: list[CompiledRule] = []
    for index, rule in enumerate(spec.rules or ()):
        if for_tcp and action is m.Action.ALLOW and _uses_http_only(rule):
            continue  # Istio skips the whole ALLOW rule on TCP filter chains
        builder = _ClauseBuilder(policy.namespace, bundle, action, for_tcp)
        sources = tuple(builder.source(f.source) for f in rule.from_) if rule.from_ else None
        operations = tuple(builder.operation(t.operation) for t in rule.to) if rule.to else None
        conditions = tuple(c for cond in rule.when for c in builder.condition(cond))
        compiled.append(
            CompiledRule(
                name=rule_name(policy.namespace, policy.name, index),
                action=action,
                policy=policy,
                rule_index=index,
                sources=sources,
                operations=operations,
                conditions=conditions,
                keys=_index_keys(rule, bundle, for_tcp),
                provider=provider,
            )
        )
    return compiled


def condition_header_names(policy: Resource[Any]) -> frozenset[str]:
    """Lower-case names of the headers ``policy``'s ``request.headers[NAME]`` conditions read.

    Example: ``when: [{key: "request.headers[X-User]", notValues: [ops]}]`` → ``{"x-user"}``.
    """
    spec: m.AuthorizationPolicySpec = policy.spec
    names: set[str] = set()
    for rule in spec.rules or ():
        for condition in rule.when:
            names.update(n.lower() for n in _header_names(condition.key))
    return frozenset(names)


def reads_host(policy: Resource[Any]) -> bool:
    """Whether ``policy``'s decision can depend on the request's Host: a ``hosts`` /
    ``notHosts`` operation, a ``request.headers[host]`` (or ``[:authority]``) condition, or
    a CUSTOM action, whose external authorizer is handed the Host. Where one applies,
    trustmesh's host guard refuses an ambiguous Host first (:mod:`trustmesh.policy.headers`).
    """
    spec: m.AuthorizationPolicySpec = policy.spec
    if spec.action is m.Action.CUSTOM:
        return True
    for rule in spec.rules or ():
        if any(t.operation.hosts or t.operation.not_hosts for t in rule.to):
            return True
        for condition in rule.when:
            if any(n.lower() in ("host", ":authority") for n in _header_names(condition.key)):
                return True
    return False


def _header_names(key: str) -> tuple[str, ...]:
    """The header a ``request.headers[NAME]`` key reads; () for every other key."""
    known = condition_key(key)
    return known.names if known is not None and known.kind is KeyKind.REQUEST_HEADER else ()


def _uses_http_only(rule: m.Rule) -> bool:
    for f in rule.from_:
        if f.source.request_principals or f.source.not_request_principals:
            return True
    for t in rule.to:
        op = t.operation
        if op.hosts or op.not_hosts or op.methods or op.not_methods or op.paths or op.not_paths:
            return True
    return any(is_http_only_key(c.key) for c in rule.when)


def _index_keys(rule: m.Rule, bundle: TrustBundle, for_tcp: bool) -> IndexKeys:
    if rule.to and not for_tcp:
        ops = [t.operation for t in rule.to]
        if all(op.paths and not op.not_paths for op in ops):
            values = [v for op in ops for v in op.paths]
            if all(_indexable_path(v) for v in values):
                return IndexKeys(
                    exact_paths=frozenset(v for v in values if not v.endswith("*")),
                    path_prefixes=tuple(v[:-1] for v in values if v.endswith("*")),
                )
    if rule.from_:
        sources = [f.source for f in rule.from_]
        if all(s.principals for s in sources):
            values = bundle.expand(v for s in sources for v in s.principals)
            if all("*" not in v for v in values):
                return IndexKeys(principals=frozenset(values))
    if rule.to:
        ops = [t.operation for t in rule.to]
        if all(op.ports for op in ops):
            return IndexKeys(ports=frozenset(int(p) for op in ops for p in op.ports))
    return IndexKeys()


def _indexable_path(value: str) -> bool:
    if mt.is_path_template(value) or value.startswith("*"):
        return False
    return "*" not in value[:-1] and value != "*"


class _ClauseBuilder:
    """Turns one source / operation / condition into checks, per Istio's generators."""

    def __init__(self, namespace: str, bundle: TrustBundle, action: m.Action, for_tcp: bool):
        self.namespace = namespace
        self.bundle = bundle
        self.for_tcp = for_tcp
        # An address the caller did not give is unknown: fail closed (ALLOW rules do not
        # match it; DENY / CUSTOM / AUDIT rules do).
        self.unknown_ip_matches = action is not m.Action.ALLOW

    def source(self, s: m.Source) -> Clause:
        checks: list[Check] = []
        add = checks.append
        for negate, values in ((False, s.principals), (True, s.not_principals)):
            if values:
                add(
                    self._principal_check(
                        _label("principals", negate), self.bundle.expand(values), negate
                    )
                )
        for negate, values in ((False, s.namespaces), (True, s.not_namespaces)):
            if values:
                add(
                    self._peer_check(
                        _label("namespaces", negate), mt.namespace_match(values), negate
                    )
                )
        for negate, values in ((False, s.service_accounts), (True, s.not_service_accounts)):
            if values:
                match = mt.service_account_match(values, self.namespace)
                add(self._peer_check(_label("serviceAccounts", negate), match, negate))
        for negate, values in ((False, s.trust_domains), (True, s.not_trust_domains)):
            if values:
                match = mt.trust_domain_match(self.bundle.expand_domains(values))
                add(self._peer_check(_label("trustDomains", negate), match, negate))
        for negate, values in ((False, s.ip_blocks), (True, s.not_ip_blocks)):
            if values:
                add(self._ip_check(_label("ipBlocks", negate), "source_ip", values, negate))
        for negate, values in ((False, s.remote_ip_blocks), (True, s.not_remote_ip_blocks)):
            if values:
                add(self._ip_check(_label("remoteIpBlocks", negate), "remote_ip", values, negate))
        if not self.for_tcp:
            for negate, values in ((False, s.request_principals), (True, s.not_request_principals)):
                if values:
                    add(
                        self._request_principal_check(
                            _label("requestPrincipals", negate), values, negate
                        )
                    )
        return tuple(checks)

    def operation(self, op: m.Operation) -> Clause:
        checks: list[Check] = []
        for negate, values in ((False, op.ports), (True, op.not_ports)):
            if values:
                checks.append(_port_check(_label("ports", negate), values, negate))
        if self.for_tcp:
            return tuple(checks)
        fields: tuple[tuple[str, Callable[[Attributes], str | None], Any, Any], ...] = (
            ("hosts", _read_host, op.hosts, op.not_hosts),
            ("methods", _read_method, op.methods, op.not_methods),
            ("paths", _read_path, op.paths, op.not_paths),
        )
        for name, read, positive, negative in fields:
            for negate, values in ((False, positive), (True, negative)):
                if not values:
                    continue
                if name == "hosts":
                    match = mt.string_match(values, ignore_case=True, star_is_presence=True)
                elif name == "methods":
                    match = mt.string_match(values, star_is_presence=True)
                else:
                    match = mt.path_match(values)
                checks.append(_read_check(_label(name, negate), read, match, negate))
        return tuple(checks)

    def condition(self, cond: m.Condition) -> list[Check]:
        key = cond.key
        if self.for_tcp and is_http_only_key(key):
            return []
        out: list[Check] = []
        for negate, values in ((False, cond.values), (True, cond.not_values)):
            if values:
                label = f"when[{key}].{'notValues' if negate else 'values'}"
                out.append(self._condition_check(label, key, values, negate))
        return out

    def _condition_check(self, label: str, key: str, values: Sequence[str], negate: bool) -> Check:
        known = condition_key(key)
        kind = known.kind if known is not None else KeyKind.ENVOY_FILTER_METADATA
        match kind:
            case KeyKind.SOURCE_PRINCIPAL:
                return self._principal_check(label, self.bundle.expand(values), negate)
            case KeyKind.SOURCE_NAMESPACE:
                return self._peer_check(label, mt.namespace_match(values), negate)
            case KeyKind.SOURCE_SERVICE_ACCOUNT:
                match = mt.service_account_match(values, self.namespace)
                return self._peer_check(label, match, negate)
            case KeyKind.SOURCE_TRUST_DOMAIN:
                match = mt.trust_domain_match(self.bundle.expand_domains(values))
                return self._peer_check(label, match, negate)
            case KeyKind.SOURCE_IP:
                return self._ip_check(label, "source_ip", values, negate)
            case KeyKind.REMOTE_IP:
                return self._ip_check(label, "remote_ip", values, negate)
            case KeyKind.DESTINATION_IP:
                return self._ip_check(label, "destination_ip", values, negate)
            case KeyKind.DESTINATION_PORT:
                return _port_check(label, values, negate)
            case KeyKind.CONNECTION_SNI:
                return _read_check(label, _read_sni, mt.string_match(values), negate)
            case KeyKind.REQUEST_PRINCIPAL:
                return self._request_principal_check(label, values, negate)
            case KeyKind.REQUEST_AUDIENCES:
                return Check(label, _negated(_claim_test(("aud",), values), negate))
            case KeyKind.REQUEST_PRESENTER:
                return Check(label, _negated(_claim_test(("azp",), values), negate))
            case KeyKind.REQUEST_HEADER:
                assert known is not None
                name = known.names[0].lower()
                headers = mt.string_match(values, star_is_presence=True)
                return Check(
                    label, _negated(lambda a: headers.any_of(a.headers.get(name, ())), negate)
                )
            case KeyKind.REQUEST_CLAIM:
                assert known is not None
                return Check(label, _negated(_claim_test(known.names, values), negate))
            case KeyKind.ENVOY_FILTER_METADATA:
                # experimental.envoy.filters.* reads filter metadata trustmesh cannot know
                # offline (and an unknown key was refused by validation): fail closed like
                # an unknown address.
                unknown = self.unknown_ip_matches
                return Check(f"{label} (not evaluated offline)", lambda a: unknown)

    def _principal_check(self, label: str, values: Sequence[str], negate: bool) -> Check:
        # Envoy's `authenticated` matcher is false without a TLS peer; NOT flips it.
        return _read_check(label, _read_principal, mt.string_match(values), negate)

    def _peer_check(self, label: str, match: mt.StringMatch, negate: bool) -> Check:
        return _read_check(label, _read_principal, match, negate)

    def _request_principal_check(self, label: str, values: Sequence[str], negate: bool) -> Check:
        match = mt.request_principal_match(values)
        return Check(label, _negated(lambda a: match(a.issuer, a.subject), negate))

    def _ip_check(self, label: str, attr: str, values: Sequence[str], negate: bool) -> Check:
        networks = mt.ip_match(values)
        unknown = self.unknown_ip_matches

        def test(a: Attributes) -> bool:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = getattr(a, attr)
            if address is None:
                return unknown
            return networks(address) != negate

        return Check(label, test)


def _read_host(a: Attributes) -> str | None:
    return a.host


def _read_method(a: Attributes) -> str | None:
    return a.method


def _read_path(a: Attributes) -> str | None:
    return a.path


def _read_sni(a: Attributes) -> str | None:
    return a.sni


def _read_principal(a: Attributes) -> str | None:
    return a.principal


def _read_check(
    label: str, read: Callable[[Attributes], str | None], match: mt.StringMatch, negate: bool
) -> Check:
    if negate:
        return Check(label, lambda a: not match(read(a)))
    return Check(label, lambda a: match(read(a)))


def _port_check(label: str, values: Sequence[str], negate: bool) -> Check:
    ports = frozenset(int(v) for v in values)
    if negate:
        return Check(label, lambda a: a.destination_port not in ports)
    return Check(label, lambda a: a.destination_port in ports)


def _label(name: str, negate: bool) -> str:
    return f"not{name[0].upper()}{name[1:]}" if negate else name


def _negated(test: Test, negate: bool) -> Test:
    if not negate:
        return test
    return lambda a: not test(a)


def _claim_test(path: tuple[str, ...], values: Sequence[str]) -> Test:
    match = mt.string_match(values)

    def test(a: Attributes) -> bool:
        value: Any = a.claims
        for part in path:
            if not isinstance(value, dict) or part not in value:
                return False
            value = value[part]
        if isinstance(value, str):
            return match(value)
        if isinstance(value, list):
            return any(isinstance(v, str) and match(v) for v in value)
        return False

    return test

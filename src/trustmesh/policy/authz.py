"""AuthorizationPolicy rules as the evaluator runs them, and per-action rule sets.

Each rule is compiled once, to a :class:`~trustmesh.policy.rule_tree.RuleTree` (with
Istio's rule-dropping for TCP chains and bad values already applied); this module
interprets that tree. One compiled rule is what Istio generates as one Envoy RBAC policy
named ``ns[<ns>]-policy[<name>]-rule[<i>]``: an OR of ``from`` clauses AND an OR of ``to``
clauses AND every ``when`` condition. Envoy keeps RBAC policies in a ``std::map``, so it
reports the lexicographically smallest matching name; :class:`RuleSet` does the same.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from trustmesh.api import models as m
from trustmesh.api.resources import Resource
from trustmesh.policy import matchers as mt
from trustmesh.policy import rule_tree as rt
from trustmesh.policy.request import Attributes
from trustmesh.policy.rule_tree import TrustBundle, rule_name

__all__ = [
    "Check",
    "CompiledRule",
    "IndexKeys",
    "Miss",
    "RuleOutcome",
    "RuleSet",
    "TrustBundle",
    "compile_policy",
    "condition_header_names",
    "miss_text",
    "predicate",
    "reads_host",
    "rule_name",
    "rules_of_trees",
]

Test = Callable[[Attributes], bool]


@dataclass(frozen=True, slots=True)
class Check:
    """One field of one clause: ``label`` names it in traces (``paths``, ``when[source.ip]``),
    ``test`` is the evaluator's reading of the field's matcher (``tree_field``)."""

    label: str
    test: Test
    tree_field: rt.Field | None = field(default=None, compare=False, repr=False)


Clause = tuple[Check, ...]


@dataclass(frozen=True, slots=True)
class IndexKeys:
    """Values a request must carry for the rule to possibly match (used to skip rules)."""

    exact_paths: frozenset[str] | None = None
    path_prefixes: tuple[str, ...] = ()
    principals: frozenset[str] | None = None
    ports: frozenset[int] | None = None


# Why a rule did not match: ``(part, entry, label)`` — the first failing field of
# ``from[entry]`` / ``to[entry]`` (every entry failed), or the failing ``when`` field
# (part "when"). Plain tuples: a full trace makes one per rule.
Miss = tuple[str, int, str]


def miss_text(miss: Miss) -> str:
    part, entry, label = miss
    return f"when {label}" if part == "when" else f"{part}[{entry}].{label}"


class RuleOutcome(NamedTuple):
    """One rule's answer for one request, as a trace event."""

    rule: CompiledRule
    misses: tuple[Miss, ...] = ()

    @property
    def matched(self) -> bool:
        return not self.misses

    def text(self) -> str:
        if not self.misses:
            return "matched"
        if len(self.misses) == 1:
            return "no match: " + miss_text(self.misses[0])
        return "no match: " + ", ".join([miss_text(miss) for miss in self.misses])


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
    tree: rt.RuleTree | None = field(default=None, compare=False, repr=False)

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

    def outcome(self, a: Attributes) -> RuleOutcome:
        """Same checks as :meth:`matches`, also saying which one failed."""
        for part, clauses in (("from", self.sources), ("to", self.operations)):
            if clauses is None:
                continue
            misses = []
            for i, clause in enumerate(clauses):
                failed = next((c.label for c in clause if not c.test(a)), None)
                if failed is None:
                    break
                misses.append((part, i, failed))
            else:
                return _outcome(RuleOutcome, (self, tuple(misses)))
        for check in self.conditions:
            if not check.test(a):
                return _outcome(RuleOutcome, (self, (("when", 0, check.label),)))
        return _outcome(RuleOutcome, (self, ()))

    def explain(self, a: Attributes) -> tuple[bool, str]:
        outcome = self.outcome(a)
        return outcome.matched, outcome.text()


# A full trace makes a RuleOutcome per rule: tuple.__new__ skips the NamedTuple's
# keyword-handling constructor, half the cost.
_outcome = tuple.__new__


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

    def outcomes(self, a: Attributes) -> list[RuleOutcome]:
        """Every rule's answer, in order (for traces)."""
        return [rule.outcome(a) for rule in self.rules]

    def explain(self, a: Attributes) -> list[tuple[CompiledRule, bool, str]]:
        return [(o.rule, o.matched, o.text()) for o in self.outcomes(a)]


# --- compiling one policy -------------------------------------------------------------


def compile_policy(
    policy: Resource[Any], bundle: TrustBundle, *, for_tcp: bool
) -> list[CompiledRule]:
    """Istio's RBAC policies for one AuthorizationPolicy (for HTTP or for TCP chains)."""
    return rules_of_trees(policy, rt.compile_rules(policy, bundle, for_tcp=for_tcp), for_tcp)


def rules_of_trees(
    policy: Resource[Any], compiled: rt.CompiledRules, for_tcp: bool
) -> list[CompiledRule]:
    """The evaluator's rules for ``policy``'s trees (compiled with its own action)."""
    spec: m.AuthorizationPolicySpec = policy.spec
    provider = spec.provider.name if spec.provider else None
    return [
        CompiledRule(
            name=tree.name,
            action=spec.action,
            policy=policy,
            rule_index=tree.index,
            sources=_clauses(tree.sources),
            operations=_clauses(tree.operations),
            conditions=_clause(tree.when),
            keys=_index_keys(tree, for_tcp),
            provider=provider,
            tree=tree,
        )
        for tree in compiled.rules
    ]


def _clauses(clauses: tuple[rt.Clause, ...] | None) -> tuple[Clause, ...] | None:
    return None if clauses is None else tuple(_clause(c) for c in clauses)


def _clause(fields: rt.Clause) -> Clause:
    return tuple(Check(f.label, predicate(f.matcher), f) for f in fields)


def condition_header_names(trees: Iterable[rt.RuleTree]) -> frozenset[str]:
    """Lower-case names of the headers the rule trees' ``request.headers[NAME]``
    conditions read (a policy's HTTP trees: a dropped rule reads nothing).

    Example: ``when: [{key: "request.headers[X-User]", notValues: [ops]}]`` → ``{"x-user"}``.
    """
    return frozenset(
        leaf.name.lower()
        for tree in trees
        for leaf in tree.leaves()
        if isinstance(leaf, rt.RequestHeader)
    )


def reads_host(policy: Resource[Any], trees: Iterable[rt.RuleTree]) -> bool:
    """Whether ``policy``'s decision can depend on the request's Host: a ``hosts`` /
    ``notHosts`` operation, a ``request.headers[host]`` (or ``[:authority]``) condition in
    one of its (HTTP) rule trees, or a CUSTOM action, whose external authorizer is handed
    the Host. Where one applies, trustmesh's host guard refuses an ambiguous Host first
    (:mod:`trustmesh.policy.headers`).
    """
    spec: m.AuthorizationPolicySpec = policy.spec
    if spec.action is m.Action.CUSTOM:
        return True
    return any(
        isinstance(leaf, rt.Host)
        or (isinstance(leaf, rt.RequestHeader) and leaf.name.lower() in ("host", ":authority"))
        for tree in trees
        for leaf in tree.leaves()
    )


# --- the rule index ---------------------------------------------------------------------


def _index_keys(tree: rt.RuleTree, for_tcp: bool) -> IndexKeys:
    """The paths, else principals, else ports every ``to`` (``from``) entry requires."""
    if tree.operations and not for_tcp:
        paths = [_positive(clause, "paths") for clause in tree.operations]
        if all(p is not None for p in paths) and not any(
            f.name == "paths" and f.negated for c in tree.operations for f in c
        ):
            leaves = [leaf for p in paths for leaf in p or ()]
            if all(isinstance(v, rt.Path) and v.pattern.kind in _INDEXED for v in leaves):
                patterns = [v.pattern for v in leaves if isinstance(v, rt.Path)]
                return IndexKeys(
                    exact_paths=frozenset(p.value for p in patterns if p.kind is _EXACT),
                    path_prefixes=tuple(p.value for p in patterns if p.kind is _PREFIX),
                )
    if tree.sources:
        principals = [_positive(clause, "principals") for clause in tree.sources]
        if all(p is not None for p in principals):
            leaves = [leaf for p in principals for leaf in p or ()]
            if all(
                isinstance(v, rt.Principal)
                and v.pattern.kind is _EXACT
                and "*" not in v.pattern.value
                for v in leaves
            ):
                return IndexKeys(
                    principals=frozenset(
                        v.pattern.value for v in leaves if isinstance(v, rt.Principal)
                    )
                )
    if tree.operations:
        ports = [_positive(clause, "ports") for clause in tree.operations]
        if all(p is not None for p in ports):
            leaves = [leaf for p in ports for leaf in p or ()]
            return IndexKeys(
                ports=frozenset(v.port for v in leaves if isinstance(v, rt.DestinationPort))
            )
    return IndexKeys()


_EXACT, _PREFIX = rt.TextKind.EXACT, rt.TextKind.PREFIX
_INDEXED = (_EXACT, _PREFIX)


def _positive(clause: rt.Clause, name: str) -> tuple[rt.Matcher, ...] | None:
    """The alternatives of ``clause``'s field ``name`` (not its not-form: an OR of
    values), or None."""
    for f in clause:
        if f.name == name and not f.negated and isinstance(f.matcher, rt.Or):
            return f.matcher.items
    return None


# --- interpreting matchers --------------------------------------------------------------


def predicate(matcher: rt.Matcher) -> Test:
    """The evaluator's test for ``matcher``. An OR of values of one attribute becomes one
    set lookup (:class:`~trustmesh.policy.matchers.StringMatch`), as fast as one value."""
    match matcher:
        case rt.And(items):
            tests = tuple(predicate(item) for item in items)
            if len(tests) == 1:
                return tests[0]
            return lambda a: all(test(a) for test in tests)
        case rt.Or(items):
            merged = _merged(items)
            if merged is not None:
                return merged
            tests = tuple(predicate(item) for item in items)
            if len(tests) == 1:
                return tests[0]
            return lambda a: any(test(a) for test in tests)
        case rt.Not(item):
            test = predicate(item)
            return lambda a: not test(a)
        case _:
            merged = _merged((matcher,))
            if merged is not None:
                return merged
            return _leaf(matcher)


def _always(a: Attributes) -> bool:
    return True


def _never(a: Attributes) -> bool:
    return False


def _leaf(leaf: rt.Matcher) -> Test:
    match leaf:
        case rt.RequestPrincipal():
            return _request_principals((leaf,))
        case rt.JwtClaim(claims, values):
            return _claim_test(claims, _string_match(values))
        case rt.FilterMetadata(offline=offline):
            # Filter metadata trustmesh cannot know offline: fail closed.
            return _always if offline else _never
    raise TypeError(f"no evaluator for {leaf!r}")  # pragma: no cover - closed set


# Leaves an OR of which becomes one test, by the attribute they read.
_FAMILY: dict[type, str] = {
    rt.Principal: "peer",
    rt.SourceNamespace: "peer",
    rt.ServiceAccount: "peer",
    rt.TrustDomain: "peer",
    rt.Path: "path",
    rt.PathTemplate: "path",
    rt.Host: "host",
    rt.Method: "method",
    rt.ConnectionSni: "sni",
    rt.DestinationPort: "port",
    rt.SourceIp: "source_ip",
    rt.RemoteIp: "remote_ip",
    rt.DestinationIp: "destination_ip",
    rt.RequestHeader: "header",
    rt.RequestPrincipal: "request_principal",
}


def _merged(items: Sequence[rt.Matcher]) -> Test | None:
    """One test for an OR of leaves reading the same attribute; None for anything else."""
    families = {_FAMILY.get(type(i)) for i in items}
    if len(families) != 1:
        return None
    family = families.pop()
    match family:
        case "peer":
            return _read(_read_principal, _peer_match(items))
        case "path":
            return _read(_read_path, _path_match(items))
        case "host":
            hosts = [i.pattern for i in items if isinstance(i, rt.Host)]
            return _read(_read_host, _string_match(hosts, ignore_case=True))
        case "method":
            methods = [i.pattern for i in items if isinstance(i, rt.Method)]
            return _read(_read_method, _string_match(methods))
        case "sni":
            names = [i.pattern for i in items if isinstance(i, rt.ConnectionSni)]
            return _read(_read_sni, _string_match(names))
        case "port":
            ports = frozenset(i.port for i in items if isinstance(i, rt.DestinationPort))
            return lambda a: a.destination_port in ports
        case "source_ip" | "remote_ip" | "destination_ip":
            return _ip_test(family, items)
        case "header":
            headers = [i for i in items if isinstance(i, rt.RequestHeader)]
            name = headers[0].name.lower()
            if any(h.name.lower() != name for h in headers):
                return None
            match = _string_match([h.pattern for h in headers])
            return lambda a: match.any_of(a.headers.get(name, ()))
        case "request_principal":
            return _request_principals([i for i in items if isinstance(i, rt.RequestPrincipal)])
    return None


def _read(read: Callable[[Attributes], str | None], match: mt.StringMatch) -> Test:
    return lambda a: match(read(a))


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


_string_match = mt.pattern_match


def _peer_match(items: Sequence[rt.Matcher]) -> mt.StringMatch:
    """Peer-identity leaves over the principal ``TD/ns/NS/sa/SA`` (no ``spiffe://``)."""
    patterns: list[rt.StringPattern] = []
    regexes: list[re.Pattern[str]] = []
    for item in items:
        match item:
            case rt.Principal(pattern):
                patterns.append(pattern)
            case rt.SourceNamespace(value):
                inner = ".*".join(re.escape(part) for part in value.split("*"))
                regexes.append(re.compile(f".*/ns/{inner}/.*", re.DOTALL))
            case rt.ServiceAccount(namespace, account):
                regexes.append(
                    re.compile(
                        f".+/ns/{re.escape(namespace)}/(?:.+/|)sa/{re.escape(account)}(?:/.+)?",
                        re.DOTALL,
                    )
                )
            case rt.TrustDomain(value):
                # ``*`` any peer identity; ``td`` the prefix ``td/``; one ``*`` a wildcard
                # inside the trust domain (no ``/``).
                if value == "*":
                    patterns.append(rt.StringPattern(rt.TextKind.PRESENT))
                elif "*" not in value:
                    patterns.append(rt.StringPattern(rt.TextKind.PREFIX, f"{value}/"))
                else:
                    before, _, after = value.partition("*")
                    regexes.append(re.compile(f"{re.escape(before)}[^/]*{re.escape(after)}/.*"))
    return _string_match(patterns, regexes=regexes)


def _path_match(items: Sequence[rt.Matcher]) -> mt.StringMatch:
    patterns = [i.pattern for i in items if isinstance(i, rt.Path)]
    templates = [
        mt.path_template_regex(i.template) for i in items if isinstance(i, rt.PathTemplate)
    ]
    return _string_match(patterns, regexes=templates)


def _ip_test(attribute: str, items: Sequence[rt.Matcher]) -> Test | None:
    leaves = [i for i in items if isinstance(i, (rt.SourceIp, rt.RemoteIp, rt.DestinationIp))]
    unknown = leaves[0].if_unknown
    if any(leaf.if_unknown != unknown for leaf in leaves):
        return None
    networks = mt.IpMatch(
        tuple(
            ipaddress.ip_network(f"{leaf.cidr.address}/{leaf.cidr.prefix_len}", strict=False)
            for leaf in leaves
        )
    )

    def test(a: Attributes) -> bool:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = getattr(a, attribute)
        if address is None:
            return unknown
        return networks(address)

    return test


def _request_principals(items: Sequence[rt.RequestPrincipal]) -> Test:
    match = mt.RequestPrincipalMatch(
        tuple((_string_match((i.issuer,)), _string_match((i.subject,))) for i in items)
    )
    return lambda a: match(a.issuer, a.subject)


def _claim_test(path: tuple[str, ...], match: mt.StringMatch) -> Test:
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

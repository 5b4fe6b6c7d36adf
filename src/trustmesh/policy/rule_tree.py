"""AuthorizationPolicy rules compiled once, to a closed tree of matcher values.

One rule of an AuthorizationPolicy becomes one :class:`RuleTree`: its ``from`` entries
(each an AND of :class:`Field`), its ``to`` entries (likewise) and its ``when``
conditions, every field a tree of :data:`Matcher` values (:class:`And` / :class:`Or` /
:class:`Not` over leaves such as :class:`Principal`, :class:`Path`, :class:`JwtClaim`).
The offline evaluator (:mod:`trustmesh.policy.authz`) interprets these trees, the Envoy
translation (:mod:`trustmesh.xds.rbac`) maps each matcher type to one Envoy RBAC message,
the analyzer inspects them; nobody else reads a rule's raw fields.

Everything Istio's RBAC builder decides (``pilot/pkg/security/authz/model``) is decided
here, once, by :func:`compile_rules`:

* the matcher per value (``*`` any non-empty value, ``x*`` prefix, ``*x`` suffix, else
  exact; hosts, methods and headers read ``*`` as "present"; path templates);
* trust-domain aliases (:class:`TrustBundle`);
* which side of Envoy's Policy a ``when`` key goes to (:attr:`Field.side`);
* Istio's ``checkError``: a value its generator refuses — an HTTP-only attribute on a TCP
  chain, a malformed CIDR or port, a filter-metadata key without ``[...]`` — drops the
  whole rule for ALLOW (a narrower allow) and only that value (or key) for DENY / AUDIT /
  CUSTOM (a wider deny); an unknown ``when`` key drops the rule for every action. What
  was dropped, and why, is in :attr:`CompiledRules.dropped`;
* what the evaluator assumes for what it cannot know offline (an unknown address,
  filter metadata): fail closed, so ALLOW rules do not match it and the others do.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from trustmesh.api import models as m
from trustmesh.api.conditions import ConditionKey, KeyKind, Side, condition_key
from trustmesh.api.resources import Resource

__all__ = [
    "And",
    "Cidr",
    "CompiledRules",
    "ConnectionSni",
    "DestinationIp",
    "DestinationPort",
    "Dropped",
    "Field",
    "FilterMetadata",
    "Host",
    "JwtClaim",
    "Matcher",
    "Method",
    "Not",
    "Or",
    "Path",
    "PathTemplate",
    "Principal",
    "RemoteIp",
    "RequestHeader",
    "RequestPrincipal",
    "RuleTree",
    "ServiceAccount",
    "SourceIp",
    "SourceNamespace",
    "StringPattern",
    "TextKind",
    "TrustBundle",
    "TrustDomain",
    "Unsupported",
    "compile_rules",
    "leaves",
    "request_principal",
    "rule_name",
]


def rule_name(namespace: str, policy: str, index: int) -> str:
    """Istio's name of one rule's Envoy RBAC policy."""
    return f"ns[{namespace}]-policy[{policy}]-rule[{index}]"


class Unsupported(ValueError):
    """Istio's generator refuses this value (or key) on this filter chain."""


# --- values -----------------------------------------------------------------------------


class TextKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    NON_EMPTY = "non-empty"  # a written ``*``: Envoy's regex ``.+``
    PRESENT = "present"  # a written ``*`` on a header, host or method: present_match


@dataclass(frozen=True, slots=True)
class StringPattern:
    """One policy value as Istio's ``StringMatcher`` reads it: ``*`` alone, ``*x``, ``x*``
    or exact (a ``*`` elsewhere is a literal character)."""

    kind: TextKind
    value: str = ""

    @classmethod
    def of(cls, written: str, *, star: TextKind = TextKind.NON_EMPTY) -> StringPattern:
        if written == "*":
            return cls(star)
        if written.startswith("*"):
            return cls(TextKind.SUFFIX, written[1:])
        if written.endswith("*"):
            return cls(TextKind.PREFIX, written[:-1])
        return cls(TextKind.EXACT, written)


_PREFIX_BITS = re.compile(r"0|[1-9][0-9]{0,2}")
_PORT = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class Cidr:
    """Istio ``AddrStrToCidrRange`` (Go ``netip``): ``a.b.c.d`` → /32, host bits kept."""

    address: str
    prefix_len: int

    @classmethod
    def parse(cls, value: str) -> Cidr:
        address, slash, bits = value.partition("/")
        try:
            if not slash:
                parsed = ipaddress.ip_address(address.partition("%")[0])
                return cls(str(parsed), parsed.max_prefixlen)
            parsed = ipaddress.ip_address(address)  # a zone is not allowed in a prefix
        except ValueError:
            raise Unsupported(f"invalid IP address {value!r}") from None
        if not _PREFIX_BITS.fullmatch(bits) or int(bits) > parsed.max_prefixlen:
            raise Unsupported(f"invalid CIDR prefix length in {value!r}")
        return cls(str(parsed), int(bits))


def _port(value: str) -> int:
    """Istio ``convertToPort``: a decimal 0..65535."""
    if not _PORT.fullmatch(value) or int(value) > 65535:
        raise Unsupported(f"invalid port {value!r}")
    return int(value)


# --- matchers ---------------------------------------------------------------------------
# Leaves read one attribute of the connection or request. ``if_unknown`` is what the
# offline evaluator answers when the attribute is not known (Envoy always knows it).


@dataclass(frozen=True, slots=True)
class Principal:
    """The peer certificate's SPIFFE identity ``TD/ns/NS/sa/SA`` (``source.principals``)."""

    pattern: StringPattern


@dataclass(frozen=True, slots=True)
class SourceNamespace:
    """The peer identity's namespace; every ``*`` in ``value`` stands for any text."""

    value: str


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """The peer identity's namespace and service account (any trust domain)."""

    namespace: str
    account: str


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """The peer identity's trust domain: ``*`` any, ``td`` exact, one ``*`` a wildcard."""

    value: str


@dataclass(frozen=True, slots=True)
class SourceIp:
    """The connection's peer address (``ipBlocks``, ``source.ip``)."""

    cidr: Cidr
    if_unknown: bool = False


@dataclass(frozen=True, slots=True)
class RemoteIp:
    """The client address, from X-Forwarded-For where trusted (``remoteIpBlocks``)."""

    cidr: Cidr
    if_unknown: bool = False


@dataclass(frozen=True, slots=True)
class DestinationIp:
    cidr: Cidr
    if_unknown: bool = False


@dataclass(frozen=True, slots=True)
class DestinationPort:
    port: int


@dataclass(frozen=True, slots=True)
class ConnectionSni:
    pattern: StringPattern


@dataclass(frozen=True, slots=True)
class Host:
    """The request's Host / :authority, case-insensitive."""

    pattern: StringPattern


@dataclass(frozen=True, slots=True)
class Method:
    pattern: StringPattern


@dataclass(frozen=True, slots=True)
class Path:
    """The normalized path without its query."""

    pattern: StringPattern


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """Envoy's uri_template: ``{*}`` one segment, ``{**}`` any number (written form)."""

    template: str


@dataclass(frozen=True, slots=True)
class RequestHeader:
    """A request header by ``name`` (as written; names are case-insensitive)."""

    name: str
    pattern: StringPattern


@dataclass(frozen=True, slots=True)
class RequestPrincipal:
    """A verified JWT's ``iss`` and ``sub``."""

    issuer: StringPattern
    subject: StringPattern


@dataclass(frozen=True, slots=True)
class JwtClaim:
    """A verified JWT claim at ``claims`` (a path): a string matching one of ``values``, or
    a list with such an element (``request.auth.claims``, ``audiences``, ``presenter``)."""

    claims: tuple[str, ...]
    values: tuple[StringPattern, ...]


@dataclass(frozen=True, slots=True)
class FilterMetadata:
    """``experimental.envoy.filters.*``: another filter's dynamic metadata. ``values``
    pairs a pattern with whether it matches an element of a list. Unknowable offline:
    the evaluator answers ``offline``."""

    filter: str
    key: str
    values: tuple[tuple[StringPattern, bool], ...]
    offline: bool


@dataclass(frozen=True, slots=True)
class And:
    items: tuple[Matcher, ...]


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[Matcher, ...]


@dataclass(frozen=True, slots=True)
class Not:
    item: Matcher


Leaf = (
    Principal
    | SourceNamespace
    | ServiceAccount
    | TrustDomain
    | SourceIp
    | RemoteIp
    | DestinationIp
    | DestinationPort
    | ConnectionSni
    | Host
    | Method
    | Path
    | PathTemplate
    | RequestHeader
    | RequestPrincipal
    | JwtClaim
    | FilterMetadata
)
Matcher = And | Or | Not | Leaf


def leaves(matcher: Matcher) -> Iterator[Leaf]:
    """The leaf matchers of ``matcher``, in order, under any And / Or / Not."""
    if isinstance(matcher, And | Or):
        for item in matcher.items:
            yield from leaves(item)
    elif isinstance(matcher, Not):
        yield from leaves(matcher.item)
    else:
        yield matcher


@dataclass(frozen=True, slots=True)
class Field:
    """One written field of a rule (``principals``, ``notPaths``, ``when[k].values``):
    its trace ``label``, the side of Envoy's Policy it belongs to, and its matcher.

    Where it was written, for readers that show it (the analyzer, the graph): ``name``
    the field without ``not`` (``paths``; ``values`` for a condition), ``condition`` the
    ``when`` key, ``written`` the values as written (before trust domain aliases are
    added), ``negated`` for
    ``notPaths`` / ``notValues``. They do not take part in equality."""

    label: str
    side: Side
    matcher: Matcher
    name: str = field(default="", compare=False)
    condition: ConditionKey | None = field(default=None, compare=False)
    written: tuple[str, ...] = field(default=(), compare=False)
    negated: bool = field(default=False, compare=False)


Clause = tuple[Field, ...]


@dataclass(frozen=True, slots=True)
class RuleTree:
    """One rule as Envoy's RBAC policy ``name`` holds it: any ``from`` entry (all its
    fields) and any ``to`` entry and every ``when`` field. None: no ``from`` / ``to``."""

    name: str
    index: int
    sources: tuple[Clause, ...] | None
    operations: tuple[Clause, ...] | None
    when: Clause

    @property
    def matcher(self) -> Matcher:
        """The whole rule as one matcher."""
        parts: list[Matcher] = []
        for clauses in (self.sources, self.operations):
            if clauses is not None:
                parts.append(Or(tuple(And(tuple(f.matcher for f in c)) for c in clauses)))
        parts.extend(f.matcher for f in self.when)
        return And(tuple(parts))

    def leaves(self) -> Iterator[Leaf]:
        """Every leaf matcher of the rule (what it reads), under any And / Or / Not."""
        for clause in (*(self.sources or ()), *(self.operations or ()), self.when):
            for written in clause:
                yield from leaves(written.matcher)

    def principals(self) -> tuple[And, ...]:
        """Envoy's ``principals`` (ORed): each ``from`` entry with the principal-side
        conditions ANDed in; one entry of those conditions when there is no ``from``."""
        return self._side(self.sources, Side.PRINCIPAL)

    def permissions(self) -> tuple[And, ...]:
        """Envoy's ``permissions`` (ORed), as :meth:`principals` for ``to``."""
        return self._side(self.operations, Side.PERMISSION)

    def _side(self, clauses: tuple[Clause, ...] | None, side: Side) -> tuple[And, ...]:
        extra = tuple(f.matcher for f in self.when if f.side is side)
        if not clauses:
            return (And(extra),)
        return tuple(And((*(f.matcher for f in clause), *extra)) for clause in clauses)


@dataclass(frozen=True, slots=True)
class Dropped:
    """What Istio's builder left out: a whole rule (``field`` empty) or one field's value."""

    rule: str
    reason: str
    field: str = ""


@dataclass(frozen=True, slots=True)
class CompiledRules:
    """One AuthorizationPolicy's rules for one kind of filter chain.

    ``match_never``: the policy was written without rules; Envoy gets one never-matching
    policy of this name (``...-rule[0]``), so an ALLOW policy denies everything.
    """

    rules: tuple[RuleTree, ...]
    dropped: tuple[Dropped, ...] = ()
    match_never: str | None = None


# --- trust domains ----------------------------------------------------------------------


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


# --- compiling --------------------------------------------------------------------------


def compile_rules(
    policy: Resource[typing.Any],
    bundle: TrustBundle,
    *,
    for_tcp: bool,
    action: m.Action | None = None,
) -> CompiledRules:
    """The rule trees of one AuthorizationPolicy for HTTP (or, ``for_tcp``, TCP) chains,
    built for ``action`` (default: the policy's own), with Istio's rule-dropping applied.

    Example: an ALLOW rule ``to: [{operation: {methods: [GET]}}]`` compiles for HTTP to
    one tree whose ``to`` clause is ``Field("methods", PERMISSION, Or((Method(GET),)))``;
    for TCP it is dropped (``dropped`` says ``'methods' is HTTP only``), while as DENY it
    stays with that field left out, so it matches every connection.
    """
    spec: m.AuthorizationPolicySpec = policy.spec
    action = action or spec.action
    if not spec.rules:
        return CompiledRules((), (), match_never=rule_name(policy.namespace, policy.name, 0))
    builder = _Builder(policy.namespace, bundle, action, for_tcp)
    trees: list[RuleTree] = []
    dropped: list[Dropped] = []
    for index, rule in enumerate(spec.rules):
        name = rule_name(policy.namespace, policy.name, index)
        builder.dropped = []
        try:
            trees.append(builder.rule(name, index, rule))
        except (Unsupported, _UnknownKey) as refused:
            # Istio: "skipped rule ..." (logged by istiod, not an error)
            dropped.append(Dropped(name, str(refused)))
            continue
        dropped.extend(Dropped(name, why, label) for label, why in builder.dropped)
    return CompiledRules(tuple(trees), tuple(dropped))


class _UnknownKey(Exception):
    """A ``when`` key Istio does not know: the rule is skipped for every action."""

    def __str__(self) -> str:
        return f"unknown condition key {self.args[0]!r}"


@dataclass(frozen=True, slots=True)
class _PerValue:
    """Builds one matcher per value (the values ORed); the bool is ``if_unknown``."""

    build: Callable[[str, bool], Matcher]


@dataclass(frozen=True, slots=True)
class _AllValues:
    """Builds one matcher from all of a field's values."""

    build: Callable[[Sequence[str], bool], Matcher]


_Build = _PerValue | _AllValues


class _Builder:
    """Istio's generators (``pilot/pkg/security/authz/model/generator.go``), as trees."""

    def __init__(self, namespace: str, bundle: TrustBundle, action: m.Action, for_tcp: bool):
        self.namespace = namespace
        self.bundle = bundle
        self.for_tcp = for_tcp
        self.strict = action is m.Action.ALLOW  # Istio's checkError: only ALLOW propagates
        # An address the evaluator is not given is unknown: fail closed (ALLOW rules do
        # not match it; DENY / CUSTOM / AUDIT rules do).
        self.unknown = action is not m.Action.ALLOW
        self.dropped: list[tuple[str, str]] = []

    def rule(self, name: str, index: int, rule: m.Rule) -> RuleTree:
        when = tuple(f for c in rule.when for f in self._condition(c))
        sources = tuple(self._source(f.source) for f in rule.from_) if rule.from_ else None
        operations = tuple(self._operation(t.operation) for t in rule.to) if rule.to else None
        return RuleTree(name, index, sources, operations, when)

    # Istio's field order within a principal and a permission (each key is inserted at
    # the front of its generator list): kept, because it is the order Envoy receives.

    def _source(self, s: m.Source) -> Clause:
        principal, bundle = Side.PRINCIPAL, self.bundle
        fields: tuple[tuple[str, Sequence[str], Sequence[str], _Build], ...] = (
            ("principals", s.principals, s.not_principals, _PEER),
            (
                "requestPrincipals",
                s.request_principals,
                s.not_request_principals,
                _AllValues(self._request_principals),
            ),
            ("serviceAccounts", s.service_accounts, s.not_service_accounts, self._account),
            ("trustDomains", s.trust_domains, s.not_trust_domains, _TRUST_DOMAIN),
            ("namespaces", s.namespaces, s.not_namespaces, _NAMESPACE),
            ("remoteIpBlocks", s.remote_ip_blocks, s.not_remote_ip_blocks, _REMOTE_IP),
            ("ipBlocks", s.ip_blocks, s.not_ip_blocks, _SOURCE_IP),
        )
        expand = {"principals": bundle.expand, "trustDomains": bundle.expand_domains}
        out: list[Field] = []
        for label, values, not_values, build in fields:
            out.extend(self._fields(label, principal, values, not_values, build, expand.get(label)))
        return tuple(out)

    def _operation(self, op: m.Operation) -> Clause:
        permission = Side.PERMISSION
        fields: tuple[tuple[str, Sequence[str], Sequence[str], _Build], ...] = (
            ("hosts", op.hosts, op.not_hosts, _PerValue(self._host)),
            ("methods", op.methods, op.not_methods, _PerValue(self._method)),
            ("paths", op.paths, op.not_paths, _PerValue(self._path)),
            ("ports", op.ports, op.not_ports, _PORT_BUILD),
        )
        out: list[Field] = []
        for label, values, not_values, build in fields:
            out.extend(self._fields(label, permission, values, not_values, build))
        return tuple(out)

    def _condition(self, c: m.Condition) -> list[Field]:
        known = condition_key(c.key)
        if known is None:
            raise _UnknownKey(c.key)
        build = self._condition_builder(known)
        expand: Callable[[Iterable[str]], Sequence[str]] = tuple
        if known.kind is KeyKind.SOURCE_PRINCIPAL:
            expand = self.bundle.expand
        elif known.kind is KeyKind.SOURCE_TRUST_DOMAIN:
            expand = self.bundle.expand_domains
        out: list[Field] = []
        for negate, written in ((False, c.values), (True, c.not_values)):
            values = expand(written)
            if values:
                label = f"when[{c.key}].{'notValues' if negate else 'values'}"
                if known.kind is KeyKind.ENVOY_FILTER_METADATA:
                    label += " (not evaluated offline)"
                found = self._field(
                    label, known.side, values, negate, build, "values", known, written
                )
                if found is not None:
                    out.append(found)
        return out

    def _fields(
        self,
        name: str,
        side: Side,
        values: Sequence[str],
        not_values: Sequence[str],
        build: _Build,
        expand: Callable[[Iterable[str]], Sequence[str]] | None = None,
    ) -> list[Field]:
        out: list[Field] = []
        for negate, written in ((False, values), (True, not_values)):
            chosen = expand(written) if expand is not None else written
            if chosen:
                label = f"not{name[0].upper()}{name[1:]}" if negate else name
                found = self._field(label, side, chosen, negate, build, name, None, written)
                if found is not None:
                    out.append(found)
        return out

    def _field(
        self,
        label: str,
        side: Side,
        values: Sequence[str],
        negate: bool,
        build: _Build,
        name: str,
        condition: ConditionKey | None = None,
        written: Sequence[str] = (),
    ) -> Field | None:
        """One field: its values ORed (:class:`_PerValue`, each value its own matcher) or
        one matcher for all values (:class:`_AllValues`); None when Istio leaves it out."""
        # A negated field's leaves answer the opposite for the unknown, so that NOT turns
        # it back into the fail-closed answer.
        if_unknown = self.unknown != negate
        matcher: Matcher
        if isinstance(build, _AllValues):
            try:
                matcher = build.build(values, if_unknown)
            except Unsupported as refused:
                if self.strict:
                    raise
                self.dropped.append((label, str(refused)))
                return None
        else:
            alternatives: list[Matcher] = []
            for value in values:
                try:
                    alternatives.append(build.build(value, if_unknown))
                except Unsupported as refused:
                    if self.strict:
                        raise
                    self.dropped.append((label, str(refused)))
            if not alternatives:
                return None
            matcher = Or(tuple(alternatives))
        matcher = Not(matcher) if negate else matcher
        return Field(label, side, matcher, name, condition, tuple(written), negate)

    def _condition_builder(self, known: ConditionKey) -> _Build:
        key = known.key
        match known.kind:
            case KeyKind.DESTINATION_IP:
                return _DESTINATION_IP
            case KeyKind.DESTINATION_PORT:
                return _PORT_BUILD
            case KeyKind.CONNECTION_SNI:
                return _SNI
            case KeyKind.ENVOY_FILTER_METADATA:
                return _AllValues(lambda values, offline: _filter_metadata(key, values, offline))
            case KeyKind.SOURCE_IP:
                return _SOURCE_IP
            case KeyKind.REMOTE_IP:
                return _REMOTE_IP
            case KeyKind.SOURCE_NAMESPACE:
                return _NAMESPACE
            case KeyKind.SOURCE_TRUST_DOMAIN:
                return _TRUST_DOMAIN
            case KeyKind.SOURCE_SERVICE_ACCOUNT:
                return self._account
            case KeyKind.SOURCE_PRINCIPAL:
                return _PEER
            case KeyKind.REQUEST_PRINCIPAL:
                return _AllValues(self._request_principals)
            case KeyKind.REQUEST_AUDIENCES:
                return self._claim(key, ("aud",))
            case KeyKind.REQUEST_PRESENTER:
                return self._claim(key, ("azp",))
            case KeyKind.REQUEST_HEADER:
                name = known.names[0]

                def header(value: str, _: bool) -> Matcher:
                    self._http_only(key)
                    return RequestHeader(name, StringPattern.of(value, star=TextKind.PRESENT))

                return _PerValue(header)
            case KeyKind.REQUEST_CLAIM:
                return self._claim(key, known.names)

    # --- one value (or all values) of one field -------------------------------------

    def _http_only(self, key: str) -> None:
        if self.for_tcp:
            raise Unsupported(f"{key!r} is HTTP only")

    @property
    def _account(self) -> _Build:
        def build(value: str, _: bool) -> Matcher:
            namespace, slash, account = value.partition("/")
            if not slash:
                namespace, account = self.namespace, value
            return ServiceAccount(namespace, account)

        return _PerValue(build)

    def _host(self, value: str, _: bool) -> Matcher:
        self._http_only("hosts")
        return Host(StringPattern.of(value, star=TextKind.PRESENT))

    def _method(self, value: str, _: bool) -> Matcher:
        self._http_only("methods")
        return Method(StringPattern.of(value, star=TextKind.PRESENT))

    def _path(self, value: str, _: bool) -> Matcher:
        self._http_only("paths")
        if "{*}" in value or "{**}" in value:
            return PathTemplate(value)
        return Path(StringPattern.of(value))

    def _request_principals(self, values: Sequence[str], _: bool) -> Matcher:
        self._http_only("request.auth.principal")
        alternatives = tuple(request_principal(v) for v in values)
        return alternatives[0] if len(alternatives) == 1 else Or(alternatives)

    def _claim(self, key: str, claims: tuple[str, ...]) -> _Build:
        def build(values: Sequence[str], _: bool) -> Matcher:
            self._http_only(key)
            return JwtClaim(claims, tuple(StringPattern.of(v) for v in values))

        return _AllValues(build)


_PEER = _PerValue(lambda value, _: Principal(StringPattern.of(value)))
_NAMESPACE = _PerValue(lambda value, _: SourceNamespace(value))
_TRUST_DOMAIN = _PerValue(lambda value, _: TrustDomain(value))
_SOURCE_IP = _PerValue(lambda value, unknown: SourceIp(Cidr.parse(value), unknown))
_REMOTE_IP = _PerValue(lambda value, unknown: RemoteIp(Cidr.parse(value), unknown))
_DESTINATION_IP = _PerValue(lambda value, unknown: DestinationIp(Cidr.parse(value), unknown))
_PORT_BUILD = _PerValue(lambda value, _: DestinationPort(_port(value)))
_SNI = _PerValue(lambda value, _: ConnectionSni(StringPattern.of(value)))


_ANY_TEXT = StringPattern(TextKind.NON_EMPTY)


def request_principal(value: str) -> RequestPrincipal:
    """Istio's split of an ``iss/sub`` value at its LAST ``/``. A ``*`` counts only at the
    start or end of the WHOLE value: ``*`` alone matches any token; ``*x/sub`` is an issuer
    suffix with an exact subject; ``iss/x*`` an exact issuer with a subject prefix
    (``iss/*``: any subject); without ``/`` a leading ``*`` is a subject suffix and a
    trailing one an issuer prefix. Anything else is exact on both parts."""
    issuer, slash, subject = value.rpartition("/")
    if not slash:
        issuer, subject = value, ""
    exact, kind = TextKind.EXACT, TextKind
    if value == "*":
        return RequestPrincipal(_ANY_TEXT, _ANY_TEXT)
    if value.startswith("*"):
        if slash:
            iss = _ANY_TEXT if issuer == "*" else StringPattern(kind.SUFFIX, issuer[1:])
            return RequestPrincipal(iss, StringPattern(exact, subject))
        return RequestPrincipal(_ANY_TEXT, StringPattern(kind.SUFFIX, value[1:]))
    if value.endswith("*"):
        if slash:
            sub = _ANY_TEXT if subject == "*" else StringPattern(kind.PREFIX, subject[:-1])
            return RequestPrincipal(StringPattern(exact, issuer), sub)
        return RequestPrincipal(StringPattern(kind.PREFIX, value[:-1]), _ANY_TEXT)
    return RequestPrincipal(StringPattern(exact, issuer), StringPattern(exact, subject))


def _filter_metadata(key: str, values: Sequence[str], offline: bool) -> Matcher:
    """``experimental.envoy.filters.a.b[c]``: filter ``envoy.filters.a.b``, key ``c``; a
    value written ``[v]`` matches a list containing ``v``."""
    filter_name, bracket, rest = key.removeprefix("experimental.").partition("[")
    if not bracket:
        raise Unsupported(f"invalid key: {key}")
    patterns = tuple(
        (StringPattern.of(v.strip("[]")), True)
        if v.startswith("[") and v.endswith("]")
        else (StringPattern.of(v), False)
        for v in values
    )
    return FilterMetadata(filter_name, rest.removesuffix("]"), patterns, offline)

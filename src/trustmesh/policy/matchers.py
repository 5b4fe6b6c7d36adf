"""Value matchers with exactly the semantics of the Envoy matchers Istio generates.

Istio turns each policy value into an Envoy StringMatcher (``pilot/pkg/security/authz/
matcher/string.go``): ``*`` → regex ``.+`` (any non-empty value), ``x*`` → prefix,
``*x`` → suffix, anything else exact — a ``*`` in the middle is a literal character.
A few fields differ (header ``*`` is a presence match, hosts ignore case). The values
arrive compiled (:class:`~trustmesh.policy.rule_tree.StringPattern`); ``string_match``
and ``path_match`` compile written values the same way for the analyzer's probes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from trustmesh.policy import rule_tree as rt

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class StringMatch:
    """OR over exact values, prefixes, suffixes and "any non-empty" (or "present")."""

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    regexes: tuple[re.Pattern[str], ...] = ()
    any_nonempty: bool = False
    present: bool = False
    ignore_case: bool = False

    def __call__(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.present:
            return True
        if self.ignore_case:
            value = value.lower()
        if value in self.exact:
            return True
        if self.any_nonempty and value:
            return True
        for prefix in self.prefixes:
            if value.startswith(prefix):
                return True
        for suffix in self.suffixes:
            if value.endswith(suffix):
                return True
        return any(regex.fullmatch(value) for regex in self.regexes)

    def any_of(self, values: Iterable[str]) -> bool:
        return any(self(v) for v in values)


def string_match(
    values: Iterable[str], *, ignore_case: bool = False, star_is_presence: bool = False
) -> StringMatch:
    """Istio's StringMatcher rules for a list of written policy values (OR'd)."""
    star = rt.TextKind.PRESENT if star_is_presence else rt.TextKind.NON_EMPTY
    return pattern_match(
        (rt.StringPattern.of(v, star=star) for v in values), ignore_case=ignore_case
    )


def is_path_template(value: str) -> bool:
    return "{*}" in value or "{**}" in value


def path_template_regex(value: str) -> re.Pattern[str]:
    """Envoy's uri_template: ``{*}`` one path segment, ``{**}`` the rest (≥ 0 segments).

    A bare ``*`` / ``**`` segment means the same as its braced form.
    """
    out: list[str] = []
    for segment in value.split("/"):
        if segment in ("{*}", "*"):
            out.append("[^/]+")
        elif segment in ("{**}", "**"):
            out.append("(?:[^/]+(?:/[^/]+)*)?")
        else:
            out.append(re.escape(segment))
    return re.compile("/".join(out))


def path_match(values: Iterable[str]) -> StringMatch:
    """Written ``paths`` values: Istio's StringMatcher rules, or an uri_template."""
    values = list(values)
    templates = [path_template_regex(v) for v in values if is_path_template(v)]
    plain = (rt.StringPattern.of(v) for v in values if not is_path_template(v))
    return pattern_match(plain, regexes=templates)


@dataclass(frozen=True, slots=True)
class RequestPrincipalMatch:
    """``requestPrincipals``: each value split at its LAST ``/`` into issuer and subject."""

    pairs: tuple[tuple[StringMatch, StringMatch], ...]

    def __call__(self, issuer: str | None, subject: str | None) -> bool:
        if issuer is None:
            return False
        return any(iss(issuer) and sub(subject) for iss, sub in self.pairs)


def request_principal_match(values: Iterable[str]) -> RequestPrincipalMatch:
    """``requestPrincipals`` values split as Istio splits them
    (:func:`~trustmesh.policy.rule_tree.request_principal`)."""
    pairs = [rt.request_principal(value) for value in values]
    return RequestPrincipalMatch(
        tuple((pattern_match((p.issuer,)), pattern_match((p.subject,))) for p in pairs)
    )


def pattern_match(
    patterns: Iterable[rt.StringPattern],
    *,
    ignore_case: bool = False,
    regexes: Sequence[re.Pattern[str]] = (),
) -> StringMatch:
    """One :class:`StringMatch` for an OR of compiled patterns (and ``regexes``)."""
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    any_nonempty = present = False
    for pattern in patterns:
        value = pattern.value.lower() if ignore_case else pattern.value
        match pattern.kind:
            case rt.TextKind.EXACT:
                exact.add(value)
            case rt.TextKind.PREFIX:
                prefixes.append(value)
            case rt.TextKind.SUFFIX:
                suffixes.append(value)
            case rt.TextKind.NON_EMPTY:
                any_nonempty = True
            case rt.TextKind.PRESENT:
                present = True
    return StringMatch(
        exact=frozenset(exact),
        prefixes=tuple(prefixes),
        suffixes=tuple(suffixes),
        regexes=tuple(regexes),
        any_nonempty=any_nonempty,
        present=present,
        ignore_case=ignore_case,
    )


@dataclass(frozen=True, slots=True)
class IpMatch:
    networks: tuple[IpNetwork, ...] = field(default=())

    def __call__(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self.networks)


def ip_match(values: Iterable[str]) -> IpMatch:
    return IpMatch(tuple(ipaddress.ip_network(v, strict=False) for v in values))


Predicate = Callable[[str | None], bool]

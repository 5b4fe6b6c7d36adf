"""Value matchers with exactly the semantics of the Envoy matchers Istio generates.

Istio turns each policy value into an Envoy StringMatcher (``pilot/pkg/security/authz/
matcher/string.go``): ``*`` → regex ``.+`` (any non-empty value), ``x*`` → prefix,
``*x`` → suffix, anything else exact — a ``*`` in the middle is a literal character.
A few fields differ (header ``*`` is a presence match, hosts ignore case, namespaces
become a regex) and get their own constructor here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

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
    """Istio's StringMatcher rules for a list of policy values (OR'd)."""
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    any_nonempty = present = False
    for raw in values:
        value = raw.lower() if ignore_case else raw
        if value == "*":
            if star_is_presence:
                present = True
            else:
                any_nonempty = True
        elif value.startswith("*"):
            suffixes.append(value[1:])
        elif value.endswith("*"):
            prefixes.append(value[:-1])
        else:
            exact.add(value)
    return StringMatch(
        exact=frozenset(exact),
        prefixes=tuple(prefixes),
        suffixes=tuple(suffixes),
        any_nonempty=any_nonempty,
        present=present,
        ignore_case=ignore_case,
    )


def namespace_match(values: Iterable[str]) -> StringMatch:
    """``namespaces``: regex ``.*/ns/<value>/.*`` on the peer principal, ``*`` → ``.*``."""
    patterns = []
    for value in values:
        inner = ".*".join(re.escape(part) for part in value.split("*"))
        patterns.append(re.compile(f".*/ns/{inner}/.*", re.DOTALL))
    return StringMatch(regexes=tuple(patterns))


def trust_domain_match(values: Iterable[str]) -> StringMatch:
    """``trustDomains`` / ``source.trustDomain`` on the peer principal (``TD/ns/…``), as
    Istio's ``srcTrustDomainGenerator``: ``*`` any peer identity; ``td`` the prefix
    ``td/``; ``x*`` / ``*x`` a trust domain (no ``/``) starting / ending with ``x``."""
    prefixes: list[str] = []
    patterns: list[re.Pattern[str]] = []
    present = False
    for value in values:
        if value == "*":
            present = True
        elif "*" not in value:
            prefixes.append(f"{value}/")
        else:
            before, _, after = value.partition("*")
            patterns.append(re.compile(f"{re.escape(before)}[^/]*{re.escape(after)}/.*"))
    return StringMatch(prefixes=tuple(prefixes), regexes=tuple(patterns), present=present)


def service_account_match(values: Iterable[str], policy_namespace: str) -> StringMatch:
    """``serviceAccounts``: ``sa`` or ``ns/sa``; the trust domain is not pinned."""
    patterns = []
    for value in values:
        namespace, _, account = value.rpartition("/")
        namespace = namespace or policy_namespace
        patterns.append(
            re.compile(
                f".+/ns/{re.escape(namespace)}/(?:.+/|)sa/{re.escape(account)}(?:/.+)?", re.DOTALL
            )
        )
    return StringMatch(regexes=tuple(patterns))


_TEMPLATE = re.compile(r"\{\*\*\}|\{\*\}")


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
    plain = [v for v in values if not is_path_template(v)]
    templates = tuple(path_template_regex(v) for v in values if is_path_template(v))
    base = string_match(plain)
    return StringMatch(
        exact=base.exact,
        prefixes=base.prefixes,
        suffixes=base.suffixes,
        any_nonempty=base.any_nonempty,
        regexes=templates,
    )


@dataclass(frozen=True, slots=True)
class RequestPrincipalMatch:
    """``requestPrincipals``: each value split at its LAST ``/`` into issuer and subject."""

    pairs: tuple[tuple[StringMatch, StringMatch], ...]

    def __call__(self, issuer: str | None, subject: str | None) -> bool:
        if issuer is None:
            return False
        return any(iss(issuer) and sub(subject) for iss, sub in self.pairs)


def request_principal_match(values: Iterable[str]) -> RequestPrincipalMatch:
    """Istio's split of ``iss/sub`` values (``requestPrincipalGenerator``).

    A ``*`` counts only at the start or end of the WHOLE value: ``*`` alone matches any
    token; ``*x/sub`` is an issuer suffix with an exact subject; ``iss/x*`` an exact
    issuer with a subject prefix (``iss/*``: any subject); without ``/`` a leading ``*``
    is a subject suffix and a trailing one an issuer prefix. Anything else is exact on
    both parts, so a ``*`` inside (``a*/b``) is a literal character.
    """
    anything = string_match(["*"])

    def exact(text: str) -> StringMatch:
        return StringMatch(exact=frozenset({text}))

    pairs: list[tuple[StringMatch, StringMatch]] = []
    for value in values:
        iss, slash, sub = value.rpartition("/")
        if value == "*":
            pairs.append((anything, anything))
        elif value.startswith("*"):
            if slash:
                issuer = anything if iss == "*" else StringMatch(suffixes=(iss[1:],))
                pairs.append((issuer, exact(sub)))
            else:
                pairs.append((anything, StringMatch(suffixes=(value[1:],))))
        elif value.endswith("*"):
            if slash:
                subject = anything if sub == "*" else StringMatch(prefixes=(sub[:-1],))
                pairs.append((exact(iss), subject))
            else:
                pairs.append((StringMatch(prefixes=(value[:-1],)), anything))
        elif slash:
            pairs.append((exact(iss), exact(sub)))
        else:
            pairs.append((exact(value), exact("")))
    return RequestPrincipalMatch(tuple(pairs))


@dataclass(frozen=True, slots=True)
class IpMatch:
    networks: tuple[IpNetwork, ...] = field(default=())

    def __call__(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self.networks)


def ip_match(values: Iterable[str]) -> IpMatch:
    return IpMatch(tuple(ipaddress.ip_network(v, strict=False) for v in values))


Predicate = Callable[[str | None], bool]

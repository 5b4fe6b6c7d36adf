"""Matcher values (:mod:`trustmesh.policy.rule_tree`) → Envoy RBAC messages, one to one.

Each matcher type maps to one ``envoy.config.rbac.v3`` ``Principal`` / ``Permission``
message (proto3-JSON dicts), written as Istio's generators write it
(``pilot/pkg/security/authz/model/generator.go``, ``authz/matcher``) so the output is
byte-for-byte Istio's. What a rule means — which values, which fields, which rules Istio
drops — was decided when the tree was compiled; nothing here reads a policy.

* :class:`~trustmesh.policy.rule_tree.And` / ``Or`` / ``Not`` → ``and_ids`` / ``or_ids``
  / ``not_id`` (principals) or ``and_rules`` / ``or_rules`` / ``not_rule`` (permissions);
  an empty ``And`` is Envoy's ``any``;
* a :class:`~trustmesh.policy.rule_tree.StringPattern` → a StringMatcher (``*`` → regex
  ``.+``), or on a header a HeaderMatcher (``*`` → ``present_match``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from trustmesh.policy import rule_tree as rt
from trustmesh.policy.rule_tree import StringPattern, TextKind

__all__ = ["Json", "permission", "policy", "principal", "quote_meta"]

Json = dict[str, Any]

SPIFFE_PREFIX = "spiffe://"
JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD = "payload"  # Istio's payload_in_metadata key for the jwt_authn filter
URI_TEMPLATE = (
    "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig"
)

_QUOTE_META = re.compile(r"([\\.+*?()|\[\]{}^$])")  # exactly Go's regexp.QuoteMeta set
_TEMPLATE = re.compile(r"\{\*\*\}|\{\*\}")


@dataclass(frozen=True, slots=True)
class _Shape:
    """Field names of the RBAC Principal or Permission message."""

    all_of: str
    any_of: str
    items: str
    negated: str


_PRINCIPAL = _Shape("and_ids", "or_ids", "ids", "not_id")
_PERMISSION = _Shape("and_rules", "or_rules", "rules", "not_rule")
_ANY: Json = {"any": True}


def policy(tree: rt.RuleTree) -> Json:
    """One rule's Envoy RBAC ``Policy``."""
    return {
        "permissions": [permission(p) for p in tree.permissions()],
        "principals": [principal(p) for p in tree.principals()],
    }


def principal(matcher: rt.Matcher) -> Json:
    """``matcher`` as an RBAC ``Principal``."""
    return _message(matcher, _PRINCIPAL)


def permission(matcher: rt.Matcher) -> Json:
    """``matcher`` as an RBAC ``Permission``."""
    return _message(matcher, _PERMISSION)


def _message(matcher: rt.Matcher, shape: _Shape) -> Json:
    match matcher:
        case rt.And(items):
            return {shape.all_of: {shape.items: [_message(i, shape) for i in items] or [_ANY]}}
        case rt.Or(items):
            return {shape.any_of: {shape.items: [_message(i, shape) for i in items]}}
        case rt.Not(item):
            return {shape.negated: _message(item, shape)}
        case rt.Principal(pattern):
            return _authenticated(string_matcher(pattern, SPIFFE_PREFIX))
        case rt.SourceNamespace(value):
            # Every ``*`` (not only at an end) becomes ``.*``: Istio splits on all of them.
            inner = ".*".join(quote_meta(part) for part in value.split("*"))
            return _authenticated(_regex(f".*/ns/{inner}/.*"))
        case rt.ServiceAccount(namespace, account):
            ns, sa = quote_meta(namespace), quote_meta(account)
            return _authenticated(_regex(f"spiffe://.+/ns/{ns}/(.+/|)sa/{sa}(/.+)?"))
        case rt.TrustDomain(value):
            return _authenticated(_trust_domain(value))
        case rt.SourceIp(cidr):
            return {"direct_remote_ip": _cidr(cidr)}
        case rt.RemoteIp(cidr):
            return {"remote_ip": _cidr(cidr)}
        case rt.DestinationIp(cidr):
            return {"destination_ip": _cidr(cidr)}
        case rt.DestinationPort(port):
            return {"destination_port": port}
        case rt.ConnectionSni(pattern):
            return {"requested_server_name": string_matcher(pattern)}
        case rt.Host(pattern):
            return {"header": header_matcher(":authority", pattern, ignore_case=True)}
        case rt.Method(pattern):
            return {"header": header_matcher(":method", pattern)}
        case rt.Path(pattern):
            return {"url_path": {"path": string_matcher(pattern)}}
        case rt.PathTemplate(template):
            written = _TEMPLATE.sub(lambda found: found.group(0)[1:-1], template)
            config = {"@type": URI_TEMPLATE, "path_template": written}
            return {"uri_template": {"name": "uri-template", "typed_config": config}}
        case rt.RequestHeader(name, pattern):
            return {"header": header_matcher(name, pattern)}
        case rt.RequestPrincipal(issuer, subject):
            claims = [
                {"metadata": _jwt_string_claim("iss", string_matcher(issuer))},
                {"metadata": _jwt_string_claim("sub", string_matcher(subject))},
            ]
            return {"and_ids": {"ids": claims}}
        case rt.JwtClaim(claims, values):
            return {"metadata": _jwt_claim(claims, _value_or(values))}
        case rt.FilterMetadata(filter_name, key, values):
            return {"metadata": _filter_metadata(filter_name, key, values)}
    raise TypeError(f"no Envoy message for {matcher!r}")  # pragma: no cover - closed set


# --- values -----------------------------------------------------------------------------


def quote_meta(text: str) -> str:
    """Go's ``regexp.QuoteMeta`` (Python's ``re.escape`` escapes more, e.g. ``-``)."""
    return _QUOTE_META.sub(r"\\\1", text)


def _regex(pattern: str) -> Json:
    return {"safe_regex": {"regex": pattern}}


def string_matcher(pattern: StringPattern, prefix: str = "") -> Json:
    """Istio ``StringMatcherWithPrefix``: the StringMatcher for one policy value."""
    value = pattern.value
    match pattern.kind:
        case TextKind.NON_EMPTY | TextKind.PRESENT:
            return _regex(".+")  # the prefix is dropped: any non-empty value
        case TextKind.SUFFIX:
            if not prefix:
                return {"suffix": value}
            return _regex(prefix + ".*" + quote_meta(value))
        case TextKind.PREFIX:
            return {"prefix": prefix + value}
        case TextKind.EXACT:
            return {"exact": prefix + value}


def header_matcher(name: str, pattern: StringPattern, *, ignore_case: bool = False) -> Json:
    """Istio ``HeaderMatcher`` / ``HostMatcher``: ``*`` means "header present"."""
    if pattern.kind in (TextKind.PRESENT, TextKind.NON_EMPTY):
        return {"name": name, "present_match": True}
    matcher: Json = {pattern.kind.value: pattern.value}
    if ignore_case:
        matcher["ignore_case"] = True
    return {"name": name, "string_match": matcher}


def _authenticated(matcher: Json) -> Json:
    """The peer certificate's URI SAN (sidecars; waypoints would use filter_state)."""
    return {"authenticated": {"principal_name": matcher}}


def _trust_domain(value: str) -> Json:
    if value == "*":
        return {"prefix": SPIFFE_PREFIX}
    if "*" not in value:
        return {"prefix": f"{SPIFFE_PREFIX}{value}/"}
    before, _, after = value.partition("*")
    return _regex(f"spiffe://{quote_meta(before)}[^/]*{quote_meta(after)}/.*")


def _cidr(cidr: rt.Cidr) -> Json:
    return {"address_prefix": cidr.address, "prefix_len": cidr.prefix_len}


def _value_or(patterns: tuple[StringPattern, ...]) -> Json:
    """Istio ``StringOrMatcher``: a ValueMatcher matching a string equal to any value."""
    matchers: list[Json] = [{"string_match": string_matcher(p)} for p in patterns]
    if len(matchers) == 1:
        return matchers[0]
    return {"or_match": {"value_matchers": matchers}}


def _jwt_claim(claims: tuple[str, ...], value: Json) -> Json:
    """Istio ``MetadataListValueMatcherForJWTClaims``: the claim is a matching string OR
    a list with a matching element (``scope`` / ``permission`` are split into lists)."""
    return {
        "filter": JWT_FILTER,
        "path": [{"key": key} for key in (JWT_PAYLOAD, *claims)],
        "value": {"or_match": {"value_matchers": [{"list_match": {"one_of": value}}, value]}},
    }


def _jwt_string_claim(claim: str, matcher: Json) -> Json:
    """Istio ``MetadataStringMatcherForJWTClaim``: one top-level string claim."""
    return {
        "filter": JWT_FILTER,
        "path": [{"key": JWT_PAYLOAD}, {"key": claim}],
        "value": {"string_match": matcher},
    }


def _filter_metadata(
    filter_name: str, key: str, values: tuple[tuple[StringPattern, bool], ...]
) -> Json:
    matchers: list[Json] = []
    for pattern, in_list in values:
        inner = {"string_match": string_matcher(pattern)}
        matchers.append({"list_match": {"one_of": inner}} if in_list else inner)
    value = matchers[0] if len(matchers) == 1 else {"or_match": {"value_matchers": matchers}}
    return {"filter": filter_name, "path": [{"key": key}], "value": value}

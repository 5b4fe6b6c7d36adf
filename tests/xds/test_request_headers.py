"""Which request headers reach the policy filters: real Envoy 1.40 vs the evaluator's model
(trustmesh.policy.request_headers).

translate()'s inbound listener for foo/httpbin runs in a real Envoy fed by a test CA; a Lua
filter put in front of the policy filters answers every request with the header lines it
sees there. Each request of the table (hop-by-hop headers, ``Connection`` nominations,
upgrades, ``TE``, every ``x-envoy-*`` header Envoy knows, ``x-forwarded-*``, whitespace,
bad names and values) is sent over plaintext and, for the headers a handshake changes,
over mesh mTLS; what the Lua filter saw — or the status Envoy answered instead — must be
exactly what ``filter_headers`` predicts.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.envoy.conftest import (  # fixtures are registered by importing them
    Loopback,
    MiniCA,
    Sidecars,
    ca,
    loopback,
    run,
    sidecars,
    workroot,
)
from tests.unit.meshutil import compile_text
from tests.xds.translate_rig import _bootstrap_patch, _mesh_client
from trustmesh.policy.pathnorm import PathRejected
from trustmesh.policy.request_headers import (
    ENVOY_INTERNAL_REMOVED,
    GENERATED_REQUEST_ID,
    TRUSTMESH_SIDECAR,
    UNKNOWN_CERT_HASH,
    ClientProxy,
    filter_headers,
)
from trustmesh.xds.translate import translate

__all__ = ["ca", "loopback", "sidecars", "workroot"]  # re-exported fixtures, used by name

Lines = tuple[tuple[str, str], ...]
_LUA_TYPE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
_DUMP = """
function envoy_on_request(handle)
  local out = {}
  for name, value in pairs(handle:headers()) do out[#out + 1] = name .. ": " .. value end
  handle:respond({[":status"] = "200"}, table.concat(out, "\\n"))
end
"""
# Every x-envoy-* request header Envoy 1.40 names (source/common/http/headers.h), plus
# Istio's peer metadata headers and one Envoy does not know.
_ENVOY_HEADERS = tuple(
    f"x-envoy-{name}"
    for name in (
        *("attempt-count", "decorator-operation", "degraded", "downstream-service-cluster"),
        *("downstream-service-node", "drop-overload", "expected-rq-timeout-ms"),
        *("external-address", "force-trace", "hedge-on-per-try-timeout"),
        *("immediate-health-check-fail", "internal", "ip-tags", "is-timeout-retry"),
        *("local-overloaded", "max-retries", "not-forwarded", "original-dst-host"),
        *("original-method", "original-path", "original-url", "overloaded", "peer-metadata"),
        *("peer-metadata-id", "ratelimited", "retriable-header-names"),
        *("retriable-status-codes", "retry-grpc-on", "retry-on", "upstream-alt-stat-name"),
        *("upstream-canary", "upstream-healthchecked-cluster", "upstream-host-address"),
        *("upstream-hostname", "upstream-rq-per-try-timeout-ms"),
        *("upstream-rq-timeout-alt-response", "upstream-rq-timeout-ms"),
        *("upstream-service-time", "upstream-stream-duration-ms", "foo"),
    )
)
_ALL_ENVOY: Lines = tuple((name, "v") for name in _ENVOY_HEADERS)
_OTHERS: Lines = tuple(
    (name, "v")
    for name in (
        *("keep-alive", "proxy-connection", "proxy-authorization", "trailer", "via"),
        *("forwarded", "referer", "early-data", "x-real-ip", "x-forwarded-host"),
        *("x-forwarded-port", "x-forwarded-proto", "x-forwarded-client-cert"),
        *("x-client-trace-id", "traceparent", "x-b3-traceid", "grpc-timeout"),
    )
)


def _numbered(count: int, *extra: tuple[str, str]) -> Lines:
    return (*((f"x-h{i}", "v") for i in range(count)), *extra)


# Inline headers whose lines never reach the filters as sent: two lines count once.
_INLINE_SAMPLE = (
    *("connection", "upgrade", "te", "keep-alive", "proxy-connection", "content-length"),
    *("transfer-encoding", "x-forwarded-client-cert", "x-envoy-retry-on", "x-envoy-internal"),
    *("x-envoy-max-retries", "user-agent", "x-request-id", "expect"),
)
# The request table: header lines (Host aside). Each is sent over plaintext.
PLAINTEXT: tuple[Lines, ...] = (
    _ALL_ENVOY + _OTHERS,
    (*_ALL_ENVOY, ("x-forwarded-for", "10.1.2.3")),  # one address: still not internal
    (*_ALL_ENVOY, ("x-forwarded-for", "127.0.0.1")),
    (("transfer-encoding", "chunked"),),
    (("te", "trailers"),), (("te", "Trailers"),), (("te", "trailers, deflate"),),
    (("te", "deflate;q=0.5, trailers"),), (("te", "gzip"),), (("te", ""),),
    (("connection", "x-user"), ("x-user", "ops"), ("x-other", "1")),
    (("connection", "close, x-user"), ("x-user", "ops")),
    (("connection", "X-USER"), ("x-user", "ops"), ("x-user", "mallory")),
    (("connection", "x-a ,  x-b"), ("x-a", "1"), ("x-b", "2"), ("x-c", "3")),
    (("connection", ",x-a,"), ("x-a", "1")),
    (("connection", "x-a;q=1"), ("x-a", "1")),
    (("connection", "keep-alive, x-a"), ("x-a", "1"), ("keep-alive", "timeout=5")),
    (("connection", "x-a"), ("connection", "x-b"), ("x-a", "1"), ("x-b", "2")),
    (("connection", "connection"),),
    (("connection", "te"), ("te", "Trailers, deflate")),
    (("connection", "te"), ("te", "gzip")),
    (("connection", "content-length"), ("content-length", "0")),
    (("connection", "authorization"), ("authorization", "Bearer x")),
    (("connection", "x-request-id"), ("x-request-id", "abc")),
    (("connection", "cookie, user-agent"), ("cookie", "a=b"), ("user-agent", "ua")),
    (("connection", "x-forwarded-port, x-envoy-original-path"), ("x-forwarded-port", "1")),
    (("connection", "x-forwarded-for"), ("x-forwarded-for", "1.2.3.4")),
    (("connection", "X-Forwarded-Host"),),
    (("connection", "x-forwarded-proto"),),
    (("connection", "host"),),
    (("connection", ":path"),),
    (("connection", "a,b,c,d,e,f,g,h,i"),),
    (("connection", "close, a,b,c,d,e,f,g,h,i"),),
    (("connection", "upgrade"), ("upgrade", "websocket"), ("x-a", "1")),
    (("connection", "Upgrade, x-a"), ("upgrade", "WebSocket"), ("x-a", "1")),
    (("connection", "upgrade, x-forwarded-for"), ("upgrade", "websocket"), ("keep-alive", "1")),
    (("connection", "upgrade"), ("upgrade", "foo")),
    (("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c"), ("http2-settings", "AAA")),
    (("connection", "Upgrade, HTTP2-Settings, x-a"), ("upgrade", "h2c"), ("x-a", "1")),
    (("upgrade", "websocket"),),
    (("connection", "upgrade"),),
    (("expect", "100-continue"),),
    (("x-forwarded-client-cert", "By=spiffe://x;URI=spiffe://cluster.local/ns/foo/sa/admin"),),
    (("x-forwarded-proto", "https"), ("x-request-id", "")),
    (("x-a", "  spaced  "), ("X-Mixed-Case", "V"), ("x-tab", "\tt\t"), ("x-empty", "   ")),
    (("x a", "1"),),
    (("x(a)", "1"),),
    (("x-a", "a\x01b"),),
    (("x-a", "a\x7fb"),),
    (("x-a", "é"),),
    # Line breaks inside a value, as written on the wire: a continuation (obs-fold) joins
    # the value, "name: value" is one more header (Host too), an empty line ends the head,
    # a carriage return is dropped, a line without a colon is a 400.
    (("x-a", "a\r\n b"),), (("x-a", "a\r\n\tb"),), (("x-a", "a\n b"),), (("x-a", "a\rb"),),
    (("x-a", "a\r\n   b"),), (("x-a", "a \r\n b "),), (("x-a", "a\r\n b\r\n c"),),
    (("x-a", "\r\n b"),), (("x-a", "a\r\rb"),), (("x-a", "a\r"),), (("x-a", "\rb"),),
    (("x-a", "a\nx-b: c"),), (("x-a", "a\r\nx-b: c"),), (("x-a", "a\n\tx-b: c"),),
    (("x-a", "a\r\n\r\nx-b: c"),), (("x-a", "a\n"), ("x-b", "c")),
    (("x-a", "a"), ("x-a", "\r\n b")), (("x-a", "a\nHost: evil"),),
    (("user-agent", "a\nuser-agent: b"),), (("x-a", "1\r\n b"), ("connection", "x-a")),
    (("x-a", "a\nfoo"),), (("x-a", "a\n: c"),), (("x\ra", "1"),), (("x-a", "a\x0bb"),),
    # Joined before they are read: TE lines, Upgrade lines, an empty Connection line.
    (("te", "gzip"), ("te", "trailers")),
    (("connection", "upgrade"), ("upgrade", "websocket"), ("upgrade", "foo")),
    (("connection", ""), ("connection", "x-a"), ("x-a", "1")),
    # Framing: Content-Length is a number, once; Transfer-Encoding is chunked, alone.
    *((("content-length", v),) for v in ("abc", "", "-1", "+0", "0, 0", "1 1", " 00 ")),
    (("content-length", "18446744073709551615"),), (("content-length", "18446744073709551616"),),
    (("content-length", "0"), ("content-length", "0")),
    *((("transfer-encoding", v),) for v in ("gzip", "chunked,", "", "CHUNKED", " chunked ")),
    (("transfer-encoding", "chunked"), ("transfer-encoding", "")),
    (("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")),
    (("transfer-encoding", "chunked"), ("content-length", "0")),
    (("content-length", "0"), ("transfer-encoding", "gzip")),
    (("transfer-encoding", "gzip"), ("x y", "1")),
    # The head's size (request line to the empty line: 60 KiB) and number of headers (100,
    # Host included, the lines of an inline header counting once) — and what comes first.
    (("x-big", "a" * 61386),), (("x-big", "a" * 61387),),
    (("user-agent", "a" * 61357), ("user-agent", "a" * 10)),
    (("user-agent", "a" * 61358), ("user-agent", "a" * 10)),
    _numbered(99), _numbered(100), _numbered(99, ("x-e", "")),
    *(_numbered(98, (name, "1"), (name, "1")) for name in _INLINE_SAMPLE),
    _numbered(98, ("x-same", "1"), ("x-same", "2")),
    _numbered(98, ("http2-settings", "1"), ("http2-settings", "1")),
    _numbered(98, ("cookie", "a=1"), ("cookie", "b=2")),
    (("x y", "1"), ("x-big", "a" * 62000)),
    (("x y", "1"), *_numbered(100)),
    _numbered(100, ("content-length", "abc")),
    _numbered(101, ("transfer-encoding", "gzip")),
    _numbered(101, ("transfer-encoding", "chunked"), ("content-length", "0")),
    _numbered(101, ("connection", "x-forwarded-for")),
)  # fmt: skip
# Sent through the client's own sidecar (its HTTP proxy listener, as HTTP_PROXY clients
# do): what that sidecar adds and the destination then counts, and what it refuses or
# answers itself (upgrades, Expect: trustmesh's outbound listeners differ from Istio's).
PROXIED: tuple[Lines, ...] = (
    (),
    (("connection", "upgrade"), ("upgrade", "websocket")),
    (("connection", "upgrade"), ("upgrade", "foo")),
    (("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c"), ("http2-settings", "A")),
    (("expect", "100-continue"),), (("expect", "100-Continue"),), (("expect", "foo"),),
    (("x-forwarded-proto", "https"),),
    (("x-request-id", "abc"),), (("x-request-id", ""),),
    (("connection", "x-user"), ("x-user", "ops")),
    (("te", "gzip"),), (("te", "trailers"),),
    (("x-forwarded-client-cert", "URI=spiffe://cluster.local/ns/foo/sa/admin"),),
    (("x-envoy-retry-on", "5xx"), ("x-envoy-original-path", "/x")),
    (("x-forwarded-for", "10.0.0.1"),), (("x-a", " spaced "),),
    (("user-agent", "a"), ("user-agent", "b")), (("x-a", "1"), ("x-a", "2")),
    _numbered(97), _numbered(98), _numbered(97, ("x-request-id", "a")),
    _numbered(96, ("user-agent", "a"), ("user-agent", "b")),
    (("x-big", "a" * 61309),), (("x-big", "a" * 61310),),
    (("x-big", "a" * 61290), ("x-forwarded-proto", "http")),
    (("x-big", "a" * 61291), ("x-forwarded-proto", "http")),
    (("transfer-encoding", "gzip"),), (("x y", "1"),),
)  # fmt: skip
# Sent over mesh mTLS too: what the handshake changes.
MTLS: tuple[Lines, ...] = (
    (),
    (("x-forwarded-client-cert", "URI=spiffe://cluster.local/ns/foo/sa/admin"),),
    (("x-forwarded-proto", "http"),),
    (("connection", "x-user"), ("x-user", "ops")),
)


_REQUEST_LINE, _HOST = "GET /get HTTP/1.1", "httpbin.foo:8000"
_PROXY_LINE = f"GET http://{_HOST}/get HTTP/1.1"  # to the client sidecar's HTTP proxy


def _wire(lines: Lines, request_line: str = _REQUEST_LINE) -> bytes:
    head = [request_line, f"Host: {_HOST}", *(f"{n}: {v}" for n, v in lines)]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


async def _send(
    address: str,
    tls: ssl.SSLContext | None,
    lines: Lines,
    *,
    port: int = 8000,
    request_line: str = _REQUEST_LINE,
) -> tuple[int, str]:
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(address, port, ssl=tls)
        try:
            writer.write(_wire(lines, request_line))
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            if head.startswith("HTTP/1.1 100 "):  # a sidecar answering Expect itself
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status_line, *rest = head.removesuffix("\r\n\r\n").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in rest)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            return int(status_line.split()[1]), body.decode("utf-8", "replace")
        finally:
            writer.transport.abort()


def _seen(status: int, body: str) -> tuple[int, list[tuple[str, str]]]:
    """Envoy's answer as (status, sorted header lines) with the random parts made stable."""
    if status != 200:
        return status, []
    lines = []
    for line in body.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(":"):
            continue
        if name == "x-request-id" and re.fullmatch(r"[0-9a-f-]{36}", value):
            value = GENERATED_REQUEST_ID
        if name == "x-forwarded-client-cert":
            value = re.sub(r"Hash=[0-9a-f]{64}", f"Hash={UNKNOWN_CERT_HASH}", value)
        lines.append((name, value))
    return 200, sorted(lines)


def _predicted(
    lines: Lines, peer: str | None, *, proxied: bool = False
) -> tuple[int, list[tuple[str, str]]]:
    try:
        view = filter_headers(
            lines,
            peer=peer,
            local="cluster.local/ns/foo/sa/httpbin",
            request_line=_PROXY_LINE if proxied else _REQUEST_LINE,
            host_lines=(_HOST,),
            client_proxy=ClientProxy(TRUSTMESH_SIDECAR, "GET", "/get", _HOST) if proxied else None,
        )
    except PathRejected as refused:
        return refused.status, []
    return 200, sorted((name, value) for name, values in view.items() for value in values)


def _dump_first(bootstrap: dict[str, Any]) -> None:
    """Put the Lua dump in front of every inbound HTTP filter chain's filters."""
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener.get("filter_chains", []):
            for network_filter in chain["filters"]:
                config = network_filter.get("typed_config", {})
                if "http_filters" in config:
                    lua = {"@type": _LUA_TYPE, "default_source_code": {"inline_string": _DUMP}}
                    config["http_filters"].insert(0, {"name": "dump", "typed_config": lua})


@pytest.mark.envoy
def test_the_evaluator_sees_the_headers_envoy_hands_the_policy_filters(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars, workroot: Path
) -> None:
    inbound, app = loopback.address(), loopback.address()
    resources = translate(compile_text(""), "foo/httpbin", inbound_address=inbound, app_address=app)
    base = _bootstrap_patch(resources)

    def patch(bootstrap: dict[str, Any]) -> None:
        base(bootstrap)
        _dump_first(bootstrap)

    mtls = _mesh_client(ca, workroot, alpn=("istio-http/1.1",))
    peer = "cluster.local/ns/foo/sa/sleep"

    async def scenario() -> list[str]:
        wrong = []
        async with sidecars.run("httpbin", ca.issue("foo", "httpbin"), patch=patch):
            sends = [(lines, None) for lines in PLAINTEXT] + [(lines, peer) for lines in MTLS]
            for lines, via in sends:
                got = _seen(*await _send(inbound, mtls if via else None, lines))
                want = _predicted(lines, via)
                if got != want:
                    wrong.append(
                        f"{'mTLS' if via else 'plain'} {lines}:\n  envoy {got}\n  model {want}"
                    )
        return wrong

    wrong = run(scenario(), timeout=60)
    assert not wrong, "\n".join(wrong)


@pytest.mark.envoy
def test_through_the_client_sidecar_the_evaluator_sees_what_envoy_hands_the_filters(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars
) -> None:
    mesh = compile_text("")
    inbound, app, outbound = loopback.address(), loopback.address(), loopback.address()
    server = translate(mesh, "foo/httpbin", inbound_address=inbound, app_address=app)
    client = translate(
        mesh,
        "foo/sleep",
        inbound_address=loopback.address(),
        outbound_address=outbound,
        workload_addresses={"foo/httpbin": inbound},
    )
    base = _bootstrap_patch(server)

    def patch(bootstrap: dict[str, Any]) -> None:
        base(bootstrap)
        _dump_first(bootstrap)

    peer = "cluster.local/ns/foo/sa/sleep"

    async def scenario() -> list[str]:
        wrong = []
        async with (
            sidecars.run("httpbin", ca.issue("foo", "httpbin"), patch=patch),
            sidecars.run("sleep", ca.issue("foo", "sleep"), patch=_bootstrap_patch(client)),
        ):
            for lines in PROXIED:
                sent = _send(outbound, None, lines, port=15001, request_line=_PROXY_LINE)
                got = _seen(*await sent)
                want = _predicted(lines, peer, proxied=True)
                if got != want:
                    wrong.append(f"{lines}:\n  envoy {got}\n  model {want}")
        return wrong

    wrong = run(scenario(), timeout=60)
    assert not wrong, "\n".join(wrong)


def test_the_table_is_not_vacuous() -> None:
    """The measured table removes something, keeps other x-envoy-* headers and refuses."""
    view = filter_headers(_ALL_ENVOY + _OTHERS)
    assert ENVOY_INTERNAL_REMOVED.isdisjoint(view) and "x-envoy-original-path" in view
    assert "keep-alive" not in view and view["x-request-id"] == (GENERATED_REQUEST_ID,)
    assert "x-user" not in filter_headers((("connection", "x-user"), ("x-user", "ops")))
    with pytest.raises(PathRejected):
        filter_headers((("connection", "x-forwarded-for"),))
    statuses = {_predicted(lines, None)[0] for lines in PLAINTEXT}
    assert statuses == {200, 400, 403, 431, 501}
    proxied = [
        _predicted(lines, "cluster.local/ns/foo/sa/sleep", proxied=True) for lines in PROXIED
    ]
    assert {status for status, _ in proxied} == {200, 400, 403, 431, 501}
    assert ("x-forwarded-proto", "http") in proxied[0][1]

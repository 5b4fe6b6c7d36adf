"""Request-smuggling defences against real Envoy 1.40 (trustmesh.policy.headers).

1. The facts the evaluator builds on: exactly the headers of ``ENVOY_JOINED_HEADERS`` have
   their repeated lines joined by Envoy; the others stay separate lines.
2. The inbound listener translate() generates refuses the attacks over HTTP/1.1 — as the
   evaluator predicts, request by request — and over HTTP/2 (Host next to ``:authority``,
   two ``:authority`` fields, userinfo), and what it lets through reaches the application
   as RBAC saw it (one Host, without the trailing dot).
3. Over ADS, a policy that starts naming a header switches the guard slot from a no-op to
   the Lua guard on a connection that is already open.

The request grid through one Envoy, compared with the evaluator, is in
test_rbac_differential (policy set ``SMUGGLING`` of rbac_cases).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.envoy.conftest import (  # fixtures are registered by importing them
    MiniCA,
    Sidecars,
    ca,
    eventually,
    run,
    sidecars,
    workroot,
)
from tests.unit.meshutil import compile_text
from tests.xds.h2_client import h2_request
from tests.xds.rbac_cases import SMUGGLING
from tests.xds.rbac_rig import _listener, bootstrap, free_addresses, reaped
from tests.xds.translate_rig import HCM, ROUTER, _ads_patch, _bootstrap_patch
from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.headers import ENVOY_JOINED_HEADERS
from trustmesh.policy.request import HttpRequest, Request, Source
from trustmesh.xds.cache import Snapshot, SnapshotCache
from trustmesh.xds.rbac import HTTP_RBAC_TYPE
from trustmesh.xds.server import AdsServer
from trustmesh.xds.translate import translate

__all__ = ["ca", "sidecars", "workroot"]  # re-exported fixtures, used by name

# Headers Envoy does not keep inline: their lines reach filters and upstream one by one.
_SEPARATE = ("x-user", "cookie", "forwarded", "x-real-ip", "traceparent", "baggage", "range")
Lines = tuple[tuple[str, str], ...]


async def _send(address: str, port: int, raw: bytes, timeout: float = 5) -> tuple[int, bytes]:
    """One raw HTTP/1.1 request on a new connection: (status, body)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(address, port)
        try:
            writer.write(raw)
            return await _response(reader)
        finally:
            writer.transport.abort()


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.removesuffix("\r\n\r\n").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), body


def _h1(
    method: str, target: str, hosts: tuple[str, ...], lines: Lines, *, close: bool = True
) -> bytes:
    head = [f"{method} {target} HTTP/1.1", *(f"Host: {h}" for h in hosts)]
    head += [f"{name}: {value}" for name, value in lines]
    head += ["Content-Length: 0", *(["Connection: close"] if close else [])]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


# --- 1. which headers Envoy joins ------------------------------------------------------


def test_envoy_joins_exactly_the_headers_the_evaluator_joins(tmp_path: Path) -> None:
    """Per header, an RBAC ALLOW policy matching only the joined value ``a1,b2``: a request
    sending the header twice (``a1``, ``b2``) is allowed exactly when Envoy joined it."""
    names = sorted(ENVOY_JOINED_HEADERS | set(_SEPARATE))
    policies = {
        name: {
            "permissions": [{"any": True}],
            "principals": [{"header": {"name": name, "string_match": {"exact": "a1,b2"}}}],
        }
        for name in names
    }
    rbac = {"@type": HTTP_RBAC_TYPE, "rules": {"action": "ALLOW", "policies": policies}}
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200}}
    manager = {
        "@type": HCM,
        "stat_prefix": "joined",
        "codec_type": "HTTP1",
        "route_config": {"virtual_hosts": [{"name": "x", "domains": ["*"], "routes": [route]}]},
        "http_filters": [
            {"name": "rbac", "typed_config": rbac},
            {"name": "router", "typed_config": {"@type": ROUTER}},
        ],
    }
    (address,) = free_addresses(1, (8000,), frozenset())
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
    envoy = EnvoyProcess(
        bootstrap([_listener("joined", address, 8000, [hcm])], []), workdir=tmp_path, concurrency=1
    )

    async def scenario() -> dict[str, bool]:
        with reaped(envoy):
            await envoy.start(timeout=15)
            try:
                statuses = await asyncio.gather(
                    *(
                        _send(address, 8000, _h1("GET", "/", ("x",), ((n, "a1"), (n, "b2"))))
                        for n in names
                    )
                )
            finally:
                await envoy.stop()
        return {name: status == 200 for name, (status, _) in zip(names, statuses, strict=True)}

    joined = run(scenario(), timeout=30)
    assert {name for name, yes in joined.items() if yes} == set(ENVOY_JOINED_HEADERS)


# --- 2. the translated inbound listener, HTTP/1.1 and HTTP/2 ---------------------------


@contextlib.asynccontextmanager
async def _echo_app(address: str, port: int) -> AsyncIterator[None]:
    """The workload: answers with the header lines it received, as JSON pairs."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            _, *lines = head.removesuffix("\r\n\r\n").split("\r\n")
            pairs = [
                (k.strip().lower(), v.strip()) for k, _, v in (x.partition(":") for x in lines)
            ]
            length = int(dict(pairs).get("content-length", "0"))
            await reader.readexactly(length)
            body = json.dumps(pairs).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, address, port)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


def _two_free_addresses() -> tuple[str, str]:
    # Other suites on this host bind port 8000 on loopback addresses too: take free ones.
    inbound, app = free_addresses(2, (8000,), frozenset())
    return inbound, app


def _seen(body: bytes, name: str) -> list[str]:
    return [value for key, value in json.loads(body) if key == name]


def _offline(
    mesh: MeshPolicy, method: str, target: str, hosts: tuple[str, ...], lines: Lines
) -> int:
    host_lines = tuple(("Host", h) for h in hosts[1:])
    http = HttpRequest(method, target, hosts[0], (*host_lines, *lines))
    decision = evaluate(
        mesh, Request(Source.plaintext("127.0.0.1"), "foo/httpbin", 8000, http), now=time.time()
    )
    assert decision.status is not None
    return decision.status


# (method, target, Host lines, other lines, the status Envoy and the evaluator both give)
_H1_ATTACKS: tuple[tuple[str, str, tuple[str, ...], Lines, int], ...] = (
    ("POST", "/get", ("httpbin.foo:8000",), (("x-user", "ops"),), 200),
    ("POST", "/get", ("httpbin.foo:8000",), (("x-user", "ops"), ("x-user", "mallory")), 400),
    ("POST", "/get", ("httpbin.foo:8000",), (("X-User", "ops"), ("x-user", "mallory")), 400),
    ("GET", "/admin", ("httpbin.foo:8000",), (("x-role", "guest"), ("x-role", "admin")), 400),
    ("GET", "/get", ("httpbin.foo:8000",), (("x-blocked", "ok"), ("x-blocked", "mallory")), 400),
    ("GET", "/get", ("internal.foo.",), (), 403),
    ("GET", "/get", ("internal.foo..",), (), 403),
    ("GET", "/get", ("httpbin.foo:8000", "internal.foo"), (), 403),
    ("GET", "/get", ("user@internal.foo",), (), 403),
    ("GET", "http://user@internal.foo/get", ("httpbin.foo:8000",), (), 403),
)


@pytest.mark.envoy
def test_translated_listener_refuses_smuggled_requests(ca: MiniCA, sidecars: Sidecars) -> None:
    mesh = compile_text(SMUGGLING)
    inbound, app = _two_free_addresses()
    resources = translate(mesh, "foo/httpbin", inbound_address=inbound, app_address=app)

    async def scenario() -> None:
        async with (
            _echo_app(app, 8000),
            sidecars.run("httpbin", ca.issue("foo", "httpbin"), patch=_bootstrap_patch(resources)),
        ):
            for method, target, hosts, lines, expected in _H1_ATTACKS:
                status, body = await _send(inbound, 8000, _h1(method, target, hosts, lines))
                offline = _offline(mesh, method, target, hosts, lines)
                assert (status, offline) == (expected, expected), (target, hosts, lines, body)
                if status == 403 and len(hosts) > 1:
                    assert body == b"RBAC: access denied"

            # What passes reaches the app as RBAC saw it: Host without the trailing dot,
            # a header Envoy joins as one line.
            status, body = await _send(
                inbound,
                8000,
                _h1("GET", "/get", ("httpbin.foo.",), (("user-agent", "a"), ("user-agent", "b"))),
            )
            assert status == 200
            assert _seen(body, "host") == ["httpbin.foo"]
            assert _seen(body, "user-agent") == ["a,b"]

            # HTTP/2: Envoy authorizes :authority and forwards it as the only Host; a host
            # field next to it is dropped; userinfo or two :authority fields reset the stream.
            base = [(":method", "POST"), (":scheme", "http"), (":path", "/get")]
            h2 = {
                "authority+host": [(":authority", "internal.foo"), ("host", "httpbin.foo")],
                "host only": [("host", "internal.foo")],
                "trailing dot": [(":authority", "INTERNAL.foo.")],
                "joined": [(":authority", "httpbin.foo,internal.foo")],
                "userinfo": [(":authority", "user@internal.foo")],
                "two authorities": [(":authority", "httpbin.foo"), (":authority", "internal.foo")],
                "repeated x-user": [
                    (":authority", "httpbin.foo"),
                    ("x-user", "ops"),
                    ("x-user", "mallory"),
                ],
                "one x-user": [(":authority", "httpbin.foo"), ("x-user", "ops")],
            }
            got = {
                name: await h2_request(inbound, 8000, [*base, *fields])
                for name, fields in h2.items()
            }
            assert got == {
                "authority+host": 403,
                "host only": 403,
                "trailing dot": 403,
                "joined": 403,
                "userinfo": "reset",
                "two authorities": "reset",
                "repeated x-user": 400,
                "one x-user": 200,
            }

    run(scenario(), timeout=40)


# --- 3. over ADS: the guard slot follows the policies ---------------------------------


@pytest.mark.envoy
def test_header_guard_reaches_an_open_connection_over_ads(ca: MiniCA, sidecars: Sidecars) -> None:
    """The guard slot holds a no-op RBAC filter until a policy names a header; then the
    Lua guard replaces it, on a keep-alive connection that is already open."""
    inbound, app = _two_free_addresses()
    node = "sidecar~127.0.0.1~httpbin.foo~foo.svc.cluster.local"

    def snapshot(policies: str) -> Snapshot:
        resources = translate(
            compile_text(policies), "foo/httpbin", inbound_address=inbound, app_address=app
        )
        return Snapshot.from_resources(resources.all())

    cache = SnapshotCache()
    cache.set(node, snapshot(""))
    server = AdsServer(cache)
    repeated = (("x-user", "ops"), ("x-user", "mallory"))

    async def scenario() -> None:
        port = await server.start()
        try:
            async with (
                _echo_app(app, 8000),
                sidecars.run("httpbin", ca.issue("foo", "httpbin"), patch=_ads_patch(node, port)),
            ):

                async def ready() -> bool:
                    with contextlib.suppress(OSError, TimeoutError):
                        raw = _h1("POST", "/get", ("httpbin.foo:8000",), ())
                        return (await _send(inbound, 8000, raw, timeout=1))[0] == 200
                    return False

                await eventually(ready, what="the listener over ADS", timeout=10)
                reader, writer = await asyncio.open_connection(inbound, 8000)
                try:

                    async def post() -> int:
                        raw = _h1("POST", "/get", ("httpbin.foo:8000",), repeated, close=False)
                        writer.write(raw)
                        return (await _response(reader))[0]

                    assert await post() == 200  # no policy reads x-user yet
                    cache.set(node, snapshot(SMUGGLING))

                    async def refused() -> bool:
                        return await post() == 400

                    await eventually(refused, what="400 on the open connection", timeout=5)
                finally:
                    writer.transport.abort()
        finally:
            await server.stop()

    run(scenario(), timeout=30)

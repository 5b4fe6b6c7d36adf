"""CUSTOM authorization through real Envoy and the ext-authz sample (issue 12, must show 5).

One Envoy runs one HTTP listener per provider variant, each with exactly the filters the
translation gives ``foo/httpbin`` (CUSTOM shadow RBAC + ext_authz, then the RBAC filters)
in front of the httpbin sample, and TCP listeners with the network filters of
``foo/tcp-echo``. The ext-authz sample runs in this process, so the test reads how many
checks it answered. The clusters carry the names the translation refers to
(``outbound|<port>||ext-authz.foo.svc.cluster.local``), pointing at the sample, or at a
closed port for the "authorizer down" variants.

Every HTTP answer is also compared with the offline evaluator given the authorizer's
answer (``ext_authz``), so ``authz check --ext-authz`` stays what Envoy does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.unit.meshutil import compile_text, policy
from tests.xds.rbac_rig import bootstrap, reaped, static_cluster
from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.policy.compose import MeshPolicy
from trustmesh.policy.decision import Verdict
from trustmesh.policy.evaluate import evaluate
from trustmesh.policy.request import HttpRequest, Request, Source
from trustmesh.samples import httpbin
from trustmesh.samples.ext_authz import ExtAuthzServer
from trustmesh.xds.rbac import http_custom_filters, http_rbac_filters, network_rbac_filters

pytestmark = pytest.mark.envoy

HOST = "127.0.0.1"
AUTHZ_HOST = "ext-authz.foo.svc.cluster.local"
DOWN_HOST = "ext-authz-down.foo.svc.cluster.local"

SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: ext-authz, namespace: foo}
spec:
  selector: {app: ext-authz}
  ports: [{name: http, port: 8000}, {name: grpc, port: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: ext-authz-down, namespace: foo}
spec:
  selector: {app: ext-authz-down}
  ports: [{name: http, port: 8000}, {name: grpc, port: 9000}]
---
"""

# Provider variants: (name, kind, service host, port, extra fields).
PROVIDERS: dict[str, str] = {
    "sample-http": f"""envoyExtAuthzHttp:
      service: {AUTHZ_HOST}
      port: 8000
      includeRequestHeadersInCheck: [x-ext-authz]
      headersToUpstreamOnAllow: [x-ext-authz-check-result]
      headersToDownstreamOnDeny: [x-ext-authz-check-result]""",
    "sample-grpc": f"""envoyExtAuthzGrpc:
      service: foo/{AUTHZ_HOST}
      port: 9000""",
    "down-http-closed": f"""envoyExtAuthzHttp:
      service: {DOWN_HOST}
      port: 8000
      timeout: 2s""",
    "down-http-open": f"""envoyExtAuthzHttp:
      service: {DOWN_HOST}
      port: 8000
      timeout: 2s
      failOpen: true""",
    "down-grpc-closed": f"""envoyExtAuthzGrpc:
      service: {DOWN_HOST}
      port: 9000
      timeout: 2s""",
    "down-grpc-open": f"""envoyExtAuthzGrpc:
      service: {DOWN_HOST}
      port: 9000
      timeout: 2s
      failOpen: true""",
    "down-grpc-503": f"""envoyExtAuthzGrpc:
      service: {DOWN_HOST}
      port: 9000
      timeout: 2s
      statusOnError: "503\"""",
}


def mesh_for(provider: str, tcp_port: int) -> MeshPolicy:
    """foo/httpbin and foo/tcp-echo under a CUSTOM policy using ``provider`` on
    ``/anything/protected/*`` (HTTP) and ``tcp_port`` (TCP), every provider defined."""
    entries = "\n".join(f"  - name: {name}\n    {body}" for name, body in PROVIDERS.items())
    custom = policy(
        "ext",
        "foo",
        f"""selector: {{matchLabels: {{app: httpbin}}}}
action: CUSTOM
provider: {{name: {provider}}}
rules:
- to: [{{operation: {{paths: ["/anything/protected/*"]}}}}]""",
    ) + policy(
        "ext-tcp",
        "foo",
        f"""selector: {{matchLabels: {{app: tcp-echo}}}}
action: CUSTOM
provider: {{name: {provider}}}
rules:
- to: [{{operation: {{ports: ["{tcp_port}"]}}}}]""",
    )
    return compile_text(SERVICES + custom, mesh=f"extensionProviders:\n{entries}\n")


@dataclass(frozen=True)
class Reply:
    status: int  # 0: the connection was closed without an answer
    headers: dict[str, str]
    body: bytes


async def get(port: int, path: str, headers: dict[str, str] | None = None) -> Reply:
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            lines = [f"GET {path} HTTP/1.1", "Host: httpbin", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status_line, *fields = head.removesuffix("\r\n\r\n").split("\r\n")
            found = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
            body = await reader.read()
            return Reply(int(status_line.split()[1]), found, body)
        finally:
            writer.transport.abort()


async def tcp_echoed(port: int) -> bool:
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(b"ping\n")
            with contextlib.suppress(ConnectionError):
                return await reader.readline() == b"ping\n"
            return False
        finally:
            writer.transport.abort()


UNASKED = "unasked"


def offline(mesh: MeshPolicy, path: str, headers: dict[str, str], answer: bool | str | None) -> int:
    """The evaluator's status, told what the authorizer answers (None: it cannot be
    reached; UNASKED: no answer given)."""
    lines = tuple(headers.items())
    request = Request(
        Source.plaintext(HOST), "foo/httpbin", 8000, HttpRequest("GET", path, "httpbin", lines)
    )
    wp = mesh.for_workload("foo/httpbin")
    assert wp is not None
    [provider] = {p.spec.provider.name for p in wp.authz.custom.policies}
    answers: dict[str, bool | None] = {}
    if answer is None or isinstance(answer, bool):
        answers[provider] = answer
    decision = evaluate(mesh, request, now=time.time(), ext_authz=answers)
    assert decision.status is not None
    return decision.status


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def servers(authz: ExtAuthzServer) -> AsyncIterator[tuple[int, int, int]]:
    """The authorizer (HTTP, gRPC ports) and httpbin as the app, in this process."""
    stop = asyncio.Event()
    authz_ports: list[int] = []
    app_ports: list[int] = []
    tasks = [
        asyncio.create_task(
            authz.serve(HOST, 0, 0, stop=stop, ready=lambda _h, p: authz_ports.append(p))
        ),
        asyncio.create_task(
            httpbin.serve(HOST, 0, stop=stop, ready=lambda _h, p: app_ports.append(p))
        ),
    ]
    try:
        async with asyncio.timeout(10):
            while len(authz_ports) < 2 or not app_ports:
                await asyncio.sleep(0.01)  # polling the ready callbacks, not a fixed wait
        yield authz_ports[0], authz_ports[1], app_ports[0]
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


def _h2(cluster: dict[str, Any]) -> dict[str, Any]:
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    return cluster


_HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)


def _http_listener(name: str, port: int, filters: list[dict[str, Any]]) -> dict[str, Any]:
    router = {
        "name": "router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        },
    }
    manager = {
        "@type": _HCM,
        "stat_prefix": name,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": name,
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}],
                }
            ]
        },
        "http_filters": [*filters, router],
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": HOST, "port_value": port}},
        "filter_chains": [{"filters": [{"name": "hcm", "typed_config": manager}]}],
    }


def _tcp_listener(
    name: str, port: int, filters: list[dict[str, Any]], cluster: str
) -> dict[str, Any]:
    proxy = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": name,
        "cluster": cluster,
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": HOST, "port_value": port}},
        "filter_chains": [{"filters": [*filters, {"name": "tcp", "typed_config": proxy}]}],
    }


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        writer.write(await reader.readline())
        await writer.drain()
    writer.close()


def test_ext_authz_live(tmp_path: Path) -> None:
    asyncio.run(_live(tmp_path))


async def _live(tmp_path: Path) -> None:
    authz = ExtAuthzServer(log=lambda _line: None)
    tcp_ports = {name: _free_port() for name in PROVIDERS}
    meshes = {name: mesh_for(name, tcp_ports[name]) for name in PROVIDERS}
    echo = await asyncio.start_server(_echo, HOST, 0)
    echo_port = echo.sockets[0].getsockname()[1]
    async with echo, servers(authz) as (authz_http, authz_grpc, app_port):
        dead = _free_port()  # nothing listens: the "authorizer down" variants
        clusters = [
            static_cluster("app", HOST, app_port),
            static_cluster("echo", HOST, echo_port),
            static_cluster(f"outbound|8000||{AUTHZ_HOST}", HOST, authz_http),
            _h2(static_cluster(f"outbound|9000||{AUTHZ_HOST}", HOST, authz_grpc)),
            static_cluster(f"outbound|8000||{DOWN_HOST}", HOST, dead),
            _h2(static_cluster(f"outbound|9000||{DOWN_HOST}", HOST, dead)),
        ]
        listeners: list[dict[str, Any]] = []
        ports: dict[str, int] = {}
        for name, mesh in meshes.items():
            wp = mesh.for_workload("foo/httpbin")
            assert wp is not None
            filters = [*http_custom_filters(wp, mesh), *http_rbac_filters(wp, mesh)]
            ports[name] = _free_port()
            listeners.append(_http_listener(name, ports[name], filters))
            tcp = mesh.for_workload("foo/tcp-echo")
            assert tcp is not None
            network = network_rbac_filters(tcp, mesh, tcp_ports[name])
            listeners.append(_tcp_listener(f"{name}-tcp", tcp_ports[name], network, "echo"))
        envoy = EnvoyProcess(bootstrap(listeners, clusters), workdir=tmp_path, concurrency=1)
        with reaped(envoy):
            await envoy.start(timeout=20)
            try:
                await _check(authz, meshes, ports, tcp_ports)
            finally:
                await envoy.stop()


async def _check(
    authz: ExtAuthzServer,
    meshes: dict[str, MeshPolicy],
    ports: dict[str, int],
    tcp_ports: dict[str, int],
) -> None:
    allow = {"x-ext-authz": "allow"}
    for name, kind in (("sample-http", "http"), ("sample-grpc", "grpc")):
        mesh, port = meshes[name], ports[name]
        before = dict(authz.checks)
        allowed = await get(port, "/anything/protected/x", allow)
        assert allowed.status == 200, (name, allowed)
        # What the authorizer added reached the app (HTTP: headersToUpstreamOnAllow).
        assert b'"X-Ext-Authz-Check-Result": "allowed"' in allowed.body, allowed.body
        denied = await get(port, "/anything/protected/x", {"x-ext-authz": "nope"})
        assert denied.status == 403, (name, denied)
        assert denied.headers.get("x-ext-authz-check-result") == "denied", denied.headers
        assert denied.body.startswith(b"denied by ext_authz"), denied.body
        if kind == "http":
            # headersToDownstreamOnDeny names only the result header: nothing else leaks.
            assert "x-ext-authz-check-received" not in denied.headers
        assert authz.checks[kind] == before[kind] + 2, (name, authz.checks)
        # Not matched by the CUSTOM rule: the authorizer is never asked.
        public = await get(port, "/headers")
        assert public.status == 200
        assert authz.checks[kind] == before[kind] + 2, (name, authz.checks)
        assert offline(mesh, "/anything/protected/x", allow, True) == 200
        assert offline(mesh, "/anything/protected/x", {}, False) == 403
        assert offline(mesh, "/headers", {}, UNASKED) == 200

    # The authorizer cannot be reached: statusOnError (default 403) or failOpen.
    expected = {
        "down-http-closed": 403,
        "down-http-open": 200,
        "down-grpc-closed": 403,
        "down-grpc-open": 200,
        "down-grpc-503": 503,
    }
    for name, status in expected.items():
        reply = await get(ports[name], "/anything/protected/x", allow)
        assert reply.status == status, (name, reply)
        assert offline(meshes[name], "/anything/protected/x", allow, None) == status, name
        assert (await get(ports[name], "/headers")).status == 200, name

    # TCP: a gRPC provider checks the connection (the sample denies a caller without
    # the allowed service account); an HTTP provider is left out, as in Istio.
    before = authz.checks["grpc"]
    assert not await tcp_echoed(tcp_ports["sample-grpc"])
    assert authz.checks["grpc"] == before + 1
    assert await tcp_echoed(tcp_ports["sample-http"])
    tcp = meshes["sample-http"]
    verdict = evaluate(
        tcp,
        Request(Source.plaintext(HOST), "foo/tcp-echo", tcp_ports["sample-http"], None),
        now=time.time(),
    )
    # Not denied by CUSTOM (the port is the rig's, so "nothing listens" there offline).
    assert verdict.verdict is not Verdict.DENY, verdict
    assert await tcp_echoed(tcp_ports["down-grpc-open"])
    assert not await tcp_echoed(tcp_ports["down-grpc-closed"])

"""Traffic controls in real Envoys configured by translate(): Istio's "local rate limiting"
task (an EnvoyFilter on a sidecar's inbound), its "circuit breaking" task (connectionPool
under concurrent load) and outlier detection ejecting a failing endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.envoy.conftest import (  # fixtures are registered by importing them
    Loopback,
    MiniCA,
    Sidecars,
    ca,
    eventually,
    loopback,
    run,
    sidecars,
    workroot,
)
from tests.unit.meshutil import compile_text
from tests.xds.h2_client import _END_HEADERS, _END_STREAM, _PREFACE, _frame, _literal, _status
from tests.xds.translate_rig import _bootstrap_patch, _exchange, _route_listener
from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.xds.translate import ProxyResources, translate

__all__ = ["ca", "loopback", "sidecars", "workroot"]  # re-exported fixtures, used by name

# Istio's "local rate limiting" task, at 10 requests per second.
LOCAL_RATE_LIMIT = (
    """
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: filter-local-ratelimit-svc, namespace: foo}
spec:
  workloadSelector: {labels: {app: httpbin}}
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: SIDECAR_INBOUND
      listener:
        filterChain:
          filter:
            name: envoy.filters.network.http_connection_manager
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/"""
    """envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          value:
            stat_prefix: http_local_rate_limiter
            token_bucket: {max_tokens: 10, tokens_per_fill: 10, fill_interval: 1s}
            filter_enabled:
              runtime_key: local_rate_limit_enabled
              default_value: {numerator: 100, denominator: HUNDRED}
            filter_enforced:
              runtime_key: local_rate_limit_enforced
              default_value: {numerator: 100, denominator: HUNDRED}
            response_headers_to_add:
            - append_action: OVERWRITE_IF_EXISTS_OR_ADD
              header: {key: x-local-rate-limit, value: 'true'}
"""
)

# The task's per-route variant: the filter in the chain has no bucket of its own, the inbound
# route's typed_per_filter_config (a patch of the route served over RDS) sets it.
PER_ROUTE_RATE_LIMIT = (
    """
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: filter-local-ratelimit-svc, namespace: foo}
spec:
  workloadSelector: {labels: {app: httpbin}}
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: SIDECAR_INBOUND
      listener:
        filterChain:
          filter:
            name: envoy.filters.network.http_connection_manager
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/"""
    """envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          value: {stat_prefix: http_local_rate_limiter}
  - applyTo: HTTP_ROUTE
    match:
      context: SIDECAR_INBOUND
      routeConfiguration:
        vhost:
          name: inbound|http|8000
          route: {action: ANY}
    patch:
      operation: MERGE
      value:
        typed_per_filter_config:
          envoy.filters.http.local_ratelimit:
            "@type": type.googleapis.com/udpa.type.v1.TypedStruct
            type_url: type.googleapis.com/"""
    """envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
            value:
              stat_prefix: http_local_rate_limiter
              token_bucket: {max_tokens: 10, tokens_per_fill: 10, fill_interval: 1s}
              filter_enabled:
                runtime_key: local_rate_limit_enabled
                default_value: {numerator: 100, denominator: HUNDRED}
              filter_enforced:
                runtime_key: local_rate_limit_enforced
                default_value: {numerator: 100, denominator: HUNDRED}
"""
)

# Istio's "circuit breaking" task (plaintext here: the upstream is a bare test app).
CIRCUIT_BREAKER = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin, namespace: foo}
spec:
  host: httpbin
  trafficPolicy:
    tls: {mode: DISABLE}
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"""

SECOND_HTTPBIN = """
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin-v2, namespace: foo}
spec:
  selector:
    matchLabels: {app: httpbin, version: v2}
  template:
    metadata:
      labels: {app: httpbin, version: v2}
    spec:
      serviceAccountName: httpbin
      containers:
      - name: httpbin
        ports:
        - containerPort: 8000
"""
HTTPBIN_CLUSTER = "outbound|8000||httpbin.foo.svc.cluster.local"


async def _h2_burst(host: str, port: int, count: int) -> list[int | str]:
    """``count`` GET requests as concurrent HTTP/2 streams in one write (Envoy decodes them
    in one read, so no token can be refilled between them); their statuses in order."""
    block = b"".join(
        _literal(name, value)
        for name, value in (
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/get"),
            (":authority", "httpbin.foo:8000"),
        )
    )
    streams = [2 * i + 1 for i in range(count)]
    statuses: dict[int, int | str] = {}
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                _PREFACE
                # HEADER_TABLE_SIZE 0: no dynamic HPACK table, so a status is always a
                # static entry or a literal.
                + _frame(0x4, 0, 0, struct.pack(">HI", 1, 0))
                + b"".join(_frame(0x1, _END_STREAM | _END_HEADERS, s, block) for s in streams)
            )
            while len(statuses) < count:
                head = await reader.readexactly(9)
                length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                payload = await reader.readexactly(length)
                if kind == 0x4 and not flags & 0x1:
                    writer.write(_frame(0x4, 0x1, 0, b""))
                elif kind == 0x1 and stream not in statuses:
                    if flags & 0x8:
                        payload = payload[1 : len(payload) - payload[0]]
                    if flags & 0x20:
                        payload = payload[5:]
                    while payload[0] & 0xE0 == 0x20:  # a table size update (to 0)
                        payload = payload[1:]
                    statuses[stream] = _status(payload)
                elif kind == 0x3:
                    statuses[stream] = "reset"
                elif kind == 0x7:
                    break
        finally:
            writer.transport.abort()
    return [statuses.get(s, "none") for s in streams]


async def _counter(envoy: EnvoyProcess, name: str) -> int:
    """One counter from Envoy's admin ``/stats`` (names with ``|`` taken literally)."""
    pattern = urllib.parse.quote(f"^{re.escape(name)}$")
    response = await envoy.admin_get(f"/stats?filter={pattern}")
    for line in response.body.decode().splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


@contextlib.asynccontextmanager
async def _status_app(
    address: str, port: int, status: int, hits: list[str], delay: float = 0.0
) -> AsyncIterator[None]:
    """An upstream answering every request with ``status`` after ``delay`` seconds of
    service time (what makes requests overlap under the circuit breaker)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                hits.append(head.split(" ", 2)[1])
                if delay:
                    await asyncio.sleep(delay)
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
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


def _client_patch(resources: ProxyResources, listen: tuple[str, int], log: Path) -> Any:
    """The client's translation plus a plaintext listener using route configuration 8000
    (as the app would reach its sidecar), logging each response's code and flags."""
    base = _bootstrap_patch(resources)
    (route,) = [r for r in resources.routes if r["name"] == "8000"]

    def patch(bootstrap: dict[str, Any]) -> None:
        base(bootstrap)
        listener = _route_listener("outbound-test", route, listen)
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        manager["access_log"] = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(log),
                    "log_format": {
                        "text_format_source": {
                            "inline_string": "%RESPONSE_CODE% %RESPONSE_FLAGS%\n"
                        }
                    },
                },
            }
        ]
        bootstrap["static_resources"]["listeners"].append(listener)

    return patch


@pytest.mark.envoy
@pytest.mark.parametrize("envoy_filter", [LOCAL_RATE_LIMIT, PER_ROUTE_RATE_LIMIT])
def test_live_local_rate_limit_lets_10_through_and_answers_429(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars, envoy_filter: str
) -> None:
    inbound, app = loopback.address(), loopback.address()
    resources = translate(
        compile_text(envoy_filter), "foo/httpbin", inbound_address=inbound, app_address=app
    )
    hits: list[str] = []

    async def scenario() -> None:
        async with (
            _status_app(app, 8000, 200, hits),
            sidecars.run(
                "httpbin", ca.issue("foo", "httpbin"), patch=_bootstrap_patch(resources)
            ) as sidecar,
        ):
            statuses = await _h2_burst(inbound, 8000, 15)
            assert sorted(statuses, key=str) == [200] * 10 + [429] * 5, statuses
            assert len(hits) == 10  # the limited requests never reached the app
            limited = await _counter(
                sidecar.envoy, "http_local_rate_limiter.http_local_rate_limit.rate_limited"
            )
            assert limited == 5

    run(scenario(), timeout=30)


@pytest.mark.envoy
def test_live_circuit_breaker_overflows_with_503_uo_under_concurrent_load(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars, workroot: Path
) -> None:
    app, client = loopback.address(), loopback.endpoint()
    sleep = translate(
        compile_text(CIRCUIT_BREAKER),
        "foo/sleep",
        inbound_address=loopback.address(),
        workload_addresses={"foo/httpbin": app},
    )
    log = workroot / "client-access.log"
    hits: list[str] = []
    replies: list[tuple[int, str]] = []

    async def worker(requests: int) -> None:
        reader, writer = await asyncio.open_connection(*client)
        try:
            for _ in range(requests):
                reply = await _exchange(
                    reader, writer, "GET", "/get", "httpbin.foo:8000", close=False
                )
                replies.append((reply.status, reply.headers.get("x-envoy-overloaded", "")))
        finally:
            writer.transport.abort()

    async def scenario() -> int:
        async with (
            _status_app(app, 8000, 200, hits, delay=0.02),
            sidecars.run(
                "sleep", ca.issue("foo", "sleep"), patch=_client_patch(sleep, client, log)
            ) as sidecar,
        ):
            async with asyncio.timeout(20):
                await asyncio.gather(*(worker(20) for _ in range(3)))
            return await _counter(
                sidecar.envoy, f"cluster.{HTTPBIN_CLUSTER}.upstream_rq_pending_overflow"
            )

    overflow = run(scenario(), timeout=40)
    ok = [r for r in replies if r[0] == 200]
    tripped = [r for r in replies if r[0] != 200]
    assert len(replies) == 60
    assert ok and tripped, replies
    assert set(tripped) == {(503, "true")}  # Envoy's overflow answer, nothing else
    assert overflow == len(tripped)
    assert len(hits) == len(ok)
    logged = log.read_text().split("\n")  # flushed when the sidecar stopped
    assert logged.count("503 UO") == len(tripped)
    assert logged.count("200 -") == len(ok)


@pytest.mark.envoy
def test_live_outlier_detection_ejects_the_failing_endpoint(
    ca: MiniCA, loopback: Loopback, sidecars: Sidecars, workroot: Path
) -> None:
    good, bad, client = loopback.address(), loopback.address(), loopback.endpoint()
    sleep = translate(
        compile_text(CIRCUIT_BREAKER + SECOND_HTTPBIN),
        "foo/sleep",
        inbound_address=loopback.address(),
        workload_addresses={"foo/httpbin": good, "foo/httpbin-v2": bad},
    )
    (cluster,) = [c for c in sleep.clusters if c["name"] == HTTPBIN_CLUSTER]
    assert len(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2
    good_hits: list[str] = []
    bad_hits: list[str] = []

    async def scenario() -> None:
        async with (
            _status_app(good, 8000, 200, good_hits),
            _status_app(bad, 8000, 500, bad_hits),
            sidecars.run(
                "sleep",
                ca.issue("foo", "sleep"),
                patch=_client_patch(sleep, client, workroot / "log"),
            ) as sidecar,
        ):
            reader, writer = await asyncio.open_connection(*client)
            try:

                async def get() -> int:
                    reply = await _exchange(
                        reader, writer, "GET", "/get", "httpbin.foo:8000", close=False
                    )
                    return reply.status

                statuses = [await get() for _ in range(2)]  # round robin: one each
                assert sorted(statuses) == [200, 500]
                ejected = f"cluster.{HTTPBIN_CLUSTER}.outlier_detection.ejections_enforced_total"

                async def is_ejected() -> bool:
                    return await _counter(sidecar.envoy, ejected) >= 1

                await eventually(is_ejected, what="the failing endpoint ejected", timeout=10)
                seen_bad = len(bad_hits)
                after = [await get() for _ in range(10)]
                assert after == [200] * 10
                assert len(bad_hits) == seen_bad  # nothing more went to the ejected one
            finally:
                writer.transport.abort()

    run(scenario(), timeout=40)

"""The ADS server against the real Envoy (and against a bare gRPC client where Envoy
cannot show the point: authorization, exact protocol behaviour).

Each Envoy test starts one Envoy whose only config is a bootstrap that points ADS at our
server; everything it serves arrives over xDS. Latencies are printed as ``MEASURED`` lines
(run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import signal
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.core.v3 import extension_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from tests.envoy.conftest import Loopback, eventually, http_get, run, stat
from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.xds.cache import (
    TYPE_CLUSTER,
    TYPE_ECDS,
    TYPE_LISTENER,
    TYPE_ROUTE,
    Snapshot,
    SnapshotCache,
)
from trustmesh.xds.server import ADS_SERVICE, AdsServer, peer_spiffe_ids

pytestmark = pytest.mark.envoy

NODE = "sidecar~127.0.0.1~web.shop~shop.svc.cluster.local"
WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"
_T = "type.googleapis.com/"
HCM = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = _T + "envoy.extensions.filters.http.router.v3.Router"
RBAC = _T + "envoy.extensions.filters.http.rbac.v3.RBAC"
HTTP_OPTIONS = _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ADS = {"ads": {}, "resource_api_version": "V3"}
METHOD = f"/{ADS_SERVICE}/StreamAggregatedResources"


# ---------------------------------------------------------------------------- resources


def _socket(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _routes(name: str, body: str, *, bad_regex: bool = False) -> dict[str, Any]:
    answer = {"status": 200, "body": {"inline_string": body}}
    routes: list[dict[str, Any]] = [{"match": {"prefix": "/"}, "direct_response": answer}]
    if bad_regex:
        # Valid proto, invalid RE2: only Envoy can tell, so it must come back as a NACK.
        routes.insert(0, {**routes[0], "match": {"safe_regex": {"regex": "(unclosed"}}})
    return {
        "name": name,
        "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}],
    }


def _listener(
    name: str,
    at: tuple[str, int],
    *,
    routes: dict[str, Any] | None = None,
    rds: str | None = None,
    ecds: str | None = None,
) -> dict[str, Any]:
    filters: list[dict[str, Any]] = []
    if ecds is not None:
        filters.append(
            {"name": ecds, "config_discovery": {"config_source": ADS, "type_urls": [RBAC]}}
        )
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}})
    manager: dict[str, Any] = {"@type": HCM, "stat_prefix": name, "http_filters": filters}
    if rds is not None:
        manager["rds"] = {"config_source": ADS, "route_config_name": rds}
    else:
        manager["route_config"] = routes
    hcm = {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
    chains = [{"filters": [hcm]}]
    return {"@type": TYPE_LISTENER, "name": name, "address": _socket(*at), "filter_chains": chains}


def _rbac(name: str, action: str) -> dict[str, Any]:
    everything = {"permissions": [{"any": True}], "principals": [{"any": True}]}
    return {
        "@type": TYPE_ECDS,
        "name": name,
        "typed_config": {
            "@type": RBAC,
            "rules": {"action": action, "policies": {"all": everything}},
        },
    }


@dataclass(frozen=True)
class World:
    """Three listeners, one per way config reaches Envoy: inline in LDS, over RDS, and an
    RBAC filter over ECDS."""

    lds: tuple[str, int]
    rds: tuple[str, int]
    authz: tuple[str, int]

    @classmethod
    def on(cls, loopback: Loopback) -> World:
        return cls(loopback.endpoint(), loopback.endpoint(), loopback.endpoint())

    def snapshot(
        self,
        *,
        lds_body: str = "lds v1",
        rds_body: str = "rds v1",
        action: str = "ALLOW",
        bad_regex: bool = False,
        extra: tuple[dict[str, Any], ...] = (),
    ) -> Snapshot:
        return Snapshot.from_resources(
            [
                _listener("lds", self.lds, routes=_routes("lds", lds_body, bad_regex=bad_regex)),
                _listener("rds", self.rds, rds="rds-routes"),
                {"@type": TYPE_ROUTE, **_routes("rds-routes", rds_body)},
                _listener("authz", self.authz, routes=_routes("authz", "authz ok"), ecds="authz"),
                _rbac("authz", action),
                *extra,
            ]
        )


def ads_bootstrap(node_id: str, ads_port: int) -> dict[str, Any]:
    """An Envoy that gets everything over ADS from 127.0.0.1:``ads_port`` (plaintext h2)."""
    xds_address = _socket("127.0.0.1", ads_port)
    return {
        "node": {"id": node_id, "cluster": "web.shop"},
        "admin": {"address": _socket("127.0.0.1", 0)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": "xds",
                            # Reconnect fast after a control-plane restart (default 0.5 s..)
                            "retry_policy": {
                                "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.5s"}
                            },
                        }
                    }
                ],
            },
            "lds_config": ADS,
            "cds_config": ADS,
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": HTTP_OPTIONS,
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "xds",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": xds_address}}]}],
                    },
                }
            ]
        },
    }


# ---------------------------------------------------------------------------- harness


@pytest.fixture
def loopback() -> Loopback:
    return Loopback()


@pytest.fixture
def envoys() -> Iterator[list[EnvoyProcess]]:
    """Every Envoy a test starts; any still running afterwards is killed by PID."""
    started: list[EnvoyProcess] = []
    yield started
    for envoy in started:
        if envoy.pid is not None and envoy.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(envoy.pid, signal.SIGKILL)


@dataclass
class Rig:
    cache: SnapshotCache
    server: AdsServer
    envoy: EnvoyProcess


@contextlib.asynccontextmanager
async def ads_rig(
    workdir: Path, envoys: list[EnvoyProcess], snapshot: Snapshot
) -> AsyncIterator[Rig]:
    """Our ADS server with ``snapshot`` for NODE, and an Envoy fed only by it."""
    cache = SnapshotCache()
    cache.set(NODE, snapshot)
    server = AdsServer(cache)
    port = await server.start()
    envoy = EnvoyProcess(ads_bootstrap(NODE, port), workdir=workdir, concurrency=1)
    envoys.append(envoy)
    rig = Rig(cache, server, envoy)
    try:
        await rig.envoy.start(timeout=10)
        yield rig
    except BaseException:
        print(f"envoy log ({rig.envoy.log_path}):\n{rig.envoy.log_tail(60)}")
        raise
    finally:
        try:
            await rig.envoy.stop()
        finally:
            await rig.server.stop()


async def body_of(at: tuple[str, int]) -> bytes:
    return (await http_get(*at)).body


def serves(at: tuple[str, int], body: str) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            return await body_of(at) == body.encode()
        return False

    return probe


async def first_seen(probe: Callable[[], Awaitable[bool]], *, what: str) -> float:
    """Seconds until ``probe`` holds, asked back to back: a measurement, so no sleep
    between tries (each is a fresh request to Envoy); bounded at 5 s."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not await probe():
        assert loop.time() - started < 5, f"not within 5 s: {what}"
    return loop.time() - started


def since_now(waiting: Awaitable[None]) -> asyncio.Task[float]:
    """Seconds from now until ``waiting`` is done, measured while the test goes on."""
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def timed() -> float:
        await waiting
        return loop.time() - started

    return asyncio.create_task(timed())


def report(what: str, seconds: list[float]) -> None:
    ms = [s * 1000 for s in seconds]
    median, worst = round(statistics.median(ms), 2), round(max(ms), 2)
    print(
        "MEASURED", json.dumps({"what": what, "n": len(ms), "median_ms": median, "max_ms": worst})
    )


class KeepAlive:
    """One HTTP/1.1 connection reused for every request: shows what applies to a
    connection that is already open."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, at: tuple[str, int]) -> KeepAlive:
        return cls(*await asyncio.open_connection(*at))

    async def get(self) -> tuple[int, bytes]:
        self._writer.write(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        head = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head.strip().split("\r\n")
        length = 0
        for line in lines:
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length":
                length = int(value)
            # A connection Envoy means to close is not a test of open connections.
            assert (key.strip().lower(), value.strip()) != ("connection", "close")
        return int(status_line.split()[1]), await self._reader.readexactly(length)

    def close(self) -> None:
        self._writer.transport.abort()


# ---------------------------------------------------------------------------- Envoy tests


def test_envoy_serves_a_listener_received_over_ads(
    tmp_path: Path, loopback: Loopback, envoys: list[EnvoyProcess]
) -> None:
    world = World.on(loopback)
    snapshot = world.snapshot()

    async def scenario() -> None:
        async with ads_rig(tmp_path, envoys, snapshot) as rig:
            assert await body_of(world.lds) == b"lds v1"
            assert await body_of(world.rds) == b"rds v1"
            assert (await http_get(*world.authz)).status == 200
            # Envoy accepted each type at the content version the cache computed.
            for type_url in (TYPE_LISTENER, TYPE_CLUSTER, TYPE_ROUTE, TYPE_ECDS):
                await rig.cache.wait_acked(NODE, type_url, snapshot.version_of(type_url))
            # One response per type (CDS: the empty wildcard answer), none repeated.
            assert rig.server.pushes == 4
            assert rig.server.acks >= 4 and rig.server.nacks == 0
            assert rig.cache.nacks == {}
            dump = json.loads((await rig.envoy.admin_get("/config_dump")).body)
            listeners = next(c for c in dump["configs"] if "dynamic_listeners" in c)
            versions = {
                active["name"]: active["active_state"]["version_info"]
                for active in listeners["dynamic_listeners"]
            }
            assert versions == dict.fromkeys(
                ["lds", "rds", "authz"], snapshot.version_of(TYPE_LISTENER)
            )

    run(scenario(), timeout=30)


def test_changes_are_pushed_and_unchanged_sets_are_not(
    tmp_path: Path, loopback: Loopback, envoys: list[EnvoyProcess]
) -> None:
    world = World.on(loopback)
    rounds = 15

    async def scenario() -> None:
        async with ads_rig(tmp_path, envoys, world.snapshot()) as rig:
            changes: tuple[tuple[str, str, tuple[str, int], Callable[[str], Snapshot]], ...] = (
                ("rds", TYPE_ROUTE, world.rds, lambda body: world.snapshot(rds_body=body)),
                ("lds", TYPE_LISTENER, world.lds, lambda body: world.snapshot(lds_body=body)),
            )
            for kind, type_url, endpoint, with_body in changes:
                acked, enforced = [], []
                for index in range(2, 2 + rounds):
                    body = f"{kind} v{index}"
                    snapshot = with_body(body)
                    pushes = rig.server.pushes
                    rig.cache.set(NODE, snapshot)
                    ack = since_now(
                        rig.cache.wait_acked(NODE, type_url, snapshot.version_of(type_url))
                    )
                    enforced.append(await first_seen(serves(endpoint, body), what=body))
                    acked.append(await ack)
                    assert rig.server.pushes == pushes + 1  # only the type that changed
                report(f"{kind} change: set -> ACK", acked)
                report(f"{kind} change: set -> new connections served by it", enforced)
                # Reset to the v1 bodies so the next kind changes one type at a time.
                rig.cache.set(NODE, world.snapshot())
                await rig.cache.wait_acked(NODE, type_url, world.snapshot().version_of(type_url))

            # The same content again, as a new object: no push. Then a real change is
            # exactly one push, so nothing was queued for the unchanged set.
            pushes = rig.server.pushes
            rig.cache.set(NODE, world.snapshot())
            changed = world.snapshot(rds_body="after unchanged")
            rig.cache.set(NODE, changed)
            await rig.cache.wait_acked(NODE, TYPE_ROUTE, changed.version_of(TYPE_ROUTE))
            assert rig.server.pushes == pushes + 1
            assert await body_of(world.rds) == b"after unchanged"
            assert rig.server.nacks == 0

    run(scenario(), timeout=60)


def test_invalid_resource_is_nacked_and_envoy_keeps_the_last_good_config(
    tmp_path: Path, loopback: Loopback, envoys: list[EnvoyProcess]
) -> None:
    world = World.on(loopback)
    good = world.snapshot()
    bad = world.snapshot(lds_body="lds v2", bad_regex=True)
    fixed = world.snapshot(lds_body="lds v3")

    async def scenario() -> None:
        async with ads_rig(tmp_path, envoys, good) as rig:
            rig.cache.set(NODE, bad)  # structurally fine: the cache cannot tell
            nack = await rig.cache.wait_nacked(NODE, TYPE_LISTENER)
            assert "(unclosed" in nack.error_detail, nack
            assert nack.rejected_version == bad.version_of(TYPE_LISTENER)
            assert nack.kept_version == good.version_of(TYPE_LISTENER)
            assert rig.server.nacks == 1
            assert rig.cache.acked(NODE)[TYPE_LISTENER] == good.version_of(TYPE_LISTENER)
            for _ in range(5):  # still the last good listener, on fresh connections
                assert await body_of(world.lds) == b"lds v1"
            # A NACK is not answered with the same bad config again.
            assert rig.server.pushes == 5

            rig.cache.set(NODE, fixed)
            await rig.cache.wait_acked(NODE, TYPE_LISTENER, fixed.version_of(TYPE_LISTENER))
            assert rig.cache.nacks == {}
            await eventually(serves(world.lds, "lds v3"), what="fixed listener", timeout=5)

    run(scenario(), timeout=30)


def test_envoy_keeps_serving_without_the_server_and_resubscribes_on_restart(
    tmp_path: Path, loopback: Loopback, envoys: list[EnvoyProcess]
) -> None:
    world = World.on(loopback)
    newer = world.snapshot(lds_body="lds v2", action="DENY")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with ads_rig(tmp_path, envoys, world.snapshot()) as rig:
            port = rig.server.port
            await rig.server.stop()

            async def disconnected() -> bool:
                return await stat(rig.envoy, "control_plane.connected_state") == 0

            await eventually(disconnected, what="envoy sees the server gone", timeout=5)
            for _ in range(5):
                assert await body_of(world.lds) == b"lds v1"
                assert (await http_get(*world.authz)).status == 200
            rig.cache.set(NODE, newer)  # while no server runs: picked up on reconnect

            rig.server = AdsServer(rig.cache, address=f"127.0.0.1:{port}")
            started = loop.time()
            assert await rig.server.start() == port
            await rig.cache.wait_acked(NODE, TYPE_LISTENER, newer.version_of(TYPE_LISTENER))
            resubscribed = loop.time() - started
            await rig.cache.wait_acked(NODE, TYPE_ECDS, newer.version_of(TYPE_ECDS))
            await eventually(serves(world.lds, "lds v2"), what="new listener", timeout=5)
            assert (await http_get(*world.authz)).status == 403
            report("server restart -> Envoy re-subscribed and ACKed", [resubscribed])
            assert resubscribed < 5

    run(scenario(), timeout=30)


def test_ecds_change_applies_to_an_open_keep_alive_connection(
    tmp_path: Path, loopback: Loopback, envoys: list[EnvoyProcess]
) -> None:
    world = World.on(loopback)
    rounds = 10

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with ads_rig(tmp_path, envoys, world.snapshot()) as rig:
            connection = await KeepAlive.open(world.authz)
            try:
                assert await connection.get() == (200, b"authz ok")
                acked, enforced = [], []
                for index in range(rounds * 2):
                    action, status = ("DENY", 403) if index % 2 == 0 else ("ALLOW", 200)
                    snapshot = world.snapshot(action=action)
                    rig.cache.set(NODE, snapshot)
                    ack = since_now(
                        rig.cache.wait_acked(NODE, TYPE_ECDS, snapshot.version_of(TYPE_ECDS))
                    )

                    # Asked back to back on the SAME connection (no sleep: the timing is
                    # the point, and one request takes ~0.2 ms): the new filter reached it.
                    started = loop.time()
                    while (await connection.get())[0] != status:
                        assert loop.time() - started < 5, f"{action} not applied in 5 s"
                    enforced.append(loop.time() - started)
                    acked.append(await ack)
                status, body = await connection.get()
                assert (status, body) == (200, b"authz ok")
                report("ecds change: set -> enforced on an open connection", enforced)
                report("ecds change: set -> ACK", acked)
                # Every flip was one ECDS push; the listener itself was never re-sent.
                assert rig.server.pushes == 4 + rounds * 2
                total = await stat(rig.envoy, "http.authz.downstream_cx_total")
                assert total == 1, "the client never reconnected"
            finally:
                connection.close()

    run(scenario(), timeout=60)


# ---------------------------------------------------------------------------- bare client


class RawAds:
    """One ADS stream driven by hand, standing in for Envoy."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str) -> None:
        self.call = channel.stream_stream(
            METHOD,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )()
        self._node_id: str | None = node_id

    async def send(
        self,
        type_url: str,
        names: tuple[str, ...] = (),
        *,
        answering: Any = None,
        nonce: str | None = None,
        error: str | None = None,
        kept: str = "",
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
        if self._node_id is not None:  # like Envoy: the node in the first message only
            request.node.id, self._node_id = self._node_id, None
        if answering is not None:
            request.response_nonce = answering.nonce
            if error is None:
                request.version_info = answering.version_info
            else:  # a NACK carries the version Envoy keeps
                request.version_info = kept
                request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        if nonce is not None:
            request.response_nonce = nonce
        await self.call.write(request)

    async def receive(self) -> Any:
        response = await self.call.read()
        assert response is not grpc.aio.EOF
        return response


def _names(response: Any) -> list[str]:
    types = {
        TYPE_LISTENER: listener_pb2.Listener,
        TYPE_ROUTE: route_pb2.RouteConfiguration,
        TYPE_ECDS: extension_pb2.TypedExtensionConfig,
    }
    names = []
    for packed in response.resources:
        message = types[packed.type_url]()
        packed.Unpack(message)
        names.append(str(message.name))
    return names


@contextlib.asynccontextmanager
async def serving(cache: SnapshotCache, **options: Any) -> AsyncIterator[AdsServer]:
    server = AdsServer(cache, **options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def refused_with(ads: RawAds) -> grpc.StatusCode:
    """How the server ended a stream that never got a response."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        assert await ads.call.read() is grpc.aio.EOF
    code: grpc.StatusCode = await ads.call.code()
    return code


def test_stream_protocol_acks_stale_nonces_names_and_nacks(loopback: Loopback) -> None:
    world = World.on(loopback)
    other_route = {"@type": TYPE_ROUTE, **_routes("other", "other")}
    snapshot = world.snapshot(extra=(other_route,))
    changed = world.snapshot(extra=(other_route,), action="DENY")

    async def scenario() -> None:
        cache = SnapshotCache()
        cache.set(NODE, snapshot)
        async with (
            serving(cache) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            ads = RawAds(channel, NODE)
            await ads.send(TYPE_LISTENER)
            lds = await ads.receive()
            assert lds.type_url == TYPE_LISTENER and lds.nonce == "1"
            assert sorted(_names(lds)) == ["authz", "lds", "rds"]  # wildcard: all of them
            assert lds.version_info == snapshot.version_of(TYPE_LISTENER)
            await ads.send(TYPE_CLUSTER)
            cds = await ads.receive()
            assert (cds.type_url, len(cds.resources)) == (TYPE_CLUSTER, 0)  # "none" is an answer

            await ads.send(TYPE_LISTENER, answering=lds)  # an ACK: never answered
            await ads.send(TYPE_ROUTE, ("rds-routes",))
            rds = await ads.receive()  # so the next response is this one
            assert rds.type_url == TYPE_ROUTE and _names(rds) == ["rds-routes"]  # by name
            assert rds.version_info == snapshot.version_of(TYPE_ROUTE, ["rds-routes"])

            # A stale nonce (not the last RDS response's) is ignored, whatever it asks for.
            await ads.send(TYPE_ROUTE, ("other", "rds-routes"), nonce=lds.nonce)
            await ads.send(TYPE_ROUTE, ("rds-routes",), answering=rds)  # ACK
            await ads.send(TYPE_ECDS, ("authz", "not-there"))
            ecds = await ads.receive()
            assert ecds.type_url == TYPE_ECDS and _names(ecds) == ["authz"]
            assert server.acks == 2

            cache.set(NODE, changed)  # only the RBAC filter changed: only ECDS is pushed
            push = await ads.receive()
            assert push.type_url == TYPE_ECDS and int(push.nonce) > int(ecds.nonce)
            await ads.send(
                TYPE_ECDS, ("authz",), answering=push, error="bad rbac", kept=ecds.version_info
            )
            nack = await cache.wait_nacked(NODE, TYPE_ECDS)
            assert (nack.rejected_version, nack.kept_version) == (
                push.version_info,
                ecds.version_info,
            )
            assert (nack.error_detail, nack.code, server.nacks) == ("bad rbac", 3, 1)

            # Not answered either: the next response is for this new RDS subscription.
            await ads.send(TYPE_ROUTE, ("other", "rds-routes"), answering=rds)
            both = await ads.receive()
            assert both.type_url == TYPE_ROUTE and _names(both) == ["other", "rds-routes"]
            assert server.pushes == 6 and server.acks == 3

    run(scenario())


def test_authorize_refuses_a_node_it_does_not_allow(loopback: Loopback) -> None:
    snapshot = World.on(loopback).snapshot()
    evil = "sidecar~127.0.0.9~evil.x~x.svc.cluster.local"
    seen: list[str] = []

    def authorize(node_id: str, context: Any) -> bool:
        seen.append(node_id)
        if node_id == "broken":
            raise RuntimeError("hook failed")
        return node_id == NODE

    async def scenario() -> None:
        cache = SnapshotCache()
        cache.set(NODE, snapshot)
        cache.set(evil, snapshot)  # it has config: it still must not get it
        async with (
            serving(cache, authorize=authorize) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            for node_id, code in (
                (evil, grpc.StatusCode.PERMISSION_DENIED),
                ("broken", grpc.StatusCode.PERMISSION_DENIED),  # fails closed
                ("", grpc.StatusCode.INVALID_ARGUMENT),
            ):
                refused = RawAds(channel, node_id)
                await refused.send(TYPE_LISTENER)
                assert await refused_with(refused) == code
            assert server.pushes == 0
            allowed = RawAds(channel, NODE)
            await allowed.send(TYPE_LISTENER)
            assert len((await allowed.receive()).resources) == 3
            assert seen == [evil, "broken", NODE]

    run(scenario())


def _certificates() -> tuple[bytes, tuple[bytes, bytes], tuple[bytes, bytes]]:
    """A test root, a server pair (DNS SAN) and a workload pair (SPIFFE URI SAN)."""
    now = datetime.datetime.now(datetime.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "xds test root")])

    def certificate(subject: x509.Name, key: Any, san: x509.GeneralName | None) -> bytes:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(root_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=san is None, path_length=None), critical=True)
        )
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=True)
        return builder.sign(root_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def pair(san: x509.GeneralName) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key_pem, certificate(x509.Name([]), key, san)

    root = certificate(root_name, root_key, None)
    return root, pair(x509.DNSName("xds.test")), pair(x509.UniformResourceIdentifier(WEB_ID))


def test_mtls_peer_identity_decides_which_node_config_it_gets(loopback: Loopback) -> None:
    snapshot = World.on(loopback).snapshot()
    other = "sidecar~127.0.0.9~cart.shop~shop.svc.cluster.local"
    owners = {NODE: WEB_ID, other: "spiffe://cluster.local/ns/shop/sa/cart"}
    root, server_pair, web_pair = _certificates()

    def only_its_own(node_id: str, context: Any) -> bool:
        return owners.get(node_id) in peer_spiffe_ids(context)

    async def scenario() -> None:
        cache = SnapshotCache()
        cache.set(NODE, snapshot)
        cache.set(other, snapshot)
        credentials = grpc.ssl_server_credentials(
            [server_pair], root_certificates=root, require_client_auth=True
        )
        client = grpc.ssl_channel_credentials(root, *web_pair)
        async with (
            serving(cache, authorize=only_its_own, server_credentials=credentials) as server,
            grpc.aio.secure_channel(
                f"127.0.0.1:{server.port}",
                client,
                options=[("grpc.ssl_target_name_override", "xds.test")],
            ) as channel,
        ):
            own = RawAds(channel, NODE)
            await own.send(TYPE_LISTENER)
            assert len((await own.receive()).resources) == 3
            foreign = RawAds(channel, other)  # web's certificate, cart's node id
            await foreign.send(TYPE_LISTENER)
            assert await refused_with(foreign) == grpc.StatusCode.PERMISSION_DENIED
        async with (
            serving(cache, authorize=only_its_own) as plaintext,
            grpc.aio.insecure_channel(f"127.0.0.1:{plaintext.port}") as channel,
        ):
            anonymous = RawAds(channel, NODE)  # no certificate: no identity, no config
            await anonymous.send(TYPE_LISTENER)
            assert await refused_with(anonymous) == grpc.StatusCode.PERMISSION_DENIED

    run(scenario())

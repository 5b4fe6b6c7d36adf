"""Harness for the ADS server tests (test_ads_envoy, test_ads_protocol, test_controlplane).

Provides the node and type-URL constants, the resources a test snapshot is built from
(``World``: one listener per way config reaches Envoy), ``ads_bootstrap`` (an Envoy fed
only over ADS), the ``loopback`` and ``envoys`` fixtures, ``ads_rig`` (our server plus one
Envoy), and measuring helpers (``first_seen``, ``since_now``, ``report``, ``KeepAlive``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.envoy.conftest import Loopback, http_get
from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.xds.cache import TYPE_ECDS, TYPE_LISTENER, TYPE_ROUTE, Snapshot, SnapshotCache
from trustmesh.xds.server import ADS_SERVICE, AdsServer

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

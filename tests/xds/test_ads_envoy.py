"""The ADS server against the real Envoy.

Each test starts one Envoy whose only config is a bootstrap that points ADS at our
server; everything it serves arrives over xDS. Latencies are printed as ``MEASURED`` lines
(run with ``-s`` to see them). The bare-gRPC-client tests (authorization, exact protocol
behaviour) are in test_ads_protocol.py; the harness is in ads_rig.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.envoy.conftest import Loopback, eventually, http_get, run, stat
from tests.xds.ads_rig import (
    NODE,
    KeepAlive,
    World,
    ads_rig,
    body_of,
    envoys,
    first_seen,
    loopback,
    report,
    serves,
    since_now,
)
from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.xds.cache import TYPE_CLUSTER, TYPE_ECDS, TYPE_LISTENER, TYPE_ROUTE, Snapshot
from trustmesh.xds.server import AdsServer

__all__ = ["envoys", "loopback"]  # fixtures, registered by importing them

pytestmark = pytest.mark.envoy


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

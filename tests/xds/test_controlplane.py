"""The control plane end to end: config files → compile → translate → ADS over mTLS → Envoy.

Real pieces only: a CertificateAuthority in a temp directory behind its CaServer, two
WorkloadAgents that enroll with bootstrap tokens and serve SDS, two Envoys started from
``ads_bootstrap`` alone (foo/httpbin in front of a tiny HTTP app, foo/sleep), and the
ControlPlane watching a temporary config directory (the istio.io example mesh, mesh-wide
STRICT). The translation builds no outbound listener yet, so requests "from sleep" come
from a Python mTLS client presenting the certificate sleep's agent was issued, straight to
httpbin's inbound port. Latencies are printed as ``MEASURED`` lines (``-s`` shows them).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from tests.envoy.conftest import MiniCA, eventually, run, stat, workroot
from tests.xds.ads_rig import envoys, report
from tests.xds.controlplane_rig import (
    BAD_ACTION,
    BAD_YAML,
    DENY_GET,
    SLEEP,
    Probe,
    _dynamic_names,
    ads_answer,
    credentials_of,
    mesh_rig,
    reacked,
)
from tests.xds.controlplane_traffic import Connection, Traffic, request_once, since
from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.agent.xds_bootstrap import CONTROL_PLANE_ID, XDS_CLUSTER, control_plane_spiffe_id
from trustmesh.xds import controlplane
from trustmesh.xds.cache import TYPE_CLUSTER, TYPE_ECDS, TYPE_LISTENER
from trustmesh.xds.controlplane import XDS_SERVER_NAME, ProxyRegistration
from trustmesh.xds.readiness import EndpointFilter
from trustmesh.xds.server import ADS_SERVICE

__all__ = ["envoys", "workroot"]  # fixtures, registered by importing them


# ---------------------------------------------------------------------------- 1. serve


@pytest.mark.envoy
def test_sidecars_get_their_own_config_over_mtls_ads_and_serve(
    workroot: Path, envoys: list[EnvoyProcess]
) -> None:
    async def scenario() -> None:
        async with mesh_rig(workroot, envoys) as rig:
            plane = rig.plane
            assert plane.spiffe_id == control_plane_spiffe_id("cluster.local") == CONTROL_PLANE_ID
            for proxy in rig.proxies:
                snapshot = plane.cache.get(proxy.node_id)
                assert snapshot is not None and proxy.envoy is not None
                for type_url in (TYPE_LISTENER, TYPE_CLUSTER, TYPE_ECDS):
                    if type_url == TYPE_ECDS and not snapshot.get(TYPE_ECDS):
                        continue  # sleep has no inbound listener: it asks for no filters
                    version = snapshot.version_of(type_url)
                    await plane.cache.wait_acked(proxy.node_id, type_url, version)
                assert await proxy.connected(1)()
                # The ADS connection itself was TLS: Envoy's xds-grpc cluster handshook.
                assert await stat(proxy.envoy, f"cluster.{XDS_CLUSTER}.ssl.handshake") >= 1
            assert plane.cache.nacks == {} and plane.server is not None
            assert plane.server.nacks == 0

            # Each Envoy runs its own workload's config: only httpbin has an inbound side.
            dumps = []
            for envoy in (p.envoy for p in rig.proxies if p.envoy is not None):
                dumps.append(json.loads((await envoy.admin_get("/config_dump")).body))
            assert [_dynamic_names(d, "dynamic_listeners") for d in dumps] == [
                ["virtualInbound"],
                [],
            ]
            clusters = [_dynamic_names(d, "dynamic_active_clusters") for d in dumps]
            assert "inbound|8000||" in clusters[0] and "inbound|8000||" not in clusters[1]

            status, body = await request_once(rig.inbound, rig.sleep_tls())
            assert status == 200, body
            seen = json.loads(body)
            assert seen["path"] == "/get" and f"URI={SLEEP.uri}" in seen["xfcc"]
            with pytest.raises((ConnectionError, OSError, asyncio.IncompleteReadError)):
                await request_once(rig.inbound, None)  # STRICT: plaintext finds no chain

    run(scenario(), timeout=40)


# ---------------------------------------------------------------------------- 2. change


@pytest.mark.envoy
def test_config_change_reaches_an_open_connection_while_traffic_flows(
    workroot: Path, envoys: list[EnvoyProcess]
) -> None:
    rounds, interval = 4, 0.2
    phase = random.Random(4)  # writes land anywhere in the poll interval, reproducibly

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with mesh_rig(workroot, envoys) as rig:
            plane, server, node_id = rig.plane, rig.plane.server, rig.httpbin.node_id
            assert server is not None
            rig.watch(interval)
            listener_version = plane.cache.acked(node_id)[TYPE_LISTENER]
            sleep_snapshot = plane.cache.get(rig.sleep.node_id)
            traffic = Traffic(rig.inbound, rig.sleep_tls())
            traffic.start()
            connection = await Connection.open(rig.inbound, rig.sleep_tls())
            try:
                assert (await connection.request())[0] == 200
                await traffic.more(50)
                reloads, pushes = plane.reloads, server.pushes
                enforced, published, applied = [], [], []
                for _ in range(rounds):
                    for status in (403, 200):
                        await asyncio.sleep(phase.uniform(0, interval))
                        before = plane.cache.get(node_id)
                        assert before is not None
                        publish = since(plane.cache.wait_newer(node_id, before.versions))
                        started = loop.time()
                        if status == 403:
                            rig.config.write_policy(DENY_GET)
                        else:
                            rig.config.remove_policy()
                        # GET on the SAME connection until the new policy answers; the
                        # short sleep only bounds the request rate (resolution ~2 ms).
                        while (await connection.request())[0] != status:
                            assert loop.time() - started < 5, f"{status} not within 5 s"
                            await asyncio.sleep(0.001)
                        enforced.append(loop.time() - started)
                        published.append(await publish - started)
                        applied.append(enforced[-1] - published[-1])
                report("file written -> enforced on an open connection", enforced)
                report("  file written -> snapshot published (poll, debounce, reload)", published)
                report("  snapshot published -> enforced (ADS push, ECDS)", applied)
                # Each change was one reload and two pushes to httpbin: its deny filter
                # over ECDS and its inbound route, switching the deny slot on or off, over
                # RDS. Sleep's unchanged config and the listener were never re-sent.
                assert plane.reloads == reloads + 2 * rounds
                assert server.pushes == pushes + 2 * 2 * rounds
                assert plane.cache.acked(node_id)[TYPE_LISTENER] == listener_version
                assert plane.cache.get(rig.sleep.node_id) is sleep_snapshot
                assert plane.last_errors == [] and plane.cache.nacks == {}
            finally:
                connection.close()
                await traffic.finish()
            assert traffic.failures == [], traffic.failures[:5]
            print(f"traffic during the changes: ok={traffic.ok} failed=0")

    run(scenario(), timeout=45)


# ---------------------------------------------------------------------------- 3. invalid


@pytest.mark.envoy
def test_invalid_edit_is_refused_and_envoy_keeps_the_last_good_config(
    workroot: Path, envoys: list[EnvoyProcess]
) -> None:
    async def scenario() -> None:
        async with mesh_rig(workroot, envoys) as rig:
            plane, server = rig.plane, rig.plane.server
            assert server is not None
            rig.watch(interval=0.05)
            tls = rig.sleep_tls()

            def answers(status: int, method: str = "GET") -> Probe:
                async def probe() -> bool:
                    return (await request_once(rig.inbound, tls, method))[0] == status

                return probe

            rig.config.write_policy(DENY_GET)
            await eventually(answers(403), what="deny GET applied", timeout=5)
            pushes, reloads = server.pushes, plane.reloads
            policy = str(rig.config.path / "policy.yaml")
            for text, code in ((BAD_YAML, "yaml-syntax"), (BAD_ACTION, "invalid-field")):
                rejected = plane.rejected_reloads
                rig.config.write_policy(text)

                async def refused(rejected: int = rejected) -> bool:
                    return plane.rejected_reloads > rejected

                await eventually(refused, what="the watcher refused the edit", timeout=5)
                errors = await plane.reload()  # the same answer when asked directly
                assert errors == plane.last_errors and all(e.is_error for e in errors)
                assert {(e.code, e.location.file) for e in errors} == {(code, policy)}, errors
                assert all(e.location.line > 0 for e in errors), errors
                print("refused:", "; ".join(map(str, errors)))
                # Still the last good config: GET denied, POST allowed, nothing pushed.
                assert await answers(403)() and await answers(200, "POST")()
            assert (server.pushes, plane.reloads, plane.cache.nacks) == (pushes, reloads, {})

            rig.config.remove_policy()  # fixed: served again at once
            await eventually(answers(200), what="GET allowed again", timeout=5)
            assert plane.last_errors == []

    run(scenario(), timeout=40)


# ---------------------------------------------------------------------------- 4. authorize


def test_a_proxy_gets_only_the_config_of_the_identity_it_proves(
    workroot: Path, envoys: list[EnvoyProcess]
) -> None:
    async def scenario() -> None:
        async with mesh_rig(workroot, envoys, with_envoys=False) as rig:
            plane, denied = rig.plane, grpc.StatusCode.PERMISSION_DENIED
            roots = rig.ca.bundle_pem(dt.datetime.now(dt.UTC))
            as_sleep = credentials_of(rig.sleep.secret, roots)
            as_httpbin = credentials_of(rig.httpbin.secret, roots)

            own = await ads_answer(plane.port, rig.sleep.node_id, as_sleep)
            assert own.type_url == TYPE_CLUSTER and len(own.resources) > 0
            assert (await ads_answer(plane.port, rig.httpbin.node_id, as_httpbin)).resources
            # sleep's certificate claiming httpbin's node id, or a node nobody registered.
            assert await ads_answer(plane.port, rig.httpbin.node_id, as_sleep) == denied
            unknown = ProxyRegistration.sidecar("foo/httpbin", "127.0.0.99").node_id
            assert await ads_answer(plane.port, unknown, as_httpbin) == denied
            # No client certificate, or one from another CA with the very same SPIFFE ID:
            # the handshake fails before any node id is read.
            anonymous = grpc.ssl_channel_credentials(roots)
            foreign = credentials_of(MiniCA().issue("foo", "httpbin"), roots)
            for credentials in (anonymous, foreign):
                code = await ads_answer(plane.port, rig.httpbin.node_id, credentials)
                assert code == grpc.StatusCode.UNAVAILABLE
            plane.unregister(rig.sleep.node_id)  # a proxy that is gone gets nothing more
            assert await ads_answer(plane.port, rig.sleep.node_id, as_sleep) == denied
            assert plane.server is not None and plane.server.pushes == 2

    run(scenario(), timeout=30)


def test_a_change_builds_only_connected_proxies_the_others_as_they_connect(
    workroot: Path, envoys: list[EnvoyProcess]
) -> None:
    """A replica serves a share of the registered proxies: a change builds those with a
    stream open; one without is built when it connects, before its first answer, to
    exactly what a full build gives (never the snapshot from before the change)."""

    async def scenario() -> None:
        async with mesh_rig(workroot, envoys, with_envoys=False) as rig:
            plane = rig.plane
            roots = rig.ca.bundle_pem(dt.datetime.now(dt.UTC))
            target = f"127.0.0.1:{plane.port}"
            name = [("grpc.ssl_target_name_override", XDS_SERVER_NAME)]
            as_sleep = credentials_of(rig.sleep.secret, roots)
            async with grpc.aio.secure_channel(target, as_sleep, options=name) as channel:
                call = channel.stream_stream(
                    f"/{ADS_SERVICE}/StreamAggregatedResources",
                    request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                    response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
                )()
                request = discovery_pb2.DiscoveryRequest(type_url=TYPE_CLUSTER)
                request.node.id = rig.sleep.node_id
                await call.write(request)
                await asyncio.wait_for(call.read(), 5)  # sleep's stream is open: connected
                assert plane.server is not None and plane.server.connected(rig.sleep.node_id)
                before = plane.cache.get(rig.httpbin.node_id)
                rig.config.write_policy(DENY_GET)
                assert await plane.reload() == []
                stats = plane.last_rebuild
                assert stats is not None and stats.deferred == 1  # httpbin: not connected
                assert plane.cache.get(rig.httpbin.node_id) is before  # left for later
                call.cancel()
            assert plane.mesh is not None
            full = controlplane._snapshot_for(
                plane.mesh, rig.httpbin.registration, {}, EndpointFilter(frozenset())
            )
            assert full != before  # the change is httpbin's (its DENY policy)
            as_httpbin = credentials_of(rig.httpbin.secret, roots)
            answer = await ads_answer(plane.port, rig.httpbin.node_id, as_httpbin)
            assert answer.version_info == full.version_of(TYPE_CLUSTER)
            assert plane.cache.get(rig.httpbin.node_id) == full  # built as it connected

    run(scenario(), timeout=30)


# ---------------------------------------------------------------------------- 5. restart


@pytest.mark.envoy
def test_control_plane_down_drops_no_request_and_envoy_resubscribes_on_restart(
    workroot: Path, envoys: list[EnvoyProcess]
) -> None:
    """Three outages under traffic; the control plane comes back as a new process (a new
    instance: the files and the port, nothing else) or as the same one started again."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with mesh_rig(workroot, envoys) as rig:
            served = {p.node_id: rig.plane.cache.get(p.node_id) for p in rig.proxies}
            traffic = Traffic(rig.inbound, rig.sleep_tls())
            traffic.start()
            resubscribed, down_ok = [], 0
            try:
                for fresh_process in (True, False, True):
                    await traffic.more(50)
                    port = rig.plane.port
                    await rig.plane.stop()
                    for proxy in rig.proxies:
                        await eventually(proxy.connected(0), what="Envoy sees it gone", timeout=5)
                    ok = traffic.ok
                    await traffic.more(150)  # no control plane at all meanwhile
                    down_ok += traffic.ok - ok
                    assert traffic.failures == [], traffic.failures[:5]

                    if fresh_process:
                        rig.plane = rig.new_plane()
                    assert await rig.plane.start() == port
                    bound = loop.time()
                    await eventually(reacked(rig.plane, served), what="re-ACKs", timeout=5)
                    resubscribed.append(loop.time() - bound)
                report("control plane back -> both Envoys re-subscribed and ACKed", resubscribed)

                rig.watch()  # the new streams carry changes again
                rig.config.write_policy(DENY_GET)
                tls = rig.sleep_tls()

                async def denied() -> bool:
                    return (await request_once(rig.inbound, tls))[0] == 403

                await eventually(denied, what="a change after the restarts", timeout=5)
                await traffic.more(20)
            finally:
                await traffic.finish()
            assert traffic.failures == [], traffic.failures[:5]
            print(f"requests ok={traffic.ok} failed=0, {down_ok} with no control plane")

    run(scenario(), timeout=45)

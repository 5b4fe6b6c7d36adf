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
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.service.discovery.v3 import discovery_pb2

from tests.envoy.conftest import Loopback, MiniCA, eventually, mesh_client_tls, run, stat, workroot
from tests.unit.meshutil import ROOT
from tests.xds.test_ads_envoy import envoys, report
from trustmesh.agent.envoy import EnvoyProcess, validate_bootstrap
from trustmesh.agent.sds import SdsServer, SecretStore, WorkloadSecret
from trustmesh.agent.workload import AgentConfig, WorkloadAgent
from trustmesh.agent.xds_bootstrap import (
    CONTROL_PLANE_ID,
    XDS_CLUSTER,
    ads_bootstrap,
    control_plane_spiffe_id,
)
from trustmesh.identity import pki
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.server import CaServer
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.xds.cache import TYPE_CLUSTER, TYPE_ECDS, TYPE_LISTENER, Snapshot
from trustmesh.xds.controlplane import (
    XDS_SERVER_NAME,
    ConfigRejected,
    ControlPlane,
    ProxyRegistration,
)
from trustmesh.xds.server import ADS_SERVICE

__all__ = ["envoys", "workroot"]  # fixtures, registered by importing them

EXAMPLES = ROOT / "examples"
DENY_GET = (EXAMPLES / "scenarios" / "02-deny-get" / "config.yaml").read_text()
STRICT = (EXAMPLES / "scenarios" / "12-mesh-strict" / "config.yaml").read_text()
BAD_YAML = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x\n"
BAD_ACTION = DENY_GET.replace("action: DENY", "action: MAYBE")
APP_PORT = 8000
HTTPBIN = SpiffeId("cluster.local", "foo", "httpbin")
SLEEP = SpiffeId("cluster.local", "foo", "sleep")
Probe = Callable[[], Awaitable[bool]]


class ConfigDir:
    """The directory the control plane watches; every write lands whole (os.replace)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()
        shutil.copy(EXAMPLES / "mesh" / "workloads.yaml", path / "workloads.yaml")
        (path / "mtls.yaml").write_text(STRICT)

    def write_policy(self, text: str) -> None:
        partial = self.path / "policy.partial"  # not .yaml: never read half written
        partial.write_text(text)
        os.replace(partial, self.path / "policy.yaml")

    def remove_policy(self) -> None:
        (self.path / "policy.yaml").unlink()


# ---------------------------------------------------------------------------- app, clients


@contextlib.asynccontextmanager
async def app_server(address: str) -> AsyncIterator[None]:
    """The workload: answers every request (keep-alive) with what it saw, as JSON."""
    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request_line, *lines = head.removesuffix("\r\n\r\n").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)
                }
                await reader.readexactly(int(headers.get("content-length", "0")))
                method, path, _ = request_line.split(" ", 2)
                xfcc = headers.get("x-forwarded-client-cert")
                body = json.dumps({"method": method, "path": path, "xfcc": xfcc}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        writers.discard(writer)
        writer.transport.abort()

    server = await asyncio.start_server(serve, address, APP_PORT)
    try:
        yield
    finally:
        server.close()
        for writer in list(writers):
            writer.transport.abort()
        await server.wait_closed()


class Connection:
    """One HTTP/1.1 connection to httpbin's sidecar, reused for every request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, at: tuple[str, int], tls: ssl.SSLContext | None) -> Connection:
        return cls(*await asyncio.open_connection(*at, ssl=tls))

    async def request(self, method: str = "GET", path: str = "/get") -> tuple[int, bytes]:
        self._writer.write(f"{method} {path} HTTP/1.1\r\nHost: httpbin.foo:8000\r\n\r\n".encode())
        async with asyncio.timeout(5):
            head = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            status_line, *lines = head.strip().split("\r\n")
            headers = {k.strip(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
            # A connection Envoy means to close is not a test of open connections.
            assert headers.get("connection") != "close", head
            body = await self._reader.readexactly(int(headers.get("content-length", "0")))
            return int(status_line.split()[1]), body

    def close(self) -> None:
        self._writer.transport.abort()  # no TLS close_notify wait


async def request_once(
    at: tuple[str, int], tls: ssl.SSLContext | None, method: str = "GET"
) -> tuple[int, bytes]:
    connection = await Connection.open(at, tls)
    try:
        return await connection.request(method, "/get" if method == "GET" else "/post")
    finally:
        connection.close()


@dataclass
class Traffic:
    """Paced POSTs from sleep on keep-alive connections and on a fresh connection each
    (a new mTLS handshake per request); anything but 200 is a failure."""

    at: tuple[str, int]
    tls: ssl.SSLContext
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.tasks += [asyncio.create_task(self._worker(keep)) for keep in (True, True, False)]

    async def _worker(self, keep_alive: bool) -> None:
        connection: Connection | None = None
        while not self.stop.is_set() and self.ok < 50_000:
            try:
                connection = connection or await Connection.open(self.at, self.tls)
                status, body = await connection.request("POST", "/post")
                self.ok += status == 200
                if status != 200:
                    self.failures.append(f"status {status}: {body[:80]!r}")
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                if connection is not None:
                    connection.close()
                connection = None
            if not keep_alive and connection is not None:
                connection.close()
                connection = None
            await asyncio.sleep(0.002)  # paced: traffic flows, it does not saturate 2 cores
        if connection is not None:
            connection.close()

    async def more(self, count: int) -> None:
        """Wait until ``count`` more requests succeeded."""
        target = self.ok + count

        async def reached() -> bool:
            return self.ok >= target

        await eventually(reached, what=f"{count} more requests", timeout=10)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


def since(waiting: Awaitable[Any]) -> asyncio.Task[float]:
    """The loop time at which ``waiting`` is done, measured while the test goes on."""

    async def finished() -> float:
        await waiting
        return asyncio.get_running_loop().time()

    return asyncio.create_task(finished())


# ---------------------------------------------------------------------------- the rig


@dataclass
class Proxy:
    registration: ProxyRegistration
    identity: SpiffeId
    agent: WorkloadAgent
    sds: SdsServer
    envoy: EnvoyProcess | None = None

    @property
    def node_id(self) -> str:
        return self.registration.node_id

    @property
    def secret(self) -> WorkloadSecret:
        current = self.agent.store.current()
        assert current is not None
        return current[1]

    def connected(self, state: int) -> Probe:
        async def probe() -> bool:
            assert self.envoy is not None
            return await stat(self.envoy, "control_plane.connected_state") == state

        return probe


@dataclass
class Rig:
    workdir: Path
    config: ConfigDir
    ca: CertificateAuthority
    plane: ControlPlane
    httpbin: Proxy
    sleep: Proxy
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    watch_stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def inbound(self) -> tuple[str, int]:
        return self.httpbin.registration.inbound_address, APP_PORT

    @property
    def proxies(self) -> tuple[Proxy, Proxy]:
        return self.httpbin, self.sleep

    def sleep_tls(self) -> ssl.SSLContext:
        # STRICT: only mesh mTLS has a filter chain, so no istio ALPN is needed.
        return mesh_client_tls(self.sleep.secret, self.workdir)

    def new_plane(self) -> ControlPlane:
        """A control plane as a restarted process has it: the files, the port, the
        sidecars the runtime registers again — nothing else."""
        address = f"127.0.0.1:{self.plane.port}"
        plane = ControlPlane([str(self.config.path)], ca=self.ca, address=address)
        for proxy in self.proxies:
            plane.register(proxy.registration)
        return plane

    def watch(self, interval: float = 0.2) -> None:
        self.watch_stop = asyncio.Event()
        self.tasks.append(asyncio.create_task(self.plane.watch(self.watch_stop, interval)))

    async def stop_watching(self) -> None:
        self.watch_stop.set()
        await asyncio.gather(*self.tasks)
        self.tasks.clear()


@contextlib.asynccontextmanager
async def agent_for(
    identity: SpiffeId, registration: ProxyRegistration, ca_server: CaServer, workdir: Path
) -> AsyncIterator[Proxy]:
    """A workload agent that enrolls with a bootstrap token and serves SDS."""
    (workdir / identity.service_account).mkdir()
    now, ca = dt.datetime.now(dt.UTC), ca_server.ca
    config = AgentConfig(
        identity=identity,
        ca_address=f"127.0.0.1:{ca_server.port}",
        ca_renewal_address=f"127.0.0.1:{ca_server.renewal_port}",
        ca_roots_pem=ca.bundle_pem(now),
        token=ca.token(identity.namespace, identity.service_account, now),
        bundle_refresh_seconds=3600,
    )
    agent = WorkloadAgent(config, SecretStore())
    sds = SdsServer(agent.store, str(workdir / identity.service_account / "sds.sock"))
    await sds.start()
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.ready.wait(), 10)
        yield Proxy(registration, identity, agent, sds)
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await sds.stop()


async def start_envoy(
    proxy: Proxy, plane: ControlPlane, workdir: Path, envoys: list[EnvoyProcess]
) -> float:
    """Start ``proxy``'s Envoy from ads_bootstrap; seconds until it was ready (which
    needs its first listeners and clusters from the control plane)."""
    bootstrap = ads_bootstrap(
        node_id=proxy.node_id,
        cluster=f"{proxy.identity.service_account}.{proxy.identity.namespace}",
        sds_socket=proxy.sds.socket_path,
        xds_address="127.0.0.1",
        xds_port=plane.port,
        control_plane_id=plane.spiffe_id,
    )
    proxy.envoy = EnvoyProcess(
        bootstrap, workdir=workdir / proxy.identity.service_account, concurrency=1
    )
    envoys.append(proxy.envoy)
    started = asyncio.get_running_loop().time()
    await proxy.envoy.start(timeout=15)
    return asyncio.get_running_loop().time() - started


@contextlib.asynccontextmanager
async def mesh_rig(
    workdir: Path, envoys: list[EnvoyProcess], *, with_envoys: bool = True
) -> AsyncIterator[Rig]:
    """CA + CaServer, a control plane over the config dir, httpbin's app, two agents and
    (``with_envoys``) their Envoys; everything stopped afterwards, Envoys by PID."""
    config = ConfigDir(workdir / "config")
    ca = CertificateAuthority.init(workdir / "ca", CaConfig(), dt.datetime.now(dt.UTC))
    ca_server = CaServer(ca)
    await ca_server.start()
    loopback = Loopback()
    httpbin_at, app_at, sleep_at = loopback.address(), loopback.address(), loopback.address()
    httpbin = ProxyRegistration.sidecar("foo/httpbin", httpbin_at, app_address=app_at)
    sleep = ProxyRegistration.sidecar("foo/sleep", sleep_at)
    plane = ControlPlane([str(config.path)], ca=ca)
    plane.register(httpbin)
    plane.register(sleep)
    rig: Rig | None = None
    try:
        await plane.start()
        async with (
            app_server(app_at),
            agent_for(HTTPBIN, httpbin, ca_server, workdir) as httpbin_proxy,
            agent_for(SLEEP, sleep, ca_server, workdir) as sleep_proxy,
        ):
            rig = Rig(workdir, config, ca, plane, httpbin_proxy, sleep_proxy)
            try:
                if with_envoys:
                    ready = [await start_envoy(p, plane, workdir, envoys) for p in rig.proxies]
                    report("envoy start -> ready (first LDS+CDS over ADS+mTLS)", ready)
                yield rig
            except BaseException:
                for envoy in (p.envoy for p in rig.proxies if p.envoy is not None):
                    print(f"envoy log {envoy.log_path}:\n{envoy.log_tail(40)}")
                raise
            finally:
                await rig.stop_watching()
                for envoy in (p.envoy for p in rig.proxies if p.envoy is not None):
                    await envoy.stop()
    finally:
        await (rig.plane if rig is not None else plane).stop()
        await ca_server.stop()


async def ads_answer(port: int, node_id: str, credentials: grpc.ChannelCredentials) -> Any:
    """A bare ADS client's first answer to a CDS subscription as ``node_id``, or the
    status code its stream ended with."""
    target, name = f"127.0.0.1:{port}", [("grpc.ssl_target_name_override", XDS_SERVER_NAME)]
    async with grpc.aio.secure_channel(target, credentials, options=name) as channel:
        call = channel.stream_stream(
            f"/{ADS_SERVICE}/StreamAggregatedResources",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )()
        request = discovery_pb2.DiscoveryRequest(type_url=TYPE_CLUSTER)
        request.node.id = node_id
        try:
            async with asyncio.timeout(5):
                await call.write(request)
                response = await call.read()
        except grpc.aio.AioRpcError as error:
            return error.code()
        call.cancel()
        return await call.code() if response is grpc.aio.EOF else response


def credentials_of(secret: WorkloadSecret, roots: bytes) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(roots, secret.private_key_pem, secret.cert_chain_pem)


def _dynamic_names(dump: dict[str, Any], key: str) -> list[str]:
    for config in dump["configs"]:
        if key in config:
            return sorted(entry.get("name") or entry["cluster"]["name"] for entry in config[key])
    return []


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
                # Each change was one reload and one push (httpbin's deny filter over
                # ECDS): sleep's unchanged config and the listener were never re-sent.
                assert plane.reloads == reloads + 2 * rounds
                assert server.pushes == pushes + 2 * rounds
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


def reacked(plane: ControlPlane, served: dict[str, Snapshot | None]) -> Probe:
    """Both proxies' new streams acknowledged every type (5 ACKs: LDS and CDS each,
    httpbin's ECDS) at the very versions served before: content-hashed, so a restarted
    control plane changes nothing in Envoy."""

    async def probe() -> bool:
        if plane.server is None or plane.server.acks < 5:
            return False
        for node_id, snapshot in served.items():
            assert snapshot is not None and plane.cache.get(node_id) == snapshot
            acked = plane.cache.acked(node_id)
            for type_url in (TYPE_LISTENER, TYPE_CLUSTER):
                if acked.get(type_url) != snapshot.version_of(type_url):
                    return False
        return True

    return probe


# ---------------------------------------------------------------------------- without Envoy


def _plane(tmp_path: Path, **options: Any) -> tuple[ConfigDir, ControlPlane]:
    config = ConfigDir(tmp_path / "config")
    ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), dt.datetime.now(dt.UTC))
    return config, ControlPlane([str(config.path)], ca=ca, **options)


def test_start_refuses_invalid_config_with_every_diagnostic(tmp_path: Path) -> None:
    config, plane = _plane(tmp_path)
    config.write_policy(BAD_ACTION + "\n---\n" + BAD_YAML)
    with pytest.raises(ConfigRejected) as refused:
        run(plane.start())
    codes = sorted(d.code for d in refused.value.diagnostics)
    assert codes == ["invalid-field", "yaml-syntax"], refused.value
    assert str(config.path / "policy.yaml") in str(refused.value)
    assert (plane.server, plane.mesh, plane.rejected_reloads, plane.reloads) == (None, None, 1, 0)


def test_registration_names_a_known_workload_once(tmp_path: Path) -> None:
    _, plane = _plane(tmp_path)
    httpbin = ProxyRegistration.sidecar("foo/httpbin", "127.0.0.20")
    assert httpbin.node_id == "sidecar~127.0.0.20~httpbin.foo~foo.svc.cluster.local"
    with pytest.raises(ValueError, match="namespace/name"):
        ProxyRegistration("n", "httpbin", "127.0.0.20")
    with pytest.raises(ValueError, match="IP"):
        ProxyRegistration.sidecar("foo/httpbin", "localhost")

    async def scenario() -> None:
        plane.register(httpbin)
        assert await plane.reload() == []  # loaded, not served: a registration translates now
        assert plane.cache.get(httpbin.node_id) is not None
        assert plane.identity_of(httpbin.node_id) == HTTPBIN.uri
        plane.register(httpbin)  # the same again is fine
        with pytest.raises(ValueError, match="already"):
            plane.register(ProxyRegistration(httpbin.node_id, "foo/sleep", "127.0.0.20"))
        with pytest.raises(LookupError):
            plane.register(ProxyRegistration.sidecar("foo/nope", "127.0.0.21"))
        with pytest.raises(ValueError, match="no sidecar"):
            plane.register(ProxyRegistration.sidecar("legacy/httpbin", "127.0.0.22"))
        assert set(plane.registrations) == {httpbin.node_id}
        assert plane.identity_of("sidecar~127.0.0.21~nope.foo~foo.svc.cluster.local") is None

    run(scenario())


def test_watch_reloads_once_per_settled_change_and_same_content_publishes_nothing(
    tmp_path: Path,
) -> None:
    config, plane = _plane(tmp_path, debounce=0.15)
    httpbin = ProxyRegistration.sidecar("foo/httpbin", "127.0.0.20")
    plane.register(httpbin)

    def reloaded(count: int) -> Probe:
        async def probe() -> bool:
            return plane.reloads == count

        return probe

    async def scenario() -> None:
        await plane.reload()
        stop = asyncio.Event()
        watcher = asyncio.create_task(plane.watch(stop, interval=0.02))
        try:
            first = plane.cache.get(httpbin.node_id)
            for text in (BAD_YAML, DENY_GET.replace("GET", "PUT"), DENY_GET):  # an editor
                config.write_policy(text)
                await asyncio.sleep(0.04)  # well inside the debounce window
            await eventually(reloaded(2), what="one reload", timeout=5)
            denying = plane.cache.get(httpbin.node_id)
            assert denying != first and plane.rejected_reloads == 0
            config.write_policy(DENY_GET)  # new inode and mtime, same content
            await eventually(reloaded(3), what="a reload of the rewrite", timeout=5)
            assert plane.cache.get(httpbin.node_id) is denying  # nothing new published
        finally:
            stop.set()
            await watcher
        assert plane.reloads == 3

    run(scenario())


def test_ads_bootstrap_pins_the_control_plane_and_passes_envoy_validate(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {
        "node_id": "sidecar~127.0.0.20~httpbin.foo~foo.svc.cluster.local",
        "cluster": "httpbin.foo",
        "sds_socket": str(tmp_path / "sds.sock"),
        "xds_port": 15012,
    }
    by_ip = ads_bootstrap(xds_address="127.0.0.1", **kwargs)
    other_domain = control_plane_spiffe_id("example.org")
    by_name = ads_bootstrap(xds_address="xds.mesh", control_plane_id=other_domain, **kwargs)
    assert by_ip == ads_bootstrap(xds_address="127.0.0.1", **kwargs)  # pure
    xds, sds = by_ip["static_resources"]["clusters"]
    assert (xds["name"], xds["type"], sds["name"]) == (XDS_CLUSTER, "STATIC", "sds-grpc")
    assert by_name["static_resources"]["clusters"][0]["type"] == "STRICT_DNS"
    tls = xds["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["alpn_protocols"] == ["h2"]
    assert [s["name"] for s in tls["tls_certificate_sds_secret_configs"]] == ["default"]
    validation = tls["combined_validation_context"]
    assert validation["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    assert validation["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": CONTROL_PLANE_ID}}
    ]
    ads = by_ip["dynamic_resources"]
    assert ads["ads_config"]["grpc_services"][0]["envoy_grpc"]["cluster_name"] == XDS_CLUSTER
    assert ads["lds_config"] == ads["cds_config"] == {"ads": {}, "resource_api_version": "V3"}
    for bad in ({"xds_port": 0}, {"sds_socket": "x.sock"}, {"admin_address": "10.0.0.1"}):
        with pytest.raises(ValueError):
            ads_bootstrap(**{**kwargs, "xds_address": "127.0.0.1", **bad})
    with pytest.raises(ValueError, match="spiffe"):
        ads_bootstrap(xds_address="127.0.0.1", control_plane_id="trustmesh-ca", **kwargs)

    async def check() -> None:
        await asyncio.gather(
            validate_bootstrap(by_ip, workdir=tmp_path),
            validate_bootstrap(by_name, workdir=tmp_path),
        )

    run(check(), timeout=60)


def test_serving_certificate_is_renewed_at_half_life(tmp_path: Path) -> None:
    # The control plane's clock starts 13 h back and catches up with the real one, so
    # the client (on the real clock) accepts every certificate it is served.
    clock = [dt.datetime.now(dt.UTC) - dt.timedelta(hours=13)]
    _, plane = _plane(tmp_path, clock=lambda: clock[0])
    ca = CertificateAuthority.load(tmp_path / "ca")
    key = pki.generate_key()
    issued = ca.issue(pki.build_csr(key, [SLEEP.uri]), SLEEP, clock[0])
    pem = tmp_path / "client.pem"
    pem.write_bytes("".join(issued.chain_pem[:-1]).encode() + pki.key_to_pem(key))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.load_verify_locations(cadata=issued.chain_pem[-1])
    tls.load_cert_chain(pem)
    tls.set_alpn_protocols(["h2"])

    async def served_certificate() -> x509.Certificate:
        _, writer = await asyncio.open_connection("127.0.0.1", plane.port, ssl=tls)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.transport.abort()
        return x509.load_der_x509_certificate(der)

    async def scenario() -> None:
        await plane.start()
        try:
            first = await served_certificate()
            assert pki.uri_sans(first) == [plane.spiffe_id]
            clock[0] += dt.timedelta(hours=11)  # before half of its 24 h: kept
            assert (await served_certificate()).serial_number == first.serial_number
            clock[0] += dt.timedelta(hours=2)  # past half: a new one for new handshakes
            renewed = await served_certificate()
            assert renewed.serial_number != first.serial_number
            assert renewed.not_valid_after_utc > first.not_valid_after_utc
        finally:
            await plane.stop()

    run(scenario())

"""The control-plane rig (test_controlplane, test_controlplane_standalone).

Provides the config constants (the example mesh's policies, good and bad), ``ConfigDir``
(the watched directory), ``mesh_rig`` (CA + CaServer, a ControlPlane, two enrolled
workload agents and their Envoys, as a ``Rig`` of ``Proxy``s), ``ads_answer`` /
``credentials_of`` (a bare mTLS ADS client), ``reacked`` and ``_plane`` (a control
plane over a fresh config directory and CA, no Envoy).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import shutil
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from tests.envoy.conftest import Loopback, mesh_client_tls, stat
from tests.unit.meshutil import ROOT
from tests.xds.ads_rig import report
from tests.xds.controlplane_traffic import APP_PORT, app_server
from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.agent.sds import SdsServer, SecretStore, WorkloadSecret
from trustmesh.agent.workload import AgentConfig, WorkloadAgent
from trustmesh.agent.xds_bootstrap import ads_bootstrap
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.server import CaServer
from trustmesh.identity.spiffe import SpiffeId
from trustmesh.xds.cache import TYPE_CLUSTER, TYPE_LISTENER, Snapshot
from trustmesh.xds.controlplane import XDS_SERVER_NAME, ControlPlane, ProxyRegistration
from trustmesh.xds.server import ADS_SERVICE

EXAMPLES = ROOT / "examples"
DENY_GET = (EXAMPLES / "scenarios" / "02-deny-get" / "config.yaml").read_text()
STRICT = (EXAMPLES / "scenarios" / "12-mesh-strict" / "config.yaml").read_text()
BAD_YAML = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x\n"
BAD_ACTION = DENY_GET.replace("action: DENY", "action: MAYBE")
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


def _plane(tmp_path: Path, **options: Any) -> tuple[ConfigDir, ControlPlane]:
    config = ConfigDir(tmp_path / "config")
    ca = CertificateAuthority.init(tmp_path / "ca", CaConfig(), dt.datetime.now(dt.UTC))
    return config, ControlPlane([str(config.path)], ca=ca, **options)

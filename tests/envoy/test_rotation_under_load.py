"""Rotation under load: the real CA, two real agents, two real Envoys, steady traffic.

A bounded request stream (count and time) flows client app → client Envoy → mTLS →
server Envoy while (1) both agents rotate their leaves and (2) the CA rotates its root
through prepare → activate → renew → retire. Every request must succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from trustmesh.agent.envoy import EnvoyProcess
from trustmesh.agent.sds import SdsServer, SecretStore
from trustmesh.agent.workload import AgentConfig, WorkloadAgent
from trustmesh.envoy_bootstrap import (
    Backend,
    DirectResponse,
    InboundListener,
    OutboundListener,
    sidecar_bootstrap,
)
from trustmesh.identity import pki
from trustmesh.identity.ca import CaConfig, CertificateAuthority
from trustmesh.identity.rotation import RotationPolicy
from trustmesh.identity.server import CaServer
from trustmesh.identity.spiffe import SpiffeId

from .conftest import Loopback, Sidecars, eventually, run

pytestmark = pytest.mark.envoy

CLIENT = SpiffeId("cluster.local", "shop", "client")
SERVER = SpiffeId("cluster.local", "shop", "server")
MAX_REQUESTS = 20_000
MAX_SECONDS = 40


@dataclass
class Traffic:
    """Keep-alive HTTP/1.1 workers; every non-200 or broken exchange is a failure."""

    host: str
    port: int
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self) -> None:
        request = f"GET /work HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
        reader = writer = None
        while not self.stop.is_set() and self.ok + len(self.failures) < MAX_REQUESTS:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                assert reader is not None
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                status = int(head.split(b" ", 2)[1])
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"status {status}")
                if b"connection: close" in head.lower():
                    writer.transport.abort()
                    writer = None
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.transport.abort()
                writer = None
        if writer is not None:
            writer.transport.abort()

    async def wait_for_more(self, count: int) -> None:
        """Let at least ``count`` more requests complete (so a step happens under load)."""
        target = self.ok + count
        await eventually(lambda: _true(self.ok >= target), what="traffic", timeout=15)


async def _true(value: bool) -> bool:
    return value


@contextlib.asynccontextmanager
async def agent_sidecar(
    name: str,
    identity: SpiffeId,
    ca: CertificateAuthority,
    server: CaServer,
    workdir: Path,
    sidecars: Sidecars,
    *,
    inbound: InboundListener | None = None,
    outbound: tuple[OutboundListener, ...] = (),
) -> AsyncIterator[WorkloadAgent]:
    folder = workdir / name
    folder.mkdir()
    store = SecretStore()
    now = dt.datetime.now(dt.UTC)
    config = AgentConfig(
        identity=identity,
        ca_address=f"127.0.0.1:{server.port}",
        ca_renewal_address=f"127.0.0.1:{server.renewal_port}",
        ca_roots_pem=ca.bundle_pem(now),
        token=ca.token(identity.namespace, identity.service_account, now),
        bundle_refresh_seconds=3600,  # the test refreshes explicitly
    )
    agent = WorkloadAgent(config, store)
    sds = SdsServer(store, str(folder / "sds.sock"))
    await sds.start()
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    envoy = None
    try:
        await asyncio.wait_for(agent.ready.wait(), 15)
        bootstrap = sidecar_bootstrap(
            node_id=f"sidecar~{name}",
            cluster=name,
            sds_socket=sds.socket_path,
            admin_address="127.0.0.1",
            admin_port=0,
            inbound=inbound,
            outbound=outbound,
        )
        envoy = EnvoyProcess(bootstrap, workdir=folder, concurrency=1)
        sidecars.started.append(envoy)
        await envoy.start(timeout=10)
        yield agent
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        if envoy is not None:
            await envoy.stop()
        await sds.stop()


def test_leaf_and_root_rotation_under_load_drop_no_request(
    tmp_path: Path, loopback: Loopback, sidecars: Sidecars, workroot: Path
) -> None:
    server_at, client_at = loopback.endpoint(), loopback.endpoint()

    async def scenario() -> None:
        now = dt.datetime.now(dt.UTC)
        config = CaConfig(rotation=RotationPolicy(overlap=dt.timedelta(minutes=5)))
        ca = CertificateAuthority.init(tmp_path / "ca", config, now)
        ca_server = CaServer(ca)
        await ca_server.start()
        inbound = InboundListener(
            server_at[0],
            server_at[1],
            DirectResponse("ok\n"),
            allowed_peer_ids=frozenset({CLIENT.uri}),
        )
        outbound = OutboundListener(
            client_at[0],
            client_at[1],
            Backend(*server_at),
            expected_server_ids=frozenset({SERVER.uri}),
        )
        try:
            async with (
                agent_sidecar(
                    "server", SERVER, ca, ca_server, workroot, sidecars, inbound=inbound
                ) as server_agent,
                agent_sidecar(
                    "client", CLIENT, ca, ca_server, workroot, sidecars, outbound=(outbound,)
                ) as client_agent,
            ):
                agents = (server_agent, client_agent)
                traffic = Traffic(*client_at)
                workers = [asyncio.create_task(traffic.worker()) for _ in range(4)]
                try:
                    await traffic.wait_for_more(200)
                    first_root = ca.active.root

                    # 1. leaf rotation on both sides
                    for agent in agents:
                        agent.renew_now()
                    await eventually(
                        lambda: _true(all(a.renewals >= 1 for a in agents)),
                        what="leaf renewals",
                        timeout=15,
                    )
                    await traffic.wait_for_more(300)

                    # 2. root rotation: prepare (both roots trusted everywhere) …
                    ca.rotate_root(dt.datetime.now(dt.UTC))
                    assert all([await a.refresh_bundle() for a in agents])
                    await traffic.wait_for_more(300)
                    # … activate after the overlap (the clock is moved, not waited for) …
                    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=6)
                    assert [e.split()[0] for e in ca.tick(later)] == ["activated"]
                    new_root = ca.active.root
                    assert new_root != first_root
                    for agent in agents:
                        agent.renew_now()
                    await eventually(
                        lambda: _true(all(a.renewals >= 2 for a in agents)),
                        what="renewals under the new root",
                        timeout=15,
                    )
                    for agent in agents:
                        cert = agent.certificate
                        assert cert is not None and cert.issuer == new_root.subject
                    await traffic.wait_for_more(300)
                    # … and retire the old root once every leaf chains to the new one.
                    old = next(s for s in ca.slots if s.root == first_root)
                    ca.shorten_retirement(old.slot_id, dt.datetime.now(dt.UTC))
                    assert any(e.startswith("retired") for e in ca.tick(dt.datetime.now(dt.UTC)))
                    assert all([await a.refresh_bundle() for a in agents])
                    for agent in agents:
                        bundle = pki.load_certs(agent.store.current()[1].trust_bundle_pem)  # type: ignore[index]
                        assert bundle == [new_root]
                    await traffic.wait_for_more(300)
                finally:
                    traffic.stop.set()
                    await asyncio.gather(*workers)
                assert traffic.failures == [], traffic.failures[:5]
                assert traffic.ok >= 1400
                print(f"requests ok={traffic.ok} failed={len(traffic.failures)}")
        finally:
            await ca_server.stop()

    run(scenario(), timeout=MAX_SECONDS + 20)
